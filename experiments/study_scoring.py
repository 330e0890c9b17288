"""Score finished runs again with other scorer settings, from their cached renders (no other stage runs).

For each run folder (outputs/runs/<dataset>/<class>/<time>) the test images, masks and the run's renders
and alphas are read, maps are computed with the run's own ``scorer`` node plus each variant's overrides,
and the three metrics are printed, one row per (run, variant), then each variant's mean over the runs.

    python experiments/study_scoring.py --variant base= --variant tol2=alignment_tolerance_px=2 \
        outputs/runs/synthetic/01Ant/<time> outputs/runs/synthetic/06PlainAnt/<time>
    python experiments/study_scoring.py --variant max=image_score.background_sigma=null \
        --variant s8=image_score.background_sigma=8 <runs>      # the image score alone (the maps are the same)

A variant is ``name=key=value,key=value`` (dotted keys under ``scorer``; ``name=`` alone: the run's own).
A run made before ``scorer.sheen`` existed is scored with the sheen's defaults, as the pipeline would
(the class's allowance measured from the run's splats, ``pipeline.class_sheen_allowance``), unless the
variant sets ``sheen.enabled=false``. One key is not a scorer setting but a study of one:
``denoise_h=<h>`` puts the query and the render through OpenCV's non-local-means denoising
(``fastNlMeansDenoisingColored``, filter strength h, 5 px patches, 15 px search) before scoring;
``query_denoise_h=<h>`` the query alone; ``gaussian_sigma=<px>`` and ``bilateral_sigma=<colour sigma>``
put both through kornia's Gaussian blur or its 5x5 bilateral filter (spatial sigma 1.5 px).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from splatpose.data import resolve_dataset
from splatpose.data.mad_sim import read_image, read_mask
from splatpose.metrics import evaluate, normalise_maps
from splatpose.pipeline import class_sheen_allowance
from splatpose.scoring.anomaly_maps import build_scorer
from splatpose.scoring.denoise import denoised as scorer_denoised
from splatpose.scoring.sheen import SheenSettings


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name=key=value,key=[a,b]`` -> (name, ["key=value", "key=[a,b]"]): commas inside brackets stay."""
    name, _, overrides = text.partition("=")
    return name, [o for o in re.split(r",(?![^\[]*\])", overrides) if o]


def load_run(run: Path) -> dict:
    res = json.loads((run / "results.json").read_text())
    cfg = OmegaConf.create(res["config"])
    data = resolve_dataset(cfg.dataset, res["class"])
    renders = dict(np.load(Path(res["stage_dirs"]["render"]) / "renders.npz"))
    if "alphas" not in renders:  # renders cached before alphas were kept: no object region
        renders["alphas"] = None
    queries = np.stack([read_image(t.path) for t in data.test])
    masks = np.stack([read_mask(t.mask_path) if t.mask_path else np.zeros(queries.shape[1:3], bool)
                      for t in data.test])
    return {"name": f"{res['dataset']}/{res['class']}", "config": cfg, "data": data,
            "ply": Path(res["gaussians_ply"]), "scorer": cfg.scorer, "queries": queries,
            "renders": renders["renders"], "alphas": renders["alphas"], "masks": masks,
            "defects": [t.defect for t in data.test]}


