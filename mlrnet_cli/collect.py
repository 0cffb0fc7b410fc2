"""Stage 1 (paper §3.3): fine-tune normally on the biased set and record every sample's loss at every epoch.

``L_i = [L_i^0 ... L_i^T]``: cross-entropy of sample i against its *observed* label, epoch 0 before any
update, epochs 1..T either from the training forward itself (``record="train"``, free, with dropout) or
from an extra no-dropout pass after each epoch (``record="eval"``). :func:`mlrnet_cli.metanet.normalized_curves`
gives the curves ``I_i`` that the MLRNet meta-net reads. The loop itself is :class:`mlrnet_cli.engine.Loop`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mlrnet_cli import artifacts, distributed, locks, modeling, seeding, stageio
from mlrnet_cli.configs import CollectConfig
from mlrnet_cli.distributed import Shard
from mlrnet_cli.engine import STATE_FILE, Checkpoint, Loop, StepOutput, sum_over_ranks
from mlrnet_cli.errors import ArtifactError, DataError, UsageError
from mlrnet_cli.modeling import autocast_context, to_device
from mlrnet_cli.progress import NullProgress, Progress
from mlrnet_cli.progress import get as get_progress
from mlrnet_cli.tokens import (
    TokenCache,
    clean_cache,
    encode_features,
    features_key,
    length_grouped_batches,
    tokenize_table,
)

log = logging.getLogger("mlrnet")

STAGE = "collect-losses"
_STATE_DIR = "state"


@dataclass(frozen=True)
class CollectResult:
    losses_path: Path
    stage1_dir: Path
    num_samples: int
    epochs: int
    history: list[dict[str, Any]]
    fingerprint: str  #: of losses.safetensors
    resumed_from: int | None = None  #: last finished epoch found in the saved state, if any
    up_to_date: bool = False  #: the outputs already existed from this very run: nothing was recomputed
    seconds: float = 0.0
    samples_per_second: float = 0.0  #: training samples per second over the trained epochs
    token_cache: Path | None = None
    feature_cache: Path | None = None

    def summary(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("num_samples", "epochs", "resumed_from", "up_to_date", "fingerprint")}
        out |= {"seconds": round(self.seconds, 3), "samples_per_second": round(self.samples_per_second, 2)}
        return {"stage": STAGE, **out, "final": self.history[-1] if self.history else None}


def _read_inputs(train_path: Path, manifest_path: Path | None) -> tuple[stageio.Rows, stageio.Manifest]:
    """The training rows, and the manifest (without one, classes ``0..max label`` named by their ids)."""
    manifest = stageio.read_manifest(manifest_path) if manifest_path is not None else None
    rows = stageio.read_rows(train_path, "training table", manifest.num_classes if manifest else None)
    n = int(rows.labels.max()) + 1
    return rows, manifest or stageio.Manifest(n, [str(i) for i in range(n)])


def _stage1_meta_reader(path: Path) -> dict[str, Any] | None:
    """Meta of a finished stage1/ folder, or of the run whose state it holds, or None if empty."""
    if (path / "mlrnet.json").is_file():
        return artifacts.read_any_meta(path)
    state = path / _STATE_DIR / STATE_FILE
    meta = Checkpoint.read(state, mmap=True).get("meta") if state.is_file() else None
    return dict(meta, kind="stage1") if isinstance(meta, dict) else None


class _Stats:
    """Running loss/accuracy sums against observed and (where known) true labels, kept on the device.

    Nothing is read back until :meth:`row` (once per epoch), and under torchrun the sums are added over the
    ranks there. On CPU the float sums use the boolean-indexed rows, exactly as before; on CUDA they use
    masked sums instead (boolean indexing would sync with the host every step): equal up to rounding.
    """

    _FIELDS = ("loss", "correct", "tn", "tloss", "tcorrect", "noisy_n", "noisy_loss", "clean_n", "clean_loss")

    def __init__(self, device: torch.device, sync_free: bool | None = None) -> None:
        self.n = 0
        self.sums = torch.zeros(len(self._FIELDS), dtype=torch.float64, device=device)
        self.sync_free = device.type == "cuda" if sync_free is None else sync_free

    def add(self, logits: torch.Tensor, per: torch.Tensor, y: torch.Tensor, yt: torch.Tensor | None) -> None:
        pred = logits.argmax(-1)
        self.n += len(y)
        vals = [per.sum(), (pred == y).sum()]
        if yt is not None:
            known = yt >= 0
            noisy = known & (yt != y)
            clean = known & (yt == y)
            if self.sync_free:
                tl = F.cross_entropy(logits, yt.clamp_min(0), reduction="none")
                tloss, noisy_loss = torch.where(known, tl, 0.0).sum(), torch.where(noisy, per, 0.0).sum()
                clean_loss = torch.where(clean, per, 0.0).sum()
            else:
                tl = F.cross_entropy(logits[known], yt[known], reduction="none")
                tloss, noisy_loss, clean_loss = tl.sum(), per[noisy].sum(), per[clean].sum()
            vals += [known.sum(), tloss, (known & (pred == yt)).sum(), noisy.sum(), noisy_loss, clean.sum(), clean_loss]
        self.sums[: len(vals)] += torch.stack([v.to(torch.float64) for v in vals])

    def row(self, epoch: int, source: str) -> dict[str, Any]:
        n = max(int(sum_over_ranks([self.n])[0]), 1)
        sums = distributed.all_reduce_sum(self.sums).tolist()
        loss, correct, tn, tloss, tcorrect, noisy_n, noisy_loss, clean_n, clean_loss = sums
        row: dict[str, Any] = {"epoch": epoch, "source": source, "loss": loss / n, "accuracy": correct / n}
        if tn:
            row.update(true_loss=tloss / tn, true_accuracy=tcorrect / tn)
        if noisy_n:
            row["noisy_loss"] = noisy_loss / noisy_n
        if clean_n:
            row["clean_loss"] = clean_loss / clean_n
        return row


def _param_groups(params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    no_decay = [p for n, p in params if p.ndim < 2 or "LayerNorm" in n or "layer_norm" in n]
    decay = [p for n, p in params if not (p.ndim < 2 or "LayerNorm" in n or "layer_norm" in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def collect_losses(
    config: CollectConfig,
    *,
    train_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str] | None,
    losses_path: str | os.PathLike[str],
    stage1_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    overwrite: bool = False,
    progress: Progress | None = None,
) -> CollectResult:
    """Fine-tune on the biased set and write the per-sample loss curves L_i = [L_i^0 ... L_i^T] (paper §3.3)."""
    config.validate()
    for target in (losses_path, stage1_dir, cache_dir):
        artifacts.check_writable(target)  # now, not after the first epoch
    given = (train_path, manifest_path, losses_path, stage1_dir, cache_dir)
    paths = _Paths(*(Path(p) if p is not None else None for p in given))
    # one writer per output (under torchrun, rank 0 writes for all): a second run fails now, not mid-epoch
    with locks.exclusive([paths.losses, paths.stage1], STAGE) if distributed.is_main() else contextlib.nullcontext():
        t_start = time.perf_counter()
        rows, manifest = _read_inputs(paths.train, paths.manifest)
        meta, state = _prepare(config, paths, manifest, overwrite)
        if not overwrite:
            done = _finished_result(paths, meta, len(rows), config.epochs)
            if done is not None:
                log.info("collect-losses: %s is up to date (same inputs and config)", paths.losses)
                return done
        return _collect(config, paths, rows, manifest, meta, state, overwrite, progress, t_start)


@dataclass(frozen=True)
class _Paths:
    train: Path
    manifest: Path | None
    losses: Path
    stage1: Path
    cache: Path


def _prepare(
    config: CollectConfig, paths: _Paths, manifest: stageio.Manifest, overwrite: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The run's metadata and resume state, once the outputs are known to be ours (or free) and a killed run's
    temps are gone."""
    model_path = Path(config.model).expanduser()
    if model_path.exists() and paths.stage1.exists() and model_path.resolve() == paths.stage1.resolve():
        raise UsageError(f"--model {config.model} is the output folder --stage1-dir: choose another --stage1-dir")
    inputs = {"train": artifacts.fingerprint_file(paths.train), "model": modeling.model_fingerprint(config.model)}
    run = {k: getattr(config, k) for k in ("model", "epochs", "lr", "record")}
    run |= {"num_classes": manifest.num_classes, "class_names": manifest.class_names}
    meta = artifacts.make_meta(STAGE, "losses", config.provenance_config(), config.seed, inputs, **run)
    input_paths = [paths.train] + ([paths.manifest] if paths.manifest else [])
    if distributed.is_main():  # under torchrun only rank 0 changes files; the others read after the barrier
        stageio.clean_stale([paths.stage1, paths.losses])
        clean_cache(paths.cache)
        if paths.stage1.is_dir() and not any(paths.stage1.iterdir()):
            paths.stage1.rmdir()  # an empty folder (a run killed before its first epoch ended) holds nothing to guard
    distributed.barrier()
    # --overwrite starts again: the old state is never read (it goes with the old stage1/ once the model loads)
    state = None if overwrite else Checkpoint(paths.stage1 / _STATE_DIR, meta).load(overwrite=False)
    artifacts.guard_output(paths.losses, meta, inputs=input_paths, overwrite=overwrite)
    artifacts.guard_output(
        paths.stage1, dict(meta, kind="stage1"), inputs=input_paths, overwrite=overwrite, read_meta=_stage1_meta_reader
    )
    return meta, state


