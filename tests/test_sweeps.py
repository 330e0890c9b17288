"""Sweeps: GPU pinning, skipping finished jobs, and the aggregated table of a real multirun.

The multirun tests run ``python run.py -m`` in a subprocess, exactly as a user does, on the tiny
generated dataset with ``debug=fast`` (experiment=smoke_sweep: 2 classes x 2 feature/matcher pairs).
They share one stage cache, so only the first sweep computes SfM and splats; later sweeps (the other
launcher, the rerun, the broken job) reuse them and exercise the launcher and the bookkeeping.
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from splatpose.sweeps import gpu_leases
from splatpose.sweeps.aggregate import aggregate_sweep
from splatpose.sweeps.gpu_leases import NoFreeGpu, lease_gpu, pin_gpu_for_job, visible_gpus
from splatpose.sweeps.resume import finished_results
from splatpose.sweeps.sweep_jobs import FAILED, OK, JobRecord
from splatpose.sweeps.sweep_table import build_rows, variant_keys

REPO = Path(__file__).resolve().parents[1]
SMOKE_CLASSES = ("01Ant", "02Airplane")
SMOKE_PAIRS = ("xfeat_lighterglue", "aliked_lightglue")


# ------------------------------------------------------------------------------ GPU pinning (CPU)

def _lease_and_report(pool, job_num, lease_dir, barrier, queue):
    lease = lease_gpu(pool, job_num, lease_dir, wait_s=0)
    queue.put((os.getpid(), lease.gpu, os.environ["CUDA_VISIBLE_DEVICES"]))
    barrier.wait(timeout=60)  # hold the lease until every process has leased its GPU


def test_concurrent_job_processes_lease_distinct_gpus(tmp_path):
    """Three workers whose job numbers all map to GPU 0 still end up on three different GPUs."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    workers = [ctx.Process(target=_lease_and_report, args=(["0", "1", "2"], num, tmp_path, barrier, queue))
               for num in (0, 3, 6)]
    for worker in workers:
        worker.start()
    reports = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    gpus = [gpu for _, gpu, _ in reports]
    assert sorted(gpus) == ["0", "1", "2"]
    assert all(gpu == visible for _, gpu, visible in reports)  # CUDA_VISIBLE_DEVICES pinned to it


def _hold_lease(pool, lease_dir, holding, release):
    lease_gpu(pool, 0, lease_dir, wait_s=0)
    holding.set()
    release.wait(timeout=60)


def test_worker_finding_every_gpu_leased_fails_with_the_n_jobs_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test: this process leases below
    ctx = mp.get_context("spawn")
    holding, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lease, args=(["7"], tmp_path, holding, release))
    holder.start()
    try:
        assert holding.wait(timeout=60)
        with pytest.raises(NoFreeGpu, match=r"hydra\.launcher\.n_jobs=1"):
            lease_gpu(["7"], 0, tmp_path, wait_s=0.2)
    finally:
        release.set()
        holder.join(timeout=60)
    # The holder exited: its GPU is free again (the OS dropped its lock).
    try:
        assert lease_gpu(["7"], 0, tmp_path, wait_s=5).gpu == "7"
        assert lease_gpu(["8"], 0, tmp_path).gpu == "7"  # a process keeps its first lease
    finally:
        gpu_leases.release_gpu()


def test_gpu_pool_comes_from_config_then_cuda_visible_devices(monkeypatch):
    assert visible_gpus([0, 1]) == ["0", "1"]
    assert visible_gpus("2,3") == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert visible_gpus("auto") == ["4", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus(None) == []


def test_only_joblib_jobs_are_pinned(tmp_path):
    sweep = {"gpus": [0, 1], "gpu_lease_dir": str(tmp_path / "leases")}
    for launcher in ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
                     "hydra._internal.core_plugins.basic_launcher.BasicLauncher"):
        assert pin_gpu_for_job(sweep, launcher, 0, tmp_path) is None
    assert pin_gpu_for_job({**sweep, "gpus": []}, "x.JoblibLauncher", 0, tmp_path) is None  # CPU machine


# ------------------------------------------------------------------------------ skip finished jobs

def test_finished_job_is_recognised_only_with_the_same_config(tmp_path):
    cfg = OmegaConf.create({"class": "01Ant", "seed": 0, "sfm": {"max_keypoints": 512},
                            "paths": {"output_dir": str(tmp_path)}})
    results = {"metrics": {"pixel_auroc": 0.9}, "config": OmegaConf.to_container(cfg)}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert finished_results(tmp_path, cfg)["metrics"]["pixel_auroc"] == 0.9
    moved = OmegaConf.merge(cfg, {"paths": {"output_dir": "/elsewhere"}})  # where, not what
    assert finished_results(tmp_path, moved) is not None
    assert finished_results(tmp_path, OmegaConf.merge(cfg, {"sfm": {"max_keypoints": 1024}})) is None
    time.sleep(0.01)
    (tmp_path / "failure.json").write_text(json.dumps({"error": "later attempt failed"}))
    assert finished_results(tmp_path, cfg) is None


