"""Every command against bad input: exit 1 (2 for usage), one line on stderr naming problem and fix,
no traceback, and the workspace left exactly as it was (names and bytes). See docs/reliability.md."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_workspace, trained_workspace, write_synthetic_source
from typer.testing import CliRunner

from mlrnet_cli import artifacts
from mlrnet_cli.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")  # same numerics as the subprocesses

runner = CliRunner()
SIZE = ["--max-length", "24", "--device", "cpu"]
COLLECT = ["--epochs", "1", "--batch-size", "16", "--lr", "1e-3", *SIZE]
TRAIN = ["--epochs", "1", "--batch-size", "16", "--meta-per-class", "4", "--meta-params", "last-1", *SIZE]


@pytest.fixture(scope="module")
def done_ws(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A workspace after corrupt, collect-losses and train (1 epoch each): copied by every case."""
    return trained_workspace(tmp_path_factory.mktemp("bad-input") / "ws", tiny_model_dir, COLLECT, TRAIN)


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


# ---------------------------------------------------------------------------------------------
# the cases: each mutates a fresh copy of the finished workspace (or writes a source table), then runs
# one command; ``args`` may use {ws}, {tmp} and {model}.


def _rewrite_table(path: Path, fn: Callable[[pa.Table], pa.Table]) -> None:
    table = artifacts.read_table(path)
    new = fn(table)
    meta = artifacts.table_meta(table) or {}
    artifacts.write_table(path, new.replace_schema_metadata(None), meta)


def _set_column(name: str, values: Callable[[pa.Table], pa.Array]) -> Callable[[pa.Table], pa.Table]:
    def fn(t: pa.Table) -> pa.Table:
        return t.set_column(t.column_names.index(name), name, values(t))

    return fn


def _drop(name: str) -> Callable[[pa.Table], pa.Table]:
    return lambda t: t.drop([name])


def _labels_as_strings(t: pa.Table) -> pa.Array:
    return pa.array([f"class-{v}" for v in t.column("label").to_pylist()])


def _labels_out_of_range(t: pa.Table) -> pa.Array:
    return pa.array([v + 9 if i == 0 else v for i, v in enumerate(t.column("label").to_pylist())], pa.int64())


def _none_text(t: pa.Table) -> pa.Array:
    return pa.array([None if i == 1 else v for i, v in enumerate(t.column("text").to_pylist())], pa.string())


def _empty(t: pa.Table) -> pa.Table:
    return t.slice(0, 0)


def _extra(t: pa.Table) -> pa.Table:
    return t.append_column("my_note", pa.array(["x"] * t.num_rows))


def _truncate(rel: str) -> Callable[[Path, Path], None]:
    def fn(ws: Path, tmp: Path) -> None:
        p = ws / rel
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    return fn


def _foreign_losses(ws: Path, tmp: Path) -> None:
    from safetensors.torch import save_file

    save_file({"losses": torch.zeros(3, 2), "sample_id": torch.arange(3)}, str(ws / "losses.safetensors"))


def _not_safetensors(ws: Path, tmp: Path) -> None:
    (ws / "losses.safetensors").write_bytes(b"this is not a safetensors file at all")


def _shift_curve_ids(ws: Path, tmp: Path) -> None:
    tensors, meta = artifacts.read_tensors(ws / "losses.safetensors")
    artifacts.write_tensors(ws / "losses.safetensors", {**tensors, "sample_id": tensors["sample_id"] + 100_000}, meta)


def _other_corrupt_run(ws: Path, tmp: Path) -> None:
    """data/ from another `corrupt` run (other seed) under the artifacts of this one."""
    other = make_workspace(tmp / "other", seed=1)
    shutil.rmtree(ws / "data")
    shutil.copytree(other / "data", ws / "data")


def _not_a_model(ws: Path, tmp: Path) -> None:
    (tmp / "notamodel").mkdir()
    (tmp / "notamodel" / "README.md").write_text("hello\n")


def _garbage_config_model(ws: Path, tmp: Path) -> None:
    (tmp / "notamodel").mkdir()
    (tmp / "notamodel" / "config.json").write_text("{not json")


