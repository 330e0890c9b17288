"""The stage cache: what a rerun or a concurrent sweep job may trust."""

import multiprocessing as mp
import time

import pytest
import torch
from omegaconf import OmegaConf

from splatpose.stage_cache import StageCache, stage_key


def test_key_depends_on_settings_and_inputs_not_on_key_order():
    a = stage_key("sfm", {"feature": "aliked", "k": 5})
    assert a == stage_key("sfm", OmegaConf.create({"k": 5, "feature": "aliked"}))
    assert a != stage_key("sfm", {"feature": "disk", "k": 5})
    assert a != stage_key("sfm", {"feature": "aliked", "k": 5}, inputs=("data123",))
    assert a != stage_key("splat", {"feature": "aliked", "k": 5})


def test_finished_stage_is_reused_with_its_summary(tmp_path):
    cache = StageCache(tmp_path)
    with cache.stage("sfm", {"k": 5}) as st:
        assert not st.reused
        (st.dir / "model.txt").write_text("points")
        st.summary = {"num_points": 42}
    with cache.stage("sfm", {"k": 5}) as again:
        assert again.reused and again.dir == st.dir
        assert again.summary == {"num_points": 42}
    with cache.stage("sfm", {"k": 6}) as other:
        assert not other.reused and other.dir != st.dir


def test_a_stage_computed_on_one_device_is_not_reused_on_another(tmp_path):
    """The same settings give other results on a GPU (gsplat, central differences) than on the CPU."""
    with StageCache(tmp_path, device="cuda").stage("splat", {"steps": 10}) as on_gpu:
        (on_gpu.dir / "point_cloud.ply").write_text("gsplat's")
    with StageCache(tmp_path, device="cpu").stage("splat", {"steps": 10}) as on_cpu:
        assert not on_cpu.reused and on_cpu.dir != on_gpu.dir
    with StageCache(tmp_path, device="cuda").stage("splat", {"steps": 10}) as again:
        assert again.reused and again.dir == on_gpu.dir


def test_a_stage_computed_on_one_thread_count_is_not_reused_on_another(tmp_path):
    """Torch's CPU sums split by thread: one thread and two give poses a few 1e-3 degrees apart."""
    with StageCache(tmp_path, device="cpu", threads=2).stage("refine", {"steps": 10}) as two:
        (two.dir / "refined_poses.json").write_text("[]")
    with StageCache(tmp_path, device="cpu", threads=1).stage("refine", {"steps": 10}) as one:
        assert not one.reused and one.dir != two.dir
    with StageCache(tmp_path, device="cpu", threads=2).stage("refine", {"steps": 10}) as again:
        assert again.reused and again.dir == two.dir


def test_a_stage_computed_with_one_cpu_instruction_set_is_not_reused_with_another(tmp_path):
    """Torch's AVX2 and AVX512 kernels round otherwise (a tiny run's splats differ between them)."""
    with StageCache(tmp_path, device="cpu", threads=2, cpu_capability="AVX512").stage("splat", {"steps": 10}) as wide:
        (wide.dir / "point_cloud.ply").write_text("AVX512's")
    with StageCache(tmp_path, device="cpu", threads=2, cpu_capability="AVX2").stage("splat", {"steps": 10}) as narrow:
        assert not narrow.reused and narrow.dir != wide.dir
    with StageCache(tmp_path, device="cpu", threads=2, cpu_capability="AVX512").stage("splat", {"steps": 10}) as again:
        assert again.reused and again.dir == wide.dir


def test_the_random_draw_follows_the_settings_not_the_machine(tmp_path):
    """A stage and the one after it draw the same numbers on one thread and on two (only their folders and
    numerics differ), so a comparison between machines starts from the same random state."""
    draws, folders = [], set()
    for threads in (1, 2):
        cache = StageCache(tmp_path, device="cpu", threads=threads)
        with cache.stage("sfm", {"k": 1}) as sfm:
            pass
        with cache.stage("splat", {"steps": 10}, inputs=(sfm.key,)) as splat:
            draws.append(torch.rand(4))
        folders.add(splat.dir)
    assert torch.equal(draws[0], draws[1]) and len(folders) == 2


def test_interrupted_stage_is_not_trusted(tmp_path):
    cache = StageCache(tmp_path)
    with pytest.raises(RuntimeError):
        with cache.stage("splat", {"steps": 10}) as st:
            (st.dir / "half.ply").write_text("partial")
            raise RuntimeError("killed mid-training")
    with cache.stage("splat", {"steps": 10}) as again:
        assert not again.reused  # recomputed; the stage may resume from what is in the folder
        assert (again.dir / "half.ply").exists()


def test_disabled_cache_recomputes(tmp_path):
    with StageCache(tmp_path).stage("render", {}) as st:
        pass
    with StageCache(tmp_path, enabled=False).stage("render", {}) as again:
        assert not again.reused and again.dir == st.dir


def _compute_once(root, log_path):
    with StageCache(root).stage("sfm", {"k": 1}) as st:
        if not st.reused:
            with open(log_path, "a") as log:
                log.write("computed\n")
            time.sleep(0.5)


def test_concurrent_jobs_compute_a_shared_stage_once(tmp_path):
    log_path = tmp_path / "log.txt"
    ctx = mp.get_context("spawn")
    jobs = [ctx.Process(target=_compute_once, args=(tmp_path / "cache", log_path)) for _ in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=60)
        assert job.exitcode == 0
    assert log_path.read_text().count("computed") == 1


def test_key_hashes_resolved_values_of_nested_configs():
    """A config node inside the settings is hashed by what it resolves to, not by its text: the same
    text pointing at another folder is another key, and equal values are one key."""
    def dataset_node(cache_dir):
        cfg = OmegaConf.create({"paths": {"cache_dir": cache_dir}, "dataset": {"root": "${paths.cache_dir}/synthetic"}})
        return cfg.dataset

    key_a = stage_key("data", {"dataset": dataset_node("/a"), "class": "01Ant"})
    key_b = stage_key("data", {"dataset": dataset_node("/b"), "class": "01Ant"})
    assert key_a != key_b
    assert key_a == stage_key("data", {"dataset": {"root": "/a/synthetic"}, "class": "01Ant"})
