"""`mlrnet eval`: accuracy (the paper's metric), F1s, per-class scores and the confusion matrix of a classifier.

Inference is batched and gradient-free; rows are grouped by token length so each batch is padded only to
its own longest row (dynamic padding), and runs under bf16 autocast on CUDA. The same loop
(:func:`run_classifier`) also gives ``mlrnet weights`` the classifier's features and logits.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlrnet_cli import metrics, modeling
from mlrnet_cli.artifacts import (
    check_writable,
    fingerprint_file,
    guard_report,
    make_meta,
    provenance,
    read_json,
    write_json,
    write_table,
)
from mlrnet_cli.errors import ArtifactError, ConfigError, DataError, ModelError
from mlrnet_cli.progress import Progress
from mlrnet_cli.progress import get as get_progress
from mlrnet_cli.tokens import length_grouped_batches, pad_batch
from mlrnet_cli.workspace import Workspace

log = logging.getLogger("mlrnet")

TABLE_SUFFIXES = {".arrow", ".feather", ".ipc", ".parquet", ".pq", ".csv", ".tsv", ".json", ".jsonl", ".ndjson"}


@dataclass(frozen=True)
class EvalConfig:
    """Inference settings of `mlrnet eval` (none of them change the metrics, only speed and memory)."""

    batch_size: int = 64
    """Rows per forward pass."""
    max_length: int | None = None
    """Longer texts are truncated to this many tokens; None = as the model was trained (128 if it does not say)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    bf16: bool = True
    """Autocast to bfloat16 on CUDA (ignored on CPU, where bf16 is slower)."""
    text_column: str | None = None
    """Text column of --data [default: text, sentence or content]."""
    label_column: str = "label"
    """Label column of --data (class ids, or class names mapped with the workspace's manifest)."""
    allow_unfinished: bool = False
    """Evaluate a model whose training run stopped before its last epoch (warned about and recorded)."""


@dataclass
class EvalResult:
    """What `evaluate` returns: the metrics (as in eval/metrics.json) and the files written."""

    metrics: dict[str, Any]
    paths: dict[str, Path]


# ---------------------------------------------------------------------------------------------
# model loading and inference (shared with `mlrnet weights`)


DEFAULT_MAX_LENGTH = 128  #: token truncation for a model that does not record the one it was trained with


def resolve_model(model: str | os.PathLike[str] | None, ws: Workspace, *, hub_ok: bool = True) -> str:
    """``--model`` as given, or the workspace's model/best (a clear error when `train` has not run)."""
    if model is not None:
        return str(model)
    best = ws.model / "best"
    if not best.is_dir():
        what = "a folder saved by train/collect-losses, or a hub id" if hub_ok else "a folder saved by `mlrnet train`"
        raise ModelError(f"no trained model at {best}", f"run `mlrnet train` first, or pass --model: {what}")
    return str(best)


def _stage_meta(folder: Path) -> dict[str, Any]:
    """The mlrnet metadata a stage saved in a model folder (empty for a folder mlrnet did not write)."""
    try:
        meta = read_json(folder / "mlrnet.json").get("mlrnet") if (folder / "mlrnet.json").is_file() else None
    except (ArtifactError, AttributeError):
        meta = None
    return meta if isinstance(meta, dict) else {}


