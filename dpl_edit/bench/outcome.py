"""The edit outcome: did the edit make the target, keep the other objects and keep the background?

No method optimises these numbers (DPL's losses and the attention diagnostics are about maps;
these are about the picture a user gets), so they are the benchmark's primary result. Every
object is judged *at its place*, using the exact masks of the source and of the ideal edit, so two
objects of one colour are never confused (a global checker that names the largest blob of a
colour cannot tell which of them it graded):

- **target made**: at the edited object's place (its source mask and the ideal edit's new mask),
  the pixels of the target colour form a blob of the target's shape that covers the ideal
  object (IoU at least `OutcomeThresholds.iou`);
- **others kept**: the same test for every other object, against its own colour, shape and mask;
  its PSNR against the source is reported beside it;
- **background kept**: PSNR of the edit against the source outside every object and the edit
  region (by more than `OutcomeThresholds.background_margin` pixels), at least
  `OutcomeThresholds.background_psnr`;
- **selective success**: all three.

A scene that fails gets exactly one failure class, the first that applies: *wrong object
changed* (another object lost its shape or colour), *target not made* (nothing of the target at
its place, or the source object still there), *shape clipped or partial* (the target colour is
there but not the target's shape or extent), *colour bled* (the background fails and pixels of the
target colour appeared outside the edited place), *background changed*.

The thresholds are chosen on the validation split from what inversion alone achieves
(`calibrate`, on the reconstructions: an object a method merely reconstructs must pass, and so
must the background of 95% of reconstructions); `validate` measures the checker on rendered
scenes whose answer is known (the ideal edit must succeed, the unedited source must fail as
"target not made", the edit applied to the wrong object must fail as "wrong object changed").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from dpl_edit.bench.scenes import BenchScene
from dpl_edit.metrics import psnr, ssim
from dpl_edit.world import checker
from dpl_edit.world import synthetic as world

FAILURES = (
    "wrong_object_changed",
    "target_not_made",
    "shape_clipped",
    "colour_bled",
    "background_changed",
)
"""Failure classes, in the order they are tested: a failed scene gets the first that applies."""
_WINDOW_PX = 3
"""How far around an object's place its pixels are looked for (blur and slightly larger shapes)."""
_MIN_PIXELS = 12
"""Fewer pixels of a colour than this at a place count as none (the global checker's limit)."""


@dataclass(frozen=True)
class OutcomeThresholds:
    """Where a check passes; chosen on validation (`calibrate`), stated in every report."""

    iou: float = 0.64
    """An object's colour blob must overlap its exact mask with at least this IoU: the 5th
    percentile of the objects of 78 reconstructions of `world`'s validation scenes (35 scenes,
    5 per category; NTI, own-region and paper DPL), docs/results.md."""
    background_psnr: float = 22.7
    """dB; the 5th percentile of the same reconstructions' background PSNR."""
    background_margin: int = 2
    """Pixels next to an object (or the edit region) that the background test leaves out: the
    antialiased edge and the decoder's blur there, which reconstructions do not keep either
    (half a latent cell of the bundled models)."""


THRESHOLDS = OutcomeThresholds()


def outcome_definition(thresholds: OutcomeThresholds) -> str:
    """The outcome's definition in words, with its thresholds, for every report."""
    return (
        "Edit outcome (`dpl_edit.bench.outcome`, judged at each object's place with the exact"
        " masks): target made = the target colour's blob at the edited object's place overlaps"
        f" the ideal edit's object with IoU >= {thresholds.iou:g} (in a shape swap, more than"
        " it overlaps the old shape); others kept = the same for every other object with its"
        " own colour and mask (in a shape swap, more than the new shape drawn in its place);"
        " background kept = PSNR against the source, more than"
        f" {thresholds.background_margin} px from every object and the edit region, >="
        f" {thresholds.background_psnr:g} dB; selective success = all three. Thresholds chosen"
        " on validation reconstructions (`python -m dpl_edit.bench.calibrate`)."
    )


@dataclass(frozen=True)
class PlaceCheck:
    """One object judged at its place: what should be there and how well the picture matches.

    The shape is judged against the exact mask of what should be there: the colour's blob must
    overlap it, and, in a shape swap, overlap it better than the *rival*: for the edited object
    its old shape, for every other object the edit's new shape drawn in its place. So "the
    square is still a square" and "the circle became the triangle meant for the square" are
    both caught where the two shapes overlap by more than the IoU threshold, while a blurred
    square with rounded corners still counts as a square (naming the blob's shape among all
    five, as the global checker does, fails on about a quarter of mere reconstructions).
    """

    noun: str
    colour: str
    pixels: int
    iou: float
    """IoU of the colour's largest blob at the place with the expected mask."""
    iou_rival: float = 0.0
    """The blob's IoU with the rival shape's mask (0 when there is no rival)."""

    def ok(self, thresholds: OutcomeThresholds) -> bool:
        if self.pixels < _MIN_PIXELS or self.iou < thresholds.iou:
            return False
        return self.iou > self.iou_rival


