"""The HTML report of a run and of a sweep: one self-contained file each (plots and panels embedded as
base64 data URIs; no script, no stylesheet or image file beside it), to open in any browser or attach.

    python -m splatpose.report outputs/runs/synthetic/01Ant/<time>_<run id>    # (re)write report.html

A run's report is built from its folder alone: ``results.json`` (metrics, poses, timings),
``per_image.csv`` (image scores), ``panels/`` (one panel per test image) and ``curves.npz`` (the ROC
and PRO curves). The curves need the per-pixel anomaly maps, which a run does not keep: the pipeline
computes them with :func:`compute_curves` while the maps are in memory and saves them; a run made
before that has no ``curves.npz`` and gets a report without curves. A sweep's report (written by
``splatpose.sweeps.aggregate`` beside table.md) holds the per-class tables of every variant, the
comparison of the variants and the failed jobs, with links to each job's own report.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import os
import time
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from splatpose.atomic_files import write_text_atomic
from splatpose.metrics import pro_curve
from splatpose.sweeps.sweep_jobs import OK
from splatpose.sweeps.sweep_table import STAGES, class_table_cells, comparison_cells

REPORT_NAME = "report.html"
CURVES_NAME = "curves.npz"
METRICS = ("pixel_auroc", "aupro", "image_auroc")
METRIC_TITLES = {"pixel_auroc": "Pixel AUROC", "aupro": "AUPRO", "image_auroc": "Image AUROC"}
PRO_FPR_LIMIT = 0.3  # the AUPRO integration limit (splatpose.metrics.evaluate's default)
CURVE_POINTS = 600  # points kept per curve: enough for a plot, small enough for curves.npz
GALLERY_MAX = 48  # panels embedded (worst first); the rest stay in panels/
GOOD = "good"
PATH_COLOURS = {"pnp": "tab:green", "recovered": "tab:orange", "failed": "tab:red"}


# ------------------------------------------------------------------------------------------ curves

def compute_curves(maps: np.ndarray, masks: np.ndarray, defects: list[str], scores: np.ndarray,
                   fpr_limit: float = PRO_FPR_LIMIT) -> dict[str, np.ndarray]:
    """ROC and PRO curves of one class, overall and for each defect type against the good images.

    Args:
        maps: [N, S, S] anomaly maps; masks: [N, S, S] bool ground truth at map resolution;
        defects: [N] defect type per image ("good" or a defect name); scores: [N] image scores.
    Returns:
        ``{"<kind>/<subset>/x": ..., "<kind>/<subset>/y": ...}`` (what :func:`save_curves` stores) with kind
        ``pixel_roc`` (x FPR, y TPR), ``pro`` (x FPR up to ``fpr_limit``, y PRO: what AUPRO integrates) and
        ``image_roc``; subset ``all`` or a defect name. A curve that is undefined (no defect pixel, or
        no good image) is left out. Each curve is thinned to at most :data:`CURVE_POINTS` points.
    """
    maps, masks = np.asarray(maps), np.asarray(masks, dtype=bool)
    defects = np.asarray(list(defects), dtype=object)
    labels = defects != GOOD
    subsets = {"all": np.ones(len(maps), dtype=bool)}
    subsets.update({str(d): (defects == d) | ~labels for d in sorted(set(defects[labels].tolist()))})
    curves = {}
    for subset, chosen in subsets.items():
        sub_masks = masks[chosen]
        if sub_masks.any() and not sub_masks.all():
            fpr, tpr, _ = roc_curve(sub_masks.ravel(), maps[chosen].ravel())
            curves.update(_curve_entry("pixel_roc", subset, fpr, tpr))
        pro = pro_curve(maps[chosen], sub_masks, fpr_limit)
        if pro is not None:
            curves.update(_curve_entry("pro", subset, *pro))
        if 0 < labels[chosen].sum() < chosen.sum():
            fpr, tpr, _ = roc_curve(labels[chosen], np.asarray(scores)[chosen])
            curves.update(_curve_entry("image_roc", subset, fpr, tpr))
    return curves


def _curve_entry(kind: str, subset: str, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    keep = np.unique(np.linspace(0, len(x) - 1, min(len(x), CURVE_POINTS)).round().astype(int))
    return {f"{kind}/{subset}/x": np.asarray(x, np.float32)[keep],
            f"{kind}/{subset}/y": np.asarray(y, np.float32)[keep]}


def save_curves(path: Path, curves: dict[str, np.ndarray]) -> None:
    np.savez_compressed(path, **curves)


def load_curves(path: Path) -> dict[str, np.ndarray]:
    """The curves saved by :func:`save_curves`; {} when the file does not exist (an older run)."""
    if not Path(path).exists():
        return {}
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _curve_subsets(curves: dict, kind: str) -> list[str]:
    subsets = [key.split("/")[1] for key in curves if key.startswith(f"{kind}/") and key.endswith("/x")]
    return sorted(subsets, key=lambda s: (s != "all", s))


# -------------------------------------------------------------------------------------- run report

def write_run_report(run_dir: Path, curves: dict[str, np.ndarray] | None = None) -> Path:
    """Write ``<run_dir>/report.html`` from the run folder and return its path.

    Args:
        run_dir: a finished run's folder (results.json and per_image.csv; panels/ optional)
        curves: from :func:`compute_curves`; None reads ``<run_dir>/curves.npz`` (none: no curve plots)
    """
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    rows = read_per_image(run_dir / "per_image.csv")
    curves = load_curves(run_dir / CURVES_NAME) if curves is None else curves
    path = run_dir / REPORT_NAME
    write_text_atomic(path, run_report_html(results, rows, run_dir / "panels", curves))
    return path


def read_per_image(path: Path) -> list[dict]:
    """per_image.csv as dicts, with ``label`` an int and ``score`` a float."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["label"], row["score"] = int(row["label"]), float(row["score"])
    return rows


