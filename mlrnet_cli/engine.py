"""The one epoch loop of `collect-losses` and `train`.

:class:`Loop` owns what both stages share: the training-mode epoch over this rank's DDP shards, the
optimiser and scheduler steps, the progress bar (the loss is read back from the device only every
``PROGRESS_LOSS_EVERY`` steps), the per-epoch checkpoint and its resume (one format, :class:`Checkpoint`,
read with ``weights_only``). A stage supplies :class:`EpochHooks`: the epoch's shards, a step per method
(one global batch -> the loss to differentiate) and what to do once an epoch ends (statistics, an evaluation
pass, its model folders).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mlrnet_cli import artifacts, distributed
from mlrnet_cli.distributed import Shard
from mlrnet_cli.errors import ArtifactError, ArtifactExistsError
from mlrnet_cli.progress import Progress

log = logging.getLogger("mlrnet")

#: the loop reads the loss back for the progress bar only every this many steps (a host sync)
PROGRESS_LOSS_EVERY = 10
STATE_FILE = "state.pt"


@dataclass
class StepOutput:
    """One step's result: ``loss`` to backpropagate (already scaled by the shard's share under DDP) and the
    detached batch loss the progress bar shows."""

    loss: torch.Tensor
    shown: torch.Tensor


#: a method's step: (this rank's shard of the global batch, the global step index) -> StepOutput
Step = Callable[[Shard, int], StepOutput]


class EpochHooks(Protocol):
    """What a stage plugs into :class:`Loop` (epochs are numbered from 1)."""

    def epoch_shards(self, epoch: int) -> tuple[list[Shard], str, int]:
        """This rank's shards of the epoch, the progress description and the epoch's number of rows."""

    def end_epoch(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        """After the last step: gather, evaluate, log; returns the epoch's history row."""

    def save(self, epoch: int, history: list[dict[str, Any]]) -> None:
        """Rank 0, after every epoch: the stage's per-epoch artifacts (before the checkpoint)."""

    def state(self) -> dict[str, Any]:
        """What the stage adds to the checkpoint (tensors, numbers, lists; no objects)."""

    def load_state(self, state: dict[str, Any]) -> None: ...


class RollbackHooks(EpochHooks, Protocol):
    """Hooks that may ask for an epoch to be run again from the state it began with (train's collapse guard)."""

    def rollback(self, epoch: int, row: dict[str, Any]) -> bool:
        """After ``end_epoch``: whether to discard the epoch (identically on every rank)."""

    def rolled_back(self) -> None:
        """After the loop restored the epoch's starting state: apply what the rerun changes."""


class Checkpoint:
    """``<folder>/state.pt``: the resume state of a run, tagged with the run's metadata; written by rank 0 after
    every epoch (atomically) and read with ``weights_only`` (a state file is data, never code)."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder, self.path, self.meta = folder, folder / STATE_FILE, meta

    @staticmethod
    def read(path: Path, *, mmap: bool = False) -> dict[str, Any]:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # UnpicklingError, a truncated zip, ...: all mean "not a state we wrote"
            # (torch's own message advises weights_only=False, i.e. running the file's code: never quoted)
            raise ArtifactError(
                f"resume state {path} is damaged or was not written by mlrnet ({type(e).__name__})",
                f"delete {path.parent} or pass --overwrite to start again",
            ) from e

    def load(self, overwrite: bool) -> dict[str, Any] | None:
        """The saved state of this very run; None when there is none (or, with ``overwrite``, another run's or
        an unreadable one)."""
        if not self.path.is_file():
            return None
        try:
            state = self.read(self.path)
        except ArtifactError:
            if not overwrite:
                raise
            log.warning("resume state %s is unreadable: starting again (--overwrite)", self.path)
            return None
        if artifacts.provenance(state.get("meta") or {}) != artifacts.provenance(self.meta):
            if overwrite:
                return None
            raise ArtifactExistsError(
                f"{self.folder} holds the state of a different run (other config or inputs)",
                "pass --overwrite to start again, or choose another output folder",
            )
        return state

    def save(self, state: dict[str, Any]) -> None:
        with artifacts.atomic_path(self.path) as tmp, open(tmp, "wb") as fh:
            out = _RecordingWriter(fh)
            try:
                torch.save({"meta": self.meta, **state}, out)
            except RuntimeError:
                if out.error is None:
                    raise
                raise out.error from None  # a full disk, not "unexpected pos": atomic_path says so in one line


class _RecordingWriter:
    """A file for torch.save that keeps the OSError of a failed write: torch's zip writer reports it only as a
    RuntimeError without the cause."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.error = fh, None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.fh.flush()


