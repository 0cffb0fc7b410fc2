"""Data-parallel runs under ``torchrun``: process group, rank helpers, per-rank shards, gathers (docs/distributed.md).

A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) never touches ``torch.distributed``: every helper
here is then a no-op or the identity, so one-process runs stay bit-identical to what they were.

Under ``torchrun --nproc-per-node N``, :func:`init_from_env` joins the process group (NCCL on CUDA, gloo on
CPU) from the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` variables torchrun sets.
Each epoch's seeded global permutation is cut into global batches of ``batch_size × world`` rows and every
global batch into disjoint per-rank pieces (:func:`shard_batches`); the classifier's gradients are averaged
by :class:`~torch.nn.parallel.DistributedDataParallel`, the meta-net's by :func:`all_reduce_mean_`.
Only rank 0 writes artifacts and reports progress.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mlrnet_cli.errors import UsageError

#: Environment variables torchrun sets for every worker.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): how many processes torchrun started in all."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the only process that writes artifacts, shows progress and logs."""
    return rank() == 0


def resolve_device(spec: str) -> str:
    """Under a multi-GPU run each process takes the GPU of its ``LOCAL_RANK`` (``auto``/``cuda`` → ``cuda:N``)."""
    if not is_distributed() or not torch.cuda.is_available():
        return spec
    s = (spec or "auto").strip().lower()
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if s in ("auto", "cuda") else spec


def init_from_env(timeout_s: float | None = None) -> bool:
    """Join the process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, gloo on CPU); False when single-process.

    ``timeout_s`` bounds how long a collective waits for the other ranks (torch's default otherwise).
    """
    if env_world_size() <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise UsageError(
            f"WORLD_SIZE > 1 but {', '.join(missing)} not set",
            "start distributed runs with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)",
        )
    use_nccl = torch.cuda.is_available() and dist.is_nccl_available()
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s is not None else {}
    if use_nccl:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        kwargs["device_id"] = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if use_nccl else "gloo", **kwargs)
    return True


@contextlib.contextmanager
def session(timeout_s: float | None = None) -> Iterator[bool]:
    """``init_from_env`` around one command, then (once every rank, rank 0 maybe still writing, gets there) leave
    the process group; yields whether the run is distributed."""
    started = init_from_env(timeout_s)
    try:
        yield started
    finally:
        if started and dist.is_initialized():
            with contextlib.suppress(Exception):  # a failed peer must not turn our own exit into a hang report
                dist.barrier()
            dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache), the others after it, so they read what it wrote."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


@dataclass(frozen=True)
class Shard:
    """This rank's rows of one global batch.

    ``rows``: positions into the epoch's items (never empty). ``share``: the factor that makes the average
    of the ranks' mean losses (what DDP computes) equal the mean over the whole global batch,
    ``len(own rows) × world / len(global batch)``; 0 for a stand-in row when this rank got no real row.
    ``global_size``: rows in the global batch.
    """

    rows: torch.Tensor
    share: float
    global_size: int

    @property
    def is_placeholder(self) -> bool:
        return self.share == 0.0


