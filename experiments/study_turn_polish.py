"""What the search of the turn about a part's axis (``refine.symmetry.polish_span_deg``) does to finished runs.

For each run folder (generated data with true test poses; queries on white, ``refine.bench`` off) every
localized final pose is polished as the pipeline's last refine step would (:class:`TurnPolish` about the
axis most of the splats' near-symmetries turn about, the run's own refinement settings and renderer), then the
pseudo-references are rendered and scored again as the pipeline does. Prints per run: within 1 deg, median
rotation error and the three metrics before (the run's results.json) and after, the queries whose error
moved by more than 0.1 deg, and the polish's seconds per query.

The pipeline polishes inside the refine stage, so the class's usual colour difference (which decides a
second opinion) is taken over polished poses there; this study polishes the final poses, so a query whose
second opinion depends on that by a hair may differ. A run of the pipeline with the setting is the check.

    python experiments/study_turn_polish.py --span 3 --step 0.25 outputs/runs/synthetic/11SheenKnob/<time> ...
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from splatpose.data import resolve_dataset
from splatpose.data.cameras import rotation_error_deg
from splatpose.data.mad_sim import read_image
from splatpose.pipeline import class_sheen_allowance, render_pseudo_references, score_and_evaluate
from splatpose.refine.pose_refinement import PoseRefiner
from splatpose.refine.queries import load_refined_poses as load_refined
from splatpose.refine.symmetry import TurnPolish, near_symmetries
from splatpose.splat.ply import load_gaussians


def study(run: Path, span: float, step: float, min_gain: float | None) -> None:
    results = json.loads((run / "results.json").read_text())
    cfg = OmegaConf.create(results["config"])
    if cfg.refine.bench.enabled:
        raise SystemExit(f"{run}: a run on a bench (refine.bench) is not studied here")
    data = resolve_dataset(cfg.dataset, results["class"])
    ply = Path(results["gaussians_ply"])
    refine_dir = Path(results["stage_dirs"]["refine"])
    refined = load_refined(refine_dir / "refined_poses.json", [t.name for t in data.test])
    gaussians = load_gaussians(ply, "cpu")
    symmetries = near_symmetries(gaussians, cfg.refine.symmetry)
    name = f"{results['dataset']}/{results['class']}"
    if not symmetries:
        print(f"| {name} | no near-symmetry: nothing polished |", flush=True)
        return
    backend = cfg.splat.get("backend", "auto")
    refine = OmegaConf.merge(cfg.refine, {"symmetry": {"polish_span_deg": span, "polish_step_deg": step}})
    polish = TurnPolish.configured(PoseRefiner(gaussians, data.K, data.width, data.height, refine, backend=backend),
                                   symmetries, refine)
    if min_gain is not None:
        polish.min_gain = min_gain
    before = [rotation_error_deg(p.w2c, data.test_poses[p.name]) for p in refined]
    seconds, moved = [], []
    for test, pose, old in zip(data.test, refined, before):
        if not pose.localized:
            continue
        started = time.perf_counter()
        w2c, record = polish.polish(torch.from_numpy(read_image(test.path)).permute(2, 0, 1), pose.w2c)
        seconds.append(time.perf_counter() - started)
        pose.w2c = w2c
        error = rotation_error_deg(w2c, data.test_poses[pose.name])
        if abs(error - old) > 0.1:
            gain = 1.0 - record["loss_after"] / record["loss_before"]
            moved.append(f"{pose.name} {old:.2f}->{error:.2f} ({record['turn_deg']:+.2f} deg, loss -{100 * gain:.2f} %)")
    after = [rotation_error_deg(p.w2c, data.test_poses[p.name]) for p in refined]
    with tempfile.TemporaryDirectory() as tmp:
        renders, alphas = render_pseudo_references(data, refined, ply, Path(tmp) / "renders.npz", "cpu", backend)
    allowance = class_sheen_allowance(cfg, data, ply, "cpu", backend)
    metrics = score_and_evaluate(cfg, data, renders, [], "cpu", alphas=alphas, sheen_allowance=allowance).metrics
    base = results["metrics"]
    within = lambda errors: sum(e <= 1.0 for e in errors)  # noqa: E731
    print(f"| {name} | {within(before)} -> **{within(after)}** / {len(before)} | {np.median(before):.3f} -> "
          f"{np.median(after):.3f} | {base['pixel_auroc']:.4f} / {base['aupro']:.4f} / {base['image_auroc']:.4f} -> "
          f"{metrics['pixel_auroc']:.4f} / {metrics['aupro']:.4f} / {metrics['image_auroc']:.4f} | "
          f"{np.median(seconds):.2f} | {'; '.join(moved)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--span", type=float, default=3.0, help="degrees either way (polish_span_deg)")
    parser.add_argument("--step", type=float, default=0.25, help="finest step, degrees (polish_step_deg)")
    parser.add_argument("--min-gain", type=float, default=None,
                        help="relative loss gain a turn needs (default: the run's refine.stop_tolerance)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print("| run | within 1 deg | median deg | pixel AUROC / AUPRO / image AUROC | polish s/query | moved > 0.1 deg |\n"
          "|---|---|---|---|---|---|")
    for run in args.runs:
        study(run, args.span, args.step, args.min_gain)


if __name__ == "__main__":
    main()
