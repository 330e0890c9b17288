"""Does a cheaper refinement of PnP poses keep them as good? Seconds, renders and pose errors per variant.

On a finished run of generated data (true test poses), every query that PnP localized (the run's localize
stage, ``query_poses.json``) is refined from its PnP pose by each variant (overrides of
conf/refine/lbfgs.yaml; "default": the file as it is), the variants interleaved query by query so that a load swing
on shared cores hits them alike. Per variant: seconds per query (median, mean), renders per query (forward
and backward, line-search probes included), rotation error against the true pose (median, mean, worst,
within 1 deg) and camera-centre error (median, % of the camera distance).

    python experiments/study_refine_speed.py <run dir> [--variants NAME ...] [--limit N] [--out results.json]

With ``--render-bench``: instead, the cost of one render forward and backward at each refinement level,
``splatpose.splat.rendering.render`` (SH colours and covariances from quats and scales at every render)
against the refiner's own (covariances once per scene, colours once per level), alternated 30 times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from splatpose.data import resolve_dataset
from splatpose.data.cameras import camera_center, center_error, rotation_error_deg
from splatpose.data.mad_sim import read_image
from splatpose.refine import PoseRefiner, apply_increment, default_refine_config
from splatpose.splat.ply import load_gaussians
from splatpose.splat.rendering import render

# name -> overrides of conf/refine/lbfgs.yaml
# conf/refine/lbfgs.yaml's levels at 26a5c23 (the study's "before"), pinned so the rows stay reproducible
THREE_LEVELS = {"levels": [0.5, 1.0, 1.0], "steps": [20, 10, 20], "blur": [0.02, 0.005, 0.005]}
BEFORE = {**THREE_LEVELS, "rotation_centre": "camera", "first_step": None, "colours_per_level": False,
          "stop_patience": 0}
NEW = {**THREE_LEVELS, "rotation_centre": "object", "first_step": 0.01, "colours_per_level": True,
       "stop_patience": 4, "stop_tolerance": 1e-3}
VARIANTS = {
    "default": {},
    "before": BEFORE,
    "camera, colours, first_step 0.01": {**BEFORE, "colours_per_level": True, "first_step": 0.01},
    "camera, colours, first_step 0.01, stop 1e-3 x4": {**BEFORE, "colours_per_level": True, "first_step": 0.01,
                                                       "stop_tolerance": 1e-3, "stop_patience": 4},
    "object, colours, first_step 0.01": {**NEW, "stop_patience": 0},
    "object, colours, first_step 0.01, stop 1e-3 x4": NEW,
    "object, colours, first_step 0.01, stop 1e-4 x4": {**NEW, "stop_tolerance": 1e-4},
    "object, first_step 0.01, stop 1e-3 x4": {**NEW, "colours_per_level": False},
    "object, colours, first_step 0.01, stop 1e-3 x3": {**NEW, "stop_patience": 3},
    # the default since this study
    "object, colours, first_step 0.01, stop 1e-3 x4, levels [0.5, 1.0]": {**NEW, "levels": [0.5, 1.0],
                                                                          "steps": [20, 30], "blur": [0.02, 0.005]},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"any of {list(VARIANTS)}")
    parser.add_argument("--limit", type=int, default=None, help="the first N localized queries only")
    parser.add_argument("--out", type=Path, default=None, help="a JSON file for the per-query rows")
    parser.add_argument("--render-bench", action="store_true", help="time one render per path and level")
    args = parser.parse_args()

    res = json.loads((args.run_dir / "results.json").read_text())
    data = resolve_dataset(OmegaConf.create(res["config"]).dataset, res["class"])
    pnp = [p for p in json.loads((Path(res["stage_dirs"]["localize"]) / "query_poses.json").read_text()) if p["success"]]
    pnp = pnp[: args.limit] if args.limit else pnp
    gaussians = load_gaussians(args.run_dir / "artifacts" / "point_cloud.ply")
    tests = {t.name: t for t in data.test}
    if args.render_bench:
        render_bench(gaussians, data, pnp[0], tests)
        return
    refiners = {name: PoseRefiner(gaussians, data.K, data.width, data.height,
                                  OmegaConf.merge(default_refine_config(), VARIANTS[name]), backend="torch")
                for name in args.variants}
    rows = []
    for entry in pnp:
        truth, start = data.test_poses[entry["name"]], np.asarray(entry["w2c"])
        query = torch.from_numpy(read_image(tests[entry["name"]].path)).permute(2, 0, 1)
        distance = np.linalg.norm(camera_center(truth))
        for name, refiner in refiners.items():
            started = time.perf_counter()
            result = refiner.refine(query, start)
            rows.append({"query": entry["name"], "variant": name, "seconds": time.perf_counter() - started,
                         "renders": result.steps, "loss_end": result.loss_end,
                         "start_deg": rotation_error_deg(start, truth),
                         "rotation_deg": rotation_error_deg(result.w2c, truth),
                         "center_pct": 100 * center_error(result.w2c, truth) / distance})
        print(entry["name"], " | ".join(f"{r['variant']}: {r['seconds']:.2f}s {r['renders']}r {r['rotation_deg']:.3f}deg"
                                       for r in rows[-len(refiners):]), flush=True)
    print(f"\n{res['class']}: {len(pnp)} PnP poses; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| variant | s/query median | s/query mean | renders/query | rot. median (deg) | rot. mean | worst | "
          "within 1 deg | centre median (% dist) |\n|---|---|---|---|---|---|---|---|---|")
    start = np.array([r["start_deg"] for r in rows if r["variant"] == args.variants[0]])
    print(f"| PnP (start) | - | - | - | {np.median(start):.3f} | {start.mean():.3f} | {start.max():.2f} | "
          f"{np.mean(start <= 1):.2f} | - |")
    for name in args.variants:
        mine = [r for r in rows if r["variant"] == name]
        sec, rot = np.array([r["seconds"] for r in mine]), np.array([r["rotation_deg"] for r in mine])
        print(f"| {name} | {np.median(sec):.2f} | {sec.mean():.2f} | {np.mean([r['renders'] for r in mine]):.1f} | "
              f"{np.median(rot):.3f} | {rot.mean():.3f} | {rot.max():.2f} | {np.mean(rot <= 1):.2f} | "
              f"{np.median([r['center_pct'] for r in mine]):.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                                        "run_dir": str(args.run_dir), "class": res["class"], "rows": rows}, indent=1))


def render_bench(gaussians, data, entry: dict, tests: dict, repeats: int = 30) -> None:
    """Milliseconds of one render forward and backward through the pose, per level and path (median)."""
    refiner = PoseRefiner(gaussians, data.K, data.width, data.height, default_refine_config(), backend="torch")
    query = torch.from_numpy(read_image(tests[entry["name"]].path)).permute(2, 0, 1)
    w2c = torch.as_tensor(entry["w2c"], dtype=torch.float64)
    for level in refiner.levels:
        target, mask = refiner._target(query, level)
        colours = refiner.scene.colours(w2c)

        def once(path: str) -> float:
            xi = torch.zeros(6, dtype=torch.float64, requires_grad=True)
            started = time.perf_counter()
            pose = apply_increment(xi, w2c)
            if path == "render()":
                rgb, alpha = render(gaussians, pose[None], level.K, level.width, level.height, backend="torch",
                                    return_alpha=True)
                rgb, alpha = rgb.permute(0, 3, 1, 2), alpha.permute(0, 3, 1, 2)
            else:
                rgb, alpha = refiner._render(pose, level, colours)
            rgb, alpha = refiner._blurred(level, rgb, alpha)
            refiner._loss(rgb, alpha, target, mask, level.loss).backward()
            return time.perf_counter() - started

        times = {"render()": [], "refiner (covariances once, colours per level)": []}
        for _ in range(repeats):
            for path in times:
                times[path].append(once(path))
        print(f"{level.width}x{level.height}: " + " | ".join(f"{path} {1000 * np.median(t):.1f} ms"
                                                          for path, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
