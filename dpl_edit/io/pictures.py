"""Pictures, written atomically: attention grids, image panels, sample sheets, any figure.

Attention grids show each word's time-averaged cross-attention map over the image.

Each row is one set of maps for the same prompt (e.g. NTI's and DPL's, to compare leakage), each
column one word. A word split into several tokens shows the sum of its tokens' maps. Each map is
normalised by its own maximum, as in P2P and DPL's figures, so the pictures show where a word
attends, not how strongly compared with other words.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from dpl_edit.io.atomic import atomic_write_bytes
from dpl_edit.io.images import MARKER, MARKER_KEY, image_format, save_image, save_png

Words = Sequence[tuple[str, Sequence[int]]]


def word_maps(maps: torch.Tensor, words: Words) -> list[torch.Tensor]:
    """[res, res, text_len] -> one [res, res] map per word (sum over its tokens)."""
    return [maps[..., list(positions)].sum(-1) for _, positions in words]


def overlay(image: Image.Image, heat: torch.Tensor, opacity: float = 0.6) -> np.ndarray:
    """Max-normalised heat map, upsampled to the image, blended over it as jet colours."""
    size = image.size[::-1]
    heat = heat.float() / heat.max().clamp_min(1e-12)
    heat = F.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    colours = colormaps["jet"](heat.clamp(0, 1).numpy())[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return (1 - opacity) * base + opacity * colours


def attention_grid(
    image: Image.Image,
    words: Words,
    rows: Sequence[tuple[str, torch.Tensor]],
    path: str | os.PathLike,
) -> Path:
    """Save a labelled PNG grid: the image, then one overlay per word, one row per map set.

    `rows` holds (label, maps [res, res, text_len]) pairs, e.g. [("NTI", a), ("DPL", b)].
    """
    columns = 1 + len(words)
    figure = Figure(figsize=(1.8 * columns, 1.9 * len(rows)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for r, (label, maps) in enumerate(rows):
        axes[r][0].imshow(image)
        axes[r][0].set_title(label, fontsize=9)
        for c, ((word, _), heat) in enumerate(zip(words, word_maps(maps, words), strict=True)):
            axes[r][c + 1].imshow(overlay(image, heat))
            axes[r][c + 1].set_title(word, fontsize=9)
    for axis in axes.flat:
        axis.set_axis_off()
    figure.tight_layout()
    return save_figure(figure, path)


def save_figure(figure: Figure, path: str | os.PathLike, **savefig: Any) -> Path:
    """Render a matplotlib figure and write it atomically, as PNG or JPEG by the extension and
    with the tool's marker (`savefig` options pass on)."""
    image_format(path)  # an unwritable name is refused before the rendering
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={MARKER_KEY: MARKER}, **savefig)
    if image_format(path) == "PNG":
        return atomic_write_bytes(path, buffer.getvalue())
    with Image.open(buffer) as rendered:
        return save_image(rendered.convert("RGB"), path)


def panel(
    images: Sequence[tuple[str, Image.Image]],
    path: str | os.PathLike,
    second_row: Sequence[tuple[str, Image.Image]] = (),
) -> Path:
    """Labelled images in one row (and an optional second row, e.g. attention maps under the
    edits), pixel-exact (nearest upscaling)."""
    columns, rows = len(images), 2 if second_row else 1
    figure = Figure(figsize=(2.4 * columns, 2.7 * rows), dpi=100)
    FigureCanvasAgg(figure)
    for row, cells in enumerate([list(images), list(second_row)][:rows]):
        for i, (label, image) in enumerate(cells):
            axis = figure.add_subplot(rows, columns, row * columns + i + 1)
            axis.imshow(image, interpolation="nearest")
            axis.set_title(label, fontsize=9)
            axis.set_axis_off()
    figure.tight_layout()
    return save_figure(figure, path)


def sample_sheet(images: Sequence[Image.Image], path: str | os.PathLike, columns: int = 8) -> Path:
    """Equal-sized images in a grid, shown at twice their size (e.g. a model's samples)."""
    size = images[0].size[0]
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * size, rows * size), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * size, (i // columns) * size))
    doubled = sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST)
    return save_png(doubled, path)
