"""On-disk cache of pipeline stages, keyed by the configuration that affects each stage.

A stage's folder is ``<cache_dir>/<stage>/<key>/`` where ``key`` hashes the stage's own settings
and the keys of its inputs, so changing the scorer reuses the SfM model and the splats while
changing the matcher recomputes everything downstream of it. A folder is trusted only once its
``stage.json`` marker exists; the marker is written last, atomically, so an interrupted stage is
redone (or resumed by the stage itself) on the next run. A file lock around each stage makes
concurrent sweep jobs that need the same stage wait for one computation instead of racing.

A stage computed here starts from random state derived from its key alone (:func:`seed_stage`), so
what a key holds does not depend on which stages ran before it in the process: the same key gives
the same files. A stage whose result should vary with the run's seed puts the seed in its settings.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from splatpose.atomic_files import write_json_atomic

log = logging.getLogger(__name__)

MARKER = "stage.json"


def stage_key(stage: str, settings: Any, inputs: tuple[str, ...] = ()) -> str:
    """A short, stable hash of a stage's settings and its inputs' keys.

    ``settings`` is any JSON value, and may hold OmegaConf nodes at any depth: those are hashed by their
    resolved values (``${paths.cache_dir}/x`` by the folder it names), never by their text.
    """
    blob = json.dumps({"stage": stage, "settings": _plain(settings), "inputs": list(inputs)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_seed(key: str) -> int:
    """The seed a stage's random generators start from: a function of the stage key alone (< 2**32)."""
    return int(hashlib.sha256(f"seed|{key}".encode()).hexdigest()[:8], 16)


def seed_stage(key: str) -> int:
    """Seed Python's, numpy's and torch's global generators (and CUDA's) for the stage ``key``.

    Called when a stage starts computing, so its result depends on its key (its settings and
    inputs) and not on what earlier stages drew from the same generators. Returns the seed.
    """
    from lightning.fabric.utilities.seed import seed_everything  # imported here: torch is heavy

    seed = stage_seed(key)
    seed_everything(seed, workers=True, verbose=False)
    return seed


@dataclass
class Stage:
    """One cached stage: its folder, its key, and whether a finished result was found there."""

    name: str
    key: str
    dir: Path
    reused: bool
    seconds: float = 0.0
    # A small JSON-able record the stage leaves for later runs (counts, timings of the
    # original computation); loaded back when the stage is reused.
    summary: dict = field(default_factory=dict)

    def finish(self) -> None:
        """Mark the stage complete (atomic): later runs will trust and reuse this folder."""
        record = {"stage": self.name, "key": self.key, "seconds": self.seconds,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": self.summary}
        write_json_atomic(self.dir / MARKER, record)


class StageCache:
    """Hands out stage folders under ``root`` and serialises work on each one across processes.

    ``device``: the kind of device the stages compute on ("cpu", "cuda"; None: not part of the keys). It is
    part of every stage's key: the same settings give other results on another device (gsplat or the CPU
    rasterizer, and the settings that resolve by device such as ``refine.gradients: auto``), so a cache
    filled on a GPU is not reused by a run on the CPU, nor the other way round.

    ``threads``: torch's CPU thread count (None: not part of the keys). Part of every key for the same
    reason: torch's CPU kernels split their sums by thread, so a refinement on one thread ends a few 1e-3
    degrees from the same refinement on two, and everything downstream moves with it.

    ``cpu_capability``: the vector instruction set torch's CPU kernels dispatch to
    (``torch.backends.cpu.get_cpu_capability()``, e.g. "AVX512", "AVX2"; None: not part of the keys). Part
    of every key because the kernels of each instruction set round otherwise: the same tiny run trained
    other splats under ATEN_CPU_CAPABILITY=avx2 than under avx512 on one machine, so a cache copied from
    another machine is not taken for this one's result (experiments/results/reliability_cpu_2026-12-07.md).
    """

    def __init__(self, root: str | Path, enabled: bool = True, device: str | None = None,
                 threads: int | None = None, cpu_capability: str | None = None):
        self.root = Path(root).expanduser()
        self.enabled = enabled
        self.device = device
        self.threads = threads
        self.cpu_capability = cpu_capability
        self._seed_keys: dict[str, str] = {}  # stage key -> the key of its settings and inputs alone

    @contextlib.contextmanager
    def stage(self, name: str, settings: Any, inputs: tuple[str, ...] = ()) -> Iterator[Stage]:
        """Context for computing (or reusing) one stage.

        Yields a :class:`Stage`; when ``stage.reused`` is True the caller loads the result from
        ``stage.dir`` instead of computing it, and otherwise computes it there and the stage is
        marked finished on a clean exit. An exception leaves no marker, so nothing half-written
        is ever reused. A stage to be computed starts with its generators seeded by
        :func:`seed_stage` from its settings and inputs alone: on another device, thread count or CPU the
        same stage draws the same random numbers (its folder is another, its numerics may differ).
        """
        seed_key = stage_key(name, settings, tuple(self._seed_keys.get(i, i) for i in inputs))
        if self.device is not None or self.threads is not None or self.cpu_capability is not None:
            settings = {"settings": settings, "device": self.device, "threads": self.threads,
                        **({"cpu_capability": self.cpu_capability} if self.cpu_capability else {})}
        key = stage_key(name, settings, inputs)
        self._seed_keys[key] = seed_key
        folder = self.root / name / key
        folder.mkdir(parents=True, exist_ok=True)
        with _file_lock(folder / ".lock"):
            reused = self.enabled and (folder / MARKER).exists()
            stage = Stage(name=name, key=key, dir=folder, reused=reused)
            if reused:
                stage.summary = json.loads((folder / MARKER).read_text())["summary"]
                log.info("[%s] reusing cached result from %s", name, folder)
            else:
                (folder / "settings.json").write_text(
                    json.dumps({"settings": _plain(settings), "inputs": list(inputs)},
                               indent=2, sort_keys=True, default=str))
                log.info("[%s] computing into %s", name, folder)
                seed_stage(seed_key)
            start = time.perf_counter()
            yield stage
            stage.seconds = time.perf_counter() - start
            if not reused:
                stage.finish()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) held for the duration of the block."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _plain(value: Any) -> Any:
    """``value`` with every OmegaConf node in it (at any depth) replaced by its resolved container."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


