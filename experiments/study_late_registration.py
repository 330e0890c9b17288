"""Estimated reference cameras with and without the late registration of left-over views (issue 17).

Runs the SfM stage alone (``sfm.reference_poses=estimate``) of one generated class twice, with
``sfm.estimate.late_registration`` off and on, in fresh folders, and prints per run: registered views,
the views registered late (PnP inliers, outline agreement, rotation error against the true camera after
the similarity alignment), and the median / largest camera rotation error of all registered views.

    OMP_NUM_THREADS=1 python experiments/study_late_registration.py --class-name 01Ant --out /tmp/late
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]


def compose_config(out: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={out}", *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        OmegaConf.resolve(cfg)
    return cfg


def run(class_name: str, late: bool, out: Path) -> dict:
    from splatpose.data import resolve_dataset
    from splatpose.pipeline import reference_frames
    from splatpose.sfm import build_reference
    from splatpose.sfm.estimated_poses import resolve_reference_poses

    cfg = compose_config(out, [f"class={class_name}", "sfm.reference_poses=estimate",
                               f"sfm.estimate.late_registration={str(late).lower()}"])
    data = resolve_dataset(cfg.dataset, class_name)
    sfm_cfg = resolve_reference_poses(cfg.sfm, data)
    start = time.perf_counter()
    reference = build_reference(data, sfm_cfg, out / "sfm", "cpu")
    seconds = time.perf_counter() - start
    _, _, alignment = reference_frames(data, reference, sfm_cfg)
    summary = json.loads((out / "sfm" / "reference.json").read_text())["cameras"]
    errors = dict(zip(alignment.names, alignment.rotation_errors_deg.tolist()))
    return {"late_registration": late, "seconds": round(seconds, 1),
            "registered": len(alignment.names), "views": len(data.train),
            "left_out": [v.name for v in data.train if v.name not in errors],
            "late_registered": {name: {**summary.get("late_registration", {}).get(name, {}),
                                       "rotation_error_deg": round(errors[name], 3)}
                                for name in summary.get("late_registered", [])},
            "late_tried": summary.get("late_registration", {}),
            "median_rotation_error_deg": round(float(np.median(alignment.rotation_errors_deg)), 3),
            "max_rotation_error_deg": round(float(np.max(alignment.rotation_errors_deg)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--class-name", default="01Ant")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", choices=["off", "on"], help="one of the two runs")
    args = parser.parse_args()
    for late in [v == "on" for v in ([args.only] if args.only else ["off", "on"])]:
        result = run(args.class_name, late, args.out / ("late" if late else "mapper_only"))
        print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
