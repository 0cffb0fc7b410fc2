"""Where MLRNet's weights get their order within a label: the weight's logit split into its terms (issue #17).

MLRNet's weight is ``sigmoid(out(FF(DF_i)) − β · mean I_i)`` with ``DF_i = A(h(x_i), Y_emb(y_i)) + B(I_i)`` (eq. 7;
β = ``--curve-prior``, 0 in the paper's net). For every training row of a workspace trained with
``--method mlrnet`` this script rebuilds the inputs `mlrnet weights` feeds the meta-net (the final classifier's
h(x_i), the label, the normalised stage-1 curve I_i) and scores the rows with:

- ``weight``: the weight's logit (what `mlrnet weights` ranks by),
- ``net``: the net's own logit ``out(FF(DF_i))``, the curve prior left out,
- ``prior``: ``−β · mean I_i`` alone (the stage-1 loss's order within a label),
- ``curve-branch``: ``out(FF(B(I_i)))``, the net with the feature branch A left out of the sum,
- ``feature-branch``: ``out(FF(A(h(x_i), Y_emb(y_i))))``, the net with the curve branch left out.

The last two are probes, not parts that add up (FF is not linear): they say which input a trained net's order
follows. Each score's within-label ROC-AUC for finding the noisy rows (low = noisy; mean over the observed
labels, as `mlrnet weights` reports it) is printed beside the stage-1 loss's, with the head label's (the label
with the most rows) on its own. The workspace's own ``weights.arrow`` is left as it is.

    python benchmarks/weight_terms.py bench-work/headline/work/if20-uniform0.4-s0-m20-mlrnet-share0.5-prior1-atw-hat
    python benchmarks/weight_terms.py WS1 WS2 --jsonl terms.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

TERMS = ("weight", "net", "prior", "curve-branch", "feature-branch")


def logit_terms(net: Any, features: np.ndarray, labels: np.ndarray, curves: np.ndarray) -> dict[str, np.ndarray]:
    """The weight's logit and its terms (see the module docstring) for every row, float64 (high = trusted)."""
    import torch

    with torch.no_grad():
        f = torch.as_tensor(features, dtype=torch.float32)
        c = torch.as_tensor(curves, dtype=torch.float32)
        feature_part, curve_part = net.branches(f, torch.as_tensor(labels, dtype=torch.long), c)
        own = net.net_logit(feature_part + curve_part)
        prior = net.prior_term(c, own.dtype)
        prior = torch.zeros_like(own) if prior is None else -prior
        out = {
            "weight": own + prior,
            "net": own,
            "prior": prior,
            "curve-branch": net.net_logit(curve_part),
            "feature-branch": net.net_logit(feature_part),
        }
    return {k: v.double().numpy() for k, v in out.items()}


def terms_report(
    terms: dict[str, np.ndarray], noisy: np.ndarray, labels: np.ndarray, stage1_score: np.ndarray
) -> dict[str, dict[str, float | None]]:
    """Each term's within-label ROC-AUC (low term = noisy) and the stage-1 loss's (high = noisy): the mean over
    labels and the head label's (the label with the most rows)."""
    from mlrnet_cli.metrics import within_label_report

    head = int(np.bincount(np.asarray(labels, dtype=np.int64)).argmax())
    scores = {name: -t for name, t in terms.items()} | {"stage1-loss": stage1_score}
    out = {}
    for name, s in scores.items():
        rep = within_label_report(s, noisy, labels)
        out[name] = {"within_label": rep["roc_auc"], "head_label": rep["per_label"][head]["roc_auc"]}
    return out


def workspace_terms(workdir: Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """(terms, is_noisy, labels, stage-1 loss score) of a trained MLRNet workspace: the inputs are those
    ``weights.compute_weights`` gives the meta-net, caught on their way in (its table goes to a temporary file)."""
    from mlrnet_cli import metrics, stageio, weights
    from mlrnet_cli.configs import WeightsConfig
    from mlrnet_cli.workspace import Workspace

    caught: dict[str, Any] = {}
    real = weights.meta_net_weights

    def catch(net, features, labels, curves, losses):  # a pass-through that keeps what it was given
        caught.update(net=net, features=features, labels=labels, curves=curves)
        return real(net, features, labels, curves, losses)

    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(weights, "meta_net_weights", catch):
        res = weights.compute_weights(WeightsConfig(), workdir=workdir, out=Path(tmp) / "weights.arrow")
    if caught["net"].kind != "mlrnet":
        raise SystemExit(f"{workdir}: not an MLRNet model (its meta-net is {caught['net'].kind})")
    if "is_noisy" not in res.table.column_names:
        raise SystemExit(f"{workdir}: its training table does not say which rows are noisy")
    noisy = res.table.column("is_noisy").to_numpy(zero_copy_only=False).astype(bool)
    ws = Workspace.at(workdir)
    stage1 = stageio.read_curves(ws.losses, stageio.read_rows(ws.train))
    terms = logit_terms(caught["net"], caught["features"], caught["labels"], caught["curves"])
    return terms, noisy, caught["labels"], metrics.stage1_loss_score(stage1.losses.double().numpy())


def markdown(rows: list[dict[str, Any]]) -> str:
    """One line per workspace: each term's within-label ROC-AUC (the head label's in brackets)."""
    names = (*TERMS, "stage1-loss")
    lines = ["| workspace | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in rows:
        cells = [f"{row['terms'][n]['within_label']:.4f} ({row['terms'][n]['head_label']:.3f})" for n in names]
        lines.append(f"| {row['workspace']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspaces", nargs="+", type=Path, help="workspaces trained with `mlrnet train --method mlrnet`")
    ap.add_argument("--jsonl", type=Path, help="also append one JSON line per workspace here")
    args = ap.parse_args(argv)
    rows = []
    for ws in args.workspaces:
        terms, noisy, labels, stage1 = workspace_terms(ws)
        rows.append({"workspace": ws.name, "terms": terms_report(terms, noisy, labels, stage1)})
        print(f"{ws.name}: done", file=sys.stderr)
        if args.jsonl:
            with args.jsonl.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
