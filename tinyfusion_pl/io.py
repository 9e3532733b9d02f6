"""Atomic file output: a reader never sees a half-written file or folder, and a failed write leaves nothing behind.

Outputs get the permissions a plain write would give (0666 for files, 0777 for folders, less the umask), not the
private mode of the temporary they are written to: colleagues on a shared machine can read a run's files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp's file is private (0600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (file or folder), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield temporary
        os.chmod(temporary, 0o777 & ~current_umask())  # mkdtemp's folder is private (0700)
        for file in temporary.rglob("*"):
            if file.is_file():
                os.chmod(file, 0o666 & ~current_umask())
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
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
