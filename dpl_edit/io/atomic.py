"""Atomic writes: a reader (or a crash) never sees a half-written file or artifact folder.

Everything is written into a temporary sibling first and renamed into place; rename is atomic
within one filesystem, which a sibling guarantees. What lands in place gets the permissions the
user's umask gives a new file or folder, as any other program's output would (a temporary file
starts private).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from dpl_edit.errors import DplError


def user_umask() -> int:
    """The process's umask, read without changing it where the system allows (changing it, even
    for a moment, would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_modes() -> tuple[int, int]:
    """(file mode, folder mode) of a new file and folder under the user's umask."""
    mask = user_umask()
    return 0o666 & ~mask, 0o777 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path`, replacing any existing file in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _open_modes()[0])
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _give_user_modes(folder: Path) -> None:
    """Set the umask's modes on a finished temporary folder and everything in it."""
    file_mode, folder_mode = _open_modes()
    for entry in folder.rglob("*"):
        if not entry.is_symlink():
            entry.chmod(folder_mode if entry.is_dir() else file_mode)
    folder.chmod(folder_mode)


@contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `path` when the block succeeds.

    An existing folder is refused unless `overwrite` (whether it may be replaced is the
    caller's rule, e.g. `artifacts.check_replaceable`); then it is swapped out by two renames
    and deleted only after the new folder is in place, so `path` is never half-written. A
    failed swap puts the old folder back.
    """
    path = Path(os.path.abspath(path))  # "." or "sub/.." name no folder that can be renamed
    if path.exists() and not path.is_dir():
        raise DplError(f"'{path}' exists and is not a folder")
    if path.exists() and not overwrite:
        raise DplError(f"'{path}' already exists; pick another folder or allow overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _give_user_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    try:
        os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old / path.name, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        with suppress(OSError):
            old.rmdir()  # only when empty: it still holds the old folder if the restore failed
        raise
    shutil.rmtree(old, ignore_errors=True)
