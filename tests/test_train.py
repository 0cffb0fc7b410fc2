"""`mlrnet train` end to end on a tiny BERT: every method, resume, the meta set, bad inputs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_workspace
from typer.testing import CliRunner

from mlrnet_cli import artifacts
from mlrnet_cli import train as train_mod
from mlrnet_cli.cli import app
from mlrnet_cli.errors import DataError
from mlrnet_cli.metanet import normalized_curves
from mlrnet_cli.train import TrainConfig, one_class_collapse, split_clean_pool, train

runner = CliRunner()
FAST = ["--epochs", "1", "--batch-size", "16", "--max-length", "24", "--meta-per-class", "4"]


def write_losses(
    ws: Path, model_dir: Path, epochs: int = 2, *, ids_shift: int = 0, train_fp: str | None = None
) -> Path:
    """A stand-in for `collect-losses`: curves [N, T+1] and the metadata `train` checks."""
    table = artifacts.read_table(ws / "data" / "train.arrow")
    ids = torch.tensor(table.column("sample_id").to_pylist(), dtype=torch.int64) + ids_shift
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(len(ids), epochs + 1, generator=g) * 2
    meta = artifacts.make_meta(
        "collect-losses",
        "losses",
        config={"model": str(model_dir), "epochs": epochs},
        seed=0,
        inputs={"train": train_fp or artifacts.fingerprint_file(ws / "data" / "train.arrow")},
    )
    return Path(
        artifacts.write_tensors(ws / "losses.safetensors", {"losses": losses, "sample_id": ids}, meta)
        and ws / "losses.safetensors"
    )


def _workspaces(tmp_path: Path, tiny_model_dir: Path, n: int) -> list[Path]:
    """``n`` copies of one workspace with curves, in tmp_path/a, b, ..."""
    first = make_workspace(tmp_path / "a")
    write_losses(first, tiny_model_dir)
    return [first] + [Path(shutil.copytree(first, tmp_path / chr(ord("a") + i))) for i in range(1, n)]


@pytest.fixture
def ws(workspace: Path, tiny_model_dir: Path) -> Path:
    write_losses(workspace, tiny_model_dir)
    return workspace


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "mlrnet"],
        [
            "--method",
            "mwnet",
            "--meta-params",
            "last-1",
            "--no-normalize-weights",
            "--meta-mode",
            "unrolled",
            "--meta-dropout",
        ],
        ["--method", "plain"],
        ["--method", "plain-meta"],
        ["--method", "meta-only"],
        ["--method", "mlrnet", "--freeze-encoder", "--meta-params", "head", "--meta-interval", "2"],
        ["--method", "mlc", "--meta-params", "last-1", "--meta-interval", "2"],
    ],
)
def test_every_method_runs_from_the_cli(ws: Path, args: list[str], mlrnet_logs: pytest.LogCaptureFixture) -> None:
    r = runner.invoke(app, ["train", "--workdir", str(ws), *FAST, *args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    best = Path(out["artifacts"]["best"])
    weights_file = "model.safetensors.index.json" if "--freeze-encoder" in args else "model.safetensors"  # shards
    assert (best / weights_file).is_file() and (best / "config.json").is_file()
    assert (best / "tokenizer.json").is_file() or (best / "vocab.txt").is_file()
    meta_method = args[1] in ("mlrnet", "mwnet", "mlc")
    assert (best / "meta_net.safetensors").is_file() == meta_method
    hist = artifacts.read_table(out["artifacts"]["history"]).to_pylist()
    assert [h["epoch"] for h in hist] == [1]
    assert 0.0 <= hist[0]["dev_accuracy"] <= 1.0 and np.isfinite(hist[0]["train_loss"])
    # one progress line per epoch on stderr, with the numbers the history holds
    line = f"epoch 1/1: train loss {hist[0]['train_loss']:.4f}, dev accuracy {hist[0]['dev_accuracy']:.4f} (best)"
    assert any(rec.getMessage().startswith(line) for rec in mlrnet_logs.records)
    if meta_method:
        assert 0.0 < hist[0]["weight_mean"] < 1.0 and hist[0]["weight_std"] >= 0
        assert hist[0]["weight_mean_noisy"] is not None and hist[0]["weight_mean_clean"] is not None
        h = hist[0]
        weights = (
            f"epoch 1: weight mean {h['weight_mean']:.4f} std {h['weight_std']:.4f} "
            f"(noisy rows {h['weight_mean_noisy']:.4f}, clean rows {h['weight_mean_clean']:.4f})"
        )
        assert weights in [rec.getMessage() for rec in mlrnet_logs.records]
        tensors, meta = artifacts.read_tensors(best / "meta_net.safetensors")
        assert meta["meta_net"]["kind"] == args[1]
    else:
        assert hist[0]["weight_mean"] is None
    recorded = artifacts.read_json(best / "mlrnet.json")["mlrnet"]
    assert recorded["stage"] == "train"
    assert recorded["config"]["meta_dropout"] is ("--meta-dropout" in args)
    assert out["dev_size"] == 8 and out["meta_size"] == (0 if args[1] == "plain" else 16)  # plain draws none


def test_one_class_collapse_needs_a_majority_and_twice_the_true_share() -> None:
    balanced = np.repeat(np.arange(4), 25)
    assert one_class_collapse(np.array([87, 5, 5, 3]), balanced) == (0, 0.87, 0.25)
    assert one_class_collapse(np.array([10, 10, 60, 20]), balanced) == (2, 0.6, 0.25)
    assert one_class_collapse(np.array([50, 20, 20, 10]), balanced) is None  # not more than half
    skewed = np.array([0] * 70 + [1] * 30)
    assert one_class_collapse(np.array([90, 10]), skewed) is None  # 0.9 < 2 x 0.7: the labels are skewed too
    assert one_class_collapse(np.zeros(4, dtype=np.int64), balanced) is None


@pytest.mark.parametrize(
    ("method", "hint"),
    [
        ("mlrnet", "the meta-net may be learning too fast: try --meta-lr 1e-05"),
        ("plain", "try a smaller --lr than 1e-05"),
    ],
)
def test_a_one_class_classifier_is_warned_about(
    ws: Path, method: str, hint: str, mlrnet_logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def collapsed(predicted: np.ndarray, labels: np.ndarray) -> tuple[int, float, float]:
        seen.append((predicted.copy(), np.asarray(labels).copy()))
        return 1, 0.875, 0.25

    monkeypatch.setattr(train_mod, "one_class_collapse", collapsed)
    # the tiny run's weights barely spread in one epoch: count any spread as the meta-net's doing
    monkeypatch.setattr(train_mod, "SPREAD_WEIGHT_STD", 0.0)
    args = ["train", "--workdir", str(ws), *FAST, "--method", method, "--meta-lr", "1e-4", "--meta-backoff", "0"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    # the real dev predictions reach the check: one count per class, summing to the 8 dev rows
    ((predicted, labels),) = seen
    assert predicted.shape == (4,) and predicted.sum() == 8 and labels.shape == (8,)
    warnings = [rec.getMessage() for rec in mlrnet_logs.records if rec.levelname == "WARNING"]
    names = artifacts.read_json(ws / "data" / "manifest.json")["class_names"]
    line = f"epoch 1: the classifier predicts {names[1]!r} for 88% of the dev rows (25% of their labels); {hint}"
    assert line in warnings, warnings


class _Interrupt:
    """A progress sink that stops the run when epoch ``at`` starts (after the previous epoch's state is saved);
    with ``nth``, when it starts for the nth time (a rerun of the collapse guard)."""

    def __init__(self, at: int, nth: int = 1) -> None:
        self.at, self.left = at, nth
        self.tasks: list[tuple[str, int | None]] = []

    def task(self, description: str, total: int | None):
        self.tasks.append((description, total))
        if description.startswith(f"epoch {self.at}/"):
            self.left -= 1
            if self.left == 0:
                raise KeyboardInterrupt
        from mlrnet_cli.progress import NullProgress

        return NullProgress().task(description, total)


def test_resume_after_interruption_gives_identical_artifacts(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = TrainConfig(
        method="mlrnet", epochs=2, batch_size=16, max_length=24, meta_per_class=4, device="cpu", meta_params="last-1"
    )
    roots = _workspaces(tmp_path, tiny_model_dir, 2)
    full = train(cfg, workdir=roots[0])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, workdir=roots[1], progress=_Interrupt(2))
    assert (roots[1] / "model" / "state" / "state.pt").is_file()
    resumed = train(cfg, workdir=roots[1])
    assert resumed.resumed_from == 1 and full.resumed_from == 0
    for f in ("last/model.safetensors", "last/meta_net.safetensors", "best/model.safetensors"):
        assert (roots[0] / "model" / f).read_bytes() == (roots[1] / "model" / f).read_bytes(), f
    h0 = artifacts.read_table(roots[0] / "model" / "history.arrow").drop(["seconds"])
    h1 = artifacts.read_table(roots[1] / "model" / "history.arrow").drop(["seconds"])
    assert h0.equals(h1)
    # a finished run drops its resume state (a model and its optimiser), is not redone, and reports itself
    assert not (roots[0] / "model" / "state").exists() and not (roots[1] / "model" / "state").exists()
    files = {p: p.read_bytes() for p in (roots[1] / "model").rglob("*") if p.is_file()}
    again = train(cfg, workdir=roots[1])
    assert again.epochs_run == 0 and again.best_epoch == resumed.best_epoch
    assert again.best_dev_accuracy == resumed.best_dev_accuracy
    assert [r["train_loss"] for r in again.history] == [r["train_loss"] for r in resumed.history]
    assert {p: p.read_bytes() for p in (roots[1] / "model").rglob("*") if p.is_file()} == files
    # a different run is refused without --overwrite
    r = runner.invoke(app, ["train", "--workdir", str(roots[1]), *FAST])
    assert r.exit_code == 1 and "different" in r.stderr


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ({}, (0.5, 1.0, "w-hat")),  # MLRNet's defaults (issue #17): the meta rows in the real step, from w-hat
        ({"meta_params": "last-1"}, (0.5, 1.0, "w")),  # w-hat needs every parameter in w-hat: the pass at w
        ({"meta_share": 0.0, "curve_prior": 0.0}, (0.0, 0.0, "w")),  # the paper's MLRNet
        ({"meta_share_at": "w"}, (0.5, 1.0, "w")),
        ({"method": "mwnet"}, (0.0, 0.0, "w")),  # the baselines keep their papers' form
        ({"method": "mlc"}, (0.0, 0.0, "w")),
        ({"method": "mwnet", "meta_share": 0.5}, (0.5, 0.0, "w-hat")),
        ({"method": "plain"}, (0.0, 0.0, "w")),
        ({"method": "meta-only"}, (0.0, 0.0, "w")),
    ],
)
def test_method_defaults_of_the_meta_share_and_the_curve_prior(given: dict, want: tuple) -> None:
    cfg = TrainConfig(**given)
    cfg.validate()
    assert (cfg.meta_share, cfg.curve_prior, cfg.meta_share_at) == want


def test_the_defaults_are_recorded_and_the_papers_form_is_two_options_away(ws: Path, tmp_path: Path) -> None:
    """A run with no options records MLRNet's defaults in its config; ``--meta-share 0 --curve-prior 0`` records
    none of them, so it is the same run as one trained before the defaults changed."""
    paper = Path(shutil.copytree(ws, tmp_path / "paper"))
    assert runner.invoke(app, ["train", "-w", str(ws), *FAST, "--device", "cpu"]).exit_code == 0
    r = runner.invoke(
        app, ["train", "-w", str(paper), *FAST, "--device", "cpu", "--meta-share", "0", "--curve-prior", "0"]
    )
    assert r.exit_code == 0, r.output
    default, papers = (artifacts.read_json(w / "model" / "best" / "train_config.json")["config"] for w in (ws, paper))
    assert (default["meta_share"], default["curve_prior"], default["meta_share_at"]) == (0.5, 1.0, "w-hat")
    assert not {"meta_share", "curve_prior", "meta_share_at"} & set(papers)
    assert {k: v for k, v in default.items() if k not in ("meta_share", "curve_prior", "meta_share_at")} == papers


def test_meta_share_is_recorded_trains_on_the_meta_rows_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`train --meta-share 0.5`: in the model's config, a different model than the paper's form (whose config
    has no meta_share at all: earlier runs stay the same run), and a killed run resumes to identical artifacts."""
    args = [*FAST, "--epochs", "2", "--meta-params", "last-1", "--device", "cpu"]
    roots = _workspaces(tmp_path, tiny_model_dir, 3)
    r = runner.invoke(app, ["train", "-w", str(roots[0]), *args, "--meta-share", "0.5"])
    assert r.exit_code == 0, r.output
    model = roots[0] / "model"
    assert artifacts.read_json(model / "best" / "train_config.json")["config"]["meta_share"] == 0.5
    assert artifacts.read_any_meta(model / "last")["config"]["meta_share"] == 0.5
    assert artifacts.table_meta(artifacts.read_table(model / "history.arrow"))["config"]["meta_share"] == 0.5
    r = runner.invoke(app, ["train", "-w", str(roots[2]), *args, "--meta-share", "0"])
    assert r.exit_code == 0, r.output
    assert "meta_share" not in artifacts.read_json(roots[2] / "model" / "best" / "train_config.json")["config"]
    last = "last/model.safetensors"
    assert (model / last).read_bytes() != (roots[2] / "model" / last).read_bytes()
    # the same run through the library, killed after epoch 1, then rerun by the CLI
    cfg = TrainConfig(
        method="mlrnet",
        epochs=2,
        batch_size=16,
        max_length=24,
        meta_per_class=4,
        device="cpu",
        meta_params="last-1",
        meta_share=0.5,
    )
    with pytest.raises(KeyboardInterrupt):
        train(cfg, workdir=roots[1], progress=_Interrupt(2))
    r = runner.invoke(app, ["train", "-w", str(roots[1]), *args, "--meta-share", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resumed_from_epoch"] == 1
    for f in ("last/model.safetensors", "last/meta_net.safetensors", "best/model.safetensors"):
        assert (model / f).read_bytes() == (roots[1] / "model" / f).read_bytes(), f
    h0, h1 = (artifacts.read_table(w / "model" / "history.arrow").drop(["seconds"]) for w in roots[:2])
    assert h0.equals(h1)


def test_meta_share_at_w_hat_is_recorded_and_is_its_own_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`train --meta-share 0.5 --meta-share-at w-hat` trains (a different model than at w, with meta_share_at in
    its config; at w the field stays out, so earlier runs are the same run); partial ŵ or no share is refused."""
    args = [*FAST, "--device", "cpu", "--meta-share", "0.5"]
    roots = _workspaces(tmp_path, tiny_model_dir, 2)
    for root, at in zip(roots, ("w-hat", "w"), strict=True):
        r = runner.invoke(app, ["train", "-w", str(root), *args, "--meta-params", "all", "--meta-share-at", at])
        assert r.exit_code == 0, r.output
    configs = [artifacts.read_json(w / "model" / "best" / "train_config.json")["config"] for w in roots]
    assert configs[0]["meta_share_at"] == "w-hat" and "meta_share_at" not in configs[1]
    last = "model/last/model.safetensors"
    assert (roots[0] / last).read_bytes() != (roots[1] / last).read_bytes()
    r = runner.invoke(app, ["train", "-w", str(roots[0]), *args, "--meta-params", "last-1", "--meta-share-at", "w-hat"])
    assert r.exit_code == 1 and "needs --meta-params all" in r.stderr
    r = runner.invoke(app, ["train", "-w", str(roots[0]), *FAST, "--meta-share", "0", "--meta-share-at", "w-hat"])
    assert r.exit_code == 2 and "--meta-share-at applies with --meta-share > 0" in r.stderr


def test_curve_prior_is_recorded_and_the_weights_command_rebuilds_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`train --curve-prior 1`: β is in the run's config, the saved meta-net's spec and its tensors, and `weights`
    rebuilds that net; --curve-prior 0 is the paper's run, with no curve_prior in its config or spec."""
    args = [*FAST, "--epochs", "1", "--meta-params", "last-1", "--device", "cpu"]
    roots = _workspaces(tmp_path, tiny_model_dir, 2)
    for root, prior in zip(roots, ("1", "0"), strict=True):
        r = runner.invoke(app, ["train", "-w", str(root), *args, "--curve-prior", prior])
        assert r.exit_code == 0, r.output
    config = artifacts.read_json(roots[0] / "model" / "best" / "train_config.json")["config"]
    assert config["curve_prior"] == 1.0
    assert "curve_prior" not in artifacts.read_json(roots[1] / "model" / "best" / "train_config.json")["config"]
    for root, prior in zip(roots, (1.0, None), strict=True):
        tensors, meta = artifacts.read_tensors(root / "model" / "best" / "meta_net.safetensors", "meta-net")
        assert meta["meta_net"].get("curve_prior") == prior
        assert ("prior_scale" in tensors) == (prior is not None)
    outs = []
    for root in roots:
        r = runner.invoke(app, ["weights", "-w", str(root), "--json"])
        assert r.exit_code == 0, r.output
        outs.append(artifacts.read_table(root / "weights.arrow").to_pydict())
    assert len(outs[0]["weight"]) == len(set(outs[0]["sample_id"])) > 0
    assert outs[0]["weight"] != outs[1]["weight"]


@pytest.mark.parametrize(
    ("df_inputs", "spec_key", "first_columns"),
    [("label-curve", "without_features", 0), ("agreement", "feature_agreement", 1)],
)
def test_df_inputs_is_its_own_run_and_weights_rebuild_it(
    tmp_path: Path, tiny_model_dir: Path, df_inputs: str, spec_key: str, first_columns: int
) -> None:
    """`train --df-inputs label-curve | agreement`: recorded in the config (the default's config has no df_inputs:
    earlier runs stay the same run), a meta-net whose first branch reads the label embedding alone (label-curve) or
    with one agreement column (agreement), and `weights` rebuilds that net from the saved spec."""
    args = [*FAST, "--meta-params", "last-1", "--device", "cpu"]
    roots = _workspaces(tmp_path, tiny_model_dir, 2)
    r = runner.invoke(app, ["train", "-w", str(roots[0]), *args, "--df-inputs", df_inputs])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["train", "-w", str(roots[1]), *args]).exit_code == 0
    configs = [artifacts.read_json(root / "model" / "best" / "train_config.json")["config"] for root in roots]
    assert configs[0]["df_inputs"] == df_inputs and "df_inputs" not in configs[1]
    tensors, meta = artifacts.read_tensors(roots[0] / "model" / "best" / "meta_net.safetensors", "meta-net")
    assert meta["meta_net"][spec_key] is True
    columns = first_columns + configs[0]["label_emb_dim"]
    assert tuple(tensors["feature_branch.0.weight"].shape) == (configs[0]["df_dim"], columns)
    outs = []
    for root in roots:
        r = runner.invoke(app, ["weights", "-w", str(root), "--json"])
        assert r.exit_code == 0, r.output
        outs.append(artifacts.read_table(root / "weights.arrow").column("weight").to_pylist())
    assert len(outs[0]) == len(outs[1]) > 0 and outs[0] != outs[1]


def test_meta_set_is_balanced_disjoint_and_seeded(ws: Path) -> None:
    r = runner.invoke(app, ["train", "--workdir", str(ws), *FAST, "--method", "plain-meta"])
    assert r.exit_code == 0, r.output
    saved = artifacts.read_json(ws / "model" / "best" / "train_config.json")
    meta_ids = set(saved["meta_sample_ids"])
    train_ids = set(artifacts.read_table(ws / "data" / "train.arrow").column("sample_id").to_pylist())
    clean = artifacts.read_table(ws / "data" / "clean.arrow").to_pydict()
    label_of = dict(zip(clean["sample_id"], clean["label"], strict=True))
    assert meta_ids.isdisjoint(train_ids)
    assert sorted(np.bincount([label_of[i] for i in meta_ids]).tolist()) == [4, 4, 4, 4]

    labels = np.repeat(np.arange(3), 10)
    meta, dev = split_clean_pool(labels, 3, 5, 0.2, seed=1)
    assert np.bincount(labels[meta]).tolist() == [5, 5, 5] and np.bincount(labels[dev]).tolist() == [2, 2, 2]
    assert not set(meta) & set(dev)
    meta2, dev2 = split_clean_pool(labels, 3, 7, 0.2, seed=1)
    assert np.array_equal(dev, dev2)  # the dev part does not move with --meta-per-class
    assert np.array_equal(split_clean_pool(labels, 3, 5, 0.2, seed=1)[0], meta)
    with pytest.raises(DataError):
        split_clean_pool(labels, 3, 9, 0.2, seed=1)


def test_plain_does_not_depend_on_meta_per_class(tmp_path: Path, tiny_model_dir: Path) -> None:
    """plain never reads the meta set and its dev rows do not move, so a --meta-per-class sweep shares one run;
    a --meta-per-class larger than the clean pool (12 a class) is no error for it."""
    cfg = TrainConfig(
        method="plain",
        epochs=1,
        batch_size=16,
        max_length=24,
        meta_per_class=2,
        device="cpu",
        model=str(tiny_model_dir),
    )
    roots = [make_workspace(tmp_path / "a"), make_workspace(tmp_path / "b")]
    runs = [train(cfg, workdir=roots[0]), train(replace(cfg, meta_per_class=50), workdir=roots[1])]
    assert [r.meta_size for r in runs] == [0, 0] and runs[0].dev_size == runs[1].dev_size > 0
    weights = [(r / "model" / "best" / "model.safetensors").read_bytes() for r in roots]
    assert weights[0] == weights[1]
    assert runs[0].best_dev_accuracy == runs[1].best_dev_accuracy


def test_normalized_curves_subtract_the_class_mean() -> None:
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    labels = torch.tensor([0, 0, 1])
    expected = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]])
    assert torch.allclose(normalized_curves(losses, labels), expected)


