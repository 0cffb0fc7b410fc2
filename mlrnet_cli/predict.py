"""`mlrnet predict`: label new, unlabelled text with a trained classifier.

The rows come from a table or from a list of texts (the CLI's stdin lines). Inference is the one `mlrnet eval`
runs (:mod:`mlrnet_cli.inference`), so a row gets the same probabilities here as in ``eval --predictions``;
token limit and batch size default to the ones the model was trained with. The output columns are described
in ``docs/predict.md``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlrnet_cli import artifacts, inference, modeling
from mlrnet_cli.configs import PredictConfig
from mlrnet_cli.errors import DataError, UsageError
from mlrnet_cli.progress import Progress
from mlrnet_cli.workspace import Workspace

log = logging.getLogger("mlrnet")

FORMATS = {"arrow": (".arrow", ".feather", ".ipc"), "jsonl": (".jsonl", ".ndjson", ".json")}
FALLBACK_BATCH_SIZE = 64


@dataclass
class PredictResult:
    """The predictions as an Arrow table (with its metadata), and the file written (None: nothing written)."""

    table: Any
    class_names: list[str]
    path: Path | None

    def json_lines(self) -> Iterator[str]:
        """The rows as JSON Lines (``probs`` keyed by class name), for stdout or a .jsonl file."""
        for rec in self.table.to_pylist():
            rec["probs"] = dict(zip(self.class_names, rec["probs"], strict=True))
            yield json.dumps(rec, ensure_ascii=False)


def text_lines(lines: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(texts, line indices) of stdin lines: blank lines are skipped, the others keep their line number."""
    rows = [(i, line.strip()) for i, line in enumerate(lines) if line.strip()]
    if not rows:
        raise DataError("no text on stdin (every line was empty)", "pipe one text per line, or pass --data FILE")
    return [t for _, t in rows], np.array([i for i, _ in rows], dtype=np.int64)


def output_format(out: Path | None, fmt: str | None) -> str:
    """``arrow`` or ``jsonl``: --format, else the --out suffix; stdout is always JSON Lines."""
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise UsageError(f"unknown --format {fmt!r}", "use arrow or jsonl")
        if out is None and fmt != "jsonl":
            raise UsageError("--format arrow needs --out FILE", "stdout carries JSON Lines")
        return fmt
    if out is None:
        return "jsonl"
    for name, suffixes in FORMATS.items():
        if out.suffix.lower() in suffixes:
            return name
    raise UsageError(
        f"cannot tell the output format of {out} from its suffix", "end it in .arrow or .jsonl, or pass --format"
    )


def predictions_table(
    texts: Sequence[str] | None, rows: np.ndarray, ids: np.ndarray | None, probs: np.ndarray, class_names: Sequence[str]
) -> Any:
    """The output table: row, [sample_id], [text], label, label_id, score, probs."""
    import pyarrow as pa

    label_id = probs.argmax(axis=1).astype(np.int64)
    cols: dict[str, Any] = {"row": pa.array(rows, pa.int64())}
    if ids is not None:
        cols["sample_id"] = pa.array(ids, pa.int64())
    if texts is not None:
        cols["text"] = pa.array(list(texts), pa.string())
    cols |= {
        "label": pa.array([class_names[i] for i in label_id], pa.string()),
        "label_id": pa.array(label_id),
        "score": pa.array(probs.max(axis=1).astype(np.float32)),
        "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.astype(np.float32).reshape(-1)), len(class_names)),
    }
    return pa.table(cols)


def write_predictions(result: PredictResult, meta: dict[str, Any], fmt: str) -> None:
    """Atomic write: Arrow with the metadata in its schema, or JSON Lines (a format without metadata)."""
    if fmt == "arrow":
        artifacts.write_table(result.path, result.table, meta, class_names={"label_id": result.class_names})
        return
    with artifacts.atomic_path(result.path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(line + "\n" for line in result.json_lines())


def predict(
    config: PredictConfig,
    *,
    workdir: str | os.PathLike[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    texts: Sequence[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    fmt: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PredictResult:
    """Predict the class of every row of ``data`` (a table) or of ``texts`` (one text per item, blanks skipped).

    Writes ``out`` (Arrow or JSON Lines, from ``fmt`` or the suffix) when given; the result holds the table.
    """
    if (data is None) == (texts is None):
        raise UsageError("give either a table (--data) or texts (stdin), not both or neither")
    config.validate()
    out_path = Path(out) if out is not None else None
    out_fmt = output_format(out_path, fmt)
    model_id = inference.resolve_model(model, Workspace.at(workdir))
    trained = modeling.trained_settings(model_id)
    batch_size = config.batch_size or int(trained.get("batch_size") or FALLBACK_BATCH_SIZE)
    cfg = inference.report_config(config, model_id, trained, data=str(data) if data is not None else "<texts>")
    max_length = cfg["max_length"]

    if data is not None:
        table, items = inference.read_text_table(
            data, config.text_column, "pass --data a table, or - for stdin", "nothing to predict"
        )
        ids, rows = inference.sample_ids(table), np.arange(len(items), dtype=np.int64)
        data_fp = artifacts.fingerprint_file(data)
    else:
        items, rows = text_lines(list(texts or []))
        ids, data_fp = None, artifacts.fingerprint_obj(items)
    num_labels = inference.model_num_labels(model_id)
    inputs = {"model": modeling.model_fingerprint(model_id), "data": data_fp}
    meta = artifacts.make_meta("predict", "predictions", cfg, None, inputs)
    if out_path is not None:
        artifacts.guard_output(
            out_path, meta, inputs=[p for p in (data, model_id) if p is not None], overwrite=overwrite
        )
        artifacts.check_writable(out_path)

    device = modeling.select_device(config.device)
    clf = modeling.load_classifier(model_id, num_labels).to(device).eval()
    class_names = [str(clf.config.id2label.get(i, i)) for i in range(num_labels)]
    log.info("predicting %d rows with %s (%s, max length %d)", len(items), model_id, device, max_length)
    tok = modeling.load_tokenizer(model_id)
    inf = inference.classify_texts(
        clf, tok, items, max_length, batch_size=batch_size, bf16=config.bf16, progress=progress, description="predict"
    )
    table = predictions_table(items if config.with_text else None, rows, ids, inf.probabilities, class_names)
    meta["class_names"] = class_names
    table = table.replace_schema_metadata({artifacts.META_KEY: json.dumps(meta, sort_keys=True, default=str)})
    result = PredictResult(table, class_names, out_path)
    if out_path is not None:
        write_predictions(result, meta, out_fmt)
    return result
