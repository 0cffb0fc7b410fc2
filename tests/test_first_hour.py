"""What a newcomer meets in the first hour (issue #20): rerunning an edited pipeline, interrupted runs, settings
that flow from the artifacts, advice that can be followed, and a collapse warning that fires on collapses only."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import trained_workspace, write_synthetic_source
from typer.testing import CliRunner

from mlrnet_cli import artifacts
from mlrnet_cli import train as train_mod
from mlrnet_cli.cli import app
from mlrnet_cli.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
SIZE = ["--device", "cpu"]
COLLECT = ["--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--max-length", "24", *SIZE]
TRAIN = [
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--meta-per-class",
    "4",
    "--meta-params",
    "last-1",
    "--max-length",
    "24",
    *SIZE,
]


@pytest.fixture(scope="module")
def done_ws(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """corrupt, collect-losses and train (MLRNet, 1 epoch each, --max-length 24): copied by the tests."""
    return trained_workspace(tmp_path_factory.mktemp("first-hour") / "ws", tiny_model_dir, COLLECT, TRAIN)


@pytest.fixture
def ws(done_ws: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(done_ws, tmp_path / "ws"))


def one_line_error(r, code: int = 1) -> str:
    assert r.exit_code == code, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlrnet: error: "), err
    return err[0]


# 1. eval and weights are reports of their inputs: an edited pipeline reruns ---------------------------------


def test_eval_and_weights_are_rewritten_when_the_model_changed(ws: Path) -> None:
    for cmd in (["eval"], ["weights"]):
        assert runner.invoke(app, [*cmd, "-w", str(ws), *SIZE]).exit_code == 0
    metrics_before = json.loads((ws / "eval" / "metrics.json").read_text())
    weights_before = artifacts.read_table_meta(ws / "weights.arrow")
    # an upstream stage reruns with another setting (as an edited quickstart does), then the reports again
    r = runner.invoke(app, ["train", "-w", str(ws), *TRAIN, "--seed", "1", "--overwrite"])
    assert r.exit_code == 0, r.output
    for cmd in (["eval"], ["weights"]):
        r = runner.invoke(app, [*cmd, "-w", str(ws), *SIZE])
        assert r.exit_code == 0, r.output
    metrics_after = json.loads((ws / "eval" / "metrics.json").read_text())
    weights_after = artifacts.read_table_meta(ws / "weights.arrow")
    assert metrics_after["mlrnet"]["inputs"]["model"] != metrics_before["mlrnet"]["inputs"]["model"]
    assert weights_after["inputs"]["model"] != weights_before["inputs"]["model"]


def test_a_file_mlrnet_did_not_write_is_still_not_replaced(ws: Path) -> None:
    (ws / "eval").mkdir()
    (ws / "eval" / "metrics.json").write_text('{"mine": 1}\n')
    line = one_line_error(runner.invoke(app, ["eval", "-w", str(ws), *SIZE]))
    assert "different run" in line and "--overwrite" in line
    assert json.loads((ws / "eval" / "metrics.json").read_text()) == {"mine": 1}


# 3. interrupted runs --------------------------------------------------------------------------------------------


class _Interrupt:
    """A progress sink that stops the run when epoch ``at`` starts (after the previous epoch was saved)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def task(self, description: str, total: int | None):
        from mlrnet_cli.progress import NullProgress

        if description.startswith(f"epoch {self.at}/"):
            raise KeyboardInterrupt
        return NullProgress().task(description, total)


CFG = TrainConfig(
    method="mlrnet", epochs=2, batch_size=16, max_length=24, meta_per_class=4, device="cpu", meta_params="last-1"
)


def _interrupted(ws: Path, cfg: TrainConfig = CFG) -> None:
    with pytest.raises(KeyboardInterrupt):
        train(cfg, workdir=ws, overwrite=True, progress=_Interrupt(2))


