"""Aggregate a sweep folder into the paper-style table (markdown + CSV) and a W&B summary run.

    python -m splatpose.sweeps.aggregate outputs/multirun/2026-11-20_10-00-00
    python -m splatpose.sweeps.aggregate outputs/multirun/... --wandb online --project splatpose

Writes into ``<sweep>/summary/`` (or ``--out``):
    table.md    per variant: one row per class + mean (pixel AUROC, AUPRO, image AUROC in %,
                localization rate, seconds per stage), a comparison of the variants, failed jobs
    table.csv   the same rows as raw numbers (fractions, seconds), ``*_mean`` and ``*_std`` columns
    runs.csv    one tidy row per job (metrics per defect type, timings, status, error)
    report.html the tables as one self-contained page, with bar charts and links to each job's report
and logs the tables to W&B (offline by default: ``wandb sync <out>/wandb/offline-run-*`` uploads).
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from splatpose.errors import require_extra
from splatpose.report import write_sweep_report
from splatpose.sweeps.sweep_jobs import FAILED, NO_RESULT, OK, JobRecord, read_sweep
from splatpose.sweeps.sweep_table import (Row, build_rows, comparison_table, markdown_table,
                                          run_columns, run_records, table_columns, table_records)

log = logging.getLogger(__name__)


@dataclass
class SweepSummary:
    """What :func:`aggregate_sweep` wrote and found."""

    jobs: list[JobRecord]
    rows: list[Row]
    markdown: Path
    table_csv: Path
    runs_csv: Path
    wandb_dir: Path | None
    report: Path

    @property
    def failures(self) -> list[JobRecord]:
        return [j for j in self.jobs if j.status != OK]


def aggregate_sweep(sweep_dir: Path, out_dir: Path | None = None, wandb_mode: str = "offline",
                    project: str = "splatpose") -> SweepSummary:
    """Read every job of ``sweep_dir`` and write table.md, table.csv, runs.csv and report.html into ``out_dir``.

    Args:
        sweep_dir: a multirun folder (``hydra.sweep.dir``)
        out_dir: where to write (default ``<sweep_dir>/summary``)
        wandb_mode: "offline" (default), "online" or "disabled"
        project: the W&B project of the summary run
    """
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir else sweep_dir / "summary"
    jobs = read_sweep(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"no Hydra job folders (with .hydra/overrides.yaml) under {sweep_dir}; "
                                "is it the folder a multirun (`python run.py -m ...`) wrote?")
    rows = build_rows(jobs)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = out_dir / "table.md"
    markdown.write_text(sweep_markdown(sweep_dir, jobs, rows))
    table_csv, runs_csv = out_dir / "table.csv", out_dir / "runs.csv"
    _write_csv(table_csv, table_columns(), table_records(rows))
    columns = run_columns(jobs)
    _write_csv(runs_csv, columns, run_records(jobs, columns))
    report = write_sweep_report(out_dir, sweep_dir, jobs, rows)
    wandb_dir = log_to_wandb(sweep_dir, out_dir, jobs, rows, wandb_mode, project)
    return SweepSummary(jobs, rows, markdown, table_csv, runs_csv, wandb_dir, report)


def sweep_markdown(sweep_dir: Path, jobs: list[JobRecord], rows: list[Row]) -> str:
    """The whole report: header, comparison of variants, one table per variant, failed jobs."""
    counts = {s: sum(j.status == s for j in jobs) for s in (OK, FAILED, NO_RESULT)}
    devices = sorted({_device(j) for j in jobs if j.results})
    parts = [f"# Sweep {sweep_dir.name}",
             "",
             f"- Folder: `{sweep_dir}`",
             f"- Command: `{sweep_command(sweep_dir)}`",
             f"- Jobs: {len(jobs)} ({counts[OK]} ok, {counts[FAILED]} failed, {counts[NO_RESULT]} without result)",
             f"- Device: {', '.join(devices) or 'none finished'}",
             f"- Wall time: {sweep_wall_time(jobs)}",
             f"- Aggregated: {time.strftime('%Y-%m-%d %H:%M %Z')}",
             "",
             "Metrics in %: mean over the runs (seeds) of a class, `± std` (sample std over seeds) where "
             "there are several; the mean row averages the classes within each seed, then over seeds. "
             "Runs: finished runs of the class (the seeds); on the mean row, the seeds. "
             "Localized: share of queries whose pose PnP accepted. Times: mean seconds per run and stage; "
             "`*` marks a stage reused from the stage cache in at least one run (its time is the lookup).",
             ""]
    variants = list(dict.fromkeys(r.variant for r in rows))
    if not variants:
        parts += ["No job finished: see the failed jobs below.", ""]
    if len(variants) > 1:
        parts += ["## Comparison (mean over classes)", "", comparison_table(rows), ""]
    for variant in variants:
        parts += [f"## {variant}", "", markdown_table([r for r in rows if r.variant == variant]), ""]
    failures = [j for j in jobs if j.status != OK]
    parts += [f"## Failed jobs ({len(failures)})", ""]
    if failures:
        parts += ["| Job | Class | Overrides | Error | Folder |", "|---|---|---|---|---|"]
        parts += [f"| {j.num} | {j.class_name} | `{' '.join(j.overrides)}` | {_one_line(j.error)} | "
                  f"`{j.dir.name}` |" for j in failures]
    else:
        parts.append("None.")
    return "\n".join(parts) + "\n"


def sweep_wall_time(jobs: list[JobRecord]) -> str:
    """From the first job's start to the last job's end (what a launcher's parallelism shortens)."""
    starts = [j.started_at for j in jobs if j.started_at]
    ends = [j.finished_at for j in jobs if j.finished_at]
    if not starts or not ends:
        return "unknown"
    busy = sum(j.finished_at - j.started_at for j in jobs if j.started_at and j.finished_at)
    wall = max(ends) - min(starts)
    return f"{wall / 60:.1f} min for {busy / 60:.1f} min of jobs ({busy / max(wall, 1e-9):.1f} jobs at a time on average)"


def sweep_command(sweep_dir: Path) -> str:
    """The multirun command as Hydra recorded it in ``multirun.yaml`` (overrides of the command line)."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.exists():
        return "unknown (no multirun.yaml)"
    with open(path) as handle:
        overrides = (yaml.safe_load(handle) or {}).get("hydra", {}).get("overrides", {})
    return " ".join(["python run.py -m", *(overrides.get("hydra") or []), *(overrides.get("task") or [])])


def log_to_wandb(sweep_dir: Path, out_dir: Path, jobs: list[JobRecord], rows: list[Row], mode: str,
                 project: str) -> Path | None:
    """One W&B run of job_type "sweep-summary" holding the tables; returns its local folder."""
    if mode == "disabled":
        return None
    require_extra(("wandb",), "the sweep summary's W&B run", instead="--wandb disabled")
    import wandb

    run = wandb.init(project=project, name=f"sweep-summary-{sweep_dir.name}", job_type="sweep-summary",
                     dir=str(out_dir), mode=mode, config={"sweep_dir": str(sweep_dir)},
                     settings=wandb.Settings(silent=True))
    try:
        columns = run_columns(jobs)
        run.log({"sweep/table": wandb.Table(columns=table_columns(), data=_cells_for_wandb(table_records(rows))),
                 "sweep/runs": wandb.Table(columns=columns, data=_cells_for_wandb(run_records(jobs, columns)))})
        for row in rows:
            if row.class_name.startswith("Mean"):
                for key, cell in row.cells.items():
                    if cell.mean is not None:
                        run.summary[f"{row.variant}/{key}"] = cell.mean
        run.summary["jobs_failed"] = sum(j.status != OK for j in jobs)
        return Path(run.dir).parent
    finally:
        run.finish()


def _cells_for_wandb(records: list[list]) -> list[list]:
    # W&B fixes a column's type from its values: keep numbers numeric and everything else text.
    return [[v if isinstance(v, (int, float)) or v is None else str(v) for v in record] for record in records]


def _write_csv(path: Path, columns: list[str], records: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([["" if v is None else v for v in record] for record in records])


def _device(job: JobRecord) -> str:
    env = (job.results or {}).get("environment", {})
    return f"{job.results.get('device', '?')} ({env.get('device_name', '?')})"


def _one_line(text: str | None) -> str:
    return (text or "").splitlines()[0].replace("|", "\\|")[:300] if text else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m splatpose.sweeps.aggregate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder, e.g. outputs/multirun/<time>")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default <sweep_dir>/summary)")
    parser.add_argument("--wandb", default="offline", choices=("offline", "online", "disabled"),
                        help="W&B mode of the summary run (default offline)")
    parser.add_argument("--project", default="splatpose", help="W&B project")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = aggregate_sweep(args.sweep_dir, args.out, args.wandb, args.project)
    print(summary.markdown.read_text())
    print(f"Wrote {summary.markdown}, {summary.table_csv}, {summary.runs_csv}, {summary.report}"
          + (f"; W&B run in {summary.wandb_dir}" if summary.wandb_dir else ""))


if __name__ == "__main__":
    main()