def _collect(
    config: CollectConfig,
    paths: _Paths,
    rows: stageio.Rows,
    manifest: stageio.Manifest,
    meta: dict[str, Any],
    state: dict[str, Any] | None,
    overwrite: bool,
    progress: Progress | None,
    t_start: float,
) -> CollectResult:
    device = modeling.select_device(distributed.resolve_device(config.device))
    tokenizer = modeling.load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    model = modeling.load_classifier(
        config.model,
        manifest.num_classes,
        manifest.class_names,
        allow_pickle=config.allow_pickle,
        trust_remote_code=config.trust_remote_code,
        init_seed=seeding.init_seed(config.seed),
    ).to(device)
    # only once the model loaded: a bad --model with --overwrite must leave the old outputs alone
    distributed.barrier()  # every rank has read the old outputs before rank 0 removes them
    if overwrite and distributed.is_main():
        if (paths.stage1 / "mlrnet.json").is_file() or (paths.stage1 / _STATE_DIR).exists():
            # a previous stage-1 folder of ours: start clean (no stale tokenizer files, no foreign state)
            shutil.rmtree(paths.stage1)
    distributed.barrier()
    with distributed.main_first():  # rank 0 fills the token cache, the others read it
        token_cache = tokenize_table(
            paths.train, tokenizer, meta["inputs"]["model"], config.max_length, paths.cache, table=rows.table
        )
    pad_id = modeling.pad_token_id(tokenizer)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seeding.collect_dropout_seed(config.seed, distributed.rank()))
        run = _Run(config, rows, token_cache, model, device, pad_id, paths.cache, meta["inputs"]["model"], progress)
        loop = run.loop(Checkpoint(paths.stage1 / _STATE_DIR, meta), state)
    losses_cpu = run.losses.cpu()
    if not torch.isfinite(losses_cpu).all():
        raise DataError("training diverged: some recorded losses are not finite", "lower --lr")

    # outputs: the stage-1 classifier first, the curves last (their presence marks a finished run)
    curves = {"losses": losses_cpu, "sample_id": torch.from_numpy(rows.sample_ids)}
    fp = None
    if distributed.is_main():
        _write_stage1(paths.stage1, model, tokenizer, loop.history, dict(meta, kind="stage1"))
        fp = artifacts.write_tensors(paths.losses, curves, meta)
        shutil.rmtree(paths.stage1 / _STATE_DIR, ignore_errors=True)
    fp = distributed.broadcast_object(fp)  # the others return once the outputs exist
    return CollectResult(
        losses_path=paths.losses,
        stage1_dir=paths.stage1,
        num_samples=len(rows),
        epochs=config.epochs,
        history=loop.history,
        fingerprint=fp,
        resumed_from=run.resumed_from,
        seconds=time.perf_counter() - t_start,
        samples_per_second=run.trained / loop.train_seconds if loop.train_seconds else 0.0,
        token_cache=token_cache.path,
        feature_cache=run.feature_cache,
    )


