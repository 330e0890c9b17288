"""Where a splat training step spends its time on the host: ``train_splats`` under cProfile.

On a GPU the step is bound by Python and kernel launches (gsplat's forward + backward is ~4.5 ms of a
~11 ms step at 400x400, experiments/results/splat_gpu.md). cProfile's own time per function shows the
host work, and a host sync shows up as time inside the call that waited (``item``, ``nonzero``,
boolean indexing, a copy from pageable memory).

    python experiments/profile_splat_step.py --data <dataset root> --class-name 02Airplane --steps 1500 \\
        --out profile.txt [--set strategy._target_=gsplat.strategy.DefaultStrategy]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--class-name", default="02Airplane")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--set", nargs="*", default=[], help="splat config overrides, key=value")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from splatpose.data.mad_sim import load_class
    from splatpose.splat.train import METRICS_NAME, train_splats

    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "splat" / f"{args.preset}.yaml"),
                          OmegaConf.from_dotlist([f"steps={args.steps}", f"eval.every_n_steps={args.steps}",
                                                  f"checkpoint_every={args.steps}", "eval.save_renders=false",
                                                  *args.set]))
    data = load_class(args.data, args.class_name)
    work = Path(tempfile.mkdtemp(prefix="splat-profile-"))
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    train_splats(data, None, None, cfg, work, {"accelerator": accelerator, "devices": 1,
                                               "enable_progress_bar": False, "logger": False})
    profiler.disable()
    wall = time.perf_counter() - start
    metrics = json.loads((work / METRICS_NAME).read_text())
    summary = (f"{args.class_name} {args.steps} steps ({' '.join(args.set) or 'config as is'}): wall {wall:.1f} s, "
               f"fit {metrics['train_seconds']:.1f} s = {1000 * metrics['train_seconds'] / args.steps:.2f} ms/step, "
               f"{metrics['num_gaussians']} Gaussians, PSNR {metrics['psnr']:.2f}")
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(summary + "\n" + text.getvalue())
    print(summary, flush=True)


if __name__ == "__main__":
    main()
