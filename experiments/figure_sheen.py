"""A picture of what ``scorer.sheen`` does on a finished run: for each named test image, the query, its
render, the query with the sheen taken off, and the raw map without and with it (one colour scale).

    python experiments/figure_sheen.py outputs/runs/synthetic/11SheenKnob/<time> \
        test/good/000.png test/Dents/002.png --out experiments/results/sheen_cpu_2026-12-06.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib.cm as cm
import numpy as np
import torch
from PIL import Image, ImageDraw

from study_scoring import allowance, load_run
from splatpose.scoring.anomaly_maps import build_scorer
from splatpose.scoring.sheen import take_off_sheen

TITLES = ["query", "render (splats)", "query, sheen taken off", "map before", "map with sheen taken off"]


def to_rgb8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def heat(raw: np.ndarray, top: float, size: int) -> np.ndarray:
    grey = Image.fromarray((np.clip(raw / top, 0, 1) * 255).astype(np.uint8)).resize((size, size))
    return (cm.inferno(np.asarray(grey) / 255.0)[..., :3] * 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("images", nargs="+", help="test image names as in per_image.csv")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    run = load_run(args.run)
    names = [line.split(",")[0] for line in (args.run / "per_image.csv").read_text().splitlines()[1:]]
    picks = [names.index(n) for n in args.images]
    cfg = run["scorer"]
    scorer, class_allowance = build_scorer(cfg), allowance(run, cfg)
    query = torch.from_numpy(run["queries"][picks]).permute(0, 3, 1, 2)
    render = torch.from_numpy(run["renders"][picks]).permute(0, 3, 1, 2)
    alpha = None if run["alphas"] is None else torch.from_numpy(run["alphas"][picks])
    before = scorer(query, render, alpha).numpy()
    scorer.sheen_allowance = class_allowance
    after = scorer(query, render, alpha).numpy()
    taken_off = take_off_sheen(query, render, class_allowance, scorer.sheen)
    size, top = query.shape[-1], max(before.max(), after.max())
    rows = [np.concatenate([to_rgb8(query[i]), to_rgb8(render[i]), to_rgb8(taken_off[i]),
                            heat(before[i], top, size), heat(after[i], top, size)], axis=1) for i in range(len(picks))]
    figure = Image.fromarray(np.concatenate(rows, axis=0))
    draw = ImageDraw.Draw(figure)
    for j, title in enumerate(TITLES):
        draw.text((j * size + 4, 2), title, fill=(200, 0, 0))
    for i, name in enumerate(args.images):
        draw.text((4, (i + 1) * query.shape[-2] - 12), name, fill=(200, 0, 0))
    figure.save(args.out, optimize=True)
    for name, b, a in zip(args.images, before, after):
        print(f"{name}: map maximum {b.max():.0f} -> {a.max():.0f} (allowance {class_allowance:.3f})")


if __name__ == "__main__":
    main()