def test_job_finished_before_task_became_a_group_is_still_recognised(tmp_path):
    """A sweep finished when every run composed detect/serve/watch; its evaluate jobs' configs now lack them."""
    cfg = OmegaConf.create({"class": "01Ant", "task": "evaluate", "sfm": {"max_keypoints": 512}})
    old = {**OmegaConf.to_container(cfg), "run_dir": None, "inputs": None, "detect": {"batch_size": 8},
           "serve": {"port": 8000}, "watch": {"dir": None}}
    (tmp_path / "results.json").write_text(json.dumps({"metrics": {"pixel_auroc": 0.9}, "config": old}))
    assert finished_results(tmp_path, cfg) is not None
    # a job that composes detect still compares it
    assert finished_results(tmp_path, OmegaConf.merge(cfg, {"detect": {"batch_size": 16}})) is None


# ------------------------------------------------------------------------------ table arithmetic

def _job(num, class_name, seed, pixel, variant="aliked"):
    results = {"class": class_name, "metrics": {"pixel_auroc": pixel, "aupro": pixel - 0.1,
                                                 "image_auroc": None},
               "timings": {"sfm": {"seconds": 2.0, "reused": seed > 0}, "total": {"seconds": 10.0}}}
    return JobRecord(dir=Path(f"/sweep/{num}"), num=num, status=OK, class_name=class_name, seed=seed,
                     factors={"class": class_name, "seed": str(seed), "sfm/feature": variant},
                     results=results)


def test_mean_row_averages_classes_per_seed_then_spreads_over_seeds():
    jobs = [_job(0, "A", 0, 0.90), _job(1, "B", 0, 0.70), _job(2, "A", 1, 0.80), _job(3, "B", 1, 0.80),
            JobRecord(dir=Path("/sweep/4"), num=4, status=FAILED, class_name="C", seed=0,
                      factors={"class": "C", "sfm/feature": "aliked"}, error="boom")]
    rows = build_rows(jobs)
    assert [r.class_name for r in rows] == ["A", "B", "Mean (2 classes)"]
    a, _, mean = rows
    assert a.runs == 2 and a.cells["pixel_auroc"].mean == pytest.approx(0.85)
    assert a.cells["pixel_auroc"].std == pytest.approx(0.0707107, abs=1e-6)  # sample std of .9, .8
    assert "image_auroc" not in a.cells  # undefined metrics are left out, not averaged as zero
    assert mean.cells["pixel_auroc"].values == pytest.approx([0.80, 0.80])  # per-seed class means
    assert mean.cells["pixel_auroc"].std == pytest.approx(0.0)
    assert a.reused["sfm"] and not a.reused["splat"]


def test_variants_are_the_factors_that_vary_besides_class_and_seed():
    jobs = [_job(0, "A", 0, 0.9, "aliked"), _job(1, "A", 0, 0.8, "disk"), _job(2, "B", 1, 0.8, "disk")]
    assert variant_keys(jobs) == ["sfm/feature"]
    assert sorted({r.variant for r in build_rows(jobs)}) == ["sfm/feature=aliked", "sfm/feature=disk"]


# ------------------------------------------------------------------------------ real multiruns

def run_sweep(sweep_dir: Path, cache_dir: Path, *overrides: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    """``python run.py experiment=smoke_sweep ...`` as a user types it; returns the finished process."""
    env = {**os.environ, "SPLATPOSE_CACHE": str(cache_dir), "WANDB_MODE": "offline",
           "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "run.py", "experiment=smoke_sweep", f"hydra.sweep.dir={sweep_dir}", *overrides]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def joblib_on_two_pretend_gpus(sweep_dir: Path) -> list[str]:
    """joblib with 2 workers, pinned to a pool of two GPU ids (on a CPU machine nothing uses them)."""
    return ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "++sweep.gpus=[0,1]",
            f"++sweep.gpu_lease_dir={sweep_dir.parent / 'leases'}"]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())