@dataclass(frozen=True)
class ScenePlaces:
    """A world scene's objects as the outcome sees them: (colour, shape) before and after the
    edit, each object's expected mask after it, and the window where its pixels are looked for."""

    source: list[tuple[str, str]]
    target: list[tuple[str, str]]
    nouns: list[str]
    masks: list[np.ndarray]
    """Each object's exact mask in the source."""
    expected: list[np.ndarray]
    """Each object's exact mask in the ideal edit (the source's, but for the edited object)."""
    windows: list[np.ndarray]
    edited: int
    background: np.ndarray
    new_shape_masks: list[np.ndarray] | None
    """In a shape swap, the edit's new shape drawn at each object's place with its area (the
    rival an object that took the edit by mistake would match); None for a colour swap. Drawn
    once per scene, since every edit of the scene is judged against the same masks."""

    @classmethod
    def of(cls, scene: BenchScene) -> ScenePlaces | None:
        """The places of a world scene, or None for captions that do not name (colour, shape)
        pairs one to one (an external scene list; the outcome is then not measured)."""
        source = checker.caption_objects(scene.source)
        target = checker.caption_objects(scene.target)
        nouns = [shape for _, shape in source]
        changed = [i for i, (a, b) in enumerate(zip(source, target, strict=False)) if a != b]
        if (
            not source
            or len(source) != len(target)
            or len(changed) != 1
            or set(nouns) != set(scene.masks)
            or nouns[changed[0]] != scene.edited_object
        ):
            return None
        edited = changed[0]
        expected = [scene.masks[noun] for noun in nouns]
        ideal = scene.ideal_image()
        if ideal is not None:
            colour = _near(ideal, target[edited][0])
            made = scene.changed_region & colour
            if made.sum() >= _MIN_PIXELS:
                expected[edited] = made
        reach = [
            ndimage.binary_dilation(e | scene.masks[n], iterations=_WINDOW_PX)
            for e, n in zip(expected, nouns, strict=True)
        ]
        windows = []
        for i, area in enumerate(reach):
            others = np.zeros_like(area)
            for j, noun in enumerate(nouns):
                if j != i:
                    others |= expected[j] | scene.masks[noun]
            windows.append(area & ~others)
        background = scene.background_mask & ~scene.changed_region
        masks = [scene.masks[noun] for noun in nouns]
        new_shape = target[edited][1]
        rivals = None
        if new_shape != source[edited][1]:
            rivals = [checker.shape_templates(mask)[new_shape] for mask in masks]
        return cls(source, target, nouns, masks, expected, windows, edited, background, rivals)


def background_pixels(places: ScenePlaces, thresholds: OutcomeThresholds) -> np.ndarray:
    """The background the outcome tests: off every object and the edit region by more than
    `thresholds.background_margin` pixels."""
    near = ndimage.binary_dilation(~places.background, iterations=thresholds.background_margin)
    return ~near


def _near(image: np.ndarray, colour: str) -> np.ndarray:
    """Pixels within the world checker's colour tolerance of a named colour."""
    rgb = np.asarray(world.COLORS[colour], dtype=np.float32)
    distance = np.linalg.norm(image.astype(np.float32) - rgb, axis=-1)
    return distance < checker.COLOUR_TOLERANCE


def check_place(
    image: np.ndarray,
    source: np.ndarray,
    places: ScenePlaces,
    index: int,
    colour: str,
    expected: np.ndarray,
    rival: np.ndarray | None = None,
) -> PlaceCheck:
    """Is `colour` at object `index`'s place in `image` in the shape of `expected`, and more so
    than in the shape of `rival`?

    Pixels of the colour inside the object's window, minus those the source already had in
    that colour on the background (grass is green everywhere), form blobs; the largest is
    compared with the masks.
    """
    there = _near(image, colour) & places.windows[index]
    there &= ~(_near(source, colour) & places.background)
    labels, count = ndimage.label(there)
    noun = places.nouns[index]
    if count == 0:
        return PlaceCheck(noun, colour, 0, 0.0)
    sizes = ndimage.sum(there, labels, index=range(1, count + 1))
    blob = labels == int(np.argmax(sizes)) + 1
    return PlaceCheck(
        noun,
        colour,
        int(blob.sum()),
        _iou(blob, expected),
        0.0 if rival is None else _iou(blob, rival),
    )


