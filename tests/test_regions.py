"""Scores of DPL's estimated word regions against exact object masks."""

from __future__ import annotations

import pytest
import torch

from dpl_edit.bench.regions import region_scores, scene_estimate
from dpl_edit.bench.world_set import world_scene
from dpl_edit.dpl.background import BackgroundEstimate
from dpl_edit.engine.model import load_model


def _mask(cells: list[tuple[int, int]], res: int = 4) -> torch.Tensor:
    mask = torch.zeros(res, res, dtype=torch.bool)
    for row, col in cells:
        mask[row, col] = True
    return mask


def test_region_scores_count_cells_on_own_and_other_objects():
    cat, dog = _mask([(0, 0), (0, 1), (1, 0), (1, 1)]), _mask([(3, 3), (3, 2)])
    # The cat's region: 3 of its 4 cells, one dog cell and one background cell (5 cells).
    cat_region = _mask([(0, 0), (0, 1), (1, 0), (3, 3), (2, 2)])
    scores = region_scores({"cat": cat_region, "dog": _mask([])}, {"cat": cat, "dog": dog})
    assert scores["cat"].recall == pytest.approx(3 / 4)
    assert scores["cat"].precision == pytest.approx(3 / 5)
    assert scores["cat"].on_other_objects == pytest.approx(1 / 5)
    assert scores["cat"].claimed
    assert scores["dog"] == type(scores["dog"])(0.0, 0.0, 0.0, False)


def test_a_bundled_scene_estimate_holds_a_region_per_word():
    """Two DDIM steps on a validation scene: the estimate is at the self-attention level and
    names the scene's words, so the benchmark's scores are taken on the right cells."""
    model = load_model()
    scene = world_scene("val", 0)
    estimate = scene_estimate(model, scene, steps=2)
    assert isinstance(estimate, BackgroundEstimate)
    assert set(estimate.words) == set(scene.masks)
    assert estimate.clusters.shape[-1] == model.defaults.self_attention_res
