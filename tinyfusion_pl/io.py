"""Atomic file output: a reader never sees a half-written file, and a failed write leaves nothing behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as temporary:
        write(temporary)
    return Path(path)


def save_torch(obj: object, path: str | Path) -> Path:
    return write_atomically(path, lambda temporary: torch.save(obj, temporary))


def save_json(obj: object, path: str | Path) -> Path:
    return write_atomically(path, lambda temporary: temporary.write_text(json.dumps(obj, indent=2) + "\n"))


def save_text(text: str, path: str | Path) -> Path:
    return write_atomically(path, lambda temporary: temporary.write_text(text))