def _finished_result(paths: _Paths, meta: dict[str, Any], n: int, epochs: int) -> CollectResult | None:
    if not (paths.losses.is_file() and (paths.stage1 / "mlrnet.json").is_file()):
        return None
    try:
        old = artifacts.read_tensors_meta(paths.losses)
        s1 = artifacts.read_json(paths.stage1 / "mlrnet.json")
        hist = artifacts.read_json(paths.stage1 / "history.json").get("epochs", [])
    except ArtifactError:
        return None
    if not old or artifacts.provenance(old) != artifacts.provenance(meta):
        return None
    if artifacts.provenance(s1.get(artifacts.META_KEY) or {}) != artifacts.provenance(dict(meta, kind="stage1")):
        return None
    shutil.rmtree(paths.stage1 / _STATE_DIR, ignore_errors=True)
    fp = artifacts.fingerprint_file(paths.losses)
    return CollectResult(paths.losses, paths.stage1, n, epochs, hist, fp, up_to_date=True)


def _write_stage1(
    stage1_dir: Path, model: torch.nn.Module, tokenizer: Any, history: list[dict[str, Any]], meta: dict[str, Any]
) -> None:
    """The stage-1 classifier, swapped in whole; the resume state moves across (a kill before the curves are
    written resumes without training again). A frozen encoder (``freeze_encoder`` in the config) gets a shard
    of its own, which `train` links to."""
    files = {
        "history.json": stageio.json_file({artifacts.META_KEY: meta, "epochs": history}),
        "mlrnet.json": stageio.json_file({artifacts.META_KEY: meta}),
    }
    frozen = (modeling.head_name(model) + ".", []) if meta["config"].get("freeze_encoder") else None
    stageio.write_model_folder(stage1_dir, model, tokenizer, files, keep=[_STATE_DIR], frozen=frozen)


