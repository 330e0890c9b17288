"""Atomic file writes: a reader (another process, a resumed run) sees the old file or the new one,
never a half-written one, and an interrupted write leaves nothing behind."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write (same suffix, so writers that add one, like
    ``np.savez``, keep its name); renamed onto ``path`` when the block ends, removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path | str, data: Any) -> None:
    """JSON with sorted keys (values it cannot encode are written as ``str``)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))
