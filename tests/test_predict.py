"""`mlrnet predict` on a tiny model: the same predictions as `eval`, stdin and files, metadata, errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mlrnet_cli import artifacts, modeling
from mlrnet_cli.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
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
]


def make_ws(root: Path, model_dir: Path, trained: dict | None = None) -> Path:
    """data/test.arrow + manifest + model/best: the tiny model with class names (and an mlrnet.json if given)."""
    (root / "data").mkdir(parents=True)
    tbl = pa.table(
        {
            "sample_id": pa.array(np.arange(100, 100 + len(TEXTS)), pa.int64()),
            "text": TEXTS,
            "label": pa.array([i % 4 for i in range(len(TEXTS))], pa.int64()),
        }
    )
    artifacts.write_table(root / "data" / "test.arrow", tbl, artifacts.make_meta("corrupt", "test"))
    artifacts.write_json(root / "data" / "manifest.json", {"num_classes": 4, "class_names": CLASSES, "mlrnet": {}})
    best = root / "model" / "best"
    shutil.copytree(model_dir, best)
    config = json.loads((best / "config.json").read_text())
    config["id2label"] = {str(i): n for i, n in enumerate(CLASSES)}
    config["label2id"] = {n: i for i, n in enumerate(CLASSES)}
    (best / "config.json").write_text(json.dumps(config))
    sharpen_head(best / "model.safetensors")
    if trained is not None:
        artifacts.write_json(best / "mlrnet.json", {"mlrnet": artifacts.make_meta("train", "model", trained)})
    return root


def sharpen_head(weights: Path) -> None:
    """A random head gives ~uniform probabilities: scale it so the rows' probabilities differ more."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    tensors["classifier.weight"] = tensors["classifier.weight"] * 200
    save_file(tensors, str(weights), metadata={"format": "pt"})


def eval_predictions(ws: Path, *extra: str) -> pa.Table:
    r = runner.invoke(app, ["eval", "-w", str(ws), "--predictions", "--device", "cpu", "--overwrite", *extra])
    assert r.exit_code == 0, r.output
    return artifacts.read_table(ws / "eval" / "predictions.arrow")


def probs_of(table: pa.Table, column: str) -> np.ndarray:
    return np.array(table.column(column).to_pylist(), dtype=np.float64)


def test_predict_arrow_matches_eval(tmp_path: Path, tiny_model_dir: Path) -> None:
    ws = make_ws(tmp_path / "ws", tiny_model_dir)
    ref = eval_predictions(ws)
    out = tmp_path / "pred.arrow"
    r = runner.invoke(
        app, ["predict", "-w", str(ws), "--data", str(ws / "data" / "test.arrow"), "--out", str(out), "--device", "cpu"]
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out)  # stdout: the artifact path only
    got = artifacts.read_table(out)
    assert got.column_names == ["row", "sample_id", "text", "label", "label_id", "score", "probs"]
    assert got.column("row").to_pylist() == list(range(len(TEXTS)))
    assert got.column("sample_id").to_pylist() == ref.column("sample_id").to_pylist()
    assert got.column("text").to_pylist() == TEXTS
    assert got.column("label_id").to_pylist() == ref.column("predicted").to_pylist()
    assert got.column("label").to_pylist() == [CLASSES[i] for i in ref.column("predicted").to_pylist()]
    p = probs_of(got, "probs")
    np.testing.assert_allclose(p, probs_of(ref, "probabilities"), atol=1e-6)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got.column("score").to_numpy(), p.max(axis=1), atol=1e-7)
    assert np.ptp(p, axis=0).max() > 1e-3  # rows differ: a per-row mix-up would show
    meta = artifacts.table_meta(got)
    assert meta["format_version"] == artifacts.FORMAT_VERSION and meta["stage"] == "predict"
    assert meta["mlrnet_version"] and meta["class_names"] == CLASSES
    assert meta["inputs"]["model"] == modeling.model_fingerprint(ws / "model" / "best")
    assert meta["inputs"]["data"] == artifacts.fingerprint_file(ws / "data" / "test.arrow")
    # the same command again is the same run; another model's output is refused without --overwrite
    r = runner.invoke(
        app,
        [
            "predict",
            "-w",
            str(ws),
            "--data",
            str(ws / "data" / "test.arrow"),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-text",
        ],
    )
    assert r.exit_code == 1 and "different run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert artifacts.read_table(out).column_names[2] == "text"  # untouched


def test_predict_stdin_jsonl_matches_the_table_route(tmp_path: Path, tiny_model_dir: Path) -> None:
    ws = make_ws(tmp_path / "ws", tiny_model_dir)
    ref = eval_predictions(ws)
    lines = "\n".join([TEXTS[0], "", TEXTS[1], "   ", *TEXTS[2:]]) + "\n"
    for args in ([], ["--data", "-"]):
        r = runner.invoke(app, ["predict", "-w", str(ws), "--device", "cpu", *args], input=lines)
        assert r.exit_code == 0, r.output
        rows = [json.loads(line) for line in r.stdout.splitlines()]  # stdout is nothing but JSON Lines
        assert len(rows) == len(TEXTS)
        assert [x["row"] for x in rows] == [0, 2, *range(4, 4 + len(TEXTS) - 2)]  # line numbers, blanks skipped
        assert [x["text"] for x in rows] == TEXTS
        assert [x["label_id"] for x in rows] == ref.column("predicted").to_pylist()
        assert all(x["label"] == CLASSES[x["label_id"]] for x in rows)
        assert all(list(x["probs"]) == CLASSES for x in rows)
        p = np.array([list(x["probs"].values()) for x in rows])
        np.testing.assert_allclose(p, probs_of(ref, "probabilities"), atol=1e-6)
        assert [x["score"] for x in rows] == [max(x["probs"].values()) for x in rows]
    # --out FILE.jsonl holds the same lines
    out = tmp_path / "p.jsonl"
    r2 = runner.invoke(app, ["predict", "-w", str(ws), "--device", "cpu", "--out", str(out)], input=lines)
    assert r2.exit_code == 0, r2.output
    assert out.read_text().splitlines() == r.stdout.splitlines()
    # Python: one typed function
    from mlrnet_cli.predict import PredictConfig, predict

    res = predict(PredictConfig(device="cpu", with_text=False), workdir=ws, texts=TEXTS[:2])
    assert res.path is None and "text" not in res.table.column_names
    assert res.table.column("label_id").to_pylist() == ref.column("predicted").to_pylist()[:2]


