"""Reading a Hydra sweep folder: one :class:`JobRecord` per job, whatever its outcome.

Every job folder of a multirun holds ``.hydra/`` (Hydra writes it before the job starts: the
overrides and the runtime choices of the config groups) and then, written by
:func:`splatpose.tasks.run_task`, ``config_resolved.yaml`` and either ``results.json`` (finished)
or ``failure.json`` (the error). A folder with neither was killed (out of memory, time limit) or
is still running.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from splatpose.sweeps.resume import FAILURE, RESULTS

OK, FAILED, NO_RESULT = "ok", "failed", "no result"
# Config groups that say how a job runs, not what it computes.
RUNTIME_GROUPS = ("hydra/", "logger", "callbacks", "paths", "trainer", "debug")


@dataclass
class JobRecord:
    """One job of a sweep.

    factors: what distinguishes the job, ``{"sfm/feature": "aliked", "class": "01Gorilla", ...}``:
        the chosen option of every config group plus every ``key=value`` override
    results: the parsed ``results.json`` (None unless status is "ok")
    error: the recorded error of a failed job (first line), or why there is no result
    """

    dir: Path
    num: int
    status: str
    class_name: str
    seed: int | None
    factors: dict[str, str] = field(default_factory=dict)
    results: dict | None = None
    error: str | None = None
    overrides: list[str] = field(default_factory=list)
    # Wall-clock window of the job (epoch seconds; from the files run_task writes first and last).
    started_at: float | None = None
    finished_at: float | None = None
    # The GPU its joblib worker leased and that worker's pid (gpu_lease.json), when pinned.
    gpu: str | None = None
    worker_pid: int | None = None


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Folders under ``sweep_dir`` that hold a Hydra job (a ``.hydra/overrides.yaml``)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep_dir} does not exist; pass the folder a multirun "
                                "wrote, e.g. outputs/multirun/2026-11-20_10-00-00")
    return sorted(p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")
                  if ".submitit" not in p.parts)


def read_job(job_dir: Path) -> JobRecord:
    """The record of one job folder (never raises for a missing or failed result)."""
    hydra_cfg = _load_yaml(job_dir / ".hydra" / "hydra.yaml").get("hydra", {})
    overrides = _load_yaml(job_dir / ".hydra" / "overrides.yaml") or []
    config = _load_yaml(job_dir / "config_resolved.yaml") or _load_yaml(job_dir / ".hydra" / "config.yaml")
    choices = {k: str(v) for k, v in (hydra_cfg.get("runtime", {}).get("choices") or {}).items()
               if v is not None and not k.startswith(RUNTIME_GROUPS)}
    factors = dict(choices)
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if not key.startswith(RUNTIME_GROUPS):
            factors.setdefault(key, value)
    status, results, error = _outcome(job_dir)
    class_name = str((results or {}).get("class") or config.get("class") or factors.get("class", "?"))
    factors["class"] = class_name
    seed = config.get("seed")
    lease = _load_json(job_dir / "gpu_lease.json")
    return JobRecord(dir=job_dir, num=int(hydra_cfg.get("job", {}).get("num", -1)), status=status,
                     class_name=class_name, seed=int(seed) if isinstance(seed, int) else None,
                     factors=factors, results=results, error=error, overrides=list(overrides),
                     started_at=_mtime(job_dir / "config_resolved.yaml"),
                     finished_at=_mtime(job_dir / FAILURE) or _mtime(job_dir / RESULTS),
                     gpu=lease.get("gpu"), worker_pid=lease.get("pid"))


def read_sweep(sweep_dir: Path) -> list[JobRecord]:
    """Every job of the sweep, in job-number order."""
    return sorted((read_job(d) for d in find_job_dirs(sweep_dir)), key=lambda j: (j.num, str(j.dir)))


def _outcome(job_dir: Path) -> tuple[str, dict | None, str | None]:
    failure_path, results_path = job_dir / FAILURE, job_dir / RESULTS
    if failure_path.exists():
        failure = _load_json(failure_path)
        return FAILED, None, str(failure.get("error") or f"unreadable {failure_path}")
    if results_path.exists():
        results = _load_json(results_path)
        if results and results.get("status", OK) == OK:
            return OK, results, None
        return FAILED, None, str((results or {}).get("error") or f"unreadable or failed {results_path}")
    return NO_RESULT, None, ("no results.json nor failure.json: the job was killed (memory, time limit) "
                             "or is still running; see its run.log")


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


def _load_yaml(path: Path):
    if not path.exists():
        return {}
    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
