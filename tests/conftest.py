"""Shared fixtures: a tiny random-init BERT with a character WordPiece vocabulary (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlrnet_cli.testing import TINY_VOCAB, build_tiny_model  # noqa: F401  (re-exported for tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.pop("MLRNET_WORKDIR", None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 4-label BERT classifier folder, shared by the session (treat it as read-only)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: faster for tiny models on shared cores, and the same as OMP_NUM_THREADS=1
    subprocesses (so in-process and subprocess runs give the same numerics)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_workdir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLRNET_WORKDIR", raising=False)
    monkeypatch.delenv("MLRNET_DEBUG", raising=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


TOPIC_WORDS = [
    ["world", "war", "peace", "minister", "election"],
    ["sports", "game", "team", "score", "coach"],
    ["business", "stock", "market", "profit", "bank"],
    ["science", "space", "computer", "software", "research"],
]


def write_synthetic_source(path: Path, per_class: int = 40, num_classes: int = 4, seed: int = 0) -> Path:
    """A small learnable text table: each class has its own topic words (Parquet, ints as labels)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for k in range(num_classes):
        words = TOPIC_WORDS[k % len(TOPIC_WORDS)]
        for j in range(per_class):
            picks = rng.choice(words, size=3)
            texts.append(f"{' '.join(picks)} item {j}")
            labels.append(k)
    order = rng.permutation(len(texts))
    pq.write_table(pa.table({"text": [texts[i] for i in order], "label": [labels[i] for i in order]}), path)
    return path


def make_workspace(
    root: Path,
    *,
    per_class: int = 40,
    imbalance: float = 4.0,
    noise: str = "uniform:0.4",
    pool: int = 12,
    seed: int = 0,
) -> Path:
    """Run `corrupt` on a synthetic source into ``root`` (a workspace folder) and return ``root``."""
    from mlrnet_cli.corrupt import CorruptConfig, InputSpec, NoiseSpec, corrupt

    src = write_synthetic_source(root.parent / f"{root.name}-source.parquet", per_class=per_class, seed=seed)
    test = write_synthetic_source(root.parent / f"{root.name}-test.parquet", per_class=10, seed=seed + 1)
    corrupt(
        CorruptConfig(imbalance=imbalance, noise=NoiseSpec.parse(noise), meta_pool_per_class=pool, seed=seed),
        InputSpec(data=str(src), test_data=str(test)),
        root / "data",
    )
    return root


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A fresh workspace after `corrupt` (4 classes, imbalance 4, uniform:0.4, pool 12 per class)."""
    return make_workspace(tmp_path / "ws")


@pytest.fixture
def mlrnet_logs(caplog: pytest.LogCaptureFixture):
    """Records of the ``mlrnet`` logger. The CLI's setup_logging stops propagation to the root logger (where
    caplog listens), so caplog's handler is attached to the logger itself."""
    import logging

    logger = logging.getLogger("mlrnet")
    before, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.DEBUG)
    # caplog also listens on the root logger: without this, a test run before any CLI call saw every record twice
    logger.propagate = False
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(before)
    logger.propagate = propagate


def trained_workspace(root: Path, model_dir: Path, collect: list[str], train: list[str]) -> Path:
    """A workspace after corrupt, collect-losses and train, run through the CLI with the given options."""
    from typer.testing import CliRunner

    from mlrnet_cli.cli import app

    ws = make_workspace(root)
    for args in (
        ["collect-losses", "-w", str(ws), "--model", str(model_dir), *collect],
        ["train", "-w", str(ws), *train],
    ):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
    return ws
