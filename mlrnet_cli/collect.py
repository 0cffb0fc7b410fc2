"""Stage 1 (paper §3.3): fine-tune normally on the biased set and record every sample's loss at every epoch.

``L_i = [L_i^0 ... L_i^T]``: cross-entropy of sample i against its *observed* label, epoch 0 before any
update, epochs 1..T either from the training forward itself (``record="train"``, free, with dropout) or
from an extra no-dropout pass after each epoch (``record="eval"``). :func:`normalized_curves` gives the
curves ``I_i`` that the MLRNet meta-net reads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mlrnet_cli import artifacts, distributed, locks
from mlrnet_cli.errors import ArtifactError, ArtifactExistsError, ConfigError, DataError, UsageError
from mlrnet_cli.modeling import (
    autocast_context,
    encoder_cache_id,
    head_logits,
    head_module,
    head_name,
    load_classifier,
    load_tokenizer,
    model_fingerprint,
    select_device,
    to_device,
)
from mlrnet_cli.progress import NullProgress, Progress
from mlrnet_cli.progress import get as get_progress
from mlrnet_cli.tokens import TokenCache, clean_cache, encode_features, length_grouped_batches, tokenize_table

log = logging.getLogger("mlrnet")

STAGE = "collect-losses"
RECORD_MODES = ("train", "eval")
_STATE_DIR = "state"
_EPOCH_PREFIX = "epoch-"
# don't change results (compile: up to float rounding): not in provenance
_RUNTIME_FIELDS = ("device", "allow_pickle", "trust_remote_code", "compile")
#: the training loop reads the loss back for the progress bar only every this many steps (a host sync)
_PROGRESS_LOSS_EVERY = 10


@dataclass(frozen=True)
class CollectConfig:
    """Hyperparameters of stage 1 (defaults: the paper's AG News setting, §4.2)."""

    model: str = "bert-base-uncased"  #: hub id or local folder of an AutoModelForSequenceClassification
    epochs: int = 10  #: T: the curves have T+1 points (epoch 0 = before training)
    lr: float = 1e-5  #: AdamW peak learning rate (use ~1e-3 with freeze_encoder: only the head trains)
    batch_size: int = 30
    warmup_ratio: float = 0.1  #: fraction of all steps with a linear warm-up, then linear decay to 0
    max_length: int = 128  #: tokens per text (truncation); batches are padded to their longest row
    weight_decay: float = 0.01  #: AdamW decay (not applied to biases and LayerNorm weights)
    seed: int = 0  #: head init, shuffling and dropout
    record: str = "train"  #: "train": losses of the training forward; "eval": an extra no-dropout pass
    freeze_encoder: bool = False  #: encode once, cache features, train only the head
    device: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    compile: bool = False  #: torch.compile the training forward (plain fine-tuning: no double backward here)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.record not in RECORD_MODES:
            raise ConfigError(f"--record must be one of {', '.join(RECORD_MODES)}, got {self.record!r}")

    def provenance_config(self) -> dict[str, Any]:
        """The fields that determine the curves (device and loading permissions do not)."""
        return {k: v for k, v in asdict(self).items() if k not in _RUNTIME_FIELDS}


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
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "stage": STAGE,
            "num_samples": self.num_samples,
            "epochs": self.epochs,
            "resumed_from": self.resumed_from,
            "up_to_date": self.up_to_date,
            "seconds": round(self.seconds, 3),
            "samples_per_second": round(self.samples_per_second, 2),
            "fingerprint": self.fingerprint,
            "final": self.history[-1] if self.history else None,
        }


