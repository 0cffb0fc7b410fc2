"""`mlrnet weights`: which training rows the trained meta-net distrusts, and whether it is right."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import typer

from mlrnet_cli.commands._app import JsonOption, OverwriteOption, WorkdirOption, app, option, optional, rich_table
from mlrnet_cli.configs import WeightsConfig, build

_opt = partial(option, WeightsConfig)

HELP = """Weight every training row with the trained meta-net and rank the rows it distrusts (lowest weight first).

Reads WORKDIR/model/best (classifier + meta_net.safetensors, from `mlrnet train --method mlrnet` or
`--method mwnet`), WORKDIR/data/train.arrow and WORKDIR/losses.safetensors; writes WORKDIR/weights.arrow
(sample_id, text, label, weight, rank, predicted, probability, ... and true_label/is_noisy when known).

Summary on stderr: weight mean and quartiles by group (clean/noisy x head/tail; a head class has at least
the median number of training rows) and, when the truth is known, how well a low weight finds the noisy
rows (ROC-AUC, average precision, precision@k with k = the number of noisy rows). stdout: the artifact
paths, or everything as JSON with --json.
"""


@app.command("weights", help=HELP)
def weights_cmd(
    top: int = _opt("top", "List the K most distrusted rows (lowest weight) for relabelling."),
    export_relabel: Path | None = typer.Option(
        None, "--export-relabel", help="Write the --top rows as CSV (with an empty new_label column)."
    ),
    plot: Path | None = typer.Option(
        None, "--plot", help="PNG: weight histograms and mean loss curves per group (needs mlrnet\\[plot])."
    ),
    model: Path | None = optional("--model", "Model folder", "WORKDIR/model/best"),
    train: Path | None = optional("--train", "Training table", "WORKDIR/data/train.arrow"),
    losses: Path | None = optional("--losses", "Stage-1 loss curves", "WORKDIR/losses.safetensors"),
    out: Path | None = optional("--out", "Weights table", "WORKDIR/weights.arrow"),
    batch_size: int = _opt("batch_size"),
    max_length: int | None = _opt("max_length"),
    allow_unfinished: bool = _opt("allow_unfinished"),
    device: str = _opt("device"),
    bf16: bool = _opt("bf16"),
    workdir: Path | None = WorkdirOption,
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    from mlrnet_cli.commands._app import emit, stage_args, stderr_console
    from mlrnet_cli.weights import compute_weights

    result = compute_weights(build(WeightsConfig, locals()), **stage_args(compute_weights, locals()))
    _print_summary(result.summary, result.top, stderr_console())
    emit(result.paths, {"summary": result.summary, "top": result.top}, as_json)


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _print_summary(summary: dict[str, Any], top: list[dict[str, Any]], console: Any) -> None:
    title = f"meta-net weights ({summary['method']}, {summary['num_rows']} training rows)"
    stats = ("mean", "q25", "median", "q75")
    groups = summary["groups"].items()
    rows = ([name, str(s["count"]), *(_fmt(s[k]) for k in stats)] for name, s in groups if s.get("count"))
    console.print(rich_table(title, ("group", "rows", *stats), rows))
    console.print(f"head classes: {', '.join(summary['head_classes'])}; tail: {', '.join(summary['tail_classes'])}")
    if (share := summary.get("label_share")) is not None:
        console.print(f"the observed label explains {share:.0%} of the weights' variance")
        if summary.get("per_label_switch"):
            console.print(
                "  the weights mostly follow the label (they rebalance classes) and rank rows little within a label: "
                "to choose rows to relabel, compare rows of one label (or train MLRNet with its curve prior, "
                "--curve-prior 1, the default)"
            )
    if det := summary.get("noise_detection"):
        console.print(
            f"low weight finds noisy rows: ROC-AUC {_fmt(det['roc_auc'])}, average precision "
            f"{_fmt(det['average_precision'])}, precision@{det['k']} {_fmt(det['precision_at_k'])} "
            f"(noise rate {_fmt(det['base_rate'])})"
        )
        within = f"  within each label (mean over labels): ROC-AUC {_fmt(det['within_label']['roc_auc'])}"
        if s1 := det.get("stage1_loss"):
            within += f"; the stage-1 loss alone: ROC-AUC {_fmt(s1['roc_auc'])}, within each label "
            within += _fmt(s1["within_label"]["roc_auc"])
        console.print(within)
        console.print(
            "  ROC-AUC: the chance that a noisy row weighs less than a clean one (1 = all noise found, 0.5 = chance, "
            "below 0.5 = noisy rows weigh more, e.g. when noise fills the small classes the meta-net up-weights); "
            "within a label, weights that only follow the label score 0.5"
        )
    if top:
        rows = (
            [str(r["rank"]), f"{r['weight']:.4f}", r["label_name"], f"{r['predicted_name']} ({r['probability']:.2f})"]
            + [r["text"] if len(r["text"]) <= 80 else r["text"][:77] + "..."]
            for r in top
        )
        columns = ("rank", "weight", "label", "predicted", "text")
        console.print(rich_table(f"{len(top)} most distrusted rows", columns, rows, right=("rank", "weight")))
