"""Reading labelled text tables: the embedded AG News sample, local files, or a dataset on the hub."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlrnet_cli.artifacts import fingerprint_file, fingerprint_obj, read_table
from mlrnet_cli.errors import DataError, HubUnavailableError

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("mlrnet")

EMBEDDED = "embedded:ag_news_sample"
LOCAL_SUFFIXES = {".parquet", ".pq", ".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".arrow", ".feather", ".ipc"}


@dataclass
class Source:
    """A loaded table, where it came from, and its fingerprint."""

    table: pa.Table
    origin: str
    fingerprint: str
    class_names: list[str] | None = None


def embedded_dir() -> Path:
    return Path(str(resources.files("mlrnet_cli") / "resources" / "ag_news_sample"))


def load_source(spec: str | None, split: str = "train") -> Source:
    """Load ``spec``: None (embedded sample), a local file/folder, or a hub dataset name."""
    if spec is None or spec == EMBEDDED:
        path = embedded_dir() / f"{'test' if split == 'test' else 'train'}.parquet"
        names = json.loads((embedded_dir() / "classes.json").read_text())
        return Source(_read_local(path), f"{EMBEDDED}/{path.name}", fingerprint_file(path), names)
    path = Path(spec)
    if path.is_dir():
        return _read_folder(path, split)
    if path.exists():
        return Source(_read_local(path), str(path), fingerprint_file(path))
    if path.suffix.lower() in LOCAL_SUFFIXES or "/" in spec and spec.startswith((".", "/", "~")):
        raise DataError(f"no such file: {spec}")
    return _read_hub(spec, split)


def _read_local(path: Path) -> pa.Table:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    try:
        if suffix in {".parquet", ".pq"}:
            table = pq.read_table(path)
        elif suffix in {".csv", ".tsv"}:
            opts = pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            table = pcsv.read_csv(path, parse_options=opts)
        elif suffix in {".json", ".jsonl", ".ndjson"}:
            table = pjson.read_json(path)
        elif suffix in {".arrow", ".feather", ".ipc"}:
            table = read_table(path)
        else:
            raise DataError(
                f"cannot read {path}: unknown file type {suffix!r}",
                "use Parquet, CSV, JSON Lines, Arrow, or a datasets.save_to_disk folder",
            )
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {str(e).splitlines()[0]}") from e
    return table.replace_schema_metadata(None)


def _read_folder(path: Path, split: str) -> Source:
    """A ``datasets.save_to_disk`` folder (Dataset or DatasetDict)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{path} is not a datasets.save_to_disk folder: {str(e).splitlines()[0]}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path} has no split {split!r}", f"it has {', '.join(ds)}")
        ds = ds[split]
    table = ds.data.table.replace_schema_metadata(None)
    return Source(table, f"{path}[{split}]", fingerprint_file(path), _class_label_names(ds))


def _class_label_names(ds: Any) -> list[str] | None:
    import datasets

    return next((list(f.names) for f in ds.features.values() if isinstance(f, datasets.ClassLabel)), None)


def _read_hub(name: str, split: str) -> Source:
    import datasets

    quiet = {lg: lg.level for lg in map(logging.getLogger, ("huggingface_hub", "datasets", "urllib3"))}
    try:
        for lg in quiet:  # the hub's retry warnings would bury our one-line error
            lg.setLevel(logging.ERROR)
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub raises many types; any failure here is "could not get it"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubUnavailableError(
            f"cannot load dataset {name!r} (split {split!r}) from the hub: {msg}",
            "offline? pass a local file or folder with --data",
        ) from e
    finally:
        for lg, level in quiet.items():
            lg.setLevel(level)
    fp = fingerprint_obj({"hub": name, "split": split, "fingerprint": getattr(ds, "_fingerprint", None)})
    return Source(ds.data.table.replace_schema_metadata(None), f"hub:{name}[{split}]", fp, _class_label_names(ds))


def has_hub_split(spec: str | None, split: str) -> bool:
    """Whether ``spec`` (a folder or hub name) provides ``split`` (used to find a test split)."""
    if spec is None:
        return True
    path = Path(spec)
    if path.is_dir():
        return (path / split).is_dir()
    return not path.exists() and path.suffix.lower() not in LOCAL_SUFFIXES


