"""Cost benchmark: what MLRNet costs next to plain fine-tuning, in one run, at MiniLM-L6 size and tiny size.

Runs the three focused benchmarks side by side and prints their ratio tables:

- time per step and peak RSS of plain vs the meta step for ``--meta-params all|last-1|head``
  (``meta_step.py``; targets: all <= 2.5x time and <= 1.6x memory, head <= 1.3x time);
- ``collect-losses`` vs a plain PyTorch loop (``collect_throughput.py``; target >= 0.95x);
- ``eval`` samples/s vs padding to 128 and vs a bare ``model(**batch)`` loop (``eval_throughput.py``;
  targets >= 2x and >= 0.9x).

    python benchmarks/cost.py                 # both scales, about 10 minutes on a quiet 2-core CPU
    python benchmarks/cost.py --scale tiny    # seconds
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(title: str, args: list[str]) -> None:
    print(f"\n## {title}\n$ {' '.join(['python', *[str(a) for a in args]])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True)
    print(proc.stdout.rstrip())
    if proc.returncode != 0:
        print(f"FAILED (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    print(f"({time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["minilm", "tiny", "both"], default="both")
    ap.add_argument("--rows", type=int, default=240, help="rows for the collect-losses and eval comparisons")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scales = ["tiny", "minilm"] if args.scale == "both" else [args.scale]
        for scale in scales:
            model: list[str] = []
            if scale == "tiny":
                from mlrnet_cli.testing import build_tiny_model

                model = ["--model", str(build_tiny_model(Path(tmp) / "tiny"))]
            run(f"{scale}: meta step vs plain step", [HERE / "meta_step.py", *(["--tiny"] if scale == "tiny" else [])])
            run(
                f"{scale}: collect-losses vs a plain loop",
                [HERE / "collect_throughput.py", *model, "--rows", str(args.rows), "--epochs", "1", "--repeat", "2"],
            )
            run(f"{scale}: eval throughput", [HERE / "eval_throughput.py", *model, "--rows", str(args.rows * 2)])


if __name__ == "__main__":
    main()