def test_predict_takes_max_length_from_the_models_metadata(tmp_path: Path, tiny_model_dir: Path) -> None:
    ws = make_ws(tmp_path / "ws", tiny_model_dir, trained={"max_length": 4, "batch_size": 3})
    short = probs_of(eval_predictions(ws, "--max-length", "4"), "probabilities")
    full = probs_of(eval_predictions(ws, "--max-length", "128"), "probabilities")
    assert not np.allclose(short, full, atol=1e-4)  # truncation changes the predictions: the test can tell
    data = tmp_path / "texts.csv"
    pcsv.write_csv(pa.table({"body": TEXTS}), data)
    r = runner.invoke(
        app,
        [
            "predict",
            "-w",
            str(ws),
            "--data",
            str(data),
            "--text-column",
            "body",
            "--device",
            "cpu",
            "--format",
            "jsonl",
        ],
    )
    assert r.exit_code == 0, r.output
    got = np.array([list(json.loads(x)["probs"].values()) for x in r.stdout.splitlines()])
    np.testing.assert_allclose(got, short, atol=1e-6)
    r = runner.invoke(
        app,
        [
            "predict",
            "-w",
            str(ws),
            "--data",
            str(data),
            "--text-column",
            "body",
            "--device",
            "cpu",
            "--max-length",
            "128",
        ],
    )
    got = np.array([list(json.loads(x)["probs"].values()) for x in r.stdout.splitlines()])
    np.testing.assert_allclose(got, full, atol=1e-6)


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


def _write(name: str, table: pa.Table | None = None, text: str | None = None):
    def setup(tmp: Path) -> None:
        if table is not None:
            pq.write_table(table, tmp / name)
        else:
            (tmp / name).write_text(text or "")

    return setup


#: (id, setup, args, stdin, exit code, a piece of the one stderr line); {ws} and {tmp} are filled in
ERRORS = [
    ("no-model", None, ["-w", "{tmp}/empty", "--data", "{ws}/data/test.arrow"], None, 1, "no trained model"),
    ("not-a-model", None, ["--model", "{tmp}/nomodel"], "a\n", 1, "nomodel"),
    (
        "missing-column",
        _write("d.parquet", pa.table({"body": ["a"]})),
        ["--data", "{tmp}/d.parquet"],
        None,
        1,
        "no text column",
    ),
    (
        "wrong-column",
        _write("d.parquet", pa.table({"text": ["a"]})),
        ["--data", "{tmp}/d.parquet", "--text-column", "body"],
        None,
        1,
        "has no column 'body'",
    ),
    (
        "empty-table",
        _write("d.parquet", pa.table({"text": pa.array([], pa.string())})),
        ["--data", "{tmp}/d.parquet"],
        None,
        1,
        "has no rows",
    ),
    (
        "null-text",
        _write("d.parquet", pa.table({"text": ["a", None]})),
        ["--data", "{tmp}/d.parquet"],
        None,
        1,
        "row 1 has no text",
    ),
    ("empty-stdin", None, [], "\n  \n", 1, "no text on stdin"),
    ("no-such-file", None, ["--data", "{tmp}/nope.csv"], None, 1, "no such file"),
    ("unknown-out-suffix", None, ["--out", "{tmp}/p.txt"], "a\n", 2, "output format"),
    ("arrow-on-stdout", None, ["--format", "arrow"], "a\n", 2, "needs --out"),
    (
        "out-is-input",
        None,
        ["--data", "{ws}/data/test.arrow", "--out", "{ws}/data/test.arrow"],
        None,
        2,
        "also an input",
    ),
    ("existing-jsonl", _write("p.jsonl", text="{}\n"), ["--out", "{tmp}/p.jsonl"], "a\n", 1, "different run"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_predict_bad_input(case: tuple, tmp_path: Path, tiny_model_dir: Path) -> None:
    _, setup, args, stdin, code, needle = case
    ws = make_ws(tmp_path / "ws", tiny_model_dir)
    tmp = tmp_path / "t"
    tmp.mkdir()
    if setup is not None:
        setup(tmp)
    before = snapshot(tmp_path)
    argv = [a.format(ws=ws, tmp=tmp) for a in args]
    if "-w" not in argv:
        argv = ["-w", str(ws), *argv]
    r = runner.invoke(app, ["predict", "--device", "cpu", *argv], input=stdin)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlrnet: error: ") and needle in err[0], err
    assert snapshot(tmp_path) == before