def _classifier_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a batch: the head on cached features (``--freeze-encoder``), else the whole classifier."""
    if "features" in inputs:
        return modeling.head_logits(model, inputs["features"])
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


class _Run:
    """collect-losses as :class:`~mlrnet_cli.engine.Loop` hooks: plain fine-tuning (the whole classifier, or the
    head on cached features) that records every row's loss of every epoch."""

    def __init__(
        self,
        config: CollectConfig,
        rows: stageio.Rows,
        tokens: TokenCache,
        model: torch.nn.Module,
        device: torch.device,
        pad_id: int,
        cache_dir: Path,
        model_fp: str,
        progress: Progress | None,
    ) -> None:
        self.config, self.tokens, self.model, self.device, self.pad_id = config, tokens, model, device, pad_id
        self.progress = get_progress(progress) if distributed.is_main() else NullProgress()
        self.n = len(rows)
        self.labels = torch.from_numpy(rows.labels).to(device)
        true = rows.true_labels  # -1 where unknown
        self.true = torch.from_numpy(true).to(device) if true is not None else None
        self.losses = torch.zeros((self.n, config.epochs + 1), dtype=torch.float32, device=device)
        self.features: torch.Tensor | None = None
        self.feature_cache: Path | None = None
        self.resumed_from: int | None = None
        self.trained = 0
        if config.freeze_encoder:
            self._freeze_encoder(cache_dir, model_fp)
        self.generator = seeding.collect_shuffle(config.seed)
        # the real step's forward: the model itself, or DDP (gradient all-reduce) / torch.compile around it
        self.train_forward = distributed.training_forward(
            model, _classifier_logits, device, compile_forward=config.compile
        )

    def _freeze_encoder(self, cache_dir: Path, model_fp: str) -> None:
        encoder_id = modeling.encoder_cache_id(self.model, model_fp, self.config.seed)
        opts = {"cache_dir": cache_dir, "pad_id": self.pad_id, "device": self.device, "progress": self.progress}
        with distributed.main_first():
            self.features = encode_features(self.model, self.tokens, model_id=encoder_id, **opts).to(self.device)
        self.feature_cache = cache_dir / f"features-{features_key(encoder_id, self.tokens.key)}.safetensors"
        self.model.requires_grad_(False)
        modeling.head_module(self.model).requires_grad_(True)

    def loop(self, checkpoint: Checkpoint, state: dict[str, Any] | None) -> Loop:
        """Epoch 0 (before any update), then epochs 1..T through the engine; resumes from a checkpoint."""
        from transformers import get_linear_schedule_with_warmup

        cfg = self.config
        trainable = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(_param_groups(trainable, cfg.weight_decay), lr=cfg.lr)
        # global steps: batches of batch_size rows per rank (batch_size x world in all)
        steps = cfg.epochs * distributed.num_steps(self.n, cfg.batch_size)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * steps), steps)
        loop = Loop(self.model, optimizer, scheduler, self.device, cfg.epochs, checkpoint, self.progress)
        start = 0
        if state is not None:
            start = self.resumed_from = loop.resume(state, self)
            log.info("collect-losses: resuming after epoch %d", start)
        else:
            loop.history.append(self.eval_pass(0))  # L^0: before any update
        loop.run(self, self.step, start)
        self.trained = self.n * (cfg.epochs - start)
        return loop

    def _inputs(self, idx: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        if self.features is not None:
            return {"features": self.features[torch.as_tensor(idx, device=self.device)]}
        ids, mask = self.tokens.batch(idx, self.pad_id)
        return {"input_ids": to_device(ids, self.device), "attention_mask": to_device(mask, self.device)}

    def _true(self, rows: torch.Tensor) -> torch.Tensor | None:
        return self.true[rows] if self.true is not None else None

    @torch.no_grad()
    def eval_pass(self, epoch: int) -> dict[str, Any]:
        """Losses of every sample in eval mode (no dropout) into column ``epoch`` (ranks split the batches)."""
        self.model.eval()
        stats = _Stats(self.device)
        batches = length_grouped_batches(self.tokens.lengths, max(self.config.batch_size, 64))
        own = batches[distributed.rank() :: distributed.world_size()]
        with self.progress.task(f"epoch {epoch}/{self.config.epochs} (recording)", total=sum(map(len, own))) as task:
            for idx in own:
                rows = to_device(torch.from_numpy(idx), self.device)
                with autocast_context(self.device):
                    logits = _classifier_logits(self.model, self._inputs(idx))
                logits = logits.float()
                per = F.cross_entropy(logits, self.labels[rows], reduction="none")
                self.losses[rows, epoch] = per
                stats.add(logits, per, self.labels[rows], self._true(rows))
                task.advance(len(idx))
        if distributed.is_distributed():
            self._gather_column(epoch, [torch.from_numpy(b) for b in own])
        return stats.row(epoch, "eval")

    def _gather_column(self, epoch: int, own_rows: list[torch.Tensor]) -> None:
        """Every rank's recorded losses of this epoch into column ``epoch`` (row order = sample_id order)."""
        rows = (torch.cat(own_rows) if own_rows else torch.zeros(0, dtype=torch.int64)).to(self.device)
        self.losses[:, epoch] = distributed.gather_rows(rows, self.losses[rows, epoch], self.n)

    # -- engine hooks ------------------------------------------------------------------------------------

    def epoch_shards(self, epoch: int) -> tuple[list[Shard], str, int]:
        self._epoch, self._stats, self._own_rows = epoch, _Stats(self.device), []
        perm = torch.randperm(self.n, generator=self.generator)
        return distributed.shard_batches(perm, self.config.batch_size), f"epoch {epoch}/{self.config.epochs}", self.n

    def step(self, shard: Shard, index: int) -> StepOutput:
        idx = shard.rows
        rows = to_device(idx, self.device)
        y = self.labels[rows]
        with autocast_context(self.device):
            logits = self.train_forward(self._inputs(idx.numpy()))
        # per-sample CE against the observed label (the HF `labels=` path only returns the mean)
        per = F.cross_entropy(logits.float(), y, reduction="none")
        # under DDP (gradients averaged over the ranks) the share makes it the global batch's mean
        loss = per.sum() * (shard.share / len(idx)) if distributed.is_distributed() else per.mean()
        if self.config.record == "train" and not shard.is_placeholder:
            self.losses[rows, self._epoch] = per.detach()
            self._stats.add(logits.detach().float(), per.detach(), y, self._true(rows))
            self._own_rows.append(idx)
        return StepOutput(loss, per.detach().mean())

    def end_epoch(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        if self.config.record == "train":
            if distributed.is_distributed():
                self._gather_column(epoch, self._own_rows)
            row = self._stats.row(epoch, "train")
        else:
            row = self.eval_pass(epoch)
        true_acc = f", true accuracy {row['true_accuracy']:.3f}" if "true_accuracy" in row else ""
        log.info(
            "epoch %d/%d: loss %.4f, accuracy %.3f%s", epoch, self.config.epochs, row["loss"], row["accuracy"], true_acc
        )
        return row

    def save(self, epoch: int, history: list[dict[str, Any]]) -> None:
        """Nothing per epoch: the curves and stage1/ are written once, after the last epoch."""

    def state(self) -> dict[str, Any]:
        return {"losses": self.losses.cpu(), "shuffle_rng": self.generator.get_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        done = int(state["epoch"]) + 1
        self.losses[:, :done] = state["losses"][:, :done].to(self.losses.device)
        self.generator.set_state(state["shuffle_rng"])
