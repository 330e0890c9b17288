"""Study: the recovery's silhouette search over every view against the screened search (views scored at half
size first, only the best ``--screen-views`` searched at full size), on a finished run's test images.

For every test image: are the four hypotheses the recovery refines the same (view and roll), how far down the
screen's ranking do the full search's views sit, and how long each search takes. The search views are the
ones the run's refine stage saved (``search_views.npz``; a run whose queries all localized by PnP has none).

    python experiments/study_search_screen.py outputs/runs/synthetic/12SoftKnob/<time> [--screen-views 64]

Results: experiments/results/recovery_screen_cpu_2026-12-06.md. Tune on the built-in family only
(experiments/PROTOCOL.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from splatpose.data import resolve_dataset
from splatpose.data.mad_sim import read_image
from splatpose.refine.queries import SEARCH_VIEWS_FILE, default_refine_config, load_search_views
from splatpose.refine.recovery import SCREEN_FACTOR, screened_search, search_similarities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--screen-views", type=int, default=64)
    parser.add_argument("--factor", type=int, default=SCREEN_FACTOR, help="how much smaller the screen's images are")
    args = parser.parse_args()
    torch.set_num_threads(2)

    results = json.loads((args.run_dir / "results.json").read_text())
    run_cfg = OmegaConf.create(results["config"])
    data = resolve_dataset(run_cfg.dataset, str(run_cfg["class"]))
    views_file = Path(results["stage_dirs"]["refine"]) / SEARCH_VIEWS_FILE
    if not views_file.exists():
        raise SystemExit(f"{views_file} does not exist: no query of this run needed the recovery")
    reference = load_search_views(views_file)
    screen = reference.coarser(args.factor)
    search = default_refine_config().recovery
    rolls, keep, colour = int(search.rolls), int(search.hypotheses[0]), float(search.colour_weight)

    full_s = screened_s = 0.0
    same = worst_rank = 0
    for test in data.test:
        query = torch.from_numpy(read_image(test.path)).permute(2, 0, 1).contiguous()
        start = time.perf_counter()
        full = search_similarities(query, reference, rolls, keep, colour)
        full_s += time.perf_counter() - start
        start = time.perf_counter()
        screened = screened_search(query, reference, screen, args.screen_views, rolls, keep, colour)
        screened_s += time.perf_counter() - start
        same += [(h.view, h.roll) for h in full] == [(h.view, h.roll) for h in screened]
        ranking = [h.view for h in search_similarities(query, screen, rolls, len(reference.w2c), colour)]
        worst_rank = max([worst_rank, *(ranking.index(h.view) for h in full)])
    n = len(data.test)
    print(json.dumps({"run": str(args.run_dir), "views": len(reference.w2c), "screen_views": args.screen_views,
                      "factor": args.factor, "queries": n, "identical_top": same,
                      "full_ms_per_query": round(1000 * full_s / n), "screened_ms_per_query": round(1000 * screened_s / n),
                      "largest_screen_rank_of_a_full_search_view": worst_rank,
                      "date": time.strftime("%Y-%m-%d %H:%M")}, indent=1))


if __name__ == "__main__":
    main()