def run_report_html(results: dict, rows: list[dict], panels_dir: Path, curves: dict) -> str:
    """The whole report of one run as an HTML string (see :func:`write_run_report`)."""
    metrics = results.get("metrics", {})
    threshold, threshold_source = image_threshold(rows, results)
    title = f"{results.get('dataset', '?')}/{results.get('class', '?')}"
    env = results.get("environment", {})
    facts = [("Run", results.get("config", {}).get("paths", {}).get("output_dir", "")),
             ("Device", f"{results.get('device', '?')} ({env.get('device_name', '?')})"),
             ("Date", env.get("date", "?")), ("Commit", env.get("git_commit", "?")),
             ("Test images", f"{len(rows)} ({sum(r['label'] == 0 for r in rows)} good)")]
    parts = [f"<h1>SplatPose run report: {_e(title)}</h1>", _facts_html(facts),
             "<h2>Metrics</h2>", metrics_table_html(metrics),
             "<h2>ROC and PRO curves</h2>", curves_html(curves, metrics),
             "<h2>Per defect type</h2>", _img(defect_bars_figure(metrics), "per-defect metrics"),
             "<h2>Poses</h2>", poses_html(results),
             "<h2>Time per stage</h2>", _img(timings_figure(results.get("timings", {})), "time per stage"),
             "<h2>Per-image panels</h2>", gallery_html(rows, panels_dir, threshold, threshold_source,
                                                        results.get("map_range"))]
    return _page(f"SplatPose report {title}", parts)


def metrics_table_html(metrics: dict) -> str:
    """Overall and per-defect pixel AUROC, AUPRO and image AUROC in % ("—" where undefined)."""
    rows = [["All"] + [_percent(metrics.get(m)) for m in METRICS]]
    rows += [[name] + [_percent(values.get(m)) for m in METRICS]
             for name, values in (metrics.get("per_defect") or {}).items()]
    table = html_table(["Subset", *(METRIC_TITLES[m] for m in METRICS)], rows)
    alternatives = metrics.get("image_auroc_by_top_fraction") or {}
    if alternatives:
        table += ("<p class='note'>Image AUROC with other image scores: "
                  + ", ".join(f"{_alternative_name(q)}: {_percent(v)}" for q, v in alternatives.items()) + ".</p>")
    return table


def _alternative_name(top_fraction: str) -> str:
    """An image_auroc_by_top_fraction key as words: "0.0" -> the map's maximum, "0.01" -> the mean of its top 1 %."""
    fraction = float(top_fraction)
    return "the map's maximum" if fraction == 0 else f"the mean of its top {fraction * 100:g} %"


def curves_html(curves: dict, metrics: dict) -> str:
    if not curves:
        return ("<p class='note'>No curves: this run has no curves.npz (runs before the report existed); "
                "rerun the evaluation to get them.</p>")
    return _img(curves_figure(curves, metrics), "ROC and PRO curves")


