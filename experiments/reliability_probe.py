"""Re-run the cheap cases of issue 21's probe against a checkout and print one line per case.

    python experiments/reliability_probe.py --repo /work/main          # before (the main checkout)
    python experiments/reliability_probe.py --repo .                   # after (this branch)

Every case runs in a subprocess whose working folder is ``--repo``, so it imports that checkout's
``splatpose`` and runs its ``run.py``; everything it writes goes to a temporary folder. The slow cases
of the issue (whole pipeline runs) are covered by tests/test_stage_determinism.py and the table in
experiments/results/reliability_probe_2026-12-05.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

MAKE_CLASS = """
import json, numpy as np
from pathlib import Path
from PIL import Image
def make_class(root, n=4, size=32):
    rng = np.random.default_rng(0); c = Path(root) / "widget"
    for f in ("train/good", "test/good", "test/Burrs", "ground_truth/Burrs"):
        (c / f).mkdir(parents=True, exist_ok=True)
    frames = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(c / f"train/good/{i}.png")
        m = np.eye(4); m[2, 3] = 3.0 + i
        frames.append({"file_path": f"./train/good/{i}", "transform_matrix": m.tolist()})
    (c / "transforms.json").write_text(json.dumps({"camera_angle_x": 0.8, "frames": frames}))
    for name in ("test/good/0.png", "test/Burrs/0.png"):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(c / name)
    Image.fromarray(np.eye(size, dtype=np.uint8) * 255).save(c / "ground_truth/Burrs/0_mask.png")
    return c
"""


def python(repo: Path, code: str, timeout: float = 120) -> str:
    """Run ``code`` with ``repo`` as working folder (its splatpose first on the path); its last output line."""
    proc = subprocess.run([sys.executable, "-c", MAKE_CLASS + textwrap.dedent(code)], cwd=repo,
                          capture_output=True, text=True, timeout=timeout)
    lines = (proc.stdout.strip() or proc.stderr.strip() or "(no output)").splitlines()
    return lines[-1]


def cli(repo: Path, args: list[str], tmp: Path, timeout: float) -> tuple[int | None, float, str]:
    """``python run.py args`` in ``repo``: (exit status or None on timeout, seconds, stdout + stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(SPLATPOSE_CACHE=str(tmp / "cache"), WANDB_MODE="offline")
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "run.py", *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=timeout)
        return proc.returncode, time.perf_counter() - start, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as timed_out:
        out = (timed_out.stdout or b"").decode(errors="replace") + (timed_out.stderr or b"").decode(errors="replace")
        return None, time.perf_counter() - start, out


def describe_failure(status, seconds: float, output: str) -> str:
    if status is None:
        return f"no error after {seconds:.0f} s (still running, stopped by the probe)"
    errors = [line for line in output.splitlines()
              if ("Error" in line or "[ERROR]" in line) and "HYDRA_FULL_ERROR=1 for a" not in line]
    message = errors[-1] if errors else output.strip().splitlines()[-1]
    core = message.split(": ")[-1][:60]  # the message's last clause: how often is it printed?
    return (f"exit {status} after {seconds:.1f} s; {output.count('Traceback')} traceback(s), "
            f"{len(output.splitlines())} lines, message printed {output.count(core)}x: {message[-170:]}")


# ---------------------------------------------------------------------------------------------- cases


def case_resume(repo: Path, tmp: Path) -> str:
    return python(repo, f"""
    import random, numpy as np, torch, sys
    sys.path.insert(0, "tests")
    from test_splat_training import tiny_class, tiny_config, trainer_kwargs, StopAt
    from splatpose.splat.train import train_splats
    data = tiny_class.__wrapped__(type("F", (), {{"mktemp": lambda self, n: Path("{tmp}") / n}})())
    def seed(s): random.seed(s); np.random.seed(s); torch.manual_seed(s)
    cfg = tiny_config()
    seed(0); whole = train_splats(data, None, None, cfg, Path("{tmp}/whole"), trainer_kwargs())
    seed(0)
    try: train_splats(data, None, None, cfg, Path("{tmp}/killed"), trainer_kwargs(StopAt(10)))
    except RuntimeError: pass
    seed(0); resumed = train_splats(data, None, None, cfg, Path("{tmp}/killed"), trainer_kwargs())
    import plyfile
    a, b = (np.stack([plyfile.PlyData.read(p)["vertex"][k] for k in ("x", "y", "z")], 1) for p in (whole, resumed))
    same = whole.read_bytes() == resumed.read_bytes()
    diff = "n/a" if len(a) != len(b) else f"{{np.abs(a - b).max():.2e}}"
    print(f"resumed == uninterrupted bytes: {{same}}; Gaussians {{len(a)}} vs {{len(b)}}; max |means diff| {{diff}}")
    """, timeout=300)


