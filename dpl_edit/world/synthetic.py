"""A synthetic world of coloured shapes with exact masks.

Every scene is fully described by a few numbers (shapes, colours, centres, sizes, background), so
it can be re-rendered with one object changed: its *ideal edit*, identical pixel for pixel
everywhere the edited object does not touch. That is what lets the benchmark measure leakage and
edit quality exactly, which photos with hand-drawn masks cannot.

Scenes are 64x64 RGB, 1 to 3 non-overlapping objects with distinct shapes and distinct colours
(so every shape word and every colour word names exactly one object), on a plain or textured
background. Captions list the objects in random order, so word order carries no layout and the
model has to find each word's object through attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
_SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLORS = {
    "red": (220, 30, 30),
    "green": (40, 200, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
BACKGROUNDS = ("white", "gray", "black", "striped", "grass")
OBJECT_WORDS = SHAPES
VOCABULARY = (*SHAPES, *COLORS, *BACKGROUNDS, "a", "an", "and", "on", "background")

# Every shape fits in a disc of radius BOUND * half_size around its centre, so swapping the
# shape of an object never makes it overlap its neighbours.
_BOUND = 1.3


@dataclass(frozen=True)
class SceneObject:
    """One object: what it is and where. Its pixels are derived by rendering."""

    shape: str
    color: str
    cx: float
    cy: float
    half_size: float


@dataclass(frozen=True)
class Scene:
    """A scene description; `render()` turns it into pixels and masks."""

    objects: tuple[SceneObject, ...]
    background: str
    texture_seed: int
    order: tuple[int, ...]  # caption order of the objects

    @property
    def caption(self) -> str:
        parts = [
            f"{_article(self.objects[i].color)} {self.objects[i].color} {self.objects[i].shape}"
            for i in self.order
        ]
        return " and ".join(parts) + f" on a {self.background} background"

    def render(self) -> RenderedScene:
        """Image (uint8 HxWx3), one mask per object (keyed by shape word) and the background."""
        image = _background_pixels(self.background, self.texture_seed).astype(np.float32)
        masks: dict[str, np.ndarray] = {}
        for obj in self.objects:
            coverage = _coverage(obj)
            colour = np.asarray(COLORS[obj.color], dtype=np.float32)
            image = image * (1 - coverage[..., None]) + colour * coverage[..., None]
            masks[obj.shape] = coverage > 0.5
        background = ~np.any(np.stack(list(masks.values())), axis=0) if masks else None
        if background is None:
            background = np.ones((SIZE, SIZE), dtype=bool)
        return RenderedScene(
            image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
            caption=self.caption,
            masks=masks,
            background_mask=background,
        )

    def edited(
        self, shape_word: str, *, new_shape: str | None = None, new_color: str | None = None
    ) -> Scene:
        """The ideal edit: the object named `shape_word` gets a new shape and/or colour."""
        index = next((i for i, o in enumerate(self.objects) if o.shape == shape_word), None)
        if index is None:
            raise ValueError(f"no {shape_word!r} in scene")
        obj = self.objects[index]
        new = replace(obj, shape=new_shape or obj.shape, color=new_color or obj.color)
        objects = self.objects[:index] + (new,) + self.objects[index + 1 :]
        return replace(self, objects=objects)


@dataclass(frozen=True)
class RenderedScene:
    image: np.ndarray
    caption: str
    masks: dict[str, np.ndarray]
    background_mask: np.ndarray


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """Draw a random scene: 1-3 objects, distinct shapes and colours, no overlaps."""
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    shapes = rng.choice(SHAPES, size=n, replace=False)
    colors = rng.choice(list(COLORS), size=n, replace=False)
    placed: list[SceneObject] = []
    for shape, color in zip(shapes, colors, strict=True):
        for _ in range(200):
            half = float(rng.uniform(7.0, 12.5) if n > 1 else rng.uniform(9.0, 17.0))
            margin = _BOUND * half
            cx, cy = (float(v) for v in rng.uniform(margin, SIZE - margin, size=2))
            clear = all(
                math.hypot(cx - o.cx, cy - o.cy) > _BOUND * (half + o.half_size) + 1.0
                for o in placed
            )
            if clear:
                placed.append(SceneObject(str(shape), str(color), cx, cy, half))
                break
    return Scene(
        objects=tuple(placed),
        background=str(rng.choice(BACKGROUNDS)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        order=tuple(int(i) for i in rng.permutation(len(placed))),
    )


HARD_CATEGORIES = ("same-colour", "close", "similar-colour", "same-colour-close", "row-of-three")
"""Scenes where a word's attention is likelier to spill onto another object: both objects in one
colour, objects nearly touching (1-3 px between their bounding discs), colours that are near
neighbours (red/orange, blue/purple), one colour *and* nearly touching, and three smaller
objects of distinct colours in a row, each nearly touching the next. The first four have two
objects."""
LEAKAGE_CATEGORIES = ("same-colour", "close", "same-colour-close", "row-of-three")
"""The categories where leaky maps should make edits fail (objects of one colour, objects close
together, three in a row): where DPL claims the most, pooled in benchmark reports."""
_SIMILAR_COLOURS = (("red", "orange"), ("blue", "purple"))
_CLOSE_GAP = (1.0, 3.0)


def _colours(rng: np.random.Generator, category: str, n: int) -> list[str]:
    if category in ("same-colour", "same-colour-close"):
        return [str(rng.choice(list(COLORS)))] * n
    if category == "similar-colour":
        pair = _SIMILAR_COLOURS[int(rng.integers(len(_SIMILAR_COLOURS)))]
        return [str(c) for c in rng.permutation(pair)]
    if category in ("close", "row-of-three"):
        return [str(c) for c in rng.choice(list(COLORS), size=n, replace=False)]
    raise ValueError(f"unknown scene category {category!r}; use {', '.join(HARD_CATEGORIES)}")


def sample_hard_scene(rng: np.random.Generator, category: str) -> Scene:
    """Draw a scene of one of `HARD_CATEGORIES` (shapes stay distinct, so each shape word still
    names one object)."""
    n = 3 if category == "row-of-three" else 2
    shapes = [str(s) for s in rng.choice(SHAPES, size=n, replace=False)]
    colors = _colours(rng, category, n)
    close = category in ("close", "same-colour-close", "row-of-three")
    gap_range = _CLOSE_GAP if close else (1.0, 12.0)
    size_range = (5.0, 7.5) if n == 3 else (7.0, 12.5)
    for _ in range(1000):
        halves = [float(h) for h in rng.uniform(*size_range, size=n)]
        first = rng.uniform(_BOUND * halves[0], SIZE - _BOUND * halves[0], size=2)
        angle = float(rng.uniform(0, 2 * math.pi))
        direction = np.array([math.cos(angle), math.sin(angle)])
        centres = [first]
        for prev, half in zip(halves, halves[1:], strict=False):
            distance = _BOUND * (prev + half) + float(rng.uniform(*gap_range))
            centres.append(centres[-1] + distance * direction)
        inside = all(
            np.all(c >= _BOUND * h) and np.all(c <= SIZE - _BOUND * h)
            for c, h in zip(centres, halves, strict=True)
        )
        if inside:
            break
    else:  # pragma: no cover - 1000 draws always find room on a 64 px canvas
        raise RuntimeError(f"could not place {n} objects")
    objects = tuple(
        SceneObject(shape, color, float(c[0]), float(c[1]), half)
        for shape, color, c, half in zip(shapes, colors, centres, halves, strict=True)
    )
    return Scene(
        objects=objects,
        background=str(rng.choice(BACKGROUNDS)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        order=tuple(int(i) for i in rng.permutation(n)),
    )


def scene_at(seed: int, index: int, n_objects: int | None = None) -> Scene:
    """The `index`-th scene of the world with this seed: the same on every machine."""
    return sample_scene(np.random.default_rng([seed, index]), n_objects)


def swap_target(scene: Scene, rng: np.random.Generator) -> tuple[str, Scene, str]:
    """Pick one object and a word swap for it (new shape or new colour).

    Returns the edited shape word, the ideal edited scene and the target caption. The new word is
    not used by any other object, so the target caption still names each object once.
    """
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    used_shapes = {o.shape for o in scene.objects}
    used_colors = {o.color for o in scene.objects}
    if rng.random() < 0.5:
        new_shape = str(rng.choice([s for s in SHAPES if s not in used_shapes]))
        target = scene.edited(obj.shape, new_shape=new_shape)
    else:
        new_color = str(rng.choice([c for c in COLORS if c not in used_colors]))
        target = scene.edited(obj.shape, new_color=new_color)
    return obj.shape, target, target.caption


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _background_pixels(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "white":
        return np.full((SIZE, SIZE, 3), 245.0)
    if kind == "gray":
        return np.full((SIZE, SIZE, 3), 128.0)
    if kind == "black":
        return np.full((SIZE, SIZE, 3), 15.0)
    if kind == "striped":
        period = float(rng.uniform(6, 12))
        phase = float(rng.uniform(0, period))
        y, x = np.mgrid[0:SIZE, 0:SIZE]
        stripe = ((x + y + phase) % period) < period / 2
        light, dark = np.array([235.0, 235, 235]), np.array([170.0, 170, 185])
        return np.where(stripe[..., None], light, dark)
    if kind == "grass":
        noise = rng.normal(0, 1, size=(SIZE // 4, SIZE // 4))
        noise = np.kron(noise, np.ones((4, 4))) * 0.5 + rng.normal(0, 1, size=(SIZE, SIZE)) * 0.5
        base = np.array([95.0, 105, 45])
        return base + noise[..., None] * np.array([10.0, 14, 8])
    raise ValueError(f"unknown background {kind!r}")


def _outline(obj: SceneObject, scale: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape in supersampled pixel coordinates; None for the circle."""
    cx, cy, h = obj.cx * scale, obj.cy * scale, obj.half_size * scale
    if obj.shape == "circle":
        return None
    if obj.shape == "square":
        s = 0.88 * h
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if obj.shape == "diamond":
        return [(cx, cy - 1.25 * h), (cx + 0.85 * h, cy), (cx, cy + 1.25 * h), (cx - 0.85 * h, cy)]
    if obj.shape == "triangle":
        r = 1.25 * h
        return [
            (cx + r * math.sin(a), cy - r * math.cos(a))
            for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)
        ]
    if obj.shape == "star":
        points = []
        for k in range(10):
            r = 1.28 * h if k % 2 == 0 else 0.55 * h
            a = k * math.pi / 5
            points.append((cx + r * math.sin(a), cy - r * math.cos(a)))
        return points
    raise ValueError(f"unknown shape {obj.shape!r}")


def _coverage(obj: SceneObject) -> np.ndarray:
    """Fraction of each pixel the object covers, by 4x supersampling (anti-aliased edges)."""
    big = SIZE * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    outline = _outline(obj, _SUPERSAMPLE)
    if outline is None:
        cx, cy, r = (v * _SUPERSAMPLE for v in (obj.cx, obj.cy, obj.half_size))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(outline, fill=255)
    arr = np.asarray(canvas, dtype=np.float32) / 255.0
    return arr.reshape(SIZE, _SUPERSAMPLE, SIZE, _SUPERSAMPLE).mean(axis=(1, 3))
