"""`mlrnet eval`: accuracy (the paper's metric), F1s, per-class scores and the confusion matrix of a classifier,
through the inference `weights` and `predict` share (:mod:`mlrnet_cli.inference`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlrnet_cli import artifacts, inference, metrics, modeling
from mlrnet_cli.configs import EvalConfig
from mlrnet_cli.data import raw_labels
from mlrnet_cli.errors import ArtifactError, DataError
from mlrnet_cli.progress import Progress
from mlrnet_cli.workspace import Workspace

log = logging.getLogger("mlrnet")

MISSING_HINT = "pass --data an Arrow, Parquet, CSV or JSONL file"


@dataclass
class EvalResult:
    """What `evaluate` returns: the metrics (as in eval/metrics.json) and the files written."""

    metrics: dict[str, Any]
    paths: dict[str, Path]


def encode_labels(
    raw: Sequence[Any], class_names: Sequence[str], label_values: Sequence[Any] | None, origin: str
) -> np.ndarray:
    """Integer labels must be class ids; strings are class names (or the source's original label values)."""
    c = len(class_names)
    index = {str(v): i for i, v in enumerate(label_values or ())} | {str(n): i for i, n in enumerate(class_names)}
    out = np.empty(len(raw), dtype=np.int64)
    for i, v in enumerate(raw):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            if str(v) in index:
                out[i] = index[str(v)]
                continue
            if not str(v).lstrip("-").isdigit():
                raise DataError(
                    f"{origin} row {i} has label {v!r}, which is not a class of this model",
                    f"classes: {', '.join(map(str, class_names[:10]))}",
                )
            v = int(str(v))
        if not 0 <= int(v) < c:
            raise DataError(f"{origin} row {i} has label {v}, outside 0..{c - 1}")
        out[i] = int(v)
    return out


def _no_test_table(ws: Workspace) -> DataError:
    """Why the workspace has no test.arrow, and what to do about it."""
    if not ws.manifest.is_file():
        return DataError(
            f"no test table at {ws.test}: the workspace has no data yet", "run `mlrnet corrupt` first, or pass --data"
        )
    try:
        manifest = artifacts.read_json(ws.manifest, "manifest")
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

    config.validate()
    ws = Workspace.at(workdir)
    model_id = inference.resolve_model(model, ws)
    data_path = Path(data) if data is not None else ws.test
    if not data_path.is_file():
        if data is None:
            raise _no_test_table(ws)
        raise DataError(f"no such file: {data_path}", MISSING_HINT)
    out = Path(out_dir) if out_dir is not None else ws.eval
    paths = {"metrics": out / "metrics.json"} | ({"predictions": out / "predictions.arrow"} if predictions else {})

    unfinished = inference.check_finished(model_id, config.allow_unfinished)
    cfg = inference.report_config(config, model_id, modeling.trained_settings(model_id), data=str(data_path))
    inputs = {"model": modeling.model_fingerprint(model_id), "data": artifacts.fingerprint_file(data_path)}
    metas = {k: artifacts.make_meta("eval", k, cfg, None, inputs) for k in paths}
    read = [data_path, *([model_id] if Path(model_id).exists() else [])]
    for k, p in paths.items():
        # a report of its inputs: rewritten when they changed (a retrained model/best, a new test.arrow)
        artifacts.guard_report(p, metas[k], about=("model", "data"), inputs=read, overwrite=overwrite)
        artifacts.check_writable(p)

    device = modeling.select_device(config.device)
    clf, class_names, label_values = inference.load_trained_classifier(model_id, ws, device)
    tokenizer = modeling.load_tokenizer(model_id)
    table, texts = inference.read_text_table(data_path, config.text_column, MISSING_HINT)
    raw = raw_labels(table, config.label_column, str(data_path))
    labels = encode_labels(raw, class_names, label_values, str(data_path))
    log.info("evaluating %s on %d rows of %s (%s)", model_id, len(texts), data_path, device)
    probs = inference.classify_texts(
        clf, tokenizer, texts, cfg["max_length"], batch_size=config.batch_size, bf16=config.bf16, progress=progress
    ).probabilities
    predicted = probs.argmax(axis=1).astype(np.int64)
    report = metrics.classification_report(labels, predicted, len(class_names), class_names)
    report |= {"model": model_id, "data": str(data_path), "device": str(device), "max_length": cfg["max_length"]}
    if unfinished is not None:
        report["unfinished_training"] = unfinished
    artifacts.write_json(paths["metrics"], {"mlrnet": metas["metrics"], **report})
    if predictions:
        ids = inference.sample_ids(table)
        ids = np.arange(len(texts), dtype=np.int64) if ids is None else ids
        probabilities = pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), len(class_names))
        cols = {"sample_id": ids, "label": labels, "predicted": predicted, "probabilities": probabilities}
        names = {"label": class_names, "predicted": class_names}
        artifacts.write_table(paths["predictions"], pa.table(cols), metas["predictions"], class_names=names)
    return EvalResult(report, paths)
