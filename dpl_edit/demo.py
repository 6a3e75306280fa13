"""`make demo`: edit a scene of the synthetic world with the bundled model, offline.

Renders "a red circle and a blue square on a white background" with its exact ideal edit
("... a blue triangle ..."), then runs the main job, `dpl run`, on it twice: once with plain
null-text inversion (NTI) and once with Dynamic Prompt Learning (DPL, the default), each followed
by the same Prompt-to-Prompt word swap. `demo.png` puts source, reconstruction, both edits and
the ideal edit in one row, and under it the edited word's attention map under NTI and under DPL:
the point of the project is that DPL's map stays on its object, so its edit does too. Each
map's caption gives the share of its mass outside the object, as the benchmark measures it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from dpl_edit import cli
from dpl_edit.engine.artifact import Inversion
from dpl_edit.engine.settings import InversionSettings
from dpl_edit.io.images import save_png
from dpl_edit.io.pictures import overlay, panel, word_maps
from dpl_edit.metrics import leakage
from dpl_edit.world import synthetic as world

SCENE = world.Scene(
    objects=(
        world.SceneObject("circle", "red", 19.0, 30.0, 11.0),
        world.SceneObject("square", "blue", 45.0, 36.0, 10.0),
    ),
    background="white",
    texture_seed=0,
    order=(0, 1),
)
EDITED = "square"
TARGET = SCENE.edited(EDITED, new_shape="triangle")
METHODS = ("nti", "dpl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--steps", type=int, default=InversionSettings.steps)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    source, ideal = SCENE.render(), TARGET.render()
    scene_path, ideal_path = args.out / "scene.png", args.out / "ideal.png"
    save_png(Image.fromarray(source.image), scene_path)
    save_png(Image.fromarray(ideal.image), ideal_path)
    for method in METHODS:
        code = cli.main(
            ["run", str(scene_path), "--prompt", source.caption, "--target", ideal.caption]
            + ["--out", str(args.out / f"{method}.png"), "--steps", str(args.steps)]
            + ["--method", method]
        )
        if code:
            return code
    images = [
        ("source", Image.open(scene_path)),
        ("reconstruction (DPL)", Image.open(args.out / "dpl_source.png")),
        ("NTI edit", Image.open(args.out / "nti.png")),
        ("DPL edit", Image.open(args.out / "dpl.png")),
        ("ideal edit", Image.open(ideal_path)),
    ]
    maps = []
    for method in METHODS:
        heat, outside = _word_overlay(args.out / f"{method}_inversion", source.masks)
        maps.append((f"'{EDITED}' under {method.upper()}: {outside:.0%} outside it", heat))
    summary = panel(images, args.out / "demo.png", maps)
    print(f"demo picture: {summary}")
    return 0


def _word_overlay(folder: Path, masks: dict[str, np.ndarray]) -> tuple[Image.Image, float]:
    """The edited word's time-averaged attention over the source, from a saved inversion, and
    the share of it outside the word's object (the benchmark's leakage, from the exact masks)."""
    inversion = Inversion.load(folder)
    words = [(w, p) for w, p in inversion.words if w.strip(".,").lower() == EDITED]
    heat = word_maps(inversion.attention, words)[0]
    own = masks[EDITED]
    others = np.logical_or.reduce([m for word, m in masks.items() if word != EDITED]) & ~own
    outside = leakage(heat, own, others, ~(own | others)).outside
    return Image.fromarray(np.uint8(np.rint(overlay(inversion.image, heat) * 255))), outside


if __name__ == "__main__":
    raise SystemExit(main())
