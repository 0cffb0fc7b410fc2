"""mlrnet: train text classifiers that stay accurate on biased data (MLRNet, Yu & Li, Appl. Sci. 2024).

Importing this package is cheap: it never imports torch, transformers or datasets.
"""

__version__ = "0.1.0.dev0"

from mlrnet_cli.errors import MlrnetError  # noqa: E402

__all__ = ["MlrnetError", "__version__"]
