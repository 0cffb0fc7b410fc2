"""Stage 0, `mlrnet corrupt`: turn a clean labelled text set into the paper's biased training set (§4.2).

Order of operations (each documented in ``docs/corrupt.md``):

0. A **test split**: when the source has no test split of its own (and no ``test_data`` is given), a
   stratified ``test_fraction`` of each class is held out first, before anything else is drawn.
1. A **clean pool** of ``meta_pool_per_class`` true-labelled rows per class is set aside next (or read
   from ``clean_data``, whole); it never overlaps the training rows.
2. **Imbalance** on the remaining rows, by true label: the class at rank ``i`` (rank 0 is the head) keeps
   ``round_half_up(n_max * F ** (-i / (C - 1)))`` rows, so the head keeps ``n_max`` and the tail ``n_max / F``.
   With ``F = 1`` and no ``n_max`` every row is kept (real noisy data keeps its own profile).
3. **Noise** on the kept rows: each observed label is drawn from row ``true_label`` of the corruption
   matrix ``T`` (``uniform``, ``flip`` or ``pair``); the realised matrix and rates are recorded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlrnet_cli import seeding
from mlrnet_cli.artifacts import guard_output, make_meta, write_json, write_table
from mlrnet_cli.configs import DEFAULT_META_POOL, DEFAULT_TEST_FRACTION, CorruptConfig, InputSpec, NoiseSpec
from mlrnet_cli.data import LabelMap, Source, build_label_map, has_hub_split, load_source, raw_labels, read_columns
from mlrnet_cli.errors import ConfigError, DataError, UsageError

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("mlrnet")

RESERVED = ("sample_id", "text", "label", "true_label", "is_noisy")


@dataclass
class CorruptResult:
    paths: dict[str, Path]
    manifest: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# the paper's bias setup, as pure functions


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def imbalance_profile(n_max: int, imbalance: float, num_classes: int) -> list[int]:
    """Rows kept per class rank: ``round(n_max * F^(-i/(C-1)))`` (§4.2, ``n = n_i μ^i``)."""
    if imbalance < 1:
        raise ConfigError(f"--imbalance must be ≥ 1 (max/min class ratio), got {imbalance:g}")
    if num_classes < 2:
        raise DataError("need at least 2 classes")
    return [round_half_up(n_max * imbalance ** (-i / (num_classes - 1))) for i in range(num_classes)]


def corruption_matrix(noise: NoiseSpec, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """The C×C matrix T with T[i, j] = P(observed j | true i) (§4.2)."""
    c, p = num_classes, noise.p
    eye = np.eye(c)
    if noise.kind == "none" or p == 0:
        return eye
    if noise.kind == "uniform":
        # Redrawn from all C classes, so it may stay the same: realised rate p(C-1)/C, as MW-Net's `unif`.
        return (1 - p) * eye + p / c * np.ones((c, c))
    if noise.kind == "pair":
        targets = [(i + 1) % c for i in range(c)]
    else:  # flip (NoiseSpec.parse knows no other kind)
        targets = [int(rng.choice([j for j in range(c) if j != i])) for i in range(c)]
    t = (1 - p) * eye
    t[np.arange(c), targets] += p
    return t


def apply_noise(true_labels: np.ndarray, matrix: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw each observed label from row ``true_label`` of ``matrix``."""
    if len(true_labels) == 0:
        return true_labels.copy()
    cdf = np.cumsum(matrix, axis=1)
    cdf[:, -1] = 1.0  # guard float round-off so every draw lands in a class
    u = rng.random(len(true_labels))
    return (u[:, None] >= cdf[true_labels]).sum(axis=1).astype(np.int64)