def test_eval_and_weights_refuse_the_model_of_an_unfinished_run(ws: Path) -> None:
    _interrupted(ws)
    for cmd in ("eval", "weights"):
        line = one_line_error(runner.invoke(app, [cmd, "-w", str(ws), *SIZE]))
        assert "unfinished training run (1 of 2 epochs done)" in line, line
        assert "rerun the same `mlrnet train`" in line and "--allow-unfinished" in line
    assert not (ws / "eval" / "metrics.json").exists()
    r = runner.invoke(app, ["eval", "-w", str(ws), *SIZE, "--allow-unfinished"])
    assert r.exit_code == 0, r.output
    assert "UNFINISHED" in r.stderr
    metrics = json.loads((ws / "eval" / "metrics.json").read_text())
    assert metrics["unfinished_training"] == {"epochs_done": 1, "epochs": 2}
    r = runner.invoke(app, ["weights", "-w", str(ws), *SIZE, "--allow-unfinished", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["summary"]["unfinished_training"] == {"epochs_done": 1, "epochs": 2}
    # finished by rerunning the same command: no longer refused
    train(CFG, workdir=ws)
    assert runner.invoke(app, ["eval", "-w", str(ws), *SIZE]).exit_code == 0


def test_ctrl_c_says_interrupted_and_exits_130(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlrnet_cli import evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate", interrupted)
    r = runner.invoke(app, ["eval", "-w", str(ws), *SIZE])
    assert r.exit_code == 130
    assert r.stderr.strip() == "mlrnet: interrupted (rerun the same command to resume)"


# 5. settings flow from the artifacts ----------------------------------------------------------------------------


def test_eval_and_weights_use_the_max_length_the_model_was_trained_with(ws: Path) -> None:
    r = runner.invoke(app, ["eval", "-w", str(ws), *SIZE, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["max_length"] == 24
    assert json.loads((ws / "eval" / "metrics.json").read_text())["mlrnet"]["config"]["max_length"] == 24
    r = runner.invoke(app, ["weights", "-w", str(ws), *SIZE, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["summary"]["max_length"] == 24
    # an explicit --max-length still wins
    r = runner.invoke(app, ["eval", "-w", str(ws), *SIZE, "--json", "--max-length", "16"])
    assert r.exit_code == 0 and json.loads(r.stdout)["max_length"] == 16


def test_another_device_alone_resumes_training(ws: Path) -> None:
    _interrupted(ws)
    resumed = train(replace(CFG, device="auto"), workdir=ws)  # auto is the CPU here: the same computation
    assert resumed.resumed_from == 1 and resumed.epochs_run == 1


# 6. advice that can be followed ----------------------------------------------------------------------------------


def _pickle_only(folder: Path) -> Path:
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("cmd", ["eval", "weights"])
def test_eval_and_weights_do_not_suggest_options_they_lack(ws: Path, tmp_path: Path, cmd: str) -> None:
    model = _pickle_only(Path(shutil.copytree(ws / "model" / "best", tmp_path / "pickled")))
    line = one_line_error(runner.invoke(app, [cmd, "-w", str(ws), *SIZE, "--model", str(model)]))
    assert "pickle" in line and "--allow-pickle" not in line, line
    shutil.rmtree(ws / "model")
    line = one_line_error(runner.invoke(app, [cmd, "-w", str(ws), *SIZE]))
    assert "no trained model" in line
    if cmd == "weights":
        assert "hub id" not in line, line


def test_eval_of_a_hub_id_offline_probes_the_hub_once(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Like every other stage: a cache lookup, one quick probe, one line (not the hub client's retries)."""
    import transformers

    from mlrnet_cli import modeling

    probes: list[int] = []
    online_calls: list[str] = []
    real = transformers.AutoConfig.from_pretrained

    def from_pretrained(name, *args, **kwargs):
        if not kwargs.get("local_files_only"):
            online_calls.append(str(name))
        return real(name, *args, **{**kwargs, "local_files_only": True})

    monkeypatch.setattr(modeling, "_hub_reachable", lambda timeout=3.0: probes.append(1) or False)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    line = one_line_error(runner.invoke(app, ["eval", "-w", str(ws), *SIZE, "--model", "someone/some-model"]))
    assert "unreachable" in line and "--model PATH" in line, line
    assert probes == [1] and online_calls == []


def test_corrupt_into_a_read_only_folder_is_a_one_line_error(tmp_path: Path) -> None:
    src = write_synthetic_source(tmp_path / "src.parquet")
    data = tmp_path / "ws" / "data"
    data.mkdir(parents=True)
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(data)], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot mount a read-only tmpfs here")
    if res.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        r = runner.invoke(
            app,
            [
                "corrupt",
                "-w",
                str(tmp_path / "ws"),
                "--data",
                str(src),
                "--meta-pool-per-class",
                "4",
                "--imbalance",
                "2",
            ],
        )
        line = one_line_error(r)
        assert "cannot write" in line and str(data) in line and "internal error" not in line, line
    finally:
        subprocess.run(["umount", str(data)], capture_output=True, timeout=10)


def test_an_unreadable_resume_state_names_the_way_out(ws: Path, tmp_path: Path) -> None:
    _interrupted(ws)
    state = ws / "model" / "state" / "state.pt"
    state.write_bytes(b"\x80\x04not a pickle at all")
    line = one_line_error(runner.invoke(app, ["train", "-w", str(ws), *TRAIN, "--epochs", "2"]))
    assert "weights_only" not in line and "damaged or was not written by mlrnet" in line, line
    assert f"delete {ws / 'model' / 'state'} or pass --overwrite" in line
    # and the advice holds: --overwrite starts again
    r = runner.invoke(app, ["train", "-w", str(ws), *TRAIN, "--epochs", "2", "--overwrite"])
    assert r.exit_code == 0, r.output


def test_an_unpicklable_collect_state_does_not_quote_torch(done_ws: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    from mlrnet_cli.collect import CollectConfig, collect_losses
    from mlrnet_cli.workspace import Workspace

    ws = Path(shutil.copytree(done_ws, tmp_path / "ws"))
    for rel in ("model", "losses.safetensors", "stage1"):
        shutil.rmtree(ws / rel) if (ws / rel).is_dir() else (ws / rel).unlink()
    w = Workspace.at(ws)
    cfg = CollectConfig(model=str(tiny_model_dir), epochs=2, batch_size=16, lr=1e-3, max_length=24, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        collect_losses(
            cfg,
            train_path=w.train,
            manifest_path=w.manifest,
            losses_path=w.losses,
            stage1_dir=w.stage1,
            cache_dir=w.cache,
            progress=_Interrupt(2),
        )
    (state,) = list((w.stage1 / "state").glob("state.pt"))
    torch.save({"optimizer": np.arange(3)}, state)  # numpy objects: refused by weights_only
    r = runner.invoke(app, ["collect-losses", "-w", str(ws), "--model", str(tiny_model_dir), *COLLECT, "--epochs", "2"])
    line = one_line_error(r)
    assert "weights_only" not in line and "can still be loaded" not in line, line  # torch's advice
    assert "damaged or was not written by mlrnet" in line and "--overwrite" in line, line


# 9. the collapse warning fires on collapses, not on a healthy imbalanced start --------------------------------


def test_real_collapse_needs_a_fall_or_a_lean_that_imbalance_does_not_explain() -> None:
    from mlrnet_cli.train import real_collapse

    balanced = np.repeat(np.arange(4), 20)
    head0 = np.array([0] * 759 + [1] * 373 + [2] * 242 + [3] * 180)  # the quickstart's observed training labels
    # a constructed collapse: one class for 88 % of the rows, not the largest training class
    assert real_collapse(np.array([4, 70, 4, 2]), balanced, 0.30, None, head0) == (1, 0.875, 0.25)
    assert real_collapse(np.array([70, 4, 4, 2]), balanced, 0.30, None) == (0, 0.875, 0.25)  # no train labels
    # plain's first epoch on the quickstart: the largest training class for 94 %, then dev rises to 0.65
    assert real_collapse(np.array([75, 2, 2, 1]), balanced, 0.3125, None, head0) is None
    # MLRNet's first epoch there: 'Sports' for 55 % (dev 0.41, rising to 0.79) ...
    assert real_collapse(np.array([20, 44, 8, 8]), balanced, 0.4125, None, head0) is None
    # ... and a wobble at epoch 5: one class for 51 %, dev 0.70 after a best of 0.75
    assert real_collapse(np.array([14, 12, 13, 41]), balanced, 0.70, 0.75, head0) is None
    # a lean that costs half the way from the best accuracy to the majority class's is a collapse, whatever class
    assert real_collapse(np.array([48, 12, 10, 10]), balanced, 0.45, 0.75, head0) == (0, 0.6, 0.25)
    assert real_collapse(np.array([20, 20, 20, 20]), balanced, 0.20, 0.75, head0) is None  # no lean: not this
    # a first epoch below half of what always guessing the most frequent dev class gets: collapsed already
    assert real_collapse(np.array([70, 4, 4, 2]), balanced, 0.10, None, head0) == (0, 0.875, 0.25)
    assert real_collapse(np.array([70, 4, 4, 2]), balanced, 0.13, None, head0) is None


def test_constant_weights_are_not_blamed_on_a_fast_meta_net(
    done_ws: Path, tmp_path: Path, mlrnet_logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = Path(shutil.copytree(done_ws, tmp_path / "ws"))
    monkeypatch.setattr(train_mod, "one_class_collapse", lambda predicted, labels: (1, 0.875, 0.25))
    # --meta-lr 1e-9: θ barely moves, so every row keeps nearly the same weight
    r = runner.invoke(app, ["train", "-w", str(ws), *TRAIN, "--meta-lr", "1e-9", "--overwrite"])
    assert r.exit_code == 0, r.output
    history = artifacts.read_table(ws / "model" / "history.arrow").to_pylist()
    assert history[0]["weight_std"] < train_mod.SPREAD_WEIGHT_STD
    warnings = [rec.getMessage() for rec in mlrnet_logs.records if rec.levelname == "WARNING"]
    assert not any("too fast" in w for w in warnings), warnings
    assert any("predicts" in w and "try a smaller --lr" in w for w in warnings), warnings
