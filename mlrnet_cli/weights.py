"""`mlrnet weights`: the trained meta-net's weight v_i for every training row, ranked, and how well it finds noise.

The weight of row i is ``V(DF(h(x_i), Y_emb(y_i), I_i); θ)`` (eqs. 7-9) for an MLRNet model, or ``V(L_i; θ)``
(eq. 2) for an MW-Net model, computed with the final classifier w and meta-net θ of ``model/best``:
``h(x_i)`` and ``L_i`` come from one no-grad pass of the classifier over the training rows, ``I_i`` is the
row's normalised stage-1 loss curve from ``losses.safetensors`` (joined by ``sample_id``).

Groups (the paper's Figure 1): *clean* / *noisy* by ``is_noisy`` (when the table knows the truth) ×
*head* / *tail* by the row's observed class: a class is a head class when its number of training rows is
at least the median over classes (:func:`head_classes`). A low weight means "distrusted", so the ranking
metrics score ``1 − v_i`` against ``is_noisy``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mlrnet_cli import artifacts, inference, metrics, modeling, stageio
from mlrnet_cli.configs import WeightsConfig
from mlrnet_cli.errors import ArtifactError, DataError, FingerprintMismatchError, ModelError
from mlrnet_cli.metanet import normalized_curves
from mlrnet_cli.plot import plot_weights, require_matplotlib
from mlrnet_cli.progress import Progress
from mlrnet_cli.tokens import tokenize_table
from mlrnet_cli.workspace import Workspace

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("mlrnet")

META_NET_FILE = "meta_net.safetensors"
DEAD_META_NET_STD = 1e-4
#: above this share of the weights' variance between observed labels the weights act as a per-label switch: they
#: rebalance classes and barely rank rows within a label (the paper's net on our frozen no-noise cells: 0.75-1.0)
SWITCH_LABEL_SHARE = 0.9
NEEDS_META_NET = "weights need a model from `mlrnet train --method mlrnet` or `--method mwnet`"
#: the columns of --export-relabel: the weights table's, the class names, and an empty one for the relabeller
RELABEL_COLUMNS = "rank sample_id weight label label_name predicted predicted_name probability text new_label".split()


@dataclass
class WeightsResult:
    """The weights table (train order), the summary (as printed with --json), the top rows and files written."""

    table: pa.Table
    summary: dict[str, Any]
    top: list[dict[str, Any]]
    paths: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# pieces that need no model


def head_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Boolean mask over classes: head = at least the median number of training rows (by observed label)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return counts >= np.median(counts)


def row_groups(labels: np.ndarray, is_noisy: np.ndarray | None, head: np.ndarray) -> np.ndarray:
    """Group name per row: ``clean/head`` … ``noisy/tail``, or ``head`` / ``tail`` without the truth."""
    ht = np.where(head[np.asarray(labels, dtype=np.int64)], "head", "tail").astype(object)
    if is_noisy is None:
        return ht
    return np.where(np.asarray(is_noisy, dtype=bool), "noisy/", "clean/").astype(object) + ht


def group_summary(weights: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, float]]:
    """Count, mean, quartiles, min and max of the weight for every row and for each group."""

    def stats(w: np.ndarray) -> dict[str, float]:
        if w.size == 0:
            return {"count": 0}
        q = np.quantile(w, [0.0, 0.25, 0.5, 0.75, 1.0]).tolist()
        quartiles = dict(zip(("min", "q25", "median", "q75", "max"), q, strict=True))
        return {"count": int(w.size), "mean": float(w.mean()), "std": float(w.std()), **quartiles}

    return {"all": stats(weights)} | {str(g): stats(weights[groups == g]) for g in sorted(set(groups.tolist()))}


def rank_lowest_first(weights: np.ndarray) -> np.ndarray:
    """Rank 1 = lowest weight (most distrusted); ties keep table order."""
    return np.argsort(np.argsort(weights, kind="stable")).astype(np.int64) + 1  # the inverse permutation, from 1


# ---------------------------------------------------------------------------------------------
# the meta-net


def load_meta_net(model_dir: Path) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """Rebuild the meta-net saved by `train` beside the classifier: (net, its spec, the train config)."""
    from mlrnet_cli.metanet import build_meta_net

    path = model_dir / META_NET_FILE
    if not path.is_file():
        raise ModelError(f"{model_dir} has no {META_NET_FILE}: it was not trained with a meta-net", NEEDS_META_NET)
    tensors, meta = artifacts.read_tensors(path, "meta-net")
    spec = meta.get("meta_net") if isinstance(meta.get("meta_net"), dict) else {}  # `train` saves it there
    if spec.get("kind") == "mlc":
        raise ModelError(
            f"{model_dir} was trained with `--method mlc`: its meta-net corrects labels (soft labels), it does not "
            "weight rows",
            NEEDS_META_NET,
        )
    if spec.get("kind") not in ("mlrnet", "mwnet"):
        raise ArtifactError(f"{path} does not say which meta-net it holds (no spec in its metadata)")
    net = build_meta_net(spec)
    try:
        net.load_state_dict(tensors)
    except RuntimeError as e:
        raise ArtifactError(f"{path} does not match its meta-net spec: {str(e).splitlines()[0]}") from e
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    return net.float().eval(), spec, config


@torch.no_grad()
def meta_net_weights(
    net: torch.nn.Module, features: np.ndarray | None, labels: np.ndarray, curves: np.ndarray | None, losses: np.ndarray
) -> np.ndarray:
    """v_i = V(·; θ) for every row, in float32 on CPU (the meta-net is small: 4096 rows at a time)."""
    out = np.empty(labels.shape[0], dtype=np.float32)
    for s in range(0, out.size, 4096):
        sl = slice(s, s + 4096)
        v = net(
            None if features is None else torch.as_tensor(features[sl], dtype=torch.float32),
            torch.as_tensor(labels[sl], dtype=torch.long),
            None if curves is None else torch.as_tensor(curves[sl], dtype=torch.float32),
            torch.as_tensor(losses[sl], dtype=torch.float32),
        )
        out[sl] = v.reshape(-1).float().numpy()
    return out


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sample cross-entropy L_i of the observed label (float64 log-sum-exp)."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return (lse - z[np.arange(z.shape[0]), labels]).astype(np.float32)


def compute_weights(
    config: WeightsConfig,
    *,
    workdir: str | os.PathLike[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    train: str | os.PathLike[str] | None = None,
    losses: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    export_relabel: str | os.PathLike[str] | None = None,
    plot: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> WeightsResult:
    """Weight every training row with the trained meta-net; write ``weights.arrow`` (+ CSV, + PNG)."""
    config.validate()
    if plot is not None:
        require_matplotlib()
    ws = Workspace.at(workdir)
    model_id = inference.resolve_model(model, ws, hub_ok=False)
    model_dir = Path(model_id)
    if not model_dir.is_dir():
        raise ModelError(f"--model {model_id} is not a folder saved by `mlrnet train`")
    unfinished = inference.check_finished(model_id, config.allow_unfinished)
    train_path = Path(train) if train is not None else ws.train
    losses_path = Path(losses) if losses is not None else ws.losses
    out_path = Path(out) if out is not None else ws.weights

    net, spec, train_cfg = load_meta_net(model_dir)
    kind = spec["kind"]
    rows = stageio.read_rows(train_path)
    labels, is_noisy = rows.labels, rows.is_noisy
    inputs = {"train": rows.fingerprint(), "model": modeling.model_fingerprint(model_id)}
    curves, stage1_losses = _curves(losses_path, rows, spec, inputs)
    # only what changes the table's content: display (--top) and speed settings may differ between reruns
    cfg = inference.report_config(config, model_id, train_cfg, ("top",), train=str(train_path), method=kind)
    extra = {"unfinished_training": unfinished} if unfinished is not None else {}
    meta = artifacts.make_meta("weights", "weights", cfg, None, inputs, **extra)
    also = {"relabel": export_relabel, "plot": plot}
    paths = {"weights": out_path} | {k: Path(p) for k, p in also.items() if p is not None}
    # a report of its inputs: rewritten when they changed (a retrained model/best, a new train.arrow)
    read = [train_path, losses_path, model_dir]
    artifacts.guard_report(out_path, meta, about=("model", "train"), inputs=read, overwrite=overwrite)
    for p in paths.values():
        if p != out_path:
            artifacts.guard_output(p, meta, inputs=[*read, out_path], overwrite=True)
        artifacts.check_writable(p)  # now, not after the classifier pass

    clf, class_names, _ = inference.load_trained_classifier(model_id, ws, modeling.select_device(config.device))
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise DataError(f"{train_path} has labels outside 0..{len(class_names) - 1} of the model")
    opts = {"batch_size": config.batch_size, "bf16": config.bf16, "progress": progress, "description": "weights"}
    inf = _classifier_pass(clf, rows, ws, train_cfg, meta, **opts)
    row_loss = cross_entropy(inf.logits, labels)
    weight = meta_net_weights(net, inf.features, labels, curves if kind == "mlrnet" else None, row_loss)
    if weight.std() < DEAD_META_NET_STD:
        log.warning("every training row gets the same weight (std %.2g): the meta-net learned nothing", weight.std())

    share = metrics.label_share(weight, labels)
    head = head_classes(labels, len(class_names))
    groups = row_groups(labels, is_noisy, head)
    table = _weights_table(rows, weight, inf.probabilities, row_loss, groups)
    summary: dict[str, Any] = {
        "method": kind,
        "model": model_id,
        "num_rows": int(weight.size),
        "max_length": cfg["max_length"],
        "head_classes": [class_names[i] for i in np.flatnonzero(head)],
        "tail_classes": [class_names[i] for i in np.flatnonzero(~head)],
        "groups": group_summary(weight, groups),
        "label_share": share,
        "per_label_switch": share is not None and share >= SWITCH_LABEL_SHARE,
        "noise_detection": _noise_detection(weight, is_noisy, labels, stage1_losses),
    }
    summary |= extra
    top = _top_rows(table, config.top, class_names)
    named = [c for c in ("label", "predicted", "true_label") if c in table.column_names]
    artifacts.write_table(out_path, table, meta, class_names=dict.fromkeys(named, class_names))
    if export_relabel is not None:
        _write_relabel_csv(paths["relabel"], top, table.schema)
    if plot is not None:
        plot_weights(table, curves, paths["plot"])
    return WeightsResult(table, summary, top, paths)


def _noise_detection(
    weight: np.ndarray, is_noisy: np.ndarray | None, labels: np.ndarray, stage1_losses: np.ndarray | None
) -> dict[str, Any] | None:
    """Low weight as a noise score, overall and within each observed label, beside the stage-1 loss alone (the
    baseline the weights should beat: the curves already hold it)."""
    if is_noisy is None:
        return None
    det = metrics.noise_detection(1.0 - weight.astype(np.float64), is_noisy, labels)
    if stage1_losses is not None:
        det["stage1_loss"] = metrics.noise_detection(metrics.stage1_loss_score(stage1_losses), is_noisy, labels)
    return det


def _curves(
    losses_path: Path, rows: stageio.Rows, spec: dict[str, Any], inputs: dict[str, str]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The normalised curves I_i of the training rows (their fingerprint into ``inputs``; MLRNet needs them) and
    the raw stage-1 losses."""
    if not losses_path.is_file():
        if spec["kind"] == "mlrnet":
            raise ArtifactError(f"loss curves not found: {losses_path}", "run `mlrnet collect-losses` first")
        return None, None
    read = stageio.read_curves(losses_path, rows)
    inputs["losses"] = read.fingerprint
    curves = normalized_curves(read.losses, torch.as_tensor(rows.labels)).numpy()
    if spec["kind"] == "mlrnet" and curves.shape[1] != int(spec.get("curve_len", curves.shape[1])):
        raise FingerprintMismatchError(
            f"{losses_path} has curves of length {curves.shape[1]}, the meta-net expects {spec['curve_len']}"
        )
    return curves, read.losses.double().numpy()


