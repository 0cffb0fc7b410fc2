"""`mlrnet eval` on a tiny model: metrics equal a direct computation, outputs, label mapping, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlrnet_cli.cli import app

CLASSES = ["world", "sports", "business", "scitech"]
TEXTS = [
    "the match ended in a draw after extra time",
    "stocks fell sharply",
    "new chip doubles battery life of phones and laptops alike",
    "leaders meet for peace talks",
    "a",
    "team wins the cup final in a dramatic penalty shootout tonight",
    "oil prices rise",
    "scientists find water on a distant moon",
    "election results are due on monday",
    "the striker signed a new contract",
    "bank cuts rates again to support growth",
    "software update fixes bugs",
]
LABELS = [1, 2, 3, 0, 0, 1, 2, 3, 0, 1, 2, 3]


def make_workspace(root: Path, model_dir: Path, n: int = len(TEXTS)) -> Path:
    """data/test.arrow + data/manifest.json + model/best (a copy of the tiny model)."""
    import pyarrow as pa

    from mlrnet_cli.artifacts import make_meta, write_json, write_table

    (root / "data").mkdir(parents=True, exist_ok=True)
    tbl = pa.table(
        {
            "sample_id": pa.array(np.arange(100, 100 + n), pa.int64()),
            "text": TEXTS[:n],
            "label": pa.array(LABELS[:n], pa.int64()),
        }
    )
    write_table(root / "data" / "test.arrow", tbl, make_meta("corrupt", "test"))
    write_json(
        root / "data" / "manifest.json",
        {"num_classes": 4, "class_names": CLASSES, "label_values": [0, 1, 2, 3], "mlrnet": {}},
    )
    shutil.copytree(model_dir, root / "model" / "best")
    return root


def direct_predictions(model_dir: Path, texts: list[str]) -> np.ndarray:
    """Reference: one row at a time, no padding at all."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, truncation=True, max_length=128, return_tensors="pt")
            out.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0].numpy())
    return np.stack(out)


def test_eval_json_matches_direct_computation(tmp_path: Path, tiny_model_dir: Path) -> None:
    from mlrnet_cli import metrics

    ws = make_workspace(tmp_path / "ws", tiny_model_dir)
    res = CliRunner().invoke(app, ["eval", "--workdir", str(ws), "--json", "--batch-size", "5", "--predictions"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    logits = direct_predictions(tiny_model_dir, TEXTS)
    pred = logits.argmax(1)
    assert out["accuracy"] == pytest.approx(metrics.accuracy(LABELS, pred))
    assert out["macro_f1"] == pytest.approx(metrics.macro_f1(LABELS, pred, 4))
    assert out["confusion_matrix"] == metrics.confusion_matrix(LABELS, pred, 4).tolist()
    assert [r["name"] for r in out["per_class"]] == CLASSES
    assert sum(r["support"] for r in out["per_class"]) == len(TEXTS)

    saved = json.loads((ws / "eval" / "metrics.json").read_text())
    assert saved["accuracy"] == out["accuracy"]
    assert saved["mlrnet"]["stage"] == "eval"
    assert set(saved["mlrnet"]["inputs"]) == {"model", "data"}

    from mlrnet_cli.artifacts import read_table, table_meta

    preds = read_table(ws / "eval" / "predictions.arrow")
    assert preds.column_names == ["sample_id", "label", "predicted", "probabilities"]
    assert preds.column("sample_id").to_pylist() == list(range(100, 100 + len(TEXTS)))
    assert preds.column("predicted").to_pylist() == pred.tolist()
    probs = np.array(preds.column("probabilities").to_pylist())
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    ref = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, ref / ref.sum(1, keepdims=True), atol=1e-5)
    assert table_meta(preds)["stage"] == "eval"


def test_eval_table_on_stdout_and_rerun_is_idempotent(tmp_path: Path, tiny_model_dir: Path) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=6)
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "-w", str(ws)])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.stdout and "confusion matrix" in res.stdout and "scitech" in res.stdout
    before = (ws / "eval" / "metrics.json").read_bytes()
    res = runner.invoke(app, ["eval", "-w", str(ws)])  # same run: replaced without --overwrite
    assert res.exit_code == 0, res.output
    assert (ws / "eval" / "metrics.json").read_bytes() == before


def test_eval_other_data_with_string_labels(tmp_path: Path, tiny_model_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    ws = make_workspace(tmp_path / "ws", tiny_model_dir)
    csv = tmp_path / "mine.csv"
    pcsv.write_csv(pa.table({"text": TEXTS, "label": [CLASSES[i] for i in LABELS]}), csv)
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "-w", str(ws), "--data", str(csv), "--json", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    from_names = json.loads(res.stdout)
    res = runner.invoke(app, ["eval", "-w", str(ws), "--json"])
    from_ids = json.loads(res.stdout)
    assert from_names["confusion_matrix"] == from_ids["confusion_matrix"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello", "label": "cooking"}\n')
    res = runner.invoke(app, ["eval", "-w", str(ws), "--data", str(bad), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 1
    assert "cooking" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_eval_refuses_other_runs_output_and_missing_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=4)
    runner = CliRunner()
    assert runner.invoke(app, ["eval", "-w", str(ws)]).exit_code == 0
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"text": TEXTS[:3], "label": LABELS[:3]}), other)
    res = runner.invoke(app, ["eval", "-w", str(ws), "--data", str(other)])
    assert res.exit_code == 1 and "--overwrite" in res.stderr
    assert runner.invoke(app, ["eval", "-w", str(ws), "--data", str(other), "--overwrite"]).exit_code == 0

    res = runner.invoke(app, ["eval", "-w", str(ws), "--data", str(tmp_path / "missing.csv")])
    assert res.exit_code == 1 and "no such file" in res.stderr

    empty = tmp_path / "empty"
    res = runner.invoke(app, ["eval", "-w", str(empty)])
    assert res.exit_code == 1
    assert "mlrnet train" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_dynamic_padding_equals_padding_to_max(tiny_model_dir: Path) -> None:
    """Length grouping and per-batch padding change nothing but speed."""
    from mlrnet_cli.inference import run_classifier, tokenize
    from mlrnet_cli.modeling import load_classifier, load_tokenizer

    model = load_classifier(str(tiny_model_dir), 4).eval()
    tok = load_tokenizer(str(tiny_model_dir))
    ids = tokenize(tok, TEXTS, 128)
    grouped = run_classifier(model, ids, pad_id=tok.pad_token_id, batch_size=3).logits
    np.testing.assert_allclose(grouped, direct_predictions(tiny_model_dir, TEXTS), atol=1e-5)


def test_iter_batches_cover_each_row_once_with_tight_padding() -> None:
    from mlrnet_cli.inference import iter_batches

    rows = [[1] * n for n in [5, 1, 9, 3, 3, 7, 2]]
    seen = []
    for idx, ids, mask in iter_batches(rows, 3, pad_id=0):
        seen.extend(idx.tolist())
        assert ids.shape[1] == max(len(rows[i]) for i in idx)  # padded to the batch's own longest row
        assert mask.sum(1).tolist() == [len(rows[i]) for i in idx]
    assert sorted(seen) == list(range(len(rows)))


def test_eval_refuses_a_model_without_a_trained_head(tmp_path: Path, tiny_model_dir: Path) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=3)
    cfg_path = ws / "model" / "best" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["BertModel"]
    cfg_path.write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["eval", "-w", str(ws)])
    assert res.exit_code == 1 and "no trained classification head" in res.stderr
