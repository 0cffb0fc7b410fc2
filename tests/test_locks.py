"""Two runs on one workspace: the second fails at once with one line; a shared cache keeps live temp files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlrnet_cli import artifacts, locks
from mlrnet_cli.cli import app
from mlrnet_cli.errors import WorkspaceBusyError

runner = CliRunner()
TRAIN = ["--epochs", "1", "--batch-size", "16", "--max-length", "24", "--meta-per-class", "4", "--device", "cpu"]


def test_exclusive_names_the_holder_and_releases(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    model = ws / "model"
    with locks.exclusive(model, "train"):
        with pytest.raises(WorkspaceBusyError, match=rf"being written by mlrnet train \(pid {os.getpid()}\)"):
            with locks.exclusive([model, tmp_path / "new" / "losses.safetensors"], "collect-losses"):
                pass  # pragma: no cover
        assert not (tmp_path / "new").exists()  # the failed run left no folder behind
        with locks.exclusive(ws / "model-b", "train"):  # another output in the same workspace: no wait
            pass
    assert not locks.lock_file(model).exists()  # released: the lock file goes with the lock
    with locks.if_unused(tmp_path / "missing") as unused:
        assert not unused
    with locks.shared(ws), locks.shared(ws), locks.if_unused(ws) as unused:
        assert not unused  # two writers may share; a cleaner waits for neither
    with locks.if_unused(ws) as unused:
        assert unused


def test_a_lock_held_by_another_process_is_seen_and_dies_with_it(tmp_path: Path) -> None:
    model = tmp_path / "ws" / "model"
    code = (
        "import sys, time; from pathlib import Path; from mlrnet_cli import locks\n"
        "with locks.exclusive(Path(sys.argv[1]), 'train'):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(model)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusyError, match=rf"pid {proc.pid}\)"):
            with locks.exclusive(model, "train"):
                pass  # pragma: no cover
    finally:
        proc.kill()
        proc.wait()
    with locks.exclusive(model, "train"):  # the kernel dropped the killed holder's lock
        pass


def test_a_second_run_on_the_same_outputs_fails_with_one_line(workspace: Path, tiny_model_dir: Path) -> None:
    before = sorted(p.name for p in workspace.iterdir())
    runs = {
        "losses.safetensors": ["collect-losses", "--model", str(tiny_model_dir), "--epochs", "1"],
        "model": ["train", "--model", str(tiny_model_dir), *TRAIN],
    }
    for output, args in runs.items():
        with locks.exclusive(workspace / output, "running-stage"):
            r = runner.invoke(app, [args[0], "-w", str(workspace), *args[1:]])
        assert r.exit_code == 1, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{output} is being written by mlrnet running-stage" in lines[0], r.stderr
    assert sorted(p.name for p in workspace.iterdir()) == before  # nothing else, not even a lock file


def test_runs_writing_other_outputs_in_one_workspace_do_not_wait(workspace: Path, tiny_model_dir: Path) -> None:
    with locks.exclusive(workspace / "model", "train"):  # e.g. `mlrnet train &` still running
        r = runner.invoke(
            app,
            [
                "train",
                "-w",
                str(workspace),
                "--model",
                str(tiny_model_dir),
                *TRAIN,
                "--method",
                "plain",
                "--out",
                str(workspace / "model-plain"),
            ],
        )
    assert r.exit_code == 0, r.output
    assert (workspace / "model-plain" / "best" / "model.safetensors").is_file()


def test_finished_and_failed_runs_leave_no_lock_files(workspace: Path, tiny_model_dir: Path) -> None:
    """docs/reliability.md: a failed run leaves the workspace as it was, and a finished one no lock behind."""
    base = ["-w", str(workspace), "--model", str(tiny_model_dir), "--device", "cpu", "--max-length", "24"]
    r = runner.invoke(app, ["collect-losses", *base, "--epochs", "1", "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", *base, *TRAIN, "--method", "plain"])
    assert r.exit_code == 0, r.output
    for args in (
        ["train", *base, *TRAIN, "--alpha", "0"],  # fails before the lock
        ["train", *base, *TRAIN, "--method", "plain", "--lr", "1e-3"],  # fails under it: another run
        ["collect-losses", *base, "--epochs", "2"],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
    assert sorted(p.relative_to(workspace) for p in workspace.rglob(f"{locks.LOCK_NAME}.*")) == []


def test_train_cleans_the_cache_only_when_no_one_else_uses_it(workspace: Path, tiny_model_dir: Path) -> None:
    cache = workspace / "cache"
    cache.mkdir(exist_ok=True)
    live = cache / f"{artifacts.TMP_PREFIX}tokens-another-run.arrow.x1"
    live.write_bytes(b"half written")
    args = ["train", "-w", str(workspace), "--model", str(tiny_model_dir), *TRAIN, "--method", "plain"]
    with locks.shared(cache):  # another workspace's run, writing into this (linked) cache
        r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert live.exists()
    r = runner.invoke(app, [*args, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert not live.exists()  # nobody held the cache: a killed run's temp file


def test_a_run_that_fails_early_creates_no_workspace(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    r = runner.invoke(app, ["train", "-w", str(missing), *TRAIN])
    assert r.exit_code == 1 and "manifest" in r.stderr
    assert not missing.exists()
