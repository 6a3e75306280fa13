"""The synthetic world: determinism, exact masks, ideal edits, captions, checker, tokenizer."""

import numpy as np
import pytest
from scipy import ndimage

from dpl_edit.world import checker
from dpl_edit.world import synthetic as world
from dpl_edit.world.tokenizer import build_clip_tokenizer


def test_scenes_are_deterministic():
    a, b = world.scene_at(3, 17).render(), world.scene_at(3, 17).render()
    assert a.caption == b.caption
    np.testing.assert_array_equal(a.image, b.image)
    assert world.scene_at(3, 18).caption != a.caption or not np.array_equal(
        world.scene_at(3, 18).render().image, a.image
    )


@pytest.mark.parametrize("index", range(20))
def test_masks_are_exact_and_disjoint(index):
    scene = world.scene_at(0, index)
    render = scene.render()
    assert 1 <= len(scene.objects) <= 3
    masks = list(render.masks.values())
    total = np.sum(masks, axis=0)
    assert total.max() == 1, "objects overlap"
    np.testing.assert_array_equal(render.background_mask, total == 0)
    for obj in scene.objects:
        interior = ndimage.binary_erosion(render.masks[obj.shape], iterations=2)
        colours = render.image[interior].astype(int)
        np.testing.assert_array_equal(
            colours, np.broadcast_to(world.COLORS[obj.color], colours.shape)
        )


def test_caption_names_every_object_once():
    for index in range(50):
        scene = world.scene_at(1, index)
        named = checker.caption_objects(scene.caption)
        assert sorted(named) == sorted((o.color, o.shape) for o in scene.objects)
        assert scene.caption.endswith(f"on a {scene.background} background")


def test_caption_order_carries_no_layout():
    first_is_leftmost, total = 0, 0
    for index in range(300):
        scene = world.scene_at(2, index, n_objects=2)
        if len(scene.objects) < 2:
            continue
        first = scene.objects[scene.order[0]]
        first_is_leftmost += first.cx == min(o.cx for o in scene.objects)
        total += 1
    assert 0.4 < first_is_leftmost / total < 0.6


@pytest.mark.parametrize("index", range(10))
def test_ideal_edit_changes_only_the_edited_object(index):
    scene = world.scene_at(4, index)
    word, target, caption = world.swap_target(scene, np.random.default_rng(index))
    before, after = scene.render(), target.render()
    assert caption == target.caption and caption != scene.caption
    edited = next(o for o in target.objects if o not in scene.objects)
    region = before.masks[word] | after.masks[edited.shape]
    outside = ~ndimage.binary_dilation(region, iterations=2)  # anti-aliased rims
    np.testing.assert_array_equal(before.image[outside], after.image[outside])
    assert (before.image[region] != after.image[region]).any()


def test_checker_is_accurate_on_rendered_scenes():
    assert checker.validate(seed=99, count=60) >= 0.95


def test_checker_sees_the_edit():
    scene = world.scene_at(5, 0, n_objects=2)
    word, target, caption = world.swap_target(scene, np.random.default_rng(0))
    edited_image = target.render().image
    assert all(c.ok for c in checker.check_image(edited_image, caption))
    assert not all(c.ok for c in checker.check_image(edited_image, scene.caption))


def test_reduced_tokenizer_matches_stable_diffusion_on_world_captions():
    full = build_clip_tokenizer()
    reduced = build_clip_tokenizer(list(world.VOCABULARY), model_max_length=24)
    for index in range(30):
        caption = world.scene_at(6, index).caption
        assert reduced.tokenize(caption) == full.tokenize(caption)
        assert len(reduced(caption).input_ids) <= 24
    assert len(reduced) < 1000