def realised_noise(true_labels: np.ndarray, observed: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Realised corruption matrix (rows normalised; an empty class's row is the identity) and rates."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (true_labels, observed), 1)
    rows = counts.sum(axis=1, keepdims=True)
    matrix = np.where(rows > 0, counts / np.maximum(rows, 1), np.eye(num_classes))
    per_class = [float(1 - matrix[i, i]) if rows[i, 0] else 0.0 for i in range(num_classes)]
    overall = float((true_labels != observed).mean()) if len(true_labels) else 0.0
    return {"counts": counts.tolist(), "matrix": matrix.tolist(), "per_class_rate": per_class, "rate": overall}


def resolve_class_order(order: str, label_map: LabelMap, rng: np.random.Generator) -> list[int]:
    """Class ids from head to tail."""
    c = label_map.num_classes
    if order == "given":
        return list(range(c))
    if order == "shuffle":
        return [int(i) for i in rng.permutation(c)]
    items = [s.strip() for s in order.split(",") if s.strip()]
    lookup = {str(n): i for i, n in enumerate(label_map.names)} | {str(v): i for i, v in enumerate(label_map.values)}
    ids = []
    for s in items:
        if s not in lookup:
            raise ConfigError(f"--class-order names unknown class {s!r}", f"classes: {', '.join(label_map.names)}")
        ids.append(lookup[s])
    if sorted(ids) != list(range(c)):
        raise ConfigError(f"--class-order must list each of the {c} classes once, got {order!r}")
    return ids


def corrupt(config: CorruptConfig, inputs: InputSpec, out_dir: str | Path, *, overwrite: bool = False) -> CorruptResult:
    """Build ``train.arrow``, ``clean.arrow``, ``test.arrow`` and ``manifest.json`` in ``out_dir``."""
    config.validate()
    rng = seeding.corrupt_rng(config.seed)  # one stream, drawn in this order: class order, pool, rows, noise
    d = _read_source(config, inputs)
    order = resolve_class_order(config.class_order, d.label_map, rng)
    # 0. test split: the source's own, or a stratified share held out before anything else is drawn
    test_src, test_fraction, test_idx = _test_split(config, inputs, d.true_source, d.c)
    held = np.isin(np.arange(len(d.texts)), test_idx)
    pool_n = config.meta_pool_per_class
    if pool_n is None and inputs.clean_data is None:
        pool_n = DEFAULT_META_POOL
    # 1. clean pool, before any corruption
    clean_src, pool_idx = _clean_pool(config, inputs, d, held, pool_n, test_fraction, rng)
    # 2. imbalance on the rest, by true label
    train_idx, n_max, profile = _imbalanced_rows(config, d, pool_idx, held, order, rng)
    # 3. noise on the kept rows
    matrix = corruption_matrix(config.noise, d.c, rng)
    true_train = d.true_source[train_idx]
    observed = apply_noise(true_train, matrix, rng) if d.known_truth is None else d.given[train_idx]

    sources = {"data": d.src, "clean_data": clean_src, "test_data": test_src}
    fps = {k: s.fingerprint for k, s in sources.items() if s is not None}
    tables = _tables(inputs, d, train_idx, observed, clean_src, pool_idx, test_src, test_idx)
    paths = {k: Path(out_dir) / f"{k}.arrow" for k in tables} | {"manifest": Path(out_dir) / "manifest.json"}
    meta_config = replace(config, meta_pool_per_class=pool_n, test_fraction=test_fraction).to_json()
    metas = {k: make_meta("corrupt", k, meta_config | {"inputs": asdict(inputs)}, config.seed, fps) for k in paths}
    local_inputs = [p for p in (inputs.data, inputs.clean_data, inputs.test_data) if p and Path(p).exists()]
    for k, p in paths.items():
        guard_output(p, metas[k], inputs=local_inputs, overwrite=overwrite)
    names = {"label": list(d.label_map.names), "true_label": list(d.label_map.names)}
    out_fps = {k: write_table(paths[k], t, metas[k], class_names=names) for k, t in tables.items()}

    def counts(labels: np.ndarray) -> list[int]:
        return np.bincount(labels, minlength=d.c).tolist()

    noise = {
        "spec": str(config.noise),
        "matrix": matrix.tolist(),
        "realised": realised_noise(true_train, observed, d.c),
    }

    manifest = {
        "mlrnet": metas["manifest"],
        "num_classes": d.c,
        "class_names": list(d.label_map.names),
        "label_values": list(d.label_map.values),
        "class_order": [d.label_map.names[k] for k in order],
        "text_columns": d.text_cols,
        "truth_known": bool(d.truth_known),
        "source": {
            "train": d.src.origin,
            "clean": clean_src.origin if clean_src else None,
            "test": test_src.origin if test_src else (f"{d.src.origin} (held out)" if len(test_idx) else None),
        },
        "n_max": n_max,
        "profile": profile,
        "counts": {
            "source": counts(d.true_source),
            "clean": counts(tables["clean"].column("label").to_numpy()),
            "train_true": counts(true_train),
            "train_observed": counts(observed),
            "test": counts(tables["test"].column("label").to_numpy()) if "test" in tables else None,
        },
        "noise": noise if d.truth_known else {"spec": "unknown (real labels)", "matrix": None, "realised": None},
        "fingerprints": out_fps,
    }
    if test_fraction is not None:  # only then: a source's own test split leaves the manifest as it always was
        manifest["test_fraction"] = test_fraction
    write_json(paths["manifest"], manifest)
    if len(test_idx):  # logged once written: an error must stay the one line on stderr
        log.info(
            "%s has no test split: held out %d rows (%g of each class) as the test split (--test-fraction)",
            d.src.origin,
            len(test_idx),
            test_fraction,
        )
        if not d.truth_known:
            log.warning("the held-out test rows carry --data's own labels, which may be noisy")
    return CorruptResult(paths, manifest)


@dataclass(frozen=True)
class _Data:
    """--data, read: its texts and labels as class ids, and which labels are the truth."""

    src: Source
    text_cols: list[str]
    texts: list[str]
    label_map: LabelMap
    given: np.ndarray
    known_truth: np.ndarray | None
    true_source: np.ndarray  #: the labels taken as the truth (known ones, else the given ones)
    truth_known: bool

    @property
    def c(self) -> int:
        return self.label_map.num_classes


def _read_source(config: CorruptConfig, inputs: InputSpec) -> _Data:
    src = load_source(inputs.data, inputs.split)
    if src.table.num_rows == 0:
        raise DataError(f"{src.origin} has no rows")
    text_cols, texts, observed_raw = read_columns(src, inputs.text_columns, inputs.label_column)
    truth_raw = raw_labels(src.table, inputs.true_label_column, src.origin) if inputs.true_label_column else None
    label_map = build_label_map(observed_raw + (truth_raw or []), src.class_names, src.origin)
    given = np.asarray(label_map.encode(observed_raw, src.origin), dtype=np.int64)
    known_truth = np.asarray(label_map.encode(truth_raw, src.origin), dtype=np.int64) if truth_raw else None
    # Synthetic corruption assumes the source labels are the truth; real noisy data brings its own.
    true_source = known_truth if known_truth is not None else given
    # Truth is unknown only for data declared noisy (a trusted --clean-data given) that we did not corrupt.
    truth_known = known_truth is not None or config.noise.kind != "none" or inputs.clean_data is None
    if inputs.true_label_column and config.noise.kind != "none":
        raise UsageError("--true-label-column marks data that is already noisy: use it with --noise none")
    return _Data(src, text_cols, texts, label_map, given, known_truth, true_source, truth_known)


def _clean_pool(
    config: CorruptConfig,
    inputs: InputSpec,
    d: _Data,
    held: np.ndarray,
    pool_n: int | None,
    test_fraction: float | None,
    rng: np.random.Generator,
) -> tuple[Source | None, np.ndarray]:
    """(--clean-data, or None; the pool's rows of --data)."""
    c, names = d.c, d.label_map.names
    if inputs.clean_data is not None:
        clean_src = load_source(inputs.clean_data, inputs.split)
        pool_counts = np.bincount(_read_labelled(clean_src, inputs, d.label_map)[2], minlength=c)
        need = pool_n or 1  # the pool is the whole table; an explicit size is a floor it must reach
        short = [names[i] for i in range(c) if pool_counts[i] < need]
        if short:
            raise DataError(
                f"--clean-data has fewer than {need} rows for class(es) {', '.join(short[:5])}",
                "lower --meta-pool-per-class or add clean rows" if pool_n else "add clean rows for every class",
            )
        return clean_src, np.zeros(0, dtype=np.int64)
    after, or_fraction = (" left after the test split", " or --test-fraction") if test_fraction else ("", "")
    pool_parts = []
    for k in range(c):
        rows = np.flatnonzero((d.true_source == k) & ~held)
        if d.known_truth is not None:  # only rows whose given label is right can be trusted
            rows = rows[d.given[rows] == k]
        if len(rows) < pool_n:
            raise DataError(
                f"class {names[k]!r} has {len(rows)} rows{after}, fewer than the clean pool's {pool_n}",
                f"lower --meta-pool-per-class{or_fraction}, or pass --clean-data",
            )
        pool_parts.append(rng.choice(rows, size=pool_n, replace=False))
    if d.known_truth is None and config.noise.kind == "none" and config.imbalance == 1:
        log.warning("no --clean-data: the clean pool is drawn from --data itself, whose labels are taken as right")
    return None, np.sort(np.concatenate(pool_parts)) if pool_parts else np.zeros(0, dtype=np.int64)


def _imbalanced_rows(
    config: CorruptConfig, d: _Data, pool_idx: np.ndarray, held: np.ndarray, order: list[int], rng: np.random.Generator
) -> tuple[np.ndarray, int, list[int] | None]:
    """(the training rows, the head class's size n_max, the imbalance profile or None)."""
    c = d.c
    free = ~held & ~np.isin(np.arange(len(d.texts)), pool_idx)
    remaining = [np.flatnonzero((d.true_source == k) & free) for k in range(c)]
    left = np.array([len(r) for r in remaining])
    if config.imbalance == 1 and config.n_max is None:
        # Nothing to imbalance: keep every row (real noisy data keeps its own class profile).
        n_max, profile = int(left.max()), None
        keep = {k: int(left[k]) for k in range(c)}
    else:
        n_max = config.n_max if config.n_max is not None else int(left.min())
        profile = imbalance_profile(n_max, config.imbalance, c)
        keep = {order[rank]: n for rank, n in enumerate(profile)}
    if profile is not None and profile[-1] < 1:
        raise ConfigError(
            f"--imbalance {config.imbalance:g} with a head of {n_max} leaves the tail class with 0 rows",
            f"use --imbalance ≤ {2 * n_max - 1} or a larger --n-max",
        )
    short = [(d.label_map.names[k], keep[k], int(left[k])) for k in range(c) if left[k] < keep[k]]
    if short:
        name, want, have = short[0]
        raise DataError(
            f"class {name!r} needs {want} training rows but has {have} left after the clean pool",
            "lower --n-max or --meta-pool-per-class",
        )
    train_idx = np.sort(np.concatenate([rng.choice(remaining[k], size=keep[k], replace=False) for k in range(c)]))
    return train_idx, n_max, profile


def _tables(
    inputs: InputSpec,
    d: _Data,
    train_idx: np.ndarray,
    observed: np.ndarray,
    clean_src: Source | None,
    pool_idx: np.ndarray,
    test_src: Source | None,
    test_idx: np.ndarray,
) -> dict[str, pa.Table]:
    """train, clean and (when there is one) test, with the source's other columns carried along."""
    extra_cols = _extra_columns(d.src.table, d.text_cols, inputs)
    truth = d.true_source

    def of_data(idx: np.ndarray, labels: np.ndarray, known: bool) -> pa.Table:
        return _make_table(idx, [d.texts[i] for i in idx], labels, truth[idx] if known else None, extra_cols, idx)

    def of_table(src: Source, first_id: int) -> pa.Table:
        cols, texts, labels = _read_labelled(src, inputs, d.label_map)
        rows = np.arange(src.table.num_rows, dtype=np.int64)
        return _make_table(rows + first_id, texts, labels, labels, _extra_columns(src.table, cols, inputs), rows)

    out = {"train": of_data(train_idx, observed, d.truth_known)}
    out["clean"] = of_table(clean_src, len(d.texts)) if clean_src else of_data(pool_idx, truth[pool_idx], True)
    if test_src is not None:
        out["test"] = of_table(test_src, 0)
    elif len(test_idx):
        out["test"] = of_data(test_idx, truth[test_idx], d.truth_known)
    return out


def _test_split(
    config: CorruptConfig, inputs: InputSpec, labels: np.ndarray, num_classes: int
) -> tuple[Source | None, float | None, np.ndarray]:
    """(the source's own test split, or None; the fraction held out instead, or None; the held-out rows)."""
    if inputs.test_data is not None or has_hub_split(inputs.data, inputs.test_split):
        test_src = load_source(inputs.data if inputs.test_data is None else inputs.test_data, inputs.test_split)
        if config.test_fraction is not None:
            raise UsageError(
                f"--test-fraction holds out a test split, but {test_src.origin} is the test split already",
                "drop --test-fraction: it holds out test rows only from a source without a test split",
            )
        return test_src, None, np.zeros(0, dtype=np.int64)
    fraction = DEFAULT_TEST_FRACTION if config.test_fraction is None else config.test_fraction
    # stratified, round_half_up(n_k * fraction) rows of each class k, drawn from a random stream of its own:
    # the seed alone fixes the split, and it moves no other draw
    rng = seeding.test_split_rng(config.seed)
    rows = [np.flatnonzero(labels == k) for k in range(num_classes)]
    held = [rng.choice(r, size=round_half_up(len(r) * fraction), replace=False) for r in rows]
    return None, fraction, np.sort(np.concatenate(held)).astype(np.int64)


def _read_labelled(src: Source, inputs: InputSpec, label_map: LabelMap) -> tuple[list[str], list[str], np.ndarray]:
    """(text columns, texts, class ids) of --clean-data or --test-data, in --data's classes."""
    cols, texts, raw = read_columns(src, inputs.text_columns, inputs.label_column)
    return cols, texts, np.asarray(label_map.encode(raw, src.origin), dtype=np.int64)


def _extra_columns(table: pa.Table, text_cols: list[str], inputs: InputSpec) -> dict[str, pa.ChunkedArray]:
    """The source's other columns, kept so users can trace rows; ours win a name clash (theirs get ``orig_``)."""
    used = {inputs.label_column, inputs.true_label_column, *(text_cols if len(text_cols) == 1 else [])}
    return {f"orig_{n}" if n in RESERVED else n: table.column(n) for n in table.column_names if n not in used}


def _make_table(ids, texts, labels, true_labels, extra, rows) -> pa.Table:
    import pyarrow as pa

    n, known = len(ids), true_labels is not None  # unknown truth: null columns of the same types
    cols: dict[str, pa.Array | pa.ChunkedArray] = {
        "sample_id": pa.array(np.asarray(ids, dtype=np.int64)),
        "text": pa.array(texts, type=pa.string()),
        "label": pa.array(np.asarray(labels, dtype=np.int64)),
        "true_label": pa.array(np.asarray(true_labels, dtype=np.int64)) if known else pa.nulls(n, pa.int64()),
        "is_noisy": pa.array(np.asarray(labels) != np.asarray(true_labels)) if known else pa.nulls(n, pa.bool_()),
    }
    take = pa.array(np.asarray(rows, dtype=np.int64))
    cols |= {name: col.take(take) for name, col in extra.items()}
    return pa.table(cols)