def normalized_curves(losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """I_i (paper §3.3): each epoch's loss minus the mean loss of the sample's observed class at that epoch."""
    if losses.dim() != 2 or labels.dim() != 1 or losses.shape[0] != labels.shape[0]:
        raise ValueError(f"losses [N, T+1] and labels [N] expected, got {tuple(losses.shape)}, {tuple(labels.shape)}")
    labels = labels.long()
    c = int(labels.max().item()) + 1 if labels.numel() else 0
    sums = torch.zeros((c, losses.shape[1]), dtype=losses.dtype, device=losses.device).index_add_(0, labels, losses)
    counts = torch.bincount(labels, minlength=c).to(losses.dtype).clamp_min(1)
    return losses - (sums / counts[:, None])[labels]


# ---------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class _TrainData:
    table: Any
    sample_ids: torch.Tensor
    labels: torch.Tensor
    true_labels: torch.Tensor | None  # -1 where unknown
    num_classes: int
    class_names: list[str]


def _read_inputs(train_path: Path, manifest_path: Path | None) -> _TrainData:
    import pyarrow as pa

    table = artifacts.read_table(train_path, "training table")
    artifacts.require_columns(table, ["sample_id", "label", "text"], train_path)
    if table.num_rows == 0:
        raise DataError(f"{train_path} has no rows")
    for col in ("sample_id", "label"):
        t = table.schema.field(col).type
        if not pa.types.is_integer(t):
            raise DataError(f"{train_path}: column {col} must hold integers, it holds {t}")
        if table.column(col).null_count:
            raise DataError(f"{train_path}: column {col} has missing values")
    sample_ids = torch.from_numpy(np.array(table.column("sample_id").to_numpy(), dtype=np.int64))
    if len(torch.unique(sample_ids)) != len(sample_ids):
        raise DataError(f"{train_path}: sample_id values are not unique")
    labels = torch.from_numpy(np.array(table.column("label").to_numpy(), dtype=np.int64))

    if manifest_path is not None:
        manifest = artifacts.read_json(manifest_path, "manifest")
        try:
            num_classes = int(manifest["num_classes"])
            class_names = [str(n) for n in manifest.get("class_names") or range(num_classes)]
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{manifest_path} lacks num_classes", "run `mlrnet corrupt` again") from e
    else:
        num_classes = int(labels.max().item()) + 1
        class_names = [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ArtifactError(f"{manifest_path}: {len(class_names)} class_names for num_classes={num_classes}")
    if labels.min().item() < 0 or labels.max().item() >= num_classes:
        raise DataError(
            f"{train_path}: labels must be in 0..{num_classes - 1}, found {labels.min().item()}..{labels.max().item()}"
        )
    true_labels = None
    if "true_label" in table.column_names:
        col = table.column("true_label")
        if pa.types.is_integer(col.type) and col.null_count < table.num_rows:
            true_labels = torch.from_numpy(np.array(col.fill_null(-1).to_numpy(), dtype=np.int64))
    return _TrainData(table, sample_ids, labels, true_labels, num_classes, class_names)


# ---------------------------------------------------------------------------------------------
# state (resume)


def _state_root(stage1_dir: Path) -> Path:
    return stage1_dir / _STATE_DIR


def _latest_state(stage1_dir: Path) -> Path | None:
    root = _state_root(stage1_dir)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_EPOCH_PREFIX))
    return done[-1] if done else None


def _clean_stale(stage1_dir: Path, losses_path: Path, cache_dir: Path) -> None:
    """Remove temp files/folders a killed run of this stage left behind (they are never read as artifacts)."""
    stale: list[Path] = []
    for folder in (stage1_dir, _state_root(stage1_dir)):
        if folder.is_dir():
            stale += [p for p in folder.iterdir() if p.name.startswith(artifacts.TMP_PREFIX)]
    if losses_path.parent.is_dir():
        stale += list(losses_path.parent.glob(f"{artifacts.TMP_PREFIX}{losses_path.name}.*"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    clean_cache(cache_dir)


def _stage1_meta_reader(path: Path) -> dict[str, Any] | None:
    """Meta of a finished stage1/ folder, or of the run whose state it holds, or None if empty."""
    mfile = path / "mlrnet.json"
    if mfile.is_file():
        return artifacts.read_json(mfile).get(artifacts.META_KEY)
    latest = _latest_state(path)
    if latest is not None:
        meta = artifacts.read_json(latest / "state.json").get(artifacts.META_KEY)
        return dict(meta, kind="stage1") if isinstance(meta, dict) else None
    return None


def _save_state(
    stage1_dir: Path,
    epoch: int,
    meta: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    losses: torch.Tensor,
    history: list[dict[str, Any]],
    device: torch.device,
) -> None:
    """Write the state of a finished epoch into a new folder, renamed into place (atomic), then drop older ones."""
    from safetensors.torch import save_model

    root = _state_root(stage1_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_EPOCH_PREFIX}{epoch:04d}"
    tmp = root / f"{artifacts.TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        artifacts.write_tensors(tmp / "losses.safetensors", {"losses": losses[:, : epoch + 1]}, meta)
        trainer = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0),
            "shuffle_rng": generator.get_state(),
        }
        with artifacts.atomic_path(tmp / "trainer.pt") as p:
            torch.save(trainer, p)
        artifacts.write_json(tmp / "state.json", {artifacts.META_KEY: meta, "epoch": epoch, "history": history})
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in root.iterdir():
        if old.is_dir() and old.name.startswith(_EPOCH_PREFIX) and old != final:
            shutil.rmtree(old, ignore_errors=True)


