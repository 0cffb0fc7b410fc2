"""Token-id and feature caches shared by every stage, and dynamic padding.

A table's texts are tokenized once (truncated, not padded) into ``<cache>/tokens-<key>.arrow``, keyed by
tokenizer, max length and the table's fingerprint; a frozen encoder's head-input features (``--freeze-encoder``)
are cached as ``<cache>/features-<key>.safetensors``. Batches are padded to their own longest row.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlrnet_cli import artifacts, locks
from mlrnet_cli.errors import ArtifactError, DataError
from mlrnet_cli.modeling import autocast_context, eval_mode, features_and_logits
from mlrnet_cli.progress import Progress
from mlrnet_cli.progress import get as get_progress

log = logging.getLogger("mlrnet")

_TOKENIZE_CHUNK = 4096


@dataclass(frozen=True)
class TokenCache:
    """Token ids of one table, row ``i`` = ``values[offsets[i]:offsets[i+1]]``, in the table's order."""

    path: Path
    key: str
    sample_ids: np.ndarray  # int64 [N]
    offsets: np.ndarray  # int64 [N+1]
    values: np.ndarray  # int32 [sum of lengths]

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per row (int64 [N])."""
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def rows(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> list[np.ndarray]:
        """Token id arrays of the given row positions (not sample ids)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        return [self.row(int(i)) for i in indices]

    def batch(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, pad_id: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pad_batch(self.rows(indices), pad_id)``."""
        return pad_batch(self.rows(indices), pad_id)


def clean_cache(cache_dir: str | os.PathLike[str]) -> None:
    """Remove temp files a killed run left in ``cache_dir``, unless another run holds the cache (it may be shared
    across workspaces, and a temp file there may be a live writer's: writers hold the cache shared)."""
    with locks.if_unused(Path(cache_dir)) as unused:
        if unused:
            artifacts.clean_stale_temps(cache_dir)


def tokenize_table(
    table_path: str | os.PathLike[str],
    tokenizer: Any,
    tokenizer_id: str,
    max_length: int,
    cache_dir: str | os.PathLike[str],
    *,
    table: Any = None,
) -> TokenCache:
    """Token ids of ``table_path``'s ``text`` column, read from ``cache_dir`` or computed once and cached.

    ``tokenizer_id`` names the tokenizer in the key (e.g. :func:`mlrnet_cli.modeling.model_fingerprint`);
    ``table`` may pass the already-read table to avoid reading it twice.
    """
    table_path = Path(table_path)
    table_fp = artifacts.fingerprint_file(table_path)
    config = {"tokenizer": tokenizer_id, "max_length": max_length}
    key = artifacts.fingerprint_obj({**config, "table": table_fp})  # the cache key: tokenizer, max length, table
    path = Path(cache_dir) / f"tokens-{key}.arrow"
    if path.is_file():
        try:
            cached = _load_tokens(path, key)
            log.debug("token cache hit: %s", path)
            return cached
        except (ArtifactError, KeyError, ValueError) as e:
            log.warning("token cache %s is unreadable (%s): tokenizing again", path, e)
    if table is None:
        table = artifacts.read_table(table_path, "table to tokenize")
    artifacts.require_columns(table, ["sample_id", "text"], table_path)
    texts = table.column("text").to_pylist()
    if bad := sum(t is None for t in texts):
        raise DataError(f"{table_path} has {bad} row(s) with no text", "drop or fill them before this stage")
    if any(not isinstance(t, str) for t in texts):
        raise DataError(f"{table_path}: column text must hold strings")
    sample_ids = np.array(table.column("sample_id").to_numpy(zero_copy_only=False), dtype=np.int64)

    pieces: list[list[int]] = []
    # a fast tokenizer keeps a call's truncation/padding in its state, and save_pretrained writes that state
    # into tokenizer.json: restore it, so a saved tokenizer has the same bytes whether this cache was hit or not
    backend = getattr(tokenizer, "_tokenizer", None)
    saved = (backend.truncation, backend.padding) if backend is not None else None
    opts = {"truncation": True, "max_length": max_length, "padding": False}
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = texts[start : start + _TOKENIZE_CHUNK]
        pieces.extend(tokenizer(chunk, **opts, return_attention_mask=False, return_token_type_ids=False)["input_ids"])
    if saved is not None:
        trunc, pad = saved
        backend.no_truncation() if trunc is None else backend.enable_truncation(**trunc)
        backend.no_padding() if pad is None else backend.enable_padding(**pad)
    import pyarrow as pa

    ids = pa.array(pieces, pa.list_(pa.int32()))
    out = pa.table({"sample_id": pa.array(sample_ids, pa.int64()), "input_ids": ids})
    meta = artifacts.make_meta("tokenize", "tokens", config=config, inputs={"table": table_fp}, key=key)
    with locks.shared(path.parent):  # a cleaner in a shared cache leaves our temp file alone
        artifacts.write_table(path, out, meta)
    log.debug("tokenized %d rows into %s", len(pieces), path)
    return _token_cache(path, key, sample_ids, ids)


def _load_tokens(path: Path, key: str) -> TokenCache:
    table = artifacts.read_table(path, "token cache")
    meta = artifacts.table_meta(table) or {}
    if meta.get("key") != key:
        raise ArtifactError(f"token cache {path} has key {meta.get('key')!r}, expected {key!r}")
    sample_ids = np.array(table.column("sample_id").to_numpy(), dtype=np.int64)
    return _token_cache(path, key, sample_ids, table.column("input_ids").combine_chunks())


def _token_cache(path: Path, key: str, sample_ids: np.ndarray, ids: Any) -> TokenCache:
    """A :class:`TokenCache` over an Arrow list array of token ids (its buffers, no copy)."""
    offsets = np.asarray(ids.offsets.to_numpy(), dtype=np.int64)
    values = np.asarray(ids.flatten().to_numpy(), dtype=np.int32)  # flatten(), unlike .values, honours a slice
    return TokenCache(path=path, key=key, sample_ids=sample_ids, offsets=offsets - offsets[0], values=values)


def pad_batch(rows: Sequence[Sequence[int] | np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id rows to the batch's longest row: ``(input_ids, attention_mask)``, both int64 [B, L]."""
    if len(rows) == 0:
        raise ValueError("pad_batch needs at least one row")
    width = max(max(len(r) for r in rows), 1)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def length_grouped_batches(lengths: Sequence[int] | np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row positions in batches of similar length (longest first, stable): less padding for no-grad passes."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def features_key(model_id: str, token_key: str) -> str:
    """Cache key of a feature cache: the model (fingerprint + anything that changes its weights) and tokens."""
    return artifacts.fingerprint_obj({"model": model_id, "tokens": token_key})


def encode_features(
    model: torch.nn.Module,
    token_cache: TokenCache,
    *,
    model_id: str,
    cache_dir: str | os.PathLike[str],
    pad_id: int = 0,
    batch_size: int = 64,
    device: torch.device | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Head-input features [N, H] (float32, CPU, token cache order) of the *frozen* encoder, cached on disk.

    ``model_id`` must identify the encoder weights (e.g. ``model_fingerprint(path)``); the cache lives at
    ``cache_dir/features-<key>.safetensors`` and is shared by ``collect-losses``, ``train`` and ``weights``.
    Runs in eval mode without gradients (no dropout); the model's train/eval mode is restored.
    """
    key = features_key(model_id, token_cache.key)
    path = Path(cache_dir) / f"features-{key}.safetensors"
    if path.is_file():
        try:
            tensors, meta = artifacts.read_tensors(path, "feature cache")
            feats, ids = tensors["features"], tensors["sample_id"]
            if meta.get("key") == key and torch.equal(ids, torch.tensor(token_cache.sample_ids)):
                log.debug("feature cache hit: %s", path)
                return feats
            log.warning("feature cache %s does not match its tokens: encoding again", path)
        except (ArtifactError, KeyError) as e:
            log.warning("feature cache %s is unreadable (%s): encoding again", path, e)

    device = device or next(model.parameters()).device
    n = len(token_cache)
    feats_out: torch.Tensor | None = None
    with eval_mode(model), get_progress(progress).task("encoding features", total=n) as task, torch.no_grad():
        for idx in length_grouped_batches(token_cache.lengths, batch_size):
            ids, mask = token_cache.batch(idx, pad_id)
            with autocast_context(device):
                f, _ = features_and_logits(model, ids.to(device), mask.to(device))
            f = f.float().cpu()
            if feats_out is None:
                feats_out = torch.empty((n, f.shape[1]), dtype=torch.float32)
            feats_out[torch.from_numpy(idx)] = f
            task.advance(len(idx))
    assert feats_out is not None  # n >= 1: empty tables are refused upstream
    meta = artifacts.make_meta(
        "encode", "features", config={"model": model_id}, inputs={"tokens": token_cache.key}, key=key
    )
    with locks.shared(path.parent):
        artifacts.write_tensors(path, {"features": feats_out, "sample_id": torch.tensor(token_cache.sample_ids)}, meta)
    return feats_out
