"""The whole pipeline twice with the same seed on CPU: byte-identical Arrow and safetensors artifacts."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import write_synthetic_source
from typer.testing import CliRunner

from mlrnet_cli import artifacts
from mlrnet_cli.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")  # same numerics as the subprocesses

runner = CliRunner()
SIZE = ["--batch-size", "16", "--max-length", "24", "--device", "cpu"]


def pipeline(root: Path, model: Path) -> Path:
    """corrupt -> collect-losses -> train -> eval -> weights, every stage with its defaults but the sizes."""
    src = write_synthetic_source(root / "src.parquet", per_class=40, seed=0)
    test = write_synthetic_source(root / "test.parquet", per_class=10, seed=1)
    ws = root / "ws"
    steps = [
        [
            "corrupt",
            "--data",
            str(src),
            "--test-data",
            str(test),
            "--imbalance",
            "4",
            "--noise",
            "uniform:0.4",
            "--meta-pool-per-class",
            "12",
            "--seed",
            "3",
        ],
        ["collect-losses", "--model", str(model), "--epochs", "2", "--lr", "1e-3", "--seed", "3", *SIZE],
        ["train", "--epochs", "1", "--meta-per-class", "4", "--meta-params", "last-1", "--seed", "3", *SIZE],
        ["eval", "--predictions", "--max-length", "24", "--device", "cpu"],
        ["weights", "--max-length", "24", "--device", "cpu"],
    ]
    for args in steps:
        r = runner.invoke(app, [args[0], "-w", str(ws), *args[1:]])
        assert r.exit_code == 0, (args[0], r.output)
    return ws


def artifact_bytes(ws: Path) -> dict[str, str]:
    """Hashes of every .arrow/.safetensors/.json artifact; history.arrow without its wall-clock `seconds`."""
    out = {}
    for p in sorted(ws.rglob("*")):
        rel = str(p.relative_to(ws))
        if p.suffix not in (".arrow", ".safetensors", ".json") or rel.startswith("model/state"):
            continue
        if rel == "model/history.arrow":
            data = str(artifacts.read_table(p).drop(["seconds"]).to_pydict()).encode()
        else:
            data = p.read_bytes()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def test_whole_pipeline_twice_gives_identical_bytes(tmp_path: Path, tiny_model_dir: Path) -> None:
    root = tmp_path / "run"  # the same path both times: artifacts record their input paths
    root.mkdir()
    first = artifact_bytes(pipeline(root, tiny_model_dir))
    shutil.rmtree(root)
    root.mkdir()
    second = artifact_bytes(pipeline(root, tiny_model_dir))
    assert first == second
    expected = {
        "data/train.arrow",
        "data/clean.arrow",
        "data/test.arrow",
        "losses.safetensors",
        "stage1/model.safetensors",
        "model/best/model.safetensors",
        "model/best/meta_net.safetensors",
        "model/last/model.safetensors",
        "model/history.arrow",
        "eval/metrics.json",
        "eval/predictions.arrow",
        "weights.arrow",
    }
    assert expected <= set(first), expected - set(first)
    assert any(k.startswith("cache/tokens-") for k in first)
    # the timings are the only thing that differs in history.arrow; nothing else carries a clock
    h = artifacts.read_table(root / "ws" / "model" / "history.arrow")
    assert "seconds" in h.column_names
