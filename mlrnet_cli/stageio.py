"""Stage I/O: the artifacts stages hand each other, read and checked once, and the one model-folder writer.

Every stage reads the same train/clean tables (:func:`read_rows`), the manifest (:func:`read_manifest`) and
the stage-1 loss curves aligned to a table's rows (:func:`read_curves`); every model folder is written by
:func:`write_model_folder` (built in a temp folder, swapped in whole).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlrnet_cli import artifacts
from mlrnet_cli.errors import ArtifactError, DataError, FingerprintMismatchError

if TYPE_CHECKING:
    import pyarrow as pa
    import torch


@dataclass(frozen=True)
class Rows:
    """A stage table (``train.arrow``, ``clean.arrow``, a dev table), checked: unique ids, integer labels."""

    path: Path
    table: pa.Table
    sample_ids: np.ndarray  #: int64
    labels: np.ndarray  #: int64 class ids (the observed labels)
    is_noisy: np.ndarray | None  #: bool, None unless the table knows it for every row
    true_labels: np.ndarray | None  #: int64, -1 where unknown; None when no row's truth is known

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def texts(self) -> list[str]:
        return [str(t) for t in self.table.column("text").to_pylist()]

    def fingerprint(self) -> str:
        return artifacts.fingerprint_file(self.path)


def read_rows(path: str | os.PathLike[str], what: str = "training table", num_classes: int | None = None) -> Rows:
    """Read and check a stage table; labels must lie in ``0..num_classes-1`` when ``num_classes`` is given."""
    import pyarrow as pa

    path = Path(path)
    table = artifacts.read_table(path, what)
    artifacts.require_columns(table, ["sample_id", "text", "label"], path)
    if table.num_rows == 0:
        raise DataError(f"{what} {path} has no rows")
    for col in ("sample_id", "label"):
        column = table.column(col)
        if column.null_count:
            raise DataError(f"{what} {path}: column {col} has missing values")
        if not pa.types.is_integer(column.type):
            raise DataError(
                f"{what} {path}: column {col} must hold integers (class ids for label), it holds {column.type}",
                "use the tables `mlrnet corrupt` writes (it maps class names to ids)",
            )
    ids = _ints(table.column("sample_id"))
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{what} {path} has duplicate sample_id values")
    labels = _ints(table.column("label"))
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{what} {path}: labels must be in 0..{num_classes - 1} (the manifest's classes), "
            f"found {labels.min()}..{labels.max()}"
        )
    noisy = None
    if "is_noisy" in table.column_names and table.column("is_noisy").null_count == 0:
        noisy = np.asarray(table.column("is_noisy").to_numpy(zero_copy_only=False), dtype=bool)
    true = None
    if "true_label" in table.column_names:
        col = table.column("true_label")
        if pa.types.is_integer(col.type) and col.null_count < table.num_rows:
            true = _ints(col.fill_null(-1))
    return Rows(path, table, ids, labels, noisy, true)


def _ints(column: Any) -> np.ndarray:
    return np.array(column.to_numpy(zero_copy_only=False), dtype=np.int64)


@dataclass(frozen=True)
class Manifest:
    """``data/manifest.json`` as the later stages need it."""

    num_classes: int
    class_names: list[str]
    label_values: list[Any] | None = None


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    manifest = artifacts.read_json(path, "manifest")
    try:
        num_classes = int(manifest["num_classes"])
        names = [str(n) for n in manifest.get("class_names") or range(num_classes)]
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"manifest {path} has no num_classes", "run `mlrnet corrupt` again") from e
    if len(names) != num_classes:
        raise ArtifactError(f"manifest {path}: {len(names)} class_names for num_classes={num_classes}")
    return Manifest(num_classes, names, manifest.get("label_values"))


@dataclass(frozen=True)
class Curves:
    """Stage-1 loss curves ``L_i`` (float32 [N, T+1]) in the order of a table's rows."""

    losses: torch.Tensor
    meta: dict[str, Any]
    fingerprint: str

    @property
    def model(self) -> str | None:
        """The model collect-losses fine-tuned (the default model of `train`)."""
        return (self.meta.get("config") or {}).get("model") or self.meta.get("model")