def curves_figure(curves: dict, metrics: dict) -> Figure:
    """Pixel ROC, PRO (FPR up to the AUPRO limit) and image ROC; one line per subset, AUC in the legend."""
    fig = Figure(figsize=(13.5, 4.2), layout="constrained")
    panels = (("pixel_roc", "Pixel ROC", "pixel_auroc", "FPR", "TPR"),
              ("pro", f"PRO (FPR ≤ {PRO_FPR_LIMIT:g})", "aupro", "FPR", "per-region overlap"),
              ("image_roc", "Image ROC", "image_auroc", "FPR", "TPR"))
    for ax, (kind, title, metric, xlabel, ylabel) in zip(fig.subplots(1, 3), panels):
        for subset in _curve_subsets(curves, kind):
            values = metrics if subset == "all" else metrics.get("per_defect", {}).get(subset) or {}
            value = values.get(metric)
            ax.plot(curves[f"{kind}/{subset}/x"], curves[f"{kind}/{subset}/y"], lw=2.2 if subset == "all" else 1.2,
                    color="black" if subset == "all" else None, zorder=3 if subset == "all" else 2,
                    label=f"{subset} ({_percent(value)})")
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=(0, 1.02),
               xlim=(0, PRO_FPR_LIMIT if kind == "pro" else 1))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="lower right")
    return fig


def defect_bars_figure(metrics: dict) -> Figure:
    """Grouped bars: the three metrics for all images and for each defect type (undefined: no bar)."""
    groups = {"All": {m: metrics.get(m) for m in METRICS}, **(metrics.get("per_defect") or {})}
    return metric_bars_figure({name: {m: (values.get(m), None) for m in METRICS} for name, values in groups.items()})


def metric_bars_figure(groups: dict[str, dict[str, tuple]], rotate_labels: bool = False) -> Figure:
    """Grouped bars of the three metrics in %, one group per key; values ``(mean, std or None)`` as
    fractions, a None mean draws no bar. The y axis starts a little below the lowest bar."""
    fig = Figure(figsize=(max(6.0, 1.6 * len(groups) + 2.5), 3.6), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(METRICS)
    for i, metric in enumerate(METRICS):
        means = [groups[g][metric][0] for g in groups]
        stds = [groups[g][metric][1] for g in groups]
        bars = ax.bar(np.arange(len(groups)) + (i - 1) * width, [np.nan if v is None else 100 * v for v in means],
                      width, yerr=[100 * (s or 0) for s in stds] if any(stds) else None, label=METRIC_TITLES[metric])
        ax.bar_label(bars, labels=[_percent(v) for v in means], fontsize=7, padding=2)
    labels = [name if len(name) < 30 else name[:28] + "…" for name in groups]
    ax.set_xticks(np.arange(len(groups)), labels, rotation=15 if rotate_labels else 0,
                  ha="right" if rotate_labels else "center", fontsize=8)
    values = [100 * v[0] for g in groups.values() for v in g.values() if v[0] is not None]
    ax.set(ylabel="%", ylim=(max(0, np.floor(min(values or [0]) / 10) * 10 - 5), 103))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return fig


def poses_html(results: dict) -> str:
    """How the final poses were found (pnp / recovered / failed), which of them did not line up with their image
    (runs that record it), and, with true poses, their errors."""
    final = results.get("final_poses", {})
    localization = results.get("localization", {})
    paths = _ordered_paths(final.get("paths", {}))
    facts = [("Pose paths", ", ".join(f"{k} {v}" for k, v in paths.items()) or "—"),
             ("PnP localized", f"{localization.get('num_localized', '?')}/{localization.get('num_queries', '?')}")]
    if "not_lined_up" in final:
        doubtful = [name for name, query in final.get("per_query", {}).items() if query.get("lines_up") is False]
        facts.append(("Not lined up (maps doubtful)", ", ".join(doubtful) or "none"))
    if "median_rotation_error_deg" in final:
        facts += [("Median rotation error (final)", f"{final['median_rotation_error_deg']:.3f}°"),
                  ("Within 1° (final)", f"{_percent(final.get('within_1deg_rate'))} %")]
    return _facts_html(facts) + _img(pose_figure(final, localization), "pose errors and paths")


def pose_figure(final: dict, localization: dict) -> Figure:
    """Left: histogram of the rotation errors (final poses, and PnP's before refinement) when true poses
    exist; right: the count of each pose path."""
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(2.2, 1))
    final_errors = [e["rotation_error_deg"] for e in final.get("per_query", {}).values() if "rotation_error_deg" in e]
    pnp_errors = [e["rotation_error_deg"] for e in localization.get("per_query", {}).values()
                  if e.get("success") and "rotation_error_deg" in e]
    if final_errors:
        every = np.array(final_errors + pnp_errors)
        lo, hi = max(every.min(), 1e-3), max(every.max(), 1.5)
        bins = np.geomspace(lo / 1.1, hi * 1.1, 25)
        left.hist(np.clip(final_errors, lo, None), bins=bins, alpha=0.75, label=f"final poses ({len(final_errors)})")
        if pnp_errors:
            left.hist(np.clip(pnp_errors, lo, None), bins=bins, histtype="step", lw=1.5, color="black",
                      label=f"PnP, before refinement ({len(pnp_errors)})")
        left.axvline(1.0, color="red", ls="--", lw=1, label="1°")
        left.set(xscale="log", xlabel="rotation error (deg)", ylabel="images", title="Rotation error")
        left.yaxis.set_major_locator(MaxNLocator(integer=True))
        left.legend(fontsize=8, loc="best")
    else:
        left.text(0.5, 0.5, "no true poses (real data): errors unknown", ha="center", va="center")
        left.set_axis_off()
    paths = _ordered_paths(final.get("paths", {}))
    bars = right.bar(list(paths), list(paths.values()),
                     color=[PATH_COLOURS.get(p, "tab:grey") for p in paths])
    right.bar_label(bars)
    right.set(title="Pose path", ylabel="images", ylim=(0, max(list(paths.values()) + [1]) * 1.2))
    return fig


