"""`mlrnet train`: stage 2, the MLRNet / MW-Net / MLC bi-level meta step, or a plain baseline."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from mlrnet_cli.commands._app import JsonOption, OverwriteOption, WorkdirOption, app, emit, option, optional
from mlrnet_cli.configs import (
    DEFAULT_CURVE_PRIOR,
    DEFAULT_META_SHARE,
    DEFAULT_META_SHARE_FROZEN,
    DFInputs,
    InitFrom,
    MetaMode,
    MetaShareAt,
    Method,
    TrainConfig,
    build,
)

_opt = partial(option, TrainConfig)

HELP = """Stage 2 (paper §3.2-3.4, Algorithm 1): train the classifier on the biased set, guided by a clean meta set.

[bold]Methods[/bold]: mlrnet (meta-net on the discriminative feature DF_i: [CLS] feature + label embedding +
normalised loss curve, eq. 7); mwnet (Meta-Weight-Net: the loss alone); mlc (Meta Label Correction, Zheng et al.
AAAI 2021: a label-correction net turns feature + observed label into a soft label, meta-learned through the same
look-ahead step, and the classifier trains on the soft labels); plain (fine-tune on the biased set);
plain-meta (on train + the meta set); meta-only (on the meta set alone). The last two are the fair baselines:
they use the same clean rows the meta methods get. glc: Gold Loss Correction (Hendrycks, Mazeika, Wilson &
Gimpel, NeurIPS 2018): the corruption matrix C^\\[i, j] = p(observed j | true i) is the collect-losses (stage1/)
classifier's mean softmax over the meta rows of class i; then train + meta rows, with
-log((softmax(f(x)) @ C^)\\[y]) on training rows and cross-entropy on meta rows. Needs collect-losses first.

[bold]Meta step[/bold]: virtual step w^ = w - alpha * sum_i c_i grad L_i(w) over --meta-params, with
c_i = v_i / sum(v) (--normalize-weights, default) or v_i / n (paper); meta loss on a clean mini-batch at w^;
Adam step on the meta-net (its gradient divided by alpha, which is O(alpha) otherwise); then the real step
with the new weights. The meta-net gradient is exact for every
--meta-params; 'all' differentiates through every classifier parameter (the paper), 'head' and 'last-K' hold
the others constant (cheaper approximations).

