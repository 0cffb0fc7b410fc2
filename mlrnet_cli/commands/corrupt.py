"""`mlrnet corrupt`: make the biased training set, the clean pool and the test split."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from mlrnet_cli.commands._app import JsonOption, OverwriteOption, WorkdirOption, app, option, optional, rich_table
from mlrnet_cli.configs import DEFAULT_META_POOL, DEFAULT_TEST_FRACTION, CorruptConfig, InputSpec, NoiseSpec, build

_opt = partial(option, CorruptConfig)
_in = partial(option, InputSpec)

HELP = """Bias a clean labelled text set as in the paper (§4.2): imbalance first, then label noise.

[bold]Order[/bold]: a clean pool of --meta-pool-per-class true-labelled rows per class is set aside first
(never in train); then class i (0 = head, see --class-order) keeps round(n_max * F^(-i/(C-1))) rows
(half rounds up); then labels are corrupted.

[bold]Noise[/bold]: uniform:P redraws the label from all C classes with prob. P (it may stay: realised rate
P(C-1)/C, MW-Net's 'unif'); flip:P moves it to one other class chosen per class (seeded) with prob. P;
pair:P moves it to class (i+1) mod C with prob. P.

Without --data, uses the embedded AG News sample (4,400 train / 1,200 test rows; credit: Zhang et al. 2015).
Writes data/train.arrow, data/clean.arrow, data/test.arrow and data/manifest.json in the workspace.
"""


@app.command("corrupt", help=HELP)
def corrupt_cmd(
    imbalance: float = _opt("imbalance", "Imbalance factor F ≥ 1: head rows / tail rows."),
    noise: str = _opt("noise", "none, uniform:P, flip:P or pair:P (P in [0, 1])."),
    n_max: int | None = _opt(
        "n_max", "Rows the head class keeps \\[default: the smallest class's rows, so the profile is exact]."
    ),
    class_order: str = _opt(
        "class_order",
        "Which classes are the tail: given (0 is the head), shuffle (seeded), "
        "or a comma list of class names/ids, head first.",
    ),
    meta_pool_per_class: int | None = _opt(
        "meta_pool_per_class",
        "Clean rows per class set aside before corruption (for `train`) "
        f"\\[default: {DEFAULT_META_POOL}; with --clean-data, that whole table].",
        show_default=False,
    ),
    data: str | None = _in(
        "data",
        "Parquet/CSV/JSONL/Arrow file, a datasets.save_to_disk folder, or a hub dataset name "
        "\\[default: the embedded AG News sample].",
    ),
    split: str = _in("split", "Split to read from a hub dataset or DatasetDict folder."),
    test_data: str | None = _in("test_data", "Test table \\[default: the dataset's own test split, if it has one]."),
    test_split: str = _in("test_split", "Split name of the test data."),
    test_fraction: float | None = _opt(
        "test_fraction",
        "Share of each class held out as the test split when --data has none "
        f"(before the clean pool and the bias are drawn; 0: no test split) \\[default: {DEFAULT_TEST_FRACTION}].",
        show_default=False,
    ),
    clean_data: str | None = _in("clean_data", "A trusted table for the clean pool (for data that is already noisy)."),
    text_column: list[str] = _in(
        "text_columns",
        "Text column; repeat to join several (e.g. title + description) \\[default: text, sentence or content].",
        "--text-column",
    ),
    label_column: str = _in("label_column", "Label column (ints or strings)."),
    true_label_column: str | None = _in(
        "true_label_column", "Column with the true labels of already-noisy benchmark data."
    ),
    out: Path | None = optional("--out", "Output folder", "WORKDIR/data"),
    seed: int = _opt("seed"),
    workdir: Path | None = WorkdirOption,
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    from mlrnet_cli.commands._app import emit, stderr_console
    from mlrnet_cli.corrupt import corrupt
    from mlrnet_cli.workspace import Workspace

    config = build(CorruptConfig, locals(), noise=NoiseSpec.parse(noise))
    inputs = build(InputSpec, locals(), text_columns=tuple(text_column))
    result = corrupt(config, inputs, out or Workspace.at(workdir).data, overwrite=overwrite)
    _print_summary(result.manifest, stderr_console())
    m = result.manifest
    emit(result.paths, {"counts": m["counts"], "class_names": m["class_names"], "noise": m["noise"]}, as_json)


def _print_summary(manifest: dict, console) -> None:
    counts = manifest["counts"]
    realised = (manifest["noise"].get("realised") or {}).get("per_class_rate")
    rows = (
        [name, *(str(counts[k][i]) for k in ("source", "clean", "train_true", "train_observed"))]
        + [f"{realised[i]:.3f}" if realised else "unknown"]
        for i, name in enumerate(manifest["class_names"])
    )
    columns = ("class", "source", "clean pool", "train (true)", "train (observed)", "realised noise")
    title = f"mlrnet corrupt: noise {manifest['noise']['spec']}, head {manifest['n_max']}"
    console.print(rich_table(title, columns, rows))
