"""Benchmark scenes: an image, its captions, one mask per object noun and an optional ideal edit.

Scenes come from the synthetic world (arrays) or from an external JSONL file (paths), one scene a
line::

    {"id": "s1", "image": "img/s1.png", "source": "a cat and a dog",
     "target": "a cat and a fox", "masks": {"cat": "m/s1_cat.png", "dog": "m/s1_dog.png"},
     "edited_object": "dog", "ideal": "ideal/s1.png"}

Paths are relative to the JSONL file. `ideal` may be null or left out (edit fidelity is then not
measured). An optional `"edit_region": png` gives the pixels the ideal edit may change (the union
of the edited object's old and new masks); without it the edited object's mask stands in, which
is exact for a colour swap but misses the new shape's outline for a shape swap. Each mask noun must be a word of the source caption exactly once, since the runner
finds the noun's cross-attention map through its position in the caption. A mask pixel belongs to
the object where its grey value is at least half the mask's maximum, so 0/1 and 0/255 PNGs both
work and antialiased edges split evenly. Every problem is a `DplError` naming file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dpl_edit.errors import DplError
from dpl_edit.io.jsonl import jsonl_lines, parse_line

ImageSource = Path | np.ndarray
_REQUIRED_KEYS = ("id", "image", "source", "target", "masks", "edited_object")


def caption_words(caption: str) -> list[str]:
    """Lower-case words of a caption, punctuation dropped ("A cat, and a dog." -> a cat and a dog)."""
    return re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", caption.lower())


def _open_image(path: Path, what: str) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DplError(f"{what} file {path} not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DplError(f"{what} file {path} is not a readable image ({e})") from None


def _image_hw(source: ImageSource, what: str) -> tuple[int, int]:
    """(H, W) of an image, reading only a file's header."""
    if not isinstance(source, np.ndarray):
        with _open_image(Path(source), what) as img:
            return img.height, img.width
    if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
        raise DplError(f"{what} must be an H×W×3 uint8 array, got {source.dtype} {source.shape}")
    return source.shape[0], source.shape[1]


def load_rgb(source: ImageSource) -> np.ndarray:
    """An image as an H×W×3 uint8 array, from a file or as given."""
    if isinstance(source, np.ndarray):
        return source
    with _open_image(Path(source), "image") as img:
        return np.asarray(img.convert("RGB"))


def load_mask(path: Path) -> np.ndarray:
    """A mask PNG as a bool array: True where the grey value is at least half the maximum."""
    with _open_image(path, "mask") as img:
        grey = np.asarray(img.convert("L"), dtype=np.int32)
    peak = int(grey.max())
    if peak == 0:
        raise DplError(f"mask file {path} is empty")
    return grey * 2 >= peak


@dataclass(frozen=True, eq=False)
class BenchScene:
    """One benchmark scene, validated on construction (raises `DplError`)."""

    id: str
    image: ImageSource
    source: str
    target: str
    masks: dict[str, np.ndarray]
    edited_object: str
    ideal: ImageSource | None = None
    edit_region: np.ndarray | None = None
    """Pixels the ideal edit may change (old and new object masks); None: the edited mask."""
    category: str = ""
    """What kind of scene this is (e.g. "close"); reports add a table per category."""

    def __post_init__(self) -> None:
        for name in ("id", "source", "target", "edited_object"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise DplError(f"'{name}' must be a non-empty string")
        if not self.masks:
            raise DplError("'masks' is empty")
        hw = _image_hw(self.image, "image")
        words = caption_words(self.source)
        for noun, mask in self.masks.items():
            if mask.dtype != bool or mask.shape != hw:
                raise DplError(
                    f"mask '{noun}' is {_size(mask.shape)} ({mask.dtype}) but the image is"
                    f" {_size(hw)}; masks must be bool and the image's size"
                )
            count = words.count(noun.lower())
            if count != 1:
                where = "is not a word of" if count == 0 else f"appears {count} times in"
                raise DplError(f"mask noun '{noun}' {where} the source caption '{self.source}'")
        if self.edited_object not in self.masks:
            raise DplError(
                f"edited_object '{self.edited_object}' is not one of the masks {sorted(self.masks)}"
            )
        if self.ideal is not None and _image_hw(self.ideal, "ideal") != hw:
            raise DplError(f"ideal image is not the image's size {_size(hw)}")
        region = self.edit_region
        if region is not None and (region.dtype != bool or region.shape != hw):
            raise DplError(
                f"edit_region is {_size(region.shape)} ({region.dtype}) but the image is"
                f" {_size(hw)}; it must be bool and the image's size"
            )

    @property
    def background_mask(self) -> np.ndarray:
        """Pixels on no object."""
        return ~self.other_objects_mask(None)

    def other_objects_mask(self, noun: str | None) -> np.ndarray:
        """Union of all object masks except `noun`'s (all objects when None)."""
        shape = next(iter(self.masks.values())).shape
        union = np.zeros(shape, dtype=bool)
        for other, mask in self.masks.items():
            if other != noun:
                union |= mask
        return union

    @property
    def changed_region(self) -> np.ndarray:
        """Where the edit is meant to change pixels: `edit_region`, else the edited object."""
        return self.masks[self.edited_object] if self.edit_region is None else self.edit_region

    def source_image(self) -> np.ndarray:
        """The source image as H×W×3 uint8."""
        return load_rgb(self.image)

    def ideal_image(self) -> np.ndarray | None:
        """The ideal edit as H×W×3 uint8, or None when the scene has none."""
        return None if self.ideal is None else load_rgb(self.ideal)


def _size(hw: tuple[int, ...]) -> str:
    return "×".join(str(n) for n in hw)


def _path_field(record: dict, key: str, base: Path) -> Path:
    value = record[key]
    if not isinstance(value, str) or not value:
        raise DplError(f"'{key}' must be a path string, got {value!r}")
    return base / value


def _parse_record(record: object, base: Path) -> BenchScene:
    if not isinstance(record, dict):
        raise DplError("line is not a JSON object")
    missing = [k for k in _REQUIRED_KEYS if k not in record]
    if missing:
        raise DplError(f"missing keys: {', '.join(missing)}")
    masks = record["masks"]
    if not isinstance(masks, dict) or not masks:
        raise DplError("'masks' must be a non-empty object {noun: png path}")
    image = _path_field(record, "image", base)
    _image_hw(image, "image")  # a missing image is reported before its masks
    ideal = None if record.get("ideal") is None else _path_field(record, "ideal", base)
    region = None
    if record.get("edit_region") is not None:
        region = load_mask(_path_field(record, "edit_region", base))
    return BenchScene(
        id=record["id"],
        image=image,
        source=record["source"],
        target=record["target"],
        masks={noun: load_mask(_path_field(masks, noun, base)) for noun in masks},
        edited_object=record["edited_object"],
        ideal=ideal,
        edit_region=region,
        category=str(record.get("category", "")),
    )


def load_jsonl(path: str | Path) -> list[BenchScene]:
    """Read an external scene list; errors name the file and the 1-based line."""
    path = Path(path)
    scenes: list[BenchScene] = []
    seen: set[str] = set()
    for lineno, line in jsonl_lines(path, "scene list"):
        try:
            scene = _parse_record(parse_line(line), path.parent)
            if scene.id in seen:
                raise DplError(f"duplicate id '{scene.id}'")
        except DplError as e:
            raise DplError(f"{path}:{lineno}: {e}") from None
        seen.add(scene.id)
        scenes.append(scene)
    if not scenes:
        raise DplError(f"scene list {path} has no scenes")
    return scenes
