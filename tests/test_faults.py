"""Fault injection: SIGKILL `collect-losses` and `train` at seeded random points, rerun the same command,
and get the artifacts of an uninterrupted run, byte for byte (CPU, same seed), with no temp file left.

The killed run is a real process (`python -m mlrnet_cli ...`). The kill point is seeded: wait until a
milestone of the run appears on disk (the process started, the token cache, the first epoch's resume
state), then a seeded random delay. In the fast tests the rerun goes through the CLI in this process (the
same command, without paying the import time again); the `slow` ones kill several times in a row and rerun
as subprocesses too.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_workspace
from typer.testing import CliRunner

from mlrnet_cli import artifacts
from mlrnet_cli.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")  # same numerics as the subprocesses

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
SIZE = ["--batch-size", "16", "--max-length", "24", "--device", "cpu"]
COLLECT = ["--epochs", "3", "--lr", "1e-3", *SIZE]
TRAIN = ["--epochs", "2", "--meta-per-class", "4", "--meta-params", "last-1", *SIZE]

#: milestones a kill waits for (a glob under the workspace; "" = the process has started)
COLLECT_MILESTONES = ["", "cache/tokens-*", "stage1/state/state.pt", "stage1/mlrnet.json"]
TRAIN_MILESTONES = ["", "model/last", "model/state/state.pt"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file's bytes (hash), except what holds wall-clock times: history.arrow without its `seconds`
    column, and the resume state (present, not compared: it holds the same history)."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(root))
        if rel == "model/history.arrow":
            table = artifacts.read_table(p).drop(["seconds"])
            out[rel] = hashlib.sha256(str(table.to_pydict()).encode()).hexdigest()
        elif rel.endswith("state/state.pt"):
            out[rel] = "<present>"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(artifacts.TMP_PREFIX)]


def cli(args: list[str]) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TERM="dumb")
    env["OMP_NUM_THREADS"] = "1"  # as in this process (see the one_thread fixture): the same numerics
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("MLRNET_DEBUG", None)
    return env


def run_and_kill(args: list[str], ws: Path, milestone: str, delay: float, timeout: float = 300) -> bool:
    """Start `python -m mlrnet_cli ARGS`, SIGKILL it ``delay`` s after ``milestone`` appears; True if killed
    (False: it finished first, which a later rerun must also handle)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlrnet_cli", *args],
        cwd=ws.parent,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    t0 = time.monotonic()
    try:
        while milestone and proc.poll() is None and not any(ws.glob(milestone)):
            assert time.monotonic() - t0 < timeout, f"milestone {milestone} never appeared"
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert proc.returncode == 0, err
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def run_subprocess(args: list[str], ws: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "mlrnet_cli", *args],
        cwd=ws.parent,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr


@dataclass(frozen=True)
class Reference:
    """One uninterrupted run, in the path every faulted run uses too (artifacts record their input paths)."""

    ws: Path
    pristine: Path  #: after corrupt
    collected: Path  #: after corrupt + collect-losses
    after_collect: dict[str, str]
    after_train: dict[str, str]
    collect: list[str]
    train: list[str]


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Reference:
    root = tmp_path_factory.mktemp("faults")
    ws = make_workspace(root / "ws")
    pristine = Path(shutil.copytree(ws, root / "pristine"))
    collect = ["collect-losses", "-w", str(ws), "--model", str(tiny_model_dir), *COLLECT]
    train = ["train", "-w", str(ws), *TRAIN]
    cli(collect)
    after_collect = snapshot(ws)
    collected = Path(shutil.copytree(ws, root / "collected"))
    cli(train)
    after_train = snapshot(ws)
    assert not temps(ws)
    return Reference(ws, pristine, collected, after_collect, after_train, collect, train)


def restore(src: Path, ws: Path) -> None:
    shutil.rmtree(ws, ignore_errors=True)
    shutil.copytree(src, ws)


def kill_points(seed: int, milestones: list[str], n: int, max_delay: float) -> list[tuple[str, float]]:
    rng = random.Random(seed)
    return [(rng.choice(milestones), round(rng.uniform(0.0, max_delay), 3)) for _ in range(n)]


def killed_then_rerun(
    ws: Path, command: list[str], points: list[tuple[str, float]], rerun_in_subprocess: bool
) -> dict[str, str]:
    killed = 0
    for milestone, delay in points:
        killed += run_and_kill(command, ws, milestone, delay)
    if rerun_in_subprocess:
        run_subprocess(command, ws)
    else:
        cli(command)
    assert not temps(ws), temps(ws)
    assert killed >= 1, "no kill landed before the run ended: the test proved nothing"
    return snapshot(ws)


def test_collect_losses_killed_then_rerun_equals_uninterrupted(ref: Reference) -> None:
    restore(ref.pristine, ref.ws)
    # seeded: after epoch 1's resume state, somewhere in epoch 2 (the resume path, not just a restart)
    points = [("stage1/state/state.pt", round(random.Random(8).uniform(0.0, 0.5), 3))]
    assert killed_then_rerun(ref.ws, ref.collect, points, rerun_in_subprocess=False) == ref.after_collect


def test_train_killed_then_rerun_equals_uninterrupted(ref: Reference) -> None:
    restore(ref.collected, ref.ws)
    points = [("model/state/state.pt", round(random.Random(8).uniform(0.0, 0.5), 3))]
    assert killed_then_rerun(ref.ws, ref.train, points, rerun_in_subprocess=False) == ref.after_train


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collect_losses_killed_repeatedly(seed: int, ref: Reference) -> None:
    restore(ref.pristine, ref.ws)
    points = kill_points(seed, COLLECT_MILESTONES, 3, 1.5)
    assert killed_then_rerun(ref.ws, ref.collect, points, rerun_in_subprocess=True) == ref.after_collect


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_killed_repeatedly(seed: int, ref: Reference) -> None:
    restore(ref.collected, ref.ws)
    points = kill_points(seed, TRAIN_MILESTONES, 3, 1.5)
    assert killed_then_rerun(ref.ws, ref.train, points, rerun_in_subprocess=True) == ref.after_train