DEFAULT_TEXT_COLUMNS = ("text", "sentence", "content")


def resolve_text_columns(table: pa.Table, text_columns: list[str] | None, origin: str) -> list[str]:
    if text_columns:
        missing = [c for c in text_columns if c not in table.column_names]
        if missing:
            raise DataError(
                f"{origin} has no column {missing[0]!r}", f"its columns are {', '.join(table.column_names)}"
            )
        return list(text_columns)
    for c in DEFAULT_TEXT_COLUMNS:
        if c in table.column_names:
            return [c]
    raise DataError(
        f"{origin} has no text column (looked for {', '.join(DEFAULT_TEXT_COLUMNS)})",
        f"pass --text-column; its columns are {', '.join(table.column_names)}",
    )


def joined_text(table: pa.Table, columns: list[str], origin: str) -> list[str]:
    """Join the text columns with a space per row (e.g. title + description); refuse null/empty text."""
    cols = [table.column(c).to_pylist() for c in columns]
    out: list[str] = []
    for i, parts in enumerate(zip(*cols, strict=True)):
        if any(p is None or (isinstance(p, float) and math.isnan(p)) for p in parts):
            raise DataError(
                f"{origin} row {i} has no text (null/NaN in {', '.join(columns)})", "drop or fill empty rows first"
            )
        text = " ".join(str(p) for p in parts).strip()
        if not text:
            raise DataError(f"{origin} row {i} has empty text", "drop or fill empty rows first")
        out.append(text)
    return out


def read_columns(src: Source, text_columns: Sequence[str], label_column: str) -> tuple[list[str], list[str], list[Any]]:
    """(text columns, their texts joined per row, raw labels) of ``src``; no text columns given: the default one."""
    cols = resolve_text_columns(src.table, list(text_columns), src.origin)
    return cols, joined_text(src.table, cols, src.origin), raw_labels(src.table, label_column, src.origin)


def raw_labels(table: pa.Table, column: str, origin: str) -> list[Any]:
    if column not in table.column_names:
        raise DataError(
            f"{origin} has no label column {column!r}",
            f"pass --label-column; its columns are {', '.join(table.column_names)}",
        )
    values = table.column(column).to_pylist()
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise DataError(f"{origin} row {i} has no label in column {column!r}")
        if isinstance(v, float) and not v.is_integer():
            raise DataError(f"{origin} row {i} has a non-integer label {v!r} in column {column!r}")
    return [int(v) if isinstance(v, float) else v for v in values]


@dataclass(frozen=True)
class LabelMap:
    """Original label values → class ids 0..C-1, and the class names."""

    values: tuple[Any, ...]
    names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.values)

    def encode(self, labels: list[Any], origin: str) -> list[int]:
        index = {v: i for i, v in enumerate(self.values)}
        for i, v in enumerate(labels):
            if v not in index:
                raise DataError(f"{origin} row {i} has label {v!r}, which the training data does not have")
        return [index[v] for v in labels]


def build_label_map(labels: list[Any], class_names: list[str] | None, origin: str) -> LabelMap:
    """Ints 0..K-1 keep their ids; other ints and strings are sorted (numerically when all digits)."""
    uniq = set(labels)
    if len(uniq) < 2:
        raise DataError(f"{origin} has {len(uniq)} class(es); a classifier needs at least 2")
    kinds = {type(v) for v in uniq}
    if kinds <= {int} or kinds <= {bool, int}:
        values = sorted(int(v) for v in uniq)
        if class_names and values[-1] < len(class_names) and values[0] >= 0:
            values = list(range(len(class_names)))
            names = list(class_names)
        else:
            names = [str(v) for v in values]
    else:
        strs = [str(v) for v in uniq]
        values = sorted(strs, key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))
        names = list(values)
        if uniq != set(strs):
            raise DataError(f"{origin} mixes label types ({', '.join(sorted(k.__name__ for k in kinds))})")
    return LabelMap(tuple(values), tuple(names))
