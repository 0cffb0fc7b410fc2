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


def _under_root(*parts: str) -> property:
    return property(lambda ws: ws.root.joinpath(*parts), doc=f"``{'/'.join(parts)}`` in the workspace.")


@dataclass(frozen=True)
class Workspace:
    """Default artifact paths inside one workspace folder."""

    root: Path

    @classmethod
    def at(cls, workdir: str | os.PathLike[str] | None = None) -> Workspace:
        """``--workdir`` if given, else ``$MLRNET_WORKDIR``, else ``./mlrnet-work``."""
        return cls(Path(workdir if workdir is not None else os.environ.get(ENV_WORKDIR) or DEFAULT_WORKDIR))

    data = _under_root("data")
    train = _under_root("data", "train.arrow")
    clean = _under_root("data", "clean.arrow")
    test = _under_root("data", "test.arrow")
    manifest = _under_root("data", "manifest.json")
    cache = _under_root("cache")
    losses = _under_root("losses.safetensors")
    stage1 = _under_root("stage1")
    model = _under_root("model")
    eval = _under_root("eval")
    weights = _under_root("weights.arrow")
