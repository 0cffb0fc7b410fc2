"""The settings of every command, declared once: frozen dataclasses with documented defaults, and the choices as
Enums. The CLI reads its defaults and choices from here and builds the configs from the parsed parameters
(:func:`build`), so this module imports neither torch, numpy nor a stage.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from typing import Any, TypeVar

from mlrnet_cli.errors import ConfigError, UsageError

C = TypeVar("C")


class Method(str, Enum):
    """`train --method`: the paper's method, MW-Net, MLC, Gold Loss Correction, and the three baselines."""

    mlrnet = "mlrnet"
    mwnet = "mwnet"
    mlc = "mlc"
    plain = "plain"
    plain_meta = "plain-meta"
    meta_only = "meta-only"
    glc = "glc"


META_METHODS = (Method.mlrnet.value, Method.mwnet.value, Method.mlc.value)
#: MLRNet's defaults for our two extensions (issue #17; the measurements: docs/results.md). MW-Net and MLC keep 0, the
#: form of their papers; ``--meta-share 0 --curve-prior 0`` is MLRNet as the paper has it
DEFAULT_META_SHARE = 0.5
DEFAULT_CURVE_PRIOR = 1.0
#: ``--meta-share auto``: train once per share and keep the run with the better dev accuracy (ties: the default)
AUTO = "auto"
#: its candidates: the paper's MLRNet (the paper's real step and, unless --curve-prior is given, its net) and ours
AUTO_META_SHARES = (0.0, DEFAULT_META_SHARE)
#: MLRNet's --meta-share with --freeze-encoder: a head-only run is cheap enough to train both forms, and one form
#: does not suit every frozen set (docs/results.md)
DEFAULT_META_SHARE_FROZEN = AUTO


class InitFrom(str, Enum):
    pretrained = "pretrained"
    stage1 = "stage1"


class MetaMode(str, Enum):
    """How the exact meta gradient is taken: forward mode (less memory) or an unrolled graph."""

    jvp = "jvp"
    unrolled = "unrolled"


class MetaShareAt(str, Enum):
    """Where ``--meta-share``'s clean term takes its gradient: a pass of the meta rows at w (exact), or the meta
    loss's gradient at ŵ that the meta step computed anyway (eq. 5; no second pass)."""

    w = "w"
    w_hat = "w-hat"


class DFInputs(str, Enum):
    """`train --df-inputs`: what MLRNet's discriminative feature DF_i (eq. 7) is built from: the classifier's
    feature h(x_i), the label embedding and the loss curve (the paper); the label embedding and the loss curve
    alone (an ablation the paper does not report); or all three with h(x_i) entering only as its agreement with the
    label embedding (our variant)."""

    all = "all"
    label_curve = "label-curve"
    agreement = "agreement"


class Record(str, Enum):
    """`collect-losses --record`: the training forward's losses, or an extra no-dropout pass."""

    train = "train"
    eval = "eval"


def _choice(enum: type[Enum], value: Any, flag: str, error: type[Exception] = UsageError) -> str:
    """A choice as its plain string (configs hold strings: their JSON and provenance stay as they were)."""
    try:
        return enum(value).value
    except ValueError:
        choices = ", ".join(e.value for e in enum)  # type: ignore[attr-defined]
        raise error(f"unknown {flag} {value!r}: choose one of {choices}") from None


def parse_meta_params(spec: str) -> tuple[str, int]:
    """Validate ``--meta-params``: ``all``, ``head`` or ``last-K`` (K ≥ 1) → (kind, K)."""
    if spec in ("all", "head"):
        return spec, 0
    m = re.match(r"last-(\d+)$", spec)
    if m and int(m.group(1)) >= 1:
        return "last", int(m.group(1))
    raise ConfigError(f"--meta-params {spec!r} is not one of all, head, last-K (K >= 1)")


def _at_least(config: Any, minimum: float, *names: str) -> None:
    for name in names:
        if getattr(config, name) < minimum:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {minimum:g}, got {getattr(config, name)}")


