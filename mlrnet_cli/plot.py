"""The weight report figure (the paper's Figure 1 groups): needs the optional extra ``mlrnet[plot]``.

Rows fall into groups by two questions: is the observed label wrong (clean / noisy, known only when the
table has ``is_noisy``), and is the row's observed class a head or a tail class. A class is a *head* class
when its number of training rows (by observed label) is at least the median over classes, a *tail* class
otherwise; see :func:`mlrnet_cli.weights.head_classes`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mlrnet_cli.artifacts import atomic_path
from mlrnet_cli.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pyarrow as pa

_STYLE = {  # group: (colour, line style), in the order the legends list them
    "clean/head": ("tab:blue", "-"),
    "clean/tail": ("tab:cyan", "-"),
    "noisy/head": ("tab:red", "--"),
    "noisy/tail": ("tab:orange", "--"),
    "head": ("tab:blue", "-"),
    "tail": ("tab:orange", "-"),
}


def require_matplotlib() -> None:
    """Fail early, in one line, when the optional plotting extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ConfigError("--plot needs matplotlib, which is not installed (pip install 'mlrnet[plot]')") from e


def plot_weights(weights_table: pa.Table, curves: np.ndarray | None, path: str | os.PathLike[str]) -> Path:
    """Write a PNG: (a) weight histogram per group, (b) mean normalised loss curve per group over epochs.

    ``weights_table`` needs the columns ``weight`` and ``group`` (as written by ``mlrnet weights``);
    ``curves`` is ``[rows, epochs]`` aligned with the table's rows (None draws panel (a) only).
    """
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    for col in ("weight", "group"):
        if col not in weights_table.column_names:
            raise DataError(f"weights table lacks column {col!r}")
    weight = weights_table.column("weight").to_numpy(zero_copy_only=False).astype(np.float64)
    group = np.asarray(weights_table.column("group").to_pylist(), dtype=object)
    if curves is not None:
        curves = np.asarray(curves, dtype=np.float64)
        if curves.ndim != 2 or curves.shape[0] != weight.size:
            raise DataError(f"curves have shape {curves.shape}, expected ({weight.size}, epochs)")
    groups = [g for g in _STYLE if (group == g).any()] + sorted({str(g) for g in group} - set(_STYLE))

    panels = 2 if curves is not None and curves.shape[1] > 0 else 1
    fig = Figure(figsize=(6.0 * panels, 4.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]

    ax = axes[0]
    # bins over the weights' own range: a meta-net's weights often sit in a narrow band of [0, 1]
    lo, hi = (float(weight.min()), float(weight.max())) if weight.size else (0.0, 1.0)
    pad = max((hi - lo) * 0.02, 1e-3)
    bins = np.linspace(lo - pad, hi + pad, 41)
    for g in groups:
        color, _ = _STYLE.get(g, (None, "-"))
        w = weight[group == g]
        ax.hist(w, bins=bins, density=True, histtype="step", linewidth=1.6, color=color, label=f"{g} (n={w.size})")
    ax.set(xlabel="meta-net weight $v_i$", ylabel="density", title="(a) weights by group")
    ax.legend(fontsize=8)

    if panels == 2:
        ax = axes[1]
        epochs = np.arange(curves.shape[1])
        for g in groups:
            color, ls = _STYLE.get(g, (None, "-"))
            ax.plot(epochs, curves[group == g].mean(axis=0), ls, color=color, marker="o", markersize=3, label=g)
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch (0 = before training)", ylabel="loss minus class mean")
        ax.set_title("(b) mean normalised loss curve by group")
        ax.legend(fontsize=8)

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
