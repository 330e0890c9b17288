"""One GPU per job process in a joblib sweep: each worker process leases a distinct GPU.

Hydra's joblib launcher runs jobs in a pool of worker processes (loky) and reuses each worker for
several jobs. CUDA reads ``CUDA_VISIBLE_DEVICES`` once, when the process first touches the GPU, so a
worker can never move to another GPU after its first job: the pinning must belong to the *process*,
not to the job number (``job.num % num_gpus`` would put a reused worker's next job on a GPU it cannot
switch to, and two concurrent jobs on the same GPU).

So a worker, before its first job touches CUDA, takes an exclusive ``flock`` on one lock file per GPU
(``<lease_dir>/gpu-<id>.lock``) and keeps it until the process exits; the operating system releases
the lock when the process dies, however it dies. Jobs that run in the same worker later reuse its
lease. Two processes therefore never hold the same GPU, and with ``hydra.launcher.n_jobs`` equal to
the number of GPUs every GPU is busy. A worker that finds every GPU leased waits ``wait_s`` seconds,
then fails its job with an error that says how to set ``n_jobs`` (the sweep goes on; a rerun retries).

Submitit (local or Slurm) and the sequential basic launcher are left alone: submitit and Slurm hand
each job its own ``CUDA_VISIBLE_DEVICES``, and the basic launcher runs one job at a time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

from splatpose.atomic_files import write_json_atomic

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


class NoFreeGpu(RuntimeError):
    """Every GPU of the pool is leased by another process of this machine."""


@dataclass
class GpuLease:
    """The GPU this process holds: ``gpu`` is the token written to ``CUDA_VISIBLE_DEVICES``."""

    gpu: str
    lock_path: Path
    handle: IO[str]


# The lease of this process, kept for its whole life (a loky worker runs many jobs).
_lease: GpuLease | None = None


def visible_gpus(configured: Sequence[str | int] | str | None = None) -> list[str]:
    """The pool of GPUs that jobs of this machine share, as ``CUDA_VISIBLE_DEVICES`` tokens.

    Args:
        configured: an explicit pool (``[0, 1]`` or ``"0,1"``; tokens may be indices or GPU UUIDs);
            ``None`` or ``"auto"`` means: ``CUDA_VISIBLE_DEVICES`` when it is set, else one token per
            GPU that ``nvidia-smi -L`` lists, else no GPU.

    The GPUs are counted without initialising CUDA in this process (so that it can still be pinned).
    """
    if configured is not None and configured != "auto":
        tokens = configured.split(",") if isinstance(configured, str) else [str(t) for t in configured]
        return [t.strip() for t in tokens if t.strip()]
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        return [t.strip() for t in inherited.split(",") if t.strip() and t.strip() != "-1"]
    return [str(i) for i in range(_nvidia_smi_gpu_count())]


def _nvidia_smi_gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


def default_lease_dir() -> Path:
    """Machine-local (never on a shared file system): leases are about this machine's GPUs."""
    return Path(tempfile.gettempdir()) / f"splatpose-gpu-leases-{os.getuid()}"


def lease_gpu(pool: Sequence[str], job_num: int = 0, lease_dir: Path | None = None,
              wait_s: float = 30.0) -> GpuLease:
    """Lease one GPU of ``pool`` for this process (idempotent) and pin CUDA to it.

    Args:
        pool: ``CUDA_VISIBLE_DEVICES`` tokens of the machine's GPUs (see :func:`visible_gpus`)
        job_num: Hydra's job number; the first GPU tried is ``pool[job_num % len(pool)]`` so that
            workers spread over the GPUs in order, then the others are tried in turn
        lease_dir: folder of the lock files (default :func:`default_lease_dir`)
        wait_s: how long to wait for a GPU when all are leased before raising :class:`NoFreeGpu`

    Returns the lease; afterwards ``os.environ["CUDA_VISIBLE_DEVICES"]`` is the leased GPU alone, so
    ``cuda:0`` in this process is that GPU. A process that already holds a lease keeps it.
    """
    global _lease
    if _lease is not None:
        return _lease
    if not pool:
        raise ValueError("lease_gpu needs at least one GPU in the pool (sweep.gpus=[0,1,...], or GPUs "
                         "visible through CUDA_VISIBLE_DEVICES / nvidia-smi)")
    _refuse_if_cuda_already_initialised()
    lease_dir = Path(lease_dir or default_lease_dir())
    lease_dir.mkdir(parents=True, exist_ok=True)
    first = job_num % len(pool)
    order = list(pool[first:]) + list(pool[:first])
    deadline = time.monotonic() + wait_s
    while True:
        for gpu in order:
            lease = _try_lock(gpu, lease_dir)
            if lease is not None:
                _lease = lease
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu
                log.info("Process %d leased GPU %s (%s)", os.getpid(), gpu, lease.lock_path)
                return lease
        if time.monotonic() >= deadline:
            raise NoFreeGpu(
                f"all {len(pool)} GPUs ({','.join(pool)}) are leased by other processes "
                f"({_holders(pool, lease_dir)}); one job per GPU needs at most {len(pool)} parallel "
                f"jobs: add hydra.launcher.n_jobs={len(pool)} to the command (lock files in {lease_dir})")
        time.sleep(POLL_SECONDS)


