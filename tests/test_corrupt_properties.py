"""Property tests for `corrupt`: for any valid class sizes, imbalance and noise spec."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlrnet_cli.artifacts import read_table
from mlrnet_cli.corrupt import CorruptConfig, InputSpec, NoiseSpec, corrupt, imbalance_profile

noise_specs = st.one_of(
    st.just("none"),
    st.tuples(st.sampled_from(["uniform", "flip", "pair"]), st.floats(0, 1)).map(lambda t: f"{t[0]}:{t[1]:.3f}"),
)


@st.composite
def settings_(draw: st.DrawFn) -> tuple[list[int], int, float, str, int, int, float]:
    c = draw(st.integers(2, 6))
    pool = draw(st.integers(1, 5))
    n_max = draw(st.integers(1, 30))
    imbalance = draw(st.floats(1, 2 * n_max - 1, allow_nan=False)) if n_max > 1 else 1.0
    profile = imbalance_profile(n_max, imbalance, c)
    test_fraction = draw(st.sampled_from([0.0, 0.2, 0.5]))
    # every class has at least the rows it needs after the test split (rounding takes at most half a row more)
    sizes = [math.ceil((pool + max(profile) + draw(st.integers(0, 10)) + 0.5) / (1 - test_fraction)) for _ in range(c)]
    return sizes, pool, imbalance, draw(noise_specs), n_max, draw(st.integers(0, 2**16)), test_fraction


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(settings_())
def test_corrupt_properties(s: tuple[list[int], int, float, str, int, int, float]) -> None:
    sizes, pool, imbalance, noise, n_max, seed, test_fraction = s
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        labels = np.repeat(np.arange(len(sizes)), sizes)
        pq.write_table(
            pa.table({"text": [f"row {i}" for i in range(len(labels))], "label": labels}), tmp_path / "src.parquet"
        )
        cfg = CorruptConfig(
            imbalance=imbalance,
            n_max=n_max,
            noise=NoiseSpec.parse(noise),
            meta_pool_per_class=pool,
            seed=seed,
            test_fraction=test_fraction,
        )
        a = corrupt(cfg, InputSpec(data=str(tmp_path / "src.parquet")), tmp_path / "a")
        b = corrupt(cfg, InputSpec(data=str(tmp_path / "src.parquet")), tmp_path / "b")

        assert a.manifest["counts"]["train_true"] == imbalance_profile(n_max, imbalance, len(sizes))
        train, clean = read_table(a.paths["train"]), read_table(a.paths["clean"])
        assert not set(train["sample_id"].to_pylist()) & set(clean["sample_id"].to_pylist())
        assert clean.num_rows == pool * len(sizes)
        if test_fraction:
            test_ids = set(read_table(a.paths["test"])["sample_id"].to_pylist())
            assert not test_ids & (set(train["sample_id"].to_pylist()) | set(clean["sample_id"].to_pylist()))
            assert a.manifest["counts"]["test"] == [math.floor(n * test_fraction + 0.5) for n in sizes]
        else:
            assert "test" not in a.paths
        matrix = np.asarray(a.manifest["noise"]["realised"]["matrix"])
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
        for k in a.paths:
            assert a.paths[k].read_bytes() == b.paths[k].read_bytes()