def read_curves(path: str | os.PathLike[str], rows: Rows) -> Curves:
    """``losses.safetensors`` joined to ``rows`` by sample_id; refuses curves of another training table."""
    import torch

    path = Path(path)
    tensors, meta = artifacts.read_tensors(path, "loss curves")
    artifacts.require_meta(meta, path)
    recorded, train_fp = (meta.get("inputs") or {}).get("train"), rows.fingerprint()
    if recorded is not None and recorded != train_fp:
        raise FingerprintMismatchError(
            f"the loss curves in {path} were collected on a different training table (fingerprint {recorded}, "
            f"{rows.path} is {train_fp}): no loss curve is known to fit its rows",
            "rerun `mlrnet collect-losses` on this training table",
        )
    if "losses" not in tensors or "sample_id" not in tensors:
        raise ArtifactError(f"{path} lacks the `losses` or `sample_id` tensor")
    curve_ids = tensors["sample_id"].numpy().astype(np.int64)
    index = {int(s): i for i, s in enumerate(curve_ids)}
    missing = [int(s) for s in rows.sample_ids if int(s) not in index]
    if missing or len(index) != len(curve_ids) or len(curve_ids) != len(rows):
        example = f" (e.g. sample_id {missing[0]})" if missing else ""
        raise FingerprintMismatchError(
            f"the loss curves in {path} do not match the training rows: no loss curve for {len(missing)} training "
            f"row(s){example}, {len(curve_ids)} curves for {len(rows)} rows",
            "rerun `mlrnet collect-losses` on this training table",
        )
    order = torch.tensor([index[int(s)] for s in rows.sample_ids], dtype=torch.long)
    losses = tensors["losses"].float()[order]
    if losses.ndim != 2 or not torch.isfinite(losses).all():
        raise DataError(f"{path}: the `losses` tensor must be a finite [N, T+1] matrix")
    return Curves(losses, meta, artifacts.fingerprint_file(path))


def write_model_folder(
    target: Path,
    model: Any,
    tokenizer: Any,
    files: Mapping[str, Callable[[Path], Any]],
    *,
    keep: Sequence[str] = (),
    frozen: tuple[str, Sequence[Path]] | None = None,
) -> None:
    """``save_pretrained`` (safetensors) + tokenizer + ``files`` (name -> writer of that path), in a temp folder
    beside ``target`` swapped in whole; the old folder's ``keep`` entries (a resume state) move across.
    ``frozen`` (a frozen encoder: the head's prefix, and folders that may hold the same encoder) stores the
    encoder as a shard of its own, hard-linked to an identical one (:func:`artifacts.split_frozen_weights`)."""
    from safetensors import SafetensorError

    tmp = target.parent / f"{artifacts.TMP_PREFIX}{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if frozen is not None:
            artifacts.split_frozen_weights(tmp, frozen[0], list(frozen[1]))
        tokenizer.save_pretrained(tmp)
        for name, write in files.items():
            write(tmp / name)
        artifacts.follow_umask(tmp)
    except (OSError, SafetensorError, ArtifactError) as e:  # a full disk, mostly
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"cannot write {target}: {e}", "check free space and permissions") from e
    swap_folder(tmp, target, keep)


def swap_folder(tmp: Path, target: Path, keep: Sequence[str] = ()) -> None:
    """Put the finished folder ``tmp`` in ``target``'s place; the old folder's ``keep`` entries move across."""
    old = target.parent / f"{artifacts.TMP_PREFIX}{target.name}-old"
    shutil.rmtree(old, ignore_errors=True)
    for name in keep:
        if (target / name).exists():
            os.replace(target / name, tmp / name)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def json_file(obj: Any) -> Callable[[Path], None]:
    """A ``files`` writer for :func:`write_model_folder`."""
    return lambda p: artifacts.write_json(p, obj)


def clean_stale(outputs: Sequence[Path]) -> None:
    """Remove what a killed writer of ``outputs`` left: temp siblings of each, and temps inside the folders."""
    for out in outputs:
        for p in out.parent.glob(f"{artifacts.TMP_PREFIX}{out.name}*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        artifacts.clean_stale_temps(out)
