"""`mlrnet weights` (not built yet)."""

from __future__ import annotations

from mlrnet_cli.commands._app import app, not_built


@app.command("weights", help="[not built yet] This stage is not implemented in this release.")
def weights_cmd() -> None:
    not_built("weights", "planned")
