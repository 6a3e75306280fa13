"""How well DPL's estimated word regions cover the words' objects, against exact masks.

The leakage regions "others" and "others-split" keep each word's map off every cell outside
the word's own region, so they help only where that region is the word's object. A word whose
clusters K-means merged into another word's claims no region at all, and then falls back to
the plain background, which holds its own object. This measures, on built-in scenes, per word:
the share of the object's cells inside the word's region (recall), the share of the region on
the object (precision), the share of the region on other objects, and how often a word claims
nothing, for the plain estimate and with the clusters shared out (`share_out_clusters`).

    python -m dpl_edit.bench.regions --split val --limit 30
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dpl_edit.bench.scenes import BenchScene, load_rgb
from dpl_edit.dpl.background import BackgroundEstimate, background_mask_at, share_out_clusters
from dpl_edit.dpl.stage import DplPlan
from dpl_edit.engine.attention import CrossAttentionStore
from dpl_edit.engine.ddim import Ddim
from dpl_edit.engine.model import LoadedModel, load_model, use_threads
from dpl_edit.engine.null_text import ddim_inversion
from dpl_edit.engine.text import encode_text
from dpl_edit.errors import DplError
from dpl_edit.io.images import image_to_tensor, prepare_image

ESTIMATES = ("others", "others-split")
"""The estimates compared: K-means clusters as claimed, and with their cells shared out."""


@dataclass(frozen=True)
class RegionScore:
    """One word's region against the objects' masks (all at the estimate's resolution)."""

    recall: float
    precision: float
    on_other_objects: float
    claimed: bool


def region_scores(
    regions: Mapping[str, torch.Tensor], objects: Mapping[str, torch.Tensor]
) -> dict[str, RegionScore]:
    """Score each word's bool region [r, r] against its object's bool mask [r, r].

    `objects` holds every word's object; cells of the other words' objects count as "other
    objects". An empty region scores 0 everywhere and is marked unclaimed.
    """
    scores = {}
    for word, region in regions.items():
        own = objects[word]
        others = [mask for name, mask in objects.items() if name != word]
        other = torch.stack(others).any(dim=0) if others else torch.zeros_like(own)
        size = int(region.sum())
        hit = int((region & own).sum())
        scores[word] = RegionScore(
            recall=hit / max(int(own.sum()), 1),
            precision=hit / max(size, 1),
            on_other_objects=int((region & other).sum()) / max(size, 1),
            claimed=size > 0,
        )
    return scores


@torch.no_grad()
def scene_estimate(model: LoadedModel, scene: BenchScene, steps: int) -> BackgroundEstimate:
    """The estimate DPL would use for `scene` (model defaults): a DDIM inversion with the plan's
    self-attention store, then K-means labelled by the inversion's cross-attention."""
    plan = DplPlan.create(model, scene.source, list(scene.masks))
    if plan.self_store is None:
        raise DplError("the model's DPL defaults turn the background loss off: nothing to estimate")
    res = model.defaults.cross_attention_res
    store = CrossAttentionStore([res])
    image = prepare_image(Image.fromarray(load_rgb(scene.image)), model.resolution)
    z0 = model.encode_image(image_to_tensor(image))
    cond = encode_text(model, [scene.source])
    ddim_inversion(
        model, Ddim(model.scheduler, steps), z0, cond, [store, *plan.inversion_recorders], False
    )
    return plan.estimate(store.average(res)[0])


def measure(
    model: LoadedModel, scenes: Sequence[BenchScene], steps: int
) -> dict[str, dict[str, float]]:
    """Mean scores over every word of `scenes`, per estimate in ESTIMATES."""
    rows: dict[str, list[RegionScore]] = {name: [] for name in ESTIMATES}
    for scene in scenes:
        estimate = scene_estimate(model, scene, steps)
        res = estimate.clusters.shape[-1]
        objects = {
            word: background_mask_at(torch.from_numpy(mask), res)
            for word, mask in scene.masks.items()
        }
        for name, labelled in zip(ESTIMATES, (estimate, share_out_clusters(estimate)), strict=True):
            rows[name] += region_scores(labelled.word_masks, objects).values()
    return {
        name: {
            "words": len(scores),
            "recall": float(np.mean([s.recall for s in scores])),
            "precision": float(np.mean([s.precision for s in scores])),
            "on_other_objects": float(np.mean([s.on_other_objects for s in scores])),
            "unclaimed": float(np.mean([not s.claimed for s in scores])),
        }
        for name, scores in rows.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    from dpl_edit.bench.world_set import world_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled one)")
    parser.add_argument("--split", choices=("val", "dev"), default="val")
    parser.add_argument("--limit", type=int, default=30, help="first N scenes (default 30)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM inversion steps (default 50)")
    args = parser.parse_args(argv)
    try:
        if args.steps < 1:
            raise DplError("--steps must be at least 1")
        model = load_model(args.model)
        use_threads(model)
        scenes = world_split(args.split, args.limit)
        table = measure(model, scenes, args.steps)
    except DplError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("| estimate | words | recall | precision | on other objects | claims nothing |")
    print("|---|---|---|---|---|---|")
    for name, row in table.items():
        print(
            f"| {name} | {row['words']} | {row['recall']:.3f} | {row['precision']:.3f} |"
            f" {row['on_other_objects']:.3f} | {row['unclaimed']:.2f} |"
        )
    print(json.dumps(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