def _one_line_error(r, code: int, *needles: str) -> None:
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlrnet: error:"), r.stderr
    for n in needles:
        assert n in lines[0]


@pytest.mark.parametrize(("args", "alpha"), [([], 3e-5), (["--alpha", "0.5"], 0.5)])
def test_train_steps_at_alpha_and_hands_adam_the_gradient_over_alpha(
    ws: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], alpha: float
) -> None:
    import mlrnet_cli.train as train_mod

    seen: list[tuple[float, float]] = []
    real = train_mod.meta_step

    def spy(*a, **kw):
        seen.append((kw["alpha"], kw["meta_grad_scale"]))
        return real(*a, **kw)

    monkeypatch.setattr(train_mod, "meta_step", spy)
    r = runner.invoke(app, ["train", "--workdir", str(ws), *FAST, "--lr", "3e-5", *args])
    assert r.exit_code == 0, r.output
    assert seen and all(s == (alpha, pytest.approx(1 / alpha)) for s in seen)  # default α = lr (eqs. 4 and 6)


def test_bad_inputs_give_one_line_errors(workspace: Path, tiny_model_dir: Path) -> None:
    base = ["train", "--workdir", str(workspace), *FAST]
    write_losses(workspace, tiny_model_dir, ids_shift=100_000)
    _one_line_error(runner.invoke(app, base), 1, "do not match")
    write_losses(workspace, tiny_model_dir, train_fp="0123456789abcdef")
    _one_line_error(runner.invoke(app, base), 1, "different training table")
    write_losses(workspace, tiny_model_dir)
    _one_line_error(runner.invoke(app, [*base, "--meta-per-class", "50"]), 1, "--meta-per-class 50")
    _one_line_error(runner.invoke(app, [*base, "--method", "bogus"]), 2, "--method")
    _one_line_error(runner.invoke(app, [*base, "--meta-params", "middle"]), 1, "--meta-params")
    _one_line_error(runner.invoke(app, [*base, "--alpha", "0"]), 1, "--alpha")
    shutil.rmtree(workspace / "model", ignore_errors=True)
    (workspace / "losses.safetensors").unlink()
    _one_line_error(runner.invoke(app, base), 1, "collect-losses")
    assert not (workspace / "model" / "history.arrow").exists()


