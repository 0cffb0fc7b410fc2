"""Data-parallel runs on CPU (gloo, 2 processes): sharding helpers, torchrun collect-losses, spawned train."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, make_workspace
from test_collect import write_tiny_workspace

from mlrnet_cli import artifacts, distributed
from mlrnet_cli.collect import CollectConfig, _Stats, collect_losses
from mlrnet_cli.workspace import Workspace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_dropout_model(folder: Path) -> Path:
    """The tiny BERT with dropout 0: its updates then depend only on which rows a step sees, not on which
    rank draws which dropout mask, so 1 and 2 ranks can be compared value for value."""
    build_tiny_model(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# ---------------------------------------------------------------------------------------------
# helpers, single process


def test_shard_batches_cover_each_global_batch_disjointly() -> None:
    perm = torch.randperm(49, generator=torch.Generator().manual_seed(0))
    per_rank = [distributed.shard_batches(perm, 4, rank_=r, world=2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == distributed.num_steps(49, 4, world=2) == 7
    for step, (a, b) in enumerate(zip(*per_rank, strict=True)):
        glob = perm[step * 8 : (step + 1) * 8]
        real = [s.rows for s in (a, b) if not s.is_placeholder]
        assert torch.equal(torch.cat(real), glob)  # disjoint, in order, the single-process batch of 8
        assert a.share + b.share == pytest.approx(2.0)  # DDP's mean over ranks = the global batch's mean
    last_a, last_b = per_rank[0][-1], per_rank[1][-1]  # 49 = 6*8 + 1: one row, rank 1 gets a stand-in
    assert last_a.share == 2.0 and last_b.is_placeholder and last_b.global_size == 1
    one = distributed.shard_batches(perm, 8)  # one process: plain consecutive batches, share 1
    assert all(s.share == 1.0 for s in one) and torch.equal(torch.cat([s.rows for s in one]), perm)


def test_helpers_are_identities_in_one_process() -> None:
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum(t) is t
    g = [torch.ones(2)]
    distributed.all_reduce_mean_(g, 0.5)
    assert torch.equal(g[0], torch.ones(2))
    out = distributed.gather_rows(torch.tensor([2, 0]), torch.tensor([5.0, 7.0]), 3)
    assert torch.equal(out, torch.tensor([7.0, 0.0, 5.0]))
    assert torch.equal(distributed.split_evenly(5, rank_=1, world=2), torch.tensor([3, 4]))
    assert distributed.init_from_env() is False  # no WORLD_SIZE: never touches torch.distributed


def test_sync_free_stats_match_exact_stats() -> None:
    """The CUDA (sync-free, masked sums) and CPU (boolean-indexed) statistics agree."""
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(10, 4, generator=g), torch.randint(0, 4, (10,), generator=g)
    yt = torch.where(torch.arange(10) % 3 == 0, -1, torch.randint(0, 4, (10,), generator=g))
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    rows = []
    for sync_free in (False, True):
        st = _Stats(torch.device("cpu"), sync_free=sync_free)
        st.add(logits, per, y, yt)
        st.add(logits[:4], per[:4], y[:4], None)
        rows.append(st.row(1, "train"))
    assert rows[0].keys() == rows[1].keys()
    for k, v in rows[0].items():
        if isinstance(v, str):
            assert v == rows[1][k], k
        else:
            assert v == pytest.approx(rows[1][k], rel=1e-6), k


# ---------------------------------------------------------------------------------------------
# 2 processes


@pytest.mark.parametrize(
    ("args", "code", "stdout", "stderr"),
    [
        (["--version"], 0, "mlrnet ", ""),
        # WORLD_SIZE without torchrun's other variables: the one-line usage error, exit 2
        (["collect-losses", "-w", "nowhere"], 2, "", "mlrnet: error: WORLD_SIZE > 1 but"),
    ],
)
def test_a_torchrun_worker_exits_with_its_code_and_flushed_output(
    tmp_path: Path, args: list[str], code: int, stdout: str, stderr: str
) -> None:
    """Under WORLD_SIZE > 1 main() ends with os._exit (no interpreter finalisation, where gloo could abort):
    the exit code, stdout and the error line must still come out."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", HF_HUB_OFFLINE="1", MLRNET_DEBUG="")
    proc = subprocess.run(
        [sys.executable, "-m", "mlrnet_cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.startswith(stdout)
    assert stderr in proc.stderr


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MLRNET_DEBUG="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    cmd += ["-m", "mlrnet_cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_rank_collect_losses_matches_one_rank(tmp_path: Path) -> None:
    """torchrun, 2 ranks × batch 4 against 1 process × batch 8 (same global batch) on 49 rows, so the last
    global batch has 1 row and rank 1 runs it as a zero-weight stand-in. Dropout is off (see
    _no_dropout_model): with it, the ranks' dropout streams differ from the single process's and the runs
    diverge by design. record=train exercises the gather of the training forward's losses, record=eval
    adds the sharded no-dropout pass of every epoch."""
    model = _no_dropout_model(tmp_path / "model")
    one = write_tiny_workspace(tmp_path / "one", n=49)
    two = write_tiny_workspace(tmp_path / "two", n=49)
    common = ["--model", str(model), "--epochs", "2", "--lr", "1e-3", "--max-length", "16", "--device", "cpu"]
    proc = _torchrun(["collect-losses", "-w", str(two.root), "--batch-size", "4", *common], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(two.losses), str(two.stage1)]  # rank 0 alone prints the artifacts
    ref = collect_losses(
        CollectConfig(model=str(model), epochs=2, lr=1e-3, batch_size=8, max_length=16, device="cpu"),
        train_path=one.train,
        manifest_path=one.manifest,
        losses_path=one.losses,
        stage1_dir=one.stage1,
        cache_dir=one.cache,
    )
    got, meta = artifacts.read_tensors(two.losses)
    want, _ = artifacts.read_tensors(ref.losses_path)
    assert torch.equal(got["sample_id"], want["sample_id"])  # same layout: table (sample_id) order
    assert got["losses"].shape == (49, 3)
    torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-4, atol=1e-5)
    assert meta["config"]["batch_size"] == 4
    hist = json.loads((two.stage1 / "history.json").read_text())["epochs"]
    assert [r["epoch"] for r in hist] == [0, 1, 2]
    assert hist[-1]["loss"] == pytest.approx(ref.history[-1]["loss"], rel=1e-4)
    assert not (two.stage1 / "state").exists()


def _train_worker(
    rank: int,
    world: int,
    port: int,
    ws: str,
    model: str,
    out: str,
    method: str = "mlrnet",
    share: float = 0.0,
    at: str = "w",
) -> None:
    """One rank of a spawned `train` run: the library call, then this rank's meta-net and classifier."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    import mlrnet_cli.modeling as modeling
    import mlrnet_cli.train as train_mod
    from mlrnet_cli.train import TrainConfig

    made: dict[str, torch.nn.Module] = {}
    net_class = "LabelCorrectionNet" if method == "mlc" else "MLRNetMetaNet"
    make_net, load = getattr(train_mod, net_class), modeling.load_classifier

    def spy_net(*a, **k):  # noqa: ANN002, ANN003, ANN202
        made["meta_net"] = make_net(*a, **k)
        return made["meta_net"]

    def spy_load(*a, **k):  # noqa: ANN002, ANN003, ANN202
        made["model"] = load(*a, **k)
        return made["model"]

    setattr(train_mod, net_class, spy_net)
    modeling.load_classifier = spy_load
    with distributed.session(timeout_s=120):
        result = train_mod.train(
            TrainConfig(
                method=method,
                epochs=2,
                batch_size=6,
                meta_per_class=4,
                max_length=24,
                device="cpu",
                model=model,
                label_emb_dim=8,
                df_dim=8,
                meta_share=share,
                meta_share_at=at,
            ),
            workdir=ws,
        )
        torch.save(
            {
                "meta_net": made["meta_net"].state_dict(),
                "model": made["model"].state_dict(),
                "epochs_run": result.epochs_run,
                "history": result.history,
            },
            Path(out) / f"rank{rank}.pt",
        )
    # leave as the CLI's torchrun workers do (cli._leave_torchrun_worker): gloo can abort in interpreter shutdown
    os._exit(0)


@pytest.mark.parametrize(
    ("method", "share", "at"),
    [
        ("mlrnet", 0.0, "w"),
        ("mlrnet", 0.5, "w"),
        ("mlrnet", 0.5, "w-hat"),
        pytest.param("mlc", 0.0, "w", marks=pytest.mark.slow),
    ],
)
def test_two_rank_train_runs_and_keeps_ranks_identical(
    tmp_path: Path, tiny_model_dir: Path, method: str, share: float, at: str
) -> None:
    """Spawned 2-rank MLRNet (and MLC) run: to the end, the meta-net (θ gradients averaged by all_reduce) and the
    classifier (DDP) hold bit-identical parameters on both ranks, and rank 0 wrote the artifacts. With
    --meta-share the meta rows go through the same DDP forward as the training rows (one forward per backward);
    with --meta-share-at w-hat each rank's g_meta term is all-reduced with the rest of the real step's gradient."""
    from test_train import write_losses

    ws = make_workspace(tmp_path / "ws")
    write_losses(ws, tiny_model_dir)
    torch.multiprocessing.spawn(
        _train_worker,
        args=(2, _free_port(), str(ws), str(tiny_model_dir), str(tmp_path), method, share, at),
        nprocs=2,
        join=True,
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["epochs_run"] == r1["epochs_run"] == 2
    for part in ("meta_net", "model"):
        assert r0[part].keys() == r1[part].keys()
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)
    init = Workspace.at(ws)
    assert (init.model / "last" / "meta_net.safetensors").is_file() and (init.model / "history.arrow").is_file()
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in r0["history"] + r1["history"]]
    assert strip[:2] == strip[2:]  # statistics were summed over the ranks the same way
    saved, meta = artifacts.read_tensors(init.model / "last" / "meta_net.safetensors")
    assert meta["config"].get("meta_share", 0.0) == share and meta["config"].get("meta_share_at", "w") == at
    for k, v in saved.items():
        assert torch.equal(v, r0["meta_net"][k]), k


@pytest.mark.gpu
def test_gpu_compiled_stage1_matches_eager(tmp_path: Path) -> None:
    """One GPU: bf16 autocast + pinned copies, with and without --compile give the same curves (bf16 tolerance).
    Dropout is off: compiled dropout draws its masks from another random stream."""
    model = _no_dropout_model(tmp_path / "model")
    cfg = CollectConfig(model=str(model), epochs=2, lr=1e-3, batch_size=8, max_length=16, device="cuda")
    curves = []
    for name, compile_forward in (("eager", False), ("compiled", True)):
        ws = write_tiny_workspace(tmp_path / name)
        res = collect_losses(
            CollectConfig(**{**cfg.__dict__, "compile": compile_forward}),
            train_path=ws.train,
            manifest_path=ws.manifest,
            losses_path=ws.losses,
            stage1_dir=ws.stage1,
            cache_dir=ws.cache,
        )
        curves.append(artifacts.read_tensors(res.losses_path)[0]["losses"])
    assert torch.isfinite(curves[1]).all()
    torch.testing.assert_close(curves[1], curves[0], rtol=0.05, atol=0.05)
