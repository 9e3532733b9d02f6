"""Atomic file output: a reader never sees a half-written file or folder, and a failed write leaves nothing behind.

Outputs get the permissions a plain write would give (0666 for files, 0777 for folders, less the umask), not the
private mode of the temporary they are written to: colleagues on a shared machine can read a run's files.
A temporary is named for its writer (`.<name>.partial-<host>-<pid>-<random>`), so a later run can tell the leftovers
of a killed writer from those of one still writing, and remove them (`remove_stray_temporaries`).

A stage's outputs are one set, recorded by `manifest.json`: `begin_output_set` marks the folder incomplete before
the first output is replaced, `finish_output_set` lists every file with its SHA-256 once all are written,
and `check_output_set` refuses a half-written or mixed set (a killed run, a file replaced since).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tinyfusion_pl.errors import UsageError

MANIFEST = "manifest.json"
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_TEMPORARY = re.compile(r"^\..+\.partial-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[a-z0-9_]+(\.[^.]*)?$")


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary_prefix(path: Path) -> str:
    """The start of a temporary's name beside `path`: hidden, named for the target and for this writer."""
    return f".{path.stem}.partial-{_HOST}-{os.getpid()}-"


def _writer_is_gone(host: str, pid: int) -> bool:
    """Whether the process that wrote a temporary has ended (only knowable for a writer on this machine)."""
    if host != _HOST:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, run by another user
        return False
    return False


def remove_stray_temporaries(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Remove the temporaries that killed writers left in `folder` (and below); return what was removed.

    Only temporaries of this module's writers whose process is gone are removed, so a write in progress (another
    job, another rank) is never touched.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    found = folder.rglob(".*.partial-*") if recursive else folder.glob(".*.partial-*")
    for path in sorted(found, key=lambda p: len(p.parts), reverse=True):
        match = _TEMPORARY.match(path.name)
        if match is None or not _writer_is_gone(match["host"], int(match["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=path.suffix)
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
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temporary_prefix(path)))
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


# --------------------------------------------------------------------------- a stage's outputs as one set


def file_digest(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def begin_output_set(folder: str | Path, stage: str) -> None:
    """Mark `folder` as being rewritten by `stage`: until `finish_output_set`, its outputs are no set a reader may use.

    Called before the first output is replaced, so a run killed in between leaves a folder that says so, even
    where an older complete set was.
    """
    save_json({"stage": stage, "complete": False, "files": {}}, Path(folder) / MANIFEST)


def finish_output_set(folder: str | Path, stage: str, names: Iterable[str]) -> Path:
    """Write `manifest.json` last: every output of the set with its SHA-256."""
    folder = Path(folder)
    files = {name: {"sha256": file_digest(folder / name)} for name in names}
    return save_json({"stage": stage, "complete": True, "files": files}, folder / MANIFEST)


def check_output_set(folder: str | Path, stage: str, needed: Iterable[str], fix: str) -> dict[str, Any] | None:
    """The manifest of a complete output set of `stage` in `folder` holding `needed`, or an error naming the files.

    A folder without manifest.json (written before manifests existed, or by hand) is taken as it is: None.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} cannot be read ({error}), so the files of {folder} may not belong together. {fix}") from error
    if not isinstance(manifest, dict) or manifest.get("stage") != stage:
        raise UsageError(f"{path} is not the manifest of a stage={stage} output (it names "
                         f"{manifest.get('stage') if isinstance(manifest, dict) else manifest!r}). {fix}")
    if not manifest.get("complete"):
        present = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.name != MANIFEST)
        raise UsageError(f"{folder} holds a half-written stage={stage} output: the run that wrote it stopped before "
                         f"finishing (files there now: {', '.join(present) or 'none'}). {fix}")
    files = manifest.get("files", {})
    missing = sorted({name for name in needed if name not in files} | {name for name in files if not (folder / name).exists()})
    changed = [name for name in files if name not in missing and file_digest(folder / name) != files[name].get("sha256")]
    if missing or changed:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"{', '.join(changed)} changed since the set was written"] if changed else [])
        raise UsageError(f"The stage={stage} output in {folder} is not one consistent set ({'; '.join(problems)}): "
                         f"its files may come from different runs. {fix}")
    return manifest
