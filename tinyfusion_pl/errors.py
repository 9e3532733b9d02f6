"""Mistakes in what a user asked for, as exceptions: `train.py` shows one as its message alone and exits non-zero.

A `UsageError` is something the user can fix (a setting, a path, a file); its message says what is wrong and how
to fix it. Anything else is a bug, and keeps its traceback. `HYDRA_FULL_ERROR=1` shows the traceback of both.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A setting, path or file the user gave cannot work; the message names the fix."""


class MissingInputError(UsageError, FileNotFoundError):
    """A file or folder the run needs is not there (a checkpoint, a stage's outputs, the data)."""


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into."""


def find_usage_error(error: BaseException) -> UsageError | None:
    """The UsageError that caused `error` (itself, or one it was raised from, e.g. inside Hydra's instantiate)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UsageError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
