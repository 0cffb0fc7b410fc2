"""benchmarks/detection.py (label-issue detection) and benchmarks/prepare_data.py (the public data layout)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import detection  # noqa: E402
import fidelity  # noqa: E402
import prepare_data  # noqa: E402

# ---------------------------------------------------------------------------------------------
# metrics: numpy only, no bench extra


def test_within_label_auc_gap_is_the_difference_of_the_means_with_a_paired_interval() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 60)
    noisy = rng.random(labels.size) < 0.3
    noisy[labels == 2] = False  # no noisy row: left out, as within_label_report leaves it out
    perfect = noisy.astype(float) + 0.01 * rng.random(labels.size)
    random_ = rng.random(labels.size)
    got = detection.within_label_auc_gap(perfect, random_, noisy, labels, reps=300, seed=0)
    want = detection.cell_report(perfect, noisy, labels)["within_label"]["roc_auc"]
    want -= detection.cell_report(random_, noisy, labels)["within_label"]["roc_auc"]
    assert got["gap"] == pytest.approx(want)
    assert got["labels_used"] == 2 and got["reps"] == 300
    assert 0.0 < got["low"] <= got["gap"] <= got["high"] < 1.0  # a perfect ranking beats a random one, surely
    # the same score on both sides: every paired resample differs by exactly 0
    same = detection.within_label_auc_gap(random_, random_, noisy, labels, reps=50)
    assert (same["gap"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    # the reversed order swaps the sign and the interval's ends
    back = detection.within_label_auc_gap(random_, perfect, noisy, labels, reps=300, seed=0)
    assert (back["gap"], back["low"], back["high"]) == pytest.approx((-got["gap"], -got["high"], -got["low"]))
    none = detection.within_label_auc_gap(perfect, random_, np.zeros_like(noisy), labels, reps=10)
    assert none["gap"] is None and none["labels_used"] == 0


def test_perfect_and_reversed_scores() -> None:
    noisy = np.array([1, 0, 0, 1, 0, 0], dtype=bool)
    perfect = detection.detection_metrics(noisy.astype(float), noisy)
    assert perfect == {"roc_auc": 1.0, "average_precision": 1.0, "precision_at_k": 1.0, "k": 2, "rows": 6}
    reversed_ = detection.detection_metrics(-noisy.astype(float), noisy)
    assert reversed_["roc_auc"] == 0.0
    assert reversed_["precision_at_k"] == 0.0


def test_within_label_metrics_on_a_hand_example() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    noisy = np.array([1, 0, 0, 0, 1, 1, 0, 0, 0, 0], dtype=bool)
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.5, 0.1, 0.4, 0.2, 0.8, 0.7])
    rep = detection.cell_report(scores, noisy, labels)
    per = rep["within_label"]["per_label"]
    # label 0: the one noisy row scores highest
    assert (per[0]["roc_auc"], per[0]["average_precision"], per[0]["precision_at_k"]) == (1.0, 1.0, 1.0)
    # label 1: noisy 0.5 and 0.1 against clean 0.4 and 0.2 -> 2 of 4 pairs; ranking N C C N -> AP (1 + 2/4) / 2
    assert per[1]["roc_auc"] == pytest.approx(0.5)
    assert per[1]["average_precision"] == pytest.approx(0.75)
    assert per[1]["precision_at_k"] == pytest.approx(0.5)
    # label 2 has no noisy row: no metric, left out of the means
    assert per[2]["roc_auc"] is None and per[2]["precision_at_k"] is None
    w = rep["within_label"]
    assert w["roc_auc"] == pytest.approx(0.75) and w["roc_auc_labels_used"] == 2
    assert w["average_precision"] == pytest.approx(0.875)
    assert w["precision_at_k"] == pytest.approx(0.75)
    # overall: 0.9 beats all 7 clean rows, 0.5 all but the label-2 rows (clean 0.8 and 0.7), 0.1 ties one
    # clean 0.1 (1/2) -> (7 + 5 + 0.5) / 21: within-label and overall differ
    o = rep["overall"]
    assert o["roc_auc"] == pytest.approx((7 + 5 + 0.5) / 21)
    assert o["k"] == 3 and o["rows"] == 10
    assert o["precision_at_k"] == pytest.approx(1 / 3)  # top 3: 0.9 (noisy), 0.8, 0.7 (clean)


# ---------------------------------------------------------------------------------------------
# reading a fidelity run: scores are aligned by sample_id and oriented high = noisy


def _write_arrow(table, path: Path) -> None:
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)


def test_cell_scores_align_weights_and_losses_by_sample_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import torch
    from safetensors.torch import save_file

    base = tmp_path / "work" / "if4-uniform0.4-s0"
    ids = np.array([10, 11, 12, 13])
    _write_arrow(
        pa.table(
            {
                "sample_id": ids,
                "text": list("abcd"),
                "label": [0, 0, 1, 1],
                "true_label": [0, 1, 1, 0],
                "is_noisy": [False, True, False, True],
            }
        ),
        base / "data" / "train.arrow",
    )
    (base / "data" / "manifest.json").write_text('{"class_names": ["x", "y"]}')
    # curves in another row order; epoch 0 (before training) must not count
    save_file(
        {
            "losses": torch.tensor([[9.0, 0.2, 0.4], [0.0, 2.0, 2.0], [0.0, 0.1, 0.1], [9.0, 1.0, 3.0]]),
            "sample_id": torch.tensor([12, 11, 10, 13]),
        },
        str(base / "losses.safetensors"),
    )
    # the method comes from the weights artifact's own metadata, whatever the workspace is called
    ws = tmp_path / "work" / "if4-uniform0.4-s0-m5-mlrnet@lr1e-4"
    tuned = tmp_path / "work" / "if4-uniform0.4-s0-m5-other-tuned"
    for w, method, weight in ((ws, "mlrnet", [0.1, 0.9, 0.2, 0.8]), (tuned, "mwnet", [0.4, 0.5, 0.5, 0.5])):
        w.mkdir()
        (w / "data").symlink_to(base / "data")
        table = pa.table({"sample_id": [13, 12, 11, 10], "weight": weight})
        _write_arrow(
            table.replace_schema_metadata({"mlrnet": json.dumps({"config": {"method": method}})}), w / "weights.arrow"
        )

    cells = detection.find_cells(tmp_path)
    assert [c.name for c in cells] == [base.name] and list(cells[0].methods) == [ws.name, tuned.name]
    wanted = ("mlrnet-weight", "mwnet-weight", "stage1-loss")
    scores, noisy, labels = detection.cell_scores(cells[0], wanted, "oof", "", 0)
    assert noisy.tolist() == [False, True, False, True] and labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(scores["mlrnet-weight (m5-mlrnet@lr1e-4)"], [0.2, 0.8, 0.1, 0.9])  # 1 - weight
    np.testing.assert_allclose(scores["mwnet-weight (m5-other-tuned)"], [0.5, 0.5, 0.5, 0.6])
    np.testing.assert_allclose(scores["stage1-loss"], [0.1, 2.0, 0.3, 2.0])  # mean of epochs 1..T

    # --bootstrap: each weight score against the stage-1 loss, within labels (mwnet: 0.5 and 1 against 1 and 1)
    argv = ["detection.py", "--out", str(tmp_path), "--scores", *wanted, "--bootstrap", "20"]
    monkeypatch.setattr(sys, "argv", argv)
    detection.main()
    printed = capsys.readouterr().out
    assert "| -0.2500 | -0.2500 to -0.2500 (20 resamples) |" in printed
    rows = {r["score"]: r for r in map(json.loads, (tmp_path / "detection.jsonl").read_text().splitlines())}
    assert rows["mlrnet-weight (m5-mlrnet@lr1e-4)"]["vs_stage1_loss"]["gap"] == 0.0
    assert rows["mwnet-weight (m5-other-tuned)"]["vs_stage1_loss"]["stage1_roc_auc"] == 1.0
    assert "vs_stage1_loss" not in rows["stage1-loss"]
    for bad, says in ((["--bootstrap", "-1"], "--bootstrap must be 0"), (["--scores", "mlrnet-weight"], "stage1-loss")):
        monkeypatch.setattr(sys, "argv", [*argv, *bad])
        with pytest.raises(SystemExit):
            detection.main()
        assert says in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the cleanlab scores (bench extra only)


def test_cleanlab_scores_find_flipped_labels_out_of_fold() -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("cleanlab")
    rng = np.random.default_rng(0)
    true = np.repeat([0, 1, 2], 40)
    feats = np.eye(3)[true] * 3 + rng.normal(scale=0.5, size=(120, 3))
    labels = true.copy()
    flipped = rng.choice(120, size=12, replace=False)
    labels[flipped] = (labels[flipped] + 1) % 3
    fold = detection.folds_of(labels, seed=0)
    assert sorted(np.bincount(fold).tolist()) == [24] * 5
    probs = detection.oof_logreg_probs(feats, labels, fold, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    noisy = np.zeros(120, dtype=bool)
    noisy[flipped] = True
    rep = detection.detection_metrics(detection.cleanlab_score(labels, probs), noisy)
    assert rep["roc_auc"] > 0.95 and rep["precision_at_k"] >= 0.75


# ---------------------------------------------------------------------------------------------
# prepare_data.py: the local-copy path, and fidelity.py --data-root reading what it builds


def _ag_csv(path: Path, rows: list[tuple[int, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        csv.writer(fh, quoting=csv.QUOTE_ALL).writerows(rows)


def test_prepare_data_from_a_local_ag_news_csv_feeds_fidelity(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    src = tmp_path / "ag_news_csv"
    train = [(c, f"Title {c}-{i}", f'desc, with "quotes" {i}') for i in range(3) for c in (1, 2, 3, 4)]
    train.append((2, "", "no title here"))
    _ag_csv(src / "train.csv", train)
    _ag_csv(src / "test.csv", [(c, f"T{c}{i}", f"D{c}{i}") for c in (4, 3, 2, 1) for i in range(2)])
    root = tmp_path / "data"
    prepare_data.main(["--out", str(root), "--ag-news", str(src)])

    tr = pq.read_table(root / "ag_news" / "train.parquet")
    assert tr.column_names == ["text", "label", "has_title", "source"]
    assert tr.num_rows == 13
    assert tr.slice(0, 1).to_pylist()[0] == {
        "text": 'Title 1-0 desc, with "quotes" 0',
        "label": 0,
        "has_title": True,
        "source": "ag_news_csv/train.csv",
    }
    assert tr["has_title"].to_pylist().count(False) == 1 and tr["label"].to_pylist()[-1] == 1
    te = pq.read_table(root / "ag_news" / "test.parquet")
    assert te.column_names == ["text", "label", "title", "description"]
    assert te["label"].to_pylist() == [3, 3, 2, 2, 1, 1, 0, 0]
    assert (root / "ag_news" / "classes.txt").read_text().split("\n")[:4] == list(prepare_data.AG_CLASSES)

    # fidelity.py reads it: titled training rows only, and the first test_rows/4 test rows of each class
    out = tmp_path / "bench"
    out.mkdir()
    train_p, test_p = fidelity.prepare_data(out, fidelity.Budget(test_rows=4), data_root=root)
    assert pq.read_table(train_p).num_rows == 12
    t = pq.read_table(test_p)
    assert t["text"].to_pylist() == ["T40 D40", "T30 D30", "T20 D20", "T10 D10"]


def test_prepare_data_rejects_a_malformed_csv(tmp_path: Path) -> None:
    _ag_csv(tmp_path / "src" / "train.csv", [(5, "t", "d")])
    with pytest.raises(SystemExit, match="class 1-4"):
        prepare_data.main(["--out", str(tmp_path / "o"), "--ag-news", str(tmp_path / "src")])


def test_fidelity_data_root_moves_the_cic_clean_pool(tmp_path: Path) -> None:
    cic = fidelity.grids(1, tmp_path)["cic"][0]
    assert cic.extra_corrupt[-1] == str(tmp_path / "dataclue_cic" / "dev.json")
    assert fidelity.grids(1)["cic"][0].extra_corrupt[-1] == str(fidelity.SHARED / "dataclue_cic" / "dev.json")


# ---------------------------------------------------------------------------------------------
# weight_terms.py: the weight's logit split into its terms


def test_weight_terms_add_up_to_the_weights_that_weights_writes(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The ``weight`` term is the logit of the weight `mlrnet weights` writes, ``net`` + ``prior`` is that logit,
    the prior alone ranks the rows as the stage-1 loss does (the same within-label ROC-AUC), and the paper's net
    (no prior) has a zero prior term."""
    import torch
    import weight_terms
    from test_weights import make_weights_workspace
    from typer.testing import CliRunner

    from mlrnet_cli.artifacts import read_table, read_tensors, write_tensors
    from mlrnet_cli.cli import app
    from mlrnet_cli.metanet import MLRNetMetaNet

    ws, rows = make_weights_workspace(tmp_path / "ws", tiny_model_dir, n=48)
    terms, noisy, labels, stage1 = weight_terms.workspace_terms(ws)
    assert not (ws / "weights.arrow").exists()  # the workspace's own table is left alone
    assert CliRunner().invoke(app, ["weights", "-w", str(ws)]).exit_code == 0
    weight = read_table(ws / "weights.arrow").column("weight").to_numpy().astype(np.float64)
    assert np.allclose(torch.sigmoid(torch.from_numpy(terms["weight"])).numpy(), weight, atol=1e-6)
    assert np.allclose(terms["net"] + terms["prior"], terms["weight"]) and not terms["prior"].any()
    assert noisy.tolist() == rows["is_noisy"].tolist() and labels.tolist() == rows["label"].tolist()

    # the same net with a curve prior β = 2: the prior term is −2 · mean I_i, the stage-1 loss's order in each label
    path = ws / "model" / "best" / "meta_net.safetensors"
    tensors, meta = read_tensors(path, "meta-net")
    net = MLRNetMetaNet(**{k: v for k, v in meta["meta_net"].items() if k != "kind"}, curve_prior=2.0)
    net.load_state_dict(tensors, strict=False)
    meta["meta_net"] = net.spec()
    write_tensors(path, net.state_dict(), meta)
    terms, noisy, labels, stage1 = weight_terms.workspace_terms(ws)
    report = weight_terms.terms_report(terms, noisy, labels, stage1)
    assert report["prior"]["within_label"] == pytest.approx(report["stage1-loss"]["within_label"])
    assert report["prior"]["within_label"] > 0.9  # the fake curves put the noisy rows a whole loss unit higher
    assert set(report) == {*weight_terms.TERMS, "stage1-loss"}
    assert "| ws |" in weight_terms.markdown([{"workspace": "ws", "terms": report}])
