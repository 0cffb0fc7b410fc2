"""Entry point: the Typer app with every subcommand registered."""

from __future__ import annotations

import logging
import os
import sys

# each module registers its command
from mlrnet_cli.commands import collect_losses, corrupt, eval, predict, train, weights  # noqa: F401
from mlrnet_cli.commands._app import app


def _leave_torchrun_worker(code: object) -> None:
    """Exit a torchrun worker at once, skipping interpreter finalisation (any other process: return).

    With gloo, a worker that finished its work, left the process group and wrote every artifact could still
    abort while the interpreter shut down ("terminate called without an active exception": a C++ thread torn
    down at exit), and torchrun then reported the whole run failed (3 runs in 32 on a loaded 2-core CPU).
    Nothing is left to run at that point but finalisation, so logs and streams are flushed and the process ends.
    """
    dist = sys.modules.get("mlrnet_cli.distributed")  # a process that ran no command imported no torch
    if dist is None or dist.env_world_size() <= 1:
        return
    status = code if isinstance(code, int) else 0 if code is None else 1  # click exits with ints; else as SystemExit
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. Errors are turned into one line + exit code by :class:`MlrnetGroup`."""
    try:
        app(args=argv, prog_name="mlrnet")
    except SystemExit as e:
        _leave_torchrun_worker(e.code)
        raise
    except Exception as e:  # a bug, not a user error: one line unless debugging
        if os.environ.get("MLRNET_DEBUG"):
            raise
        sys.stderr.write(f"mlrnet: internal error: {type(e).__name__}: {e} (MLRNET_DEBUG=1 shows a traceback)\n")
        sys.exit(1)
