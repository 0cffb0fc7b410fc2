"""`mlrnet eval`: accuracy, F1 and the confusion matrix of a trained classifier on a labelled table."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import typer

from mlrnet_cli.commands._app import JsonOption, OverwriteOption, WorkdirOption, app, option
from mlrnet_cli.configs import EvalConfig

_opt = partial(option, EvalConfig)

HELP = """Evaluate a classifier: accuracy (the paper's metric), macro/micro-F1, per-class scores, confusion matrix.

Reads WORKDIR/model/best (or --model: any folder saved by train/collect-losses, or a hub model id) and
WORKDIR/data/test.arrow (or --data: Arrow/Parquet/CSV/JSONL with text and label columns; string labels
are mapped to the workspace's class names). Writes WORKDIR/eval/metrics.json and, with --predictions,
WORKDIR/eval/predictions.arrow. stdout: a table of the metrics, or JSON with --json.
"""


@app.command("eval", help=HELP)
def eval_cmd(
    model: str | None = typer.Option(
        None, "--model", help="Classifier folder or hub id \\[default: WORKDIR/model/best]."
    ),
    data: Path | None = typer.Option(None, "--data", help="Labelled table \\[default: WORKDIR/data/test.arrow]."),
    text_column: str | None = _opt("text_column", "Text column \\[default: text]."),
    label_column: str = _opt("label_column", "Label column (ids or class names)."),
    predictions: bool = typer.Option(
        False,
        "--predictions/--no-predictions",
        help="Also write eval/predictions.arrow (sample_id, label, predicted, probabilities).",
    ),
    batch_size: int = _opt("batch_size", "Rows per forward pass."),
    max_length: int | None = _opt(
        "max_length", "Truncate texts to this many tokens \\[default: as the model was trained]."
    ),
    allow_unfinished: bool = _opt(
        "allow_unfinished", "Use a model whose training run stopped early (warned and recorded)."
    ),
    device: str = _opt("device", "auto, cpu, cuda or cuda:N."),
    bf16: bool = _opt("bf16", "bfloat16 autocast on CUDA (--no-bf16: float32 there too; CPU is float32)."),
    out: Path | None = typer.Option(None, "--out", help="Output folder \\[default: WORKDIR/eval]."),
    workdir: Path | None = WorkdirOption,
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    from mlrnet_cli.commands._app import progress, setup_logging
    from mlrnet_cli.configs import build
    from mlrnet_cli.evaluate import evaluate

    setup_logging()
    config = build(EvalConfig, locals())
    result = evaluate(
        config,
        workdir=workdir,
        model=model,
        data=data,
        predictions=predictions,
        out_dir=out,
        overwrite=overwrite,
        progress=progress(),
    )
    if as_json:
        import json

        payload = {"artifacts": {k: str(v) for k, v in result.paths.items()}} | result.metrics
        typer.echo(json.dumps(payload, indent=2, sort_keys=True))
    else:
        _print_table(result.metrics)


def _print_table(m: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()  # stdout: the metrics are this command's data
    table = Table(
        title=f"accuracy {m['accuracy']:.4f}   macro-F1 {m['macro_f1']:.4f}   micro-F1 {m['micro_f1']:.4f}"
        f"   ({m['num_rows']} rows)",
        box=None,
    )
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for row in m["per_class"]:
        table.add_row(
            row["name"], f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"])
        )
    console.print(table)
    cm = Table(title="confusion matrix (rows: true, columns: predicted)", box=None)
    cm.add_column("")
    for name in m["class_names"]:
        cm.add_column(name[:12], justify="right")
    for name, row in zip(m["class_names"], m["confusion_matrix"], strict=True):
        cm.add_row(name, *map(str, row))
    console.print(cm)
