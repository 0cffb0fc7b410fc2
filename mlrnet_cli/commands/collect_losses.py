"""`mlrnet collect-losses`: stage 1, per-sample loss curves for every training row."""

from __future__ import annotations

from pathlib import Path

import typer

from mlrnet_cli.commands._app import JsonOption, OverwriteOption, SeedOption, WorkdirOption, app, emit

HELP = """Stage 1 (paper §3.3): fine-tune the classifier normally on the biased training set and record every
sample's cross-entropy against its [bold]observed[/bold] label at every epoch: L_i = [L_i^0 ... L_i^T].

[bold]Which losses[/bold]: epoch 0 is a no-dropout pass before any update. Epochs 1..T are, by default
(--record train), the per-sample losses already computed in that epoch's training forward (free: dropout on,
weights changing during the epoch). --record eval adds a no-dropout pass over the training set after each
epoch instead (one extra forward pass per epoch).

Reads data/train.arrow and data/manifest.json of the workspace; writes losses.safetensors (losses [N, T+1],
sample_id [N]) and stage1/ (the classifier, its tokenizer and history.json). Token ids (and, with
--freeze-encoder, encoder features) are cached in cache/. Rerun the same command to resume after an
interruption.
"""


@app.command("collect-losses", help=HELP)
def collect_losses_cmd(
    workdir: Path | None = WorkdirOption,
    train: Path | None = typer.Option(None, "--train", help="Training table \\[default: WORKDIR/data/train.arrow]."),
    manifest: Path | None = typer.Option(
        None,
        "--manifest",
        help="Manifest with num_classes and class_names \\[default: WORKDIR/data/manifest.json, or manifest.json "
        "beside --train; without one, classes are 0..max(label)].",
    ),
    out: Path | None = typer.Option(None, "--out", help="Loss curves \\[default: WORKDIR/losses.safetensors]."),
    stage1_dir: Path | None = typer.Option(
        None, "--stage1-dir", help="Stage-1 classifier folder \\[default: WORKDIR/stage1]."
    ),
    model: str = typer.Option(
        "bert-base-uncased", "--model", help="Hub id or local model folder (AutoModelForSequenceClassification)."
    ),
    epochs: int = typer.Option(10, "--epochs", help="T: training epochs (curves have T+1 points)."),
    lr: float = typer.Option(1e-5, "--lr", help="AdamW peak learning rate (try 1e-3 with --freeze-encoder)."),
    batch_size: int = typer.Option(30, "--batch-size", help="Training batch size."),
    warmup_ratio: float = typer.Option(0.1, "--warmup-ratio", help="Fraction of steps with linear warm-up."),
    max_length: int = typer.Option(128, "--max-length", help="Truncate texts to this many tokens."),
    weight_decay: float = typer.Option(0.01, "--weight-decay", help="AdamW weight decay."),
    record: str = typer.Option(
        "train", "--record", help="train: losses from the training forward (free); eval: extra no-dropout pass."
    ),
    freeze_encoder: bool = typer.Option(
        False,
        "--freeze-encoder/--no-freeze-encoder",
        help="Encode once, cache [CLS]/pooled features, train only the head (fast).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (bf16 autocast on CUDA)."),
    seed: int = SeedOption,
    allow_pickle: bool = typer.Option(
        False,
        "--allow-pickle/--no-allow-pickle",
        help="Allow pickle weights (pytorch_model.bin): only for models you trust.",
    ),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code/--no-trust-remote-code",
        help="Run the model repository's own code: only for models you trust.",
    ),
    compile_forward: bool = typer.Option(
        False,
        "--compile/--no-compile",
        help="torch.compile the training forward (stage 1 is plain fine-tuning, so all of it; worth it on GPU).",
    ),
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    from mlrnet_cli.collect import CollectConfig, collect_losses
    from mlrnet_cli.commands._app import run_on_ranks, setup_logging
    from mlrnet_cli.workspace import Workspace

    setup_logging()
    ws = Workspace.at(workdir)
    train_path = train or ws.train
    if manifest is not None:
        manifest_path: Path | None = manifest
    elif train is None:
        manifest_path = ws.manifest
    else:
        beside = train.parent / "manifest.json"
        manifest_path = beside if beside.is_file() else None
    config = CollectConfig(
        model=model,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        warmup_ratio=warmup_ratio,
        max_length=max_length,
        weight_decay=weight_decay,
        seed=seed,
        record=record,
        freeze_encoder=freeze_encoder,
        device=device,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        compile=compile_forward,
    )
    run_on_ranks(
        lambda prog: collect_losses(
            config,
            train_path=train_path,
            manifest_path=manifest_path,
            losses_path=out or ws.losses,
            stage1_dir=stage1_dir or ws.stage1,
            cache_dir=ws.cache,
            overwrite=overwrite,
            progress=prog,
        ),
        lambda result: emit({"losses": result.losses_path, "stage1": result.stage1_dir}, result.summary(), as_json),
    )