def num_steps(n: int, batch_size: int, world: int | None = None) -> int:
    """Optimiser steps per epoch: global batches of ``batch_size × world`` rows (the last may be short)."""
    w = world_size() if world is None else world
    return -(-n // (batch_size * w))


def shard_batches(
    perm: torch.Tensor, batch_size: int, rank_: int | None = None, world: int | None = None
) -> list[Shard]:
    """Cut an epoch's global permutation into global batches of ``batch_size × world`` and give rank r the r-th
    of ``world`` near-equal contiguous pieces of each (``torch.tensor_split``): disjoint shards, the union of
    one step's pieces is exactly the single-process batch of size ``batch_size × world``.

    When the last global batch has fewer rows than ranks, a rank left without rows gets that batch's first
    row as a stand-in with ``share = 0``, so it still runs the step's collectives but adds nothing.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    out = []
    for glob in perm.split(batch_size * w):
        own = torch.tensor_split(glob, w)[r]
        out.append(Shard(own, len(own) * w / len(glob), len(glob)) if len(own) else Shard(glob[:1], 0.0, len(glob)))
    return out


def split_evenly(n: int, rank_: int | None = None, world: int | None = None) -> torch.Tensor:
    """This rank's contiguous part of ``range(n)`` (for no-grad passes: evaluation, dev accuracy)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return torch.tensor_split(torch.arange(n), w)[r]


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo handles CPU tensors (and CUDA ones by copying)
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the ranks (a new tensor on ``t``'s device; ``t`` itself in one process)."""
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device(), copy=True).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_reduce_mean_(tensors: Sequence[torch.Tensor | None], weight: float = 1.0) -> None:
    """In place: each tensor ← Σ_r weight_r · tensor_r / world (one flat all-reduce); no-op in one process.

    Used on the meta-net's θ gradients after each rank's virtual step on its shard; ``weight`` is the
    rank's :attr:`Shard.share`, so the result is the row-weighted mean of the per-rank meta gradients.
    """
    present = [t for t in tensors if t is not None]
    if not is_distributed() or not present:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in present]).mul_(weight)
    buf = flat.to(_comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf = buf.div_(world_size()).to(present[0].device)
    for t, part in zip(present, buf.split([t.numel() for t in present]), strict=True):
        t.copy_(part.view_as(t).to(t.dtype))


def gather_rows(rows: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """A dense ``[size, ...]`` tensor (row-position order, i.e. the table's ``sample_id`` order) holding every
    rank's ``values[i]`` at ``rows[i]``; rows no rank sent stay 0. One ``all_gather_object`` of the ranks'
    (rows, values); every rank gets the result, rank 0 is the one that writes it."""
    parts: list[Any] = [(rows.reshape(-1).long().cpu(), values.detach().cpu())]
    if is_distributed():
        mine, parts = parts[0], [None] * world_size()
        dist.all_gather_object(parts, mine)
    out = values.new_zeros((size, *values.shape[1:]))
    for r, v in parts:
        out[r.to(out.device)] = v.to(out.device)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; small objects only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module_(module: nn.Module) -> None:
    """Overwrite every rank's parameters and buffers with rank 0's (identical start)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            buf = t.detach().to(_comm_device(), copy=True)
            dist.broadcast(buf, src=0)
            t.copy_(buf.to(t.device))


class ForwardModule(nn.Module):
    """``fn(model, inputs)`` as a module, so DistributedDataParallel, torch.compile and ``functional_call`` can
    wrap one forward that is not ``model.forward`` (e.g. logits from cached features, the head alone on features).
    ``inputs`` may be a list of input dicts (a step that mixes tables): each runs and the outputs are concatenated,
    still one DDP forward."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor | Sequence[Mapping[str, torch.Tensor]]) -> Any:
        if isinstance(inputs, Mapping | torch.Tensor):
            return self.fn(self.model, inputs)
        outs = [self.fn(self.model, i) for i in inputs]
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
        return torch.cat(outs)


def training_forward(
    model: nn.Module,
    fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], Any],
    device: torch.device,
    *,
    compile_forward: bool = False,
) -> Callable[[Any], Any]:
    """The callable the real training step runs: ``fn(model, ·)`` directly in one process (the exact
    pre-existing path), through DDP (gradients all-reduced in the backward) under torchrun, optionally
    through ``torch.compile``."""
    module: nn.Module = ForwardModule(model, fn)
    if not is_distributed() and not compile_forward:
        return module.forward  # no module call: no hooks, the plain function
    if is_distributed():
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # BERT-family buffers are constants (position ids): no per-forward buffer sync
        new_api = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers" if new_api else "broadcast_buffers": False}
        ids = [device.index] if device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=ids, **no_sync)
    if compile_forward:
        module = torch.compile(module)
    return module
