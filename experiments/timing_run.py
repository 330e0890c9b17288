"""A run folder for timing the detector when the evaluation run could not finish (GPU suite fallback).

The detector needs a finished run: results.json naming an SfM stage folder, a Gaussians PLY, the
config and the map normalisation. When the pipeline got through the SfM stage but failed later (say
in the splat stage), this script completes a run folder from what is there: the SfM stage folder of
the cache, Gaussians initialised at the SfM points (untrained: the renders are blobs, the anomaly
maps meaningless), and ``map_range = [0, 1]``. Latency does not depend on what the Gaussians look
like, only on how many there are; every number measured on such a run is labelled by its
``"timing_only"`` flag in results.json.

    python experiments/timing_run.py --run-dir /tmp/run_eval --cache /tmp/cache
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from splatpose.splat.gaussians import init_gaussians
from splatpose.splat.ply import save_ply


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="the failed run's folder (holds config_resolved.yaml)")
    parser.add_argument("--cache", type=Path, required=True, help="the stage cache it used")
    args = parser.parse_args(argv)
    sfm_dirs = sorted(p.parent for p in args.cache.glob("sfm/*/reference.json"))
    if not sfm_dirs:
        raise SystemExit(f"{args.cache}/sfm: no finished SfM stage; nothing to time the detector with")
    config = OmegaConf.load(args.run_dir / "config_resolved.yaml")
    points = np.load(sfm_dirs[-1] / "points.npz")
    ply = save_ply(init_gaussians(points["xyz"], points["rgb"], sh_degree=int(config.splat.sh_degree)),
                   args.run_dir / "timing_gaussians.ply")
    results = {"timing_only": True, "metrics": {}, "map_range": [0.0, 1.0],
               "stage_dirs": {"sfm": str(sfm_dirs[-1])}, "gaussians_ply": str(ply),
               "config": OmegaConf.to_container(config, resolve=True)}
    (args.run_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"timing-only run folder: {args.run_dir} ({len(points['xyz'])} Gaussians at the SfM points)")
    return args.run_dir


if __name__ == "__main__":
    main()
