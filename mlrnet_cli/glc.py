"""Gold Loss Correction (Hendrycks, Mazeika, Wilson & Gimpel, NeurIPS 2018, "Using Trusted Data to Train Deep
Networks on Labels Corrupted by Severe Noise"): the two pure computations of ``train --method glc``.

1. :func:`glc_corruption_matrix`: Ĉ[i, j] ≈ p(observed label j | true class i), the mean softmax of a
   classifier trained on the untrusted (biased) rows over the trusted rows of true class i;
2. :func:`forward_corrected_loss`: the loss of an untrusted row, -log((softmax(f(x)) @ Ĉ)[ỹ]).

No model and no data here: `train` feeds them the stage-1 classifier's probabilities on the meta set.
"""

from __future__ import annotations

import torch

#: the corrected probability of the observed label is clamped from below (a row whose observed label Ĉ calls
#: impossible would give log 0 = -inf)
MIN_PROBABILITY = 1e-8


def glc_corruption_matrix(probs: torch.Tensor, true_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Ĉ ``[num_classes, num_classes]`` (float64): row i is the mean of ``probs`` (``[n, num_classes]``, each row
    a distribution over the observed labels) over the rows whose true label is i.

    A class with no trusted rows has no estimate: its row is the identity row (its labels are taken as
    clean, so the corrected loss of its rows is plain cross-entropy up to the other rows' mass)."""
    if probs.ndim != 2 or probs.shape[1] != num_classes or len(true_labels) != len(probs):
        raise ValueError(f"probs {tuple(probs.shape)} and {len(true_labels)} labels for {num_classes} classes")
    p = probs.detach().to(torch.float64).cpu()
    y = true_labels.detach().to(torch.int64).cpu()
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64).index_add_(0, y, p)
    counts = torch.bincount(y, minlength=num_classes).to(torch.float64)
    eye = torch.eye(num_classes, dtype=torch.float64)
    return torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None], eye)


def forward_corrected_loss(logits: torch.Tensor, labels: torch.Tensor, corruption: torch.Tensor) -> torch.Tensor:
    """Per row ``-log(max((softmax(logits) @ Ĉ)[label], MIN_PROBABILITY))`` (float32 at least, also under bf16
    autocast): the model's distribution over the true classes, pushed through Ĉ to one over observed labels."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    observed = logits.softmax(-1) @ corruption.to(logits.dtype)
    picked = observed.gather(1, labels.long()[:, None]).squeeze(1)
    return -picked.clamp(min=MIN_PROBABILITY).log()
