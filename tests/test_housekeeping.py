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
    for args in (["collect-losses", "--model", str(tiny_model_dir), "--epochs", "1"],
                 ["train", "--epochs", "1", "--meta-per-class", "4", "--meta-params", "last-1"],
                 ["eval", "--predictions"], ["weights"]):
        r = runner.invoke(app, [args[0], "-w", str(ws), *args[1:], *SIZE])
        assert r.exit_code == 0, (args, r.output)
    modes = {str(p.relative_to(ws)): stat.S_IMODE(p.stat().st_mode) for p in ws.rglob("*")}
    assert "model/best/model.safetensors" in modes and "data/train.arrow" in modes and "eval/metrics.json" in modes
    wrong = {rel: oct(m) for rel, m in modes.items() if m != (0o775 if (ws / rel).is_dir() else 0o664)}
    assert wrong == {}