def case_16bit_grey(repo: Path, tmp: Path) -> str:
    return python(repo, f"""
    import numpy as np
    from PIL import Image
    from splatpose.data.mad_sim import read_image
    grey = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(grey).save("{tmp}/g16.png")
    v = read_image("{tmp}/g16.png")
    print(f"mean {{v.mean():.3f}} (true {{grey.mean() / 65535:.3f}}), white pixels {{(v == 1).all(-1).mean():.0%}}")
    """)


def case_modes(repo: Path, tmp: Path) -> str:
    return python(repo, f"""
    import numpy as np
    from PIL import Image
    from splatpose.data.mad_sim import read_image
    y, x = np.mgrid[0:48, 0:32]
    rgb = np.stack([x * 8, y * 5, (x + 2 * y) % 256], -1).astype(np.uint8)
    out = []
    p = Image.fromarray(rgb).quantize(64); p.save("{tmp}/p.png")
    out.append("palette " + ("ok" if np.array_equal(read_image("{tmp}/p.png"), np.asarray(p.convert("RGB"), np.float32) / 255) else "WRONG"))
    la = np.stack([rgb[..., 0], np.full((48, 32), 255, np.uint8)], -1); Image.fromarray(la, "LA").save("{tmp}/la.png")
    out.append("grey+alpha " + ("ok" if np.array_equal(read_image("{tmp}/la.png")[..., 0], rgb[..., 0] / np.float32(255)) else "WRONG"))
    exif = Image.Exif(); exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb))).save("{tmp}/r.jpg", quality=100, exif=exif)
    v = read_image("{tmp}/r.jpg")
    out.append("EXIF-rotated JPEG " + ("upright" if v.shape[:2] == (48, 32) and np.abs(v * 255 - rgb).mean() < 3 else f"NOT upright (shape {{v.shape[:2]}})"))
    print("; ".join(out))
    """)


def case_jpeg_named_png(repo: Path, tmp: Path) -> str:
    return python(repo, f"""
    import shutil
    c = make_class("{tmp}/ds")
    from PIL import Image
    Image.open(c / "train/good/1.png").convert("RGB").save(c / "x.jpg", quality=95)
    shutil.move(c / "x.jpg", c / "train/good/1.png")
    from splatpose.data.mad_sim import load_class, read_image
    try:
        load_class(c.parent, "widget"); print("data stage: read as JPEG, shape", read_image(c / "train/good/1.png").shape)
    except Exception as e: print("data stage:", type(e).__name__, str(e)[-120:])
    """)


