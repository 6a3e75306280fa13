"""Where outputs may go: the tool never replaces or deletes a file or folder it did not make.

What the tool makes carries a marker: an image its text chunk or comment (`images.MARKER`), an
artifact folder its meta.json (`artifacts.check_replaceable`). An existing output path is
refused unless `--overwrite` is given and it carries the marker (a folder holding anything
else is still refused); an output equal to an input, inside an input folder or holding an input
is always refused. Every location is checked, before any model work, for being writable and
having room.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from dpl_edit.errors import DplError
from dpl_edit.io.artifacts import check_replaceable
from dpl_edit.io.images import image_format, is_marked_image

MIN_FREE_BYTES = 64 * 2**20
"""Free space an output's disk must have: an inversion folder of Stable Diffusion takes about
15 MB at 50 steps; less free space than this is a full disk in all but name."""


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _inside(inner: Path, outer: Path) -> bool:
    return outer.resolve() in inner.resolve().parents


def _check_inputs(path: Path, inputs: Iterable[Path]) -> None:
    for source in inputs:
        if _same(path, source):
            raise DplError(f"the output '{path}' is the input '{source}'; choose another --out")
        if _inside(source, path):
            raise DplError(f"the output folder '{path}' holds the input '{source}'")
        if _inside(path, source):
            raise DplError(f"the output '{path}' is inside the input '{source}'")


def check_location(path: Path) -> None:
    """The folder `path` goes in can be written and has room (its nearest existing ancestor,
    where the missing folders would be created)."""
    anchor = Path(os.path.abspath(path)).parent
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise DplError(f"cannot write '{path}': '{anchor}' is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dpl-edit-", suffix=".tmp", dir=anchor)
    except OSError as exc:
        raise DplError(f"cannot write '{path}': {exc.strerror} ('{anchor}')") from None
    os.close(fd)
    os.unlink(probe)
    free = shutil.disk_usage(anchor).free
    if free < MIN_FREE_BYTES:
        raise DplError(
            f"cannot write '{path}': only {free / 2**20:.0f} MB free on its disk (dpl-edit "
            f"wants {MIN_FREE_BYTES // 2**20} MB)"
        )


def _refuse_existing(path: Path, what: str) -> DplError:
    return DplError(f"'{path}' already exists; pass --overwrite to replace it ({what})")


def check_image_target(
    path: str | os.PathLike, overwrite: bool, inputs: Iterable[Path] = ()
) -> Path:
    """An image file to write: named .png or .jpg, and replacing only an image dpl-edit made."""
    path = Path(path)
    if path.is_dir():
        raise DplError(f"'{path}' is a folder; name the image file to write")
    image_format(path)
    _check_inputs(path, inputs)
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not is_marked_image(path):
            raise DplError(
                f"'{path}' exists and dpl-edit did not write it; it is never replaced (not even "
                "with --overwrite): choose another --out"
            )
        if not overwrite:
            raise _refuse_existing(path, "an image dpl-edit wrote")
    check_location(path)
    return path


def check_folder_target(
    path: str | os.PathLike, overwrite: bool, inputs: Iterable[Path] = ()
) -> Path:
    """An artifact folder to write: replacing only an artifact folder holding only its files,
    and never the current folder or one that holds it."""
    path = Path(path)
    _check_inputs(path, inputs)
    if Path.cwd().resolve() == path.resolve() or _inside(Path.cwd(), path):
        raise DplError(f"'{path}' is or holds the current folder; choose another --out")
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_dir():
            raise DplError(f"'{path}' exists and is not a folder; choose another --out")
        check_replaceable(path)
        if not overwrite:
            raise _refuse_existing(path, "an inversion folder dpl-edit wrote")
    check_location(path)
    return path
