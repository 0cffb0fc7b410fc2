"""Stage 2 (paper §3.2-3.4, Algorithm 1): train the classifier with MLRNet, MW-Net, MLC or a plain baseline.

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
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlrnet_cli import artifacts, distributed, engine, locks, seeding, stageio
from mlrnet_cli.configs import AUTO, AUTO_META_SHARES, DEFAULT_META_SHARE, DFInputs, Method, TrainConfig
from mlrnet_cli.distributed import Shard
from mlrnet_cli.engine import Checkpoint, Loop, StepOutput
from mlrnet_cli.errors import (
    ArtifactError,
    ArtifactExistsError,
    ConfigError,
    DataError,
    FingerprintMismatchError,
    Stage1MissingError,
)
from mlrnet_cli.glc import forward_corrected_loss, glc_corruption_matrix
from mlrnet_cli.meta import ClassifierFns, StepBatch, meta_step, mlc_step, per_sample_loss, resolve_meta_params
from mlrnet_cli.metanet import LabelCorrectionNet, MLRNetMetaNet, MWNet, curve_prior_spread, normalized_curves
from mlrnet_cli.modeling import eval_mode, to_device
from mlrnet_cli.progress import NullProgress, Progress
from mlrnet_cli.progress import get as get_progress
from mlrnet_cli.tokens import clean_cache
from mlrnet_cli.workspace import Workspace

log = logging.getLogger("mlrnet")

METHODS = tuple(m.value for m in Method)
#: a classifier that predicts one class for this share of the dev rows has collapsed (see real_collapse)
COLLAPSE_SHARE = 0.8
#: below this weight std (over the training rows) the weights did not go to the ends, so a collapse cannot come
#: from a meta-net that learns too fast: the meta-driven collapses in our benchmark logs had std 0.22-0.41, while
#: mlc at meta lr 1e-5 collapsed with near-uniform soft labels (std 0.02-0.05) because its LCN learned too slowly
SPREAD_WEIGHT_STD = 0.1
#: --meta-lr-probe's candidates, as factors of --meta-lr
PROBE_FACTORS = (0.1, 1.0, 10.0)
PROBE_FILE = "meta_lr_probe.json"
#: --meta-share auto: its candidates' dev accuracy and the choice, beside the chosen run's outputs
SHARE_CHOICE_FILE = "meta_share_choice.json"
#: --meta-share auto: where each candidate trains (under the model folder), e.g. candidates/share-0.5
CANDIDATES = "candidates"


#: (best epoch, its dev accuracy, the history) of a run
_Best = tuple[int, float | None, list[dict[str, Any]]]


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
    meta_lr_probe: dict[str, Any] | None = None  #: --meta-lr-probe: the candidates' dev accuracy and the choice
    meta_share_choice: dict[str, Any] | None = None  #: --meta-share auto: the candidates' dev accuracy and the choice

    def summary(self) -> dict[str, Any]:
        """The run's numbers (``--json``): every field but the paths, ``resumed_from`` as ``resumed_from_epoch``."""
        numbers = {k: v for k, v in asdict(self).items() if not k.endswith(("_dir", "_path"))}
        return {"resumed_from_epoch" if k == "resumed_from" else k: v for k, v in numbers.items()}


# ---------------------------------------------------------------------------------------------
# inputs


def split_clean_pool(
    labels: np.ndarray, num_classes: int, meta_per_class: int, dev_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of (meta set, dev set): per class, a seeded shuffle; dev = the first round(n·fraction),
    meta = the next ``meta_per_class``. The dev part does not depend on ``meta_per_class``."""
    rng = seeding.clean_pool_split_rng(seed)
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


@dataclass(frozen=True)
class _Inputs:
    """What stage 2 reads, checked: the tables, the manifest, the curves I_i (train row order) and the split."""

    train: stageio.Rows
    clean: stageio.Rows
    dev: stageio.Rows | None
    manifest: stageio.Manifest
    curves: torch.Tensor | None
    fingerprints: dict[str, str]
    meta_pos: np.ndarray  #: clean-table rows of the meta set
    dev_pos: np.ndarray  #: rows of the dev source (the dev table, else the clean table)
    dev_labels: np.ndarray
    stage1: Path | None = None  #: the stage-1 classifier's folder (``glc`` estimates its Ĉ with it)


def _read_inputs(config: TrainConfig, paths: dict[str, Path | None]) -> tuple[TrainConfig, _Inputs]:
    """Read the workspace's tables and curves; the config with its model resolved (from the curves' metadata)."""
    manifest = stageio.read_manifest(paths["manifest"])
    train_rows = stageio.read_rows(paths["train"], "training table", manifest.num_classes)
    clean_rows = stageio.read_rows(paths["clean"], "clean table", manifest.num_classes)
    fingerprints = {"train": train_rows.fingerprint(), "clean": clean_rows.fingerprint()}
    curves, model_name = None, config.model
    if paths["losses"].is_file():  # stage-1 curves: the default model, and I_i for MLRNet
        read = stageio.read_curves(paths["losses"], train_rows)
        model_name = model_name or read.model
        curves = normalized_curves(read.losses, torch.from_numpy(train_rows.labels))
        fingerprints["losses"] = read.fingerprint
    elif config.method == "mlrnet":
        raise ArtifactError(f"loss curves not found: {paths['losses']}", "run `mlrnet collect-losses` first")
    if not model_name:
        raise ConfigError("no model to train", "pass --model, or run collect-losses first (it records the model)")
    config = replace(config, model=str(model_name))
    stage1 = paths.get("stage1")
    if config.method == "glc":
        fingerprints["stage1"] = _check_stage1(stage1, fingerprints["train"], config.model)
    dev_rows = None
    if paths["dev"] is not None:
        dev_rows = stageio.read_rows(paths["dev"], "dev table", manifest.num_classes)
        fingerprints["dev"] = dev_rows.fingerprint()
    meta_pos, dev_pos, dev_labels = _split(config, train_rows, clean_rows, dev_rows, manifest.num_classes)
    return config, _Inputs(
        train_rows, clean_rows, dev_rows, manifest, curves, fingerprints, meta_pos, dev_pos, dev_labels, stage1
    )


def stage1_model_path(stage1: Path) -> Path:
    """The folder of the stage-1 classifier that `collect-losses` wrote into ``stage1``."""
    return stage1 / "model" if (stage1 / "model" / "config.json").is_file() else stage1


def _check_stage1(stage1: Path | None, train_fingerprint: str, model: str) -> str:
    """``glc``: the stage-1 classifier exists, was trained on this training table and from ``model`` (whose
    tokenizer makes the token ids it reads); its fingerprint."""
    from mlrnet_cli import modeling

    folder = stage1_model_path(stage1) if stage1 is not None else None
    if folder is None or not (folder / "config.json").is_file() or not (stage1 / "mlrnet.json").is_file():
        raise Stage1MissingError(
            f"--method glc needs the stage-1 classifier, and {stage1} holds none",
            "run `mlrnet collect-losses` first: GLC estimates the corruption matrix with its classifier",
        )
    inputs = (artifacts.read_json(stage1 / "mlrnet.json").get(artifacts.META_KEY) or {}).get("inputs") or {}
    if inputs.get("train") != train_fingerprint:
        raise FingerprintMismatchError(
            f"the stage-1 classifier in {stage1} was trained on a different training table",
            "rerun `mlrnet collect-losses` on this one",
        )
    if inputs.get("model") != modeling.model_fingerprint(model):
        raise ConfigError(
            f"--method glc: the stage-1 classifier in {stage1} was not fine-tuned from --model {model}",
            "train with the model collect-losses used (the default), or rerun collect-losses with this one",
        )
    return modeling.model_fingerprint(folder)


def _split(
    config: TrainConfig, train: stageio.Rows, clean: stageio.Rows, dev: stageio.Rows | None, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The clean pool without training rows: (meta rows, dev rows, dev labels); dev from ``dev`` when given."""
    overlap = np.isin(clean.sample_ids, train.sample_ids)
    if overlap.any():
        log.warning("%d clean row(s) share a sample_id with training rows: left out of the meta set", overlap.sum())
    pool = np.flatnonzero(~overlap)
    fraction = 0.0 if dev is not None else config.dev_fraction
    meta_n = 0 if config.method == "plain" else config.meta_per_class  # plain never reads the meta set
    meta_pos, dev_pos = split_clean_pool(clean.labels[pool], num_classes, meta_n, fraction, config.seed)
    dev_pos = pool[dev_pos] if dev is None else np.arange(len(dev))
    dev_labels = clean.labels[dev_pos] if dev is None else dev.labels
    choosers = [
        f
        for f, on in (("--meta-lr-probe", config.meta_lr_probe), ("--meta-share auto", config.meta_share == AUTO))
        if on
    ]
    if len(dev_pos) == 0 and choosers:  # before any model is loaded: the choice would be blind
        hint = "pass --dev or a --dev-fraction"
        if choosers[0] == "--meta-share auto":  # a frozen MLRNet's default: say how to choose without dev rows
            hint += ", or choose the form: --meta-share 0.5 (ours) or --meta-share 0 --curve-prior 0 (the paper's)"
        raise ConfigError(f"{choosers[0]} chooses on the dev rows and there are none", hint)
    if len(dev_pos) == 0:
        log.warning("no dev rows (--dev-fraction 0 and no --dev): model/best is the last epoch")
    return pool[meta_pos], dev_pos, dev_labels


