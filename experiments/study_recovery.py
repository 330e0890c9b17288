"""Study: pose recovery through the splats from no pose at all, on a finished run's test images.

For every test image of the run's class, :class:`splatpose.refine.recovery.PoseRecovery` recovers the
pose from the search views alone (PnP is ignored), and the result is compared with the true
test pose (generated data). Two images that must not be recovered are added: a blank white image and a
foreign object (a test image of ``--foreign-class``, or the query flipped upside down with its part's
colours inverted: a channel swap would leave a green or grey part as it was).
Also printed: the alignment confidence of the run's own final poses (the PnP/refined poses), which is
what the acceptance thresholds must let through.

    python experiments/study_recovery.py outputs/runs/synthetic/01Ant/<time> [--set refine.recovery.steps=[20,10,10]]

Writes a JSON with per-image rows next to ``--out`` (default: stdout only). Tune on the built-in
family only (experiments/PROTOCOL.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from splatpose.data import resolve_dataset
from splatpose.data.cameras import rotation_error_deg
from splatpose.data.mad_sim import read_image
from splatpose.refine.queries import default_refine_config, make_search_views
from splatpose.refine.recovery import PoseRecovery, alignment_confidence, foreground_mask
from splatpose.splat.ply import load_gaussians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--set", nargs="*", default=[], help="overrides of the refine node, e.g. recovery.rolls=24")
    parser.add_argument("--limit", type=int, default=None, help="first N test images only")
    parser.add_argument("--foreign-class", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)

    results = json.loads((args.run_dir / "results.json").read_text())
    run_cfg = OmegaConf.create(results["config"])
    cfg = OmegaConf.merge(default_refine_config(), OmegaConf.from_dotlist(args.set))
    data = resolve_dataset(run_cfg.dataset, str(run_cfg["class"]))
    gaussians = load_gaussians(Path(results["gaussians_ply"]), "cpu")
    backend = run_cfg.splat.get("backend", "auto")
    start = time.perf_counter()
    reference = make_search_views(gaussians, data.K, data.width, data.height, data.train_w2c, cfg.recovery, backend)
    print(f"{len(reference.w2c)} search views rendered in {time.perf_counter() - start:.1f} s")
    recovery = PoseRecovery(gaussians, data.K, data.width, data.height, reference, cfg.recovery, backend=backend,
                            gradients=cfg.get("gradients", "auto"), max_size=cfg.get("max_size"),
                            enclosed_white=cfg.get("enclosed_white", "background"))  # as the refine stage
    final_poses = json.loads((Path(results["stage_dirs"]["refine"]) / "refined_poses.json").read_text()) \
        if (Path(results["stage_dirs"]["refine"]) / "refined_poses.json").exists() else []
    final = {e["name"]: np.asarray(e["w2c"]) for e in final_poses}

    rows = []
    tests = data.test[: args.limit] if args.limit else data.test
    for test in tests:
        query = torch.from_numpy(read_image(test.path)).permute(2, 0, 1)
        result = recovery.recover(query)
        truth = data.test_poses[test.name]
        row = {"name": test.name, "defect": test.defect, **result.summary(),
               "rotation_error_deg": rotation_error_deg(result.w2c, truth)}
        if test.name in final:
            row["run_pose"] = {"rotation_error_deg": rotation_error_deg(final[test.name], truth),
                               **alignment_confidence(gaussians, final[test.name], query, data.K,
                                                      recovery.backend, recovery.enclosed_white).summary()}
        rows.append(row)
        print(json.dumps(row))
    controls = {"blank": np.ones_like(read_image(data.test[0].path))}
    if args.foreign_class:
        foreign = resolve_dataset(run_cfg.dataset, args.foreign_class)
        controls["foreign"] = read_image(foreign.test[0].path)
    else:
        image = read_image(data.test[0].path)[::-1].copy()
        part = foreground_mask(torch.from_numpy(image).permute(2, 0, 1)).permute(1, 2, 0).numpy() > 0
        controls["foreign"] = np.where(part, 1.0 - image, image)
    for name, image in controls.items():
        result = recovery.recover(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        row = {"name": f"control:{name}", **result.summary()}
        rows.append(row)
        print(json.dumps(row))
    errors = np.array([r["rotation_error_deg"] for r in rows if "rotation_error_deg" in r])
    accepted = [r for r in rows if "rotation_error_deg" in r and r["accepted"]]
    summary = {"run": str(args.run_dir), "overrides": args.set, "n": len(errors),
               "accepted": len(accepted), "within_1deg": int((errors <= 1.0).sum()),
               "accepted_within_1deg": sum(r["rotation_error_deg"] <= 1.0 for r in accepted),
               "median_rotation_error_deg": float(np.median(errors)) if len(errors) else None,
               "median_seconds": float(np.median([r["seconds"] for r in rows])),
               "controls_accepted": [r["name"] for r in rows if r["name"].startswith("control:") and r["accepted"]],
               "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