def _load_state(
    state_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    losses: torch.Tensor,
    device: torch.device,
) -> tuple[int, list[dict[str, Any]]]:
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        info = artifacts.read_json(state_dir / "state.json", "resume state")
        epoch = int(info["epoch"])
        load_model(model, str(state_dir / "model.safetensors"), device=str(device))
        saved, _ = artifacts.read_tensors(state_dir / "losses.safetensors", "resume state")
        # weights_only: a state file is data, never code
        trainer = torch.load(state_dir / "trainer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(trainer["cpu_rng"])
        if device.type == "cuda" and trainer["cuda_rng"].numel():
            torch.cuda.set_rng_state(trainer["cuda_rng"], device)
        generator.set_state(trainer["shuffle_rng"])
    except (KeyError, ValueError, RuntimeError, OSError, pickle.UnpicklingError, SafetensorError) as e:
        # torch's pickle refusal advises weights_only=False (running the file's code): never quoted
        why = type(e).__name__ if isinstance(e, pickle.UnpicklingError) else (
            str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ArtifactError(
            f"resume state {state_dir} is damaged or was not written by mlrnet ({why})",
            f"delete {state_dir.parent} or pass --overwrite to start again",
        ) from e
    losses[:, : epoch + 1] = saved["losses"].to(losses.device)
    return epoch, list(info.get("history", []))


# ---------------------------------------------------------------------------------------------
# the stage


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
        part = torch.stack([v.to(torch.float64) for v in vals])
        self.sums[: len(vals)] += part

    def row(self, epoch: int, source: str) -> dict[str, Any]:
        sums = distributed.all_reduce_sum(self.sums)
        n = self.n
        if distributed.is_distributed():
            n = int(distributed.all_reduce_sum(torch.tensor([float(n)], dtype=torch.float64)).item())
        loss, correct, tn, tloss, tcorrect, noisy_n, noisy_loss, clean_n, clean_loss = sums.tolist()
        row: dict[str, Any] = {
            "epoch": epoch,
            "source": source,
            "loss": loss / max(n, 1),
            "accuracy": correct / max(n, 1),
        }
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
    # one writer per output (under torchrun, rank 0 writes for all): a second run fails now, not mid-epoch
    outputs = [Path(losses_path), Path(stage1_dir)]
    with locks.exclusive(outputs, "collect-losses") if distributed.is_main() else contextlib.nullcontext():
        t_start = time.perf_counter()
        train_path, losses_path, stage1_dir = Path(train_path), Path(losses_path), Path(stage1_dir)
        manifest_path = Path(manifest_path) if manifest_path is not None else None
        cache_dir = Path(cache_dir)
        data = _read_inputs(train_path, manifest_path)
        n, t_epochs = len(data.labels), config.epochs

        model_path = Path(config.model).expanduser()
        if model_path.exists() and stage1_dir.exists() and model_path.resolve() == stage1_dir.resolve():
            raise UsageError(f"--model {config.model} is the output folder --stage1-dir: choose another --stage1-dir")
        train_fp = artifacts.fingerprint_file(train_path)
        model_fp = model_fingerprint(config.model)
        inputs = {"train": train_fp, "model": model_fp}
        meta = artifacts.make_meta(
            STAGE,
            "losses",
            config=config.provenance_config(),
            seed=config.seed,
            inputs=inputs,
            model=config.model,
            epochs=t_epochs,
            lr=config.lr,
            record=config.record,
            num_classes=data.num_classes,
            class_names=data.class_names,
        )
        input_paths = [train_path] + ([manifest_path] if manifest_path else [])
        if distributed.is_main():  # under torchrun only rank 0 changes files; the others read after the barrier
            _clean_stale(stage1_dir, losses_path, cache_dir)
            if stage1_dir.is_dir() and not any(stage1_dir.iterdir()):
                stage1_dir.rmdir()  # an empty folder (a run killed before its first epoch ended) holds nothing to guard
        distributed.barrier()
        artifacts.guard_output(losses_path, meta, inputs=input_paths, overwrite=overwrite)
        artifacts.guard_output(
            stage1_dir,
            dict(meta, kind="stage1"),
            inputs=input_paths,
            overwrite=overwrite,
            read_meta=_stage1_meta_reader,
        )
        if not overwrite:
            done = _finished_result(losses_path, stage1_dir, meta, n, t_epochs)
            if done is not None:
                log.info("collect-losses: %s is up to date (same inputs and config)", losses_path)
                return done

        device = select_device(distributed.resolve_device(config.device))
        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        model = load_classifier(
            config.model,
            data.num_classes,
            data.class_names,
            allow_pickle=config.allow_pickle,
            trust_remote_code=config.trust_remote_code,
            init_seed=config.seed,
        ).to(device)
        # only once the model loaded: a bad --model with --overwrite must leave the old outputs alone
        distributed.barrier()  # every rank has read the old outputs before rank 0 removes them
        if overwrite and distributed.is_main():
            if (stage1_dir / "mlrnet.json").is_file() or _state_root(stage1_dir).exists():
                # a previous stage-1 folder of ours: start clean (no stale tokenizer files, no foreign state)
                shutil.rmtree(stage1_dir)
        distributed.barrier()
        with distributed.main_first():  # rank 0 fills the token cache, the others read it
            token_cache = tokenize_table(
                train_path, tokenizer, model_fp, config.max_length, cache_dir, table=data.table
            )
        if not np.array_equal(token_cache.sample_ids, data.sample_ids.numpy()):  # pragma: no cover - same table
            raise ArtifactError(f"token cache {token_cache.path} does not match {train_path}")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        rng_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            # one dropout stream per rank (rank 0's is the single-process one)
            torch.manual_seed(config.seed + distributed.rank())
            run = _Run(config, data, token_cache, model, device, pad_id, cache_dir, model_fp, progress)
            resumed_from = run.train(stage1_dir, meta)
        losses_cpu = run.losses.cpu()
        if not torch.isfinite(losses_cpu).all():
            raise DataError("training diverged: some recorded losses are not finite", "lower --lr")

        # outputs: the stage-1 classifier first, the curves last (their presence marks a finished run)
        fp = None
        if distributed.is_main():
            stage1_meta = dict(meta, kind="stage1")
            _write_stage1(stage1_dir, model, tokenizer, run.history, stage1_meta)
            fp = artifacts.write_tensors(losses_path, {"losses": losses_cpu, "sample_id": data.sample_ids}, meta)
            shutil.rmtree(_state_root(stage1_dir), ignore_errors=True)
        fp = distributed.broadcast_object(fp)  # the others return once the outputs exist
        seconds = time.perf_counter() - t_start
        return CollectResult(
            losses_path=losses_path,
            stage1_dir=stage1_dir,
            num_samples=n,
            epochs=t_epochs,
            history=run.history,
            fingerprint=fp,
            resumed_from=resumed_from,
            seconds=seconds,
            samples_per_second=run.samples_per_second,
            token_cache=token_cache.path,
            feature_cache=run.feature_cache,
        )


def _finished_result(
    losses_path: Path, stage1_dir: Path, meta: dict[str, Any], n: int, epochs: int
) -> CollectResult | None:
    if not (losses_path.is_file() and (stage1_dir / "mlrnet.json").is_file()):
        return None
    try:
        old = artifacts.read_tensors_meta(losses_path)
        s1 = artifacts.read_json(stage1_dir / "mlrnet.json")
        hist = artifacts.read_json(stage1_dir / "history.json").get("epochs", [])
    except ArtifactError:
        return None
    if not old or artifacts.provenance(old) != artifacts.provenance(meta):
        return None
    if artifacts.provenance(s1.get(artifacts.META_KEY) or {}) != artifacts.provenance(dict(meta, kind="stage1")):
        return None
    shutil.rmtree(_state_root(stage1_dir), ignore_errors=True)
    return CollectResult(
        losses_path=losses_path,
        stage1_dir=stage1_dir,
        num_samples=n,
        epochs=epochs,
        history=hist,
        fingerprint=artifacts.fingerprint_file(losses_path),
        up_to_date=True,
    )


def _write_stage1(
    stage1_dir: Path, model: torch.nn.Module, tokenizer: Any, history: list[dict[str, Any]], meta: dict[str, Any]
) -> None:
    """save_pretrained into a temp folder, then move each file into stage1/ (each move atomic), mlrnet.json last.
    A frozen encoder (``freeze_encoder`` in the config) gets a shard of its own, which `train` links to."""
    stage1_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage1_dir / f"{artifacts.TMP_PREFIX}model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if meta["config"].get("freeze_encoder"):
            artifacts.split_frozen_weights(tmp, head_name(model) + ".")
        tokenizer.save_pretrained(tmp)
        artifacts.write_json(tmp / "history.json", {artifacts.META_KEY: meta, "epochs": history})
        artifacts.follow_umask(tmp)
        (stage1_dir / "mlrnet.json").unlink(missing_ok=True)
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(f, stage1_dir / f.name)
        artifacts.write_json(stage1_dir / "mlrnet.json", {artifacts.META_KEY: meta})
    except OSError as e:
        raise ArtifactError(f"cannot write {stage1_dir}: {e}", "check free space and permissions") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _classifier_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a batch: the head on cached features (``--freeze-encoder``), else the whole classifier."""
    if "features" in inputs:
        return head_logits(model, inputs["features"])
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


class _Run:
    """The training loop of one collect-losses run (full fine-tuning, or head only on cached features)."""

    def __init__(
        self,
        config: CollectConfig,
        data: _TrainData,
        tokens: TokenCache,
        model: torch.nn.Module,
        device: torch.device,
        pad_id: int,
        cache_dir: Path,
        model_fp: str,
        progress: Progress | None,
    ) -> None:
        self.config, self.data, self.tokens, self.model, self.device = config, data, tokens, model, device
        self.pad_id = pad_id
        self.progress = get_progress(progress) if distributed.is_main() else NullProgress()
        self.n = len(data.labels)
        self.labels = data.labels.to(device)
        self.true = data.true_labels.to(device) if data.true_labels is not None else None
        self.losses = torch.zeros((self.n, config.epochs + 1), dtype=torch.float32, device=device)
        self.history: list[dict[str, Any]] = []
        self.samples_per_second = 0.0
        self.features: torch.Tensor | None = None
        self.feature_cache: Path | None = None
        if config.freeze_encoder:
            encoder_id = encoder_cache_id(model, model_fp, config.seed)
            with distributed.main_first():
                self.features = encode_features(
                    model,
                    tokens,
                    model_id=encoder_id,
                    cache_dir=cache_dir,
                    pad_id=pad_id,
                    device=device,
                    progress=self.progress,
                ).to(device)
            from mlrnet_cli.tokens import features_key

            key = features_key(encoder_id, tokens.key)
            self.feature_cache = cache_dir / f"features-{key}.safetensors"
            for p in model.parameters():
                p.requires_grad_(False)
            for p in head_module(model).parameters():
                p.requires_grad_(True)
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(_param_groups(trainable, config.weight_decay), lr=config.lr)
        from transformers import get_linear_schedule_with_warmup

        # global steps: batches of batch_size rows per rank (batch_size x world in all)
        steps = config.epochs * distributed.num_steps(self.n, config.batch_size)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(config.warmup_ratio * steps), steps)
        self.generator = torch.Generator().manual_seed(config.seed)
        # the real step's forward: the model itself, or DDP (gradient all-reduce) / torch.compile around it
        self.train_forward = distributed.training_forward(
            model, _classifier_logits, device, compile_forward=config.compile
        )

    def _inputs(self, idx: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        if self.features is not None:
            return {"features": self.features[torch.as_tensor(idx, device=self.device)]}
        ids, mask = self.tokens.batch(idx, self.pad_id)
        return {"input_ids": to_device(ids, self.device), "attention_mask": to_device(mask, self.device)}

    def _true(self, rows: torch.Tensor) -> torch.Tensor | None:
        return self.true[rows] if self.true is not None else None

    @torch.no_grad()
    def eval_pass(self, epoch: int) -> None:
        """Losses of every sample in eval mode (no dropout) into column ``epoch`` (ranks split the batches)."""
        self.model.eval()
        stats = _Stats(self.device)
        bs = max(self.config.batch_size, 64)
        batches = length_grouped_batches(self.tokens.lengths, bs)
        own = batches[distributed.rank() :: distributed.world_size()]
        total = sum(len(b) for b in own)
        with self.progress.task(f"epoch {epoch}/{self.config.epochs} (recording)", total=total) as task:
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
        self.history.append(stats.row(epoch, "eval"))

    def _gather_column(self, epoch: int, own_rows: list[torch.Tensor]) -> None:
        """Every rank's recorded losses of this epoch into column ``epoch`` (row order = sample_id order)."""
        rows = (torch.cat(own_rows) if own_rows else torch.zeros(0, dtype=torch.int64)).to(self.device)
        self.losses[:, epoch] = distributed.gather_rows(rows, self.losses[rows, epoch], self.n)

    def train_epoch(self, epoch: int) -> float:
        cfg = self.config
        self.model.train()
        stats = _Stats(self.device)
        perm = torch.randperm(self.n, generator=self.generator)
        shards = distributed.shard_batches(perm, cfg.batch_size)
        multi = distributed.is_distributed()
        own_rows: list[torch.Tensor] = []
        t0 = time.perf_counter()
        with self.progress.task(f"epoch {epoch}/{cfg.epochs}", total=self.n) as task:
            for k, shard in enumerate(shards):
                idx = shard.rows
                rows = to_device(idx, self.device)
                y = self.labels[rows]
                with autocast_context(self.device):
                    logits = self.train_forward(self._inputs(idx.numpy()))
                # per-sample CE against the observed label (the HF `labels=` path only returns the mean)
                per = F.cross_entropy(logits.float(), y, reduction="none")
                if multi:
                    # DDP averages the ranks' gradients: scaling by share makes that the global batch's mean
                    (per.sum() * (shard.share / len(idx))).backward()
                else:
                    per.mean().backward()
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if cfg.record == "train" and not shard.is_placeholder:
                    self.losses[rows, epoch] = per.detach()
                    stats.add(logits.detach().float(), per.detach(), y, self._true(rows))
                    own_rows.append(idx)
                # reading the loss back syncs with the device: only now and then, for the progress bar
                shown = k % _PROGRESS_LOSS_EVERY == 0 or k == len(shards) - 1
                task.advance(shard.global_size, **({"loss": float(per.detach().mean())} if shown else {}))
        seconds = time.perf_counter() - t0
        if cfg.record == "train":
            if multi:
                self._gather_column(epoch, own_rows)
            self.history.append(stats.row(epoch, "train"))
        else:
            self.eval_pass(epoch)
        return seconds

    def train(self, stage1_dir: Path, meta: dict[str, Any]) -> int | None:
        """Epoch 0, then epochs 1..T, saving state after each; resumes from the last saved epoch."""
        start, resumed_from = 1, None
        latest = _latest_state(stage1_dir)
        if latest is not None:
            info = artifacts.read_json(latest / "state.json", "resume state")
            old = info.get(artifacts.META_KEY) or {}
            if artifacts.provenance(old) != artifacts.provenance(meta):
                raise ArtifactExistsError(
                    f"{stage1_dir} holds the state of a different run (other config or inputs)",
                    "pass --overwrite to start again, or choose another --stage1-dir",
                )
            resumed_from, self.history = _load_state(
                latest, self.model, self.optimizer, self.scheduler, self.generator, self.losses, self.device
            )
            start = resumed_from + 1
            log.info("collect-losses: resuming after epoch %d", resumed_from)
        else:
            self.eval_pass(0)  # L^0: before any update
        train_seconds, trained = 0.0, 0
        for epoch in range(start, self.config.epochs + 1):
            train_seconds += self.train_epoch(epoch)
            trained += self.n
            last = self.history[-1]
            log.info(
                "epoch %d/%d: loss %.4f, accuracy %.3f%s",
                epoch,
                self.config.epochs,
                last["loss"],
                last["accuracy"],
                f", true accuracy {last['true_accuracy']:.3f}" if "true_accuracy" in last else "",
            )
            # also after the last epoch: a kill while the outputs are written loses no training
            if not distributed.is_main():
                continue
            _save_state(
                stage1_dir,
                epoch,
                meta,
                self.model,
                self.optimizer,
                self.scheduler,
                self.generator,
                self.losses,
                self.history,
                self.device,
            )
        self.samples_per_second = trained / train_seconds if train_seconds else 0.0
        return resumed_from