def assert_workers_never_share_a_gpu(sweep_dir: Path) -> None:
    leases = [json.loads((d / "gpu_lease.json").read_text()) for d in _job_dirs(sweep_dir)]
    gpu_of_worker = {}
    for lease in leases:
        assert gpu_of_worker.setdefault(lease["pid"], lease["gpu"]) == lease["gpu"]  # a worker keeps its GPU
    assert len(set(gpu_of_worker.values())) == len(gpu_of_worker)  # two workers never hold one GPU
    assert set(gpu_of_worker.values()) <= {"0", "1"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweep_cache")


def test_joblib_sweep_of_broken_jobs_records_each_error_and_pins_gpus(tmp_path, cache_dir):
    """The sweep machinery end to end, cheaply: 4 jobs that fail at the data stage.

    Each failure is recorded and listed by the aggregation, the sweep command still exits 0, every
    joblib worker held its own GPU, and a rerun retries failed jobs instead of skipping them.
    """
    sweep_dir = tmp_path / "sweep"
    run_sweep(sweep_dir, cache_dir, "class=NoSuchClass,NoSuchEither", *joblib_on_two_pretend_gpus(sweep_dir))
    summary = aggregate_sweep(sweep_dir, wandb_mode="disabled")
    assert [(j.class_name, j.status) for j in summary.jobs] == [("NoSuchClass", FAILED)] * 2 + [("NoSuchEither", FAILED)] * 2
    assert all("unknown class" in j.error for j in summary.jobs)
    markdown = summary.markdown.read_text()
    assert "## Failed jobs (4)" in markdown and "No job finished" in markdown
    report = summary.report.read_text()  # the HTML report beside table.md lists them too
    assert summary.report == summary.markdown.with_name("report.html") and report.count("unknown class") == 4
    assert_workers_never_share_a_gpu(sweep_dir)

    first_failures = {d.name: (d / "failure.json").stat().st_mtime_ns for d in _job_dirs(sweep_dir)}
    done = run_sweep(sweep_dir, cache_dir, "class=NoSuchClass,NoSuchEither", *joblib_on_two_pretend_gpus(sweep_dir))
    assert "Skipped (finished earlier)" not in done.stdout
    assert all((sweep_dir / name / "failure.json").stat().st_mtime_ns > mtime
               for name, mtime in first_failures.items())


# The acceptance sweeps compute SfM and splats for 4 (class, pair) jobs: several CPU minutes on
# 2 cores, so they run with `pytest -m slow tests/test_sweeps.py`.

@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory, cache_dir) -> Path:
    """The smoke sweep (2 classes x 2 pairs) through joblib, 2 workers on two (pretend) GPUs."""
    sweep_dir = tmp_path_factory.mktemp("joblib") / "sweep"
    run_sweep(sweep_dir, cache_dir, *joblib_on_two_pretend_gpus(sweep_dir))
    return sweep_dir


def assert_smoke_table(sweep_dir: Path) -> None:
    """4 finished jobs, and a table with one row per class and a mean row for each of the 2 pairs."""
    summary = aggregate_sweep(sweep_dir, wandb_mode="offline")
    assert [j.status for j in summary.jobs] == [OK] * 4, [j.error for j in summary.jobs]
    markdown = summary.markdown.read_text()
    for pair in ("xfeat", "aliked"):
        assert f"sfm/feature={pair}" in markdown
    for class_name in SMOKE_CLASSES:
        assert markdown.count(f"| {class_name} |") == 2
    assert markdown.count("**Mean (2 classes)**") == 2
    assert "## Failed jobs (0)" in markdown
    with open(summary.table_csv) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6  # 2 pairs x (2 classes + mean)
    assert all(0.0 <= float(r["pixel_auroc_mean"]) <= 1.0 for r in rows)
    assert all(float(r["time_total_mean"]) > 0 for r in rows)
    assert list(summary.wandb_dir.glob("*.wandb")), "the W&B summary run wrote no offline log"


@pytest.mark.slow
def test_joblib_sweep_of_two_classes_and_two_pairs_gives_the_table(joblib_sweep):
    assert [p.name for p in _job_dirs(joblib_sweep)] == [
        "0_01Ant_xfeat-lighterglue", "1_01Ant_aliked-lightglue",
        "2_02Airplane_xfeat-lighterglue", "3_02Airplane_aliked-lightglue"]
    assert_smoke_table(joblib_sweep)
    assert_workers_never_share_a_gpu(joblib_sweep)


@pytest.mark.slow
def test_rerunning_a_sweep_skips_the_finished_jobs(joblib_sweep, cache_dir):
    before = {d.name: (d / "results.json").stat().st_mtime_ns for d in _job_dirs(joblib_sweep)}
    done = run_sweep(joblib_sweep, cache_dir, *joblib_on_two_pretend_gpus(joblib_sweep))
    assert done.stdout.count("Skipped (finished earlier)") == 4
    after = {d.name: (d / "results.json").stat().st_mtime_ns for d in _job_dirs(joblib_sweep)}
    assert after == before


@pytest.mark.slow
def test_submitit_local_sweep_gives_the_same_table(tmp_path, cache_dir, joblib_sweep):
    """Through submitit's local executor (the Slurm code path on one machine); stages come from the cache."""
    sweep_dir = tmp_path / "sweep"
    run_sweep(sweep_dir, cache_dir, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=30")
    assert (sweep_dir / ".submitit").is_dir()  # the jobs really went through submitit
    assert_smoke_table(sweep_dir)


@pytest.mark.slow
def test_a_broken_job_is_listed_and_the_others_still_give_rows(tmp_path, cache_dir, joblib_sweep):
    sweep_dir = tmp_path / "sweep"
    run_sweep(sweep_dir, cache_dir, "class=01Ant,NoSuchClass", "+experiment/sfm_pair=xfeat_lighterglue")
    summary = aggregate_sweep(sweep_dir, wandb_mode="disabled")
    assert [(j.class_name, j.status) for j in summary.jobs] == [("01Ant", OK), ("NoSuchClass", FAILED)]
    assert "NoSuchClass" in summary.failures[0].error
    markdown = summary.markdown.read_text()
    assert "| 01Ant |" in markdown and "## Failed jobs (1)" in markdown
    assert "unknown class 'NoSuchClass'" in markdown