def release_gpu() -> None:
    """Give the lease back (the lock is also released when the process exits)."""
    global _lease
    if _lease is not None:
        fcntl.flock(_lease.handle, fcntl.LOCK_UN)
        _lease.handle.close()
        _lease = None


def _lock_path(gpu: str, lease_dir: Path) -> Path:
    # GPU tokens may be UUIDs or MIG ids with slashes: keep file-name-safe characters only.
    return lease_dir / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock"


def _try_lock(gpu: str, lease_dir: Path) -> GpuLease | None:
    path = _lock_path(gpu, lease_dir)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    # Who holds it, for the error message of a process that finds no free GPU.
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n")
    handle.flush()
    return GpuLease(gpu=gpu, lock_path=path, handle=handle)


def _holders(pool: Sequence[str], lease_dir: Path) -> str:
    holders = []
    for gpu in pool:
        path = _lock_path(gpu, lease_dir)
        text = path.read_text().strip() if path.exists() else ""
        holders.append(f"GPU {gpu}: {text or 'unknown'}")
    return "; ".join(holders)


def _refuse_if_cuda_already_initialised() -> None:
    """Changing CUDA_VISIBLE_DEVICES after CUDA started has no effect: fail loudly instead."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised in this process before its GPU was leased, so "
                           "CUDA_VISIBLE_DEVICES can no longer pin it; lease the GPU first thing in "
                           "the job (splatpose.tasks.run_task does) and import nothing that touches CUDA before")


def pin_gpu_for_job(sweep_cfg, launcher_target: str | None, job_num: int, out_dir: Path) -> str | None:
    """Pin this job's process to one GPU when the sweep runs under the joblib launcher.

    Args:
        sweep_cfg: the ``sweep`` config node (or a dict), keys ``gpu_pinning`` ("auto": only under
            joblib; true; false), ``gpus`` ("auto" or a list), ``gpu_lease_dir``, ``gpu_wait_s``
        launcher_target: ``hydra.launcher._target_`` of the running sweep (None outside Hydra)
        job_num: ``hydra.job.num``
        out_dir: the job's folder; the lease is recorded in ``gpu_lease.json`` there

    Returns the leased GPU token, or None when this job is not pinned (no GPU, or another launcher).
    """
    sweep_cfg = sweep_cfg or {}
    mode = sweep_cfg.get("gpu_pinning", "auto")
    if mode is False or mode == "false":
        return None
    if mode == "auto" and "joblib" not in (launcher_target or ""):
        return None
    pool = visible_gpus(sweep_cfg.get("gpus", "auto"))
    if not pool:
        return None  # CPU machine: nothing to pin
    lease = lease_gpu(pool, job_num, sweep_cfg.get("gpu_lease_dir"), float(sweep_cfg.get("gpu_wait_s", 30)))
    write_json_atomic(Path(out_dir) / "gpu_lease.json", {
        "gpu": lease.gpu, "pool": list(pool), "pid": os.getpid(), "job_num": job_num,
        "leased_at": time.time(), "lock_file": str(lease.lock_path)})
    return lease.gpu
