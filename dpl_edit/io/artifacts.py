"""On-disk artifact folders: JSON metadata, safetensors tensors and PNG images, no pickle.

A folder is written atomically (see `atomic.py`) and carries a format name and version so that a
reader refuses, with a clear message, anything it does not understand.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dpl_edit import __version__
from dpl_edit.errors import DplError
from dpl_edit.io.atomic import atomic_folder

FORMAT_VERSION = 1
META_FILE = "meta.json"
TENSORS_FILE = "tensors.safetensors"


@dataclass
class Artifact:
    """The three kinds of content of an artifact folder."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    images: dict[str, Image.Image]


def write_artifact(
    folder: str | os.PathLike, kind: str, artifact: Artifact, overwrite: bool = False
) -> Path:
    """Write the artifact into `folder` atomically; refuses an existing folder unless told."""
    header = {"format": kind, "format_version": FORMAT_VERSION, "package_version": __version__}
    meta = {**header, **artifact.meta, "images": sorted(artifact.images)}
    with atomic_folder(folder, overwrite) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in artifact.tensors.items()}
        save_file(tensors, str(tmp / TENSORS_FILE))
        for name, image in artifact.images.items():
            image.save(tmp / f"{name}.png", format="PNG")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return Path(folder)


def read_artifact(folder: str | os.PathLike, kind: str) -> Artifact:
    """Read an artifact folder, checking its format name and version."""
    folder = Path(folder)
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise DplError(f"'{folder}' is not a dpl-edit {kind} folder (no {META_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError:
        raise DplError(f"'{meta_file}' is corrupt") from None
    if meta.get("format") != kind:
        raise DplError(f"'{folder}' holds a '{meta.get('format')}', not a {kind}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DplError(
            f"'{folder}' has {kind} format version {meta.get('format_version')}, but this "
            f"dpl-edit reads version {FORMAT_VERSION}; create it again"
        )
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
        images = {}
        for name in meta.pop("images"):
            with Image.open(folder / f"{name}.png") as image:
                images[name] = image.convert(image.mode)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise DplError(f"'{folder}' is incomplete or corrupt ({exc})") from None
    return Artifact(meta, tensors, images)
