"""`mlrnet eval` (not built yet)."""

from __future__ import annotations

from mlrnet_cli.commands._app import app, not_built


@app.command("eval", help="[not built yet] This stage is not implemented in this release.")
def eval_cmd() -> None:
    not_built("eval", "planned")
