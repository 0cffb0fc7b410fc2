"""Every random stream of a run, derived from its ``--seed`` in one place: one named stream per purpose.

The derivations are those of the runs before this module existed, so a fixed seed gives the same bytes.
Each purpose has its own stream, so drawing more from one (a larger meta set, another method) does not move
the others. Under torchrun the streams that must differ per rank (dropout) take the rank; those every rank
must agree on (shuffles, the meta/dev split) do not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

_EPOCH_STREAMS = {"train-order": 0, "meta-batches": 1}


def corrupt_rng(seed: int) -> np.random.Generator:
    """`corrupt`: class order, clean pool, subsampling and label noise, drawn in that order from one stream."""
    return np.random.default_rng(seed)


def test_split_rng(seed: int) -> np.random.Generator:
    """`corrupt`: the stratified test split held out from a source without one (a stream of its own, so the
    seed alone fixes it and it moves no other draw)."""
    return np.random.default_rng([seed, 7357])


def clean_pool_split_rng(seed: int) -> np.random.Generator:
    """`train`: the per-class shuffles that split the clean pool into dev and meta rows."""
    return np.random.default_rng([seed, 20240])


def collect_shuffle(seed: int) -> torch.Generator:
    """`collect-losses`: the epoch permutations, one generator for the whole run (saved with the checkpoint)."""
    import torch

    return torch.Generator().manual_seed(seed)


def collect_dropout_seed(seed: int, rank: int) -> int:
    """`collect-losses`: the global torch seed (dropout), one stream per rank (rank 0's is the single-process one)."""
    return seed + rank


def train_epoch_generator(seed: int, epoch: int, stream: str) -> torch.Generator:
    """`train`: a fresh generator per epoch and purpose (``train-order``, ``meta-batches``): a resumed run draws
    the same numbers without saving generator state. ``epoch`` counts from 0."""
    import torch

    return torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch * 101 + _EPOCH_STREAMS[stream])


def train_dropout_seed(seed: int, epoch: int, rank: int) -> int:
    """`train`: the global torch seed (dropout masks) of an epoch (from 0), one stream per rank."""
    return seed * 7919 + epoch + 1_000_003 * rank


def init_seed(seed: int) -> int:
    """Weights a model or meta-net initialises at random (a new head, the meta-net's θ)."""
    return seed
