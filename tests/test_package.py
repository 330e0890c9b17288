"""The installable package: a real (non-editable) wheel, installed into a folder of its own and used from
outside the checkout, with its configs packaged.

The wheel is built from a copy of the project's files (so that the build's build/ and *.egg-info stay out
of the checkout), installed with ``pip install --no-deps --target``; its dependencies come from this
interpreter's environment. Subprocesses run from a folder outside the checkout with only the installed
copy on PYTHONPATH (first on sys.path: the venv's editable finder comes after it, and the test asserts
which copy was imported). The run is tests/conftest.py's ``tiny_run``.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import TINY_DETECT
from loopback import free_loopback_port  # tests/loopback.py

ROOT = Path(__file__).resolve().parents[1]

# Run by the installed copy, from outside the checkout.
INSTALLED_SCRIPT = """
import json, sys
from pathlib import Path
import splatpose
from splatpose import Detector
from splatpose.detect.detector import default_detect_config
from splatpose.refine.queries import default_refine_config
from splatpose.sfm.config import compose_sfm_config, default_conf_dir

run_dir, image, detect = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
detector = Detector.from_run(run_dir, detect, device="cpu")
print(json.dumps({
    "file": splatpose.__file__,
    "conf_dir": str(default_conf_dir()),
    "refine_steps": list(default_refine_config().steps),
    "detect_batch_size": int(default_detect_config().batch_size),
    "sfm_feature": str(compose_sfm_config().feature.name),
    "score": float(detector.detect(image).score),
}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder, working folder outside the checkout, environment) of the wheel installed there."""
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "conf", src / "conf", ignore=ignore)
    shutil.copytree(ROOT / "splatpose", src / "splatpose", symlinks=True, ignore=ignore)
    assert (src / "splatpose" / "conf").is_symlink(), "splatpose/conf should link to the repository's conf/"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "wheel"), str(src)],
                   check=True, capture_output=True, text=True, timeout=300)
    wheel, = (tmp / "wheel").glob("splatpose-*.whl")
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    work = tmp / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), WANDB_MODE="offline")
    return site, work, env


def test_the_wheel_holds_every_config(installed):
    site, _, _ = installed
    packaged = sorted(p.relative_to(site / "splatpose" / "conf") for p in (site / "splatpose" / "conf").rglob("*.yaml"))
    in_checkout = sorted(p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml"))
    assert packaged == in_checkout
    assert not (site / "splatpose" / "conf").is_symlink()
    assert (site / "bin" / "splatpose-serve").is_file()


def test_installed_detector_works_outside_the_checkout(installed, tiny_run, tiny_run_images, tiny_detector):
    site, work, env = installed
    run_dir, _ = tiny_run
    image = tiny_run_images["defect"]
    proc = subprocess.Popen([sys.executable, "-c", INSTALLED_SCRIPT, str(run_dir), str(image),
                             json.dumps(TINY_DETECT)], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    expected = tiny_detector.detect(image).score  # the checkout's Detector, while the installed one loads
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-4000:]
    got = json.loads(stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(site.resolve()), got["file"]
    assert Path(got["conf_dir"]).resolve() == (site / "splatpose" / "conf").resolve()
    assert got["refine_steps"] and got["detect_batch_size"] > 0 and got["sfm_feature"]
    assert got["score"] == pytest.approx(float(expected), abs=1e-6)


def test_installed_console_script_serves_a_finished_run(installed, tiny_run):
    site, work, env = installed
    run_dir, _ = tiny_run
    port = free_loopback_port()
    server = subprocess.Popen([str(site / "bin" / "splatpose-serve"), str(run_dir), "--port", str(port),
                               "--device", "cpu"], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read()[-4000:]
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "splatpose-serve did not answer /health within 60 s"
                time.sleep(0.2)
        assert response.status_code == 200
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# Run with the named modules made unimportable (as if their extra were not installed): each use names
# its extra in a one-line error.
MISSING_EXTRAS_SCRIPT = """
import json, sys
from omegaconf import OmegaConf

BLOCK = {"wandb", "mitsuba", "pyvista", "hydra_plugins.hydra_joblib_launcher"}


class Block:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in BLOCK or name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(name)


sys.meta_path.insert(0, Block)
sys.path.insert(0, sys.argv[1])  # the checkout, for run.py
from run import check_launcher
from splatpose.data.resolve import resolve_dataset
from splatpose.errors import MissingExtraError
from splatpose.tasks import build_loggers

wandb = OmegaConf.create({"logger": {"wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger"}}})
uses = [("sweeps", lambda: check_launcher(["-m", "hydra/launcher=joblib"])),
        ("wandb", lambda: build_loggers(wandb)),
        ("datasets", lambda: resolve_dataset({"name": "parts", "root": sys.argv[2]}, "01Knob")),
        ("datasets", lambda: resolve_dataset({"name": "synthetic", "root": sys.argv[2]}, "01Ant"))]
messages = []
for extra, use in uses:
    try:
        use()
    except MissingExtraError as error:
        messages.append([extra, str(error)])
print(json.dumps(messages))
"""


def test_a_missing_extra_is_one_line_naming_the_extra(tmp_path):
    proc = subprocess.run([sys.executable, "-c", MISSING_EXTRAS_SCRIPT, str(ROOT), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    messages = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [extra for extra, _ in messages] == ["sweeps", "wandb", "datasets", "datasets"]
    for extra, message in messages:
        assert "\n" not in message and f"pip install 'splatpose[{extra}]'" in message, message


def test_the_extras_of_pyproject_cover_the_optional_modules():
    import tomllib

    from splatpose.errors import EXTRAS

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    core = " ".join(project["dependencies"])
    for extra, package in EXTRAS.values():
        assert any(dep.startswith(f"{package}==") for dep in extras[extra]), (extra, package)
        assert package not in core, f"{package} is an extra ({extra}), not a core dependency"
    assert set(extras) >= {"serve", "datasets", "wandb", "sweeps", "all", "test"}
    assert "splatpose[all]" in extras["test"]  # make setup installs .[all,test]: every extra for the tests
