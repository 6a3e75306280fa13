"""Choose the edit outcome's thresholds on validation, from what inversion alone achieves.

An object that a method merely reconstructs has not been edited, so the check that says "this
object is still here" (`outcome.check_place`) must pass on it; a background that inversion
reproduces as well as it usually does has not been changed. So the thresholds are read off the
reconstructions of validation scenes, pooled over the methods given:

- `iou`: the 5th percentile of each object's IoU at its place (95% of reconstructed objects
  pass);
- `background_psnr`: the 5th percentile of the reconstructions' background PSNR.

Reconstructions come from a benchmark's kept inversions (`dpl bench --inversions DIR`), one
decode each, or from a results folder's `*_reconstruction.png` files::

    python -m dpl_edit.bench.calibrate --inversions runs/inv-world --split val --per-category 8

The thresholds, the pass rates and the counts are printed as JSON (and written with `--out`);
`OutcomeThresholds`' defaults are set from such a run, and docs/results.md gives the command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from dpl_edit.bench.outcome import (
    THRESHOLDS,
    OutcomeThresholds,
    ScenePlaces,
    background_pixels,
    check_place,
)
from dpl_edit.bench.scenes import BenchScene
from dpl_edit.errors import DplError
from dpl_edit.metrics import psnr

PERCENTILE = 5.0
"""Share (in %) of reconstructions allowed below each threshold."""


def reconstruction_scores(scene: BenchScene, reconstruction: np.ndarray) -> dict | None:
    """Each object's IoU at its place (and whether it beats its shape-swap rival, the edit's
    new shape drawn there), and the background PSNR, of one reconstruction of a model-space
    scene (None for a non-world scene)."""
    places = ScenePlaces.of(scene)
    if places is None:
        return None
    source = scene.source_image()
    new_shape, rivals = places.target[places.edited][1], places.new_shape_masks
    checks = []
    for i, (colour, shape) in enumerate(places.source):
        rival = None if rivals is None or shape == new_shape else rivals[i]
        checks.append(
            check_place(reconstruction, source, places, i, colour, places.masks[i], rival)
        )
    return {
        "iou": [c.iou for c in checks],
        "beats_rival": [c.iou > c.iou_rival for c in checks],
        "background_psnr": psnr(source, reconstruction, background_pixels(places, THRESHOLDS)),
    }


def thresholds_from(scores: Sequence[dict]) -> tuple[OutcomeThresholds, dict]:
    """The thresholds the reconstructions' scores give, and how the reconstructions fare."""
    if not scores:
        raise DplError("no reconstructions to calibrate on")
    ious = np.array([v for s in scores for v in s["iou"]])
    beats = np.array([v for s in scores for v in s["beats_rival"]])
    backgrounds = np.array([s["background_psnr"] for s in scores])
    # Rounded down, so that the share passing is never below the percentile's promise.
    chosen = OutcomeThresholds(
        background_margin=THRESHOLDS.background_margin,
        iou=math.floor(float(np.percentile(ious, PERCENTILE)) * 100) / 100,
        background_psnr=math.floor(float(np.percentile(backgrounds, PERCENTILE)) * 10) / 10,
    )
    summary = {
        "reconstructions": len(scores),
        "objects": int(ious.size),
        "thresholds": {"iou": chosen.iou, "background_psnr": chosen.background_psnr},
        "objects_passing": float(np.mean((ious >= chosen.iou) & beats)),
        "objects_beating_rival": float(np.mean(beats)),
        "backgrounds_passing": float(np.mean(backgrounds >= chosen.background_psnr)),
        "median": {
            "iou": float(np.median(ious)),
            "background_psnr": float(np.median(backgrounds)),
        },
    }
    return chosen, summary


def _from_inversions(
    folder: Path, scenes: Sequence[BenchScene], model_path: str | None
) -> Iterator[tuple[BenchScene, np.ndarray]]:
    from dpl_edit.bench.runner import prepare_scene
    from dpl_edit.engine.artifact import Inversion
    from dpl_edit.engine.inversion import reconstruction_image
    from dpl_edit.engine.model import load_model
    from dpl_edit.io.names import safe_stem

    model = load_model(model_path)
    for scene in scenes:
        prepared = prepare_scene(scene, model.resolution)
        for kept in sorted((folder / safe_stem(scene.id)).glob("*/")):
            inversion = Inversion.load(kept, model)
            yield prepared, np.asarray(reconstruction_image(model, inversion))


def _from_results(
    folder: Path, scenes: Sequence[BenchScene]
) -> Iterator[tuple[BenchScene, np.ndarray]]:
    from PIL import Image

    from dpl_edit.bench.runner import prepare_scene
    from dpl_edit.io.names import safe_stem

    for scene in scenes:
        for path in sorted((folder / "scenes" / safe_stem(scene.id)).glob("*_reconstruction.png")):
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            yield prepare_scene(scene, pixels.shape[0]), pixels


def main(argv: Sequence[str] | None = None) -> int:
    from dpl_edit.bench.world_set import check_split, world_split

    parser = argparse.ArgumentParser(
        prog="python -m dpl_edit.bench.calibrate", description=__doc__.split("\n\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--inversions", metavar="DIR", help="a benchmark's kept inversions")
    source.add_argument("--results", metavar="DIR", help="a benchmark results folder")
    parser.add_argument("--model", help="model folder of the inversions (default: bundled)")
    parser.add_argument("--split", default="val", choices=["val", "dev"])
    parser.add_argument("--per-category", type=int, metavar="N")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        check_split(args.split, final=False)
        scenes = world_split(args.split, per_category=args.per_category)
        pairs = (
            _from_inversions(Path(args.inversions), scenes, args.model)
            if args.inversions
            else _from_results(Path(args.results), scenes)
        )
        scores = [s for s in (reconstruction_scores(sc, r) for sc, r in pairs) if s is not None]
        _, summary = thresholds_from(scores)
    except DplError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        from dpl_edit.io.atomic import atomic_write_bytes

        atomic_write_bytes(Path(args.out), (text + "\n").encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
