"""Rerunning a sweep skips the jobs that already finished.

A sweep rerun into the same folder (``hydra.sweep.dir=outputs/multirun/<time>``) gives every job the
folder it had before (Hydra numbers the jobs in the same order). A job whose folder holds a
``results.json`` of a successful run with the same configuration is skipped, so a sweep interrupted
by a crash, a time limit or a failed job is finished by running the same command again.

"Same configuration" compares the resolved config stored in ``results.json`` with the job's
config, leaving out the keys that say where and how results are reported rather than what is
computed (:data:`REPORTING_KEYS`), and the detect/serve/watch nodes that a run made before ``task``
became a config group stored although its job lacks them (:data:`TASK_ONLY_KEYS`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RESULTS = "results.json"
FAILURE = "failure.json"
# Top-level keys that do not change the numbers: where files go, which loggers, sweep bookkeeping.
REPORTING_KEYS = ("paths", "logger", "sweep")
# Nodes that only the detect/serve/watch tasks compose (conf/task/). Runs made before `task` became a config
# group carry them whatever their task; a job whose own config lacks them never read them.
TASK_ONLY_KEYS = ("detect", "serve", "watch", "run_dir", "inputs")


def comparable_config(config: DictConfig | dict) -> dict:
    """The resolved config as a plain dict, without :data:`REPORTING_KEYS`."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    plain = json.loads(json.dumps(config, default=str))  # the same normal form as results.json
    return {k: v for k, v in plain.items() if k not in REPORTING_KEYS}


def finished_results(out_dir: Path, cfg: DictConfig) -> dict | None:
    """The stored results of a finished run of ``cfg`` in ``out_dir``, or None if it must (re)run.

    A run is finished when ``results.json`` exists, its ``status`` (when present) is "ok", no
    ``failure.json`` is newer than it, and its stored config equals ``cfg`` (see module docstring).
    """
    results_path = Path(out_dir) / RESULTS
    if not results_path.exists():
        return None
    try:
        results = json.loads(results_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        log.warning("Rerunning: %s is unreadable (%s)", results_path, error)
        return None
    if results.get("status", "ok") != "ok":
        return None
    failure = results_path.with_name(FAILURE)
    if failure.exists() and failure.stat().st_mtime >= results_path.stat().st_mtime:
        return None
    stored = results.get("config")
    current = comparable_config(cfg)
    if stored is not None:
        stored = {k: v for k, v in comparable_config(stored).items() if k in current or k not in TASK_ONLY_KEYS}
    if stored is None or stored != current:
        changed = _changed_keys(stored or {}, current)
        log.info("Rerunning: %s was computed with another config (differs in %s)", results_path,
                 ", ".join(changed[:8]) or "unknown keys")
        return None
    return results


def clear_previous_outcome(out_dir: Path) -> None:
    """Before a job (re)runs: drop the failure record of an earlier attempt of this job folder.

    ``results.json`` stays until the new run overwrites it; a new failure writes a new
    ``failure.json``, which the aggregation then reads as the job's outcome.
    """
    (Path(out_dir) / FAILURE).unlink(missing_ok=True)


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [k for key in keys for k in _changed_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]