# ---------------------------------------------------------------------------------------------
# the classifier and its inputs


class _Batches:
    """The rows as classifier inputs: token ids from the token cache, or the frozen encoder's cached features
    (``--freeze-encoder``), for the sources ``train``, ``clean`` and ``dev``."""

    def __init__(
        self,
        config: TrainConfig,
        ws: Workspace,
        inp: _Inputs,
        model: torch.nn.Module,
        tokenizer: Any,
        device: torch.device,
        init_path: str,
        progress: Progress | None,
    ) -> None:
        from mlrnet_cli import modeling, tokens

        self.config, self.device, self.tokenizer = config, device, tokenizer
        tok_id = modeling.model_fingerprint(config.model)
        self.pad_id = modeling.pad_token_id(tokenizer)
        tables = {"train": inp.train, "clean": inp.clean, **({"dev": inp.dev} if inp.dev is not None else {})}
        with distributed.main_first():  # rank 0 fills the caches, the others read them
            self.tokens = {
                k: tokens.tokenize_table(r.path, tokenizer, tok_id, config.max_length, ws.cache, table=r.table)
                for k, r in tables.items()
            }
        self.tokens.setdefault("dev", self.tokens["clean"])
        self.head_prefix = modeling.head_name(model) + "."
        self.features: dict[str, torch.Tensor] = {}
        self.encoder_id: str | None = None
        if config.freeze_encoder:
            # the same id collect-losses uses, so its cached features of the pretrained encoder are reused
            self.encoder_id = modeling.encoder_cache_id(model, modeling.model_fingerprint(init_path), config.seed)
            quiet = progress if distributed.is_main() else NullProgress()
            where = {"model_id": self.encoder_id, "cache_dir": ws.cache, "pad_id": self.pad_id, "device": device}
            for key, tc in self.tokens.items():
                with distributed.main_first():
                    self.features[key] = tokens.encode_features(model, tc, progress=quiet, **where)
            for n, p in model.named_parameters():
                p.requires_grad_(n.startswith(self.head_prefix))
        self.fns = ClassifierFns(forward=self.forward, head=modeling.head_logits, head_prefix=self.head_prefix)

    def forward(self, m: torch.nn.Module, inp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(head-input features, logits) of one batch."""
        from mlrnet_cli import modeling

        if "features" in inp:
            return inp["features"], modeling.head_logits(m, inp["features"])
        with modeling.autocast_context(self.device):
            return modeling.features_and_logits(m, inp["input_ids"], inp["attention_mask"])

    def inputs_of(self, source: str, positions: np.ndarray) -> dict[str, torch.Tensor]:
        if self.config.freeze_encoder:
            return {"features": to_device(self.features[source][torch.from_numpy(positions)], self.device)}
        ids, mask = self.tokens[source].batch(positions, self.pad_id)
        return {"input_ids": to_device(ids, self.device), "attention_mask": to_device(mask, self.device)}


def _load_model(
    config: TrainConfig, ws: Workspace, manifest: stageio.Manifest
) -> tuple[torch.nn.Module, Any, torch.device, str]:
    """(classifier on its device, tokenizer, device, the path its weights came from)."""
    from mlrnet_cli import modeling

    device = modeling.select_device(distributed.resolve_device(config.device))
    init_path = str(stage1_model_path(ws.stage1)) if config.init_from == "stage1" else config.model
    tokenizer = modeling.load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    model = _classifier(config, init_path, manifest, init_seed=seeding.init_seed(config.seed)).to(device)
    return model, tokenizer, device, init_path


def _classifier(config: TrainConfig, path: str | Path, manifest: stageio.Manifest, **kw: Any) -> torch.nn.Module:
    """The classifier at ``path`` with the manifest's classes, loaded as --allow-pickle and --trust-remote-code say."""
    from mlrnet_cli import modeling

    safety = {"allow_pickle": config.allow_pickle, "trust_remote_code": config.trust_remote_code}
    return modeling.load_classifier(path, manifest.num_classes, manifest.class_names, **safety, **kw)


def _meta_net(config: TrainConfig, inp: _Inputs, model: torch.nn.Module, batches: _Batches) -> torch.nn.Module | None:
    """θ of the method's meta-net (MW-Net's V(L_i), MLRNet's V(DF(h, Y_emb, I)), or MLC's label-correction
    network ŷ(h, Y_emb)), the same on every rank."""
    torch.manual_seed(seeding.init_seed(config.seed))
    if config.method == "mwnet":
        meta_net: torch.nn.Module = MWNet()
    elif config.method in ("mlrnet", "mlc"):
        with torch.no_grad():  # the head's input size, from one row
            dim = batches.forward(model, batches.inputs_of("train", np.array([0])))[0].shape[-1]
        sizes = (dim, inp.manifest.num_classes)
        if config.method == "mlc":
            meta_net = LabelCorrectionNet(*sizes, label_emb_dim=config.label_emb_dim, hidden_dim=config.df_dim)
        else:
            assert inp.curves is not None
            dims = {"label_emb_dim": config.label_emb_dim, "df_dim": config.df_dim}
            extra = {
                "curve_prior": config.curve_prior,
                "without_features": config.df_inputs == DFInputs.label_curve.value,
                "feature_agreement": config.df_inputs == DFInputs.agreement.value,
            }
            meta_net = MLRNetMetaNet(*sizes, inp.curves.shape[1], **dims, **extra)
    else:
        return None
    meta_net.to(batches.device)
    distributed.broadcast_module_(meta_net)  # every rank starts from rank 0's θ (same seed anyway)
    return meta_net


# ---------------------------------------------------------------------------------------------
# one step per method


@dataclass
class _Epoch:
    """Running sums of an epoch, on the device (read back once, in end_epoch: no host sync per step)."""

    loss_sum: torch.Tensor
    w_sum: torch.Tensor
    w_cnt: torch.Tensor
    n_seen: int = 0
    meta_losses: list[torch.Tensor] = field(default_factory=list)
    meta_gen: torch.Generator | None = None
    t0: float = 0.0


class _Run:
    """One training run: what every step reads (items, labels, curves, the classifier's inputs) and the epoch's
    running sums. ``items`` are the rows a method trains on, ``("train" | "clean", position)``."""

    def __init__(
        self, inp: _Inputs, batches: _Batches, model: torch.nn.Module, meta_net: torch.nn.Module | None
    ) -> None:
        config = self.config = batches.config
        self.inp, self.batches, self.model, self.meta_net = inp, batches, model, meta_net
        self.items, self.device = _items(config, inp), batches.device
        self.labels = {"train": torch.from_numpy(inp.train.labels), "clean": torch.from_numpy(inp.clean.labels)}
        # the real step's forward: the model itself, or DDP (classifier gradients all-reduced in the backward)
        # and/or torch.compile around it; ŵ and the meta loss always run on `model` itself (functional_call)
        self.real_forward = distributed.training_forward(
            model, batches.forward, self.device, compile_forward=config.compile and meta_net is None
        )
        self.epoch: _Epoch | None = None

    def new_epoch(self, meta_gen: torch.Generator) -> None:
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=self.device)  # noqa: E731
        n = len(self.inp.train)
        self.epoch = _Epoch(zeros(()), zeros(n), zeros(n), meta_gen=meta_gen, t0=time.perf_counter())

    def chunk(self, shard: Shard) -> list[tuple[str, int]]:
        return [self.items[i] for i in shard.rows.tolist()]

    def forward_rows(self, shard: Shard) -> tuple[dict[str, np.ndarray], torch.Tensor, torch.Tensor]:
        """(positions per table, labels, logits) of a batch whose rows may come from both tables: each table's
        part runs, the logits concatenate."""
        chunk = self.chunk(shard)
        pos = {s: np.array([p for s2, p in chunk if s2 == s]) for s in sorted({s for s, _ in chunk})}
        labels = to_device(torch.cat([self.labels[s][p.tolist()] for s, p in pos.items()]), self.device)
        ins = [self.batches.inputs_of(s, p) for s, p in pos.items()]
        return pos, labels, self.real_forward(ins[0] if len(ins) == 1 else ins)[1]

    def finish(self, shard: Shard, n_rows: int, loss: torch.Tensor, batch_loss: torch.Tensor) -> StepOutput:
        """Count the batch (a stand-in row counts nothing); under DDP, scale the loss by the shard's share
        (DDP averages the ranks' gradients: the share makes that a row-weighted mean)."""
        if not shard.is_placeholder:
            self.epoch.loss_sum += batch_loss.double() * n_rows
            self.epoch.n_seen += n_rows
        if distributed.is_distributed():
            loss = loss * shard.share
        return StepOutput(loss, batch_loss)


