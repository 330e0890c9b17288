"""The paper-style table of a sweep: per variant, one row per class and a mean row.

A *variant* is what the sweep compares (a feature/matcher pair, a scorer, ...): the factors whose
values differ between jobs, other than the class and the seed. Within a variant, the runs of one
class over several seeds give ``mean ± std`` (sample standard deviation, ddof=1); the mean row is
the mean over classes computed per seed, then ``mean ± std`` over seeds, as papers report it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from splatpose.sweeps.sweep_jobs import OK, JobRecord

METRICS = ("pixel_auroc", "aupro", "image_auroc")
METRIC_TITLES = {"pixel_auroc": "Pixel AUROC", "aupro": "AUPRO", "image_auroc": "Image AUROC",
                 "localized": "Localized"}
STAGES = ("data", "sfm", "localize", "splat", "refine", "render", "score", "total")
# The reference cameras and the final query poses against the true ones (results.json
# ``reference_cameras`` and ``final_poses``): a known-pose and a pose-free run on the same numbers.
POSE_KEYS = ("registered", "focal_error_pct", "alignment_residual", "query_rotation_deg")
# Shown when nothing varies but the class (or the seed): the factors a reader wants to know.
DEFAULT_LABEL_KEYS = ("sfm/feature", "sfm/matcher", "scorer")
NOT_VARIANT_KEYS = ("class", "seed")


@dataclass
class Cell:
    """Values of one quantity over the runs (seeds) of one (variant, class)."""

    values: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None


@dataclass
class Row:
    """One line of the table: a class (or "Mean") of one variant."""

    variant: str
    class_name: str
    runs: int
    cells: dict[str, Cell]
    reused: dict[str, bool]  # stage -> reused from the stage cache in at least one run


def variant_keys(jobs: list[JobRecord]) -> list[str]:
    """The factors that differ between jobs, other than class and seed (the compared settings).

    Experiment presets (``experiment/...``) are left out when other factors vary, since the options
    they select already appear as those factors.
    """
    keys = sorted({k for j in jobs for k in j.factors})
    varying = [k for k in keys if k not in NOT_VARIANT_KEYS
               and len({j.factors.get(k) for j in jobs}) > 1]
    specific = [k for k in varying if not k.startswith("experiment")]
    return specific or varying


def variant_label(job: JobRecord, keys: list[str]) -> str:
    shown = keys or [k for k in DEFAULT_LABEL_KEYS if k in job.factors]
    return ", ".join(f"{k}={job.factors.get(k, '-')}" for k in shown) or "all runs"


def job_values(job: JobRecord) -> dict[str, float]:
    """Metrics, localization rate and stage seconds of one finished job (undefined metrics left out)."""
    results = job.results or {}
    values = {m: results.get("metrics", {}).get(m) for m in METRICS}
    values["localized"] = results.get("localization", {}).get("success_rate")
    values["posed"] = results.get("final_poses", {}).get("success_rate")
    values["within_1deg"] = results.get("final_poses", {}).get("within_1deg_rate")
    cameras = results.get("reference_cameras", {})
    values["registered"] = cameras.get("registration_rate")
    values["focal_error_pct"] = cameras.get("focal_error_pct")
    values["alignment_residual"] = (cameras.get("alignment") or {}).get("median_center_error_rel")
    values["query_rotation_deg"] = results.get("final_poses", {}).get("median_rotation_error_deg")
    for stage in STAGES:
        values[f"time_{stage}"] = (results.get("timings", {}).get(stage) or {}).get("seconds")
    return {k: float(v) for k, v in values.items() if _is_number(v)}


def build_rows(jobs: list[JobRecord]) -> list[Row]:
    """Rows per variant: its classes in sorted order, then its "Mean" row."""
    keys = variant_keys(jobs)
    by_variant: dict[str, list[JobRecord]] = defaultdict(list)
    for job in jobs:
        if job.status == OK:
            by_variant[variant_label(job, keys)].append(job)
    rows = []
    for variant, variant_jobs in by_variant.items():
        classes = sorted({j.class_name for j in variant_jobs})
        for class_name in classes:
            rows.append(_row(variant, class_name, [j for j in variant_jobs if j.class_name == class_name]))
        rows.append(_mean_row(variant, variant_jobs, len(classes)))
    return rows


def _row(variant: str, class_name: str, jobs: list[JobRecord]) -> Row:
    cells: dict[str, Cell] = defaultdict(Cell)
    for job in jobs:
        for key, value in job_values(job).items():
            cells[key].values.append(value)
    return Row(variant, class_name, len(jobs), dict(cells), _reused(jobs))


def _mean_row(variant: str, jobs: list[JobRecord], num_classes: int) -> Row:
    """Mean over classes within each seed, then the spread of those means over seeds."""
    by_seed: dict[int | None, list[JobRecord]] = defaultdict(list)
    for job in jobs:
        by_seed[job.seed].append(job)
    cells: dict[str, Cell] = defaultdict(Cell)
    for seed_jobs in by_seed.values():
        per_key: dict[str, list[float]] = defaultdict(list)
        for job in seed_jobs:
            for key, value in job_values(job).items():
                per_key[key].append(value)
        for key, values in per_key.items():
            cells[key].values.append(float(np.mean(values)))
    label = f"Mean ({num_classes} class{'es' if num_classes != 1 else ''})"
    return Row(variant, label, len(by_seed), dict(cells), _reused(jobs))


def _reused(jobs: list[JobRecord]) -> dict[str, bool]:
    return {stage: any(((j.results or {}).get("timings", {}).get(stage) or {}).get("reused", False)
                       for j in jobs) for stage in STAGES}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------- output

def format_percent(cell: Cell | None) -> str:
    """0.9953 -> "99.5"; with several seeds "99.5 ± 0.2"; "—" when undefined."""
    if cell is None or cell.mean is None:
        return "—"
    text = f"{100 * cell.mean:.1f}"
    return text if cell.std is None else f"{text} ± {100 * cell.std:.1f}"


def format_seconds(cell: Cell | None, reused: bool) -> str:
    """Mean seconds (the spread over seeds is in table.csv); ``*`` when reused from the stage cache."""
    if cell is None or cell.mean is None:
        return "—"
    return f"{cell.mean:.1f}" + ("*" if reused else "")


def class_table_cells(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the per-class table of one variant (metrics in %, times in seconds)."""
    header = (["Class", "Runs"] + [METRIC_TITLES[m] for m in (*METRICS, "localized")]
              + [f"{s} (s)" for s in STAGES])
    cells = [[row.class_name, str(row.runs)] + [format_percent(row.cells.get(m)) for m in (*METRICS, "localized")]
             + [format_seconds(row.cells.get(f"time_{s}"), row.reused.get(s, False)) for s in STAGES]
             for row in rows]
    return header, cells


