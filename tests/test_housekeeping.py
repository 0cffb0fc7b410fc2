"""What a finished workspace holds: files as readable as the umask allows, and no needless copies."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import make_workspace
from typer.testing import CliRunner

from mlrnet_cli.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
SIZE = ["--device", "cpu", "--max-length", "24", "--batch-size", "16"]


@pytest.fixture
def umask_002():
    before = os.umask(0o002)  # a shared workspace: group-writable, world-readable
    yield
    os.umask(before)


def test_artifacts_and_folders_follow_the_umask(tmp_path: Path, tiny_model_dir: Path, umask_002: None) -> None:
    ws = make_workspace(tmp_path / "ws")
    for args in (
        ["collect-losses", "--model", str(tiny_model_dir), "--epochs", "1"],
        ["train", "--epochs", "1", "--meta-per-class", "4", "--meta-params", "last-1"],
        ["eval", "--predictions"],
        ["weights"],
    ):
        r = runner.invoke(app, [args[0], "-w", str(ws), *args[1:], *SIZE])
        assert r.exit_code == 0, (args, r.output)
    modes = {str(p.relative_to(ws)): stat.S_IMODE(p.stat().st_mode) for p in ws.rglob("*")}
    assert "model/best/model.safetensors" in modes and "data/train.arrow" in modes and "eval/metrics.json" in modes
    wrong = {rel: oct(m) for rel, m in modes.items() if m != (0o775 if (ws / rel).is_dir() else 0o664)}
    assert wrong == {}


def test_a_frozen_encoder_is_stored_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    """stage1/, model/best and model/last share one encoder file (hard links); each stays a loadable model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from mlrnet_cli.artifacts import FROZEN_SHARD, HEAD_SHARD

    ws = make_workspace(tmp_path / "ws")
    frozen = ["--freeze-encoder", "--lr", "1e-2"]
    for args in (
        ["collect-losses", "--model", str(tiny_model_dir), "--epochs", "2", *frozen],
        ["train", "--epochs", "2", "--meta-per-class", "4", "--meta-params", "head", *frozen],
        ["eval"],
        ["weights"],
    ):
        r = runner.invoke(app, [args[0], "-w", str(ws), *args[1:], *SIZE])
        assert r.exit_code == 0, (args, r.output)
    folders = [ws / "stage1", ws / "model" / "best", ws / "model" / "last"]
    # and the two runs of a frozen MLRNet's default --meta-share auto, under model/candidates
    stored = sorted(ws.rglob(FROZEN_SHARD))
    assert len(stored) == 3 + 2 * 2 and {f.parent for f in stored} >= set(folders)
    encoders = [f.stat() for f in stored]
    assert len({(s.st_dev, s.st_ino) for s in encoders}) == 1 and encoders[0].st_nlink == len(stored)
    assert not any((f / "model.safetensors").exists() for f in folders)
    heads = [load_file(str(f / HEAD_SHARD)) for f in folders]
    assert set(heads[0]) == {"classifier.weight", "classifier.bias"}
    assert not heads[0]["classifier.weight"].equal(heads[2]["classifier.weight"])  # the head did train
    encoder = load_file(str(folders[0] / FROZEN_SHARD))
    for folder, head in zip(folders, heads, strict=True):
        state = AutoModelForSequenceClassification.from_pretrained(folder).state_dict()
        for k, v in {**encoder, **head}.items():
            assert state[k].equal(v), (folder, k)