def case_runs_same_second(repo: Path, tmp: Path) -> str:
    python(repo, f"make_class('{tmp}/ds')")
    from omegaconf import OmegaConf

    template = OmegaConf.to_container(OmegaConf.load(repo / "conf/hydra/default.yaml"))["run"]["dir"]
    run_dir = str(tmp / template.replace("${now:%Y-%m-%d_%H-%M-%S}", "2026-12-05_01-00-00"))
    env = {**os.environ, "SPLATPOSE_CACHE": str(tmp / "cache")}
    # seed=-1 fails the config check right after the run claims its folder (an unknown task= would fail in
    # Hydra's composition, before any folder exists)
    command = [sys.executable, "run.py", "dataset=custom", f"dataset.root={tmp / 'ds'}", "class=widget",
               "seed=-1", f"hydra.run.dir={run_dir}"]
    procs = [subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    folders = sorted((tmp / "outputs/runs/custom/widget").iterdir())
    lines = {line for out in outputs for line in out.splitlines() if line.startswith("Outputs:")}
    return f"{len(folders)} folder(s) ({', '.join(f.name for f in folders)}); {len(lines)} distinct 'Outputs:' line(s)"


def case_fail_fast(repo: Path, tmp: Path, overrides: list[str], damage: bool = False, timeout: float = 60) -> str:
    python(repo, f"""
    c = make_class('{tmp}/ds')
    if {damage}:
        p = c / "train/good/2.png"; d = bytearray(p.read_bytes()); d[len(d) // 2:len(d) // 2 + 16] = bytes(16)
        p.write_bytes(bytes(d))
    """)
    status, seconds, output = cli(repo, ["dataset=custom", f"dataset.root={tmp / 'ds'}", "class=widget", "logger=none",
                                         f"hydra.run.dir={tmp / 'run'}", *overrides], tmp, timeout)
    return describe_failure(status, seconds, output)


def case_missing_transforms(repo: Path, tmp: Path) -> str:
    python(repo, f"c = make_class('{tmp}/ds'); (c / 'transforms.json').unlink()")
    status, seconds, output = cli(repo, ["dataset=custom", f"dataset.root={tmp / 'ds'}", "class=widget", "logger=none",
                                         f"hydra.run.dir={tmp / 'run'}"], tmp, 90)
    return describe_failure(status, seconds, output)


def case_messages(repo: Path, tmp: Path) -> str:
    return python(repo, f"""
    import json, numpy as np
    from splatpose.data.mad_sim import load_class, read_image
    out = []
    c = make_class("{tmp}/ds")
    meta = json.loads((c / "transforms.json").read_text()); meta["frames"][1]["transform_matrix"][0][3] = float("nan")
    (c / "transforms.json").write_text(json.dumps(meta))
    try: load_class(c.parent, "widget")
    except Exception as e: out.append("NaN pose: " + str(e).split(": ", 1)[1][:90])
    (c.parent / "empty.png").write_bytes(b"")
    try: read_image(c.parent / "empty.png")
    except Exception as e: out.append("empty file: " + str(e).split(": ", 1)[1][:70])
    print(" | ".join(out))
    """)


def case_detector_glob(repo: Path, tmp: Path) -> str:
    return python(repo, f"""
    import logging, io
    stream = io.StringIO(); logging.basicConfig(stream=stream, level=logging.WARNING)
    c = make_class("{tmp}/ds")
    from splatpose.detect.inputs import expand_inputs
    paths = expand_inputs([str(c / "test/good/0.png"), str(c / "nothing/*.png")])
    print(f"{{len(paths)}} path(s); warning: {{stream.getvalue().strip()[:100] or 'none'}}")
    """)


def case_readme(repo: Path, tmp: Path) -> str:
    readme = (repo / "README.md").read_text()
    help_text = subprocess.run([sys.executable, "run.py", "--help"], cwd=repo, capture_output=True, text=True).stdout
    fast = (repo / "conf/debug/fast.yaml").read_text()
    return (f"'outputs/sweeps' in README: {'outputs/sweeps' in readme}; sift+lightglue sweep: "
            f"{'sfm/feature=aliked,sift sfm/matcher=lightglue' in readme}; debug=fast 'well under a minute': "
            f"{'well under a minute' in fast}; --help lists hydra/launcher: {'hydra/launcher:' in help_text}")


CASES = {
    "1b resume": case_resume,
    "2a 16-bit grey PNG": case_16bit_grey,
    "2b palette / grey+alpha / EXIF JPEG": case_modes,
    "2c JPEG named .png (data stage)": case_jpeg_named_png,
    "3 two runs, same second": case_runs_same_second,
    "4a splat.steps=0": lambda repo, tmp: case_fail_fast(repo, tmp, ["splat.steps=0"]),
    "4b scorer=efficientnet_b4, no weights": lambda repo, tmp: case_fail_fast(repo, tmp, ["scorer=efficientnet_b4"]),
    "4c PNG damaged in the middle": lambda repo, tmp: case_fail_fast(repo, tmp, [], damage=True),
    "5a missing transforms.json": case_missing_transforms,
    "5b NaN pose, empty file": case_messages,
    "5c detector glob matching nothing": case_detector_glob,
    "6 README and help": case_readme,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True, help="the checkout to probe")
    parser.add_argument("--only", nargs="*", help="case name prefixes, e.g. 2a 4b")
    args = parser.parse_args()
    repo = args.repo.resolve()
    results = {}
    for name, case in CASES.items():
        if args.only and not any(name.startswith(prefix) for prefix in args.only):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                results[name] = case(repo, Path(tmp))
            except Exception as error:  # a probe case that breaks is itself a finding
                results[name] = f"probe failed: {type(error).__name__}: {error}"
        print(f"{name}: {results[name]}", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
