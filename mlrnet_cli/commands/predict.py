"""`mlrnet predict`: label new, unlabelled text with a trained classifier."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import typer

from mlrnet_cli.commands._app import ModelOption, OverwriteOption, WorkdirOption, app, option, optional
from mlrnet_cli.configs import PredictConfig, build

_opt = partial(option, PredictConfig)

HELP = """Label new, unlabelled text with a trained classifier: the predicted class and every class's probability.

Reads WORKDIR/model/best (or --model: any folder saved by train/collect-losses, or a hub classifier) and the
texts: a table with --data (Arrow/Parquet/CSV/JSON Lines), or one text per line on stdin (no --data, or
--data -; blank lines are skipped, row is the line number from 0). Token limit and batch size default to
the ones the model was trained with.

Output rows: row, sample_id (if the table has one), text, label (class name), label_id, score (top
probability), probs (all classes, in label_id order). With --out FILE: Arrow (.arrow; probs a list, class
names in the metadata) or JSON Lines (.jsonl; probs an object keyed by class name), and the path on stdout.
Without --out: JSON Lines on stdout, for pipes. Progress and logs go to stderr.
"""


@app.command("predict", help=HELP)
def predict_cmd(
    data: str | None = optional("--data", "Table of texts, or - for stdin", "stdin, one text per line"),
    model: str | None = ModelOption,
    text_column: str | None = _opt("text_column"),
    out: Path | None = optional("--out", "Output file, .arrow or .jsonl", "stdout"),
    fmt: str | None = optional("--format", "arrow or jsonl", "from the --out suffix; jsonl on stdout"),
    with_text: bool = _opt("with_text", "Copy each text into the output.", "--with-text/--no-text"),
    batch_size: int | None = _opt(
        "batch_size", "Rows per forward pass \\[default: the model's training batch size, else 64]."
    ),
    max_length: int | None = _opt("max_length"),
    device: str = _opt("device"),
    bf16: bool = _opt("bf16"),
    workdir: Path | None = WorkdirOption,
    overwrite: bool = OverwriteOption,
) -> None:
    from mlrnet_cli.commands._app import stage_args
    from mlrnet_cli.errors import UsageError
    from mlrnet_cli.predict import predict

    texts = None
    if data is None or data == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no texts to predict", "pass --data FILE, or pipe one text per line on stdin")
        texts, data = sys.stdin.read().splitlines(), None
    result = predict(build(PredictConfig, locals()), **stage_args(predict, locals()))
    if result.path is not None:
        typer.echo(str(result.path))
    else:
        for line in result.json_lines():
            typer.echo(line)
