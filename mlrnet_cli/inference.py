"""Shared inference below the stages: load a trained classifier and run it over rows (logits, features).

Inference is batched and gradient-free; rows are grouped by token length so each batch is padded only to
its own longest row (dynamic padding), and runs under bf16 autocast on CUDA. `eval`, `weights` and
`predict` use it; ``--freeze-encoder`` models reuse the frozen encoder's cached features
(:func:`classify_tokens`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlrnet_cli import artifacts, modeling, stageio
from mlrnet_cli.errors import ArtifactError, DataError, ModelError
from mlrnet_cli.modeling import autocast_context
from mlrnet_cli.progress import Progress
from mlrnet_cli.progress import get as get_progress
from mlrnet_cli.tokens import TokenCache, encode_features, length_grouped_batches, pad_batch
from mlrnet_cli.workspace import Workspace

log = logging.getLogger("mlrnet")

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


def resolve_max_length(requested: int | None, settings: dict[str, Any]) -> int:
    """``--max-length`` when given, else the model's own (the one it was trained with), else 128."""
    if requested is not None:
        return requested
    recorded = settings.get("max_length")
    return int(recorded) if isinstance(recorded, int) and recorded >= 2 else DEFAULT_MAX_LENGTH


def report_config(
    config: Any, model_id: str, settings: dict[str, Any], drop: Sequence[str] = (), **about: Any
) -> dict[str, Any]:
    """The config a report (eval, weights, predict) records: ``config`` less its speed settings (a rerun with
    other ones replaces the same artifacts), the model, what else it is ``about``, and the max length
    (:func:`resolve_max_length` of the model's ``settings``)."""
    cfg = {k: v for k, v in asdict(config).items() if k not in ("batch_size", "device", "allow_unfinished", *drop)}
    return cfg | {"model": model_id, **about, "max_length": resolve_max_length(config.max_length, settings)}


def unfinished_training(model_dir: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(epochs done, epochs asked)`` when ``model_dir`` was saved by a `train` run that has not finished, else
    None. A run saves ``best`` and ``last`` after every epoch: ``last`` says how far the run got."""
    path = Path(model_dir)
    meta = modeling.stage_meta(path)
    if meta.get("stage") != "train" or not isinstance(meta.get("config"), dict):
        return None
    try:
        epochs, done = int(meta["config"]["epochs"]), int(meta["epoch"])
    except (KeyError, TypeError, ValueError):
        return None
    last = modeling.stage_meta(path.parent / "last") if path.name != "last" else {}
    if last and artifacts.provenance(last) == artifacts.provenance(meta) and isinstance(last.get("epoch"), int):
        done = max(done, last["epoch"])
    return (done, epochs) if done < epochs else None


def check_finished(model_id: str, allow_unfinished: bool) -> dict[str, int] | None:
    """Refuse a model of an unfinished training run (or, allowed, warn and return what to record about it)."""
    if (unfinished := unfinished_training(model_id)) is None:
        return None
    done, epochs = unfinished
    if not allow_unfinished:
        raise ArtifactError(
            f"{model_id} comes from an unfinished training run ({done} of {epochs} epochs done)",
            "rerun the same `mlrnet train` command to finish it, or pass --allow-unfinished to use it anyway",
        )
    log.warning(
        "%s comes from an UNFINISHED training run (%d of %d epochs done): its results are not those "
        "of the run you asked for",
        model_id,
        done,
        epochs,
    )
    return {"epochs_done": done, "epochs": epochs}


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


def read_text_table(
    path: str | os.PathLike[str], text_column: str | None, missing_hint: str, empty_hint: str | None = None
) -> tuple[Any, list[str]]:
    """(table, texts) of an Arrow/Parquet/CSV/JSON Lines file: the text column as `corrupt` finds it (joined
    when several), no null or empty text."""
    from mlrnet_cli.data import LOCAL_SUFFIXES, joined_text, load_source, resolve_text_columns

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}", missing_hint)
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise DataError(f"cannot read {path}: unknown file type {path.suffix!r}", "use Arrow, Parquet, CSV or JSONL")
    table = load_source(str(path)).table
    if table.num_rows == 0:
        raise DataError(f"{path} has no rows", empty_hint)
    cols = resolve_text_columns(table, [text_column] if text_column else None, str(path))
    return table, joined_text(table, cols, str(path))


def sample_ids(table: Any) -> np.ndarray | None:
    """A table's ``sample_id`` column as int64, or None when it has none."""
    if "sample_id" not in table.column_names:
        return None
    return table.column("sample_id").to_numpy(zero_copy_only=False).astype(np.int64)


def classify_texts(clf: Any, tokenizer: Any, texts: Sequence[str], max_length: int, **kwargs: Any) -> Inference:
    """:func:`run_classifier` (``kwargs``: its options) on raw texts, tokenized and truncated first."""
    pad_id = modeling.pad_token_id(tokenizer)
    return run_classifier(clf, tokenize(tokenizer, texts, max_length), pad_id=pad_id, **kwargs)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated, unpadded (padding happens per batch)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]


