"""`mlrnet corrupt`: the imbalance profile, the noise matrices, the artifacts, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mlrnet_cli.artifacts import fingerprint_file, read_table, table_meta
from mlrnet_cli.cli import app
from mlrnet_cli.corrupt import (
    CorruptConfig,
    InputSpec,
    NoiseSpec,
    apply_noise,
    corrupt,
    corruption_matrix,
    imbalance_profile,
    realised_noise,
)
from mlrnet_cli.errors import ConfigError, DataError

runner = CliRunner()


def synthetic_table(path: Path, per_class: list[int], string_labels: bool = False, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    labels, texts = [], []
    for k, n in enumerate(per_class):
        for j in range(n):
            labels.append(f"c{k}" if string_labels else k)
            texts.append(f"class {k} row {j} word{rng.integers(1000)}")
    order = rng.permutation(len(labels))
    table = pa.table(
        {"text": [texts[i] for i in order], "label": [labels[i] for i in order], "title": [f"t{i}" for i in order]}
    )
    pq.write_table(table, path)
    return path


# --- pure functions ---------------------------------------------------------------------------


def test_profile_exact_counts() -> None:
    assert imbalance_profile(1200, 100, 4) == [1200, 259, 56, 12]
    assert imbalance_profile(600, 20, 4) == [600, 221, 81, 30]
    assert imbalance_profile(500, 1, 3) == [500, 500, 500]
    prof = imbalance_profile(1000, 50, 10)
    assert prof[0] == 1000 and prof[-1] == 20 and all(a >= b for a, b in zip(prof, prof[1:], strict=False))


def test_profile_rejects_imbalance_below_one() -> None:
    with pytest.raises(ConfigError):
        imbalance_profile(100, 0.5, 4)


@pytest.mark.parametrize("spec", ["uniform:0.4", "flip:0.3", "pair:0.5", "none"])
def test_matrix_rows_sum_to_one(spec: str) -> None:
    m = corruption_matrix(NoiseSpec.parse(spec), 5, np.random.default_rng(0))
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    assert (m >= 0).all()


def test_uniform_matrix_matches_paper() -> None:
    m = corruption_matrix(NoiseSpec("uniform", 0.4), 4, np.random.default_rng(0))
    assert m[0, 0] == pytest.approx(1 - 0.4 + 0.4 / 4)
    assert m[0, 1] == pytest.approx(0.1)


def test_flip_targets_differ_from_source_and_are_seeded() -> None:
    for seed in range(20):
        m = corruption_matrix(NoiseSpec("flip", 0.4), 6, np.random.default_rng(seed))
        for i in range(6):
            off = [j for j in range(6) if j != i and m[i, j] > 0]
            assert len(off) == 1 and m[i, off[0]] == pytest.approx(0.4) and m[i, i] == pytest.approx(0.6)
    a = corruption_matrix(NoiseSpec("flip", 0.4), 6, np.random.default_rng(3))
    b = corruption_matrix(NoiseSpec("flip", 0.4), 6, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_pair_targets_next_class() -> None:
    m = corruption_matrix(NoiseSpec("pair", 0.3), 4, np.random.default_rng(0))
    for i in range(4):
        assert m[i, (i + 1) % 4] == pytest.approx(0.3)


@pytest.mark.parametrize(("spec", "expected"), [("uniform:0.4", 0.4 * 3 / 4), ("flip:0.4", 0.4), ("pair:0.2", 0.2)])
def test_realised_rate_within_binomial_tolerance(spec: str, expected: float) -> None:
    n, c = 20_000, 4
    rng = np.random.default_rng(1)
    true = rng.integers(0, c, n)
    matrix = corruption_matrix(NoiseSpec.parse(spec), c, rng)
    obs = apply_noise(true, matrix, rng)
    rate = (obs != true).mean()
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    real = realised_noise(true, obs, c)
    np.testing.assert_allclose(np.asarray(real["matrix"]).sum(axis=1), 1.0)
    np.testing.assert_allclose(np.asarray(real["matrix"]), matrix, atol=0.03)


@pytest.mark.parametrize("bad", ["uniform:1.5", "gaussian:0.2", "uniform", "flip:-0.1", "unif0.4", "pair:abc"])
def test_noise_spec_typos(bad: str) -> None:
    with pytest.raises(ConfigError):
        NoiseSpec.parse(bad)


# --- the library call --------------------------------------------------------------------------


def test_embedded_default_exact_profile(tmp_path: Path) -> None:
    res = corrupt(CorruptConfig(imbalance=20, noise=NoiseSpec.parse("uniform:0.4")), InputSpec(), tmp_path)
    m = res.manifest
    assert m["counts"]["train_true"] == [600, 221, 81, 30]
    assert m["counts"]["clean"] == [500] * 4
    train, clean = read_table(res.paths["train"]), read_table(res.paths["clean"])
    assert train.num_rows == 932
    assert not set(train["sample_id"].to_pylist()) & set(clean["sample_id"].to_pylist())
    assert len(set(train["sample_id"].to_pylist())) == train.num_rows
    is_noisy = np.asarray(train["is_noisy"].to_pylist())
    assert (is_noisy == (np.asarray(train["label"]) != np.asarray(train["true_label"]))).all()
    assert m["noise"]["realised"]["rate"] == pytest.approx(is_noisy.mean())
    assert 0.2 < is_noisy.mean() < 0.4
    assert clean["label"].to_pylist() == clean["true_label"].to_pylist()
    meta = table_meta(train)
    assert meta["stage"] == "corrupt" and meta["config"]["imbalance"] == 20 and meta["seed"] == 0
    assert meta["inputs"]["data"] and meta["format_version"] == 1
    assert m["fingerprints"]["train"] == fingerprint_file(res.paths["train"])


def test_deterministic_bytes(tmp_path: Path) -> None:
    cfg = CorruptConfig(imbalance=10, noise=NoiseSpec.parse("flip:0.3"), seed=7, meta_pool_per_class=100)
    a = corrupt(cfg, InputSpec(), tmp_path / "a")
    b = corrupt(cfg, InputSpec(), tmp_path / "b")
    for k in a.paths:
        assert a.paths[k].read_bytes() == b.paths[k].read_bytes(), k
    c = corrupt(
        CorruptConfig(imbalance=10, noise=NoiseSpec.parse("flip:0.3"), seed=8, meta_pool_per_class=100),
        InputSpec(),
        tmp_path / "c",
    )
    assert a.paths["train"].read_bytes() != c.paths["train"].read_bytes()


def test_string_labels_are_mapped_and_recorded(tmp_path: Path) -> None:
    src = synthetic_table(tmp_path / "s.parquet", [60, 50, 40], string_labels=True)
    res = corrupt(
        CorruptConfig(imbalance=4, meta_pool_per_class=10, noise=NoiseSpec.parse("pair:0.2"), test_fraction=0),
        InputSpec(data=str(src)),
        tmp_path / "out",
    )
    assert res.manifest["class_names"] == ["c0", "c1", "c2"]
    assert res.manifest["counts"]["train_true"] == [30, 15, 8]
    train = read_table(res.paths["train"])
    assert set(train["label"].to_pylist()) <= {0, 1, 2}
    assert "orig_text" not in train.column_names and "title" in train.column_names
    assert "test" not in res.paths  # a single file has no test split, and --test-fraction 0 holds none out


def test_class_order_puts_named_class_at_head(tmp_path: Path) -> None:
    src = synthetic_table(tmp_path / "s.parquet", [40, 40, 40])
    res = corrupt(
        CorruptConfig(imbalance=4, meta_pool_per_class=5, class_order="2,0,1", test_fraction=0),
        InputSpec(data=str(src)),
        tmp_path / "out",
    )
    assert res.manifest["counts"]["train_true"] == [18, 9, 35]


def test_own_data_holds_out_a_stratified_test_split_first(tmp_path: Path) -> None:
    src = synthetic_table(tmp_path / "s.parquet", [60, 50, 40])
    res = corrupt(
        CorruptConfig(imbalance=4, meta_pool_per_class=5, noise=NoiseSpec.parse("uniform:0.5")),
        InputSpec(data=str(src)),
        tmp_path / "a",
    )
    m = res.manifest
    assert m["test_fraction"] == 0.2 and m["counts"]["test"] == [12, 10, 8]  # 20 % of each class, by label
    assert m["source"]["test"] == f"{src} (held out)"
    assert table_meta(read_table(res.paths["test"]))["config"]["test_fraction"] == 0.2
    test, train, clean = (read_table(res.paths[k]) for k in ("test", "train", "clean"))
    ids = {k: set(t["sample_id"].to_pylist()) for k, t in (("test", test), ("train", train), ("clean", clean))}
    assert not ids["test"] & (ids["train"] | ids["clean"])
    assert test["label"].to_pylist() == test["true_label"].to_pylist()  # the test split is never corrupted
    source = pq.read_table(src)
    assert [source["label"][i].as_py() for i in test["sample_id"].to_pylist()] == test["label"].to_pylist()
    # held out before the pool, the imbalance and the noise are drawn: another bias keeps the same test rows
    other = corrupt(
        CorruptConfig(imbalance=2, meta_pool_per_class=9, noise=NoiseSpec.parse("flip:0.3")),
        InputSpec(data=str(src)),
        tmp_path / "b",
    )
    assert other.paths["test"].read_bytes() != res.paths["test"].read_bytes()  # its metadata names its config
    assert read_table(other.paths["test"])["sample_id"].to_pylist() == test["sample_id"].to_pylist()
    again = corrupt(
        CorruptConfig(imbalance=4, meta_pool_per_class=5, noise=NoiseSpec.parse("uniform:0.5")),
        InputSpec(data=str(src)),
        tmp_path / "c",
    )
    assert all(again.paths[k].read_bytes() == res.paths[k].read_bytes() for k in res.paths)
    seed1 = corrupt(CorruptConfig(imbalance=4, meta_pool_per_class=5, seed=1), InputSpec(data=str(src)), tmp_path / "d")
    assert read_table(seed1.paths["test"])["sample_id"].to_pylist() != test["sample_id"].to_pylist()


def test_test_fraction_zero_writes_no_test_split_and_eval_says_why(tmp_path: Path, tiny_model_dir: Path) -> None:
    src = synthetic_table(tmp_path / "s.parquet", [20, 20, 20, 20])
    ws = tmp_path / "ws"
    r = runner.invoke(
        app, ["corrupt", "-w", str(ws), "--data", str(src), "--meta-pool-per-class", "4", "--test-fraction", "0"]
    )
    assert r.exit_code == 0, r.output
    assert not (ws / "data" / "test.arrow").exists()
    assert json.loads((ws / "data" / "manifest.json").read_text())["test_fraction"] == 0
    r = runner.invoke(app, ["eval", "-w", str(ws), "--model", str(tiny_model_dir), "--device", "cpu"])
    assert r.exit_code == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "--test-fraction was 0" in err[0] and "run `mlrnet corrupt` first" not in err[0], err
    assert "--test-data" in err[0] and "--data" in err[0]


def test_text_columns_joined(tmp_path: Path) -> None:
    src = synthetic_table(tmp_path / "s.parquet", [20, 20])
    res = corrupt(
        CorruptConfig(meta_pool_per_class=2), InputSpec(data=str(src), text_columns=("title", "text")), tmp_path / "out"
    )
    row = read_table(res.paths["train"]).slice(0, 1).to_pylist()[0]
    assert row["text"].startswith(row["title"] + " class")


def test_real_noise_with_clean_data_and_truth(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    true = rng.integers(0, 3, 90)
    noisy = np.where(rng.random(90) < 0.3, (true + 1) % 3, true)
    pq.write_table(
        pa.table(
            {"sentence": [f"s{i}" for i in range(90)], "label": [str(x) for x in noisy], "gold": [str(x) for x in true]}
        ),
        tmp_path / "noisy.parquet",
    )
    pq.write_table(
        pa.table({"sentence": [f"c{i}" for i in range(15)], "label": [str(i % 3) for i in range(15)]}),
        tmp_path / "clean.parquet",
    )
    res = corrupt(
        CorruptConfig(meta_pool_per_class=5, test_fraction=0),
        InputSpec(
            data=str(tmp_path / "noisy.parquet"), clean_data=str(tmp_path / "clean.parquet"), true_label_column="gold"
        ),
        tmp_path / "out",
    )
    train = read_table(res.paths["train"])
    assert train.num_rows == 90  # nothing taken from train for the pool
    assert train["label"].to_pylist() == [int(x) for x in noisy]
    assert train["is_noisy"].to_pylist() == list(noisy != true)
    clean = read_table(res.paths["clean"])
    assert clean.num_rows == 15 and min(clean["sample_id"].to_pylist()) >= 90


def test_truth_unknown_gives_null_columns(tmp_path: Path) -> None:
    src = synthetic_table(tmp_path / "s.parquet", [20, 20])
    clean = synthetic_table(tmp_path / "c.parquet", [5, 5], seed=1)
    res = corrupt(
        CorruptConfig(meta_pool_per_class=5), InputSpec(data=str(src), clean_data=str(clean)), tmp_path / "out"
    )
    train = read_table(res.paths["train"])
    assert train["true_label"].null_count == train.num_rows and train["is_noisy"].null_count == train.num_rows
    assert res.manifest["truth_known"] is False


def test_clean_data_pool_defaults_to_the_whole_table(tmp_path: Path) -> None:
    src = synthetic_table(tmp_path / "s.parquet", [20, 20])
    clean = synthetic_table(tmp_path / "c.parquet", [7, 3], seed=1)
    res = corrupt(CorruptConfig(), InputSpec(data=str(src), clean_data=str(clean)), tmp_path / "out")
    assert res.manifest["counts"]["clean"] == [7, 3]  # no --meta-pool-per-class to lower by hand
    assert table_meta(read_table(res.paths["clean"]))["config"]["meta_pool_per_class"] is None
    with pytest.raises(DataError, match="fewer than 4 rows for class"):  # an explicit size it cannot reach
        corrupt(
            CorruptConfig(meta_pool_per_class=4), InputSpec(data=str(src), clean_data=str(clean)), tmp_path / "out2"
        )


def test_loads_with_plain_pyarrow_and_datasets(tmp_path: Path) -> None:
    import datasets

    res = corrupt(CorruptConfig(imbalance=5, meta_pool_per_class=50), InputSpec(), tmp_path)
    for k in ("train", "clean", "test"):
        with pa.memory_map(str(res.paths[k])) as src:
            t = pa.ipc.open_stream(src).read_all()
        assert {"sample_id", "text", "label"} <= set(t.column_names)
        ds = datasets.Dataset.from_file(str(res.paths[k]))
        assert ds.num_rows == t.num_rows
        assert ds.features["label"].names == ["World", "Sports", "Business", "Sci/Tech"]
    ds = datasets.load_dataset("arrow", data_files=str(res.paths["train"]), split="train")
    assert ds.num_rows == read_table(res.paths["train"]).num_rows


def test_refuses_to_replace_other_run_and_own_input(tmp_path: Path) -> None:
    corrupt(CorruptConfig(imbalance=5, meta_pool_per_class=50), InputSpec(), tmp_path)
    before = (tmp_path / "train.arrow").read_bytes()
    from mlrnet_cli.errors import ArtifactExistsError, UsageError

    with pytest.raises(ArtifactExistsError):
        corrupt(CorruptConfig(imbalance=6, meta_pool_per_class=50), InputSpec(), tmp_path)
    assert (tmp_path / "train.arrow").read_bytes() == before
    corrupt(CorruptConfig(imbalance=5, meta_pool_per_class=50), InputSpec(), tmp_path)  # same run: fine
    corrupt(CorruptConfig(imbalance=6, meta_pool_per_class=50), InputSpec(), tmp_path, overwrite=True)
    with pytest.raises(UsageError):
        corrupt(
            CorruptConfig(meta_pool_per_class=5),
            InputSpec(data=str(tmp_path / "train.arrow")),
            tmp_path,
            overwrite=True,
        )


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_default_chain_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["corrupt", "--imbalance", "20", "--noise", "uniform:0.4"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines == [f"mlrnet-work/data/{n}" for n in ("train.arrow", "clean.arrow", "test.arrow", "manifest.json")]
    m = json.loads((tmp_path / "mlrnet-work/data/manifest.json").read_text())
    assert m["counts"]["train_true"] == [600, 221, 81, 30]
    r = runner.invoke(app, ["corrupt", "--imbalance", "20", "--noise", "uniform:0.4", "--json", "--workdir", "other"])
    assert r.exit_code == 0
    payload = json.loads(r.stdout)
    assert payload["artifacts"]["train"] == "other/data/train.arrow"
    assert payload["counts"]["train_true"] == [600, 221, 81, 30]


def test_cli_workdir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLRNET_WORKDIR", str(tmp_path / "ws"))
    r = runner.invoke(app, ["corrupt", "--meta-pool-per-class", "10"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ws/data/train.arrow").is_file()


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "empty.csv").write_text("")
    (tmp / "garbage.parquet").write_bytes(b"not a parquet file at all")
    synthetic_table(tmp / "one.parquet", [30])
    synthetic_table(tmp / "small.parquet", [30, 3])
    return [
        (["--text-column", "nope"], "no column 'nope'"),
        (["--label-column", "missing"], "no label column"),
        (["--data", str(tmp / "one.parquet"), "--meta-pool-per-class", "1"], "at least 2"),
        (["--imbalance", "0.5"], "≥ 1"),
        (["--imbalance", "5000"], "0 rows"),
        (["--noise", "uniform:1.5"], "outside [0, 1]"),
        (["--noise", "gaussian:0.2"], "unknown noise kind"),
        (["--data", str(tmp / "empty.csv")], "empty"),
        (["--data", str(tmp / "garbage.parquet")], "cannot read"),
        (["--data", str(tmp / "small.parquet"), "--meta-pool-per-class", "5"], "fewer than the clean pool"),
        (["--data", str(tmp / "nope.csv")], "no such file"),
        (["--meta-pool-per-class", "0"], "--meta-pool-per-class must be ≥ 1"),
        (
            ["--data", str(tmp / "small.parquet"), "--meta-pool-per-class", "1", "--test-fraction", "1"],
            "--test-fraction must be in [0, 1)",
        ),
    ]


def test_cli_bad_inputs_one_line_exit_1_nothing_written(tmp_path: Path) -> None:
    for args, needle in _bad_inputs(tmp_path):
        ws = tmp_path / "ws"
        r = runner.invoke(app, ["corrupt", "--workdir", str(ws), *args])
        assert r.exit_code == 1, (args, r.output)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mlrnet: error:") and needle in err[0], (args, err)
        assert "Traceback" not in r.output
        assert not ws.exists(), args


def test_cli_unbuilt_and_version() -> None:
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("mlrnet ")
