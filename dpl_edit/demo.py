"""`make demo`: edit a scene of the synthetic world with the bundled model, offline.

Renders "a red circle and a blue square on a white background" with its exact ideal edit
("... a blue triangle ..."), then runs the main job, `dpl run`, on it: inversion (DPL when
available), Prompt-to-Prompt word swap, attention grid. Finally it puts source, reconstruction,
edit and ideal edit side by side in `demo.png`, so the result can be judged at a glance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from dpl_edit import cli
from dpl_edit.engine.settings import InversionSettings
from dpl_edit.io.images import save_png
from dpl_edit.io.pictures import panel
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
TARGET = SCENE.edited("square", new_shape="triangle")


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
    edit_path = args.out / "edit.png"
    code = cli.main(
        ["run", str(scene_path), "--prompt", source.caption, "--target", ideal.caption]
        + ["--out", str(edit_path), "--steps", str(args.steps)]
    )
    if code:
        return code
    images = [
        ("source", Image.open(scene_path)),
        ("reconstruction", Image.open(args.out / "edit_source.png")),
        ("P2P edit", Image.open(edit_path)),
        ("ideal edit", Image.open(ideal_path)),
    ]
    summary = panel(images, args.out / "demo.png")
    print(f"demo picture: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
