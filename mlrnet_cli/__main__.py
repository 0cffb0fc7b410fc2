"""`python -m mlrnet_cli` (also what `torchrun -m mlrnet_cli` runs)."""

from mlrnet_cli.cli import main

if __name__ == "__main__":
    main()