def _fraction(config: Any, *names: str) -> None:
    for name in names:
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(config, name)}")


def build(cls: type[C], params: dict[str, Any], **renamed: Any) -> C:
    """A config from a command's parsed parameters: every field of ``cls`` found in ``params`` (Enums as their
    values), plus ``renamed`` ones (a parameter whose name differs from its field)."""
    values = {f.name: params[f.name] for f in fields(cls) if f.name in params} | renamed
    return cls(**{k: v.value if isinstance(v, Enum) else v for k, v in values.items()})


# ---------------------------------------------------------------------------------------------
# corrupt

NOISE_KINDS = ("none", "uniform", "flip", "pair")
DEFAULT_META_POOL = 500
DEFAULT_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class NoiseSpec:
    """``none``, ``uniform:P``, ``flip:P`` or ``pair:P`` with P in [0, 1]."""

    kind: str = "none"
    p: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> NoiseSpec:
        s = spec.strip().lower()
        if s in ("none", "0", ""):
            return cls()
        m = re.fullmatch(r"([a-z]+):([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)", s)
        if not m:
            raise ConfigError(f"bad noise spec {spec!r}", "use none, uniform:P, flip:P or pair:P, e.g. uniform:0.4")
        kind, p = m.group(1), float(m.group(2))
        if kind not in NOISE_KINDS[1:]:
            raise ConfigError(f"unknown noise kind {kind!r} in {spec!r}", "use uniform, flip or pair")
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"noise probability {p} in {spec!r} is outside [0, 1]")
        return cls(kind, p)

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.p:g}"