class PlainStep:
    """Cross-entropy on the rows ``_items`` gives the method: ``plain`` the training rows, ``meta-only`` the meta
    set, ``plain-meta`` both (a batch may mix them)."""

    def __init__(self, run: _Run, optimizer: torch.optim.Optimizer) -> None:
        self.run = run

    def __call__(self, shard: Shard, index: int) -> StepOutput:
        _, labels, logits = self.run.forward_rows(shard)
        loss = per_sample_loss(logits, labels).mean()
        return self.run.finish(shard, len(labels), loss, loss.detach())


class MetaStep:
    """``mlrnet`` / ``mwnet``: Algorithm 1's bi-level step (:func:`mlrnet_cli.meta.meta_step`) on the training
    rows, the meta batch drawn from the meta set; the row weights v_i are summed for the epoch statistics.
    With ``--meta-share S`` the meta batch also enters the real step; the epoch's train loss stays the mean
    cross-entropy of the training rows (comparable across S) and the weights are those of the training rows."""

    curves = True  #: the training batch carries the curves I_i (MLRNet's meta-net reads them)

    def __init__(self, run: _Run, optimizer: torch.optim.Optimizer) -> None:
        cfg = run.config
        self.run = run
        self.optimizer = self.meta_optimizer(run)
        self.names = resolve_meta_params(run.model, cfg.meta_params, run.batches.head_prefix)
        self.mbs = min(cfg.meta_batch_size or cfg.batch_size, len(run.inp.meta_pos))
        # each rank takes its own mbs rows of the same seeded meta permutation (rank 0: the first mbs)
        self.meta_slot = torch.arange(self.mbs) + distributed.rank() * self.mbs

    @staticmethod
    def meta_optimizer(run: _Run) -> torch.optim.Optimizer:
        return torch.optim.Adam(run.meta_net.parameters(), lr=run.config.meta_lr, weight_decay=1e-4)

    def batches(self, shard: Shard) -> tuple[torch.Tensor, StepBatch, StepBatch]:
        """(positions, the training batch, this step's meta batch: one draw of the epoch's meta generator)."""
        run = self.run
        pos_t = torch.tensor([p for _, p in run.chunk(shard)], dtype=torch.long)
        cv = to_device(run.inp.curves[pos_t], run.device) if self.curves and run.inp.curves is not None else None
        labels = to_device(run.labels["train"][pos_t], run.device)
        batch = StepBatch(run.batches.inputs_of("train", pos_t.numpy()), labels, cv)
        meta_pos = run.inp.meta_pos
        mperm = torch.randperm(len(meta_pos), generator=run.epoch.meta_gen)
        mpos = meta_pos[mperm[self.meta_slot % len(meta_pos)].numpy()]
        mb = StepBatch(run.batches.inputs_of("clean", mpos), to_device(run.labels["clean"][mpos], run.device))
        return pos_t, batch, mb

    def step_options(self, shard: Shard, index: int) -> dict[str, Any]:
        """What meta_step and mlc_step take alike from the run's settings."""
        run, cfg = self.run, self.run.config
        reduce_meta = (
            partial(distributed.all_reduce_mean_, weight=shard.share) if distributed.is_distributed() else None
        )
        return {
            "alpha": cfg.virtual_lr,
            "meta_params": self.names,
            "fns": run.batches.fns,
            "update_meta": index % cfg.meta_interval == 0,
            "mode": cfg.meta_mode,
            "meta_dropout": cfg.meta_dropout,
            "real_forward": run.real_forward,
            "clean_share": cfg.meta_share,  # --meta-share: the same meta rows also enter the real step
            "clean_share_at": cfg.meta_share_at,
            "reduce_meta_grads": reduce_meta,
            # ∂L_meta/∂θ is O(α) (eq. 5 through eq. 4). At a fine-tuning α (1e-5) it falls below Adam's eps and
            # under its coupled weight decay, which then shrinks θ to a constant weight. Divided by α, Adam sees
            # the α-free first-order term -Σ_i (∇L_i·∇L_meta) ∂c_i/∂θ.
            "meta_grad_scale": 1.0 / cfg.virtual_lr,
        }

    def record(self, shard: Shard, pos_t: torch.Tensor, values: torch.Tensor, meta_loss: torch.Tensor | None) -> None:
        """Sum each row's value (its weight) for the epoch statistics; keep the meta loss."""
        run = self.run
        if not shard.is_placeholder:
            pos_d = to_device(pos_t, run.device)
            run.epoch.w_sum.index_add_(0, pos_d, values.double())
            run.epoch.w_cnt.index_add_(0, pos_d, torch.ones_like(run.epoch.w_sum[pos_d]))
            if meta_loss is not None:
                run.epoch.meta_losses.append(meta_loss)

    def step(self, batch: StepBatch, mb: StepBatch, options: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        """Run the method's step; (its result, each row's value for the epoch statistics: its weight v_i)."""
        run = self.run
        options["normalize_weights"] = run.config.normalize_weights
        res = meta_step(run.model, run.meta_net, self.optimizer, batch, mb, **options)
        return res, res.weights

    def __call__(self, shard: Shard, index: int) -> StepOutput:
        pos_t, batch, mb = self.batches(shard)
        res, values = self.step(batch, mb, {"clean_batch": mb, **self.step_options(shard, index)})
        self.record(shard, pos_t, values, res.meta_loss)
        return self.run.finish(shard, len(pos_t), res.loss, res.losses.mean())


class MlcStep(MetaStep):
    """``mlc``: Meta Label Correction (:func:`mlrnet_cli.meta.mlc_step`) on the training rows, the meta batch
    drawn from the meta set as for :class:`MetaStep`; the LCN's probability of each row's observed label,
    ŷ_i(ỹ_i), is summed for the epoch statistics (the history's ``weight_*`` columns)."""

    curves = False

    @staticmethod
    def meta_optimizer(run: _Run) -> torch.optim.Optimizer:
        # microsoft/MLC's meta optimiser: Adam with AMSGrad and no weight decay
        return torch.optim.Adam(run.meta_net.parameters(), lr=run.config.meta_lr, weight_decay=0.0, amsgrad=True)

    def step(self, batch: StepBatch, mb: StepBatch, options: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        res = mlc_step(self.run.model, self.run.meta_net, self.optimizer, batch, mb, **options)
        return res, res.soft_labels.gather(1, batch.labels[:, None]).squeeze(1)


class GLCStep:
    """``glc``: Gold Loss Correction (Hendrycks et al., NeurIPS 2018). Ĉ[i, j] ≈ p(observed j | true i) is the
    stage-1 classifier's mean softmax over the meta rows of true class i (:func:`glc_corruption_matrix`),
    estimated once; then a batch of training and meta rows (``_items``, as ``plain-meta``) trains on the
    forward-corrected loss -log((softmax(f(x)) @ Ĉ)[ỹ]) for training rows and cross-entropy for the meta
    (trusted) rows, averaged over the batch's rows."""

    def __init__(self, run: _Run, optimizer: torch.optim.Optimizer) -> None:
        self.run, inp = run, run.inp
        self.trusted_counts = np.bincount(inp.clean.labels[inp.meta_pos], minlength=inp.manifest.num_classes)
        # rank 0 estimates and sends: every rank corrects with the very same Ĉ
        matrix = _glc_matrix(run) if distributed.is_main() else None
        self.set_matrix(distributed.broadcast_object(matrix))

    def set_matrix(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix.to(torch.float64).cpu()  # the estimate as saved and recorded
        self.corruption = to_device(self.matrix.float(), self.run.device)
        names = self.run.inp.manifest.class_names
        rows = "; ".join(
            f"{n}: " + " ".join(f"{v:.3f}" for v in r) for n, r in zip(names, self.matrix.tolist(), strict=True)
        )
        log.info("glc: corruption matrix C^ (row: true class, columns: observed labels %s): %s", names, rows)
        for c in np.flatnonzero(self.trusted_counts == 0):
            log.warning("glc: class %r has no trusted (meta) rows: its row of C^ is the identity row", names[c])

    def __call__(self, shard: Shard, index: int) -> StepOutput:
        pos, labels, logits = self.run.forward_rows(shard)
        trusted = to_device(torch.cat([torch.full((len(p),), s == "clean") for s, p in pos.items()]), self.run.device)
        corrected = forward_corrected_loss(logits, labels, self.corruption)
        loss = torch.where(trusted, per_sample_loss(logits, labels), corrected).mean()
        return self.run.finish(shard, len(labels), loss, loss.detach())

    def extra_state(self) -> dict[str, Any]:
        return {"glc_matrix": self.matrix}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.set_matrix(state["glc_matrix"])  # the run's own estimate, whatever device it resumes on

    def model_files(self, model_meta: dict[str, Any]) -> dict[str, Any]:
        """``glc.json`` in each model folder: Ĉ with what it was estimated from."""
        names = self.run.inp.manifest.class_names
        record = {
            artifacts.META_KEY: {**model_meta, "kind": "glc"},
            "corruption_matrix": self.matrix.tolist(),
            "class_names": names,
            "trusted_rows_per_class": self.trusted_counts.tolist(),
            "identity_rows": [names[c] for c in np.flatnonzero(self.trusted_counts == 0)],
            "estimated_with": "stage1",
        }
        return {"glc.json": stageio.json_file(record)}


def _glc_matrix(run: _Run) -> torch.Tensor:
    """Ĉ from the stage-1 classifier (trained by collect-losses on the biased rows): its full forward over the
    meta rows' token ids, in eval mode without gradients (whatever --freeze-encoder says: its encoder need not
    be the one whose features train caches)."""
    from mlrnet_cli import inference

    cfg, inp = run.config, run.inp
    assert inp.stage1 is not None
    model = _classifier(cfg, stage1_model_path(inp.stage1), inp.manifest).to(run.device).eval()
    token_ids = run.batches.tokens["clean"].rows(inp.meta_pos)
    out = inference.run_classifier(
        model, token_ids, pad_id=run.batches.pad_id, batch_size=cfg.batch_size * 2, progress=NullProgress()
    )
    probs = torch.from_numpy(out.probabilities)
    return glc_corruption_matrix(probs, torch.from_numpy(inp.clean.labels[inp.meta_pos]), inp.manifest.num_classes)


#: the step of each --method (a new method: one step class, one line here, its tests)
STEPS: dict[str, type] = {
    "mlrnet": MetaStep,
    "mwnet": MetaStep,
    "mlc": MlcStep,
    "plain": PlainStep,
    "plain-meta": PlainStep,
    "meta-only": PlainStep,
    "glc": GLCStep,
}


def _items(config: TrainConfig, inp: _Inputs) -> list[tuple[str, int]]:
    """What each method trains on: rows of the training table and/or of the meta set."""
    train = [("train", int(p)) for p in range(len(inp.train))]
    meta = [("clean", int(p)) for p in inp.meta_pos]
    return {"plain-meta": train + meta, "glc": train + meta, "meta-only": meta}.get(config.method, train)


# ---------------------------------------------------------------------------------------------
# the epoch hooks


@dataclass(frozen=True)
class _Collapse:
    """An epoch's :func:`real_collapse`: the class predicted for most dev rows, its share of the predictions and of
    the labels, whether the meta-net's spread weights drove it, and their std (None without a meta-net)."""

    label: str
    share: float
    true_share: float
    blame_meta: bool
    weight_std: float | None = None

    def __str__(self) -> str:
        return (
            f"the classifier predicts {self.label!r} for {100 * self.share:.0f}% of the dev rows "
            f"({100 * self.true_share:.0f}% of their labels)"
        )


class _Hooks:
    """Stage 2's side of :class:`~mlrnet_cli.engine.Loop`: the epoch's order, dev accuracy and statistics, the
    warnings, and model/{last,best,history.arrow}."""

    def __init__(self, run: _Run, step: Any, out: Path, meta: dict[str, Any]) -> None:
        self.run, self.step, self.out, self.meta = run, step, out, meta
        self.best_acc, self.best_epoch, self.better = -1.0, 0, False
        self.collapse: _Collapse | None = None  # the last epoch's, if any
        self._rerun_meta_lr = 0.0  # the meta lr of a rolled-back epoch's rerun
        curves, beta = run.inp.curves, run.config.curve_prior
        self.prior_spread = curve_prior_spread(curves, beta) if curves is not None and run.meta_net is not None else 0.0

    def epoch_shards(self, epoch: int) -> tuple[list[Shard], str, int]:
        cfg, e = self.run.config, epoch - 1
        # dropout masks: same per epoch on resume, one stream per rank (rank 0's is the single-process one)
        torch.manual_seed(seeding.train_dropout_seed(cfg.seed, e, distributed.rank()))
        order = torch.randperm(len(self.run.items), generator=seeding.train_epoch_generator(cfg.seed, e, "train-order"))
        shards = distributed.shard_batches(order, cfg.batch_size)
        self.run.new_epoch(seeding.train_epoch_generator(cfg.seed, e, "meta-batches"))
        return shards, f"epoch {epoch}/{cfg.epochs}", len(self.run.items)

    def end_epoch(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        run, cfg, ep = self.run, self.run.config, self.run.epoch
        if distributed.is_distributed():
            ep.loss_sum = distributed.all_reduce_sum(ep.loss_sum)
            ep.n_seen = int(engine.sum_over_ranks([ep.n_seen])[0])
            ep.w_sum, ep.w_cnt = distributed.all_reduce_sum(ep.w_sum), distributed.all_reduce_sum(ep.w_cnt)
        dev_acc, dev_predicted = _accuracy(run, cfg.batch_size * 2)
        loss = float(ep.loss_sum) / max(ep.n_seen, 1)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": loss, "dev_accuracy": dev_acc}
        if run.meta_net is not None:
            row.update(_weight_stats(ep, run.inp.train.is_noisy, epoch), meta_lr=self.meta_lr)
        row["seconds"] = time.perf_counter() - ep.t0
        self.better = dev_acc is None or dev_acc > self.best_acc
        if self.better:
            self.best_acc, self.best_epoch = (dev_acc if dev_acc is not None else -1.0), epoch
        acc = "n/a" if dev_acc is None else f"{dev_acc:.4f}" + " (best)" * self.better
        log.info("epoch %d/%d: train loss %.4f, dev accuracy %s (%.0fs)", epoch, cfg.epochs, loss, acc, row["seconds"])
        self.collapse = self._collapse(row, dev_predicted, [r["dev_accuracy"] for r in history])
        if self.collapse is not None and not self._guard_acts():
            self._warn(epoch, self.collapse)
        return row

    @property
    def meta_lr(self) -> float:
        """The meta-net's learning rate now: --meta-lr, divided by 10 at each back-off."""
        return float(self.step.optimizer.param_groups[0]["lr"])

    @property
    def backoffs(self) -> int:
        """Collapse-guard back-offs so far: each divides the meta lr by 10 (so it is read off the lr, which the
        meta-net's optimiser state keeps across a resume)."""
        return round(math.log10(self.run.config.meta_lr / self.meta_lr)) if self.run.meta_net is not None else 0

    def _collapse(
        self, row: dict[str, Any], dev_predicted: np.ndarray | None, earlier: list[float | None]
    ) -> _Collapse | None:
        run = self.run
        if dev_predicted is None or row["dev_accuracy"] is None:
            return None
        best_earlier = max((a for a in earlier if a is not None), default=None)
        found = real_collapse(
            dev_predicted, run.inp.dev_labels, row["dev_accuracy"], best_earlier, run.inp.train.labels
        )
        if found is None:
            return None
        # weights that did not go to the ends cannot be a too-fast meta-net's doing; the curve prior spreads them
        # before the meta-net learned anything, so only the spread beyond the prior's own counts
        std = row.get("weight_std") if run.meta_net is not None else None
        blame_meta = std is not None and std >= SPREAD_WEIGHT_STD + self.prior_spread
        return _Collapse(run.inp.manifest.class_names[found[0]], found[1], found[2], blame_meta, std)

    def _warn(self, epoch: int, c: _Collapse) -> None:
        advice = f"try a smaller --lr than {self.run.config.lr:g}"
        if c.blame_meta:
            advice = f"the meta-net may be learning too fast: try --meta-lr {self.meta_lr / 10:g}"
        elif c.weight_std is not None:  # flat weights (mlc's near-uniform soft labels): too slow, or the classifier
            advice = (
                f"the meta-net's weights barely spread (std {c.weight_std:.2f}), so the meta-net did not drive it: "
                f"{advice}, or a larger --meta-lr than {self.meta_lr:g} if the meta-net learns too slowly"
            )
        log.warning("epoch %d: %s; %s", epoch, c, advice)

    def _guard_acts(self) -> bool:
        c = self.collapse
        return c is not None and c.blame_meta and self.backoffs < self.run.config.meta_backoff

    def rollback(self, epoch: int, row: dict[str, Any]) -> bool:
        """The collapse guard: an epoch that ended in a collapse the meta-net drove is run again from where it
        began, with a ten times smaller meta lr (at most --meta-backoff times in a run)."""
        if not self._guard_acts():
            return False
        lr = self.meta_lr / 10
        log.warning(
            f"epoch {epoch}: {self.collapse} and the weights went to the ends (std {row['weight_std']:.2f}): the "
            f"meta-net learned too fast; rerunning epoch {epoch} with meta lr {lr:g} (back-off {self.backoffs + 1} "
            f"of {self.run.config.meta_backoff}, --meta-backoff)"
        )
        self._rerun_meta_lr = lr
        return True

    def rolled_back(self) -> None:
        for group in self.step.optimizer.param_groups:  # the restored state holds the epoch's old meta lr
            group["lr"] = self._rerun_meta_lr

    def save(self, epoch: int, history: list[dict[str, Any]]) -> None:
        self._save_model_dir(self.out / "last", epoch)
        if self.better:
            self._save_model_dir(self.out / "best", epoch)
        artifacts.write_table(self.out / "history.arrow", _history_table(history), {**self.meta, "kind": "history"})

    def _save_model_dir(self, target: Path, epoch: int) -> None:
        """save_pretrained + meta_net.safetensors + train_config.json + mlrnet.json, swapped in whole."""
        run, model_meta = self.run, {**self.meta, "epoch": epoch}
        extra = {
            "class_names": run.inp.manifest.class_names,
            "meta_sample_ids": run.inp.clean.sample_ids[run.inp.meta_pos].tolist(),
            "encoder_cache_id": run.batches.encoder_id,
            "epoch": epoch,
        }
        if run.config.meta_lr_probe:  # the config below holds --meta-lr; the run trained with the probe's choice
            extra["meta_lr_chosen"] = run.config.meta_lr
        files = {}
        if (net := run.meta_net) is not None:
            files["meta_net.safetensors"] = lambda p: artifacts.write_tensors(
                p, net.state_dict(), {**model_meta, "meta_net": net.spec()}
            )
        files.update(getattr(self.step, "model_files", lambda _meta: {})(model_meta))  # a method's own record
        files["train_config.json"] = stageio.json_file({**extra, "config": model_meta["config"]})
        files["mlrnet.json"] = stageio.json_file({artifacts.META_KEY: model_meta})
        frozen = None
        if run.config.freeze_encoder:  # the frozen encoder is stored once, hard-linked across the folders
            frozen = (run.batches.head_prefix, [self.out / "best", self.out / "last", run.inp.stage1])
        stageio.write_model_folder(target, run.model, run.batches.tokenizer, files, frozen=frozen)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"best_acc": self.best_acc, "best_epoch": self.best_epoch}
        if self.run.meta_net is not None:
            state.update(meta_net=self.run.meta_net.state_dict(), meta_opt=self.step.optimizer.state_dict())
        state.update(getattr(self.step, "extra_state", dict)())  # a step's own state (glc: its Ĉ)
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        self.best_acc, self.best_epoch = float(state["best_acc"]), int(state["best_epoch"])
        if self.run.meta_net is not None:
            self.run.meta_net.load_state_dict(state["meta_net"])
            self.step.optimizer.load_state_dict(state["meta_opt"])
        if hasattr(self.step, "load_extra_state"):
            self.step.load_extra_state(state)


def _weight_stats(ep: _Epoch, noisy: np.ndarray | None, epoch: int) -> dict[str, Any]:
    """The epoch's mean weight v_i per row, summarised (and by noisy/clean rows when the truth is known)."""
    w_sum, w_cnt = ep.w_sum.cpu().numpy(), ep.w_cnt.cpu().numpy()
    seen = w_cnt > 0
    w = w_sum[seen] / w_cnt[seen]
    if distributed.is_distributed():
        ml = torch.stack(ep.meta_losses).double().sum().item() if ep.meta_losses else 0.0
        total, count = engine.sum_over_ranks([ml, float(len(ep.meta_losses))])
        meta_loss = total / count if count else None
    else:
        meta_loss = float(np.mean(torch.stack(ep.meta_losses).double().cpu().numpy())) if ep.meta_losses else None
    row: dict[str, Any] = {"weight_mean": float(w.mean()), "weight_std": float(w.std()), "meta_loss": meta_loss}
    line = f"epoch {epoch}: weight mean {row['weight_mean']:.4f} std {row['weight_std']:.4f}"
    if noisy is not None:  # the truth is known (a corrupted set, not a set with real noise)
        nz = noisy[seen]
        for group, rows in (("noisy", nz), ("clean", ~nz)):
            mean = float(w[rows].mean()) if rows.any() else math.nan
            row[f"weight_mean_{group}"] = None if math.isnan(mean) else mean
        means = [row[f"weight_mean_{g}"] for g in ("noisy", "clean")]
        line += " (noisy rows {}, clean rows {})".format(*("-" if m is None else f"{m:.4f}" for m in means))
    log.info("%s", line)
    if row["weight_std"] < 1e-4:
        log.warning(
            f"epoch {epoch}: the meta-net gives every row the same weight (std {row['weight_std']:.2g}): it learned "
            "nothing; try a larger --meta-lr"
        )
    return row


def _history_table(rows: list[dict[str, Any]]) -> Any:
    """history.arrow: one row per epoch, the same columns for every method (a method's missing ones are null)."""
    import pyarrow as pa

    floats = ("train_loss", "dev_accuracy", "weight_mean", "weight_std", "weight_mean_noisy", "weight_mean_clean")
    cols = {"epoch": pa.int64(), **dict.fromkeys((*floats, "meta_loss", "meta_lr", "seconds"), pa.float64())}
    return pa.table({n: pa.array([r.get(n) for r in rows], t) for n, t in cols.items()})


# ---------------------------------------------------------------------------------------------
# the stage


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
    config.validate()
    ws = Workspace.at(workdir)
    out = Path(out_dir or ws.model)
    artifacts.check_writable(out)  # now, not after the first epoch
    paths = {
        "train": Path(train_path or ws.train),
        "clean": Path(clean_path or ws.clean),
        "losses": Path(losses_path or ws.losses),
        "manifest": Path(manifest_path or ws.manifest),
        "dev": Path(dev_path) if dev_path is not None else None,
        "stage1": ws.stage1,
    }
    if config.meta_share == AUTO:
        args = dict(workdir=workdir, train_path=train_path, clean_path=clean_path, losses_path=losses_path)
        args.update(manifest_path=manifest_path, dev_path=dev_path, overwrite=overwrite, progress=progress)
        return _train_auto_share(config, paths, out, args)
    # one writer per model folder (under torchrun, rank 0 writes for all): a second run fails now, not mid-epoch
    with locks.exclusive(out, "train") if distributed.is_main() else contextlib.nullcontext():
        config, inp = _read_inputs(config, paths)
        meta = artifacts.make_meta(
            "train", "model", config=config.provenance_config(), seed=config.seed, inputs=inp.fingerprints
        )
        inputs = [paths["train"], paths["clean"]]
        artifacts.guard_output(out / "history.arrow", {**meta, "kind": "history"}, inputs=inputs, overwrite=overwrite)
        if distributed.is_main():  # under torchrun only rank 0 changes files (the others wait at the barrier below)
            artifacts.clean_stale_temps(out)  # what a killed run left half-written (never read as artifacts)
            clean_cache(ws.cache)
        checkpoint = Checkpoint(out / "state", meta)
        state = checkpoint.load(overwrite)
        if state is None and not overwrite:  # a finished run drops its resume state: its outputs say it is done
            done = _finished_history(out, meta, config.epochs)
            if done is not None:
                log.info("train: %s is up to date (same inputs and config)", out)
                return replace(_result(config, inp, out, done, config.epochs), meta_lr_probe=_saved_probe(out, meta))
        model, tokenizer, device, init_path = _load_model(config, ws, inp.manifest)
        # only once the model loaded: a bad --model with --overwrite must leave the old state alone
        distributed.barrier()  # every rank has read the old state before rank 0 removes it
        if overwrite and state is None and distributed.is_main():
            shutil.rmtree(checkpoint.folder, ignore_errors=True)
        distributed.barrier()
        batches = _Batches(config, ws, inp, model, tokenizer, device, init_path, progress)
        run = _Run(inp, batches, model, _meta_net(config, inp, model, batches))
        probe = None
        if config.meta_lr_probe:  # the run goes on with the chosen meta lr; its provenance keeps the option
            probe = _chosen_meta_lr(run, out, checkpoint, progress, reuse=state is not None or not overwrite)
            run.config = replace(run.config, meta_lr=probe["chosen"])
        result = _fit(run, checkpoint, state, out, progress)
        return replace(result, meta_lr_probe=probe)


def _fit(
    run: _Run, checkpoint: Checkpoint, state: dict[str, Any] | None, out: Path, progress: Progress | None
) -> TrainResult:
    """Build the method's step and run the engine's loop; every rank returns once rank 0 wrote everything."""
    config, meta_net = run.config, run.meta_net
    opt, sched, steps_per_epoch = _optimizer(run)
    if config.compile and meta_net is not None:
        log.warning(
            "--compile: the %s meta step differentiates twice (or in forward mode) through functional_call, "
            "which torch.compile does not support; it runs eagerly",
            config.method,
        )
    step = STEPS[config.method](run, opt)
    hooks = _Hooks(run, step, out, checkpoint.meta)
    bar = get_progress(progress) if distributed.is_main() else NullProgress()
    loop = Loop(run.model, opt, sched, run.device, config.epochs, checkpoint, bar)
    loop.rollback = meta_net is not None and config.meta_backoff > 0
    start = 0
    if state is not None:
        start = loop.resume(state, hooks)
        log.info("resuming from epoch %d/%d", start, config.epochs)
    loop.run(hooks, step, start, start * steps_per_epoch)
    if distributed.is_main():  # finished: the resume state (a full model and optimiser) is no longer needed
        shutil.rmtree(checkpoint.folder, ignore_errors=True)
    distributed.barrier()  # the others return once rank 0 has written everything
    best_acc = hooks.best_acc if hooks.best_acc >= 0 else None
    return _result(config, run.inp, out, (hooks.best_epoch, best_acc, loop.history), start)


def _optimizer(run: _Run) -> tuple[torch.optim.Optimizer, Any, int]:
    """The classifier's AdamW and its warm-up/decay schedule over the run, and the global steps per epoch."""
    from transformers import get_linear_schedule_with_warmup

    config = run.config
    # global steps: batches of batch_size rows per rank (batch_size x world in all)
    steps_per_epoch = distributed.num_steps(len(run.items), config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    opt = torch.optim.AdamW(
        [p for p in run.model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    sched = get_linear_schedule_with_warmup(opt, int(round(config.warmup_ratio * total_steps)), total_steps)
    return opt, sched, steps_per_epoch


# ---------------------------------------------------------------------------------------------
# --meta-share auto


def _train_auto_share(
    config: TrainConfig, paths: dict[str, Path | None], out: Path, args: dict[str, Any]
) -> TrainResult:
    """``--meta-share auto``: one run per share of ``AUTO_META_SHARES`` under ``out/candidates`` (each resumable and
    the same run as one asked for by its share), and the one the dev rows prefer copied to ``out``."""
    with locks.exclusive(out, "train") if distributed.is_main() else contextlib.nullcontext():
        _, inp = _read_inputs(config, paths)  # refuses a choice without dev rows
        meta = artifacts.make_meta(
            "train", "meta-share-choice", config=config.provenance_config(), seed=config.seed, inputs=inp.fingerprints
        )
        if not args["overwrite"] and (out / "history.arrow").exists() and _saved_share_choice(out, meta) is None:
            raise ArtifactExistsError(
                f"{out} holds a run other than this --meta-share auto one",
                "pass --overwrite to replace it, or choose another --workdir",
            )
        runs = {}
        for share in AUTO_META_SHARES:
            log.info("--meta-share auto: training with meta share %g", share)
            folder = out / CANDIDATES / f"share-{share:g}"
            runs[share] = train(config.with_meta_share(share), out_dir=folder, **args)
        record = choose_meta_share({share: run.best_dev_accuracy for share, run in runs.items()})
        for share, run in runs.items():
            record["candidates"][f"{share:g}"]["folder"] = str(run.best_dir.parent)
        chosen = runs[record["chosen"]]
        if distributed.is_main():
            artifacts.clean_stale_temps(out)
            # the choice first: a kill while the outputs are copied leaves a run that finds its choice and copies again
            artifacts.write_json(out / SHARE_CHOICE_FILE, {"choice": record, artifacts.META_KEY: meta})
            _adopt(chosen, out)
        distributed.barrier()
        log.info("--meta-share auto: chose meta share %g (dev rows only)", record["chosen"])
        paths_in_out = {"best_dir": out / "best", "last_dir": out / "last", "history_path": out / "history.arrow"}
        return replace(chosen, **paths_in_out, meta_share_choice=record)


def choose_meta_share(dev_accuracy: dict[float, float | None]) -> dict[str, Any]:
    """The share whose run has the best dev accuracy; ties go to the default share, then to the smaller."""
    best = max(dev_accuracy, key=lambda s: (dev_accuracy[s] or 0.0, s == DEFAULT_META_SHARE, -s))
    candidates = {f"{s:g}": {"meta_share": s, "dev_accuracy": acc} for s, acc in dev_accuracy.items()}
    return {"chosen": best, "candidates": candidates}


def _adopt(run: TrainResult, out: Path) -> None:
    """A finished run's ``best``, ``last`` and ``history.arrow``, hard-linked into ``out`` (each swapped in whole)."""
    for src in (run.best_dir, run.last_dir):
        tmp = out / f"{artifacts.TMP_PREFIX}{src.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
        stageio.swap_folder(tmp, out / src.name)
    with artifacts.atomic_path(out / "history.arrow") as tmp:
        shutil.copyfile(run.history_path, tmp)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (the candidate's files are replaced, never written in place), a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _saved_share_choice(out: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The choice this very run (same inputs and config) wrote to ``out``, if any."""
    return _saved_record(out / SHARE_CHOICE_FILE, meta, "choice", "meta share choice")


def _saved_record(path: Path, meta: dict[str, Any], key: str, what: str) -> dict[str, Any] | None:
    """``key`` of the JSON record at ``path`` when the run of ``meta`` wrote it, else None."""
    if not path.is_file():
        return None
    saved = artifacts.read_json(path, what)
    same = artifacts.provenance(saved.get(artifacts.META_KEY) or {}) == artifacts.provenance(meta)
    return saved.get(key) if same else None


# ---------------------------------------------------------------------------------------------
# --meta-lr-probe


def probe_meta_lr(run: _Run, checkpoint: Checkpoint, progress: Progress | None = None) -> dict[str, Any]:
    """``--meta-lr-probe N``: each meta lr of --meta-lr × PROBE_FACTORS trains the first N steps of epoch 1 from
    the run's start; the best dev accuracy among those that end without a collapse chooses (ties: --meta-lr, then
    the smaller). The dev rows alone decide; the run then starts again from the same state."""
    config = run.config
    start = _snapshot(run)
    scores: dict[str, dict[str, Any]] = {}
    for factor in PROBE_FACTORS:
        lr = float(f"{config.meta_lr * factor:.6g}")  # 1e-05, not 1.0000000000000002e-05
        acc, collapsed = _probe_one(run, lr, checkpoint, progress)
        scores[f"{lr:g}"] = {"meta_lr": lr, "dev_accuracy": acc, "collapsed": collapsed}
        _restore(run, start)
        log.info(
            "--meta-lr-probe: meta lr %g, %d steps: dev accuracy %s%s",
            lr, config.meta_lr_probe, "n/a" if acc is None else f"{acc:.4f}", " (collapsed)" * collapsed,
        )  # fmt: skip
    kept = [s for s in scores.values() if not s["collapsed"]] or list(scores.values())
    best = max(kept, key=lambda s: (s["dev_accuracy"] or 0.0, s["meta_lr"] == config.meta_lr, -s["meta_lr"]))
    if all(s["collapsed"] for s in scores.values()):
        log.warning("--meta-lr-probe: every candidate collapsed; keeping the best dev accuracy among them")
    log.info("--meta-lr-probe: chose meta lr %g (dev rows only)", best["meta_lr"])
    return {"steps": config.meta_lr_probe, "chosen": best["meta_lr"], "candidates": scores}


def _probe_one(run: _Run, lr: float, checkpoint: Checkpoint, progress: Progress | None) -> tuple[float | None, bool]:
    """One candidate's probe: (dev accuracy after its steps, whether that is a collapse)."""
    opt, sched, _ = _optimizer(run)
    step = STEPS[run.config.method](run, opt)
    for group in step.optimizer.param_groups:
        group["lr"] = lr
    bar = get_progress(progress) if distributed.is_main() else NullProgress()
    loop = Loop(run.model, opt, sched, run.device, run.config.epochs, checkpoint, bar)
    steps = run.config.meta_lr_probe
    hooks = _Hooks(run, step, checkpoint.folder, checkpoint.meta)  # only its epoch_shards: the probe saves nothing
    loop.probe(hooks, step, steps, f"probe: meta lr {lr:g}")
    acc, predicted = _accuracy(run, run.config.batch_size * 2)
    if acc is None or predicted is None:
        return acc, False
    found = real_collapse(predicted, run.inp.dev_labels, acc, None, run.inp.train.labels)
    return acc, found is not None


def _snapshot(run: _Run) -> dict[str, Any]:
    """The model's and meta-net's parameters and the random state a run starts from (copies)."""
    clone = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
    cuda = run.device.type == "cuda"
    return {
        "model": clone(run.model),
        "meta_net": clone(run.meta_net),
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(run.device) if cuda else None,
    }


def _restore(run: _Run, start: dict[str, Any]) -> None:
    run.model.load_state_dict(start["model"])
    run.meta_net.load_state_dict(start["meta_net"])
    torch.set_rng_state(start["cpu_rng"])
    if start["cuda_rng"] is not None:
        torch.cuda.set_rng_state(start["cuda_rng"], run.device)


def _chosen_meta_lr(
    run: _Run, out: Path, checkpoint: Checkpoint, progress: Progress | None, *, reuse: bool
) -> dict[str, Any]:
    """This run's probe record: with ``reuse``, read back from ``out/meta_lr_probe.json`` when this run wrote it
    (a resumed run does not probe again), else probed now and written there."""
    saved = _saved_probe(out, checkpoint.meta) if reuse else None
    if saved is not None:
        return saved
    record = probe_meta_lr(run, checkpoint, progress)
    if distributed.is_main():
        artifacts.write_json(out / PROBE_FILE, {"probe": record, artifacts.META_KEY: _probe_meta(checkpoint.meta)})
    distributed.barrier()
    return record


def _saved_probe(out: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The probe record this very run (same inputs and config) wrote to ``out``, if any."""
    return _saved_record(out / PROBE_FILE, _probe_meta(meta), "probe", "meta lr probe")


def _probe_meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "kind": "meta-lr-probe"}


def _result(config: TrainConfig, inp: _Inputs, out: Path, best: _Best, resumed_from: int) -> TrainResult:
    best_epoch, best_acc, history = best
    return TrainResult(
        best_dir=out / "best",
        last_dir=out / "last",
        history_path=out / "history.arrow",
        best_epoch=best_epoch,
        best_dev_accuracy=best_acc,
        epochs_run=config.epochs - resumed_from,
        resumed_from=resumed_from,
        meta_size=len(inp.meta_pos),
        dev_size=len(inp.dev_pos),
        model=str(config.model),
        history=history,
    )


def _finished_history(out: Path, meta: dict[str, Any], epochs: int) -> _Best | None:
    """(best epoch, its dev accuracy, history) of a finished run of ``meta`` in ``out``, or None.

    Finished: history.arrow is this run's and has every epoch, and model/best and model/last are this run's
    (each epoch writes them before the history, so a kill never leaves this looking finished too early)."""
    try:
        table = artifacts.read_table(out / "history.arrow", "history")
        best, last = (
            artifacts.read_json(out / d / "mlrnet.json").get(artifacts.META_KEY) or {} for d in ("best", "last")
        )
    except (ArtifactError, AttributeError):
        return None
    same = artifacts.provenance(meta)
    if (
        artifacts.provenance(artifacts.table_meta(table) or {}) != artifacts.provenance({**meta, "kind": "history"})
        or any(artifacts.provenance(m) != same for m in (best, last))
        or table.num_rows != epochs
        or last.get("epoch") != epochs
    ):
        return None
    rows = table.to_pylist()
    best_epoch = int(best.get("epoch") or epochs)
    return best_epoch, rows[best_epoch - 1].get("dev_accuracy"), rows


def _accuracy(run: _Run, batch_size: int) -> tuple[float | None, np.ndarray | None]:
    """Accuracy on the dev rows and how often each class was predicted (eval mode, no dropout, no gradients);
    under torchrun each rank scores a part."""
    positions, labels = run.inp.dev_pos, np.asarray(run.inp.dev_labels)
    if len(positions) == 0:
        return None, None
    total, num_classes = len(positions), run.inp.manifest.num_classes
    if distributed.is_distributed():
        part = distributed.split_evenly(total).numpy()
        positions, labels = positions[part], labels[part]
    # summed on the device, read once: [correct, predictions of class 0, 1, ...]
    counts = torch.zeros(1 + num_classes, dtype=torch.int64, device=run.device)
    with eval_mode(run.model), torch.no_grad():
        for i in range(0, len(positions), batch_size):
            inputs = run.batches.inputs_of("dev", positions[i : i + batch_size])  # without --dev: the clean table
            _, logits = run.batches.forward(run.model, inputs)
            y = to_device(torch.from_numpy(labels[i : i + batch_size]), run.device)
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
    epoch's to that of always predicting the most frequent dev class, or below half of that constant guess's
    (a collapse already in the first epoch: CIC, seed 0, 0.5 % of the dev rows right), or one class for at least
    80 % of the dev rows that is not the most frequent class of ``train_labels``."""
    collapse = one_class_collapse(predicted, labels)
    if collapse is None:
        return None
    top, share = collapse[0], collapse[1]
    labels = np.asarray(labels)
    majority = float(np.bincount(labels).max()) / len(labels) if len(labels) else 0.0
    fell = best_earlier is not None and dev_accuracy <= (best_earlier + majority) / 2
    below_guess = dev_accuracy < majority / 2  # collapsed within the first epoch: no earlier epoch to fall from
    largest = int(np.argmax(np.bincount(np.asarray(train_labels)))) if train_labels is not None else None
    unexplained = share >= COLLAPSE_SHARE and top != largest
    return collapse if fell or below_guess or unexplained else None


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
