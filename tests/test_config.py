"""The Hydra config tree: every option of every group composes, and the CLI says what it accepts."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Groups whose options are chosen on the command line (hydra/launcher comes from the plugins).
GROUPS = ["dataset", "sfm/feature", "sfm/matcher", "sfm/retrieval", "splat", "scorer", "trainer",
          "logger", "callbacks", "task", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_config(tmp_path, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={tmp_path / 'out'}",
                                           f"paths.cache_dir={tmp_path / 'cache'}", *overrides],
                      return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # read-only; ${hydra:...} resolves through HydraConfig from here on
        OmegaConf.resolve(cfg)
    return cfg


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_of_every_group_composes(tmp_path, group, option, monkeypatch):
    monkeypatch.setenv("MAD_SIM_ROOT", str(tmp_path))
    overrides = [f"{group}={option}"]
    if group == "sfm/feature":  # some features need their own matcher (checked by check_sfm_config)
        matcher = {"xfeat": "lighterglue", "sift": "nn_mutual"}.get(option, "nn_mutual")
        overrides.append(f"sfm/matcher={matcher}")
    if group == "dataset" and option == "custom":  # a custom dataset has no default class
        overrides += [f"dataset.root={tmp_path}", "class=widget"]
    if group == "sfm/matcher" and option == "lighterglue":
        overrides.append("sfm/feature=xfeat")
    cfg = compose_config(tmp_path, overrides)
    assert cfg["class"]  # a class is always chosen
    assert cfg.dataset.name and cfg.sfm.feature and cfg.sfm.matcher and cfg.splat and cfg.scorer


def test_every_group_has_options():
    for group in GROUPS:
        if group not in ("experiment", "debug"):
            assert options(group), f"config group {group} has no options"


# What each task composes beyond the shared nodes (conf/task/*.yaml); run_dir and inputs come with detect.
TASK_NODES = {"evaluate": set(), "detect": {"detect", "run_dir", "inputs"},
              "serve": {"detect", "run_dir", "inputs", "serve"}, "watch": {"detect", "run_dir", "inputs", "watch"}}


@pytest.mark.parametrize("task", sorted(TASK_NODES))
def test_each_task_composes_only_the_nodes_it_reads(tmp_path, task):
    cfg = compose_config(tmp_path, [] if task == "evaluate" else [f"task={task}"])
    assert cfg.task == task  # code reads the task's name as a string
    optional = {"detect", "run_dir", "inputs", "serve", "watch"}
    assert optional & set(cfg) == TASK_NODES[task]


def test_task_settings_are_overridden_under_their_task(tmp_path, monkeypatch):
    cfg = compose_config(tmp_path, ["task=serve", "serve.port=8123", "serve.max_batch=8", "detect.batch_size=16",
                                    f"run_dir={tmp_path}"])
    assert (cfg.serve.port, cfg.serve.max_batch, cfg.detect.batch_size, cfg.run_dir) == (8123, 8, 16, str(tmp_path))
    cfg = compose_config(tmp_path, ["task=watch", f"watch.dir={tmp_path}", "watch.once=true", "detect.threshold=0.5"])
    assert (cfg.watch.dir, cfg.watch.once, cfg.detect.threshold) == (str(tmp_path), True, 0.5)
    cfg = compose_config(tmp_path, ["task=detect", "inputs=a.png", "debug=fast"])
    assert cfg.inputs == "a.png" and cfg.splat.steps == 40  # debug still applies on top


def test_the_detectors_packaged_defaults_are_what_task_detect_composes(tmp_path):
    from splatpose.detect.detector import default_detect_config

    cfg = compose_config(tmp_path, ["task=detect"])
    assert OmegaConf.to_container(default_detect_config()) == OmegaConf.to_container(cfg.detect)


def test_task_options_are_the_tasks_run_py_dispatches():
    from splatpose.config_checks import TASKS

    assert options("task") == sorted(TASKS)


def test_unknown_task_is_a_clear_error_listing_the_tasks(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as error:
        compose_config(tmp_path, ["task=foo"])
    message = str(error.value)
    assert "task/foo" in message and all(task in message for task in TASK_NODES)


def test_class_override_and_default(tmp_path):
    cfg = compose_config(tmp_path)
    assert cfg["class"] == cfg.dataset.default_class
    cfg = compose_config(tmp_path, ["dataset=mad_sim", "class=01Gorilla", f"dataset.root={tmp_path}"])
    assert cfg["class"] == "01Gorilla"


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_cli_help_lists_groups_and_choices():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    for text in ("dataset: custom, folder, mad_sim, parts, synthetic", "sfm/matcher:", "lightglue", "scorer:", "splat:"):
        assert text in out.stdout


def test_cli_prints_the_composed_config(tmp_path):
    out = run_cli("dataset=mad_sim", "class=01Gorilla", f"dataset.root={tmp_path}", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    printed = OmegaConf.create(out.stdout)
    assert printed["class"] == "01Gorilla" and printed.dataset.name == "mad_sim"
