"""The Typer app and the helpers every command shares (output on stdout, progress and logs on stderr)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Container, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import typer
import typer.core
from typer.core import TyperCommand, TyperGroup

from mlrnet_cli import __version__
from mlrnet_cli.errors import MlrnetError
from mlrnet_cli.workspace import ENV_WORKDIR

T = TypeVar("T")


#: a value an option refuses (click's, or the copy of click that recent Typer releases carry)
_BAD_PARAMETER: tuple[type[Exception], ...] = (click.BadParameter,)
if hasattr(typer.core, "_click"):
    _BAD_PARAMETER += (typer.core._click.exceptions.BadParameter,)


class _FlagsWithoutType:
    """Show flags as flags: Typer labels them ``<bool>`` in help, as if ``--overwrite true`` were the syntax."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:  # Typer's own click copy: its Option is not click.Option
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class MlrnetCommand(_FlagsWithoutType, TyperCommand):
    """Every subcommand: flags without a ``<bool>`` type in help."""


class MlrnetGroup(_FlagsWithoutType, TyperGroup):
    """Turns an :class:`MlrnetError` into one line on stderr and its exit code, and Ctrl-C into exit 130 with a
    line saying so, for `main()` and tests alike."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MlrnetError as e:
            if os.environ.get("MLRNET_DEBUG"):
                raise
            click.echo(f"mlrnet: error: {' '.join(str(e).splitlines())}", err=True)  # one line, always
            ctx.exit(e.exit_code)
        except _BAD_PARAMETER as e:  # a value outside an option's choices (the Enums of mlrnet_cli.configs)
            click.echo(f"mlrnet: error: {' '.join(e.format_message().split())}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            # here, not in cli.main(): typer's own main turns KeyboardInterrupt into a silent exit 130 before
            # main() sees it. Every stage resumes (train, collect-losses) or restarts cheaply.
            click.echo("mlrnet: interrupted (rerun the same command to resume)", err=True)
            ctx.exit(130)


class MlrnetTyper(typer.Typer):
    """A Typer app whose commands are :class:`MlrnetCommand` unless a command asks for another class."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or MlrnetCommand, **kwargs)


# Help text is Rich markup: a literal "[" must be written "\\[" (e.g. "\\[default: ...]"), or Rich eats the
# bracketed words. tests/test_help.py checks that every option's default shows in `--help`.
app = MlrnetTyper(
    name="mlrnet",
    cls=MlrnetGroup,
    help=(
        "Train text classifiers that stay accurate on biased data (imbalanced classes and noisy labels).\n\n"
        "Stages chain through a workspace (--workdir, $MLRNET_WORKDIR, default ./mlrnet-work):\n\n"
        "  mlrnet corrupt --imbalance 20 --noise uniform:0.4\n\n"
        "  mlrnet collect-losses\n\n"
        "  mlrnet train --meta-per-class 100\n\n"
        "  mlrnet eval\n\n"
        "  mlrnet weights\n\n"
        "  mlrnet predict --data new.csv --out preds.arrow"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def optional(flag: str, what: str, default: str, *flags: str, **kwargs: Any) -> Any:
    """An option that is None unless given; its help says what None stands for (typically a workspace path, which
    the stage resolves)."""
    return typer.Option(None, flag, *flags, help=f"{what} \\[default: {default}].", **kwargs)


WorkdirOption = optional(
    "--workdir", "Workspace folder that chains the stages", "./mlrnet-work", "-w", envvar=ENV_WORKDIR
)
JsonOption = typer.Option(False, "--json/--no-json", help="Print a JSON summary on stdout instead of artifact paths.")
OverwriteOption = typer.Option(
    False, "--overwrite/--no-overwrite", help="Replace existing artifacts even if they were made by a different run."
)
ModelOption = typer.Option(None, "--model", help="Classifier folder or hub id \\[default: WORKDIR/model/best].")

#: help of the config fields several commands share, written once (each command's config gives the default)
SHARED_HELP = {
    "seed": "Random seed: the same inputs and seed give identical artifacts.",
    "device": "auto, cpu, cuda or cuda:N (bf16 autocast on CUDA).",
    "bf16": "bfloat16 autocast on CUDA (--no-bf16: float32 there too; CPU is float32).",
    "batch_size": "Rows per forward pass.",
    "max_length": "Truncate texts to this many tokens \\[default: as the model was trained, else 128].",
    "allow_unfinished": "Use a model whose training run stopped early (warned and recorded).",
    "allow_pickle": "Allow pickle weights (pytorch_model.bin): only for models you trust.",
    "trust_remote_code": "Run the model repository's own code: only if you trust it.",
    "text_column": "Text column of --data \\[default: text, sentence or content].",
}


def option(config: type, field: str, help: str | None = None, *flags: str, **kwargs: Any) -> Any:
    """A Typer option for a config field, its default read from the dataclass and its help (unless given) from
    :data:`SHARED_HELP`, so both are declared once; the flag is ``--field-name`` unless given, and a boolean is a
    ``--x/--no-x`` flag. A default that is not a plain value (a ``NoiseSpec``) is shown and parsed as its string."""
    import dataclasses

    default = next(f.default for f in dataclasses.fields(config) if f.name == field)
    if dataclasses.is_dataclass(default):
        default = str(default)
    flags = flags or (f"--{field.replace('_', '-')}",)
    if isinstance(default, bool) and len(flags) == 1 and "/" not in flags[0]:
        flags = (f"{flags[0]}/--no-{flags[0][2:]}",)
    return typer.Option(default, *flags, help=help or SHARED_HELP[field], **kwargs)


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def rich_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], right: Container[str] = ()) -> Any:
    """A borderless Rich table: columns named in ``right`` (default: all but the first) right-aligned, for numbers."""
    from rich.table import Table

    table = Table(title=title, box=None)
    for i, col in enumerate(columns):
        table.add_column(col, justify="right" if (col in right if right else i > 0) else "left")
    for row in rows:
        table.add_row(*row)
    return table