@dataclass(frozen=True)
class CorruptConfig:
    """How `corrupt` biases the data. Defaults leave it untouched apart from setting the clean pool aside."""

    imbalance: float = 1.0  #: imbalance factor F ≥ 1: head rows / tail rows
    n_max: int | None = None  #: rows the head class keeps; None: the smallest class's available rows (exact profile)
    #: ``given`` (class 0 is the head), ``shuffle`` (seeded), or a comma list of class names/ids, head first
    class_order: str = "given"
    noise: NoiseSpec = NoiseSpec()
    #: clean rows per class set aside before corruption, for `train --meta-per-class` and model selection;
    #: None: 500 (``DEFAULT_META_POOL``), or the whole ``--clean-data`` table when one is given
    meta_pool_per_class: int | None = None
    seed: int = 0
    #: share of each class held out as the test split when the source has none; None: 0.2
    #: (``DEFAULT_TEST_FRACTION``); 0 holds out nothing (and writes no test.arrow)
    test_fraction: float | None = None

    def validate(self) -> None:
        if self.meta_pool_per_class is not None and self.meta_pool_per_class < 1:
            raise ConfigError(
                f"--meta-pool-per-class must be ≥ 1, got {self.meta_pool_per_class}",
                "every train method draws its dev rows from the clean pool, and the meta methods their meta set",
            )
        if self.test_fraction is not None and not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"--test-fraction must be in [0, 1), got {self.test_fraction:g}")
        if self.n_max is not None and self.n_max < 1:
            raise ConfigError("--n-max must be ≥ 1")
        if self.imbalance < 1 or not math.isfinite(self.imbalance):
            raise ConfigError(f"--imbalance must be ≥ 1 (max/min class ratio), got {self.imbalance:g}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["noise"] = str(self.noise)
        if d["test_fraction"] is None:  # unused (the source has a test split): artifacts stay as before it existed
            del d["test_fraction"]
        return d


@dataclass(frozen=True)
class InputSpec:
    """Where `corrupt` reads the data, and which columns hold text and labels."""

    data: str | None = None
    split: str = "train"
    test_data: str | None = None
    test_split: str = "test"
    clean_data: str | None = None
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    true_label_column: str | None = None


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
    record: str = Record.train.value  #: "train": losses of the training forward; "eval": an extra no-dropout pass
    freeze_encoder: bool = False  #: encode once, cache features, train only the head
    device: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    compile: bool = False  #: torch.compile the training forward (plain fine-tuning: no double backward here)

    #: don't change results (compile: up to float rounding): not in provenance
    RUNTIME_FIELDS = ("device", "allow_pickle", "trust_remote_code", "compile")

    def validate(self) -> None:
        object.__setattr__(self, "record", _choice(Record, self.record, "--record", ConfigError))
        _at_least(self, 1, "epochs", "batch_size")
        _at_least(self, 2, "max_length")
        _at_least(self, 0, "weight_decay")
        _fraction(self, "warmup_ratio")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")

    def provenance_config(self) -> dict[str, Any]:
        """The fields that determine the curves (device and loading permissions do not)."""
        return {k: v for k, v in asdict(self).items() if k not in self.RUNTIME_FIELDS}


@dataclass(frozen=True)
class TrainConfig:
    """Stage-2 hyperparameters (defaults: paper §4.4 for AG News where it gives one)."""

    method: str = Method.mlrnet.value  # mlrnet | mwnet | mlc | glc | plain | plain-meta | meta-only
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
    label_emb_dim: int = 128  # §4.3: label embedding (C, 128); also MLC's label embedding
    df_dim: int = 128  # §4.3: size of the discriminative feature DF_i; also MLC's hidden layers (its reference: 128)
    # our extension: the meta-net's logit starts at -β × mean stage-1 I_i. None = the method's default (1 for mlrnet,
    # chosen by measurement in docs/results.md; 0 otherwise); 0 = the paper's meta-net
    curve_prior: float | None = None
    # what DF_i (eq. 7) reads: all = h(x_i), Y_emb(y_i) and I_i (the paper); label-curve = Y_emb(y_i) and I_i, without
    # the classifier's feature (an ablation); agreement = h(x_i) only through <U h(x_i), Y_emb(y_i)> (our variant).
    # Provenance: only when not "all"
    df_inputs: str = DFInputs.all.value
    init_from: str = InitFrom.pretrained.value  # pretrained | stage1
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
    meta_mode: str = MetaMode.jvp.value  # jvp (forward-mode, less memory) | unrolled (create_graph); both exact
    # dropout in the meta batch's forward at ŵ (eq. 5). Off (eval mode): the meta loss is that of the classifier as
    # it is evaluated, without dropout noise, and the meta forward is cheaper. On: MW-Net's reference code.
    meta_dropout: bool = False
    # our extension (MLC's default): the real step (eq. 9) adds S × the mean CE of this step's meta batch to the
    # weighted loss. None = the method's default (0.5 for mlrnet, chosen by measurement in docs/results.md; 0 for
    # mwnet and mlc, their papers' form); 0 = the paper's exact form. Kept out of the provenance when 0 (earlier runs
    # stay the same run). "auto" trains the paper's form (S = 0 and, unless --curve-prior is given, B = 0) and
    # S = 0.5 (with the default B), and keeps the better run on the dev rows
    meta_share: float | str | None = None
    # where that term's gradient is taken: w (the meta rows run again in the real forward, +1 forward and backward of
    # the meta batch) or w-hat (the meta loss's gradient at ŵ, reused; needs --meta-params all). None = w-hat where it
    # applies (S > 0 and --meta-params all), else w. Provenance: only when not "w"
    meta_share_at: str | None = None
    # the collapse guard: when an epoch ends in a collapse the meta-net drove (one class for most dev rows, the
    # weights spread to the ends), rerun that epoch from where it began with the meta lr divided by 10, at most
    # this many times in a run (docs/train.md); 0 = off, the paper's loop
    meta_backoff: int = 2
    # our extension: before training, each of --meta-lr x (0.1, 1, 10) trains this many steps from the run's start
    # and the best dev accuracy without a collapse chooses the meta lr (written to the run's config and log);
    # 0 = off: --meta-lr as given. Kept out of the provenance when 0
    meta_lr_probe: int = 0
    # torch.compile the training forward of plain / plain-meta / meta-only / glc; the meta methods run eagerly
    # (the meta step differentiates twice / in forward mode through functional_call). Not in provenance.
    compile: bool = False

    @property
    def virtual_lr(self) -> float:
        """α of eqs. 4/8 as used: ``alpha``, or the classifier's ``lr`` when unset."""
        return self.lr if self.alpha is None else self.alpha

    def validate(self) -> None:
        for name, enum, error in (
            ("method", Method, UsageError),
            ("init_from", InitFrom, UsageError),
            ("meta_mode", MetaMode, ConfigError),
            ("meta_share_at", MetaShareAt, ConfigError),
            ("df_inputs", DFInputs, ConfigError),
        ):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _choice(enum, getattr(self, name), f"--{name.replace('_', '-')}", error))
        parse_meta_params(self.meta_params)
        if isinstance(self.meta_share, str):
            object.__setattr__(self, "meta_share", _share_or_auto(self.meta_share))
        self._resolve_method_defaults()
        _at_least(self, 1, "meta_per_class", "epochs", "batch_size", "meta_interval", "label_emb_dim", "df_dim")
        _at_least(self, 2, "max_length")
        _at_least(self, 0, "meta_backoff", "meta_lr_probe")
        if self.meta_batch_size is not None:
            _at_least(self, 1, "meta_batch_size")
        _fraction(self, "dev_fraction", "warmup_ratio")
        if self.lr <= 0 or self.meta_lr <= 0 or (self.alpha is not None and self.alpha <= 0):
            raise ConfigError("--lr, --meta-lr and --alpha must be > 0")
        for name, value in (("meta-share", self.meta_share), ("curve-prior", self.curve_prior)):
            if value not in (AUTO, None) and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name} must be a finite number >= 0, got {value}")
        if self.curve_prior and self.method != Method.mlrnet.value:
            raise UsageError(f"--curve-prior applies to --method mlrnet, not --method {self.method}")
        if self.df_inputs != DFInputs.all.value and self.method != Method.mlrnet.value:
            raise UsageError(f"--df-inputs applies to --method mlrnet, not --method {self.method}")
        if self.meta_lr_probe and self.method not in META_METHODS:
            raise UsageError(f"--meta-lr-probe applies to the meta methods ({', '.join(META_METHODS)})")
        if self.meta_share and self.method not in META_METHODS:
            raise UsageError(
                f"--meta-share applies to the meta methods ({', '.join(META_METHODS)}), not --method {self.method}",
                "it adds the meta batch to the meta step's real update; plain-meta and meta-only train on the "
                "meta rows already",
            )
        if self.meta_share_at != MetaShareAt.w.value:
            if not self.meta_share:
                raise UsageError("--meta-share-at applies with --meta-share > 0")
            if self.meta_params != "all":
                raise ConfigError(
                    f"--meta-share-at {self.meta_share_at} needs --meta-params all, not {self.meta_params}",
                    "the meta loss's gradient at w-hat covers only the parameters in w-hat",
                )

    def _resolve_method_defaults(self) -> None:
        """Fill the options left at None with the method's defaults: MLRNet's clean rows in the real step
        (``DEFAULT_META_SHARE``; with a frozen encoder ``DEFAULT_META_SHARE_FROZEN``, the dev rows' choice) with the
        gradient reused from ŵ, and its curve prior (``DEFAULT_CURVE_PRIOR``)."""
        mlrnet = self.method == Method.mlrnet.value
        if self.meta_share is None:
            share = DEFAULT_META_SHARE_FROZEN if self.freeze_encoder else DEFAULT_META_SHARE
            object.__setattr__(self, "meta_share", share if mlrnet else 0.0)
        if self.curve_prior is None and self.meta_share != AUTO:  # auto: each candidate's own (with_meta_share)
            object.__setattr__(self, "curve_prior", DEFAULT_CURVE_PRIOR if mlrnet else 0.0)
        if self.meta_share_at is None:
            reuse = (self.meta_share == AUTO or self.meta_share > 0) and self.meta_params == "all"
            object.__setattr__(self, "meta_share_at", (MetaShareAt.w_hat if reuse else MetaShareAt.w).value)

    def with_meta_share(self, share: float) -> TrainConfig:
        """This (validated) config as one run of ``--meta-share auto``: the share fixed, ``meta_share_at`` as
        resolved for it (``w`` at 0) and, unless given, the curve prior of the same form (MLRNet's at S > 0, the
        paper's 0 at S = 0), so each candidate is the same run as the paper's MLRNet or the defaults with these
        options."""
        at = self.meta_share_at if share else MetaShareAt.w.value
        prior = self.curve_prior
        if prior is None:
            prior = DEFAULT_CURVE_PRIOR if share and self.method == Method.mlrnet.value else 0.0
        config = replace(self, meta_share=share, meta_share_at=at, curve_prior=prior)
        config.validate()
        return config

    def provenance_config(self) -> dict[str, Any]:
        """The fields that determine the model: not compile and device (where and how fast it runs; a run resumes
        on another device), ``meta_share``, ``curve_prior`` and ``meta_lr_probe`` only when not 0, ``meta_share_at``
        only when not ``w`` and ``df_inputs`` only when not ``all`` (so runs from before they existed are the same
        run)."""
        unset = {k for k in ("meta_share", "curve_prior", "meta_lr_probe") if not getattr(self, k)}
        if self.meta_share_at == MetaShareAt.w.value:
            unset.add("meta_share_at")
        if self.df_inputs == DFInputs.all.value:
            unset.add("df_inputs")
        return {k: v for k, v in asdict(self).items() if k not in {"compile", "device", *unset}}