@dataclass
class Loop:
    """The optimisation loop of one run: the model, its optimiser and schedule, on ``device``."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    epochs: int
    checkpoint: Checkpoint
    progress: Progress
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0  #: time inside the step loops (throughput)
    rollback: bool = False  #: the hooks are RollbackHooks and may reject an epoch

    def resume(self, state: dict[str, Any], hooks: EpochHooks) -> int:
        """Restore a checkpoint; returns the number of finished epochs."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["cpu_rng"])
        if self.device.type == "cuda" and state["cuda_rng"].numel():
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.history = [dict(r) for r in state["history"]]
        hooks.load_state(state)
        return int(state["epoch"])

    def run(self, hooks: EpochHooks, step: Step, start: int = 0, step_index: int = 0) -> None:
        """Epochs ``start+1 .. epochs``: the steps, the stage's end of epoch, its artifacts and the checkpoint.

        With ``rollback``, an epoch the :class:`RollbackHooks` reject is run again from the checkpoint it began
        with (epoch 0's is written first, so every epoch has one)."""
        if self.rollback and start == 0 and distributed.is_main():
            self.checkpoint.save(self.state(0, hooks))
        epoch = start + 1
        while epoch <= self.epochs:
            steps_before = step_index
            step_index = self._epoch(hooks, step, epoch, step_index)
            row = hooks.end_epoch(epoch, self.history)
            if self.rollback and hooks.rollback(epoch, row):
                distributed.barrier()  # rank 0 wrote the epoch's starting checkpoint before it began
                begun = Checkpoint.read(self.checkpoint.path)
                if int(begun["epoch"]) != epoch - 1:
                    raise ArtifactError(f"{self.checkpoint.path} is not the state epoch {epoch} began with")
                self.resume(begun, hooks)
                hooks.rolled_back()
                step_index = steps_before
                continue
            self.history.append(row)
            if distributed.is_main():  # every rank holds the same model and history: rank 0 writes
                hooks.save(epoch, self.history)
                self.checkpoint.save(self.state(epoch, hooks))
            epoch += 1

    def probe(self, hooks: EpochHooks, step: Step, steps: int, description: str) -> None:
        """Only the first ``steps`` steps of epoch 1, shown as ``description``: no end of epoch, no artifacts, no
        checkpoint (train's --meta-lr-probe)."""
        self._epoch(hooks, step, 1, 0, limit=steps, shown=description)

    def _epoch(
        self, hooks: EpochHooks, step: Step, epoch: int, step_index: int, limit: int | None = None, shown: str = ""
    ) -> int:
        """One epoch's steps (with ``limit``, only its first ones; ``shown`` replaces the progress description);
        returns the next global step index."""
        shards, description, total = hooks.epoch_shards(epoch)
        if limit is not None:
            shards = shards[:limit]
            total = sum(shard.global_size for shard in shards)
        description = shown or description
        self.model.train()
        t0 = time.perf_counter()
        with self.progress.task(description, total=total) as task:
            for k, shard in enumerate(shards):
                out = step(shard, step_index)
                self.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                step_index += 1
                # reading the loss back syncs with the device: only now and then, for the progress bar
                shown = k % PROGRESS_LOSS_EVERY == 0 or k == len(shards) - 1
                task.advance(shard.global_size, **({"loss": float(out.shown)} if shown else {}))
        self.train_seconds += time.perf_counter() - t0
        return step_index

    def state(self, epoch: int, hooks: EpochHooks) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else torch.empty(0, dtype=torch.uint8),
            "history": self.history,
            **hooks.state(),
        }


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Host numbers added over the ranks (themselves in one process)."""
    return distributed.all_reduce_sum(torch.tensor(list(values), dtype=torch.float64)).tolist()
