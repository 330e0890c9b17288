"""Run folders: one per run, never shared by two live runs.

Hydra names a run folder by the second it started (``${now:...}``), so two runs started in the same
second (two terminals, a scheduler starting jobs together) would share one folder, one run.log and one
results.json. The folder name therefore ends in ``${run_suffix:}``: the scheduler's job id when there
is one (SLURM_JOB_ID), else the process id, which no two live processes on one machine share. A lock
held for the run's lifetime (:func:`claim_run_dir`) refuses a second live run in a folder given by
hand (``hydra.run.dir=...``).

This module is imported by ``run.py`` before Hydra composes the config; it imports nothing heavy.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from splatpose.errors import UserError

LOCK_FILE = ".run.lock"
_held_locks: list = []  # open handles keep their locks until the process ends


def run_suffix() -> str:
    """What makes a run folder's name unique among runs started in the same second."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"job{job_id}" + (f"_{task}" if task else "")
    return f"pid{os.getpid()}"


RUN_ID_VARIABLE = "SPLATPOSE_RUN_ID"


def set_run_id() -> str:
    """Set SPLATPOSE_RUN_ID for this process and the workers it starts (run.py, before Hydra); returns it."""
    os.environ[RUN_ID_VARIABLE] = run_suffix()
    return os.environ[RUN_ID_VARIABLE]


class RunDirBusy(UserError):
    """Another live run writes into the same folder."""


def claim_run_dir(out_dir: Path) -> None:
    """Hold an exclusive lock on ``out_dir`` until this process ends.

    Raises:
        RunDirBusy: another live process holds it (two runs given the same ``hydra.run.dir``).
    """
    handle = open(Path(out_dir) / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunDirBusy(f"{out_dir}: another run is writing into this folder right now; give this run its "
                         "own folder (leave hydra.run.dir unset, or set it to a new folder)") from None
    _held_locks.append(handle)
