"""Entry point: the Typer app with every subcommand registered."""

from __future__ import annotations

import os
import sys

from mlrnet_cli.commands import (  # noqa: F401  (each module registers its command)
    collect_losses,
    corrupt,
    eval,
    train,
    weights,
)
from mlrnet_cli.commands._app import app


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. Errors are turned into one line + exit code by :class:`MlrnetGroup`."""
    try:
        app(args=argv, prog_name="mlrnet")
    except KeyboardInterrupt:
        sys.stderr.write("mlrnet: interrupted (rerun the same command to resume)\n")
        sys.exit(130)
    except Exception as e:  # a bug, not a user error: one line unless debugging
        if os.environ.get("MLRNET_DEBUG"):
            raise
        sys.stderr.write(f"mlrnet: internal error: {type(e).__name__}: {e} (MLRNET_DEBUG=1 shows a traceback)\n")
        sys.exit(1)
