"""`mlrnet corrupt` (being built)."""

from __future__ import annotations

from mlrnet_cli.commands._app import app, not_built


@app.command("corrupt")
def corrupt_cmd() -> None:
    not_built("corrupt", "in progress")
