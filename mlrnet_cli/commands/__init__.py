"""One module per subcommand; each registers itself on :data:`mlrnet_cli.commands._app.app`."""
