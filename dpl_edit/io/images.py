"""Reading user images into model-sized RGB squares, and saving images atomically.

Every image the tool writes carries a marker (`MARKER` in a PNG text chunk or the JPEG comment),
which is how `dpl_edit.io.targets` tells the tool's own outputs, which `--overwrite` may replace,
from a user's files, which it never replaces.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from dpl_edit.errors import DplError
from dpl_edit.io.atomic import atomic_write_bytes

MAX_PIXELS = 64_000_000
"""The largest image read (8000 x 8000): decoded, it takes about 200 MB as RGB; above it a
user gets the reason and the fix (downscale first) instead of minutes of swapping."""
MARKER_KEY, MARKER = "Software", "dpl-edit"
"""The PNG text chunk (and, as bytes, the JPEG comment) that marks an image the tool wrote."""
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
"""The formats an output image can be written in, by the file name's extension."""
JPEG_QUALITY = 95
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
"""Single-channel modes wider than 8 bits (16-bit PNGs, 32-bit and float TIFFs)."""


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open any Pillow-readable image (EXIF rotation applied); missing, corrupt or larger than
    `MAX_PIXELS` (decompression bombs included: the size is read before the pixels) is a user
    error."""
    path = Path(path)
    if not path.is_file():
        raise DplError(f"image '{path}' does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                check_image_size(opened, path)
                opened.load()
                return ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError:
        raise DplError(_too_large(path, "is far too large")) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DplError(f"cannot read image '{path}': {exc}") from None


def check_image_size(image: Image.Image, path: str | os.PathLike) -> None:
    """Refuse an image above `MAX_PIXELS` from its header, before its pixels are decoded."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        size = f"is {width} x {height} ({width * height / 1e6:.0f} megapixels)"
        raise DplError(_too_large(path, size))


def _too_large(path: str | os.PathLike, what: str) -> str:
    return (
        f"image '{path}' {what}; dpl-edit reads images up to {MAX_PIXELS / 1e6:.0f} megapixels "
        "(8000 x 8000): downscale it first"
    )


def load_image(path: str | os.PathLike, size: int, resize: bool = False) -> Image.Image:
    """Any Pillow-readable image as a size x size RGB picture (see `prepare_image`)."""
    return prepare_image(read_image(path), size, resize)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode as 8-bit RGB: alpha composited on white, and wide grey (16-bit PNGs, 32-bit or
    float TIFFs) scaled down to 8 bits, which Pillow's own conversion clips to white instead."""
    if image.mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":  # float pictures are stored in [0, 1] or in [0, 255]
            top = 1.0 if np.nanmax(values, initial=0.0) <= 1.0 else 255.0
        else:
            top = 65535.0
        grey = np.nan_to_num(values / top * 255.0).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        image.mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def prepare_image(image: Image.Image, size: int, resize: bool = False) -> Image.Image:
    """Convert to RGB (`to_rgb`) and bring to size x size.

    Non-square images are centre-cropped (as null-text inversion does) so objects keep their
    shape; `resize=True` stretches instead (as the DPL code does).
    """
    image = to_rgb(image)
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


def image_format(path: str | os.PathLike) -> str:
    """The format an output image is written in, from its extension (PNG or JPEG; anything
    else is refused rather than written as PNG bytes under another format's name)."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise DplError(
            f"'{path}': dpl-edit writes images as PNG or JPEG; name the file .png or .jpg"
        )
    return IMAGE_FORMATS[suffix]


def encode_image(image: Image.Image, image_format: str = "PNG") -> bytes:
    """The bytes of `image` in `image_format` (PNG or JPEG), with the tool's marker."""
    buffer = io.BytesIO()
    if image_format == "JPEG":
        to_rgb(image).save(buffer, format="JPEG", quality=JPEG_QUALITY, comment=MARKER.encode())
    else:
        info = PngImagePlugin.PngInfo()
        info.add_text(MARKER_KEY, MARKER)
        image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save atomically in the format the extension names (`image_format`), with the marker."""
    return atomic_write_bytes(path, encode_image(image, image_format(path)))


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save as PNG atomically (written to a temporary sibling, then renamed), with the marker."""
    return atomic_write_bytes(path, encode_image(image))


def is_marked_image(path: str | os.PathLike) -> bool:
    """Whether `path` is an image this tool wrote (it carries the marker)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                marker = image.info.get(MARKER_KEY) or image.info.get("comment")
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False
    return marker in (MARKER, MARKER.encode())
