"""Does an image show the captioned objects? A rule-based checker for world scenes.

Used to grade generated images (the bundled model's generation gate) and edits (the benchmark's
"intended object seen" rate). For every (colour, shape) the caption names, it collects the
pixels near that colour, keeps the largest connected blob, and names the blob's shape by the
best IoU against each shape rendered at the blob's centre and at the size that matches the
blob's area. Its accuracy is measured on rendered scenes, where the answer is known
(`validate`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dpl_edit.world import synthetic as world

_CAPTION_OBJECT = re.compile(
    r"\b(" + "|".join(world.COLORS) + r") (" + "|".join(world.SHAPES) + r")\b"
)
COLOUR_TOLERANCE = 60.0
_MIN_PIXELS = 12


@dataclass(frozen=True)
class ObjectCheck:
    color: str
    shape: str
    found_shape: str | None  # shape of the largest blob of that colour; None when no blob
    pixels: int

    @property
    def ok(self) -> bool:
        return self.found_shape == self.shape


def caption_objects(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a world caption names, in caption order."""
    return _CAPTION_OBJECT.findall(caption)


def check_object(image: np.ndarray, color: str, shape: str) -> ObjectCheck:
    """Look for a `color` `shape` in a uint8 HxWx3 image."""
    rgb = np.asarray(world.COLORS[color], dtype=np.float32)
    close = np.linalg.norm(image.astype(np.float32) - rgb, axis=-1) < COLOUR_TOLERANCE
    labels, n = ndimage.label(close)
    if n == 0:
        return ObjectCheck(color, shape, None, 0)
    sizes = ndimage.sum(close, labels, index=range(1, n + 1))
    blob = labels == (int(np.argmax(sizes)) + 1)
    pixels = int(blob.sum())
    if pixels < _MIN_PIXELS:
        return ObjectCheck(color, shape, None, pixels)
    return ObjectCheck(color, shape, classify_shape(blob), pixels)


def shape_templates(blob: np.ndarray) -> dict[str, np.ndarray]:
    """Every world shape drawn at a blob's centroid with the blob's area, at the blob's size.

    A blob at another resolution than the world's is placed by scaling its centroid and area,
    and the templates are drawn at the world's size and resized back (nearest)."""
    scale = world.SIZE / blob.shape[0]
    cy, cx = ndimage.center_of_mass(blob)
    area = float(blob.sum()) * scale**2
    templates = {}
    for shape in world.SHAPES:
        unit = world.SceneObject(shape, "red", world.SIZE / 2, world.SIZE / 2, 10.0)
        half = 10.0 * np.sqrt(area / float(world._coverage(unit).sum()))
        drawn = world.SceneObject(
            shape, "red", (cx + 0.5) * scale - 0.5, (cy + 0.5) * scale - 0.5, half
        )
        template = world._coverage(drawn) > 0.5
        if template.shape != blob.shape:
            rows = (np.arange(blob.shape[0]) * scale).astype(int)
            cols = (np.arange(blob.shape[1]) * scale).astype(int)
            template = template[np.ix_(rows, cols)]
        templates[shape] = template
    return templates


def classify_shape(blob: np.ndarray) -> str:
    """Name the shape of a boolean blob by template IoU at its centroid and area."""
    ious = {
        shape: float((t & blob).sum() / max((t | blob).sum(), 1))
        for shape, t in shape_templates(blob).items()
    }
    return max(ious, key=ious.get)


def check_image(image: np.ndarray, caption: str) -> list[ObjectCheck]:
    """Check every captioned object; the image passes when all checks are ok."""
    return [check_object(image, c, s) for c, s in caption_objects(caption)]


def validate(seed: int = 12345, count: int = 300) -> float:
    """Checker accuracy on rendered scenes (share of scenes judged fully correct)."""
    hits = 0
    for i in range(count):
        render = world.scene_at(seed, i).render()
        hits += all(c.ok for c in check_image(render.image, render.caption))
    return hits / count