def _a_file(ws: Path, tmp: Path) -> None:
    (tmp / "afile").write_text("a regular file: nothing can be created under it\n")


def _source(**cols: list) -> Callable[[Path, Path], None]:
    def fn(ws: Path, tmp: Path) -> None:
        pq.write_table(
            pa.table(cols)
            if cols
            else pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}),
            tmp / "src.parquet",
        )

    return fn


def _good_source(ws: Path, tmp: Path) -> None:
    write_synthetic_source(tmp / "src.parquet", per_class=40)


def _source_with(fn: Callable[[pa.Table], pa.Table]) -> Callable[[Path, Path], None]:
    def setup(ws: Path, tmp: Path) -> None:
        write_synthetic_source(tmp / "src.parquet", per_class=40)
        pq.write_table(fn(pq.read_table(tmp / "src.parquet")), tmp / "src.parquet")

    return setup


def _float_labels_with_nan(t: pa.Table) -> pa.Table:
    vals = [float("nan") if i == 0 else float(v) for i, v in enumerate(t.column("label").to_pylist())]
    return t.set_column(t.column_names.index("label"), "label", pa.array(vals, pa.float64()))


def _few_rows_class(t: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    keep = pc.or_(pc.not_equal(t.column("label"), 3), pc.less(pa.array(range(t.num_rows)), 20))
    return t.filter(keep)


def _table(rel: str, fn: Callable[[pa.Table], pa.Table]) -> Callable[[Path, Path], None]:
    return lambda ws, tmp: _rewrite_table(ws / rel, fn)


def _eval_data(fn: Callable[[pa.Table], pa.Table]) -> Callable[[Path, Path], None]:
    def setup(ws: Path, tmp: Path) -> None:
        t = artifacts.read_table(ws / "data" / "test.arrow")
        pq.write_table(fn(t).replace_schema_metadata(None), tmp / "data.parquet")

    return setup


@dataclass(frozen=True)
class Case:
    id: str
    command: str
    setup: Callable[[Path, Path], None] | None
    args: list[str]
    needle: str  #: a piece of the one stderr line (the problem)
    code: int = 1
    fresh: bool = False  #: start from an empty workspace (corrupt)
    prep: str | None = None  #: "done", "collected" or "data": how far the copied workspace got (see PREP)


CORRUPT_SRC = ["--data", "{tmp}/src.parquet", "--meta-pool-per-class", "4", "--imbalance", "2"]

CASES = [
    # corrupt ------------------------------------------------------------------------------
    Case("corrupt-missing-label-column", "corrupt", _source(text=["a", "b"]), CORRUPT_SRC, "label", fresh=True),
    Case(
        "corrupt-missing-text-column",
        "corrupt",
        _source(words=["a", "b"], label=[0, 1]),
        CORRUPT_SRC,
        "text",
        fresh=True,
    ),
    Case("corrupt-empty-table", "corrupt", _source(), CORRUPT_SRC, "no rows", fresh=True),
    Case(
        "corrupt-none-text", "corrupt", _source_with(_set_column("text", _none_text)), CORRUPT_SRC, "text", fresh=True
    ),
    Case("corrupt-nan-label", "corrupt", _source_with(_float_labels_with_nan), CORRUPT_SRC, "label", fresh=True),
    Case(
        "corrupt-class-too-few-rows",
        "corrupt",
        _source_with(_few_rows_class),
        [*CORRUPT_SRC[:2], "--meta-pool-per-class", "30"],
        "fewer than the clean pool",
        fresh=True,
    ),
    Case("corrupt-noise-typo", "corrupt", _good_source, [*CORRUPT_SRC, "--noise", "unifrom:0.4"], "noise", fresh=True),
    Case("corrupt-noise-no-p", "corrupt", _good_source, [*CORRUPT_SRC, "--noise", "uniform"], "noise", fresh=True),
    Case("corrupt-p-above-1", "corrupt", _good_source, [*CORRUPT_SRC, "--noise", "uniform:1.5"], "[0, 1]", fresh=True),
    Case("corrupt-p-below-0", "corrupt", _good_source, [*CORRUPT_SRC, "--noise", "pair:-0.1"], "pair:-0.1", fresh=True),
    Case(
        "corrupt-imbalance-below-1",
        "corrupt",
        _good_source,
        [*CORRUPT_SRC, "--imbalance", "0.5"],
        "imbalance",
        fresh=True,
    ),
    Case("corrupt-missing-file", "corrupt", None, ["--data", "{tmp}/nope.parquet"], "nope.parquet", fresh=True),
    Case(
        "corrupt-unwritable-out",
        "corrupt",
        lambda ws, tmp: (_good_source(ws, tmp), _a_file(ws, tmp)),
        [*CORRUPT_SRC, "--out", "{tmp}/afile/data"],
        "another output path",
        fresh=True,
    ),
    Case("corrupt-over-other-run", "corrupt", _good_source, [*CORRUPT_SRC], "different run"),
    Case(
        "corrupt-meta-pool-zero",
        "corrupt",
        _good_source,
        [*CORRUPT_SRC, "--meta-pool-per-class", "0"],
        "--meta-pool-per-class must be ≥ 1",
        fresh=True,
    ),
    Case(
        "corrupt-test-fraction-and-test-data",
        "corrupt",
        _good_source,
        [*CORRUPT_SRC, "--test-data", "{tmp}/src.parquet", "--test-fraction", "0.2"],
        "is the test split already",
        code=2,
        fresh=True,
    ),
    Case(
        "corrupt-test-fraction-above-1",
        "corrupt",
        _good_source,
        [*CORRUPT_SRC, "--test-fraction", "1.5"],
        "--test-fraction",
        fresh=True,
    ),
    Case(
        "corrupt-clean-data-pool-too-large",
        "corrupt",
        _good_source,
        [*CORRUPT_SRC[:2], "--clean-data", "{tmp}/src.parquet", "--meta-pool-per-class", "41"],
        "--clean-data has fewer than 41",
        fresh=True,
    ),
    # collect-losses -----------------------------------------------------------------------
    Case(
        "collect-missing-label-column",
        "collect-losses",
        _table("data/train.arrow", _drop("label")),
        ["--model", "{model}", *COLLECT],
        "label",
    ),
    Case(
        "collect-missing-text-column",
        "collect-losses",
        _table("data/train.arrow", _drop("text")),
        ["--model", "{model}", *COLLECT],
        "text",
    ),
    Case(
        "collect-string-labels",
        "collect-losses",
        _table("data/train.arrow", _set_column("label", _labels_as_strings)),
        ["--model", "{model}", *COLLECT],
        "integers",
    ),
    Case(
        "collect-label-out-of-range",
        "collect-losses",
        _table("data/train.arrow", _set_column("label", _labels_out_of_range)),
        ["--model", "{model}", *COLLECT],
        "0..3",
    ),
    Case(
        "collect-none-text",
        "collect-losses",
        _table("data/train.arrow", _set_column("text", _none_text)),
        ["--model", "{model}", *COLLECT],
        "no text",
    ),
    Case(
        "collect-empty-table",
        "collect-losses",
        _table("data/train.arrow", _empty),
        ["--model", "{model}", *COLLECT],
        "no rows",
    ),
    Case(
        "collect-other-corrupt-run",
        "collect-losses",
        _other_corrupt_run,
        ["--model", "{model}", *COLLECT],
        "different run",
        prep="done",
    ),
    Case(
        "collect-not-a-model",
        "collect-losses",
        _not_a_model,
        ["--model", "{tmp}/notamodel", *COLLECT],
        "not a model folder",
    ),
    Case(
        "collect-broken-model-config",
        "collect-losses",
        _garbage_config_model,
        ["--model", "{tmp}/notamodel", *COLLECT],
        "notamodel",
    ),
    Case(
        "collect-truncated-train-table",
        "collect-losses",
        _truncate("data/train.arrow"),
        ["--model", "{model}", *COLLECT],
        "train.arrow",
    ),
    Case(
        "collect-record-typo",
        "collect-losses",
        None,
        ["--model", "{model}", *COLLECT, "--record", "evl"],
        "--record",
        code=2,
    ),
    Case(
        "collect-unwritable-out",
        "collect-losses",
        _a_file,
        [
            "--model",
            "{model}",
            *COLLECT,
            "--out",
            "{tmp}/afile/losses.safetensors",
            "--stage1-dir",
            "{tmp}/afile/stage1",
        ],
        "afile",
    ),
    # train --------------------------------------------------------------------------------
    Case("train-missing-label-column", "train", _table("data/clean.arrow", _drop("label")), TRAIN, "label"),
    Case(
        "train-string-labels",
        "train",
        _table("data/train.arrow", _set_column("label", _labels_as_strings)),
        TRAIN,
        "label",
    ),
    Case(
        "train-label-out-of-range",
        "train",
        _table("data/clean.arrow", _set_column("label", _labels_out_of_range)),
        TRAIN,
        "0..3",
    ),
    Case("train-none-text", "train", _table("data/clean.arrow", _set_column("text", _none_text)), TRAIN, "no text"),
    Case("train-empty-clean-table", "train", _table("data/clean.arrow", _empty), TRAIN, "no rows"),
    Case("train-truncated-losses", "train", _truncate("losses.safetensors"), TRAIN, "truncated"),
    Case("train-not-safetensors", "train", _not_safetensors, TRAIN, "safetensors"),
    Case("train-foreign-losses", "train", _foreign_losses, TRAIN, "not written by mlrnet"),
    Case("train-curve-ids-mismatch", "train", _shift_curve_ids, TRAIN, "do not match"),
    Case("train-other-corrupt-run", "train", _other_corrupt_run, TRAIN, "different training table"),
    Case("train-not-a-model", "train", _not_a_model, [*TRAIN, "--model", "{tmp}/notamodel"], "not a model folder"),
    Case("train-meta-per-class-too-large", "train", None, [*TRAIN, "--meta-per-class", "50"], "--meta-per-class 50"),
    Case("train-unknown-method", "train", None, [*TRAIN, "--method", "mlrnett"], "--method", code=2),
    Case("train-meta-params-typo", "train", None, [*TRAIN, "--meta-params", "lats-1"], "--meta-params"),
    Case("train-dev-fraction-above-1", "train", None, [*TRAIN, "--dev-fraction", "1.5"], "--dev-fraction"),
    Case("train-unwritable-out", "train", _a_file, [*TRAIN, "--out", "{tmp}/afile/model"], "afile"),
    Case("train-negative-meta-share", "train", None, [*TRAIN, "--meta-share", "-0.5"], "--meta-share must be"),
    Case("train-nan-meta-share", "train", None, [*TRAIN, "--meta-share", "nan"], "--meta-share must be"),
    Case(
        "train-probe-without-dev",
        "train",
        None,
        [*TRAIN, "--meta-lr-probe", "5", "--dev-fraction", "0"],
        "there are none",
    ),
    Case("train-negative-probe", "train", None, [*TRAIN, "--meta-lr-probe", "-1"], "--meta-lr-probe must be >= 0"),
    Case("train-word-meta-share", "train", None, [*TRAIN, "--meta-share", "half"], "a number >= 0 or auto"),
    Case(
        "train-auto-share-without-dev",
        "train",
        None,
        [*TRAIN, "--meta-share", "auto", "--dev-fraction", "0"],
        "there are none (pass --dev or a --dev-fraction, or choose the form: --meta-share 0.5 (ours)",
    ),
    Case(
        "train-auto-share-plain",
        "train",
        None,
        [*TRAIN, "--method", "plain", "--meta-share", "auto"],
        "--meta-share applies",
        code=2,
    ),
    Case(
        "train-probe-plain",
        "train",
        None,
        [*TRAIN, "--method", "plain", "--meta-lr-probe", "5"],
        "--meta-lr-probe applies",
        code=2,
    ),
    Case(
        "train-meta-share-plain-meta",
        "train",
        None,
        [*TRAIN, "--method", "plain-meta", "--meta-share", "0.5"],
        "--meta-share applies",
        code=2,
    ),
    Case(
        "train-meta-share-at-head",
        "train",
        None,
        [*TRAIN, "--meta-share", "0.5", "--meta-share-at", "w-hat", "--meta-params", "head"],
        "--meta-share-at w-hat needs --meta-params all",
    ),
    Case(
        "train-meta-share-at-no-share",
        "train",
        None,
        [*TRAIN, "--meta-share", "0", "--meta-share-at", "w-hat"],
        "--meta-share-at applies with --meta-share > 0",
        code=2,
    ),
    Case("train-negative-curve-prior", "train", None, [*TRAIN, "--curve-prior", "-1"], "--curve-prior must be"),
    Case(
        "train-curve-prior-mwnet",
        "train",
        None,
        [*TRAIN, "--method", "mwnet", "--curve-prior", "1"],
        "--curve-prior applies",
        code=2,
    ),
    Case(
        "train-df-inputs-mwnet",
        "train",
        None,
        [*TRAIN, "--method", "mwnet", "--df-inputs", "label-curve"],
        "--df-inputs applies",
        code=2,
    ),
    Case("train-df-inputs-unknown", "train", None, [*TRAIN, "--df-inputs", "none"], "--df-inputs", code=2),
    # eval ---------------------------------------------------------------------------------
    Case(
        "eval-missing-label-column",
        "eval",
        _eval_data(_drop("label")),
        ["--data", "{tmp}/data.parquet", *SIZE],
        "label",
    ),
    Case(
        "eval-missing-text-column", "eval", _eval_data(_drop("text")), ["--data", "{tmp}/data.parquet", *SIZE], "text"
    ),
    Case(
        "eval-unknown-string-labels",
        "eval",
        _eval_data(_set_column("label", _labels_as_strings)),
        ["--data", "{tmp}/data.parquet", *SIZE],
        "label",
    ),
    Case(
        "eval-label-out-of-range",
        "eval",
        _eval_data(_set_column("label", _labels_out_of_range)),
        ["--data", "{tmp}/data.parquet", *SIZE],
        "label",
    ),
    Case(
        "eval-none-text",
        "eval",
        _eval_data(_set_column("text", _none_text)),
        ["--data", "{tmp}/data.parquet", *SIZE],
        "text",
    ),
    Case("eval-empty-table", "eval", _eval_data(_empty), ["--data", "{tmp}/data.parquet", *SIZE], "no rows"),
    Case("eval-truncated-weights", "eval", _truncate("model/best/model.safetensors"), SIZE, "model"),
    Case("eval-not-a-model", "eval", _not_a_model, ["--model", "{tmp}/notamodel", *SIZE], "notamodel"),
    Case("eval-unwritable-out", "eval", _a_file, [*SIZE, "--out", "{tmp}/afile/eval"], "afile"),
    # weights ------------------------------------------------------------------------------
    Case("weights-truncated-losses", "weights", _truncate("losses.safetensors"), SIZE, "truncated"),
    Case("weights-foreign-losses", "weights", _foreign_losses, SIZE, "losses"),
    Case("weights-curve-ids-mismatch", "weights", _shift_curve_ids, SIZE, "sample_id"),
    Case("weights-truncated-meta-net", "weights", _truncate("model/best/meta_net.safetensors"), SIZE, "truncated"),
    Case("weights-other-corrupt-run", "weights", _other_corrupt_run, SIZE, "no loss curve"),
    Case("weights-not-a-model", "weights", _not_a_model, ["--model", "{tmp}/notamodel", *SIZE], "notamodel"),
    Case("weights-missing-label-column", "weights", _table("data/train.arrow", _drop("label")), SIZE, "label"),
    Case("weights-unwritable-out", "weights", _a_file, [*SIZE, "--out", "{tmp}/afile/weights.arrow"], "is a file"),
]


#: each stage's cases start from a workspace where it has not run yet (else its output guard answers first)
PREP = {"collect-losses": "data", "train": "collected"}
UNDO = {"done": [], "collected": ["model"], "data": ["model", "losses.safetensors", "stage1", "cache"]}


def run_case(case: Case, tmp_path: Path, done_ws: Path, model: Path):
    tmp = tmp_path / "t"
    tmp.mkdir()
    ws = tmp_path / "ws"
    if not case.fresh:
        shutil.copytree(done_ws, ws)
        for rel in UNDO[case.prep or PREP.get(case.command, "done")]:
            shutil.rmtree(ws / rel) if (ws / rel).is_dir() else (ws / rel).unlink()
    if case.setup is not None:
        case.setup(ws, tmp)
    args = [a.format(ws=ws, tmp=tmp, model=model) for a in case.args]
    before = snapshot(tmp_path)
    r = runner.invoke(app, [case.command, "--workdir", str(ws), *args])
    return r, before, snapshot(tmp_path)


def check_one_line_error(r, code: int, needle: str) -> str:
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == code, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("mlrnet: error: ") and needle in err[0], err
    return err[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, done_ws: Path, tiny_model_dir: Path) -> None:
    r, before, after = run_case(case, tmp_path, done_ws, tiny_model_dir)
    check_one_line_error(r, case.code, case.needle)
    assert after == before, "the workspace changed"


EXTRA_OK = [
    ("collect-losses", "data/train.arrow", ["--model", "{model}", *COLLECT, "--overwrite"]),
    ("train", "data/clean.arrow", [*TRAIN, "--overwrite"]),
]


@pytest.mark.parametrize("command,rel,args", EXTRA_OK, ids=[c for c, _, _ in EXTRA_OK])
def test_extra_columns_are_carried_not_refused(
    command: str, rel: str, args: list[str], tmp_path: Path, done_ws: Path, tiny_model_dir: Path
) -> None:
    ws = Path(shutil.copytree(done_ws, tmp_path / "ws"))
    _rewrite_table(ws / rel, _extra)
    r = runner.invoke(app, [command, "-w", str(ws), *[a.format(model=tiny_model_dir) for a in args]])
    assert r.exit_code == 0, r.output


def _mount_tiny_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def test_full_disk_gives_one_line_and_no_partial_file(tmp_path: Path, done_ws: Path, tiny_model_dir: Path) -> None:
    """A tmpfs with room for the inputs but not for the model: train fails cleanly, writes nothing half."""
    mnt = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tiny_tmpfs(mnt, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        ws = mnt / "ws"
        (ws / "data").mkdir(parents=True)
        for f in (
            "data/train.arrow",
            "data/clean.arrow",
            "data/test.arrow",
            "data/manifest.json",
            "losses.safetensors",
        ):
            shutil.copy(done_ws / f, ws / f)
        big = mnt / "filler"
        free = shutil.disk_usage(mnt).free
        big.write_bytes(b"\0" * max(free - 64 * 1024, 0))
        r = runner.invoke(app, ["train", "-w", str(ws), *TRAIN])
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        assert r.exit_code == 1 and "Traceback" not in r.output
        # progress logs of the epoch that ran come first; the error is one line, the last
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("mlrnet: error")]
        assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr
        assert "No space left on device" in errors[0] and "free space" in errors[0]
        leftover = [p for p in ws.rglob("*") if p.name.startswith(artifacts.TMP_PREFIX)]
        assert not leftover
        assert not (ws / "model" / "last").exists() and not (ws / "model" / "history.arrow").exists()
    finally:
        # lazy: memory-mapped Arrow tables may still pin the mount until garbage collection
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# security: what mlrnet loads from strangers never runs code


class _Evil:
    """Unpickling this touches ``marker``: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_pickle_train_state_is_refused_and_runs_no_code(
    tmp_path: Path, done_ws: Path, tiny_model_dir: Path
) -> None:
    ws = Path(shutil.copytree(done_ws, tmp_path / "ws"))
    shutil.rmtree(ws / "model")
    (ws / "model" / "state").mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"provenance": _Evil(marker), "epoch": 1}, ws / "model" / "state" / "state.pt")
    before = snapshot(ws)
    r = runner.invoke(app, ["train", "-w", str(ws), *TRAIN])
    line = check_one_line_error(r, 1, "resume state")
    assert "--overwrite" in line
    assert not marker.exists()
    assert snapshot(ws) == before


def test_crafted_pickle_collect_state_is_refused_and_runs_no_code(
    tmp_path: Path, done_ws: Path, tiny_model_dir: Path
) -> None:
    from mlrnet_cli.collect import CollectConfig, collect_losses
    from mlrnet_cli.progress import NullProgress
    from mlrnet_cli.workspace import Workspace

    ws = Path(shutil.copytree(done_ws, tmp_path / "ws"))
    for rel in UNDO["data"]:
        shutil.rmtree(ws / rel) if (ws / rel).is_dir() else (ws / rel).unlink()

    class StopAtEpoch2:
        def task(self, description: str, total: int | None):
            if description.startswith("epoch 2/"):
                raise KeyboardInterrupt
            return NullProgress().task(description, total)

    w = Workspace.at(ws)
    cfg = CollectConfig(model=str(tiny_model_dir), epochs=2, batch_size=16, lr=1e-3, max_length=24, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        collect_losses(
            cfg,
            train_path=w.train,
            manifest_path=w.manifest,
            losses_path=w.losses,
            stage1_dir=w.stage1,
            cache_dir=w.cache,
            progress=StopAtEpoch2(),
        )
    states = list((w.stage1 / "state").glob("state.pt"))
    assert len(states) == 1
    marker = tmp_path / "pwned"
    torch.save({"meta": _Evil(marker)}, states[0])
    before = snapshot(ws)
    r = runner.invoke(app, ["collect-losses", "-w", str(ws), "--model", str(tiny_model_dir), *COLLECT, "--epochs", "2"])
    line = check_one_line_error(r, 1, "resume state")
    assert "--overwrite" in line
    assert not marker.exists()
    assert snapshot(ws) == before


def test_loaders_are_safe_by_construction() -> None:
    """Every torch.load in the package is weights_only=True; remote code and pickle weights only on request;
    models are built in one place (modeling.load_classifier, which passes use_safetensors)."""
    import ast

    import mlrnet_cli

    pkg = Path(mlrnet_cli.__file__).parent
    loads, model_builders = 0, []
    for path in sorted(pkg.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(pkg)}:{node.lineno}"
            if node.func.attr == "load" and getattr(node.func.value, "id", None) == "torch":
                loads += 1
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
            if "trust_remote_code" in kw:
                assert not (isinstance(kw["trust_remote_code"], ast.Constant) and kw["trust_remote_code"].value), where
            if node.func.attr == "from_pretrained" and "Model" in getattr(node.func.value, "id", ""):
                model_builders.append(where)
                assert "use_safetensors" in kw or any(k.arg is None for k in node.keywords), where
    assert loads >= 1  # the engine's checkpoint (collect-losses and train)
    assert all(w.startswith("modeling.py") for w in model_builders), model_builders
    src = (pkg / "modeling.py").read_text()
    assert '"use_safetensors": None if allow_pickle else True' in src


@pytest.mark.parametrize("command", ["collect-losses", "train"])
def test_overwrite_with_a_bad_model_keeps_the_old_outputs(
    command: str, tmp_path: Path, done_ws: Path, tiny_model_dir: Path
) -> None:
    """`--overwrite` replaces outputs only once the new run can start: a bad --model deletes nothing."""
    ws = tmp_path / "ws"
    shutil.copytree(done_ws, ws)
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "readme.txt").write_text("hello")
    extra = COLLECT if command == "collect-losses" else TRAIN
    before = snapshot(ws)
    r = runner.invoke(app, [command, "-w", str(ws), "--model", str(tmp_path / "not-a-model"), *extra, "--overwrite"])
    check_one_line_error(r, 1, "not-a-model")
    assert snapshot(ws) == before
