"""`mlrnet collect-losses` (not built yet)."""

from __future__ import annotations

from mlrnet_cli.commands._app import app, not_built


@app.command("collect-losses", help="[not built yet] This stage is not implemented in this release.")
def collect_losses_cmd() -> None:
    not_built("collect-losses", "planned")
