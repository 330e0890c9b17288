"""Do final poses gain from more refinement? On a finished run of generated data (true test poses), every
query whose final pose came by the given path (recovered, pnp) is refined once more by each variant below
(overrides of conf/refine/lbfgs.yaml), and the rotation errors before and after are compared.

    python experiments/study_polish.py outputs/runs/synthetic/07PlainMug/<time> [recovered|pnp|all] [variant ...]
"""
import json, sys, time
import numpy as np, torch
from omegaconf import OmegaConf
from splatpose.data import resolve_dataset
from splatpose.data.mad_sim import read_image
from splatpose.data.cameras import rotation_error_deg
from splatpose.refine import PoseRefiner, default_refine_config
from splatpose.splat.ply import load_gaussians
from splatpose.scoring.anomaly_maps import build_scorer
run = sys.argv[1]
path = sys.argv[2] if len(sys.argv) > 2 else "recovered"
res = json.load(open(f"{run}/results.json"))
cfg = OmegaConf.create(res["config"])
data = resolve_dataset(cfg.dataset, res["class"])
refined = json.load(open(f"{res['stage_dirs']['refine']}/refined_poses.json"))
g = load_gaussians(f"{run}/artifacts/point_cloud.ply")
base = default_refine_config()
variants = {
    "1.0 x10 l1_sil": {"levels": [1.0], "steps": 10, "blur": 0.005},
    "1.0 x20 l1_sil": {"levels": [1.0], "steps": 20, "blur": 0.005},
    "c2f 0.5x20+1.0x10": {},
    "1.0 x20 l1": {"levels": [1.0], "steps": 20, "blur": 0.0, "loss": "l1"},
    # feature-metric: the scorer backbone's features (its levels), full size
    "1.0 x20 feature": {"levels": [1.0], "steps": 20, "blur": 0.0, "loss": "feature"},
}
tests = {t.name: t for t in data.test}
chosen = sys.argv[3:] or list(variants)
for name, over in ((n, variants[n]) for n in chosen):
    scorer = build_scorer(cfg.scorer, "cpu") if over.get("loss") == "feature" else None
    refiner = PoseRefiner(g, data.K, data.width, data.height, OmegaConf.merge(base, over), backend="torch",
                          scorer=scorer)
    before, after, secs = [], [], []
    for e in refined:
        if path != "all" and e["path"] != path: continue
        truth = data.test_poses[e["name"]]
        q = torch.from_numpy(read_image(tests[e["name"]].path)).permute(2, 0, 1)
        t = time.time(); r = refiner.refine(q, np.asarray(e["w2c"])); secs.append(time.time() - t)
        before.append(rotation_error_deg(np.asarray(e["w2c"]), truth)); after.append(rotation_error_deg(r.w2c, truth))
    b, a = np.array(before), np.array(after)
    print("  per query (before -> after, deg, misses > 1 deg either way):",
          [f"{x:.2f}->{y:.2f}" for x, y in zip(b, a) if max(x, y) > 1.0])
    print(f"{path} {name}: within1 {np.mean(b<=1):.2f} -> {np.mean(a<=1):.2f}; median {np.median(b):.3f} -> {np.median(a):.3f}; worst {b.max():.2f} -> {a.max():.2f}; s/query {np.median(secs):.1f}", flush=True)
