"""The artifact contract: self-describing Arrow tables and safetensors files, written atomically.

Every artifact carries, under the metadata key ``mlrnet``, a JSON object::

    {"format_version": 1, "mlrnet_version": "...", "stage": "corrupt", "kind": "train",
     "config": {...}, "seed": 0, "inputs": {"name": "<fingerprint>", ...}}

The fingerprint of an artifact is the SHA-256 of its bytes (first 16 hex digits): artifacts hold no
timestamps, so the same inputs and seed give the same bytes and the same fingerprint. See
``docs/artifacts.md``.
"""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlrnet_cli import __version__
from mlrnet_cli.errors import ArtifactError, ArtifactExistsError, DataError, UsageError

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

log = logging.getLogger("mlrnet")

FORMAT_VERSION = 1
META_KEY = "mlrnet"
TMP_PREFIX = ".mlrnet-tmp-"


def fingerprint_bytes(data: bytes) -> str:
    """Short content hash used to chain artifacts."""
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint_file(path: str | os.PathLike[str]) -> str:
    """Content fingerprint of a file (or, for a folder, of its files' names and bytes in sorted order)."""
    path = Path(path)
    if path.is_dir():
        return fingerprint_files(path, sorted(p for p in path.rglob("*") if p.is_file()))
    return fingerprint_files(None, [path])


