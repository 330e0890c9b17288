"""The README says only what is so: its commands compose, its sweep is made of valid runs, its paths are
the ones the config writes, its config groups and launchers exist, its result files are there."""

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands(prefix: str) -> list[str]:
    """Lines of the README's code blocks that start with ``prefix``, comments and placeholders removed."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line.replace("<time>_<run id>", "2026-12-05_00-00-00_pid1") for line in lines if line.startswith(prefix)]


SINGLE_RUNS = [c for c in readme_commands("python run.py") if " -m " not in c and "--help" not in c
               and "--cfg" not in c]
SWEEPS = [c for c in readme_commands("python run.py -m")]


def test_readme_has_the_commands_this_test_checks():
    assert len(SINGLE_RUNS) >= 4 and len(SWEEPS) >= 1


@pytest.mark.parametrize("command", SINGLE_RUNS + [c for c in readme_commands("python run.py") if "--cfg" in c])
def test_documented_command_composes(command):
    args = shlex.split(command)[2:]
    if "--cfg" not in args:
        args += ["--cfg", "job"]
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def sweep_jobs(command: str) -> list[list[str]]:
    """The override lists of every job of a ``-m`` command (the basic sweeper's cartesian product)."""
    overrides = [arg for arg in shlex.split(command)[2:] if arg != "-m" and not arg.startswith("hydra/")]
    choices = [[f"{arg.split('=')[0]}={value}" for value in arg.split("=", 1)[1].split(",")] for arg in overrides]
    return [list(job) for job in itertools.product(*choices)]


@pytest.mark.parametrize("command", SWEEPS)
def test_documented_sweep_is_made_of_valid_runs(command, tmp_path):
    from splatpose.pipeline import validate_config

    jobs = sweep_jobs(command)
    assert len(jobs) > 1
    for job in jobs:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}", *job])
        validate_config(cfg)  # raises ConfigError naming the bad pair or value


def test_help_lists_every_documented_group_and_the_launchers():
    proc = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    groups = proc.stdout.split("== Config ==")[0]  # the config printed after would shadow a group (task: evaluate)
    listed = dict(line.split(": ", 1) for line in groups.splitlines() if re.match(r"^[\w/]+: \S", line))
    documented = re.findall(r"`([\w/]+)` \(([^)]*)\)", README.split("Config groups (`conf/`):")[1].split("\n\n")[0])
    assert len(documented) >= 10
    for group, options in documented:
        group = group if group in listed else f"hydra/{group}" if f"hydra/{group}" in listed else group
        assert group in listed, f"README documents group {group}, --help does not list it"
        for option in re.findall(r"[\w]+", re.sub(r"\b(by default|offline|default)\b", "", options)):
            assert option in listed[group].split(", "), f"README documents {group}={option}; --help lists {listed[group]}"


def test_documented_folders_are_the_configured_ones():
    hydra_conf = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "hydra" / "default.yaml"))
    assert hydra_conf["run"]["dir"].startswith("outputs/runs/${dataset.name}/${class}/${now:")
    assert "outputs/runs/<dataset>/<class>/<time>_<run id>/" in README
    assert hydra_conf["sweep"]["dir"].startswith("outputs/multirun/${now:")
    assert "outputs/multirun/<time>_<run id>" in README and "outputs/sweeps" not in README
    paths = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "paths" / "default.yaml"))
    assert paths["cache_dir"] == "${oc.env:SPLATPOSE_CACHE,${hydra:runtime.cwd}/.cache/splatpose}"
    assert "`.cache/splatpose/<stage>/<key>/` (or `$SPLATPOSE_CACHE`)" in README


def test_documented_result_files_exist():
    files_line = re.search(r"^Files: (.*?)\.$", README, flags=re.M | re.S).group(1)
    patterns = re.findall(r"`([^`]+)`", files_line)
    assert patterns
    for pattern in patterns:
        assert list((ROOT / "experiments" / "results").glob(pattern)), f"README names {pattern}: no such file"


def test_documented_modules_exist():
    for module in re.findall(r"python -m ([\w.]+)", README):
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
