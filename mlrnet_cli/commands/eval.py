"""`mlrnet eval`: accuracy, F1 and the confusion matrix of a trained classifier on a labelled table."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import typer

from mlrnet_cli.commands._app import JsonOption, ModelOption, OverwriteOption, WorkdirOption, app, option, optional
from mlrnet_cli.configs import EvalConfig, build

_opt = partial(option, EvalConfig)

HELP = """Evaluate a classifier: accuracy (the paper's metric), macro/micro-F1, per-class scores, confusion matrix.

Reads WORKDIR/model/best (or --model: any folder saved by train/collect-losses, or a hub model id) and
WORKDIR/data/test.arrow (or --data: Arrow/Parquet/CSV/JSONL with text and label columns; string labels
are mapped to the workspace's class names). Writes WORKDIR/eval/metrics.json and, with --predictions,
WORKDIR/eval/predictions.arrow. stdout: a table of the metrics, or JSON with --json.
"""


@app.command("eval", help=HELP)
def eval_cmd(
    model: str | None = ModelOption,
    data: Path | None = optional("--data", "Labelled table", "WORKDIR/data/test.arrow"),
    text_column: str | None = _opt("text_column"),
    label_column: str = _opt("label_column", "Label column (ids or class names)."),
    predictions: bool = typer.Option(
        False,
        "--predictions/--no-predictions",
        help="Also write eval/predictions.arrow (sample_id, label, predicted, probabilities).",
    ),
    batch_size: int = _opt("batch_size"),
    max_length: int | None = _opt("max_length"),
    allow_unfinished: bool = _opt("allow_unfinished"),
    device: str = _opt("device"),
    bf16: bool = _opt("bf16"),
    out: Path | None = optional("--out", "Output folder", "WORKDIR/eval"),
    workdir: Path | None = WorkdirOption,
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    from mlrnet_cli.commands._app import emit, stage_args
    from mlrnet_cli.evaluate import evaluate

    result = evaluate(build(EvalConfig, locals()), **stage_args(evaluate, locals(), out_dir=out))
    if as_json:
        emit(result.paths, result.metrics, as_json)
    else:
        _print_table(result.metrics)


def _print_table(m: dict[str, Any]) -> None:
    from rich.console import Console

    from mlrnet_cli.commands._app import rich_table

    console = Console()  # stdout: the metrics are this command's data
    title = f"accuracy {m['accuracy']:.4f}   macro-F1 {m['macro_f1']:.4f}   micro-F1 {m['micro_f1']:.4f}"
    scores = ("precision", "recall", "f1")
    rows = ([r["name"], *(f"{r[k]:.4f}" for k in scores), str(r["support"])] for r in m["per_class"])
    columns = ("class", "precision", "recall", "F1", "support")
    console.print(rich_table(f"{title}   ({m['num_rows']} rows)", columns, rows))
    names = m["class_names"]
    cm_rows = ([name, *map(str, row)] for name, row in zip(names, m["confusion_matrix"], strict=True))
    header = ["", *(n[:12] for n in names)]
    console.print(rich_table("confusion matrix (rows: true, columns: predicted)", header, cm_rows))