The meta set is --meta-per-class clean rows per class (seeded, balanced); model selection uses a held-out
--dev-fraction of the clean pool (or --dev), never the test set. Rerun the same command to resume.
Writes model/best, model/last, model/history.arrow in the workspace.
"""


@app.command("train", help=HELP)
def train_cmd(
    method: Method = _opt("method", "The training method."),
    meta_per_class: int = _opt("meta_per_class", "Clean rows per class in the meta set."),
    epochs: int = _opt("epochs", "Training epochs (paper: 10 on AG News)."),
    lr: float = _opt("lr", "Classifier learning rate (AdamW, linear warm-up and decay)."),
    batch_size: int = _opt("batch_size", "Training mini-batch n."),
    meta_batch_size: int | None = _opt("meta_batch_size", "Meta mini-batch m \\[default: --batch-size]."),
    meta_lr: float = _opt("meta_lr", "Adam learning rate of the meta-net."),
    alpha: float | None = _opt(
        "alpha",
        "Virtual-step rate alpha of eqs. 4/8. Keep it small: the meta gradient is a first-order one, and "
        "Adam on the meta-net sees it divided by alpha \\[default: --lr, as in the paper].",
    ),
    meta_params: str = _opt("meta_params", "Parameters the virtual step differentiates through: all, head or last-K."),
    meta_mode: MetaMode = _opt(
        "meta_mode", "How the exact meta gradient is taken: jvp (forward mode, less memory) or unrolled."
    ),
    meta_dropout: bool = _opt(
        "meta_dropout",
        "Dropout in the meta batch's forward at w-hat (eq. 5), as in MW-Net's code. Off (default): the meta "
        "loss is taken in eval mode, like the dev evaluation.",
    ),
    meta_share: str | None = _opt(
        "meta_share",
        "mlrnet/mwnet/mlc: the real step also trains on the step's meta batch, with S x its mean cross-entropy "
        "(our extension, as MLC's code does); 0 is the paper's exact form. auto trains the paper's MLRNet (0, and "
        f"--curve-prior 0 unless given) and ours ({DEFAULT_META_SHARE:g}) under model/candidates (twice the time) "
        "and keeps the run with the better dev accuracy (the choice goes to the log and meta_share_choice.json) "
        f"\\[default: mlrnet {DEFAULT_META_SHARE:g}, {DEFAULT_META_SHARE_FROZEN} with --freeze-encoder; mwnet and "
        "mlc 0].",
        metavar="S|auto",
    ),
    meta_share_at: MetaShareAt | None = _opt(
        "meta_share_at",
        "Where --meta-share's term takes its gradient: w (the meta rows run again in the real step, exact) or "
        "w-hat (reuse the meta loss's gradient at w^ from the meta step: no second pass; needs --meta-params all) "
        "\\[default: w-hat where it applies (--meta-share > 0 with --meta-params all), else w].",
    ),
    meta_backoff: int = _opt(
        "meta_backoff",
        "The collapse guard: an epoch that ends with one class predicted for most dev rows while the meta-net's "
        "weights went to the ends is run again from where it began with a 10x smaller meta lr, at most this many "
        "times (history.arrow's meta_lr column shows each epoch's); 0 turns it off.",
    ),
    meta_lr_probe: int = _opt(
        "meta_lr_probe",
        "Choose the meta lr on the dev rows: each of --meta-lr x 0.1, 1 and 10 trains N steps from the run's "
        "start, and the best dev accuracy without a collapse wins (our extension; the choice goes to the log, "
        "train_config.json and meta_lr_probe.json); 0 uses --meta-lr as given.",
    ),
    meta_interval: int = _opt(
        "meta_interval",
        "Update the meta-net every K steps (the steps between train with its current weights); 1 is the paper's "
        "every step, 2 the cheapest setting measured close to it (docs/results.md, the frontier).",
    ),
    normalize_weights: bool = _opt("normalize_weights", "Normalise weights in the batch: v_i / sum(v)."),
    label_emb_dim: int = _opt("label_emb_dim", "MLRNet (and MLC) label-embedding size."),
    df_dim: int = _opt("df_dim", "MLRNet discriminative-feature size (MLC: its hidden layers)."),
    curve_prior: float | None = _opt(
        "curve_prior",
        "mlrnet: start the weight's logit at -B x the row's mean normalised stage-1 loss, B learned with the "
        f"meta-net (our extension: keeps the within-label ranking of the loss curves); 0 is the paper's net "
        f"\\[default: {DEFAULT_CURVE_PRIOR:g}].",
    ),
    df_inputs: DFInputs = _opt(
        "df_inputs",
        "mlrnet: what the discriminative feature DF_i (eq. 7) is built from: all (the classifier's feature, the "
        "label embedding and the loss curve: the paper), label-curve (without the classifier's feature: an "
        "ablation) or agreement (the feature only as its agreement with the label embedding: our variant); "
        "docs/train.md.",
    ),
    init_from: InitFrom = _opt("init_from", "pretrained (the paper) or stage1 (the collect-losses classifier)."),
    freeze_encoder: bool = _opt("freeze_encoder", "Cache the encoder's features once and train the head only."),
    dev_fraction: float = _opt("dev_fraction", "Part of the clean pool held out per class for model selection."),
    dev_path: Path | None = optional("--dev", "A dev table for model selection", "--dev-fraction of the clean pool"),
    max_length: int = _opt("max_length", "Token limit per text."),
    warmup_ratio: float = _opt("warmup_ratio", "Fraction of the steps spent warming up."),
    weight_decay: float = _opt("weight_decay", "AdamW weight decay of the classifier."),
    model: str | None = _opt("model", "Hub id or local folder \\[default: the model collect-losses recorded]."),
    device: str = _opt("device"),
    allow_pickle: bool = _opt("allow_pickle"),
    trust_remote_code: bool = _opt("trust_remote_code"),
    train_path: Path | None = optional("--train", "Training table", "WORKDIR/data/train.arrow"),
    clean_path: Path | None = optional("--clean", "Clean pool", "WORKDIR/data/clean.arrow"),
    losses_path: Path | None = optional("--losses", "Loss curves", "WORKDIR/losses.safetensors"),
    manifest_path: Path | None = optional("--manifest", "Manifest", "WORKDIR/data/manifest.json"),
    out_dir: Path | None = optional("--out", "Output folder", "WORKDIR/model"),
    compile_forward: bool = _opt(
        "compile",
        "torch.compile the training forward of plain, plain-meta, meta-only and glc. mlrnet, mwnet and mlc run "
        "eagerly: their meta step differentiates twice (or in forward mode) through functional_call.",
        "--compile",
    ),
    seed: int = _opt("seed"),
    workdir: Path | None = WorkdirOption,
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    from mlrnet_cli.commands._app import run_on_ranks, stage_args
    from mlrnet_cli.train import train

    config, params = build(TrainConfig, locals(), compile=compile_forward), locals()
    run_on_ranks(
        lambda prog: train(config, **stage_args(train, params, progress=prog)),  # rank 0 alone shows progress
        lambda r: emit({"best": r.best_dir, "last": r.last_dir, "history": r.history_path}, r.summary(), as_json),
    )
