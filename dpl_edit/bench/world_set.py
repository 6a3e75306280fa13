"""The built-in benchmark scenes: two- and three-object world scenes with a word-swap edit each.

The synthetic world renders every scene from a few numbers, so each scene comes with exact object
masks and an exact *ideal edit* (the same scene re-rendered with one object's shape or colour
swapped). Three splits, each from its own world seed (none is the training seed 0, so no scene
is in two splits or was seen in training):

- `val`: for every choice (defaults, thresholds, presets, edit settings);
- `dev`: the former test split (seed 7002). Its results steered earlier defaults, so it is no
  longer a hold-out; it stays as a development split and its results are labelled as such;
- `test`: sealed (seed 7003). `dpl bench --split test` runs only with `--final`, for a
  configuration that will be reported, and every final run is listed in docs/results.md.

Each split holds 100 original scenes, alternating two and three objects, then
`CATEGORY_SIZE` scenes of each hard category.

`export_world` writes a split in the external JSONL format, so the file path of the benchmark is
exercised with real files and anyone can inspect or reuse the set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dpl_edit.bench.scenes import BenchScene
from dpl_edit.errors import DplError
from dpl_edit.io.atomic import atomic_write_bytes
from dpl_edit.io.images import save_png
from dpl_edit.world import synthetic as world

SPLIT_SEEDS = {"val": 7001, "dev": 7002, "test": 7003}
"""World seed of each split; the bundled model trains on seed 0, so these scenes are unseen."""
SEALED_SPLIT = "test"
"""The hold-out split: run only for a configuration that will be reported (`--final`)."""
SPLIT_SIZE = 100
_SWAP_STREAM = 1  # second random stream per scene, for the edit, independent of the layout


CATEGORY_SIZE = 20
"""Scenes per hard category and split (`world.HARD_CATEGORIES`), after the split's first 100."""
CATEGORIES = ("two-objects", "three-objects", *world.HARD_CATEGORIES)
"""Every category of the built-in set: the original scenes alternate two and three objects."""


def _world_pieces(
    split: str, index: int, category: str | None
) -> tuple[str, str, world.Scene, str, world.Scene, str]:
    """Scene `index` of a split as the world describes it: id, category, the scene, the edited
    shape word, the ideal edited scene and the target caption."""
    seed = SPLIT_SEEDS[split]
    if category is None:
        stream = [seed, index]
        scene = world.scene_at(seed, index, n_objects=2 + index % 2)
        scene_id, category = f"{split}-{index:03d}", CATEGORIES[index % 2]
    else:
        stream = [seed, 1 + world.HARD_CATEGORIES.index(category), index]
        scene = world.sample_hard_scene(np.random.default_rng([*stream, 0]), category)
        scene_id = f"{split}-{category}-{index:03d}"
    edited_shape, ideal, target = world.swap_target(
        scene, np.random.default_rng([*stream, _SWAP_STREAM])
    )
    return scene_id, category, scene, edited_shape, ideal, target


def world_scene(split: str, index: int, category: str | None = None) -> BenchScene:
    """Scene `index` of a split (or of one of its hard categories): its render, masks, word
    swap, ideal edit and edit region.

    The original scenes (`category` None) keep their ids and pictures; a hard category's scenes
    are drawn from their own random streams, ids `<split>-<category>-<index>`. The edit region
    is the union of the edited object's old and new masks plus every pixel the ideal edit
    changes, so outside it the ideal edit equals the source exactly.
    """
    scene_id, category, scene, edited_shape, ideal, target = _world_pieces(split, index, category)
    render, ideal_render = scene.render(), ideal.render()
    new_shape = next(o.shape for o in ideal.objects if o not in scene.objects)
    # Masks keep pixels more than half covered; the antialiased fringe beyond them (a star's
    # thin tips reach several pixels out) also changes, so it belongs to the region too.
    fringe = np.any(ideal_render.image != render.image, axis=-1)
    return BenchScene(
        id=scene_id,
        image=render.image,
        source=render.caption,
        target=target,
        masks=render.masks,
        edited_object=edited_shape,
        ideal=ideal_render.image,
        edit_region=render.masks[edited_shape] | ideal_render.masks[new_shape] | fringe,
        category=category,
    )


def wrong_object_render(split: str, index: int, category: str | None = None) -> np.ndarray | None:
    """Scene `index` with its edit's change made to another object instead: the picture an
    edit that changed the wrong object would give, to check that the outcome says so. None
    when the change would give the other object a shape it already has."""
    _, _, scene, edited_shape, ideal, _ = _world_pieces(split, index, category)
    before = next(o for o in scene.objects if o.shape == edited_shape)
    after = next(o for o in ideal.objects if o not in scene.objects)
    for other in scene.objects:
        if other is before:
            continue
        if after.shape != before.shape and after.shape != other.shape:
            return scene.edited(other.shape, new_shape=after.shape).render().image
        if after.color != before.color and after.color != other.color:
            return scene.edited(other.shape, new_color=after.color).render().image
    return None


