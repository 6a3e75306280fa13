"""Atomic writes: a reader (or a crash) never sees a half-written file or artifact folder.

Everything is written into a temporary sibling first and renamed into place; rename is atomic
within one filesystem, which a sibling guarantees.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dpl_edit.errors import DplError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path`, replacing any existing file in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_folder_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse early (before hours of work) a target that `atomic_folder` would refuse."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DplError(f"'{path}' exists and is not a folder")
    if path.exists() and not overwrite:
        raise DplError(f"'{path}' already exists; pick another folder or allow overwriting it")
    return path


@contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `path` when the block succeeds.

    An existing folder is refused unless `overwrite`; then it is swapped out by two renames
    and deleted only after the new folder is in place, so `path` is never half-written.
    """
    path = check_folder_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
