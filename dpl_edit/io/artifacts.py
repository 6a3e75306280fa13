"""On-disk artifact folders: JSON metadata, safetensors tensors and PNG images, no pickle.

A folder is written atomically (see `atomic.py`) and carries a format name and version so that a
reader refuses, with a clear message, anything it does not understand. A folder read back is
untrusted input: its files must be plain files inside it (no symlinks, no paths in the names
meta.json lists), and what a kind of artifact stores in them is checked by its own reader
(`dpl_edit.engine.artifact`). The meta.json is also the folder's marker: a folder may be
replaced (`overwrite`) only when it is an artifact holding nothing but its own files.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dpl_edit import __version__
from dpl_edit.errors import DplError
from dpl_edit.io.atomic import atomic_folder
from dpl_edit.io.images import check_image_size, encode_image
from dpl_edit.io.jsonl import excerpt

FORMAT_VERSION = 1
META_FILE = "meta.json"
TENSORS_FILE = "tensors.safetensors"
MAX_META_BYTES = 16 * 2**20
"""A meta.json is a few kilobytes; a larger one is not read (it could hold anything)."""
_BARE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
"""An image name: one plain file name inside the folder (no separators, no leading dot)."""


@dataclass
class Artifact:
    """The three kinds of content of an artifact folder."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    images: dict[str, Image.Image]


def _check_image_names(names: Any, where: str) -> list[str]:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DplError(f"{where}: key 'images' must be a list of names, got {excerpt(names)}")
    for name in names:
        if not _BARE_NAME.fullmatch(name) or ".." in name:
            raise DplError(f"{where}: key 'images' holds {excerpt(name)}, not a plain file name")
    return names


def write_artifact(
    folder: str | os.PathLike, kind: str, artifact: Artifact, overwrite: bool = False
) -> Path:
    """Write the artifact into `folder` atomically; refuses an existing folder unless told,
    and even then one that holds anything but an artifact's own files (`check_replaceable`)."""
    names = _check_image_names(sorted(artifact.images), f"{kind} '{folder}'")
    if overwrite and Path(folder).is_dir():
        check_replaceable(folder)
    header = {"format": kind, "format_version": FORMAT_VERSION, "package_version": __version__}
    meta = {**header, **artifact.meta, "images": names}
    with atomic_folder(folder, overwrite) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in artifact.tensors.items()}
        save_file(tensors, str(tmp / TENSORS_FILE))
        for name, image in artifact.images.items():
            (tmp / f"{name}.png").write_bytes(encode_image(image))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return Path(folder)


def _plain_file(folder: Path, name: str) -> Path:
    """`folder/name`, which must be a plain file (a symlink could point anywhere)."""
    path = folder / name
    if path.is_symlink() or not path.is_file():
        what = "a symlink" if path.is_symlink() else "missing or not a file"
        raise DplError(f"'{folder}' is incomplete or corrupt ({name} is {what})")
    return path


def _read_meta(folder: Path, kind: str = "artifact") -> dict[str, Any]:
    """The folder's meta.json as a dict (not yet checked beyond being JSON)."""
    if not (folder / META_FILE).is_file():
        raise DplError(f"'{folder}' is not a dpl-edit {kind} folder (no {META_FILE})")
    meta_file = _plain_file(folder, META_FILE)
    if meta_file.stat().st_size > MAX_META_BYTES:
        raise DplError(f"'{meta_file}' is corrupt (over {MAX_META_BYTES // 2**20} MB)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise DplError(f"'{meta_file}' is corrupt (not JSON)") from None
    if not isinstance(meta, dict):
        raise DplError(f"'{meta_file}' is corrupt (not a JSON object)")
    return meta


def check_replaceable(folder: str | os.PathLike) -> None:
    """Refuse to replace a folder unless it is an artifact folder holding only its own files:
    anything else in it (a user's file, a subfolder) would be deleted with it."""
    folder = Path(folder)
    if not any(folder.iterdir()):
        return  # an empty folder: nothing in it to lose
    try:
        meta = _read_meta(folder)
        if not isinstance(meta.get("format"), str):
            raise DplError("no format")
        own = {META_FILE, TENSORS_FILE}
        own |= {f"{name}.png" for name in _check_image_names(meta.get("images"), str(folder))}
    except DplError:
        raise DplError(
            f"'{folder}' is not a folder dpl-edit made (no valid {META_FILE}); --overwrite "
            "replaces only dpl-edit's own outputs: choose another --out"
        ) from None
    foreign = sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.name not in own or entry.is_symlink() or not entry.is_file()
    )
    if foreign:
        raise DplError(
            f"'{folder}' holds files dpl-edit did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); it is not replaced: choose another --out"
        )


def read_artifact(folder: str | os.PathLike, kind: str) -> Artifact:
    """Read an artifact folder, checking its format name and version, and that every file it
    names is a plain file inside it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DplError(f"'{folder}' is not a dpl-edit {kind} folder (no such folder)")
    meta = _read_meta(folder, kind)
    if meta.get("format") != kind:
        raise DplError(f"'{folder}' holds a {excerpt(meta.get('format'))}, not a {kind}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DplError(
            f"'{folder}' has {kind} format version {excerpt(meta.get('format_version'))}, but "
            f"this dpl-edit reads version {FORMAT_VERSION}; create it again"
        )
    names = _check_image_names(meta.pop("images", None), f"'{folder}/{META_FILE}'")
    try:
        tensors = load_file(str(_plain_file(folder, TENSORS_FILE)))
        images = {name: _read_png(_plain_file(folder, f"{name}.png")) for name in names}
    except (OSError, ValueError, SyntaxError, SafetensorError, UnidentifiedImageError) as exc:
        raise DplError(f"'{folder}' is incomplete or corrupt ({exc})") from None
    return Artifact(meta, tensors, images)


def _read_png(path: Path) -> Image.Image:
    """One of the folder's images, its size checked before its pixels are decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                check_image_size(image, path)
                return image.convert(image.mode)
        except Image.DecompressionBombError:
            raise DplError(f"'{path}' is far too large for an artifact's image") from None
