"""`mlrnet train`: stage 2, the MLRNet / MW-Net bi-level meta step, or a plain baseline."""

from __future__ import annotations

from pathlib import Path

import typer

from mlrnet_cli.commands._app import JsonOption, OverwriteOption, SeedOption, WorkdirOption, app, emit

HELP = """Stage 2 (paper §3.2-3.4, Algorithm 1): train the classifier on the biased set, guided by a clean meta set.

[bold]Methods[/bold]: mlrnet (meta-net on the discriminative feature DF_i: [CLS] feature + label embedding +
normalised loss curve, eq. 7); mwnet (Meta-Weight-Net: the loss alone); plain (fine-tune on the biased set);
plain-meta (on train + the meta set); meta-only (on the meta set alone). The last two are the fair baselines:
they use the same clean rows the meta methods get.

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
    method: str = typer.Option("mlrnet", "--method", help="mlrnet, mwnet, plain, plain-meta or meta-only."),
    meta_per_class: int = typer.Option(100, "--meta-per-class", help="Clean rows per class in the meta set."),
    epochs: int = typer.Option(10, "--epochs", help="Training epochs (paper: 10 on AG News)."),
    lr: float = typer.Option(1e-5, "--lr", help="Classifier learning rate (AdamW, linear warm-up and decay)."),
    batch_size: int = typer.Option(30, "--batch-size", help="Training mini-batch n."),
    meta_batch_size: int | None = typer.Option(
        None, "--meta-batch-size", help="Meta mini-batch m \\[default: --batch-size]."
    ),
    meta_lr: float = typer.Option(1e-4, "--meta-lr", help="Adam learning rate of the meta-net."),
    alpha: float | None = typer.Option(
        None,
        "--alpha",
        help="Virtual-step rate alpha of eqs. 4/8. Keep it small: the meta gradient is a first-order one, and "
        "Adam on the meta-net sees it divided by alpha \\[default: --lr, as in the paper].",
    ),
    meta_params: str = typer.Option(
        "all", "--meta-params", help="Parameters the virtual step differentiates through: all, head or last-K."
    ),
    meta_mode: str = typer.Option(
        "jvp", "--meta-mode", help="How the exact meta gradient is taken: jvp (forward mode, less memory) or unrolled."
    ),
    meta_dropout: bool = typer.Option(
        False,
        "--meta-dropout/--no-meta-dropout",
        help="Dropout in the meta batch's forward at w-hat (eq. 5), as in MW-Net's code. Off (default): the meta "
        "loss is taken in eval mode, like the dev evaluation.",
    ),
    meta_interval: int = typer.Option(1, "--meta-interval", help="Update the meta-net every K steps."),
    normalize_weights: bool = typer.Option(
        True, "--normalize-weights/--no-normalize-weights", help="Normalise weights in the batch: v_i / sum(v)."
    ),
    label_emb_dim: int = typer.Option(128, "--label-emb-dim", help="MLRNet label-embedding size."),
    df_dim: int = typer.Option(128, "--df-dim", help="MLRNet discriminative-feature size."),
    init_from: str = typer.Option(
        "pretrained", "--init-from", help="pretrained (the paper) or stage1 (the collect-losses classifier)."
    ),
    freeze_encoder: bool = typer.Option(
        False,
        "--freeze-encoder/--no-freeze-encoder",
        help="Cache the encoder's features once and train the head only (fast on CPU).",
    ),
    dev_fraction: float = typer.Option(
        0.2, "--dev-fraction", help="Part of the clean pool held out per class for model selection."
    ),
    dev: Path | None = typer.Option(
        None, "--dev", help="A dev table for model selection \\[default: --dev-fraction of the clean pool]."
    ),
    max_length: int = typer.Option(128, "--max-length", help="Token limit per text."),
    warmup_ratio: float = typer.Option(0.1, "--warmup-ratio", help="Fraction of the steps spent warming up."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay of the classifier."),
    model: str | None = typer.Option(
        None, "--model", help="Hub id or local folder \\[default: the model collect-losses recorded]."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (bf16 autocast on CUDA)."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle/--no-allow-pickle", help="Allow pickle (.bin) weights."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code/--no-trust-remote-code", help="Allow a model's own code to run."
    ),
    train_path: Path | None = typer.Option(
        None, "--train", help="Training table \\[default: WORKDIR/data/train.arrow]."
    ),
    clean_path: Path | None = typer.Option(None, "--clean", help="Clean pool \\[default: WORKDIR/data/clean.arrow]."),
    losses_path: Path | None = typer.Option(
        None, "--losses", help="Loss curves \\[default: WORKDIR/losses.safetensors]."
    ),
    manifest_path: Path | None = typer.Option(
        None, "--manifest", help="Manifest \\[default: WORKDIR/data/manifest.json]."
    ),
    out: Path | None = typer.Option(None, "--out", help="Output folder \\[default: WORKDIR/model]."),
    compile_forward: bool = typer.Option(
        False,
        "--compile/--no-compile",
        help="torch.compile the training forward of plain, plain-meta and meta-only. mlrnet and mwnet run "
        "eagerly: their meta step differentiates twice (or in forward mode) through functional_call.",
    ),
    seed: int = SeedOption,
    workdir: Path | None = WorkdirOption,
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    from mlrnet_cli.commands._app import run_on_ranks, setup_logging
    from mlrnet_cli.train import TrainConfig, train

    setup_logging()
    config = TrainConfig(
        method=method,
        meta_per_class=meta_per_class,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        meta_batch_size=meta_batch_size,
        meta_lr=meta_lr,
        alpha=alpha,
        meta_params=meta_params,
        meta_interval=meta_interval,
        meta_mode=meta_mode,
        meta_dropout=meta_dropout,
        normalize_weights=normalize_weights,
        label_emb_dim=label_emb_dim,
        df_dim=df_dim,
        init_from=init_from,
        freeze_encoder=freeze_encoder,
        dev_fraction=dev_fraction,
        max_length=max_length,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        device=device,
        seed=seed,
        model=model,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        compile=compile_forward,
    )
    run_on_ranks(
        lambda prog: train(
            config,
            workdir=workdir,
            train_path=train_path,
            clean_path=clean_path,
            losses_path=losses_path,
            manifest_path=manifest_path,
            dev_path=dev,
            out_dir=out,
            overwrite=overwrite,
            progress=prog,
        ),
        lambda result: emit(
            {"best": result.best_dir, "last": result.last_dir, "history": result.history_path},
            result.summary(),
            as_json,
        ),
    )