def trained_settings(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the stage that saved a model folder recorded: ``model`` (the pretrained base) and ``max_length``;
    empty for a hub id or a folder mlrnet did not write."""
    path = Path(name_or_path)
    cfg = _stage_meta(path).get("config") if path.is_dir() else None
    if not isinstance(cfg, dict):
        return {}
    return {k: cfg[k] for k in ("model", "max_length") if cfg.get(k) is not None}


def resolve_max_length(requested: int | None, settings: dict[str, Any]) -> int:
    """``--max-length`` when given, else the model's own (the one it was trained with), else 128."""
    if requested is not None:
        return requested
    recorded = settings.get("max_length")
    return int(recorded) if isinstance(recorded, int) and recorded >= 2 else DEFAULT_MAX_LENGTH


def unfinished_training(model_dir: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(epochs done, epochs asked)`` when ``model_dir`` was saved by a `train` run that has not finished, else
    None. A run saves ``best`` and ``last`` after every epoch: ``last`` says how far the run got."""
    path = Path(model_dir)
    meta = _stage_meta(path) if path.is_dir() else {}
    if meta.get("stage") != "train" or not isinstance(meta.get("config"), dict):
        return None
    try:
        epochs, done = int(meta["config"]["epochs"]), int(meta["epoch"])
    except (KeyError, TypeError, ValueError):
        return None
    last = _stage_meta(path.parent / "last") if path.name != "last" else {}
    if last and provenance(last) == provenance(meta) and isinstance(last.get("epoch"), int):
        done = max(done, last["epoch"])
    return (done, epochs) if done < epochs else None


def check_finished(model_id: str, allow_unfinished: bool) -> dict[str, int] | None:
    """Refuse a model of an unfinished training run (or, allowed, warn and return what to record about it)."""
    unfinished = unfinished_training(model_id) if Path(model_id).is_dir() else None
    if unfinished is None:
        return None
    done, epochs = unfinished
    if not allow_unfinished:
        raise ArtifactError(
            f"{model_id} comes from an unfinished training run ({done} of {epochs} epochs done)",
            "rerun the same `mlrnet train` command to finish it, or pass --allow-unfinished to use it anyway",
        )
    log.warning("%s comes from an UNFINISHED training run (%d of %d epochs done): its results are not those "
                "of the run you asked for", model_id, done, epochs)
    return {"epochs_done": done, "epochs": epochs}


def load_tokenizer(name_or_path: str) -> Any:
    """The folder's own tokenizer, else the one of the pretrained model it was fine-tuned from."""
    try:
        return modeling.load_tokenizer(name_or_path)
    except ModelError:
        path = Path(name_or_path)
        base = trained_settings(path).get("model") if path.is_dir() else None
        if base is None or base == name_or_path:
            raise
        log.debug("%s has no tokenizer: using the one of %s", name_or_path, base)
        return modeling.load_tokenizer(base)


def model_num_labels(name_or_path: str) -> int:
    """How many outputs the saved classification head has (from its config, without loading weights)."""
    # the same hub probe as every stage that loads a model: offline, one line in seconds, not the hub's retries
    config = modeling.load_config(name_or_path)
    if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        raise ModelError(
            f"{name_or_path} has no trained classification head",
            "evaluate a model saved by `mlrnet train`/`collect-losses` or a fine-tuned classifier",
        )
    return int(config.num_labels)


def load_trained_classifier(
    name_or_path: str, ws: Workspace, device: torch.device
) -> tuple[Any, list[str], list[Any] | None]:
    """(model in eval mode on ``device``, class names, the manifest's original label values or None)."""
    num_labels = model_num_labels(name_or_path)
    class_names, label_values = class_names_for(num_labels, ws)
    model = modeling.load_classifier(name_or_path, num_labels, class_names, pickle_option=False)
    return model.to(device).eval(), class_names, label_values


def autocast_context(device: torch.device, bf16: bool = True) -> Any:
    """bf16 autocast on CUDA (unless turned off); a no-op elsewhere."""
    return modeling.autocast_context(device) if bf16 else contextlib.nullcontext()


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated, unpadded (padding happens per batch)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return enc["input_ids"]


def iter_batches(
    token_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(row indices, input_ids, attention_mask) for length-grouped, dynamically padded batches."""
    for rows in length_grouped_batches([len(t) for t in token_ids], batch_size):
        input_ids, mask = pad_batch([token_ids[i] for i in rows], pad_id)
        yield rows, input_ids, mask


@dataclass
class Inference:
    """Per-row outputs of :func:`run_classifier`, in the input's row order (float32)."""

    logits: np.ndarray
    features: np.ndarray | None = None

    @property
    def probabilities(self) -> np.ndarray:
        z = self.logits - self.logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


@torch.inference_mode()
def run_classifier(
    model: Any,
    token_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 64,
    bf16: bool = True,
    with_features: bool = False,
    progress: Progress | None = None,
    description: str = "eval",
) -> Inference:
    """Logits (and features) of every row: no grad, length-grouped batches, dynamic padding, bf16 on CUDA."""
    device = next(model.parameters()).device
    n = len(token_ids)
    logits: np.ndarray | None = None
    feats: np.ndarray | None = None
    with get_progress(progress).task(description, total=n) as task:
        for rows, input_ids, mask in iter_batches(token_ids, batch_size, pad_id):
            input_ids = input_ids.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True)
            with autocast_context(device, bf16):
                if with_features:
                    f, z = modeling.features_and_logits(model, input_ids, mask)
                else:
                    f, z = None, model(input_ids=input_ids, attention_mask=mask).logits
            z = z.float().cpu().numpy()
            if logits is None:
                logits = np.empty((n, z.shape[1]), dtype=np.float32)
            logits[rows] = z
            if f is not None:
                f = f.float().cpu().numpy()
                if feats is None:
                    feats = np.empty((n, f.shape[1]), dtype=np.float32)
                feats[rows] = f
            task.advance(len(rows))
    if logits is None:
        raise DataError("no rows to run the classifier on")
    return Inference(logits, feats)


# ---------------------------------------------------------------------------------------------
# labelled tables


def read_labelled_table(
    path: str | os.PathLike[str],
    class_names: Sequence[str],
    *,
    text_column: str | None = None,
    label_column: str = "label",
    label_values: Sequence[Any] | None = None,
) -> tuple[Any, list[str], np.ndarray]:
    """(table, texts, class ids) from an Arrow/Parquet/CSV/JSONL file; string labels are mapped by class name."""
    from mlrnet_cli.data import joined_text, load_source, raw_labels, resolve_text_columns

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}", "pass --data an Arrow, Parquet, CSV or JSONL file")
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise DataError(f"cannot read {path}: unknown file type {path.suffix!r}", "use Arrow, Parquet, CSV or JSONL")
    table = load_source(str(path)).table
    if table.num_rows == 0:
        raise DataError(f"{path} has no rows")
    cols = resolve_text_columns(table, [text_column] if text_column else None, str(path))
    texts = joined_text(table, cols, str(path))
    labels = encode_labels(raw_labels(table, label_column, str(path)), class_names, label_values, str(path))
    return table, texts, labels


def encode_labels(
    raw: Sequence[Any], class_names: Sequence[str], label_values: Sequence[Any] | None, origin: str
) -> np.ndarray:
    """Integer labels must be class ids; strings are class names (or the source's original label values)."""
    c = len(class_names)
    index: dict[Any, int] = {str(n): i for i, n in enumerate(class_names)}
    for i, v in enumerate(label_values or ()):
        index.setdefault(str(v), i)
    out = np.empty(len(raw), dtype=np.int64)
    for i, v in enumerate(raw):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            key = str(v)
            if key not in index:
                if key.lstrip("-").isdigit():
                    v = int(key)
                else:
                    raise DataError(
                        f"{origin} row {i} has label {v!r}, which is not a class of this model",
                        f"classes: {', '.join(map(str, class_names[:10]))}",
                    )
            else:
                out[i] = index[key]
                continue
        if not 0 <= int(v) < c:
            raise DataError(f"{origin} row {i} has label {v}, outside 0..{c - 1}")
        out[i] = int(v)
    return out


def class_names_for(num_labels: int, ws: Workspace) -> tuple[list[str], list[Any] | None]:
    """Class names from the workspace manifest when it has ``num_labels`` classes, else ``0..C-1``."""
    if ws.manifest.is_file():
        man = read_json(ws.manifest, "manifest")
        names = man.get("class_names")
        if isinstance(names, list) and len(names) == num_labels:
            return [str(n) for n in names], man.get("label_values")
        log.warning("the workspace manifest has %s classes, the model %d: labels are class ids",
                    len(names) if isinstance(names, list) else "no", num_labels)
    return [str(i) for i in range(num_labels)], None


# ---------------------------------------------------------------------------------------------


def _no_test_table(ws: Workspace) -> DataError:
    """Why the workspace has no test.arrow, and what to do about it."""
    if not ws.manifest.is_file():
        return DataError(f"no test table at {ws.test}: the workspace has no data yet",
                         "run `mlrnet corrupt` first, or pass --data")
    try:
        manifest = read_json(ws.manifest, "manifest")
        source = manifest.get("source") or {}
    except (ArtifactError, AttributeError):
        manifest, source = {}, {}
    origin = source.get("train") or "--data"
    if source.get("test"):
        why = f"`mlrnet corrupt` wrote one from {source['test']}, but it has been removed"
    elif manifest.get("test_fraction") == 0:
        why = f"`mlrnet corrupt` wrote none ({origin} has no test split and --test-fraction was 0)"
    else:
        why = f"`mlrnet corrupt` wrote none ({origin} has no test split)"
    return DataError(
        f"no test table at {ws.test}: {why}",
        "pass --data TABLE, or rerun `mlrnet corrupt --overwrite` with --test-data PATH or --test-fraction 0.2",
    )


def evaluate(
    config: EvalConfig,
    *,
    workdir: str | os.PathLike[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    predictions: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> EvalResult:
    """Evaluate a classifier on a labelled table; write ``eval/metrics.json`` (and ``eval/predictions.arrow``)."""
    import pyarrow as pa

    if config.batch_size < 1:
        raise ConfigError(f"--batch-size must be ≥ 1, got {config.batch_size}")
    if config.max_length is not None and config.max_length < 2:
        raise ConfigError(f"--max-length must be ≥ 2, got {config.max_length}")
    ws = Workspace.at(workdir)
    model_id = resolve_model(model, ws)
    data_path = Path(data) if data is not None else ws.test
    if not data_path.is_file():
        if data is None:
            raise _no_test_table(ws)
        raise DataError(f"no such file: {data_path}", "pass --data an Arrow, Parquet, CSV or JSONL file")
    out = Path(out_dir) if out_dir is not None else ws.eval
    paths = {"metrics": out / "metrics.json"}
    if predictions:
        paths["predictions"] = out / "predictions.arrow"

    unfinished = check_finished(model_id, config.allow_unfinished)
    max_length = resolve_max_length(config.max_length, trained_settings(model_id))
    inputs = {"model": modeling.model_fingerprint(model_id), "data": fingerprint_file(data_path)}
    # speed settings (batch size, device) are left out: a rerun with other ones replaces the same artifacts
    cfg = {k: v for k, v in asdict(config).items() if k not in ("batch_size", "device", "allow_unfinished")}
    cfg |= {"model": model_id, "data": str(data_path), "max_length": max_length}
    metas = {k: make_meta("eval", k, cfg, None, inputs) for k in paths}
    for k, p in paths.items():
        # a report of its inputs: rewritten when they changed (a retrained model/best, a new test.arrow)
        if guard_report(p, metas[k], about=("model", "data"),
                        inputs=[data_path, *([model_id] if Path(model_id).exists() else [])], overwrite=overwrite):
            log.info("replacing %s (made from other inputs or settings)", p)
        check_writable(p)

    device = modeling.select_device(config.device)
    clf, class_names, label_values = load_trained_classifier(model_id, ws, device)
    tokenizer = load_tokenizer(model_id)
    table, texts, labels = read_labelled_table(
        data_path, class_names, text_column=config.text_column, label_column=config.label_column,
        label_values=label_values,
    )
    log.info("evaluating %s on %d rows of %s (%s)", model_id, len(texts), data_path, device)
    token_ids = tokenize(tokenizer, texts, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inf = run_classifier(clf, token_ids, pad_id=pad_id, batch_size=config.batch_size, bf16=config.bf16,
                         progress=progress)
    probs = inf.probabilities
    predicted = probs.argmax(axis=1).astype(np.int64)
    report = metrics.classification_report(labels, predicted, len(class_names), class_names)
    report |= {"model": model_id, "data": str(data_path), "device": str(device), "max_length": max_length}
    if unfinished is not None:
        report["unfinished_training"] = unfinished
    write_json(paths["metrics"], {"mlrnet": metas["metrics"], **report})
    if predictions:
        ids = (table.column("sample_id").to_numpy(zero_copy_only=False).astype(np.int64)
               if "sample_id" in table.column_names else np.arange(len(texts), dtype=np.int64))
        pred_tbl = pa.table({
            "sample_id": pa.array(ids),
            "label": pa.array(labels),
            "predicted": pa.array(predicted),
            "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), len(class_names)),
        })
        names = {"label": class_names, "predicted": class_names}
        write_table(paths["predictions"], pred_tbl, metas["predictions"], class_names=names)
    return EvalResult(report, paths)