def comparison_cells(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the mean rows of all variants side by side."""
    header = ["Variant", "Seeds"] + [METRIC_TITLES[m] for m in (*METRICS, "localized")] + ["total (s)"]
    cells = [[row.variant, str(row.runs)] + [format_percent(row.cells.get(m)) for m in (*METRICS, "localized")]
             + [format_seconds(row.cells.get("time_total"), False)]
             for row in rows if row.class_name.startswith("Mean")]
    return header, cells


def markdown_table(rows: list[Row]) -> str:
    """One markdown table for the rows of one variant (metrics in %, times in seconds)."""
    header, cells = class_table_cells(rows)
    cells = [[f"**{c[0]}**" if c[0].startswith("Mean") else c[0], *c[1:]] for c in cells]
    return _markdown(header, cells)


def comparison_table(rows: list[Row]) -> str:
    """The mean rows of all variants side by side (the matcher ablation at a glance)."""
    return _markdown(*comparison_cells(rows))


def _markdown(header: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def table_columns() -> list[str]:
    """Columns of the per-class CSV (and of the W&B table): raw fractions and seconds."""
    columns = ["variant", "class", "runs"]
    for key in (*METRICS, "localized", *POSE_KEYS, *(f"time_{s}" for s in STAGES)):
        columns += [f"{key}_mean", f"{key}_std"]
    return columns + [f"reused_{s}" for s in STAGES]


def table_records(rows: list[Row]) -> list[list]:
    records = []
    for row in rows:
        record = [row.variant, row.class_name, row.runs]
        for key in (*METRICS, "localized", *POSE_KEYS, *(f"time_{s}" for s in STAGES)):
            cell = row.cells.get(key)
            record += [cell.mean if cell else None, cell.std if cell else None]
        records.append(record + [row.reused.get(s, False) for s in STAGES])
    return records


def run_columns(jobs: list[JobRecord]) -> list[str]:
    """Columns of the one-row-per-job CSV, including the per-defect metrics that occur."""
    defects = sorted({d for j in jobs for d in ((j.results or {}).get("metrics", {}).get("per_defect") or {})})
    return (["job", "status", "variant", "class", "seed", *METRICS, "localized"]
            + [f"{d}/{m}" for d in defects for m in METRICS]
            + [f"time_{s}" for s in STAGES] + [f"reused_{s}" for s in STAGES]
            + ["device", "gpu", "worker_pid", "started_at", "wall_seconds", "dir", "error"])


def run_records(jobs: list[JobRecord], columns: list[str]) -> list[list]:
    keys = variant_keys(jobs)
    records = []
    for job in jobs:
        results = job.results or {}
        values: dict = {"job": job.num, "status": job.status, "variant": variant_label(job, keys),
                        "class": job.class_name, "seed": job.seed, "dir": str(job.dir),
                        "error": job.error or "", "device": results.get("device", ""),
                        "gpu": job.gpu, "worker_pid": job.worker_pid, "started_at": job.started_at,
                        "wall_seconds": (job.finished_at - job.started_at
                                         if job.started_at and job.finished_at else None)}
        values.update(job_values(job))
        for defect, metrics in (results.get("metrics", {}).get("per_defect") or {}).items():
            values.update({f"{defect}/{m}": metrics.get(m) for m in METRICS})
        values.update({f"reused_{s}": r for s, r in _reused([job]).items()} if job.results else {})
        records.append([values.get(c) for c in columns])
    return records
