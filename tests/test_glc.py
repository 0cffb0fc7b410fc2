"""`mlrnet train --method glc`: Gold Loss Correction (Hendrycks et al., NeurIPS 2018): Ĉ, the corrected loss,
the run end to end, its resume, --freeze-encoder and 2 ranks."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, make_workspace
from typer.testing import CliRunner

from mlrnet_cli import artifacts
from mlrnet_cli import train as train_mod
from mlrnet_cli.cli import app
from mlrnet_cli.glc import MIN_PROBABILITY, forward_corrected_loss, glc_corruption_matrix
from mlrnet_cli.train import TrainConfig, train

runner = CliRunner()
FAST = ["--epochs", "1", "--batch-size", "16", "--max-length", "24", "--meta-per-class", "4"]


# ---------------------------------------------------------------------------------------------
# the two computations


def test_corruption_matrix_is_the_mean_softmax_per_true_class_with_identity_rows_for_unseen_classes() -> None:
    probs = torch.tensor(
        [
            [0.75, 0.25, 0.0, 0.0],  # true 0
            [0.5, 0.5, 0.0, 0.0],  # true 0
            [0.0, 0.0, 1.0, 0.0],  # true 1: always read as 2
            [0.25, 0.25, 0.25, 0.25],  # true 3
            [0.0, 0.0, 0.5, 0.5],  # true 3
        ]
    )
    labels = torch.tensor([0, 0, 1, 3, 3])
    expected = torch.tensor(
        [
            [0.625, 0.375, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],  # no trusted row of class 2: the identity row
            [0.125, 0.125, 0.375, 0.375],
        ],
        dtype=torch.float64,
    )
    got = glc_corruption_matrix(probs, labels, 4)
    assert got.dtype == torch.float64 and torch.equal(got, expected)
    assert torch.equal(glc_corruption_matrix(torch.eye(3), torch.arange(3), 3), torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError):
        glc_corruption_matrix(probs, labels, 3)


def test_forward_corrected_loss_matches_a_hand_computation() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)], [0.0, -100.0]])
    corruption = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
    # softmax [0.25, 0.75] @ C = [0.25*0.9 + 0.75*0.2, 0.25*0.1 + 0.75*0.8] = [0.375, 0.625]
    got = forward_corrected_loss(logits[:2], torch.tensor([0, 1]), corruption)
    torch.testing.assert_close(got, torch.tensor([-math.log(0.375), -math.log(0.625)]))
    # an observed label Ĉ and the model call (nearly) impossible: clamped, finite
    eye = torch.eye(2, dtype=torch.float64)
    got = forward_corrected_loss(logits[2:], torch.tensor([1]), eye)
    torch.testing.assert_close(got, torch.tensor([-math.log(MIN_PROBABILITY)]))
    # Ĉ = I: plain cross-entropy; bf16 logits are upcast
    y = torch.tensor([1, 0])
    ce = torch.nn.functional.cross_entropy(logits[:2], y, reduction="none")
    torch.testing.assert_close(forward_corrected_loss(logits[:2], y, eye), ce)
    assert forward_corrected_loss(logits[:2].bfloat16(), y, eye).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace after corrupt (balanced, 20 % uniform noise) and a real collect-losses that learns enough
    (6 epochs at lr 5e-3) for a Ĉ whose rows differ."""
    root = tmp_path_factory.mktemp("glc")
    model = build_tiny_model(root / "model")
    ws = make_workspace(root / "ws", imbalance=1.0, noise="uniform:0.2")
    args = ["collect-losses", "-w", str(ws), "--model", str(model), "--epochs", "6", "--lr", "5e-3"]
    r = runner.invoke(app, [*args, "--max-length", "24", "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    return ws


@pytest.fixture
def ws(collected: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(collected, tmp_path / "ws"))


def _stage1_matrix(ws: Path, meta_ids: list[int]) -> np.ndarray:
    """Ĉ computed here, independently: the stage-1 classifier on each meta row alone (no padding)."""
    from mlrnet_cli import modeling

    clean = artifacts.read_table(ws / "data" / "clean.arrow").to_pydict()
    row = {sid: i for i, sid in enumerate(clean["sample_id"])}
    model = modeling.load_classifier(ws / "stage1", 4).eval()
    tok = modeling.load_tokenizer(ws / "stage1")
    sums, counts = np.zeros((4, 4)), np.zeros(4)
    with torch.no_grad():
        for sid in meta_ids:
            enc = tok(clean["text"][row[sid]], truncation=True, max_length=24, return_tensors="pt")
            p = model(**enc).logits.softmax(-1)[0].double().numpy()
            y = clean["label"][row[sid]]
            sums[y] += p
            counts[y] += 1
    return sums / counts[:, None]


def test_glc_records_the_stage1_classifiers_corruption_matrix_and_trains_with_it(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[tuple[torch.Tensor, int]] = []
    real = train_mod.forward_corrected_loss

    def spy(logits: torch.Tensor, labels: torch.Tensor, corruption: torch.Tensor) -> torch.Tensor:
        used.append((corruption.clone(), len(labels)))
        return real(logits, labels, corruption)

    monkeypatch.setattr(train_mod, "forward_corrected_loss", spy)
    r = runner.invoke(app, ["train", "-w", str(ws), *FAST, "--method", "glc", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["meta_size"] == 16
    best = Path(out["artifacts"]["best"])
    saved = artifacts.read_json(best / "glc.json")
    assert saved["mlrnet"]["stage"] == "train" and saved["mlrnet"]["kind"] == "glc"
    assert saved["mlrnet"]["inputs"]["stage1"].startswith("dir:")
    assert saved["trusted_rows_per_class"] == [4, 4, 4, 4] and saved["identity_rows"] == []
    matrix = np.array(saved["corruption_matrix"])
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-6)
    meta_ids = artifacts.read_json(best / "train_config.json")["meta_sample_ids"]
    np.testing.assert_allclose(matrix, _stage1_matrix(ws, meta_ids), atol=1e-5)
    assert np.ptp(matrix, axis=0).max() > 0.1  # rows that differ: the classifier's predictions depend on the class
    assert artifacts.read_json(ws / "model" / "last" / "glc.json")["corruption_matrix"] == saved["corruption_matrix"]
    # every step corrected with the recorded Ĉ: training rows + 16 meta rows in batches of 16
    n_train = artifacts.read_table(ws / "data" / "train.arrow").num_rows
    assert len(used) == math.ceil((n_train + 16) / 16)
    for c, _ in used:
        np.testing.assert_allclose(c.double().numpy(), matrix, atol=1e-7)
    hist = artifacts.read_table(out["artifacts"]["history"]).to_pylist()
    assert np.isfinite(hist[0]["train_loss"]) and hist[0]["weight_mean"] is None


def test_glc_without_the_stage1_classifier_says_to_run_collect_losses(ws: Path) -> None:
    shutil.rmtree(ws / "stage1")
    r = runner.invoke(app, ["train", "-w", str(ws), *FAST, "--method", "glc"])
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlrnet: error: --method glc needs the stage-1 classifier")
    assert "run `mlrnet collect-losses` first" in lines[0]
    assert not (ws / "model" / "history.arrow").exists()


def test_glc_with_a_frozen_encoder_estimates_the_same_matrix(ws: Path) -> None:
    r = runner.invoke(app, ["train", "-w", str(ws), *FAST, "--method", "glc", "--out", str(ws / "full")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "-w", str(ws), *FAST, "--method", "glc", "--freeze-encoder", "--lr", "1e-3"])
    assert r.exit_code == 0, r.output
    frozen = artifacts.read_json(ws / "model" / "best" / "glc.json")
    assert frozen["mlrnet"]["config"]["freeze_encoder"] is True
    # Ĉ comes from the stage-1 classifier's own forward, whatever the trained classifier caches
    assert frozen["corruption_matrix"] == artifacts.read_json(ws / "full" / "best" / "glc.json")["corruption_matrix"]
    assert (ws / "model" / "best" / "model-encoder.safetensors").is_file()
    hist = artifacts.read_table(ws / "model" / "history.arrow").to_pylist()
    assert np.isfinite(hist[0]["train_loss"]) and 0.0 <= hist[0]["dev_accuracy"] <= 1.0


class _Interrupt:
    """A progress sink that stops the run when epoch ``at`` starts (after the previous epoch's state is saved)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def task(self, description: str, total: int | None):
        if description.startswith(f"epoch {self.at}/"):
            raise KeyboardInterrupt
        from mlrnet_cli.progress import NullProgress

        return NullProgress().task(description, total)


def test_resume_glc_after_interruption_gives_identical_artifacts(
    collected: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = TrainConfig(method="glc", epochs=2, batch_size=16, max_length=24, meta_per_class=4, device="cpu")
    roots = [Path(shutil.copytree(collected, tmp_path / name)) for name in ("a", "b")]
    full = train(cfg, workdir=roots[0])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, workdir=roots[1], progress=_Interrupt(2))
    state = torch.load(roots[1] / "model" / "state" / "state.pt", weights_only=True)
    saved = artifacts.read_json(roots[0] / "model" / "last" / "glc.json")["corruption_matrix"]
    assert state["glc_matrix"].tolist() == saved
    # the resumed run corrects with the checkpoint's Ĉ, not a new estimate (another device could differ)
    monkeypatch.setattr(train_mod, "_glc_matrix", lambda run: torch.eye(4, dtype=torch.float64))
    resumed = train(cfg, workdir=roots[1])
    assert resumed.resumed_from == 1 and full.resumed_from == 0
    for f in ("last/model.safetensors", "best/model.safetensors", "last/glc.json", "best/glc.json"):
        assert (roots[0] / "model" / f).read_bytes() == (roots[1] / "model" / f).read_bytes(), f
    h0 = artifacts.read_table(roots[0] / "model" / "history.arrow").drop(["seconds"])
    h1 = artifacts.read_table(roots[1] / "model" / "history.arrow").drop(["seconds"])
    assert h0.equals(h1)


# ---------------------------------------------------------------------------------------------
# 2 ranks


def _glc_worker(rank: int, world: int, port: int, ws: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    import mlrnet_cli.modeling as modeling
    from mlrnet_cli import distributed

    made: dict[str, torch.nn.Module] = {}
    load = modeling.load_classifier

    def spy_load(*a, **k):  # noqa: ANN002, ANN003, ANN202
        model = load(*a, **k)
        made.setdefault("model", model)  # the trained classifier loads first, then (rank 0) the stage-1 one
        return model

    modeling.load_classifier = spy_load
    steps: list[train_mod.GLCStep] = []
    real_step = train_mod.STEPS["glc"]
    train_mod.STEPS["glc"] = lambda run, opt: steps.append(real_step(run, opt)) or steps[-1]
    with distributed.session(timeout_s=120):
        result = train(
            TrainConfig(method="glc", epochs=2, batch_size=6, meta_per_class=4, max_length=24, device="cpu"),
            workdir=ws,
        )
        torch.save(
            {"model": made["model"].state_dict(), "matrix": steps[0].matrix, "history": result.history},
            Path(out) / f"rank{rank}.pt",
        )
    os._exit(0)


def test_two_rank_glc_shares_one_matrix_and_keeps_ranks_identical(ws: Path, tmp_path: Path) -> None:
    from test_distributed import _free_port

    torch.multiprocessing.spawn(_glc_worker, args=(2, _free_port(), str(ws), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(r0["matrix"], r1["matrix"])
    saved = artifacts.read_json(ws / "model" / "last" / "glc.json")["corruption_matrix"]
    assert r0["matrix"].tolist() == saved
    meta_ids = artifacts.read_json(ws / "model" / "last" / "train_config.json")["meta_sample_ids"]
    np.testing.assert_allclose(np.array(saved), _stage1_matrix(ws, meta_ids), atol=1e-5)
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in r0["history"] + r1["history"]]
    assert strip[:2] == strip[2:] and len(strip) == 4


def test_train_help_describes_glc_with_its_paper() -> None:
    r = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert "glc: Gold Loss Correction (Hendrycks, Mazeika, Wilson & Gimpel, NeurIPS 2018)" in text
    assert "C^[i, j] = p(observed j | true i)" in text and "-log((softmax(f(x)) @ C^)[y])" in text
    r = runner.invoke(app, ["train", "--method", "bogus"])
    assert r.exit_code == 2 and "glc" in r.stderr  # one of the --method choices