def _share_or_auto(value: str) -> float | str:
    """``--meta-share`` as the CLI passes it: ``auto`` or a number."""
    if value.strip().lower() == AUTO:
        return AUTO
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"--meta-share must be a number >= 0 or auto, got {value!r}") from None


# ---------------------------------------------------------------------------------------------
# inference: eval, weights, predict


@dataclass(frozen=True)
class _InferenceConfig:
    """What the reports (eval, weights, predict) share: speed and memory settings (the results stay the same, up to
    float rounding)."""

    batch_size: int | None = 64  #: rows per forward pass
    max_length: int | None = None  #: token truncation; None = as the model was trained (128 if it does not say)
    device: str = "auto"  #: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``
    bf16: bool = True  #: autocast to bfloat16 on CUDA (ignored on CPU, where bf16 is slower)

    def validate(self) -> None:
        """``--batch-size`` ≥ 1 and ``--max-length`` ≥ 2 (None: as the model was trained)."""
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be ≥ 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length must be ≥ 2, got {self.max_length}")


@dataclass(frozen=True)
class EvalConfig(_InferenceConfig):
    """Inference settings of `mlrnet eval` (none of them change the metrics, only speed and memory)."""

    text_column: str | None = None  #: text column of --data [default: text, sentence or content]
    label_column: str = "label"  #: label column of --data (class ids, or class names mapped with the manifest)
    #: evaluate a model whose training run stopped before its last epoch (warned about and recorded)
    allow_unfinished: bool = False


@dataclass(frozen=True)
class WeightsConfig(_InferenceConfig):
    """Settings of `mlrnet weights` (inference settings do not change the weights beyond float rounding; the
    meta-net runs in float32 whatever ``bf16`` says)."""

    top: int = 10  #: how many of the most distrusted rows (lowest weight) to list and to export for relabelling
    allow_unfinished: bool = False  #: use a model whose training run stopped before its last epoch (warned, recorded)

    def validate(self) -> None:
        if self.top < 0:
            raise ConfigError(f"--top must be ≥ 0, got {self.top}")
        super().validate()


@dataclass(frozen=True)
class PredictConfig(_InferenceConfig):
    """Settings of `mlrnet predict`. ``None`` means: as the model was trained (its mlrnet.json), else the fallback."""

    batch_size: int | None = None  #: rows per forward pass [default: the model's training batch size, else 64]
    #: text column of the table [default: text (what `corrupt` writes and `train` reads), sentence or content]
    text_column: str | None = None
    with_text: bool = True  #: copy each row's text into the output