def _ordered_paths(paths: dict) -> dict:
    """The pose paths in the pipeline's order (pnp, recovered, failed), others after."""
    return {**{p: paths[p] for p in PATH_COLOURS if p in paths}, **paths}


def timings_figure(timings: dict) -> Figure:
    """Horizontal bars of each stage's seconds (grey: reused from the stage cache); the total in the title."""
    stages = [s for s in STAGES if s in timings] + [s for s in timings if s not in STAGES]
    stages = [s for s in stages if s != "total"]
    seconds = [timings[s].get("seconds", 0.0) for s in stages]
    reused = [timings[s].get("reused", False) for s in stages]
    fig = Figure(figsize=(9, 0.45 * len(stages) + 1.2), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh(stages, seconds, color=["lightgrey" if r else "tab:blue" for r in reused])
    ax.bar_label(bars, labels=[f"{s:.1f} s" + (" (reused)" if r else "") for s, r in zip(seconds, reused)],
                 fontsize=8, padding=3)
    ax.invert_yaxis()
    ax.set(xlabel="seconds", xlim=(0, max(seconds + [1e-3]) * 1.25),
           title=f"Total {timings.get('total', {}).get('seconds', sum(seconds)):.1f} s"
                 + ("  (grey: reused from the stage cache)" if any(reused) else ""))
    return fig


def image_threshold(rows: list[dict], results: dict) -> tuple[float | None, str]:
    """The image-score threshold that splits the gallery into predicted defective / good, and its origin:
    the run's ``detect.threshold`` when set, else the threshold of this test set's image ROC that
    maximises TPR - FPR (Youden's J); None when the test set lacks good or defective images.
    An evaluate run composes no detect node (conf/task/evaluate.yaml): ``+detect.threshold=T`` adds it."""
    configured = ((results.get("config") or {}).get("detect") or {}).get("threshold")
    if configured is not None:
        return float(configured), "detect.threshold"
    labels = np.array([r["label"] for r in rows])
    if not 0 < labels.sum() < len(labels):
        return None, "none (the test set lacks good or defective images)"
    fpr, tpr, thresholds = roc_curve(labels, [r["score"] for r in rows])
    return float(thresholds[int(np.argmax(tpr - fpr))]), "the image ROC's best TPR − FPR (Youden) on this test set"


def gallery_order(rows: list[dict], threshold: float | None) -> list[dict]:
    """The rows for the gallery, each with ``outcome`` (FP, FN, TP, TN; "" without a threshold).

    Order: false positives (good images at or above the threshold) from the highest score, then false
    negatives (defective images below it) from the lowest score, then every other image from the
    highest score: the worst mistakes first, then the ranking.
    """
    def outcome(row: dict) -> str:
        if threshold is None:
            return ""
        predicted = row["score"] >= threshold
        return ("TP" if predicted else "FN") if row["label"] else ("FP" if predicted else "TN")

    marked = [{**row, "outcome": outcome(row)} for row in rows]
    fps = sorted((r for r in marked if r["outcome"] == "FP"), key=lambda r: -r["score"])
    fns = sorted((r for r in marked if r["outcome"] == "FN"), key=lambda r: r["score"])
    rest = sorted((r for r in marked if r["outcome"] not in ("FP", "FN")), key=lambda r: -r["score"])
    return fps + fns + rest


def gallery_html(rows: list[dict], panels_dir: Path, threshold: float | None, threshold_source: str,
                 map_range: list | None, limit: int = GALLERY_MAX) -> str:
    """The colour scale of the maps, then the panels in :func:`gallery_order` (at most ``limit``)."""
    ordered = gallery_order(rows, threshold)
    counts = {k: sum(r["outcome"] == k for r in ordered) for k in ("FP", "FN", "TP", "TN")}
    intro = ("<p>Each panel: query | pseudo-reference rendered at its pose | anomaly map | map over the query "
             "with the ground-truth outline in green. ")
    if threshold is None:
        intro += f"Sorted by image score (highest first); no threshold: {_e(threshold_source)}.</p>"
    else:
        intro += (f"Threshold {threshold:.3f} on the image score ({_e(threshold_source)}): "
                  + ", ".join(f"{v} {k}" for k, v in counts.items())
                  + ". False positives first (highest score first), then false negatives (lowest first), "
                    "then the rest by score.</p>")
    parts = [intro, _img(colour_scale_figure(threshold, map_range), "colour scale of the anomaly maps",
                         css="scale")]
    cards = []
    for row in ordered[:limit]:
        panel = panels_dir / row["defect"] / f"{Path(row['name']).stem}.png"
        image = (f"<img src='{_data_uri(panel.read_bytes())}' alt='{_e(row['name'])}'>" if panel.is_file()
                 else "<div class='missing'>no panel</div>")
        pose = f" · pose {_e(row.get('pose_path') or '?')}"
        if row.get("final_rotation_error_deg"):
            pose += f", {float(row['final_rotation_error_deg']):.2f}°"
        caption = f"<b>{row['outcome']}</b> {_e(row['name'])} · {_e(row['defect'])} · score {row['score']:.3f}{pose}"
        cards.append(f"<figure class='card {row['outcome'].lower()}'>{image}<figcaption>{caption}</figcaption></figure>")
    parts.append(f"<div class='gallery'>{''.join(cards)}</div>")
    if len(ordered) > limit:
        parts.append(f"<p class='note'>{len(ordered) - limit} more panels (the best-ranked ones) in "
                     f"<code>{_e(str(panels_dir))}</code>.</p>")
    return "".join(parts)


def colour_scale_figure(threshold: float | None, map_range: list | None) -> Figure:
    """The inferno scale of the panels' maps, 0..1 (class-normalised), with the threshold marked."""
    fig = Figure(figsize=(9, 0.95), layout="constrained")
    ax = fig.subplots()
    ax.imshow(np.linspace(0, 1, 256)[None], aspect="auto", cmap=colormaps["inferno"], extent=(0, 1, 0, 1))
    ax.set_yticks([])
    label = "anomaly score (class-normalised"
    label += f": 0 = raw {map_range[0]:.3g}, 1 = raw {map_range[1]:.3g})" if map_range else ")"
    ax.set_xlabel(label, fontsize=9)
    if threshold is not None:
        ax.axvline(threshold, color="cyan", lw=2)
        ax.text(threshold, 1.05, f"threshold {threshold:.3f}", ha="center", va="bottom", fontsize=8,
                transform=ax.get_xaxis_transform())
    return fig


# ------------------------------------------------------------------------------------ sweep report

def write_sweep_report(out_dir: Path, sweep_dir: Path, jobs: list, rows: list) -> Path:
    """Write ``<out_dir>/report.html`` for a sweep (``aggregate_sweep``'s jobs and rows); returns its path."""
    out_dir = Path(out_dir)
    variants = list(dict.fromkeys(r.variant for r in rows))
    failures = [j for j in jobs if j.status != OK]
    parts = [f"<h1>SplatPose sweep report: {_e(Path(sweep_dir).name)}</h1>",
             _facts_html([("Folder", str(sweep_dir)), ("Jobs", f"{len(jobs)} ({len(failures)} not finished)"),
                          ("Aggregated", time.strftime("%Y-%m-%d %H:%M %Z"))]),
             "<p class='note'>Metrics in %: mean over the seeds of a class (± sample std where several); the mean "
             "row averages the classes within each seed, then over seeds. Times: mean seconds per stage; "
             "* marks a stage reused from the stage cache.</p>"]
    if len(variants) > 1:
        header, cells = comparison_cells(rows)
        parts += ["<h2>Comparison of the variants (mean over classes)</h2>", html_table(header, cells),
                  _img(sweep_bars_figure([r for r in rows if r.class_name.startswith("Mean")], by="variant"),
                       "comparison of the variants")]
    if not variants:
        parts.append("<p>No job finished: see the failed jobs below.</p>")
    for variant in variants:
        variant_rows = [r for r in rows if r.variant == variant]
        header, cells = class_table_cells(variant_rows)
        table = html_table(header, cells).replace("<tr><td>Mean", "<tr class='mean'><td>Mean")  # mean rows in bold
        parts += [f"<h2>{_e(variant)}</h2>", table,
                  _img(sweep_bars_figure([r for r in variant_rows if not r.class_name.startswith("Mean")],
                                         by="class_name"), f"per class, {variant}")]
    parts.append(f"<h2>Jobs ({len(jobs)})</h2>")
    job_rows = []
    for job in jobs:
        report = Path(job.dir) / REPORT_NAME
        link = (f"<a href='{_e(os.path.relpath(report, out_dir))}'>{_e(Path(job.dir).name)}</a>" if report.is_file()
                else _e(Path(job.dir).name))
        job_rows.append([str(job.num), _e(job.class_name), _e(job.status),
                         f"<code>{_e(' '.join(job.overrides))}</code>",
                         _e((job.error or "").splitlines()[0][:300] if job.error else ""), link])
    parts.append(html_table(["Job", "Class", "Status", "Overrides", "Error", "Folder (report)"], job_rows,
                            escape=False))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_NAME
    path.write_text(_page(f"SplatPose sweep {Path(sweep_dir).name}", parts), encoding="utf-8")
    return path


def sweep_bars_figure(rows: list, by: str) -> Figure:
    """Grouped bars of the three metrics (mean over seeds, std as error bars), one group per row's ``by``."""
    def cell(row, metric):
        c = row.cells.get(metric)
        return (c.mean, c.std) if c else (None, None)

    return metric_bars_figure({getattr(r, by): {m: cell(r, m) for m in METRICS} for r in rows},
                              rotate_labels=by == "variant")


# --------------------------------------------------------------------------------------- HTML bits

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1400px; padding: 0 16px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 9px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
td:first-child { white-space: nowrap; } tr.mean td { font-weight: 600; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
img.plot { max-width: 100%; } img.scale { width: 720px; max-width: 100%; }
.note { color: #555; font-size: 0.9em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; }
.card { margin: 0; padding: 6px; border: 3px solid #ccc; border-radius: 4px; }
.card img { width: 100%; display: block; } .card figcaption { font-size: 0.85em; margin-top: 4px; }
.card.fp, .card.fn { border-color: #d62728; } .card.tp, .card.tn { border-color: #9bc89b; }
.missing { padding: 30px; color: #999; text-align: center; }
"""


def _page(title: str, parts: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def html_table(header: list[str], rows: list[list[str]], escape: bool = True) -> str:
    """A plain table; cells are escaped unless ``escape`` is False (then they are trusted HTML)."""
    cell = _e if escape else str
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _facts_html(facts: list[tuple[str, str]]) -> str:
    return "<dl class='facts'>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(str(v))}</dd>" for k, v in facts) + "</dl>"


def _img(fig: Figure, alt: str, css: str = "plot") -> str:
    """A matplotlib figure as an embedded PNG."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return f"<img class='{css}' src='{_data_uri(buffer.getvalue())}' alt='{_e(alt)}'>"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m splatpose.report",
                                     description="(Re)write a finished run's report.html from its folder.")
    parser.add_argument("run_dir", type=Path, help="a run folder holding results.json and per_image.csv")
    args = parser.parse_args(argv)
    if not (args.run_dir / "results.json").is_file():
        raise SystemExit(f"{args.run_dir} holds no results.json: pass the folder of a finished run")
    start = time.perf_counter()
    path = write_run_report(args.run_dir)
    print(f"Report: {path.resolve()} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
