"""The benchmark scripts' own logic: grid layout, the report table, the meta-step timing child."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import fidelity  # noqa: E402
import meta_step  # noqa: E402


def _offline(monkeypatch: pytest.MonkeyPatch, fake_run: Callable[[list[str], Path, dict[str, str]], dict]) -> None:
    """fidelity.py with ``fake_run`` for every CLI call, and no data or model to prepare."""
    monkeypatch.setattr(fidelity, "run", fake_run)
    monkeypatch.setattr(
        fidelity, "prepare_data", lambda out, budget, data_root=None: (out / "train.pq", out / "test.pq")
    )
    monkeypatch.setattr(fidelity, "minilm_path", lambda: "minilm")


def test_grids_share_corrupted_data_only_where_meant() -> None:
    g = fidelity.grids(3)
    head = g["headline"]
    assert sorted({(c.name, c.seed) for c in head}) == sorted((c.name, c.seed) for c in head)  # no repeats
    # the meta-set sweep (m10, m100) reuses seed 0's corrupted data and loss curves; other settings do not
    sweep = {c.base_key for c in head if c.name.startswith("IF20-u0.4") and c.seed == 0}
    assert sweep == {"if20-uniform0.4-s0"}
    assert len({c.base_key for c in head}) == 5
    frozen = {c.base_key for c in g["table1-frozen"]}
    assert all(k.endswith("-frozen") for k in frozen) and not frozen & {c.base_key for c in head}
    # the frozen cells keep the meta step their recorded results used; the full cells take the CLI defaults
    assert all(c.extra_train == ("--alpha", "1", "--meta-lr", "1e-3") for c in g["table1-frozen"])
    assert all("--alpha" not in c.extra_train and "--meta-lr" not in c.extra_train for c in head)
    cic = g["cic"]
    assert [c.base_key for c in cic] == ["cic-s0", "cic-s1", "cic-s2"]
    assert all(c.noise == "none" and c.imbalance == 1 and c.n_max is None for c in cic)
    # real noise: the clean pool comes from DataCLUE's dev table, never from the training rows
    assert all(c.extra_corrupt[c.extra_corrupt.index("--clean-data") + 1].endswith("dev.json") for c in cic)


def test_report_gives_mean_and_std_over_seeds(tmp_path: Path) -> None:
    rows = [
        {"cell": "A", "method": "plain", "seed": 0, "accuracy": 0.60, "macro_f1": 0.50},
        {"cell": "A", "method": "plain", "seed": 1, "accuracy": 0.70, "macro_f1": 0.60},
        {"cell": "A", "method": "mlrnet", "seed": 0, "accuracy": 0.80, "macro_f1": 0.75, "weight_auroc": 0.9},
        {"cell": "A", "method": "mwnet", "seed": 0, "accuracy": 0.6, "macro_f1": 0.5, "weight_auroc": 0.7},
        {"cell": "A", "method": "mwnet", "seed": 1, "accuracy": 0.7, "macro_f1": 0.6, "weight_auroc": 0.8},
    ]
    for r, (w, s1) in zip(rows[2:], [(0.9, 0.85), (0.6, 0.8), (0.7, 0.9)], strict=True):
        r |= {"weight_auroc_within_label": w, "stage1_auroc_within_label": s1}
    rows = [r | {"defaults": fidelity.DEFAULTS} for r in rows]
    rows.append(rows[0])  # a method rerun on its finished workspace appends the same row: counted once
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = fidelity.report(tmp_path).splitlines()
    assert table[2] == "| A | plain | 2 | 65.00 ± 7.07 | s0 60.00 / s1 70.00 | 55.00 ± 7.07 | - | - |"
    assert table[3] == "| A | mwnet | 2 | 65.00 ± 7.07 | s0 60.00 / s1 70.00 | 55.00 ± 7.07 | 0.750 | 0.650 / 0.850 |"
    assert table[4] == "| A | mlrnet | 1 | 80.00 | s0 80.00 | 75.00 | 0.900 | 0.900 / 0.850 |"
    # paired on the seeds both ran: only seed 0 has both, 80 - 60
    assert table[-1] == "| A | +20.00 (1/1) | +20.00 (1/1) |"  # a column per method that ran


def test_fidelity_resumes_per_method_and_runs_stage1_only_for_mlrnet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
        sub = cmd[cmd.index("mlrnet_cli") + 1]
        calls.append([sub, *cmd[cmd.index("mlrnet_cli") + 2 :]])
        if sub == "eval":
            return {"accuracy": 0.5, "macro_f1": 0.4}
        if sub == "weights":
            return {"summary": {"noise_detection": {"roc_auc": 0.8}, "groups": {"noisy": {"mean": 0.1}}}}
        return {}

    _offline(monkeypatch, fake_run)
    done = {"cell": "IF20-u0.4-m20", "method": "plain", "seed": 1, "accuracy": 0.6, "macro_f1": 0.5}
    (tmp_path / "results.jsonl").write_text(json.dumps(done) + "\n")
    base = [
        "fidelity.py",
        "--grid",
        "headline",
        "--only",
        "IF20-u0.4-m20",
        "--seeds",
        "2",
        "--seed",
        "1",
        "--out",
        str(tmp_path),
    ]

    monkeypatch.setattr(sys, "argv", [*base, "--methods", "plain", "mwnet"])
    fidelity.main()
    trains = [c for c in calls if c[0] == "train"]
    assert [c[c.index("--method") + 1] for c in trains] == ["mwnet"]  # plain was done: skipped
    assert all("-s1" in c[c.index("--workdir") + 1] for c in calls)  # --seed 1: seed 0 never runs
    assert not [c for c in calls if c[0] == "collect-losses"]  # no method that reads the curves
    assert trains[0][trains[0].index("--epochs") + 1] == "5"

    calls.clear()
    monkeypatch.setattr(sys, "argv", [*base, "--methods", "mwnet", "mlrnet"])
    fidelity.main()
    assert [c[0] for c in calls if c[0] in ("collect-losses", "train")] == ["collect-losses", "train"]
    stage1 = next(c for c in calls if c[0] == "collect-losses")
    assert stage1[stage1.index("--epochs") + 1] == "3"  # the curves keep their recorded length
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"]) for r in lines] == [("plain", 1), ("mwnet", 1), ("mlrnet", 1)]
    assert lines[2]["weight_auroc"] == 0.8 and lines[2]["budget"]["stage1_epochs"] == 3

    calls.clear()  # meta-only alone can get plain's number of steps; the other methods keep the shared budget
    monkeypatch.setattr(sys, "argv", [*base, "--methods", "meta-only", "plain-meta", "--meta-only-epochs", "100"])
    fidelity.main()
    epochs = {c[c.index("--method") + 1]: c[c.index("--epochs") + 1] for c in calls if c[0] == "train"}
    assert epochs == {"meta-only": "100", "plain-meta": "5"}
    assert any(c[c.index("--workdir") + 1].endswith("-m20-meta-only-e100") for c in calls if c[0] == "train")

    calls.clear()  # the shared-budget meta-only is another baseline: not skipped, and in its own workspace
    monkeypatch.setattr(sys, "argv", [*base, "--methods", "meta-only", "plain-meta"])
    fidelity.main()
    trains = [c for c in calls if c[0] == "train"]
    assert [(c[c.index("--method") + 1], c[c.index("--epochs") + 1]) for c in trains] == [("meta-only", "5")]
    assert trains[0][trains[0].index("--workdir") + 1].endswith("-s1-m20-meta-only")
    table = fidelity.report(tmp_path)
    assert "| IF20-u0.4-m20 | meta-only | 1 |" in table and "| IF20-u0.4-m20 | meta-only-e100 | 1 |" in table


def test_fidelity_meta_share_is_its_own_run_of_the_meta_methods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--meta-share S reaches the meta methods' train commands only, and their rows get their own key and label,
    so they neither skip nor mix with the same methods run without it."""
    trains: list[list[str]] = []

    def fake_run(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
        sub = cmd[cmd.index("mlrnet_cli") + 1]
        if sub == "train":
            trains.append(cmd)
        if sub != "eval":
            return {}
        share = "--meta-share" in trains[-1]
        return {"accuracy": 0.7 if share else 0.6, "macro_f1": 0.5}

    _offline(monkeypatch, fake_run)
    base = ["fidelity.py", "--only", "IF20-u0.4-m20", "--seeds", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*base, "--methods", "plain", "mlrnet"])
    fidelity.main()
    assert not any("--meta-share" in c for c in trains)
    trains.clear()
    monkeypatch.setattr(sys, "argv", [*base, "--methods", "plain", "mwnet", "mlrnet", "--meta-share", "0.5"])
    fidelity.main()
    got = {c[c.index("--method") + 1]: c for c in trains}
    assert list(got) == ["mwnet", "mlrnet"]  # plain does not take it: its run without the flag counts
    for m, c in got.items():
        assert c[c.index("--meta-share") + 1] == "0.5" and c[c.index("--workdir") + 1].endswith(f"-{m}-share0.5-d2")
    rows = fidelity.read_results(tmp_path / "results.jsonl")
    assert [fidelity.row_key(r)[2] for r in rows] == ["plain", "mlrnet", "mwnet-share0.5", "mlrnet-share0.5"]
    assert rows[-1]["budget"]["meta_share"] == 0.5 and rows[0]["budget"]["meta_share"] is None
    table = fidelity.report(tmp_path).splitlines()
    assert "| IF20-u0.4-m20 | mlrnet | 1 | 60.00 | s0 60.00 | 50.00 | - | - |" in table
    assert "| IF20-u0.4-m20 | mlrnet-share0.5 | 1 | 70.00 | s0 70.00 | 50.00 | - | - |" in table
    assert (
        "mlrnet-share0.5 minus each method, test accuracy points, on the seeds both ran (mean; wins / seeds):" in table
    )
    # columns: the labels that ran but the reference: plain, mwnet-share0.5, mlrnet
    assert table[-1] == "| IF20-u0.4-m20 | +10.00 (1/1) | +0.00 (0/1) | +10.00 (1/1) |"
    trains.clear()
    fidelity.main()  # all done: nothing reruns
    assert trains == []


