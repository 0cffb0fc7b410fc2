"""The default workspace that chains the stages: every stage reads what the previous one wrote here.

Layout (see ``docs/artifacts.md``)::

    mlrnet-work/
      data/train.arrow data/clean.arrow data/test.arrow data/manifest.json   # corrupt
      cache/tokens-<key>.arrow cache/features-<key>.safetensors            # shared caches
      losses.safetensors stage1/                                           # collect-losses
      model/best/ model/last/ model/history.arrow model/state/             # train
      eval/metrics.json eval/predictions.arrow                             # eval
      weights.arrow                                                        # weights
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKDIR = "mlrnet-work"
ENV_WORKDIR = "MLRNET_WORKDIR"


@dataclass(frozen=True)
class Workspace:
    """Default artifact paths inside one workspace folder."""

    root: Path

    @classmethod
    def at(cls, workdir: str | os.PathLike[str] | None = None) -> Workspace:
        """``--workdir`` if given, else ``$MLRNET_WORKDIR``, else ``./mlrnet-work``."""
        return cls(Path(workdir if workdir is not None else os.environ.get(ENV_WORKDIR) or DEFAULT_WORKDIR))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def train(self) -> Path:
        return self.data / "train.arrow"

    @property
    def clean(self) -> Path:
        return self.data / "clean.arrow"

    @property
    def test(self) -> Path:
        return self.data / "test.arrow"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.json"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def losses(self) -> Path:
        return self.root / "losses.safetensors"

    @property
    def stage1(self) -> Path:
        return self.root / "stage1"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def weights(self) -> Path:
        return self.root / "weights.arrow"