def _classifier_pass(
    clf: Any, rows: stageio.Rows, ws: Workspace, train_cfg: dict[str, Any], meta: dict[str, Any], **opts: Any
) -> inference.Inference:
    """Logits (and features) of every training row, through the token cache `train` filled (``meta``: the
    resolved model, method and max length of this run; ``opts``: :func:`inference.run_classifier`'s)."""
    cfg = meta["config"]
    tokenizer = modeling.load_tokenizer(cfg["model"])
    # keyed like `train` keys it (the base model's fingerprint), so the training run's token cache is reused
    base = train_cfg.get("model")
    tok_id = modeling.model_fingerprint(base) if isinstance(base, str) else meta["inputs"]["model"]
    tokens = tokenize_table(rows.path, tokenizer, tok_id, cfg["max_length"], ws.cache, table=rows.table)
    opts |= {"pad_id": modeling.pad_token_id(tokenizer), "with_features": cfg["method"] == "mlrnet"}
    return inference.classify_tokens(clf, tokens, Path(cfg["model"]), train_cfg, ws, **opts)


def _weights_table(
    rows: stageio.Rows, weight: np.ndarray, probs: np.ndarray, row_loss: np.ndarray, groups: np.ndarray
) -> pa.Table:
    """One row per training row, in train order: the weight, its rank and the classifier's view of the row."""
    import pyarrow as pa

    labels, n = rows.labels, len(rows)
    predicted = probs.argmax(axis=1).astype(np.int64)
    cols: dict[str, Any] = {
        "sample_id": pa.array(rows.sample_ids),
        "text": pa.array(rows.texts, pa.string()),
        "label": pa.array(labels),
        "weight": pa.array(weight),
        "rank": pa.array(rank_lowest_first(weight)),
        "predicted": pa.array(predicted),
        "probability": pa.array(probs[np.arange(n), predicted].astype(np.float32)),
        "label_probability": pa.array(probs[np.arange(n), labels].astype(np.float32)),
        "loss": pa.array(row_loss),
        "group": pa.array(groups.tolist(), pa.string()),
    }
    if rows.true_labels is not None and (rows.true_labels >= 0).all():
        cols["true_label"] = pa.array(rows.true_labels.astype(np.int64))
    if rows.is_noisy is not None:
        cols["is_noisy"] = pa.array(rows.is_noisy.astype(bool))
    return pa.table(cols)


def _top_rows(table: pa.Table, k: int, class_names: list[str]) -> list[dict[str, Any]]:
    """The k lowest-weight rows, most distrusted first, with class names for a human reader."""
    out = []
    for r in table.take(np.argsort(table.column("rank").to_numpy())[:k]).to_pylist():
        keep = ("rank", "sample_id", "weight", "label", "predicted", "probability", "text")
        row = {key: r[key] for key in keep + (("true_label", "is_noisy") if "true_label" in r else ())}
        out.append(row | {"label_name": class_names[r["label"]], "predicted_name": class_names[r["predicted"]]})
    return out


def _write_relabel_csv(path: Path, rows: list[dict[str, Any]], types: pa.Schema) -> None:
    """CSV of the distrusted rows, in the weights table's column ``types``; names and new_label are strings."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    schema = pa.schema([types.field(c) if c in types.names else pa.field(c, pa.string()) for c in RELABEL_COLUMNS])
    cols = {c: [r.get(c) for r in rows] for c in RELABEL_COLUMNS}  # new_label: empty, for the relabeller
    with artifacts.atomic_path(path) as tmp:
        pcsv.write_csv(pa.table(cols, schema=schema), tmp)