def fingerprint_files(root: Path | None, files: list[Path]) -> str:
    """SHA-256 (16 hex digits) of ``files`` in order: each one's path relative to ``root`` (when given), then
    its bytes."""
    h = hashlib.sha256()
    for f in files:
        if root is not None:
            h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def fingerprint_obj(obj: Any) -> str:
    """Fingerprint of a JSON-serialisable object (configs, lists of ids)."""
    return fingerprint_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def make_meta(
    stage: str,
    kind: str,
    config: Mapping[str, Any] | None = None,
    seed: int | None = None,
    inputs: Mapping[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The metadata object every artifact carries."""
    return {
        "format_version": FORMAT_VERSION,
        "mlrnet_version": __version__,
        "stage": stage,
        "kind": kind,
        "config": dict(config or {}),
        "seed": seed,
        "inputs": dict(inputs or {}),
        **extra,
    }


def provenance(meta: Mapping[str, Any]) -> str:
    """What makes two artifacts 'the same run': stage, config, seed and inputs (not the version)."""
    return fingerprint_obj({k: meta.get(k) for k in ("stage", "kind", "config", "seed", "inputs")})


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync and ``os.replace`` it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(
            f"cannot create folder {path.parent}: {e.strerror}", "choose another output path or check permissions"
        ) from e
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    except OSError as e:  # a read-only folder: the temp file beside the target cannot be made
        raise ArtifactError(
            f"cannot write {path}: {e.strerror or e}", "check permissions or choose another output folder"
        ) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp made it 0600; artifacts are shared as other files
        os.replace(tmp_path, path)
    except OSError as e:
        raise ArtifactError(f"cannot write {path}: {e.strerror or e}", "check free space and permissions") from e
    finally:
        tmp_path.unlink(missing_ok=True)  # gone already once it was renamed into place


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: str | os.PathLike[str]) -> None:
    """Give ``folder`` and everything in it the modes a plain ``open``/``mkdir`` would (0666/0777 less the umask):
    some writers (``save_pretrained``'s safetensors file) make theirs 0600, unreadable in a shared workspace."""
    mask = current_umask()
    for p in [Path(folder), *Path(folder).rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomic, deterministic JSON (sorted keys, trailing newline)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes((json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{what} {path} is not valid JSON: {e}") from e


def clean_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temp files and folders left by a killed writer (they never look like artifacts, but take space)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.rglob(TMP_PREFIX + "*") if not any(a.name.startswith(TMP_PREFIX) for a in p.parents)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail before the work, not after it: ``path``'s first existing ancestor must be a writable folder."""
    path = Path(path).absolute()
    anc = next(a for a in (path, *path.parents) if a.exists())  # the root at the latest
    if anc != path and not anc.is_dir():
        raise ArtifactError(f"cannot create {path}: {anc} is a file, not a folder", "choose another output path")
    folder = anc if anc.is_dir() else anc.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArtifactError(
            f"cannot write {path}: {folder} is not writable", "check permissions or choose another output path"
        )


def guard_output(
    path: str | os.PathLike[str],
    meta: Mapping[str, Any],
    *,
    inputs: Iterator[str | os.PathLike[str]] | list[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    read_meta: Callable[[Path], Mapping[str, Any] | None] | None = None,
) -> None:
    """Refuse to write over an input, or over an artifact from a different run unless ``overwrite``."""
    path = Path(path).resolve()
    if any(Path(inp).resolve() == path for inp in inputs):
        raise UsageError(f"output {path} is also an input: refusing to overwrite an input")
    if overwrite or not path.exists():
        return
    old = None
    with contextlib.suppress(ArtifactError):
        old = (read_meta or read_any_meta)(path)
    if old is None or provenance(old) != provenance(meta):
        raise ArtifactExistsError(
            f"{path} exists and was made by a different run",
            "pass --overwrite to replace it, or choose another --workdir",
        )


def guard_report(
    path: str | os.PathLike[str],
    meta: Mapping[str, Any],
    *,
    about: Sequence[str],
    inputs: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> bool:
    """:func:`guard_output` for a derived report (eval metrics, the weights table): a report of the same
    stage and kind about the same things (the config keys ``about``, e.g. the model and data paths) is
    rewritten without ``overwrite`` when the contents of those inputs or the settings changed, since it only
    describes them (an edited pipeline reran the stages before it).

    A report about something else (another model or table), a file mlrnet did not write, or an input is
    refused as by :func:`guard_output`. Returns True (and logs it) when an older report will be replaced."""
    p = Path(path)
    replace_old = False
    if not overwrite and p.exists() and not any(Path(i).resolve() == p.resolve() for i in inputs):
        old = None
        with contextlib.suppress(ArtifactError):
            old = read_any_meta(p.resolve())
        if old and all(old.get(k) == meta.get(k) for k in ("stage", "kind")):
            old_cfg, new_cfg = old.get("config") or {}, meta.get("config") or {}
            replace_old = all(old_cfg.get(k) == new_cfg.get(k) for k in about) and provenance(old) != provenance(meta)
    guard_output(p, meta, inputs=list(inputs), overwrite=overwrite or replace_old)
    if replace_old:
        log.info("replacing %s (made from other inputs or settings)", path)
    return replace_old


def read_any_meta(path: Path) -> dict[str, Any] | None:
    """Metadata of an .arrow, .safetensors, .json artifact or model folder, or None if it has none."""
    if path.is_dir():
        path = path / "mlrnet.json"
    if path.suffix == ".arrow":
        return read_table_meta(path)
    if path.suffix == ".safetensors":
        return read_tensors_meta(path)
    if path.suffix == ".json" and path.is_file():
        obj = read_json(path)
        return obj.get(META_KEY) if isinstance(obj, dict) else None
    return None


def write_table(
    path: str | os.PathLike[str],
    table: pa.Table,
    meta: Mapping[str, Any],
    *,
    class_names: Mapping[str, list[str]] | None = None,
) -> str:
    """Write ``table`` atomically as an Arrow IPC stream (the format ``datasets`` itself writes) with ``meta`` in
    its schema metadata; return its fingerprint.

    ``class_names`` maps label columns to names so ``datasets`` sees them as ``ClassLabel``.
    """
    import pyarrow as pa

    schema_meta = dict(table.schema.metadata or {})
    schema_meta[META_KEY.encode()] = json.dumps(meta, sort_keys=True, default=str).encode()
    if class_names:
        from datasets import ClassLabel, Features

        features = Features.from_arrow_schema(table.schema)
        for col, names in class_names.items():
            if col in features:
                features[col] = ClassLabel(names=list(names))
        schema_meta[b"huggingface"] = json.dumps({"info": {"features": features.to_dict()}}, sort_keys=True).encode()
    table = table.replace_schema_metadata(schema_meta)
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=64 * 1024)
    return fingerprint_file(path)


def read_table(path: str | os.PathLike[str], what: str = "table") -> pa.Table:
    """Read an mlrnet Arrow artifact (stream or file IPC format)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path}", "run the previous stage first or pass its path")
    return _read_ipc(path, lambda reader: reader.read_all(), f"{what} {path}")


def _read_ipc(path: str | os.PathLike[str], read: Callable[[Any], Any], what: str) -> Any:
    """``read(reader)`` of an Arrow IPC file in the stream format (what mlrnet writes) or the file format."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as src:
            try:
                return read(pa.ipc.open_stream(src))
            except pa.ArrowInvalid:
                src.seek(0)
                return read(pa.ipc.open_file(src))
    except (pa.ArrowInvalid, OSError) as e:
        raise ArtifactError(f"{what} is not a readable Arrow file: {e}") from e


def table_meta(table: pa.Table) -> dict[str, Any] | None:
    raw = (table.schema.metadata or {}).get(META_KEY.encode())
    return json.loads(raw) if raw else None


def read_table_meta(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    return table_meta(_read_ipc(path, lambda reader: reader.schema.empty_table(), str(path)))


def write_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> str:
    """Write tensors atomically with ``meta`` as safetensors metadata; return the file's fingerprint."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                str(tmp),
                metadata={META_KEY: json.dumps(meta, sort_keys=True, default=str)},
            )
        except SafetensorError as e:  # safetensors reports I/O errors (a full disk) as its own type
            raise ArtifactError(f"cannot write {path}: {e}", "check free space and permissions") from e
    return fingerprint_file(path)


def read_tensors(path: str | os.PathLike[str], what: str = "tensor file") -> tuple[dict[str, torch.Tensor], dict]:
    """Load a safetensors artifact and its mlrnet metadata (empty dict if foreign)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path}", "run the previous stage first or pass its path")
    try:
        return load_file(str(path)), read_tensors_meta(path) or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{what} {path} is truncated or not a safetensors file: {e}") from e


def read_tensors_meta(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path} is truncated or not a safetensors file: {e}") from e
    return json.loads(raw) if raw else None


FROZEN_SHARD = "model-encoder.safetensors"
HEAD_SHARD = "model-head.safetensors"


def split_frozen_weights(folder: Path, head_prefix: str, link_from: list[Path] | tuple[Path, ...] = ()) -> None:
    """Store ``folder/model.safetensors`` of a frozen-encoder model as two shards, the unchanging encoder and the
    trained head (a ``model.safetensors.index.json`` that ``from_pretrained`` reads), and hard-link the encoder
    shard to a byte-identical one in ``link_from`` (``stage1/``, ``model/best``, ``model/last``): the frozen
    encoder is then stored once, not once per folder. Artifacts are never written in place (always a new file
    renamed over the old), so a linked file never changes under another folder."""
    from safetensors.torch import load_file, save_file

    whole = folder / "model.safetensors"
    tensors = load_file(str(whole))
    parts = {
        FROZEN_SHARD: {k: v for k, v in tensors.items() if not k.startswith(head_prefix)},
        HEAD_SHARD: {k: v for k, v in tensors.items() if k.startswith(head_prefix)},
    }
    if not parts[FROZEN_SHARD] or not parts[HEAD_SHARD]:
        return
    for name, part in parts.items():
        save_file(part, str(folder / name), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {k: name for name, part in parts.items() for k in sorted(part)},
    }
    write_json(folder / "model.safetensors.index.json", index)
    whole.unlink()
    shard = folder / FROZEN_SHARD
    for other in (Path(d) / FROZEN_SHARD for d in link_from):
        if other.is_file() and filecmp.cmp(other, shard, shallow=False):
            tmp = folder / f"{TMP_PREFIX}{FROZEN_SHARD}.link"
            tmp.unlink(missing_ok=True)
            try:
                os.link(other, tmp)
            except OSError:  # another file system, or no hard links: keep the copy
                continue
            os.replace(tmp, shard)
            return


def require_meta(meta: Mapping[str, Any] | None, path: str | os.PathLike[str], stage: str | None = None) -> dict:
    """Check an artifact is mlrnet's and of a format version this release reads."""
    if not meta:
        raise ArtifactError(f"{path} has no mlrnet metadata: it was not written by mlrnet")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {meta.get('format_version')}, this mlrnet reads {FORMAT_VERSION}"
        )
    if stage is not None and meta.get("stage") != stage:
        raise ArtifactError(f"{path} was written by stage {meta.get('stage')!r}, expected {stage!r}")
    return dict(meta)


def require_columns(table: pa.Table, columns: list[str], path: str | os.PathLike[str]) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {', '.join(missing)}", f"it has {', '.join(table.column_names) or 'no columns'}"
        )