def iter_batches(
    token_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(row indices, input_ids, attention_mask) for length-grouped, dynamically padded batches."""
    for rows in length_grouped_batches([len(t) for t in token_ids], batch_size):
        yield rows, *pad_batch([token_ids[i] for i in rows], pad_id)


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
    out: dict[str, np.ndarray] = {}  # logits, features: float32 [n, ·], filled batch by batch
    with get_progress(progress).task(description, total=n) as task:
        for rows, input_ids, mask in iter_batches(token_ids, batch_size, pad_id):
            input_ids, mask = input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            with autocast_context(device, bf16):
                if with_features:
                    f, z = modeling.features_and_logits(model, input_ids, mask)
                else:
                    f, z = None, model(input_ids=input_ids, attention_mask=mask).logits
            for name, t in (("logits", z), ("features", f)):
                if t is not None:
                    t = t.float().cpu().numpy()
                    if name not in out:
                        out[name] = np.empty((n, t.shape[1]), dtype=np.float32)
                    out[name][rows] = t
            task.advance(len(rows))
    if "logits" not in out:
        raise DataError("no rows to run the classifier on")
    return Inference(out["logits"], out.get("features"))


# ---------------------------------------------------------------------------------------------
# labelled tables


def class_names_for(num_labels: int, ws: Workspace) -> tuple[list[str], list[Any] | None]:
    """Class names from the workspace manifest when it has ``num_labels`` classes, else ``0..C-1``."""
    if ws.manifest.is_file():
        man = stageio.read_manifest(ws.manifest)
        if man.num_classes == num_labels:
            return man.class_names, man.label_values
        log.warning(
            "the workspace manifest has %d classes, the model %d: labels are class ids", man.num_classes, num_labels
        )
    return [str(i) for i in range(num_labels)], None


@torch.no_grad()
def classify_tokens(
    clf: Any, tokens: TokenCache, model_dir: Path, train_cfg: dict[str, Any], ws: Workspace, **kwargs: Any
) -> Inference:
    """:func:`run_classifier` (``kwargs``: its options) over a token cache. A ``--freeze-encoder`` model (in its
    training config ``train_cfg``) reuses the cached features of the frozen encoder `train` read instead."""
    if not train_cfg.get("freeze_encoder"):
        return run_classifier(clf, tokens.rows(range(len(tokens))), **kwargs)
    init_path = str(train_cfg.get("model"))
    if train_cfg.get("init_from") == "stage1":
        init_path = str(ws.stage1 / "model") if (ws.stage1 / "model" / "config.json").is_file() else str(ws.stage1)
    saved = model_dir / "train_config.json"
    enc_id = artifacts.read_json(saved).get("encoder_cache_id") if saved.is_file() else None
    if not enc_id:
        enc_id = modeling.encoder_cache_id(clf, modeling.model_fingerprint(init_path), train_cfg.get("seed"))
    opts = {k: kwargs[k] for k in ("pad_id", "batch_size", "progress")}
    device = next(clf.parameters()).device
    feats = encode_features(clf, tokens, model_id=enc_id, cache_dir=ws.cache, device=device, **opts)
    logits = torch.cat([modeling.head_logits(clf, f.to(device)).float().cpu() for f in feats.split(4096)])
    return Inference(logits.numpy(), feats.numpy())
