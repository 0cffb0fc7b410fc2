"""`mlrnet weights` on a tiny model: the join, the summary values, --top/--export-relabel/--plot, mwnet, errors.

Until `collect-losses` and `train` write real workspaces in tests, the helpers below build the files they
would write: data/train.arrow, data/manifest.json, losses.safetensors and model/best (tiny classifier +
meta_net.safetensors whose metadata holds the meta-net's spec).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlrnet_cli.cli import app

CLASSES = ["world", "sports", "business", "scitech"]
WORDS = ["match", "stocks", "chip", "talks", "cup", "oil", "moon", "vote", "goal", "bank", "code", "peace"]
EPOCHS = 3


def _rows(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    # imbalanced observed labels: class 0 is the head, class 3 the tail
    true = np.repeat([0, 1, 2, 3], [n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8])
    noisy = rng.random(n) < 0.3
    observed = np.where(noisy, (true + rng.integers(1, 4, n)) % 4, true)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 12))) + f" {i}" for i in range(n)]
    ids = rng.permutation(np.arange(1000, 1000 + 3 * n, 3))  # not sorted, not contiguous
    return {"sample_id": ids, "text": texts, "label": observed, "true_label": true, "is_noisy": observed != true}


def make_weights_workspace(
    root: Path,
    model_dir: Path,
    *,
    n: int = 40,
    method: str = "mlrnet",
    truth: bool = True,
    shuffle_curves: bool = True,
    train_config: dict | None = None,
) -> tuple[Path, dict]:
    import pyarrow as pa
    import torch

    from mlrnet_cli.artifacts import fingerprint_file, make_meta, write_json, write_table, write_tensors
    from mlrnet_cli.metanet import MLRNetMetaNet, MWNet

    rows = _rows(n)
    cols = {
        "sample_id": pa.array(rows["sample_id"], pa.int64()),
        "text": rows["text"],
        "label": pa.array(rows["label"], pa.int64()),
        "true_label": pa.array(rows["true_label"], pa.int64()) if truth else pa.nulls(n, pa.int64()),
        "is_noisy": pa.array(rows["is_noisy"]) if truth else pa.nulls(n, pa.bool_()),
    }
    train = root / "data" / "train.arrow"
    train_fp = write_table(train, pa.table(cols), make_meta("corrupt", "train"))
    write_json(root / "data" / "manifest.json", {"num_classes": 4, "class_names": CLASSES, "mlrnet": {}})

    rng = np.random.default_rng(1)
    losses = rng.random((n, EPOCHS + 1)).astype(np.float32) + rows["is_noisy"][:, None]
    order = rng.permutation(n) if shuffle_curves else np.arange(n)
    write_tensors(
        root / "losses.safetensors",
        {"losses": torch.from_numpy(losses[order]), "sample_id": torch.from_numpy(rows["sample_id"][order].copy())},
        make_meta("collect-losses", "losses", inputs={"train": train_fp}),
    )
    best = root / "model" / "best"
    shutil.copytree(model_dir, best)
    torch.manual_seed(0)
    net = (
        MLRNetMetaNet(feature_dim=32, num_classes=4, curve_len=EPOCHS + 1, label_emb_dim=8, df_dim=8)
        if method == "mlrnet"
        else MWNet(hidden=10)
    )
    meta = make_meta("train", "meta_net", {"method": method, **(train_config or {})}, 0, {}, meta_net=net.spec())
    write_tensors(best / "meta_net.safetensors", net.state_dict(), meta)
    rows["losses"] = losses
    rows["net"] = net
    assert fingerprint_file(train) == train_fp
    return root, rows


def _invoke(*args: str):
    return CliRunner().invoke(app, ["weights", *args])


def test_weights_table_joins_every_training_row_once_and_matches_direct_computation(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import torch

    from mlrnet_cli.artifacts import read_table
    from mlrnet_cli.modeling import features_and_logits, load_classifier, load_tokenizer

    ws, rows = make_weights_workspace(tmp_path / "ws", tiny_model_dir)
    res = _invoke("-w", str(ws), "--batch-size", "7")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines() == [str(ws / "weights.arrow")]
    tbl = read_table(ws / "weights.arrow")
    n = len(rows["text"])
    ids = tbl.column("sample_id").to_numpy()
    assert tbl.num_rows == n and np.unique(ids).size == n
    assert ids.tolist() == rows["sample_id"].tolist()  # train order
    assert sorted(tbl.column("rank").to_pylist()) == list(range(1, n + 1))
    w = tbl.column("weight").to_numpy()
    assert ((w >= 0) & (w <= 1)).all()
    assert np.all(np.diff(w[np.argsort(tbl.column("rank").to_numpy())]) >= 0)  # rank 1 = lowest weight
    assert tbl.column("is_noisy").to_pylist() == rows["is_noisy"].tolist()

    # reference: one row at a time, curves joined by hand, normalised by class mean of observed labels
    model = load_classifier(str(ws / "model" / "best"), 4).eval()
    tok = load_tokenizer(str(ws / "model" / "best"))
    curves = rows["losses"] - np.stack([rows["losses"][rows["label"] == k].mean(0) for k in range(4)])[rows["label"]]
    ref = []
    with torch.no_grad():
        for i in range(n):
            enc = tok(rows["text"][i], return_tensors="pt")
            f, z = features_and_logits(model, enc["input_ids"], enc["attention_mask"])
            y = torch.tensor([int(rows["label"][i])])
            loss = torch.nn.functional.cross_entropy(z, y, reduction="none")
            ref.append(float(rows["net"](f, y, torch.tensor(curves[i : i + 1], dtype=torch.float32), loss)))
            if i == 0:
                assert tbl.column("predicted")[0].as_py() == int(z.argmax())
    np.testing.assert_allclose(w, ref, atol=1e-5)


def test_weights_cli_summary_top_export_and_plot(tmp_path: Path, tiny_model_dir: Path) -> None:
    from mlrnet_cli import metrics

    ws, rows = make_weights_workspace(tmp_path / "ws", tiny_model_dir)
    relabel = tmp_path / "relabel.csv"
    args = ["-w", str(ws), "--json", "--top", "5", "--export-relabel", str(relabel)]
    have_mpl = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        have_mpl = False
    if have_mpl:
        args += ["--plot", str(tmp_path / "fig.png")]
    res = _invoke(*args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    s = out["summary"]
    assert s["method"] == "mlrnet" and s["num_rows"] == 40
    # observed counts are imbalanced towards class 0: it is a head class, class 3 a tail class
    assert "world" in s["head_classes"] and "scitech" in s["tail_classes"]
    from mlrnet_cli.artifacts import read_table

    tbl = read_table(ws / "weights.arrow")
    w = tbl.column("weight").to_numpy().astype(np.float64)
    groups = np.array(tbl.column("group").to_pylist())
    assert set(groups) <= {"clean/head", "clean/tail", "noisy/head", "noisy/tail"}
    for g, st in s["groups"].items():
        sel = w if g == "all" else w[groups == g]
        assert st["count"] == sel.size
        assert st["mean"] == pytest.approx(sel.mean(), abs=1e-6)
        assert st["median"] == pytest.approx(np.median(sel), abs=1e-6)
    # how much of the weights' spread only says which label a row carries, from the written weights
    assert s["label_share"] == pytest.approx(metrics.label_share(w, rows["label"]), abs=1e-6)
    assert s["per_label_switch"] == (s["label_share"] >= 0.9)
    det = s["noise_detection"]
    assert det["k"] == int(rows["is_noisy"].sum())
    assert det["roc_auc"] == pytest.approx(metrics.roc_auc(-w, rows["is_noisy"]))
    assert det["precision_at_k"] == pytest.approx(metrics.precision_at_k(-w, rows["is_noisy"], det["k"]))
    # beside it: the same within each observed label, and the stage-1 loss alone (mean over epochs 1..T)
    within = metrics.within_label_report(-w, rows["is_noisy"], rows["label"])
    assert det["within_label"]["roc_auc"] == pytest.approx(within["roc_auc"])
    assert det["within_label"]["roc_auc_labels_used"] == within["roc_auc_labels_used"] > 0
    s1 = rows["losses"][:, 1:].astype(np.float64).mean(axis=1)
    assert det["stage1_loss"]["roc_auc"] == pytest.approx(metrics.roc_auc(s1, rows["is_noisy"]))
    # this table's noisy rows have a loss higher by 1 at every epoch: the stage-1 loss finds them all
    assert det["stage1_loss"]["roc_auc"] == 1.0 and det["stage1_loss"]["within_label"]["roc_auc"] == 1.0

    assert [r["rank"] for r in out["top"]] == [1, 2, 3, 4, 5]
    with open(relabel, newline="") as fh:
        rows_csv = list(csv.DictReader(fh))
    assert [int(r["sample_id"]) for r in rows_csv] == [r["sample_id"] for r in out["top"]]
    assert rows_csv[0]["label_name"] in CLASSES and rows_csv[0]["new_label"] == ""
    lowest = np.sort(w)[:5]
    np.testing.assert_allclose([float(r["weight"]) for r in rows_csv], lowest, rtol=1e-5)
    if have_mpl:
        assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert out["artifacts"]["plot"] == str(tmp_path / "fig.png")


def test_weights_for_mwnet_model_and_unknown_truth(tmp_path: Path, tiny_model_dir: Path) -> None:
    ws, rows = make_weights_workspace(tmp_path / "ws", tiny_model_dir, method="mwnet", truth=False, n=16)
    res = _invoke("-w", str(ws), "--json", "--top", "0")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)["summary"]
    assert s["method"] == "mwnet" and s["noise_detection"] is None
    assert set(s["groups"]) <= {"all", "head", "tail"}
    # mwnet weights depend on the loss alone: v_i = V(L_i; θ) from the table's own loss column
    import torch

    from mlrnet_cli.artifacts import read_table

    tbl = read_table(ws / "weights.arrow")
    loss = torch.from_numpy(tbl.column("loss").to_numpy().copy())
    with torch.no_grad():
        ref = rows["net"](None, None, None, loss).numpy()
    np.testing.assert_allclose(tbl.column("weight").to_numpy(), ref, atol=1e-6)


def test_weights_errors_are_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch

    from mlrnet_cli.artifacts import make_meta, write_tensors

    res = _invoke("-w", str(tmp_path / "nothing"))
    assert res.exit_code == 1 and "mlrnet train" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1

    ws, rows = make_weights_workspace(tmp_path / "ws", tiny_model_dir, n=12)
    short = {"losses": torch.from_numpy(rows["losses"][1:]), "sample_id": torch.from_numpy(rows["sample_id"][1:])}
    write_tensors(ws / "losses.safetensors", short, make_meta("collect-losses", "losses"))  # a row has no curve
    res = _invoke("-w", str(ws))
    assert res.exit_code == 1 and "no loss curve for 1 training row" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1

    (ws / "model" / "best" / "meta_net.safetensors").unlink()
    res = _invoke("-w", str(ws))
    assert res.exit_code == 1 and "meta_net.safetensors" in res.stderr


def test_load_meta_net_reads_the_spec_train_saves_and_refuses_mlc_or_none(tmp_path: Path) -> None:
    from mlrnet_cli.artifacts import make_meta, write_tensors
    from mlrnet_cli.errors import ArtifactError, ModelError
    from mlrnet_cli.metanet import MWNet
    from mlrnet_cli.weights import load_meta_net

    net = MWNet(hidden=7)
    write_tensors(
        tmp_path / "meta_net.safetensors",
        net.state_dict(),
        make_meta("train", "model", {"lr": 1}, 0, {}, meta_net=net.spec()),
    )
    loaded, spec, cfg = load_meta_net(tmp_path)
    assert spec == net.spec() and cfg == {"lr": 1} and isinstance(loaded, MWNet)
    write_tensors(tmp_path / "meta_net.safetensors", {}, make_meta("train", "model", meta_net={"kind": "mlc"}))
    with pytest.raises(ModelError, match="--method mlc"):
        load_meta_net(tmp_path)
    write_tensors(tmp_path / "meta_net.safetensors", net.state_dict(), make_meta("train", "model"))
    with pytest.raises(ArtifactError, match="does not say which meta-net it holds"):
        load_meta_net(tmp_path)


def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from mlrnet_cli.errors import ConfigError
    from mlrnet_cli.plot import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"pip install 'mlrnet\[plot\]'"):
        require_matplotlib()


def test_plot_weights_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import pyarrow as pa

    from mlrnet_cli.plot import plot_weights

    rng = np.random.default_rng(0)
    groups = ["clean/head", "clean/tail", "noisy/head", "noisy/tail"] * 10
    tbl = pa.table({"weight": rng.random(40), "group": groups})
    path = plot_weights(tbl, rng.normal(size=(40, 4)), tmp_path / "w.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not list(tmp_path.glob(".mlrnet-tmp-*"))


def test_group_helpers() -> None:
    from mlrnet_cli.weights import head_classes, rank_lowest_first, row_groups

    labels = np.array([0] * 10 + [1] * 5 + [2] * 2 + [3])
    head = head_classes(labels, 4)  # counts 10, 5, 2, 1: median 3.5
    assert head.tolist() == [True, True, False, False]
    g = row_groups(np.array([0, 3, 1]), np.array([False, True, True]), head)
    assert g.tolist() == ["clean/head", "noisy/tail", "noisy/head"]
    assert row_groups(np.array([2]), None, head).tolist() == ["tail"]
    assert rank_lowest_first(np.array([0.5, 0.1, 0.5, 0.9])).tolist() == [2, 1, 3, 4]


def test_freeze_encoder_model_reuses_feature_cache_and_gives_the_same_weights(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from mlrnet_cli.artifacts import read_table

    ws, _ = make_weights_workspace(tmp_path / "a", tiny_model_dir, n=20)
    assert _invoke("-w", str(ws)).exit_code == 0
    full = read_table(ws / "weights.arrow").column("weight").to_numpy()
    cfg = {"freeze_encoder": True, "init_from": "pretrained", "model": str(ws / "model" / "best")}
    ws2, _ = make_weights_workspace(tmp_path / "b", tiny_model_dir, n=20, train_config=cfg)
    res = _invoke("-w", str(ws2))
    assert res.exit_code == 0, res.output
    assert list((ws2 / "cache").glob("features-*.safetensors"))  # the frozen-encoder feature cache
    np.testing.assert_allclose(read_table(ws2 / "weights.arrow").column("weight").to_numpy(), full, atol=1e-5)


@pytest.mark.parametrize("method", ["mlrnet", "mwnet"])
def test_pipeline_train_then_eval_and_weights_with_no_options(
    workspace: Path, tiny_model_dir: Path, method: str
) -> None:
    """After `corrupt` and `train` (curves from a stand-in for collect-losses), both commands need no options."""
    import torch

    from mlrnet_cli import artifacts

    table = artifacts.read_table(workspace / "data" / "train.arrow")
    ids = torch.tensor(table.column("sample_id").to_pylist(), dtype=torch.int64)
    losses = torch.rand(len(ids), EPOCHS + 1, generator=torch.Generator().manual_seed(0))
    meta = artifacts.make_meta(
        "collect-losses",
        "losses",
        config={"model": str(tiny_model_dir), "epochs": EPOCHS},
        seed=0,
        inputs={"train": artifacts.fingerprint_file(workspace / "data" / "train.arrow")},
    )
    artifacts.write_tensors(workspace / "losses.safetensors", {"losses": losses, "sample_id": ids}, meta)
    runner = CliRunner()
    fast = ["--epochs", "1", "--batch-size", "16", "--max-length", "24", "--meta-per-class", "4"]
    r = runner.invoke(app, ["train", "-w", str(workspace), *fast, "--method", method])
    assert r.exit_code == 0, r.output

    r = runner.invoke(app, ["eval", "-w", str(workspace), "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert 0.0 <= ev["accuracy"] <= 1.0
    assert ev["num_rows"] == artifacts.read_table(workspace / "data" / "test.arrow").num_rows

    r = runner.invoke(app, ["weights", "-w", str(workspace), "--json", "--top", "3"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    w = artifacts.read_table(workspace / "weights.arrow")
    assert w.column("sample_id").to_pylist() == table.column("sample_id").to_pylist()
    assert out["summary"]["method"] == method and out["summary"]["noise_detection"]["k"] == int(
        sum(table.column("is_noisy").to_pylist())
    )


@pytest.mark.parametrize(("share", "switch"), [(0.95, True), (0.40, False)])
def test_summary_says_when_the_weights_only_follow_the_label(share: float, switch: bool) -> None:
    import io

    from rich.console import Console

    from mlrnet_cli.commands.weights import _print_summary

    buf = io.StringIO()
    summary = {
        "method": "mlrnet",
        "num_rows": 4,
        "groups": {"all": {"count": 4, "mean": 0.5, "q25": 0.1, "median": 0.5, "q75": 0.9}},
        "head_classes": ["a"],
        "tail_classes": ["b"],
        "label_share": share,
        "per_label_switch": switch,
    }
    _print_summary(summary, [], Console(file=buf, width=300))
    text = buf.getvalue()
    assert f"the observed label explains {share:.0%} of the weights' variance" in text
    assert ("the weights mostly follow the label" in text) is switch