def test_fidelity_auto_meta_share_is_its_own_run_and_records_the_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trains: list[list[str]] = []

    def fake_run(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
        sub = cmd[cmd.index("mlrnet_cli") + 1]
        if sub == "train":
            trains.append(cmd)
            return {"best_dev_accuracy": 0.8, "meta_share_choice": {"chosen": 0.0, "candidates": {}}}
        return {"accuracy": 0.6, "macro_f1": 0.5} if sub == "eval" else {}

    _offline(monkeypatch, fake_run)
    argv = ["fidelity.py", "--only", "IF20-u0.4-m20", "--seeds", "1", "--out", str(tmp_path), "--methods", "mlrnet"]
    monkeypatch.setattr(sys, "argv", [*argv, "--meta-share", "auto"])
    fidelity.main()
    (cmd,) = trains
    assert cmd[cmd.index("--meta-share") + 1] == "auto"
    (row,) = fidelity.read_results(tmp_path / "results.jsonl")
    assert fidelity.row_key(row)[2] == "mlrnet-shareauto" and row["budget"]["meta_share"] == "auto"
    assert row["meta_share_chosen"] == 0.0 and row["dev_accuracy"] == 0.8


def test_fidelity_curve_prior_is_its_own_run_of_mlrnet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--curve-prior B reaches mlrnet's train command only, labelled mlrnet-priorB (B = 0 included: the paper's
    net run explicitly beside a changed default), and the row keeps the within-label detection figures."""
    trains: list[list[str]] = []

    def fake_run(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
        sub = cmd[cmd.index("mlrnet_cli") + 1]
        if sub == "train":
            trains.append(cmd)
        if sub == "weights":
            det = {"roc_auc": 0.7, "within_label": {"roc_auc": 0.9}, "stage1_loss": {"within_label": {"roc_auc": 0.8}}}
            return {"summary": {"noise_detection": det, "label_share": 0.25}}
        return {"accuracy": 0.6, "macro_f1": 0.5} if sub == "eval" else {}

    _offline(monkeypatch, fake_run)
    base = ["fidelity.py", "--only", "IF20-u0.4-m20", "--seeds", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*base, "--methods", "mwnet", "mlrnet", "--curve-prior", "0"])
    fidelity.main()
    got = {c[c.index("--method") + 1]: c for c in trains}
    assert "--curve-prior" not in got["mwnet"] and got["mwnet"][got["mwnet"].index("--workdir") + 1].endswith("-mwnet")
    assert got["mlrnet"][got["mlrnet"].index("--curve-prior") + 1] == "0"
    assert got["mlrnet"][got["mlrnet"].index("--workdir") + 1].endswith("-mlrnet-prior0-d2")
    rows = fidelity.read_results(tmp_path / "results.jsonl")
    assert [fidelity.row_key(r)[2] for r in rows] == ["mwnet", "mlrnet-prior0"]
    assert rows[1]["budget"]["curve_prior"] == 0.0
    assert (rows[1]["weight_auroc_within_label"], rows[1]["stage1_auroc_within_label"]) == (0.9, 0.8)
    assert rows[1]["weight_label_share"] == 0.25


def test_tune_with_a_meta_share_labels_its_own_candidates_and_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--tune --meta-share S: the candidates and the tuned run carry the share in their labels and commands, so
    they neither reuse nor disturb the choice made without it; seed 1 reuses its own choice."""
    trains: list[list[str]] = []
    dev_of = {("1e-5", None): 0.5, ("1e-4", None): 0.7, ("1e-3", None): 0.6}
    dev_of |= {("1e-5", "0.5"): 0.8, ("1e-4", "0.5"): 0.6, ("1e-3", "0.5"): 0.7}

    def fake_run(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
        sub, args = cmd[cmd.index("mlrnet_cli") + 1], cmd[cmd.index("mlrnet_cli") + 2 :]
        if sub == "train":
            trains.append(args)
            share = args[args.index("--meta-share") + 1] if "--meta-share" in args else None
            return {"best_dev_accuracy": dev_of[args[args.index("--meta-lr") + 1], share]}
        return {"accuracy": 0.6, "macro_f1": 0.5} if sub == "eval" else {}

    _offline(monkeypatch, fake_run)
    base = ["fidelity.py", "--grid", "headline", "--only", "IF20-u0.4-m20", "--seeds", "2", "--out", str(tmp_path)]
    base += ["--methods", "mlrnet", "--tune"]
    monkeypatch.setattr(sys, "argv", [*base, "--seed", "0"])
    fidelity.main()
    monkeypatch.setattr(sys, "argv", [*base, "--seed", "0", "--meta-share", "0.5"])
    fidelity.main()
    shared = [a for a in trains if "--meta-share" in a]
    assert [a[a.index("--workdir") + 1].rsplit("-m20-", 1)[1] for a in shared] == [
        "mlrnet-share0.5@lr1e-5-d2",
        "mlrnet-share0.5@lr1e-4-d2",
        "mlrnet-share0.5@lr1e-3-d2",
    ]
    assert all(a[a.index("--meta-share") + 1] == "0.5" for a in shared)
    rows = fidelity.read_results(tmp_path / "results.jsonl")
    chosen = {r["label"]: r["preset"] for r in rows if r["label"].endswith("-tuned")}
    assert chosen == {"mlrnet-tuned": "lr1e-4", "mlrnet-share0.5-tuned": "lr1e-5"}
    trains.clear()
    monkeypatch.setattr(sys, "argv", [*base, "--seed", "1", "--meta-share", "0.5"])
    fidelity.main()
    assert len(trains) == 1 and trains[0][trains[0].index("--workdir") + 1].endswith("-s1-m20-mlrnet-share0.5-tuned-d2")
    assert trains[0][trains[0].index("--meta-lr") + 1] == "1e-5"
    table = fidelity.report(tmp_path)
    assert "| IF20-u0.4-m20 | mlrnet-share0.5 | 80.00 | 60.00 | 70.00 | - | - | lr1e-5 |" in table
    assert "| IF20-u0.4-m20 | mlrnet | 50.00 | 70.00 | 60.00 | - | - | lr1e-4 |" in table
    assert "mlrnet-share0.5-tuned minus each method" in table and "mlrnet-tuned minus each method" in table


def test_only_takes_the_exact_cell_name_before_a_substring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workdirs: list[str] = []

    def fake_run(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
        if cmd[cmd.index("mlrnet_cli") + 1] == "train":
            workdirs.append(cmd[cmd.index("--workdir") + 1])
        return {"accuracy": 0.5, "macro_f1": 0.5}

    _offline(monkeypatch, fake_run)
    for only, cells in (("IF20-u0.4-m10", ["m10"]), ("IF20-u0.4-m1", ["m10", "m100"])):
        workdirs.clear()
        argv = ["fidelity.py", "--only", only, "--seeds", "1", "--methods", "meta-only", "--out", str(tmp_path / only)]
        monkeypatch.setattr(sys, "argv", argv)
        fidelity.main()
        assert sorted(w.rsplit("-s0-", 1)[1].split("-")[0] for w in workdirs) == cells


def test_two_processes_on_one_cell_prepare_its_base_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fidelity processes that share a cell's base (e.g. the m10 and m100 cells) run stage 1 once: the
    second waits for the first instead of starting a second `collect-losses` on the same workspace."""
    import threading
    import time

    calls: list[str] = []

    def fake_run(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
        sub = cmd[cmd.index("mlrnet_cli") + 1]
        calls.append(sub)
        ws = Path(cmd[cmd.index("--workdir") + 1])
        if sub == "corrupt":
            (ws / "data").mkdir(parents=True)
            (ws / "data" / "manifest.json").write_text("{}")
        elif sub == "collect-losses":
            time.sleep(0.5)  # both processes are past their own "no curves yet" check by now, without the lock
            (ws / "losses.safetensors").write_bytes(b"")
        return {"accuracy": 0.5, "macro_f1": 0.5} if sub == "eval" else {}

    monkeypatch.setattr(fidelity, "run", fake_run)
    cells = [c for c in fidelity.grids(1)["headline"] if c.name in ("IF20-u0.4-m10", "IF20-u0.4-m100")]
    budget = fidelity.Budget()
    threads = [
        threading.Thread(
            target=fidelity.run_cell,
            args=(c, tmp_path, budget, "m", tmp_path, tmp_path),
            kwargs={"methods": ("mlrnet",)},
        )
        for c in cells
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls.count("corrupt") == 1 and calls.count("collect-losses") == 1
    assert calls.count("train") == 2


@pytest.mark.usefixtures("one_thread")
def test_meta_step_child_times_whole_meta_cycles(monkeypatch: pytest.MonkeyPatch) -> None:
    """With --meta-interval 2, θ is updated on every other step (the warm-up step included), on a tiny BERT."""
    import mlrnet_cli.meta as meta

    calls: list[bool] = []
    real = meta.meta_step

    def counting(*args, **kwargs):
        calls.append(kwargs["update_meta"])
        return real(*args, **kwargs)

    monkeypatch.setattr(meta, "meta_step", counting)
    r = meta_step.child("all-interval-2", steps=2, threads=1, tiny=True)
    # warm-up + 2 cycles of 2 steps: meta, plain-cost, meta, plain-cost, meta
    assert calls == [True, False, True, False, True]
    assert r["variant"] == "all-interval-2" and r["step_s"] > 0 and r["peak_rss_mib"] > 0


@pytest.mark.usefixtures("one_thread")
def test_meta_step_share_variants_put_the_meta_batch_in_the_real_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The `-share` variants time the step of --meta-share 0.5: the meta batch is passed as the clean batch (and
    with --meta-interval 2, θ is updated on every other step)."""
    import mlrnet_cli.meta as meta

    seen: list[tuple[bool, float, str, bool]] = []
    real = meta.meta_step

    def spying(*args, **kwargs):
        clean = kwargs["clean_batch"] is args[4]
        seen.append((clean, kwargs["clean_share"], kwargs["clean_share_at"], kwargs["update_meta"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(meta, "meta_step", spying)
    meta_step.child("head-share", steps=1, threads=1, tiny=True)
    meta_step.child("head", steps=1, threads=1, tiny=True)
    meta_step.child("all-share-w-hat", steps=1, threads=1, tiny=True)
    meta_step.child("all-interval-2-share-w-hat", steps=1, threads=1, tiny=True)
    assert seen[:6] == [(True, 0.5, "w", True)] * 2 + [(False, 0.0, "w", True)] * 2 + [(True, 0.5, "w-hat", True)] * 2
    # warm-up + one cycle of 2 steps: meta, between (its clean term by the pass at w inside meta_step), meta
    assert seen[6:] == [(True, 0.5, "w-hat", True), (True, 0.5, "w-hat", False), (True, 0.5, "w-hat", True)]


def test_gpu_script_runs_on_cpu_with_a_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    """benchmarks/gpu.sh end to end on the CPU (no GPU is lent to CI): the table it prints is the eval results."""
    import os
    import subprocess

    from conftest import write_synthetic_source

    data = tmp_path / "data"
    data.mkdir()
    write_synthetic_source(data / "train.parquet", per_class=60, seed=0)
    write_synthetic_source(data / "test.parquet", per_class=10, seed=1)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "MODEL": str(tiny_model_dir),
        "DATA": str(data),
        "OUT": str(out),
        "DEVICE": "cpu",
        "EPOCHS": "1",
        "NMAX": "40",
        "POOL": "12",
        "META": "4",
        "MAXLEN": "24",
        "BATCH": "16",
        "METHODS": "plain mlrnet",
    }
    r = subprocess.run(["bash", str(BENCH / "gpu.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [
        line.split("|")[1:-1]
        for line in r.stdout.splitlines()
        if line.startswith("| plain") or line.startswith("| mlrnet")
    ]
    assert [c[0].strip() for c in rows] == ["plain", "mlrnet"]
    for cells in rows:
        m = cells[0].strip()
        e = json.loads((out / f"{m}-eval.json").read_text())
        assert e["num_rows"] == 40  # the whole test table
        assert cells[1].strip() == f"{100 * e['accuracy']:.2f}" and cells[2].strip() == f"{100 * e['macro_f1']:.2f}"
    auroc = rows[1][3].strip()
    assert rows[0][3].strip() == "-" and 0.0 <= float(auroc) <= 1.0  # MLRNet's weights were scored against the truth
    # the corrupted set has the paper's profile: imbalance 20 from a head of 40
    manifest = json.loads((out / "base" / "data" / "manifest.json").read_text())
    assert manifest["profile"][0] == 40 and manifest["profile"][-1] == 2
    assert manifest["counts"]["train_true"] == manifest["profile"]


def test_tune_chooses_the_meta_setting_on_dev_rows_of_seed_0_and_reuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--tune: every preset runs on seed 0, the best dev accuracy chooses (test accuracy, which here ranks the
    presets the other way round, plays no part), the tuned row copies the chosen run, and seed 1 runs the
    choice only, after seed 0 has chosen."""
    calls: list[list[str]] = []
    dev_of = {"1e-5": 0.50, "1e-4": 0.70, "1e-3": 0.60}

    def fake_run(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
        sub = cmd[cmd.index("mlrnet_cli") + 1]
        args = cmd[cmd.index("mlrnet_cli") + 2 :]
        calls.append([sub, *args])
        if sub == "train":
            lr = [args[i + 1] for i, a in enumerate(args) if a == "--meta-lr"][-1:] or ["1e-5"]  # the last counts
            lr = lr[0]
            dev = dev_of[lr] + (0.05 if "--no-normalize-weights" in args else 0.0)
            ws = Path(args[args.index("--workdir") + 1])
            (ws / "dev.txt").write_text(str(dev))
            return {"best_dev_accuracy": dev}
        if sub == "eval":
            ws = Path(args[args.index("--workdir") + 1])
            return {"accuracy": 1 - float((ws / "dev.txt").read_text()), "macro_f1": 0.4}
        return {}

    _offline(monkeypatch, fake_run)
    base = ["fidelity.py", "--grid", "headline", "--only", "IF20-u0.4-m20", "--seeds", "2", "--out", str(tmp_path)]
    base += ["--methods", "plain", "mwnet", "--tune"]

    monkeypatch.setattr(sys, "argv", [*base, "--seed", "1"])  # seed 1 before seed 0: nothing to reuse yet
    fidelity.main()
    assert [c[c.index("--method") + 1] for c in calls if c[0] == "train"] == ["plain"]

    calls.clear()
    monkeypatch.setattr(sys, "argv", [*base, "--seed", "0"])
    fidelity.main()
    trains = [c for c in calls if c[0] == "train"]
    assert [c[c.index("--workdir") + 1].rsplit("-m20-", 1)[1] for c in trains] == [
        "plain",
        "mwnet@lr1e-5",
        "mwnet@lr1e-4",
        "mwnet@lr1e-3",
        "mwnet@mwnet-ref",
    ]
    rows = fidelity.read_results(tmp_path / "results.jsonl")
    tuned = [r for r in rows if r.get("label") == "mwnet-tuned"]
    assert len(tuned) == 1 and tuned[0]["seed"] == 0
    # mwnet-ref (1e-3 with 1/n weights: 0.65) loses to lr1e-4 (0.70) on dev, though lr1e-5 has the best test accuracy
    assert tuned[0]["preset"] == "lr1e-4" and tuned[0]["accuracy"] == pytest.approx(0.30)
    assert tuned[0]["candidates_dev_accuracy"] == pytest.approx(
        {"lr1e-5": 0.5, "lr1e-4": 0.7, "lr1e-3": 0.6, "mwnet-ref": 0.65}
    )

    calls.clear()
    monkeypatch.setattr(sys, "argv", [*base, "--seed", "1"])
    fidelity.main()
    trains = [c for c in calls if c[0] == "train"]
    assert len(trains) == 1 and trains[0][trains[0].index("--workdir") + 1].endswith("-s1-m20-mwnet-tuned")
    assert trains[0][trains[0].index("--meta-lr") + 1] == "1e-4" and "--no-normalize-weights" not in trains[0]

    table = fidelity.report(tmp_path)
    assert "| IF20-u0.4-m20 | mwnet-tuned | 2 |" in table
    assert "| IF20-u0.4-m20 | mwnet@lr1e-4 |" not in table  # candidates only in the choices table
    assert "| IF20-u0.4-m20 | mwnet | 50.00 | 70.00 | 60.00 | 65.00 | - | lr1e-4 |" in table  # mlc-ref: mlc only


def test_table2_grid_and_its_mean_per_noise_type(tmp_path: Path) -> None:
    t2 = fidelity.grids(1)["table2-frozen"]
    assert sorted(c.noise for c in t2) == sorted(f"{k}:{p}" for k in ("uniform", "flip") for p in (0.2, 0.4, 0.6, 0.8))
    assert all(c.imbalance == 1 and c.freeze_encoder and c.methods == fidelity.METHODS for c in t2)
    assert len({c.base_key for c in t2}) == 8
    rows = [
        {
            "cell": c.name,
            "method": m,
            "seed": 0,
            "accuracy": acc,
            "macro_f1": acc,
            "cell_config": {"imbalance": 1, "noise": c.noise},
        }
        for c, accs in zip(t2[:2] + t2[4:5], ((0.9, 0.8), (0.7, 0.6), (0.5, 0.2)), strict=True)
        for m, acc in zip(("plain", "glc"), accs, strict=True)
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = fidelity.report(tmp_path)
    assert "| plain | 80.00 (2) | 50.00 (1) |" in table and "| glc | 70.00 (2) | 20.00 (1) |" in table


def test_a_run_another_process_holds_or_finished_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fidelity processes on one grid: a run the other process is training now, or finished after this one
    planned its runs, is skipped, not started a second time (which `train`'s lock would stop with an error)."""
    import fcntl

    trained: list[str] = []

    def fake_run(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
        sub = cmd[cmd.index("mlrnet_cli") + 1]
        if sub == "train":
            trained.append(cmd[cmd.index("--method") + 1])
        return {"accuracy": 0.5, "macro_f1": 0.5} if sub == "eval" else {}

    monkeypatch.setattr(fidelity, "run", fake_run)
    monkeypatch.setattr(fidelity, "_prepare_base", lambda *a, **k: None)
    (cell,) = [c for c in fidelity.grids(1)["headline"] if c.name == "IF20-u0.4-m20"]
    budget = fidelity.Budget()
    held = tmp_path / "work" / f"{cell.base_key}-m20-mwnet"
    held.mkdir(parents=True)
    other = open(held / ".fidelity-run.lock", "a")  # another process's hold (flock: per open file)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    results = tmp_path / "results.jsonl"
    finished = {"cell": cell.name, "seed": 0, "method": "plain-meta", "label": "plain-meta", "accuracy": 0.7}
    results.write_text(json.dumps(finished) + "\n")
    methods = ("plain", "mwnet", "plain-meta")
    rows = fidelity.run_cell(cell, tmp_path, budget, "m", tmp_path, tmp_path, methods=methods, results=results)
    assert trained == ["plain"] and [r["method"] for r in rows] == ["plain"]
    other.close()  # the other process ended (or was killed): its run is free again
    rows = fidelity.run_cell(cell, tmp_path, budget, "m", tmp_path, tmp_path, methods=("mwnet",), results=results)
    assert trained == ["plain", "mwnet"] and [r["method"] for r in rows] == ["mwnet"]


def test_mlc_and_mwnet_each_get_their_reference_preset_beside_the_shared_lr_grid() -> None:
    flags = {v.label: v.flags for v in fidelity.candidates("mlc")}
    assert list(flags) == ["mlc@lr1e-5", "mlc@lr1e-4", "mlc@lr1e-3", "mlc@mlc-ref"]
    # microsoft/MLC's hmlc_K_mix: the clean half of its gold batch in the real step, meta lr 3e-4
    assert flags["mlc@mlc-ref"] == ("--meta-lr", "3e-4", "--meta-share", "0.5", "--meta-share-at", "w")
    assert [v.preset for v in fidelity.candidates("mwnet")][-1] == "mwnet-ref"
    assert "mlc-ref" not in fidelity.TUNED_PRESETS["mwnet"] + fidelity.TUNED_PRESETS["mlrnet"]


def test_a_choice_is_made_again_when_a_preset_joins_the_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cell = fidelity.Cell("c", 1, "uniform:0.4", 100, fidelity.TUNING_SEED)
    results = tmp_path / "results.jsonl"
    row = {"cell": "c", "seed": cell.seed, "method": "mlc", "accuracy": 0.5, "macro_f1": 0.5}
    monkeypatch.setitem(fidelity.TUNED_PRESETS, "mlc", ("lr1e-5", "lr1e-4"))
    for preset, dev in (("lr1e-5", 0.6), ("lr1e-4", 0.7)):
        fidelity._append(results, {**row, "label": f"mlc@{preset}", "preset": preset, "dev_accuracy": dev})
    assert fidelity.record_choice(cell, "mlc", results)["preset"] == "lr1e-4"
    assert fidelity.record_choice(cell, "mlc", results) is None  # made already
    monkeypatch.setitem(fidelity.TUNED_PRESETS, "mlc", ("lr1e-5", "lr1e-4", "mlc-ref"))
    assert fidelity.record_choice(cell, "mlc", results) is None  # the new preset has not run yet
    fidelity._append(results, {**row, "label": "mlc@mlc-ref", "preset": "mlc-ref", "dev_accuracy": 0.8})
    again = fidelity.record_choice(cell, "mlc", results)
    assert again["preset"] == "mlc-ref" and again["candidates_dev_accuracy"] == {
        "lr1e-5": 0.6,
        "lr1e-4": 0.7,
        "mlc-ref": 0.8,
    }
    assert "now chooses" not in capsys.readouterr().err  # no other seed ran the old choice
    other_seed = fidelity.Cell("c", 1, "uniform:0.4", 100, 1)
    (reuse,) = fidelity.plan_tuned(other_seed, "mlc", fidelity.read_results(results))
    assert reuse.preset == "mlc-ref" and reuse.flags == fidelity.META_PRESETS["mlc-ref"]  # the new choice, not lr1e-4
    fidelity._append(results, {**row, "label": "mlc-tuned", "preset": "lr1e-4", "seed": 1})
    monkeypatch.setitem(fidelity.TUNED_PRESETS, "mlc", ("lr1e-5", "lr1e-4", "mlc-ref", "lr1e-3"))
    fidelity._append(results, {**row, "label": "mlc@lr1e-3", "preset": "lr1e-3", "dev_accuracy": 0.9})
    assert fidelity.record_choice(cell, "mlc", results)["preset"] == "lr1e-3"
    assert "now chooses lr1e-3 (was mlc-ref); the mlc-tuned runs of seeds [1]" in capsys.readouterr().err
    assert "| c | mlc-tuned | 2 |" in fidelity.report(tmp_path)  # seeds 0 (the new choice) and 1


def test_fidelity_train_seed_trains_on_the_cells_base_under_its_own_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
        calls.append(cmd[cmd.index("mlrnet_cli") + 1 :])
        return {"accuracy": 0.5} if "eval" in cmd else {}

    _offline(monkeypatch, fake_run)
    argv = ["fidelity.py", "--grid", "headline", "--only", "IF20-u0.4-m20", "--seeds", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*argv, "--methods", "mlrnet", "--train-seed", "3"])
    fidelity.main()

    by_sub = {c[0]: c for c in calls}
    seeds = [by_sub["train"][i + 1] for i, a in enumerate(by_sub["train"]) if a == "--seed"]
    assert seeds[-1] == "3"  # the last --seed is the one the CLI keeps
    assert by_sub["corrupt"][by_sub["corrupt"].index("--seed") + 1] == "0"  # the cell's corruption and curves
    assert by_sub["collect-losses"][by_sub["collect-losses"].index("--seed") + 1] == "0"
    row = json.loads((tmp_path / "results.jsonl").read_text())
    assert (row["label"], row["seed"], row["budget"]["train_seed"]) == ("mlrnet-ts3", 0, 3)
    assert by_sub["train"][by_sub["train"].index("--workdir") + 1].endswith("-mlrnet-ts3-d2")

    calls.clear()
    fidelity.main()  # resumable: the finished training seed is skipped
    assert not [c for c in calls if c[0] == "train"]


def test_frontier_flags_reach_the_meta_methods_only_and_name_their_runs() -> None:
    budget = {"epochs": 5, "meta_share": 0.5, "curve_prior": 1.0, "meta_params": "last-1", "meta_interval": 2}
    assert fidelity.method_label("mlrnet", budget) == "mlrnet-share0.5-prior1-mplast-1-mi2"
    at = {"epochs": 5, "meta_share": 0.5, "meta_share_at": "w-hat"}
    assert fidelity.method_label("mwnet", at) == "mwnet-share0.5-atw-hat"
    assert fidelity.method_train_args("mwnet", at) == ["--meta-share", "0.5", "--meta-share-at", "w-hat"]
    assert fidelity.method_train_args("mlrnet", budget) == [
        "--meta-share",
        "0.5",
        "--curve-prior",
        "1",
        "--meta-params",
        "last-1",
        "--meta-interval",
        "2",
    ]
    assert fidelity.method_label("plain", budget) == "plain" and fidelity.method_train_args("plain", budget) == []
    assert fidelity.method_label("mwnet", {"epochs": 5, "meta_params": "head"}) == "mwnet-mphead"
    ablation = {"epochs": 5, "df_inputs": "label-curve"}  # --df-inputs: MLRNet's flag alone
    assert fidelity.method_label("mlrnet", ablation) == "mlrnet-dflabel-curve"
    assert fidelity.method_train_args("mlrnet", ablation) == ["--df-inputs", "label-curve"]
    variant = {"epochs": 5, "df_inputs": "agreement"}
    assert fidelity.method_label("mlrnet", variant) == "mlrnet-dfagreement"
    assert fidelity.method_train_args("mlrnet", variant) == ["--df-inputs", "agreement"]
    assert fidelity.method_label("mwnet", ablation) == "mwnet" and fidelity.method_train_args("mwnet", ablation) == []


def test_rows_of_the_earlier_defaults_keep_their_meaning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row trained before MLRNet's defaults changed (no ``defaults`` in it) is read under the label today's CLI
    gives the same run, so a run of today's defaults neither skips nor mixes with it, and one spelled out
    (``--meta-share 0 --curve-prior 0``) finds it done."""
    old = [
        ("mlrnet", "mlrnet", {}, None, "mlrnet-share0-prior0"),
        (
            "mlrnet",
            "mlrnet-share0.5-prior1",
            {"meta_share": 0.5, "curve_prior": 1.0},
            None,
            "mlrnet-share0.5-prior1-atw",
        ),
        (
            "mlrnet",
            "mlrnet-share0.5-mphead",
            {"meta_share": 0.5, "meta_params": "head"},
            None,
            "mlrnet-share0.5-prior0-mphead",
        ),
        ("mlrnet", "mlrnet@lr1e-4", {}, "lr1e-4", "mlrnet-share0-prior0@lr1e-4"),
        ("mlrnet", "mlrnet-tuned", {}, "lr1e-4", "mlrnet-share0-prior0-tuned"),
        ("mwnet", "mwnet-share0.5", {"meta_share": 0.5}, None, "mwnet-share0.5-atw"),
        ("mwnet", "mwnet", {}, None, "mwnet"),
        ("mlc", "mlc@mlc-ref", {}, "mlc-ref", "mlc@mlc-ref"),
        ("plain", "plain", {}, None, "plain"),
    ]
    rows = [
        {
            "cell": "IF20-u0.4-m20",
            "seed": 0,
            "method": m,
            "label": label,
            "budget": b,
            "preset": p,
            "accuracy": 0.6,
            "macro_f1": 0.5,
        }
        for m, label, b, p, _ in old
    ]
    rows.append(rows[0] | {"label": "mlrnet-share0.5-prior1-atw-hat", "defaults": fidelity.DEFAULTS})
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = fidelity.read_results(results)
    assert [r["label"] for r in read] == [want for *_, want in old] + ["mlrnet-share0.5-prior1-atw-hat"]
    assert [r.get("label_as_run") for r in read[:2]] == ["mlrnet", "mlrnet-share0.5-prior1"]

    trains: list[list[str]] = []

    def fake_run(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
        sub = cmd[cmd.index("mlrnet_cli") + 1]
        trains.extend([cmd] if sub == "train" else [])
        return {"accuracy": 0.8, "macro_f1": 0.5} if sub == "eval" else {}

    _offline(monkeypatch, fake_run)
    base = ["fidelity.py", "--only", "IF20-u0.4-m20", "--seeds", "1", "--out", str(tmp_path), "--methods", "mlrnet"]
    monkeypatch.setattr(sys, "argv", base)
    fidelity.main()  # today's defaults: not the old row, and not in the old row's workspace
    assert len(trains) == 1 and trains[0][trains[0].index("--workdir") + 1].endswith("-m20-mlrnet-d2")
    assert "--meta-share" not in trains[0] and "--curve-prior" not in trains[0]
    new = fidelity.read_results(results)[-1]
    assert (new["label"], new["defaults"]) == ("mlrnet", fidelity.DEFAULTS)
    trains.clear()
    monkeypatch.setattr(sys, "argv", [*base, "--meta-share", "0", "--curve-prior", "0"])
    fidelity.main()  # the old row is this run
    assert trains == []
    table = fidelity.report(tmp_path)
    assert (
        "| IF20-u0.4-m20 | mlrnet | 1 | 80.00 |" in table
        and "| IF20-u0.4-m20 | mlrnet-share0-prior0 | 1 | 60.00 |" in table
    )


def test_a_frozen_mlrnet_row_of_defaults_2_reads_as_the_share_it_trained_with() -> None:
    """Defaults 3 changed MLRNet's --meta-share on a frozen encoder only (0.5 -> auto): a frozen row of version 2
    without the flag is `mlrnet-share0.5` today, a fine-tuned one stays `mlrnet`, and today's frozen default gets a
    workspace of its own (-d3) while the fine-tuned one keeps its version-2 workspace (-d2)."""
    row = {"cell": "IF1-u0.2", "seed": 0, "method": "mlrnet", "label": "mlrnet", "budget": {}, "defaults": 2}
    frozen = fidelity.as_run_today(row | {"cell_config": {"freeze_encoder": True}})
    assert (frozen["label"], frozen["label_as_run"]) == ("mlrnet-share0.5", "mlrnet")
    assert fidelity.as_run_today(row | {"cell_config": {"freeze_encoder": False}})["label"] == "mlrnet"
    assert fidelity.as_run_today(row | {"defaults": 1})["label"] == "mlrnet-share0-prior0"
    version = fidelity.label_version
    assert (version("mlrnet", {}, None, "mlrnet", True), version("mlrnet", {}, None, "mlrnet", False)) == (3, 2)
    assert version("mlrnet", {"meta_share": "auto"}, None, "mlrnet-shareauto", True) == 2
    assert version("plain", {}, None, "plain", True) == 1
