"""Reading user images into model-sized RGB squares, and saving PNGs atomically."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dpl_edit.errors import DplError
from dpl_edit.io.atomic import atomic_write_bytes


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open any Pillow-readable image (EXIF rotation applied); missing or corrupt is a user error."""
    path = Path(path)
    if not path.is_file():
        raise DplError(f"image '{path}' does not exist")
    try:
        with Image.open(path) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DplError(f"cannot read image '{path}': {exc}") from None


def load_image(path: str | os.PathLike, size: int, resize: bool = False) -> Image.Image:
    """Any Pillow-readable image as a size x size RGB picture (see `prepare_image`)."""
    return prepare_image(read_image(path), size, resize)


def prepare_image(image: Image.Image, size: int, resize: bool = False) -> Image.Image:
    """Convert to RGB (alpha composited on white) and bring to size x size.

    Non-square images are centre-cropped (as null-text inversion does) so objects keep their
    shape; `resize=True` stretches instead (as the DPL code does).
    """
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    if not resize:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB picture -> [1, 3, H, W] float tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def tensor_to_arrays(pixels: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] pixels in [-1, 1] -> [N, H, W, 3] uint8, rounded as a saved picture is.

    The one conversion back to pictures: decoded images, and the training's and the gates'
    PSNR, all see the same 8-bit values."""
    array = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return array.permute(0, 2, 3, 1).cpu().numpy()


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save as PNG atomically (written to a temporary sibling, then renamed)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())
