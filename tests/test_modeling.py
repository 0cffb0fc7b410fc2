"""modeling.py and tokens.py: safe loading, head features, padding, caches."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from mlrnet_cli import artifacts, modeling, tokens
from mlrnet_cli.distributed import ForwardModule
from mlrnet_cli.errors import ConfigError, HubUnavailableError, ModelError


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return modeling.load_tokenizer(tiny_model_dir), modeling.load_classifier(tiny_model_dir, 4, init_seed=0).eval()


def test_select_device() -> None:
    assert modeling.select_device("cpu") == torch.device("cpu")
    assert modeling.select_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(ConfigError):
        modeling.select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            modeling.select_device("cuda:0")
    assert isinstance(modeling.autocast_context(torch.device("cpu")), contextlib.nullcontext)


def test_features_and_logits_match_head(tiny, tiny_model_dir: Path) -> None:
    tok, model = tiny
    enc = tok(["hello world", "a much longer sentence here"], padding=True, return_tensors="pt")
    feats, logits = modeling.features_and_logits(model, enc["input_ids"], enc["attention_mask"])
    assert feats.shape == (2, 32) and logits.shape == (2, 4)
    with torch.no_grad():
        ref = model(**enc).logits
        bert = model.bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert torch.allclose(logits, ref)
    assert torch.allclose(feats, bert.pooler_output, atol=1e-6)  # eval mode: the pooled [CLS] vector
    assert torch.allclose(modeling.head_logits(model, feats), logits, atol=1e-6)
    # with other parameters through torch.func.functional_call, as the meta step runs them
    params = {f"model.{k}": v.detach().clone() for k, v in model.named_parameters()}
    params["model.classifier.bias"] = params["model.classifier.bias"] + 1.0
    full = ForwardModule(model, lambda m, x: modeling.features_and_logits(m, x["input_ids"], x["attention_mask"]))
    f2, l2 = torch.func.functional_call(full, params, (dict(enc),))
    assert torch.allclose(f2, feats) and torch.allclose(l2, logits + 1.0, atol=1e-5)
    z2 = torch.func.functional_call(ForwardModule(model, modeling.head_logits), params, (feats,))
    assert torch.allclose(z2, logits + 1.0, atol=1e-5)
    assert modeling.head_name(model) == "classifier"


def test_roberta_style_head_takes_sequence(tmp_path: Path) -> None:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(cfg).eval()
    ids = torch.randint(3, 50, (2, 7))
    mask = torch.ones_like(ids)
    feats, logits = modeling.features_and_logits(model, ids, mask)
    assert feats.shape == (2, 16)
    assert modeling.head_takes_sequence(model)
    assert torch.allclose(modeling.head_logits(model, feats), logits, atol=1e-6)


def test_math_attention_allows_double_backward(tiny) -> None:
    tok, model = tiny
    enc = tok(["hello world"], return_tensors="pt")
    w = model.classifier.weight
    with modeling.math_attention():
        _, logits = modeling.features_and_logits(model, enc["input_ids"], enc["attention_mask"])
        (g,) = torch.autograd.grad(logits.sum(), model.bert.embeddings.word_embeddings.weight, create_graph=True)
        (g2,) = torch.autograd.grad(g.pow(2).sum(), w, allow_unused=True)
    assert g2 is None or torch.isfinite(g2).all()


def test_load_classifier_refusals(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError, match="config.json"):
        modeling.load_classifier(tmp_path, 4)
    with pytest.raises(ModelError, match="not found"):
        modeling.load_classifier(tmp_path / "nope", 4)
    with pytest.raises(ModelError, match="4-label"):
        modeling.load_classifier(tiny_model_dir, 5)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match="--allow-pickle"):
        modeling.load_classifier(pickled, 4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match="--model PATH"):
        modeling.load_classifier("bert-base-uncased", 4)
    with pytest.raises(HubUnavailableError, match="--model PATH"):
        modeling.load_tokenizer("bert-base-uncased")


def test_new_head_is_seeded_and_names_set(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    folder = tmp_path / "base"
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(folder)
    a = modeling.load_classifier(folder, 3, ["x", "y", "z"], init_seed=1)
    b = modeling.load_classifier(folder, 3, ["x", "y", "z"], init_seed=1)
    c = modeling.load_classifier(folder, 3, init_seed=2)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert a.config.id2label == {0: "x", 1: "y", 2: "z"} and a.config.label2id["z"] == 2


def test_model_fingerprint(tmp_path: Path, tiny_model_dir: Path) -> None:
    fp = modeling.model_fingerprint(tiny_model_dir)
    assert fp.startswith("dir:") and fp == modeling.model_fingerprint(str(tiny_model_dir))
    assert modeling.model_fingerprint("bert-base-uncased") != modeling.model_fingerprint("bert-base-cased")


def test_pad_batch_and_length_groups() -> None:
    ids, mask = tokens.pad_batch([[5, 6, 7], [8], np.array([9, 10], dtype=np.int32)], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert ids.dtype == torch.int64
    batches = tokens.length_grouped_batches([3, 9, 1, 9, 4], 2)
    assert [b.tolist() for b in batches] == [[1, 3], [4, 0], [2]]


def test_token_cache_roundtrip_and_reuse(tmp_path: Path, tiny) -> None:
    tok, model = tiny
    t = pa.table({"sample_id": pa.array([5, 3, 9], pa.int64()), "text": ["hello world", "a b", "the quick brown fox"]})
    path = tmp_path / "t.arrow"
    artifacts.write_table(path, t, artifacts.make_meta("x", "y"))
    tc = tokens.tokenize_table(path, tok, "tok", 8, tmp_path / "cache")
    assert tc.sample_ids.tolist() == [5, 3, 9] and len(tc) == 3
    assert tc.row(0).tolist() == tok("hello world", truncation=True, max_length=8)["input_ids"]
    assert tc.lengths.max() <= 8
    mtime = tc.path.stat().st_mtime_ns
    again = tokens.tokenize_table(path, tok, "tok", 8, tmp_path / "cache")
    assert again.path == tc.path and tc.path.stat().st_mtime_ns == mtime
    assert np.array_equal(again.values, tc.values) and np.array_equal(again.offsets, tc.offsets)
    other = tokens.tokenize_table(path, tok, "tok", 4, tmp_path / "cache")
    assert other.path != tc.path and other.lengths.max() <= 4

    feats = tokens.encode_features(model, tc, model_id="m", cache_dir=tmp_path / "cache", pad_id=0, batch_size=2)
    ids, mask = tc.batch([0, 1, 2], 0)
    with torch.no_grad():
        ref, _ = modeling.features_and_logits(model, ids, mask)
    assert torch.allclose(feats, ref, atol=1e-5)
    cached = tokens.encode_features(model, tc, model_id="m", cache_dir=tmp_path / "cache")
    assert torch.equal(cached, feats)


def test_tokenize_rejects_missing_text(tmp_path: Path, tiny) -> None:
    from mlrnet_cli.errors import DataError

    tok, _ = tiny
    path = tmp_path / "t.arrow"
    artifacts.write_table(path, pa.table({"sample_id": pa.array([1, 2], pa.int64()), "text": ["a", None]}), {})
    with pytest.raises(DataError, match="no text"):
        tokens.tokenize_table(path, tok, "tok", 8, tmp_path / "cache")


def test_load_report_is_one_line(tiny_model_dir: Path, tmp_path: Path, mlrnet_logs: pytest.LogCaptureFixture) -> None:
    """A new head is routine (debug); a missing encoder weight is a warning that names it."""
    import shutil

    from safetensors.torch import load_file, save_file

    modeling.load_classifier(tiny_model_dir, 4, init_seed=0)
    assert not [r for r in mlrnet_logs.records if r.levelname == "WARNING"]

    broken = tmp_path / "no-pooler"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "pooler" not in k}, broken / "model.safetensors", {"format": "pt"})
    mlrnet_logs.clear()
    modeling.load_classifier(broken, 4, init_seed=0)
    warnings = [r.getMessage() for r in mlrnet_logs.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "pooler.dense.weight" in warnings[0] and "initialised at random" in warnings[0]


def test_eval_mode_gives_every_module_its_own_flag_back_even_after_an_error() -> None:
    from mlrnet_cli.modeling import eval_mode

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Dropout()))
    net.train()
    net[2].eval()
    with pytest.raises(RuntimeError), eval_mode(net):
        assert not any(m.training for m in net.modules())
        raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == [True, True, True, False, False]


def test_tiny_model_tokenizer_knows_its_vocabulary(tiny_model_dir) -> None:
    """The test model must see the words: with transformers 5, a tokenizer built from vocab.txt had an empty
    vocabulary and turned every word into [UNK]."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert tok.tokenize("war world 1") == ["w", "##a", "##r", "w", "##o", "##r", "##l", "##d", "1"]
    assert tok.unk_token_id not in tok("sports and business")["input_ids"]