def denoised(images: np.ndarray, h: float) -> np.ndarray:
    """[N, H, W, 3] float in [0, 1] through the scorer's non-local means (``scorer.denoise`` at strength h)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    return scorer_denoised(x, h).permute(0, 2, 3, 1).numpy()


def filtered(images: np.ndarray, key: str, value: float) -> np.ndarray:
    """[N, H, W, 3] float through kornia's Gaussian blur (``gaussian_sigma``, px) or bilateral filter
    (``bilateral_sigma``, the colour sigma; 5x5, spatial sigma 1.5 px)."""
    import kornia

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    if key == "gaussian_sigma":
        size = 2 * int(round(3 * value)) + 1
        x = kornia.filters.gaussian_blur2d(x, (size, size), (value, value))
    else:
        x = kornia.filters.bilateral_blur(x, (5, 5), value, (1.5, 1.5))
    return x.permute(0, 2, 3, 1).numpy()


IMAGE_FILTERS = ("denoise_h=", "query_denoise_h=", "gaussian_sigma=", "bilateral_sigma=")


def allowance(run: dict, scorer: DictConfig) -> float | None:
    """The class's sheen allowance for these scorer settings (measured once per setting and run)."""
    settings = SheenSettings.from_config(scorer.get("sheen"))
    cache = run.setdefault("allowances", {})
    if settings not in cache:
        cfg = OmegaConf.merge(run["config"], {"scorer": {"sheen": dataclasses.asdict(settings)}})
        cache[settings] = class_sheen_allowance(cfg, run["data"], run["ply"], "cpu")
        if cache[settings] is not None:
            print(f"  {run['name']}: sheen allowance {cache[settings]:.4f}", flush=True)
    return cache[settings]


def score(run: dict, overrides: list[str]) -> dict:
    image_filters = [o for o in overrides if o.startswith(IMAGE_FILTERS)]
    overrides = OmegaConf.from_dotlist([o for o in overrides if o not in image_filters])
    cfg = OmegaConf.merge(run["scorer"], overrides)
    scorer = build_scorer(cfg)
    scorer.sheen_allowance = allowance(run, cfg)
    queries, renders = run["queries"], run["renders"]
    for item in image_filters:
        key, _, value = item.partition("=")
        if key == "query_denoise_h":
            queries = denoised(queries, float(value))
        elif key == "denoise_h":
            queries, renders = denoised(queries, float(value)), denoised(renders, float(value))
        else:
            queries, renders = filtered(queries, key, float(value)), filtered(renders, key, float(value))
    maps = []
    for start in range(0, len(queries), 4):
        part = slice(start, start + 4)
        q = torch.from_numpy(queries[part]).permute(0, 3, 1, 2)
        r = torch.from_numpy(renders[part]).permute(0, 3, 1, 2)
        alpha = None if run["alphas"] is None else torch.from_numpy(run["alphas"][part])
        maps.append(scorer(q, r, alpha).numpy())
    maps = normalise_maps(np.concatenate(maps))
    size = maps.shape[-1]
    masks = F.interpolate(torch.from_numpy(run["masks"])[:, None].float(), size=(size, size),
                          mode="nearest")[:, 0].numpy() > 0.5
    labels = np.array([d != "good" for d in run["defects"]], dtype=np.int64)
    return evaluate(maps, masks, labels, run["defects"], scores=scorer.image_scores(maps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--variant", action="append", required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    variants = [parse_variant(v) for v in args.variant]
    table = {name: [] for name, _ in variants}
    print("| run | variant | pixel AUROC | AUPRO | image AUROC | per defect (pixel AUROC / AUPRO / image AUROC) |\n"
          "|---|---|---|---|---|---|")
    for path in args.runs:
        run = load_run(path)
        for name, overrides in variants:
            m = score(run, overrides)
            table[name].append([m["pixel_auroc"], m["aupro"], m["image_auroc"]])
            per_defect = " ".join(f"{d} {v['pixel_auroc']:.3f}/{v['aupro']:.3f}/{v['image_auroc']:.3f}"
                                  for d, v in m["per_defect"].items())
            print(f"| {run['name']} | {name} | {m['pixel_auroc']:.4f} | {m['aupro']:.4f} | {m['image_auroc']:.4f} "
                  f"| {per_defect} |", flush=True)
    print("\n| variant | mean pixel AUROC | mean AUPRO | mean image AUROC | min image AUROC |\n|---|---|---|---|---|")
    for name, rows in table.items():
        rows = np.array(rows, dtype=float)
        mean = rows.mean(0)
        print(f"| {name} | {mean[0]:.4f} | {mean[1]:.4f} | {mean[2]:.4f} | {rows[:, 2].min():.4f} |")


if __name__ == "__main__":
    main()