def object_checks(
    image: np.ndarray, source: np.ndarray, places: ScenePlaces
) -> tuple[PlaceCheck, list[PlaceCheck]]:
    """The edited object's check against the target and every other object's against itself."""
    index, rivals = places.edited, places.new_shape_masks
    target = check_place(
        image,
        source,
        places,
        index,
        places.target[index][0],
        places.expected[index],
        None if rivals is None else places.masks[index],
    )
    others = []
    for i, (colour, _) in enumerate(places.source):
        if i == index:
            continue
        rival = None if rivals is None else rivals[i]
        others.append(check_place(image, source, places, i, colour, places.masks[i], rival))
    return target, others


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def measure_outcome(
    scene: BenchScene,
    edited: np.ndarray,
    thresholds: OutcomeThresholds = THRESHOLDS,
    places: ScenePlaces | None = None,
) -> dict[str, Any] | None:
    """The outcome of one edit of a model-space scene (None when the scene is not a world one).

    Booleans aggregate to rates and the failure classes come one-hot, so a report's tables and
    paired differences cover them like any other metric.
    """
    places = places or ScenePlaces.of(scene)
    if places is None:
        return None
    source = scene.source_image()
    target, others = object_checks(edited, source, places)
    others_mask = scene.other_objects_mask(scene.edited_object)
    off_objects = background_pixels(places, thresholds)
    background = psnr(source, edited, off_objects)
    made = target.ok(thresholds)
    kept = all(o.ok(thresholds) for o in others)
    background_kept = bool(background >= thresholds.background_psnr)
    failure = None
    if not (made and kept and background_kept):
        failure = _failure_class(edited, source, places, target, kept, made, thresholds)
    return {
        "selective_success": made and kept and background_kept,
        "target_made": made,
        "others_kept": kept,
        "background_kept": background_kept,
        "target_iou": target.iou,
        "others_psnr": psnr(source, edited, others_mask) if others else None,
        "background_psnr": background,
        "background_ssim": ssim(source, edited, off_objects),
        "failure": {name: failure == name for name in FAILURES},
    }


def _failure_class(
    edited: np.ndarray,
    source: np.ndarray,
    places: ScenePlaces,
    target: PlaceCheck,
    others_kept: bool,
    made: bool,
    thresholds: OutcomeThresholds,
) -> str:
    if not others_kept:
        return "wrong_object_changed"
    index = places.edited
    if not made:
        old_colour = places.source[index][0]
        still = check_place(edited, source, places, index, old_colour, places.masks[index])
        if target.pixels < _MIN_PIXELS or still.ok(thresholds):
            return "target_not_made"
        return "shape_clipped"
    colour = places.target[index][0]
    outside = ~ndimage.binary_dilation(places.windows[index], iterations=_WINDOW_PX)
    new = _near(edited, colour) & ~_near(source, colour) & outside
    return "colour_bled" if new.sum() >= _MIN_PIXELS else "background_changed"


def validate(
    cases: Sequence[tuple[BenchScene, np.ndarray | None]],
    thresholds: OutcomeThresholds = THRESHOLDS,
) -> dict[str, dict[str, Any]]:
    """The checker on rendered pictures with a known answer, per kind of picture.

    `cases` pairs each scene with its edit applied to another object instead (None when no
    other object can take the change; `world_set.wrong_object_render`). The ideal edit must
    succeed; the unedited source must fail as "target not made"; the wrong-object render must
    fail as "wrong object changed". Returns, per kind, the share judged right and the count.
    """
    right = {"ideal": 0, "source": 0, "wrong_object": 0}
    counts = dict.fromkeys(right, 0)
    for scene, wrong in cases:
        places = ScenePlaces.of(scene)
        if places is None:
            continue
        pictures = {
            "ideal": scene.ideal_image(),
            "source": scene.source_image(),
            "wrong_object": wrong,
        }
        for kind, picture in pictures.items():
            if picture is None:
                continue
            outcome = measure_outcome(scene, picture, thresholds, places)
            counts[kind] += 1
            if kind == "ideal":
                right[kind] += bool(outcome["selective_success"])
            elif kind == "source":
                right[kind] += bool(outcome["failure"]["target_not_made"])
            else:
                right[kind] += bool(outcome["failure"]["wrong_object_changed"])
    return {
        kind: {"accuracy": right[kind] / counts[kind] if counts[kind] else None, "n": counts[kind]}
        for kind in counts
    }