def test_chains_after_real_collect_losses(workspace: Path, tiny_model_dir: Path) -> None:
    """`collect-losses` then `train` with only size options: the model comes from the curves' metadata."""
    r = runner.invoke(
        app,
        ["collect-losses", "-w", str(workspace), "--model", str(tiny_model_dir), "--epochs", "1", "--max-length", "24"],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "-w", str(workspace), *FAST, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["model"] == str(tiny_model_dir)
    assert (
        artifacts.read_tensors(Path(out["artifacts"]["best"]) / "meta_net.safetensors")[1]["meta_net"]["curve_len"] == 2
    )


@pytest.mark.parametrize(
    "args", [["--freeze-encoder"], ["--meta-params", "last-1", "--meta-mode", "unrolled", "--meta-interval", "2"]]
)
def test_mlc_on_the_chained_workspace_resumes_identically(
    tmp_path: Path, tiny_model_dir: Path, args: list[str], one_thread: None
) -> None:
    """`train --method mlc` after a real collect-losses, through the CLI: a run killed after epoch 1 and rerun
    writes the same model, label-correction network and history as an uninterrupted one; `weights` refuses it."""
    roots = [make_workspace(tmp_path / "a")]
    collect = ["collect-losses", "-w", str(roots[0]), "--model", str(tiny_model_dir), "--epochs", "1"]
    r = runner.invoke(app, [*collect, "--max-length", "24"])
    assert r.exit_code == 0, r.output
    roots.append(Path(shutil.copytree(roots[0], tmp_path / "b")))
    cli = [*FAST, "--epochs", "2", "--method", "mlc", *args, "--json"]
    r = runner.invoke(app, ["train", "-w", str(roots[0]), *cli])
    assert r.exit_code == 0, r.output
    full = json.loads(r.stdout)
    cfg = TrainConfig(
        method="mlc",
        epochs=2,
        batch_size=16,
        max_length=24,
        meta_per_class=4,
        freeze_encoder="--freeze-encoder" in args,
        meta_params="last-1" if "last-1" in args else "all",
        meta_mode="unrolled" if "unrolled" in args else "jvp",
        meta_interval=2 if "--meta-interval" in args else 1,
    )
    with pytest.raises(KeyboardInterrupt):
        train(cfg, workdir=roots[1], progress=_Interrupt(2))
    state = torch.load(roots[1] / "model" / "state" / "state.pt", weights_only=True)
    assert state["meta_net"]["out.weight"].shape == (4, 128)  # the LCN and its optimiser are in the checkpoint
    assert state["meta_opt"]["state"] and "max_exp_avg_sq" in state["meta_opt"]["state"][0]  # AMSGrad
    r = runner.invoke(app, ["train", "-w", str(roots[1]), *cli])
    assert r.exit_code == 0, r.output
    resumed = json.loads(r.stdout)
    assert resumed["resumed_from_epoch"] == 1 and full["resumed_from_epoch"] == 0
    files = sorted(p.relative_to(roots[0] / "model") for p in (roots[0] / "model").rglob("*.safetensors"))
    assert Path("last/meta_net.safetensors") in files and Path("best/meta_net.safetensors") in files
    for f in files:
        assert (roots[0] / "model" / f).read_bytes() == (roots[1] / "model" / f).read_bytes(), f
    h0 = artifacts.read_table(roots[0] / "model" / "history.arrow").drop(["seconds"])
    h1 = artifacts.read_table(roots[1] / "model" / "history.arrow").drop(["seconds"])
    assert h0.equals(h1)
    hist = h0.to_pylist()
    # the weight columns hold the LCN's probability of the observed label, ŷ_i(ỹ_i)
    assert all(0.0 < h["weight_mean"] < 1.0 and h["meta_loss"] > 0 for h in hist)
    _, meta = artifacts.read_tensors(roots[0] / "model" / "best" / "meta_net.safetensors")
    assert meta["meta_net"]["kind"] == "mlc" and meta["meta_net"]["hidden_dim"] == 128
    r = runner.invoke(app, ["weights", "-w", str(roots[0])])
    _one_line_error(r, 1, "--method mlc", "--method mlrnet")


def test_mlc_real_step_trains_on_the_corrected_labels(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The classifier's loss in `train --method mlc` is mlc_step's soft-label loss, and the epoch's soft-label
    agreement is the mean LCN probability of the observed labels the steps returned."""
    seen: list[tuple[int, float, float]] = []
    real = train_mod.mlc_step

    def spy(*a, **kw):
        out = real(*a, **kw)
        labels = a[3].labels
        assert out.loss.item() == pytest.approx(out.losses.mean().item(), rel=1e-6)
        seen.append((len(labels), out.loss.item(), out.soft_labels.gather(1, labels[:, None]).sum().item()))
        assert kw["meta_grad_scale"] == pytest.approx(1 / kw["alpha"])
        return out

    monkeypatch.setattr(train_mod, "mlc_step", spy)
    # one pass over the rows: no collapse-guard rerun (an untrained tiny classifier may look collapsed)
    args = ["train", "--workdir", str(ws), *FAST, "--method", "mlc", "--meta-backoff", "0", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)["history"]
    n = len(artifacts.read_table(ws / "data" / "train.arrow"))
    assert sum(k for k, _, _ in seen) == n  # every training row once
    assert row["train_loss"] == pytest.approx(sum(k * loss for k, loss, _ in seen) / n, rel=1e-6)
    assert row["weight_mean"] == pytest.approx(sum(a for _, _, a in seen) / n, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# the collapse guard (--meta-backoff)


def test_flat_mlc_soft_labels_are_not_blamed_on_a_fast_meta_net(
    ws: Path, mlrnet_logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # headline seed 0, mlc at meta lr 1e-5: soft labels near uniform (std 0.02-0.04) and one class for every dev
    # row; the guard then cut the meta lr, which only slowed a meta-net that was already too slow
    monkeypatch.setattr(train_mod, "one_class_collapse", lambda predicted, labels: (1, 0.875, 0.25))
    args = ["train", "--workdir", str(ws), *FAST, "--method", "mlc", "--meta-lr", "1e-4", "--epochs", "2", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    history = json.loads(r.stdout)["history"]
    assert all(0 < row["weight_std"] < train_mod.SPREAD_WEIGHT_STD for row in history), history
    assert [row["meta_lr"] for row in history] == pytest.approx([1e-4, 1e-4])  # no back-off
    warnings = [rec.getMessage() for rec in mlrnet_logs.records if rec.levelname == "WARNING"]
    assert not any("rerunning" in w or "may be learning too fast" in w for w in warnings), warnings
    advice = "so the meta-net did not drive it: try a smaller --lr than 1e-05, or a larger --meta-lr than 0.0001"
    assert sum(advice in w for w in warnings) == 2, warnings


GUARD_CFG = TrainConfig(
    method="mlrnet", epochs=3, batch_size=16, max_length=24, meta_per_class=4, device="cpu", meta_params="last-1"
)


def _collapse_at(monkeypatch: pytest.MonkeyPatch, epoch: int, above_lr: float) -> None:
    """A collapse the meta-net drove at the end of ``epoch`` while the meta lr is above ``above_lr``: a function
    of the run's state, so a killed run meets it again when it reruns that epoch."""

    def fake(self, row, dev_predicted, earlier):  # noqa: ANN001, ANN202
        assert dev_predicted is not None and dev_predicted.sum() == 8  # the real dev predictions
        if row["epoch"] == epoch and self.meta_lr > above_lr:
            return train_mod._Collapse("c", 0.9, 0.25, blame_meta=True)
        return None

    monkeypatch.setattr(train_mod._Hooks, "_collapse", fake)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {**load_file(folder / "model.safetensors"), **load_file(folder / "meta_net.safetensors")}


def test_collapse_guard_reruns_the_epoch_from_its_start_at_a_tenth_of_the_meta_lr(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, mlrnet_logs: pytest.LogCaptureFixture
) -> None:
    """A collapse at epoch 1 under meta lr 1e-3: epoch 1 runs again from the initial state at 1e-4, so the
    run ends exactly where a run at --meta-lr 1e-4 from the start ends."""
    roots = _workspaces(tmp_path, tiny_model_dir, 2)
    _collapse_at(monkeypatch, 1, above_lr=2e-4)
    guarded = train(replace(GUARD_CFG, meta_lr=1e-3), workdir=roots[0])
    assert [r["meta_lr"] for r in guarded.history] == pytest.approx([1e-4] * 3)
    warnings = [r.getMessage() for r in mlrnet_logs.records if r.levelname == "WARNING"]
    assert any("rerunning epoch 1 with meta lr 0.0001 (back-off 1 of 2, --meta-backoff)" in w for w in warnings)
    plain_start = train(replace(GUARD_CFG, meta_lr=1e-4), workdir=roots[1])
    a, b = (_tensors(w / "model" / "last") for w in roots)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cols = ["train_loss", "dev_accuracy", "weight_mean", "weight_std", "meta_loss", "meta_lr"]
    assert [[r[c] for c in cols] for r in guarded.history] == [[r[c] for c in cols] for r in plain_start.history]
    hist = artifacts.read_table(roots[0] / "model" / "history.arrow")
    assert hist.column("meta_lr").to_pylist() == pytest.approx([1e-4] * 3)


def test_collapse_guard_resumes_identically_when_killed_in_a_rerun(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = _workspaces(tmp_path, tiny_model_dir, 3)
    _collapse_at(monkeypatch, 2, above_lr=2e-5)
    full = train(GUARD_CFG, workdir=roots[0])
    assert [r["meta_lr"] for r in full.history] == pytest.approx([1e-4, 1e-5, 1e-5])
    with pytest.raises(KeyboardInterrupt):  # in epoch 2's rerun: its state on disk is still epoch 1's
        train(GUARD_CFG, workdir=roots[1], progress=_Interrupt(2, nth=2))
    with pytest.raises(KeyboardInterrupt):  # after the rerun finished
        train(GUARD_CFG, workdir=roots[2], progress=_Interrupt(3))
    for root, start in ((roots[1], 1), (roots[2], 2)):
        resumed = train(GUARD_CFG, workdir=root)
        assert resumed.resumed_from == start
        for f in ("last/model.safetensors", "last/meta_net.safetensors", "best/model.safetensors"):
            assert (roots[0] / "model" / f).read_bytes() == (root / "model" / f).read_bytes(), (root, f)
        h0, h1 = (artifacts.read_table(w / "model" / "history.arrow").drop(["seconds"]) for w in (roots[0], root))
        assert h0.equals(h1)


def test_curve_prior_spread_is_the_std_of_the_priors_own_weights() -> None:
    curves = torch.tensor([[9.0, 1.0, -1.0], [9.0, 0.0, 0.0], [9.0, -2.0, 0.0], [9.0, 2.0, 2.0]])
    want = torch.sigmoid(-2 * torch.tensor([0.0, 0.0, -1.0, 2.0], dtype=torch.float64)).std().item()
    assert train_mod.curve_prior_spread(curves, 2.0) == pytest.approx(want, rel=1e-12)  # epoch 0 left out
    assert train_mod.curve_prior_spread(curves, 0.0) == 0.0


@pytest.mark.parametrize(
    ("weight_std", "prior_spread", "blamed"), [(0.2, 0.0, True), (0.2, 0.15, False), (0.3, 0.15, True)]
)
def test_the_meta_net_is_blamed_only_for_spread_beyond_the_curve_priors(
    monkeypatch: pytest.MonkeyPatch, weight_std: float, prior_spread: float, blamed: bool
) -> None:
    """The curve prior spreads the weights before the meta-net learns (std 0.05-0.17 on the benchmark sets), so
    a collapse with weights only that spread is the classifier's, not a too-fast meta-net's."""
    from types import SimpleNamespace

    monkeypatch.setattr(train_mod, "real_collapse", lambda *a: (1, 0.875, 0.25))
    inp = SimpleNamespace(dev_labels=np.zeros(8), train=SimpleNamespace(labels=np.zeros(8)))
    inp.manifest = SimpleNamespace(class_names=["a", "b"])
    hooks = SimpleNamespace(run=SimpleNamespace(inp=inp, meta_net=object()), prior_spread=prior_spread)
    row = {"dev_accuracy": 0.2, "weight_std": weight_std}
    found = train_mod._Hooks._collapse(hooks, row, np.ones(8, dtype=int), [0.5])
    assert found is not None and found.blame_meta is blamed and found.label == "b"


def test_collapse_guard_gives_up_after_meta_backoff_and_ignores_flat_weights(
    ws: Path, monkeypatch: pytest.MonkeyPatch, mlrnet_logs: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(train_mod, "real_collapse", lambda *a: (1, 0.875, 0.25))  # every epoch collapses
    monkeypatch.setattr(train_mod, "SPREAD_WEIGHT_STD", 0.0)
    args = ["train", "-w", str(ws), *FAST, "--epochs", "2", "--meta-lr", "1e-4", "--meta-backoff", "1", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert [row["meta_lr"] for row in json.loads(r.stdout)["history"]] == pytest.approx([1e-5, 1e-5])
    warnings = [rec.getMessage() for rec in mlrnet_logs.records if rec.levelname == "WARNING"]
    assert sum("rerunning epoch" in w for w in warnings) == 1
    assert sum("the meta-net may be learning too fast: try --meta-lr 1e-06" in w for w in warnings) == 2
    # weights that did not spread: the classifier's lr is to blame, and the guard leaves the meta lr alone
    mlrnet_logs.clear()
    monkeypatch.setattr(train_mod, "SPREAD_WEIGHT_STD", 1e9)
    r = runner.invoke(app, [*args[:-2], "2", "--json", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert [row["meta_lr"] for row in json.loads(r.stdout)["history"]] == pytest.approx([1e-4, 1e-4])
    warnings = [rec.getMessage() for rec in mlrnet_logs.records if rec.levelname == "WARNING"]
    assert not any("rerunning" in w for w in warnings)
    assert sum("try a smaller --lr than 1e-05" in w for w in warnings) == 2


# --meta-share auto


def test_auto_meta_share_breaks_ties_toward_the_default_share_then_the_smaller() -> None:
    choose = lambda accs: train_mod.choose_meta_share(accs)["chosen"]  # noqa: E731
    assert choose({0.0: 0.7, 0.5: 0.6}) == 0.0 and choose({0.0: 0.6, 0.5: 0.7}) == 0.5
    assert choose({0.0: 0.6, 0.5: 0.6}) == 0.5  # a tie: the default
    assert choose({0.0: 0.6, 0.25: 0.6, 1.0: 0.5}) == 0.0  # no default among them: the smaller
    assert choose({0.0: None, 0.5: 0.1}) == 0.5


def test_auto_meta_share_candidates_are_the_papers_form_and_ours_unless_the_curve_prior_is_given() -> None:
    auto = TrainConfig(meta_share="auto")
    auto.validate()
    paper, ours = (auto.with_meta_share(s) for s in (0.0, 0.5))
    assert (paper.meta_share, paper.curve_prior, paper.meta_share_at) == (0.0, 0.0, "w")
    assert (ours.meta_share, ours.curve_prior, ours.meta_share_at) == (0.5, 1.0, "w-hat")
    for config, flags in ((paper, {"meta_share": 0.0, "curve_prior": 0.0}), (ours, {})):
        direct = TrainConfig(**flags)
        direct.validate()
        assert config.provenance_config() == direct.provenance_config()
    for method, frozen, share in (("mlrnet", True, "auto"), ("mlrnet", False, 0.5), ("mwnet", True, 0.0)):
        default = TrainConfig(method=method, freeze_encoder=frozen)
        default.validate()
        assert default.meta_share == share, (method, frozen)  # a frozen MLRNet chooses its form by default
    given = TrainConfig(meta_share="AUTO", curve_prior=0.3)
    given.validate()
    assert given.meta_share == "auto" and {given.with_meta_share(s).curve_prior for s in (0.0, 0.5)} == {0.3}


def test_auto_meta_share_trains_both_shares_and_keeps_the_one_the_dev_rows_prefer(
    ws: Path, tmp_path: Path, mlrnet_logs: pytest.LogCaptureFixture
) -> None:
    auto = Path(shutil.copytree(ws, tmp_path / "auto"))
    args = ["train", "-w", str(auto), *FAST, "--epochs", "2", "--meta-params", "last-1"]
    r = runner.invoke(app, [*args, "--meta-share", "auto", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    choice, model = out["meta_share_choice"], auto / "model"
    assert sorted(choice["candidates"]) == ["0", "0.5"]
    # each candidate's best dev accuracy, read back from its own history: the choice is the better one
    dev = {}
    for key, cand in choice["candidates"].items():
        history = artifacts.read_table(Path(cand["folder"]) / "history.arrow").to_pylist()
        dev[float(key)] = max(row["dev_accuracy"] for row in history)
        assert cand["dev_accuracy"] == pytest.approx(dev[float(key)])
    assert choice["chosen"] == max(dev, key=lambda s: (dev[s], s == 0.5))
    assert out["best_dev_accuracy"] == pytest.approx(dev[choice["chosen"]])
    # the workspace's model is the chosen run's (its files, its config with the share it trained with)
    chosen = model / "candidates" / f"share-{choice['chosen']:g}"
    for f in ("best/model.safetensors", "last/meta_net.safetensors", "history.arrow"):
        assert (model / f).read_bytes() == (chosen / f).read_bytes(), f
    saved = artifacts.read_json(model / "best" / "train_config.json")["config"]
    assert saved["meta_share"] == (choice["chosen"] or None)  # 0 is left out of the provenance
    assert saved["curve_prior"] == (1.0 if choice["chosen"] else None)  # S = 0 runs the paper's net too
    assert artifacts.read_json(model / "meta_share_choice.json")["choice"] == choice
    assert any(f"chose meta share {choice['chosen']:g}" in rec.getMessage() for rec in mlrnet_logs.records)
    # each candidate is the run its own options ask for: the paper's MLRNet, and the defaults
    for share, flags in ((0.0, ["--meta-share", "0", "--curve-prior", "0"]), (0.5, [])):
        direct = Path(shutil.copytree(ws, tmp_path / f"direct-{share:g}"))
        r = runner.invoke(app, ["train", "-w", str(direct), *args[3:], *flags])
        assert r.exit_code == 0, r.output
        a, b = _tensors(direct / "model" / "last"), _tensors(model / "candidates" / f"share-{share:g}" / "last")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), share
    # the same command again: both candidates up to date, the same choice, nothing trained
    mlrnet_logs.clear()
    r = runner.invoke(app, [*args, "--meta-share", "auto", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["meta_share_choice"] == choice
    assert sum("is up to date" in rec.getMessage() for rec in mlrnet_logs.records) == 2
    assert not any("epoch 1:" in rec.getMessage() for rec in mlrnet_logs.records)
    # the eval stage reads the chosen model like any other
    assert runner.invoke(app, ["eval", "-w", str(auto), "--json"]).exit_code == 0


def test_auto_meta_share_killed_while_copying_its_choice_finishes_on_the_next_run(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = replace(GUARD_CFG, epochs=1, meta_share="auto")
    adopt = train_mod._adopt

    def killed(run: train_mod.TrainResult, out: Path) -> None:
        (out / "history.arrow").write_bytes(run.history_path.read_bytes())  # part of the outputs, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_adopt", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, workdir=ws)
    monkeypatch.setattr(train_mod, "_adopt", adopt)
    result = train(cfg, workdir=ws)  # no --overwrite: the folder holds this run's own choice
    chosen = ws / "model" / "candidates" / f"share-{result.meta_share_choice['chosen']:g}"
    assert (ws / "model" / "best" / "model.safetensors").read_bytes() == (
        chosen / "best" / "model.safetensors"
    ).read_bytes()
    assert result.best_dir == ws / "model" / "best" and result.epochs_run == 0  # both candidates were up to date


def test_auto_meta_share_does_not_replace_another_run_without_overwrite(ws: Path) -> None:
    args = ["train", "-w", str(ws), *FAST, "--meta-params", "last-1"]
    assert runner.invoke(app, [*args, "--meta-share", "0"]).exit_code == 0
    before = (ws / "model" / "last" / "model.safetensors").read_bytes()
    r = runner.invoke(app, [*args, "--meta-share", "auto"])
    assert r.exit_code == 1 and "holds a run other than this --meta-share auto one" in r.stderr
    assert (ws / "model" / "last" / "model.safetensors").read_bytes() == before
    assert not (ws / "model" / "candidates").exists()  # refused before anything trained
    assert runner.invoke(app, [*args, "--meta-share", "auto", "--overwrite"]).exit_code == 0


# --meta-lr-probe


def test_meta_lr_probe_choice_skips_collapses_and_breaks_ties_toward_meta_lr(
    ws: Path, monkeypatch: pytest.MonkeyPatch, mlrnet_logs: pytest.LogCaptureFixture
) -> None:
    scripted = {}  # meta lr -> (dev accuracy, collapsed), what each candidate's probe "measured"
    monkeypatch.setattr(train_mod, "_probe_one", lambda run, lr, checkpoint, progress: scripted[f"{lr:g}"])
    cfg = replace(GUARD_CFG, epochs=1, meta_lr_probe=2)

    def chosen(scores: dict[str, tuple[float, bool]]) -> float:
        scripted.clear()
        scripted.update(scores)
        return train(cfg, workdir=ws, overwrite=True).meta_lr_probe["chosen"]

    assert chosen({"1e-05": (0.5, False), "0.0001": (0.6, False), "0.001": (0.7, False)}) == 1e-3
    assert chosen({"1e-05": (0.5, False), "0.0001": (0.6, False), "0.001": (0.9, True)}) == 1e-4  # collapsed
    assert chosen({"1e-05": (0.6, False), "0.0001": (0.6, False), "0.001": (0.6, False)}) == 1e-4  # tie: --meta-lr
    assert chosen({"1e-05": (0.6, False), "0.0001": (0.5, False), "0.001": (0.6, False)}) == 1e-5  # then smaller
    assert chosen({"1e-05": (0.2, True), "0.0001": (0.3, True), "0.001": (0.1, True)}) == 1e-4
    warnings = [rec.getMessage() for rec in mlrnet_logs.records if rec.levelname == "WARNING"]
    assert any("every candidate collapsed" in w for w in warnings), warnings


def test_meta_lr_probe_trains_on_with_its_choice_from_the_runs_start_and_records_it(
    ws: Path, tmp_path: Path, mlrnet_logs: pytest.LogCaptureFixture
) -> None:
    probed = Path(shutil.copytree(ws, tmp_path / "probed"))
    r = runner.invoke(app, ["train", "-w", str(probed), *FAST, "--epochs", "2", "--meta-lr-probe", "2", "--json"])
    assert r.exit_code == 0, r.output
    probe = json.loads(r.stdout)["meta_lr_probe"]
    assert probe["steps"] == 2 and sorted(probe["candidates"]) == ["0.0001", "0.001", "1e-05"]
    accs = {k: c["dev_accuracy"] for k, c in probe["candidates"].items()}
    assert all(0.0 <= a <= 1.0 for a in accs.values()), accs
    # a tiny random model often predicts one class for the 8 dev rows: then all candidates compete
    kept = [c for c in probe["candidates"].values() if not c["collapsed"]] or list(probe["candidates"].values())
    best = max(
        kept,
        key=lambda c: (c["dev_accuracy"], c["meta_lr"] == 1e-4, -c["meta_lr"]),
    )
    assert probe["chosen"] == best["meta_lr"]
    # recorded: the history's meta lr, the model folders' config, the probe file, the log
    history = artifacts.read_table(probed / "model" / "history.arrow").to_pylist()
    assert [row["meta_lr"] for row in history] == pytest.approx([probe["chosen"]] * 2)
    for d in ("best", "last"):
        saved = artifacts.read_json(probed / "model" / d / "train_config.json")
        assert saved["meta_lr_chosen"] == probe["chosen"] and saved["config"]["meta_lr_probe"] == 2
    assert artifacts.read_json(probed / "model" / "meta_lr_probe.json")["probe"] == probe
    assert any(f"chose meta lr {probe['chosen']:g}" in rec.getMessage() for rec in mlrnet_logs.records)
    # the probes leave no trace: the run equals one started at the chosen meta lr
    direct = Path(shutil.copytree(ws, tmp_path / "direct"))
    args = ["train", "-w", str(direct), *FAST, "--epochs", "2", "--meta-lr", f"{probe['chosen']:g}"]
    assert runner.invoke(app, args).exit_code == 0
    a, b = _tensors(probed / "model" / "last"), _tensors(direct / "model" / "last")  # metadata: other configs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same command again: up to date, no new probe, the same record
    mlrnet_logs.clear()
    r = runner.invoke(app, ["train", "-w", str(probed), *FAST, "--epochs", "2", "--meta-lr-probe", "2", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["meta_lr_probe"] == probe
    assert not any("--meta-lr-probe: meta lr" in rec.getMessage() for rec in mlrnet_logs.records)


def test_a_resumed_run_reads_its_probe_back(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = replace(GUARD_CFG, epochs=2, meta_lr_probe=1)
    roots = _workspaces(tmp_path, tiny_model_dir, 2)
    shown = _Interrupt(at=99)  # never interrupts: records what the progress display was asked to show
    full = train(cfg, workdir=roots[0], progress=shown)
    probes = ["probe: meta lr 1e-05", "probe: meta lr 0.0001", "probe: meta lr 0.001"]
    assert [d for d, _ in shown.tasks] == [*probes, "epoch 1/2", "epoch 2/2"]
    assert [t for _, t in shown.tasks][:3] == [16] * 3  # one step of 16 rows each
    with pytest.raises(KeyboardInterrupt):
        train(cfg, workdir=roots[1], progress=_Interrupt(2))
    monkeypatch.setattr(train_mod, "probe_meta_lr", lambda *a, **k: pytest.fail("probed again on resume"))
    resumed = train(cfg, workdir=roots[1])
    assert resumed.resumed_from == 1 and resumed.meta_lr_probe == full.meta_lr_probe
    for f in ("last/model.safetensors", "last/meta_net.safetensors"):
        assert (roots[0] / "model" / f).read_bytes() == (roots[1] / "model" / f).read_bytes(), f