def split_order(
    split: str,
    limit: int | None = None,
    categories: Sequence[str] | None = None,
    per_category: int | None = None,
) -> list[tuple[int, str | None]]:
    """The (index, hard category or None) of each scene `world_split` returns, in its order."""
    if split not in SPLIT_SEEDS:
        raise DplError(f"unknown split '{split}' (use {', '.join(SPLIT_SEEDS)})")
    unknown = [c for c in categories or () if c not in CATEGORIES]
    if unknown:
        raise DplError(f"unknown scene category '{unknown[0]}' (use {', '.join(CATEGORIES)})")
    for name, value in (("scene limit", limit), ("scenes per category", per_category)):
        if value is not None and value < 1:
            raise DplError(f"the {name} must be at least 1, got {value}")
    wanted = set(categories or CATEGORIES)
    original = [i for i in range(SPLIT_SIZE) if CATEGORIES[i % 2] in wanted]
    if per_category is not None:
        original = [i for i in original if i // 2 < per_category]
    hard = min(CATEGORY_SIZE, per_category or CATEGORY_SIZE)
    order = [(i, None) for i in original]
    order += [(i, c) for c in world.HARD_CATEGORIES if c in wanted for i in range(hard)]
    return order[:limit]


def world_split(
    split: str,
    limit: int | None = None,
    categories: Sequence[str] | None = None,
    per_category: int | None = None,
) -> list[BenchScene]:
    """The first `limit` scenes (all when None) of a split, in a fixed order: the 100 original
    scenes, then each hard category's. `categories` keeps only those (the original scenes are
    "two-objects" and "three-objects"); `per_category` keeps the first N of each category, so a
    small run still covers every kind of scene."""
    order = split_order(split, limit, categories, per_category)
    return [world_scene(split, i, c) for i, c in order]


def _new_folder(folder: str | Path) -> Path:
    """An export goes into a new or empty folder only, so it never replaces a user's file."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DplError(f"'{folder}' exists and is not an empty folder; export into a new one")
    return folder


def _save(folder: Path, relative: Path, pixels: np.ndarray) -> str:
    """Write an image (masks as 0/255) under `folder`; return its path relative to the folder."""
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    save_png(Image.fromarray(pixels), folder / relative)
    return relative.as_posix()


def export_world(
    folder: str | Path,
    split: str = "val",
    limit: int | None = None,
    categories: Sequence[str] | None = None,
) -> Path:
    """Write a split as `<folder>/<split>.jsonl` with its PNGs; return the JSONL path.

    Paths in the file are relative to it, as the external format requires. The JSONL file is
    written last and atomically, so it never names an image that is not there yet.
    """
    folder = _new_folder(folder)
    lines = []
    for scene in world_split(split, limit, categories):
        sub = Path(scene.id)
        record = {
            "id": scene.id,
            "image": _save(folder, sub / "image.png", scene.source_image()),
            "source": scene.source,
            "target": scene.target,
            "masks": {
                noun: _save(folder, sub / f"mask_{noun}.png", mask)
                for noun, mask in scene.masks.items()
            },
            "edited_object": scene.edited_object,
            "ideal": _save(folder, sub / "ideal.png", scene.ideal_image()),
            "edit_region": _save(folder, sub / "edit_region.png", scene.changed_region),
            "category": scene.category,
        }
        lines.append(json.dumps(record))
    path = folder / f"{split}.jsonl"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def export_jobs(
    folder: str | Path,
    split: str = "val",
    limit: int | None = 20,
) -> Path:
    """Write a split's scenes as a `dpl batch` job file, `<folder>/jobs.jsonl`, with their PNGs.

    One job a scene: its caption as the prompt and its word swap as the one edit, so a batch
    timing on it is reproducible with nothing but the package. Written last and atomically, as
    `export_world`'s file.
    """
    folder = _new_folder(folder)
    lines = []
    for scene in world_split(split, limit):
        image = _save(folder, Path(scene.id) / "image.png", scene.source_image())
        job = {"id": scene.id, "image": image, "prompt": scene.source}
        lines.append(json.dumps({**job, "edits": [{"target": scene.target}]}))
    path = folder / "jobs.jsonl"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def check_split(split: str, final: bool, external: bool = False) -> None:
    """Refuse to open the sealed split without `final`, and `final` on anything else.

    The sealed split is the only hold-out: a run on it is a result to report, never a step in
    choosing a setting, so it must be asked for on purpose.
    """
    if external:
        if final:
            raise DplError("--final is for the built-in sealed split (--split test), not --scenes")
        return
    if split == SEALED_SPLIT and not final:
        raise DplError(
            f"the '{SEALED_SPLIT}' split is sealed: choose settings on --split val, and run it"
            " only with --final for a configuration you will report"
        )
    if final and split != SEALED_SPLIT:
        raise DplError(f"--final is only for the sealed split (--split {SEALED_SPLIT})")
