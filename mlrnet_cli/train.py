"""Stage 2 (paper §3.2-3.4, Algorithm 1): train the classifier with MLRNet, MW-Net or a plain baseline.

``train(config, ...)`` reads ``data/train.arrow``, ``data/clean.arrow`` and ``losses.safetensors`` from the
workspace, draws a balanced, seeded meta set from the clean pool (disjoint from the training rows) after
holding out a dev part of the pool for model selection, trains, and writes ``model/best``, ``model/last``,
``model/history.arrow`` and a resumable ``model/state``. See ``docs/train.md``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlrnet_cli import artifacts, distributed, locks
from mlrnet_cli.collect import normalized_curves
from mlrnet_cli.errors import ArtifactError, ConfigError, DataError, FingerprintMismatchError
from mlrnet_cli.meta import ClassifierFns, StepBatch, meta_step, parse_meta_params, per_sample_loss, resolve_meta_params
from mlrnet_cli.metanet import MLRNetMetaNet, MWNet
from mlrnet_cli.modeling import eval_mode
from mlrnet_cli.modeling import to_device as modeling_to_device
from mlrnet_cli.progress import NullProgress, Progress
from mlrnet_cli.progress import get as get_progress
from mlrnet_cli.workspace import Workspace

log = logging.getLogger("mlrnet")

METHODS = ("mlrnet", "mwnet", "plain", "plain-meta", "meta-only")
META_METHODS = ("mlrnet", "mwnet")
STATE_FILE = "state.pt"
#: a classifier that predicts one class for this share of the dev rows has collapsed (see real_collapse)
COLLAPSE_SHARE = 0.8
#: below this weight std (over the training rows) the meta-net's weights are nearly constant: a collapse then
#: cannot come from a meta-net that learns too fast (those push the weights to 0 and 1)
SPREAD_WEIGHT_STD = 1e-2
#: the training loop reads the loss back for the progress bar only every this many steps (a host sync)
_PROGRESS_LOSS_EVERY = 10


@dataclass(frozen=True)
class TrainConfig:
    """Stage-2 hyperparameters (defaults: paper §4.4 for AG News where it gives one)."""

    method: str = "mlrnet"  # mlrnet | mwnet | plain | plain-meta | meta-only
    meta_per_class: int = 100  # clean rows per class in the meta set (paper: 100, after MLC)
    epochs: int = 10  # paper: 10 on AG News
    lr: float = 1e-5  # classifier learning rate (paper: 1e-5, Adam with warm-up)
    batch_size: int = 30  # training mini-batch n (paper: 30)
    meta_batch_size: int | None = None  # meta mini-batch m; None = batch_size
    meta_lr: float = 1e-4  # Adam lr of θ; MW-Net's 1e-3 swung full fine-tuning to extreme weights (docs/results.md)
    alpha: float | None = None  # virtual-step rate α of eqs. 4/8; None = lr (the paper's α steps both eqs. 4 and 6)
    meta_params: str = "all"  # all | head | last-K: parameters the virtual step differentiates through
    meta_interval: int = 1  # update θ every K classifier steps
    normalize_weights: bool = True  # c_i = v_i / Σv in the batch (MW-Net's guard against collapse)
    label_emb_dim: int = 128  # §4.3: label embedding (C, 128)
    df_dim: int = 128  # §4.3: size of the discriminative feature DF_i
    init_from: str = "pretrained"  # pretrained | stage1
    freeze_encoder: bool = False  # cached encoder features, head-only training
    dev_fraction: float = 0.2  # part of the clean pool held out for model selection (ignored with --dev)
    max_length: int = 128
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of the steps, then linear decay
    weight_decay: float = 0.0
    device: str = "auto"
    seed: int = 0
    model: str | None = None  # None = the model collect-losses recorded in the curves' metadata
    allow_pickle: bool = False
    trust_remote_code: bool = False
    meta_mode: str = "jvp"  # jvp (forward-mode, less memory) | unrolled (create_graph); both exact
    # dropout in the meta batch's forward at ŵ (eq. 5). Off (eval mode): the meta loss is that of the classifier as
    # it is evaluated, without dropout noise, and the meta forward is cheaper. On: MW-Net's reference code.
    meta_dropout: bool = False
    # torch.compile the training forward of plain / plain-meta / meta-only; the meta methods run eagerly
    # (the meta step differentiates twice / in forward mode through functional_call). Not in provenance.
    compile: bool = False

    @property
    def virtual_lr(self) -> float:
        """α of eqs. 4/8 as used: ``alpha``, or the classifier's ``lr`` when unset."""
        return self.lr if self.alpha is None else self.alpha

    def validate(self) -> None:
        from mlrnet_cli.errors import UsageError

        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}", f"choose one of {', '.join(METHODS)}")
        if self.init_from not in ("pretrained", "stage1"):
            raise UsageError(f"unknown --init-from {self.init_from!r}", "choose pretrained or stage1")
        parse_meta_params(self.meta_params)
        if self.meta_mode not in ("jvp", "unrolled"):
            raise ConfigError(f"unknown meta mode {self.meta_mode!r}")
        for name in ("meta_per_class", "epochs", "batch_size", "meta_interval", "label_emb_dim", "df_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.meta_batch_size is not None and self.meta_batch_size < 1:
            raise ConfigError(f"--meta-batch-size must be >= 1, got {self.meta_batch_size}")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ConfigError(f"--dev-fraction must be in [0, 1), got {self.dev_fraction}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr <= 0 or self.meta_lr <= 0 or (self.alpha is not None and self.alpha <= 0):
            raise ConfigError("--lr, --meta-lr and --alpha must be > 0")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be >= 2, got {self.max_length}")


@dataclass
class TrainResult:
    """What `train` wrote and how it went."""

    best_dir: Path
    last_dir: Path
    history_path: Path
    best_epoch: int
    best_dev_accuracy: float | None
    epochs_run: int
    resumed_from: int
    meta_size: int
    dev_size: int
    model: str
    history: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "best_dev_accuracy": self.best_dev_accuracy,
            "epochs_run": self.epochs_run,
            "resumed_from_epoch": self.resumed_from,
            "meta_size": self.meta_size,
            "dev_size": self.dev_size,
            "model": self.model,
            "history": self.history,
        }


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class _Rows:
    sample_ids: np.ndarray
    labels: np.ndarray
    is_noisy: np.ndarray | None  # bool, None when the truth is unknown


def _read_rows(path: Path, what: str) -> tuple[Any, _Rows]:
    import pyarrow as pa

    table = artifacts.read_table(path, what)
    artifacts.require_columns(table, ["sample_id", "text", "label"], path)
    if table.num_rows == 0:
        raise DataError(f"{what} {path} has no rows")
    ids = np.asarray(table.column("sample_id").to_numpy(zero_copy_only=False), dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{what} {path} has duplicate sample_id values")
    labels_col = table.column("label")
    if labels_col.null_count:
        raise DataError(f"{what} {path} has rows without a label")
    if not pa.types.is_integer(labels_col.type):
        raise DataError(
            f"{what} {path}: column label must hold class ids (integers), it holds {labels_col.type}",
            "use the tables `mlrnet corrupt` writes (it maps class names to ids)",
        )
    labels = np.array(labels_col.to_numpy(zero_copy_only=False), dtype=np.int64)
    noisy = None
    if "is_noisy" in table.column_names and table.column("is_noisy").null_count == 0:
        noisy = np.asarray(table.column("is_noisy").to_numpy(zero_copy_only=False), dtype=bool)
    return table, _Rows(ids, labels, noisy)


def split_clean_pool(
    labels: np.ndarray, num_classes: int, meta_per_class: int, dev_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of (meta set, dev set): per class, a seeded shuffle; dev = the first round(n·fraction),
    meta = the next ``meta_per_class``. The dev part does not depend on ``meta_per_class``."""
    rng = np.random.default_rng([seed, 20240])
    meta, dev = [], []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        rows = rows[rng.permutation(len(rows))]
        n_dev = int(round(len(rows) * dev_fraction))
        if len(rows) - n_dev < meta_per_class:
            raise DataError(
                f"the clean pool has {len(rows)} row(s) of class {c}"
                + (f", {len(rows) - n_dev} after holding out {n_dev} for dev" if n_dev else "")
                + f": fewer than --meta-per-class {meta_per_class}",
                "lower --meta-per-class or --dev-fraction, or rerun corrupt with a larger --meta-pool-per-class",
            )
        dev.append(rows[:n_dev])
        meta.append(rows[n_dev : n_dev + meta_per_class])
    return np.sort(np.concatenate(meta)), np.sort(np.concatenate(dev))


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch * 101 + stream)


# ---------------------------------------------------------------------------------------------
# saving


def _save_model_dir(
    target: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    meta_net: torch.nn.Module | None,
    meta: dict,
    extra: dict,
    frozen: tuple[str, list[Path]] | None = None,
) -> None:
    """save_pretrained (safetensors) + meta_net.safetensors + train_config.json + mlrnet.json, swapped in whole.

    ``frozen`` (a frozen encoder: the head's prefix, and folders that may hold the same encoder) stores the encoder
    as a shard of its own, hard-linked to an identical one (see :func:`artifacts.split_frozen_weights`)."""
    from safetensors import SafetensorError

    tmp = target.parent / f"{artifacts.TMP_PREFIX}{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if frozen is not None:
            artifacts.split_frozen_weights(tmp, *frozen)
        tokenizer.save_pretrained(tmp)
        if meta_net is not None:
            artifacts.write_tensors(
                tmp / "meta_net.safetensors", meta_net.state_dict(), {**meta, "meta_net": meta_net.spec()}
            )
        artifacts.write_json(tmp / "train_config.json", {**extra, "config": meta["config"]})
        artifacts.write_json(tmp / "mlrnet.json", {artifacts.META_KEY: meta})
        artifacts.follow_umask(tmp)
    except (OSError, SafetensorError, ArtifactError) as e:  # a full disk, mostly
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"cannot write {target}: {e}", "check free space and permissions") from e
    old = target.parent / f"{artifacts.TMP_PREFIX}{target.name}-old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _finished_history(
    out: Path, history_path: Path, meta: dict[str, Any], epochs: int
) -> tuple[int, float | None, list[dict[str, Any]]] | None:
    """(best epoch, its dev accuracy, history) of a finished run of ``meta`` in ``out``, or None.

    Finished: history.arrow is this run's and has every epoch, and model/best and model/last are this run's
    (each epoch writes them before the history, so a kill never leaves this looking finished too early)."""
    try:
        table = artifacts.read_table(history_path, "history")
        best = artifacts.read_json(out / "best" / "mlrnet.json").get(artifacts.META_KEY) or {}
        last = artifacts.read_json(out / "last" / "mlrnet.json").get(artifacts.META_KEY) or {}
    except (ArtifactError, AttributeError):
        return None
    same = artifacts.provenance(meta)
    if (artifacts.provenance(artifacts.table_meta(table) or {}) != artifacts.provenance({**meta, "kind": "history"})
            or artifacts.provenance(best) != same or artifacts.provenance(last) != same
            or table.num_rows != epochs or last.get("epoch") != epochs):
        return None
    rows = table.to_pylist()
    best_epoch = int(best.get("epoch") or epochs)
    return best_epoch, rows[best_epoch - 1].get("dev_accuracy"), rows


def _history_table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    cols = [
        ("epoch", pa.int64()),
        ("train_loss", pa.float64()),
        ("dev_accuracy", pa.float64()),
        ("weight_mean", pa.float64()),
        ("weight_std", pa.float64()),
        ("weight_mean_noisy", pa.float64()),
        ("weight_mean_clean", pa.float64()),
        ("meta_loss", pa.float64()),
        ("seconds", pa.float64()),
    ]
    return pa.table({n: pa.array([r.get(n) for r in rows], t) for n, t in cols})


# ---------------------------------------------------------------------------------------------
# the stage


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def train(
    config: TrainConfig,
    *,
    workdir: str | os.PathLike[str] | None = None,
    train_path: str | os.PathLike[str] | None = None,
    clean_path: str | os.PathLike[str] | None = None,
    losses_path: str | os.PathLike[str] | None = None,
    manifest_path: str | os.PathLike[str] | None = None,
    dev_path: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> TrainResult:
    """Run stage 2 and write ``model/{best,last,history.arrow,state}``; resumes an interrupted identical run."""
    import time

    from mlrnet_cli import modeling, tokens

    config.validate()
    ws = Workspace.at(workdir)
    out = Path(out_dir or ws.model)
    artifacts.check_writable(out)  # now, not after the first epoch
    # one writer per model folder (under torchrun, rank 0 writes for all): a second run fails now, not mid-epoch
    with locks.exclusive(out, "train") if distributed.is_main() else contextlib.nullcontext():
        train_path = Path(train_path or ws.train)
        clean_path = Path(clean_path or ws.clean)
        losses_path = Path(losses_path or ws.losses)
        manifest_path = Path(manifest_path or ws.manifest)

        manifest = artifacts.read_json(manifest_path, "manifest")
        try:
            num_classes = int(manifest["num_classes"])
            class_names = list(manifest.get("class_names") or [str(i) for i in range(num_classes)])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"manifest {manifest_path} has no num_classes") from e
        train_table, train_rows = _read_rows(train_path, "training table")
        clean_table, clean_rows = _read_rows(clean_path, "clean table")
        for name, rows in (("training", train_rows), ("clean", clean_rows)):
            if rows.labels.min() < 0 or rows.labels.max() >= num_classes:
                raise DataError(f"the {name} table has labels outside 0..{num_classes - 1} (the manifest's classes)")
        train_fp = artifacts.fingerprint_file(train_path)
        inputs = {"train": train_fp, "clean": artifacts.fingerprint_file(clean_path)}

        # stage-1 curves: the default model, and I_i for MLRNet
        curves_all: torch.Tensor | None = None
        model_name = config.model
        if losses_path.is_file():
            tensors, lmeta = artifacts.read_tensors(losses_path, "loss curves")
            artifacts.require_meta(lmeta, losses_path)
            recorded = (lmeta.get("inputs") or {}).get("train")
            if recorded is not None and recorded != train_fp:
                raise FingerprintMismatchError(
                    f"{losses_path} was collected on a different training table (fingerprint {recorded}, "
                    f"{train_path} is {train_fp})",
                    "rerun collect-losses on this training table",
                )
            model_name = model_name or (lmeta.get("config") or {}).get("model") or lmeta.get("model")
            if "losses" not in tensors or "sample_id" not in tensors:
                raise ArtifactError(f"{losses_path} lacks the `losses` or `sample_id` tensor")
            lids = tensors["sample_id"].numpy().astype(np.int64)
            pos = {int(s): i for i, s in enumerate(lids)}
            missing = [int(s) for s in train_rows.sample_ids if int(s) not in pos]
            if missing or len(lids) != len(train_rows.sample_ids):
                raise FingerprintMismatchError(
                    f"the loss curves in {losses_path} do not match the training rows "
                    f"({len(missing)} training sample_id(s) without a curve, {len(lids)} curves for "
                    f"{len(train_rows.sample_ids)} rows)",
                    "rerun collect-losses on this training table",
                )
            order = torch.tensor([pos[int(s)] for s in train_rows.sample_ids], dtype=torch.long)
            raw = tensors["losses"].float()[order]
            if raw.ndim != 2 or not torch.isfinite(raw).all():
                raise DataError(f"{losses_path}: the `losses` tensor must be a finite [N, T+1] matrix")
            curves_all = normalized_curves(raw, torch.from_numpy(train_rows.labels))
            inputs["losses"] = artifacts.fingerprint_file(losses_path)
        elif config.method == "mlrnet":
            raise ArtifactError(f"loss curves not found: {losses_path}", "run `mlrnet collect-losses` first")
        if not model_name:
            raise ConfigError("no model to train", "pass --model, or run collect-losses first (it records the model)")
        config = replace(config, model=str(model_name))

        # clean pool: drop rows that are also training rows, hold out dev, draw the meta set
        overlap = np.isin(clean_rows.sample_ids, train_rows.sample_ids)
        if overlap.any():
            log.warning("%d clean row(s) share a sample_id with training rows: left out of the meta set", overlap.sum())
        pool = np.flatnonzero(~overlap)
        meta_n = 0 if config.method == "plain" else config.meta_per_class  # plain never reads the meta set
        dev_table = None
        if dev_path is not None:
            dev_table, dev_rows = _read_rows(Path(dev_path), "dev table")
            inputs["dev"] = artifacts.fingerprint_file(dev_path)
            meta_pos, _ = split_clean_pool(
                clean_rows.labels[pool], num_classes, meta_n, 0.0, config.seed
            )
            dev_pos = np.arange(dev_rows.labels.shape[0])
            dev_labels = dev_rows.labels
        else:
            meta_pos, dev_pos = split_clean_pool(
                clean_rows.labels[pool], num_classes, meta_n, config.dev_fraction, config.seed
            )
            dev_pos = pool[dev_pos]
            dev_labels = clean_rows.labels[dev_pos]
        meta_pos = pool[meta_pos]
        if len(dev_pos) == 0:
            log.warning("no dev rows (--dev-fraction 0 and no --dev): model/best is the last epoch")

        # compile and device: where and how fast it runs, not what it computes (a run resumes on another device)
        provenance_config = {k: v for k, v in asdict(config).items() if k not in ("compile", "device")}
        meta = artifacts.make_meta("train", "model", config=provenance_config, seed=config.seed, inputs=inputs)
        history_path = out / "history.arrow"
        state_dir = out / "state"
        artifacts.guard_output(
            history_path, {**meta, "kind": "history"}, inputs=[train_path, clean_path], overwrite=overwrite
        )
        if distributed.is_main():  # under torchrun only rank 0 changes files (the others wait at the barrier below)
            artifacts.clean_stale_temps(out)  # what a killed run left half-written (never read as artifacts)
            tokens.clean_cache(ws.cache)
        state: dict[str, Any] | None = None
        if (state_dir / STATE_FILE).is_file():
            try:
                # weights_only: a state file is data, never code (a crafted pickle is refused, not run)
                state = torch.load(state_dir / STATE_FILE, map_location="cpu", weights_only=True)
            except Exception as e:  # UnpicklingError, a truncated zip, ...: all mean "not a state we wrote"
                # torch's own message advises weights_only=False, i.e. running the file's code: never quoted
                if not overwrite:
                    raise ArtifactError(
                        f"resume state {state_dir / STATE_FILE} is damaged or was not written by mlrnet "
                        f"({type(e).__name__})",
                        f"delete {state_dir} or pass --overwrite to start training again",
                    ) from e
                log.warning("resume state %s is unreadable: starting again (--overwrite)", state_dir / STATE_FILE)
                state = {}
            if state and state.get("provenance") != artifacts.provenance(meta):
                if not overwrite:
                    raise artifacts.ArtifactExistsError(
                        f"{state_dir} holds the state of a different training run",
                        "pass --overwrite to start again, or choose another --workdir",
                    )
                state = None
        state = state or None
        if state is None and not overwrite:  # a finished run drops its resume state: its outputs say it is done
            done = _finished_history(out, history_path, meta, config.epochs)
            if done is not None:
                log.info("train: %s is up to date (same inputs and config)", out)
                return TrainResult(
                    best_dir=out / "best", last_dir=out / "last", history_path=history_path, best_epoch=done[0],
                    best_dev_accuracy=done[1], epochs_run=0, resumed_from=config.epochs, meta_size=len(meta_pos),
                    dev_size=len(dev_pos), model=str(config.model), history=done[2],
                )

        # model, tokens, features
        device = modeling.select_device(distributed.resolve_device(config.device))
        init_path = config.model
        if config.init_from == "stage1":
            init_path = str(ws.stage1 / "model") if (ws.stage1 / "model" / "config.json").is_file() else str(ws.stage1)
        tokenizer = modeling.load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        model = modeling.load_classifier(
            init_path,
            num_classes,
            class_names,
            allow_pickle=config.allow_pickle,
            trust_remote_code=config.trust_remote_code,
            init_seed=config.seed,
        ).to(device)
        # only once the model loaded: a bad --model with --overwrite must leave the old state alone
        distributed.barrier()  # every rank has read the old state before rank 0 removes it
        if overwrite and state is None and distributed.is_main():
            shutil.rmtree(state_dir, ignore_errors=True)
        distributed.barrier()
        tok_id = modeling.model_fingerprint(config.model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        with distributed.main_first():  # rank 0 fills the caches, the others read them
            train_tok = tokens.tokenize_table(
                train_path, tokenizer, tok_id, config.max_length, ws.cache, table=train_table
            )
            clean_tok = tokens.tokenize_table(
                clean_path, tokenizer, tok_id, config.max_length, ws.cache, table=clean_table
            )
            dev_tok = clean_tok
            if dev_table is not None:
                dev_tok = tokens.tokenize_table(
                    dev_path, tokenizer, tok_id, config.max_length, ws.cache, table=dev_table
                )
        head_prefix = modeling.head_name(model) + "."

        feats: dict[str, torch.Tensor] = {}
        enc_id: str | None = None
        if config.freeze_encoder:
            # the same id collect-losses uses, so its cached features of the pretrained encoder are reused
            enc_id = modeling.encoder_cache_id(model, modeling.model_fingerprint(init_path), config.seed)
            quiet = progress if distributed.is_main() else NullProgress()
            for key, tc in (("train", train_tok), ("clean", clean_tok), ("dev", dev_tok)):
                with distributed.main_first():
                    feats[key] = tokens.encode_features(
                        model, tc, model_id=enc_id, cache_dir=ws.cache, pad_id=pad_id, device=device, progress=quiet
                    )
            for n, p in model.named_parameters():
                p.requires_grad_(n.startswith(head_prefix))

            def forward(m: torch.nn.Module, inp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
                return inp["features"], modeling.head_logits(m, inp["features"])
        else:

            def forward(m: torch.nn.Module, inp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
                with modeling.autocast_context(device):
                    return modeling.features_and_logits(m, inp["input_ids"], inp["attention_mask"])

        fns = ClassifierFns(forward=forward, head=lambda m, f: modeling.head_logits(m, f), head_prefix=head_prefix)

        def inputs_of(source: str, positions: np.ndarray) -> dict[str, torch.Tensor]:
            if config.freeze_encoder:
                return {"features": modeling.to_device(feats[source][torch.from_numpy(positions)], device)}
            tc = {"train": train_tok, "clean": clean_tok, "dev": dev_tok}[source]
            ids, mask = tc.batch(positions, pad_id)
            return {"input_ids": modeling.to_device(ids, device), "attention_mask": modeling.to_device(mask, device)}

        # meta-net
        torch.manual_seed(config.seed)
        meta_net: torch.nn.Module | None = None
        if config.method == "mwnet":
            meta_net = MWNet()
        elif config.method == "mlrnet":
            assert curves_all is not None
            with torch.no_grad():
                probe_f, _ = forward(model, inputs_of("train", np.array([0])))
            meta_net = MLRNetMetaNet(
                probe_f.shape[-1],
                num_classes,
                curves_all.shape[1],
                label_emb_dim=config.label_emb_dim,
                df_dim=config.df_dim,
            )
        meta_opt = None
        names: list[str] = []
        if meta_net is not None:
            meta_net.to(device)
            distributed.broadcast_module_(meta_net)  # every rank starts from rank 0's θ (same seed anyway)
            meta_opt = torch.optim.Adam(meta_net.parameters(), lr=config.meta_lr, weight_decay=1e-4)
            names = resolve_meta_params(model, config.meta_params, head_prefix)

        # what each method trains on: ("train", positions) or ("clean", positions)
        if config.method == "plain-meta":
            parts = [("train", np.arange(len(train_rows.sample_ids))), ("clean", meta_pos)]
        elif config.method == "meta-only":
            parts = [("clean", meta_pos)]
        else:
            parts = [("train", np.arange(len(train_rows.sample_ids)))]
        items = [(src, int(p)) for src, ps in parts for p in ps]
        # global steps: batches of batch_size rows per rank (batch_size x world in all)
        steps_per_epoch = distributed.num_steps(len(items), config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        from transformers import get_linear_schedule_with_warmup

        sched = get_linear_schedule_with_warmup(opt, int(round(config.warmup_ratio * total_steps)), total_steps)

        history: list[dict[str, Any]] = []
        best_acc, best_epoch, start_epoch = -1.0, 0, 0
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            if meta_net is not None:
                meta_net.load_state_dict(state["meta_net"])
                meta_opt.load_state_dict(state["meta_opt"])  # type: ignore[union-attr]
            history = [dict(r) for r in state["history"]]
            best_acc, best_epoch, start_epoch = float(state["best_acc"]), int(state["best_epoch"]), int(state["epoch"])
            log.info("resuming from epoch %d/%d", start_epoch, config.epochs)

        labels_train = torch.from_numpy(train_rows.labels)
        labels_clean = torch.from_numpy(clean_rows.labels)
        noisy = train_rows.is_noisy
        mbs = min(config.meta_batch_size or config.batch_size, len(meta_pos))
        bar = get_progress(progress) if distributed.is_main() else NullProgress()
        extra = {"class_names": class_names, "meta_sample_ids": clean_rows.sample_ids[meta_pos].tolist(),
                 "encoder_cache_id": enc_id}
        multi = distributed.is_distributed()
        if config.compile and meta_net is not None:
            log.warning(
                "--compile: the %s meta step differentiates twice (or in forward mode) through functional_call, "
                "which torch.compile does not support; it runs eagerly",
                config.method,
            )
        # the real step's forward: the model itself, or DDP (classifier gradients all-reduced in the backward)
        # and/or torch.compile around it; ŵ and the meta loss always run on `model` itself (functional_call)
        real_forward = distributed.training_forward(
            model, forward, device, compile_forward=config.compile and meta_net is None
        )
        n_train = len(train_rows.sample_ids)
        step = start_epoch * steps_per_epoch
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            # dropout masks: same per epoch on resume, one stream per rank (rank 0's is the single-process one)
            torch.manual_seed(config.seed * 7919 + epoch + 1_000_003 * distributed.rank())
            order = torch.randperm(len(items), generator=_epoch_generator(config.seed, epoch, 0))
            shards = distributed.shard_batches(order, config.batch_size)
            meta_gen = _epoch_generator(config.seed, epoch, 1)
            # each rank takes its own mbs rows of the same seeded meta permutation (rank 0: the first mbs)
            meta_slot = torch.arange(mbs) + distributed.rank() * mbs
            model.train()
            # running sums stay on the device: read back once per epoch (no host sync per step)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            n_seen = 0
            w_sum = torch.zeros(n_train, dtype=torch.float64, device=device)
            w_cnt = torch.zeros(n_train, dtype=torch.float64, device=device)
            meta_losses: list[torch.Tensor] = []
            with bar.task(f"epoch {epoch + 1}/{config.epochs}", total=len(items)) as task:
                for b, shard in enumerate(shards):
                    chunk = [items[i] for i in shard.rows.tolist()]
                    srcs = {s for s, _ in chunk}
                    reduce_meta = None
                    if multi:

                        def reduce_meta(grads: list[torch.Tensor], share: float = shard.share) -> None:
                            distributed.all_reduce_mean_(grads, share)

                    if len(srcs) > 1:  # plain-meta mixes tables: run each part and concatenate
                        ins = [inputs_of(s, np.array([p for s2, p in chunk if s2 == s])) for s in sorted(srcs)]
                        labs = modeling.to_device(
                            torch.cat(
                                [
                                    (labels_train if s == "train" else labels_clean)[[p for s2, p in chunk if s2 == s]]
                                    for s in sorted(srcs)
                                ]
                            ),
                            device,
                        )
                        logits = real_forward(ins)[1]
                        loss = per_sample_loss(logits, labs).mean()
                        losses_b = None
                    else:
                        src = chunk[0][0]
                        pos = np.array([p for _, p in chunk])
                        pos_t = torch.from_numpy(pos)
                        labs = modeling.to_device((labels_train if src == "train" else labels_clean)[pos_t], device)
                        batch = StepBatch(
                            inputs_of(src, pos),
                            labs,
                            modeling.to_device(curves_all[pos_t], device)
                            if curves_all is not None and src == "train"
                            else None,
                        )
                        if meta_net is None:
                            _, logits = real_forward(batch.inputs)
                            loss = per_sample_loss(logits, labs).mean()
                        else:
                            mperm = torch.randperm(len(meta_pos), generator=meta_gen)
                            mpos = meta_pos[mperm[meta_slot % len(meta_pos)].numpy()]
                            mb = StepBatch(
                                inputs_of("clean", mpos),
                                modeling.to_device(labels_clean[torch.from_numpy(mpos)], device),
                            )
                            res = meta_step(
                                model,
                                meta_net,
                                meta_opt,
                                batch,
                                mb,
                                alpha=config.virtual_lr,
                                meta_params=names,
                                normalize_weights=config.normalize_weights,
                                fns=fns,
                                update_meta=step % config.meta_interval == 0,
                                mode=config.meta_mode,
                                meta_dropout=config.meta_dropout,
                                real_forward=real_forward,
                                reduce_meta_grads=reduce_meta,
                                # ∂L_meta/∂θ is O(α) (eq. 5 through eq. 4). At a fine-tuning α (1e-5) it falls
                                # below Adam's eps and under its coupled weight decay, which then shrinks θ to a
                                # constant weight. Divided by α, Adam sees the α-free first-order term
                                # -Σ_i (∇L_i·∇L_meta) ∂c_i/∂θ.
                                meta_grad_scale=1.0 / config.virtual_lr,
                            )
                            loss = res.loss
                            if not shard.is_placeholder:
                                pos_d = modeling.to_device(pos_t, device)
                                w_sum.index_add_(0, pos_d, res.weights.double())
                                w_cnt.index_add_(0, pos_d, torch.ones_like(w_sum[pos_d]))
                                if res.meta_loss is not None:
                                    meta_losses.append(res.meta_loss)
                            losses_b = res.losses
                    batch_loss = losses_b.mean() if meta_net is not None else loss.detach()
                    if multi:
                        # DDP averages the ranks' gradients; the share makes that a row-weighted mean
                        loss = loss * shard.share
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    if not shard.is_placeholder:
                        loss_sum += batch_loss.double() * len(chunk)
                        n_seen += len(chunk)
                    # reading the loss back syncs with the device: only now and then, for the progress bar
                    shown = b % _PROGRESS_LOSS_EVERY == 0 or b == len(shards) - 1
                    task.advance(shard.global_size, **({"loss": float(batch_loss)} if shown else {}))

            if multi:
                loss_sum = distributed.all_reduce_sum(loss_sum)
                n_seen = int(distributed.all_reduce_sum(torch.tensor([float(n_seen)], dtype=torch.float64)).item())
                w_sum, w_cnt = distributed.all_reduce_sum(w_sum), distributed.all_reduce_sum(w_cnt)
            dev_acc, dev_predicted = _accuracy(
                model,
                forward,
                inputs_of,
                "clean" if dev_table is None else "dev",
                dev_pos,
                dev_labels,
                config.batch_size * 2,
                device,
                num_classes,
            )
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": float(loss_sum) / max(n_seen, 1),
                "dev_accuracy": dev_acc,
            }
            if meta_net is not None:
                w_sum_np, w_cnt_np = w_sum.cpu().numpy(), w_cnt.cpu().numpy()
                seen = w_cnt_np > 0
                w = w_sum_np[seen] / w_cnt_np[seen]
                meta_loss_mean = None
                if multi:
                    ml = (
                        torch.stack(meta_losses).double().sum()
                        if meta_losses
                        else torch.zeros((), dtype=torch.float64)
                    )
                    tot = distributed.all_reduce_sum(torch.stack([ml.cpu(), torch.tensor(float(len(meta_losses)))]))
                    meta_loss_mean = float(tot[0] / tot[1]) if float(tot[1]) else None
                elif meta_losses:
                    meta_loss_mean = float(np.mean(torch.stack(meta_losses).double().cpu().numpy()))
                row.update(
                    weight_mean=float(w.mean()),
                    weight_std=float(w.std()),
                    meta_loss=meta_loss_mean,
                )
                if noisy is not None:
                    nz = noisy[seen]
                    row["weight_mean_noisy"] = _nan_to_none(float(w[nz].mean())) if nz.any() else None
                    row["weight_mean_clean"] = _nan_to_none(float(w[~nz].mean())) if (~nz).any() else None
                line = f"epoch {epoch + 1}: weight mean {row['weight_mean']:.4f} std {row['weight_std']:.4f}"
                if noisy is not None:  # the truth is known (a corrupted set, not a set with real noise)
                    means = [row[f"weight_mean_{g}"] for g in ("noisy", "clean")]
                    line += " (noisy rows {}, clean rows {})".format(*("-" if m is None else f"{m:.4f}" for m in means))
                log.info("%s", line)
                if row["weight_std"] < 1e-4:
                    log.warning(
                        "epoch %d: the meta-net gives every row the same weight (std %.2g): it learned "
                        "nothing; try a larger --meta-lr",
                        epoch + 1,
                        row["weight_std"],
                    )
            row["seconds"] = time.perf_counter() - t0
            history.append(row)

            better = dev_acc is None or dev_acc > best_acc
            if better:
                best_acc, best_epoch = (dev_acc if dev_acc is not None else -1.0), epoch + 1
            log.info(
                "epoch %d/%d: train loss %.4f, dev accuracy %s%s (%.0fs)",
                epoch + 1,
                config.epochs,
                row["train_loss"],
                "n/a" if dev_acc is None else f"{dev_acc:.4f}",
                " (best)" if better and dev_acc is not None else "",
                row["seconds"],
            )
            collapse = None
            if dev_predicted is not None and dev_acc is not None:
                earlier = [r["dev_accuracy"] for r in history[:-1] if r.get("dev_accuracy") is not None]
                collapse = real_collapse(
                    dev_predicted, dev_labels, dev_acc, max(earlier, default=None), train_rows.labels
                )
            if collapse is not None:
                top, share, true_share = collapse
                # weights that are nearly constant cannot be the meta-net's doing: then it is the classifier's lr
                blame_meta = meta_net is not None and row.get("weight_std", 0.0) >= SPREAD_WEIGHT_STD
                log.warning(
                    "epoch %d: the classifier predicts %r for %.0f%% of the dev rows (%.0f%% of their labels); %s",
                    epoch + 1,
                    class_names[top],
                    100 * share,
                    100 * true_share,
                    f"the meta-net may be learning too fast: try --meta-lr {config.meta_lr / 10:g}"
                    if blame_meta
                    else f"try a smaller --lr than {config.lr:g}",
                )
            # only rank 0 writes (every rank holds the same model, meta-net and history)
            if distributed.is_main():
                model_meta = {**meta, "epoch": epoch + 1}
                frozen = (head_prefix, [out / "best", out / "last", ws.stage1]) if config.freeze_encoder else None
                for name in ("last", "best") if better else ("last",):
                    _save_model_dir(out / name, model, tokenizer, meta_net, model_meta, {**extra, "epoch": epoch + 1},
                                    frozen)
                artifacts.write_table(history_path, _history_table(history), {**meta, "kind": "history"})
                new_state = {
                    "provenance": artifacts.provenance(meta),
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "history": history,
                    "best_acc": best_acc,
                    "best_epoch": best_epoch,
                }
                if meta_net is not None:
                    new_state["meta_net"] = meta_net.state_dict()
                    new_state["meta_opt"] = meta_opt.state_dict()  # type: ignore[union-attr]
                with artifacts.atomic_path(state_dir / STATE_FILE) as tmp:
                    torch.save(new_state, tmp)

        if distributed.is_main():  # finished: the resume state (a full model and optimiser) is no longer needed
            shutil.rmtree(state_dir, ignore_errors=True)
        distributed.barrier()  # the others return once rank 0 has written everything
        return TrainResult(
            best_dir=out / "best",
            last_dir=out / "last",
            history_path=history_path,
            best_epoch=best_epoch,
            best_dev_accuracy=best_acc if best_acc >= 0 else None,
            epochs_run=config.epochs - start_epoch,
            resumed_from=start_epoch,
            meta_size=len(meta_pos),
            dev_size=len(dev_pos),
            model=str(config.model),
            history=history,
        )


def _accuracy(  # noqa: ANN001
    model, forward, inputs_of, source, positions, labels, batch_size, device, num_classes
) -> tuple[float | None, np.ndarray | None]:
    """Accuracy on the dev rows and how often each class was predicted (eval mode, no dropout, no gradients);
    under torchrun each rank scores a part."""
    if len(positions) == 0:
        return None, None
    total = len(positions)
    labels = np.asarray(labels)
    if distributed.is_distributed():
        part = distributed.split_evenly(total).numpy()
        positions, labels = positions[part], labels[part]
    # summed on the device, read once: [correct, predictions of class 0, 1, ...]
    counts = torch.zeros(1 + num_classes, dtype=torch.int64, device=device)
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(positions), batch_size):
            pos = positions[i : i + batch_size]
            _, logits = forward(model, inputs_of(source, pos))
            y = modeling_to_device(torch.from_numpy(labels[i : i + batch_size]), device)
            pred = logits.argmax(-1)
            counts[0] += (pred == y).sum()
            counts[1:] += torch.bincount(pred, minlength=num_classes)[:num_classes]
    counts = distributed.all_reduce_sum(counts).cpu().numpy()
    return int(counts[0]) / total, counts[1:]


def real_collapse(
    predicted: np.ndarray,
    labels: np.ndarray,
    dev_accuracy: float,
    best_earlier: float | None,
    train_labels: np.ndarray | None = None,
) -> tuple[int, float, float] | None:
    """A :func:`one_class_collapse` that is a failure, not a phase of a healthy run.

    On an imbalanced training set a healthy classifier leans to the largest class in its first epochs (the
    quickstart: MLRNet predicts 'Sports' for 55 % of the dev rows at epoch 1, plain 'World', the largest
    training class, for 94 %; both then rise to dev accuracies of 0.6-0.8). A collapse is told apart by what
    it costs or by what imbalance cannot explain: a dev accuracy fallen at least halfway from the best earlier
    epoch's to that of always predicting the most frequent dev class, or one class for at least 80 % of the dev
    rows that is not the most frequent class of ``train_labels``."""
    collapse = one_class_collapse(predicted, labels)
    if collapse is None:
        return None
    top, share = collapse[0], collapse[1]
    labels = np.asarray(labels)
    majority = float(np.bincount(labels).max()) / len(labels) if len(labels) else 0.0
    fell = best_earlier is not None and dev_accuracy <= (best_earlier + majority) / 2
    largest = int(np.argmax(np.bincount(np.asarray(train_labels)))) if train_labels is not None else None
    unexplained = share >= COLLAPSE_SHARE and top != largest
    return collapse if fell or unexplained else None


def one_class_collapse(predicted: np.ndarray, labels: np.ndarray) -> tuple[int, float, float] | None:
    """``(class, its share of the predictions, its share of the labels)`` when the classifier predicts one
    class for more than half of the dev rows and at least twice as often as that class occurs, else None.

    The meta methods' known failure (a meta-net that learns too fast puts all weight on a few rows) ends
    there; a dev accuracy that merely falls does not tell it from overfitting."""
    total = int(predicted.sum())
    if total == 0:
        return None
    top = int(np.argmax(predicted))
    share = float(predicted[top]) / total
    true_share = float(np.count_nonzero(np.asarray(labels) == top)) / total
    if share > 0.5 and share >= 2 * true_share:
        return top, share, true_share
    return None
