"""`mlrnet collect-losses`: stage 1, per-sample loss curves for every training row."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from mlrnet_cli.commands._app import JsonOption, OverwriteOption, WorkdirOption, app, emit, option, optional
from mlrnet_cli.configs import CollectConfig, Record, build

_opt = partial(option, CollectConfig)

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
    train: Path | None = optional("--train", "Training table", "WORKDIR/data/train.arrow"),
    manifest: Path | None = optional(
        "--manifest",
        "Manifest with num_classes and class_names",
        "WORKDIR/data/manifest.json, or manifest.json beside --train; without one, classes are 0..max(label)",
    ),
    out: Path | None = optional("--out", "Loss curves", "WORKDIR/losses.safetensors"),
    stage1_dir: Path | None = optional("--stage1-dir", "Stage-1 classifier folder", "WORKDIR/stage1"),
    model: str = _opt("model", "Hub id or local model folder (AutoModelForSequenceClassification)."),
    epochs: int = _opt("epochs", "T: training epochs (curves have T+1 points)."),
    lr: float = _opt("lr", "AdamW peak learning rate (try 1e-3 with --freeze-encoder)."),
    batch_size: int = _opt("batch_size", "Training batch size."),
    warmup_ratio: float = _opt("warmup_ratio", "Fraction of steps with linear warm-up."),
    max_length: int = _opt("max_length", "Truncate texts to this many tokens."),
    weight_decay: float = _opt("weight_decay", "AdamW weight decay."),
    record: Record = _opt("record", "train: losses from the training forward (free); eval: extra no-dropout pass."),
    freeze_encoder: bool = _opt("freeze_encoder", "Encode once, cache [CLS]/pooled features, train only the head."),
    device: str = _opt("device"),
    seed: int = _opt("seed"),
    allow_pickle: bool = _opt("allow_pickle"),
    trust_remote_code: bool = _opt("trust_remote_code"),
    compile_forward: bool = _opt(
        "compile", "torch.compile the training forward (stage 1 is plain fine-tuning, so all of it).", "--compile"
    ),
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    from mlrnet_cli.collect import collect_losses
    from mlrnet_cli.commands._app import run_on_ranks
    from mlrnet_cli.workspace import Workspace

    config = build(CollectConfig, locals(), compile=compile_forward)
    ws = Workspace.at(workdir)
    # the workspace's manifest, or the one beside --train when there is one
    beside = ws.manifest if train is None else train.parent / "manifest.json"
    manifest_path = manifest if manifest is not None else (beside if train is None or beside.is_file() else None)
    run_on_ranks(
        lambda prog: collect_losses(
            config,
            train_path=train or ws.train,
            manifest_path=manifest_path,
            losses_path=out or ws.losses,
            stage1_dir=stage1_dir or ws.stage1,
            cache_dir=ws.cache,
            overwrite=overwrite,
            progress=prog,
        ),
        lambda result: emit({"losses": result.losses_path, "stage1": result.stage1_dir}, result.summary(), as_json),
    )