def setup_logging() -> None:
    """Library logs (logger ``mlrnet``) go to stderr through Rich."""
    from rich.logging import RichHandler

    logger = logging.getLogger("mlrnet")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=stderr_console(), show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if os.environ.get("MLRNET_DEBUG") else logging.INFO)
    logger.propagate = False


def progress() -> Any:
    from mlrnet_cli.progress import RichProgress

    return RichProgress(stderr_console())


def stage_args(stage: Callable[..., Any], params: dict[str, Any], **renamed: Any) -> dict[str, Any]:
    """The keyword arguments of ``stage``: the command's parsed ``params`` (its locals; not the functions it
    imported) that ``stage`` takes by the same name, as :func:`~mlrnet_cli.configs.build` picks a config's fields,
    then ``renamed`` ones (a parameter whose name differs), and a progress display unless ``renamed`` has one."""
    import inspect

    takes = inspect.signature(stage).parameters
    keyword = {k for k, p in takes.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    named = {k: v for k, v in params.items() if k in keyword and not callable(v)}
    if "progress" in keyword and "progress" not in renamed:
        renamed["progress"] = progress()
    return named | renamed


def run_on_ranks(work: Callable[[Any], T], report: Callable[[T], None]) -> None:
    """Run ``work(progress)`` in a torchrun session (one process: nothing changes); rank 0 alone reports.

    Other ranks get no progress and log errors only, so a job prints one result however many processes it has.
    """
    from mlrnet_cli import distributed

    with distributed.session():
        main = distributed.is_main()
        if not main:  # only errors reach stderr: rank 0 reports for everyone
            logging.getLogger("mlrnet").setLevel(logging.ERROR)
        result = work(progress() if main else None)
        if main:
            report(result)


def emit(paths: dict[str, Path | str | None], summary: dict[str, Any] | None, as_json: bool) -> None:
    """stdout carries data: the artifact paths one per line, or one JSON object with ``--json``."""
    written = {k: str(v) for k, v in paths.items() if v is not None}
    if as_json:
        typer.echo(json.dumps({"artifacts": written, **(summary or {})}, indent=2, sort_keys=True, default=str))
    else:
        for v in written.values():
            typer.echo(v)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mlrnet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """mlrnet command-line interface: every command logs to stderr (:func:`setup_logging`)."""
    setup_logging()
