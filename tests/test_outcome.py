"""The edit outcome: judged at each object's place, checked on pictures whose answer is known.

The world renders every scene exactly, so the outcome's verdicts can be tested without a model:
the ideal edit must be a selective success, the unedited source must fail as "target not made",
the change made to the wrong object must fail as "wrong object changed", and hand-made damage
(another object painted over, the background repainted, the target's colour spilled) must get
its own class.
"""

import numpy as np
import pytest
from scipy.stats import binomtest

from dpl_edit.bench import outcome
from dpl_edit.bench.calibrate import reconstruction_scores, thresholds_from
from dpl_edit.bench.report import outcome_counts, sign_test
from dpl_edit.bench.scenes import BenchScene
from dpl_edit.bench.world_set import split_order, world_scene, world_split, wrong_object_render
from dpl_edit.world import synthetic as world


def _cases(split: str, per_category: int) -> list[tuple[BenchScene, np.ndarray | None]]:
    order = split_order(split, per_category=per_category)
    return [(world_scene(split, i, c), wrong_object_render(split, i, c)) for i, c in order]


def test_the_checker_judges_rendered_answers_right_in_every_category():
    cases = _cases("val", 6)
    verdicts = outcome.validate(cases)
    assert verdicts["ideal"] == {"accuracy": 1.0, "n": len(cases)}
    assert verdicts["source"] == {"accuracy": 1.0, "n": len(cases)}
    assert verdicts["wrong_object"]["n"] >= 0.8 * len(cases)
    assert verdicts["wrong_object"]["accuracy"] >= 0.95


def test_same_colour_objects_are_told_apart_by_place():
    """Both objects share a colour: painting the *other* object in the target's shape must be
    "wrong object changed", never a hit on the target (the global checker cannot tell)."""
    for i in range(6):
        scene = world_scene("val", i, "same-colour")
        wrong = wrong_object_render("val", i, "same-colour")
        if wrong is None:
            continue
        result = outcome.measure_outcome(scene, wrong)
        assert not result["selective_success"]
        assert result["failure"]["wrong_object_changed"]


def _scene_with_three_objects() -> BenchScene:
    return next(s for s in world_split("val", 10) if len(s.masks) == 3)


def test_each_kind_of_damage_gets_its_own_failure_class():
    scene = _scene_with_three_objects()
    places = outcome.ScenePlaces.of(scene)
    ideal = scene.ideal_image()
    other = next(n for n in scene.masks if n != scene.edited_object)

    painted = ideal.copy()
    painted[scene.masks[other]] = ideal[scene.background_mask][0]  # the other object erased
    assert outcome.measure_outcome(scene, painted, places=places)["failure"]["wrong_object_changed"]

    noisy = ideal.copy()
    rng = np.random.default_rng(0)
    background = places.background
    noise = rng.integers(-90, 90, size=noisy[background].shape)
    noisy[background] = np.clip(noisy[background].astype(int) + noise, 0, 255).astype(np.uint8)
    result = outcome.measure_outcome(scene, noisy, places=places)
    assert result["target_made"] and result["others_kept"] and not result["background_kept"]
    assert sum(result["failure"].values()) == 1

    half = ideal.copy()
    made = places.expected[places.edited]
    rows = np.nonzero(made.any(axis=1))[0]
    top_third = rows[0] + (rows[-1] - rows[0]) // 3
    cut = made & (np.arange(made.shape[0])[:, None] > top_third)
    half[cut] = scene.source_image()[background][0]  # all but the top third of the new object gone
    result = outcome.measure_outcome(scene, half, places=places)
    assert not result["target_made"]
    assert result["failure"]["shape_clipped"] or result["failure"]["target_not_made"]


def test_a_scene_whose_captions_are_not_world_pairs_has_no_outcome():
    scene = world_split("val", 1)[0]
    foreign = BenchScene(
        id="x",
        image=scene.source_image(),
        source="a cat and a dog",
        target="a cat and a fox",
        masks={"cat": scene.masks[next(iter(scene.masks))], "dog": ~scene.background_mask},
        edited_object="dog",
    )
    assert outcome.measure_outcome(foreign, scene.source_image()) is None


def test_thresholds_are_the_reconstructions_fifth_percentiles():
    scenes = world_split("val", per_category=2)
    scores = []
    rng = np.random.default_rng(1)
    for scene in scenes:  # exact renders with mild noise stand in for reconstructions
        noisy = scene.source_image().astype(int) + rng.integers(-8, 9, scene.source_image().shape)
        scores.append(reconstruction_scores(scene, np.clip(noisy, 0, 255).astype(np.uint8)))
    chosen, summary = thresholds_from(scores)
    ious = [v for s in scores for v in s["iou"]]
    backgrounds = [s["background_psnr"] for s in scores]
    assert 0 <= np.percentile(ious, 5) - chosen.iou < 0.01
    assert 0 <= np.percentile(backgrounds, 5) - chosen.background_psnr < 0.1
    assert summary["backgrounds_passing"] == np.mean(
        np.array(backgrounds) >= chosen.background_psnr
    )
    assert summary["backgrounds_passing"] >= 0.9


@pytest.mark.parametrize("wins,losses", [(0, 0), (7, 2), (11, 17), (3, 0)])
def test_sign_test_is_the_exact_binomial_test(wins: int, losses: int):
    expected = 1.0 if wins + losses == 0 else binomtest(wins, wins + losses, 0.5).pvalue
    assert sign_test(wins, losses) == pytest.approx(expected)


def test_outcome_counts_pair_scenes_and_count_each_failure_once():
    def result(success: bool, failure: str | None) -> dict:
        return {
            "outcome": {
                "selective_success": success,
                "failure": {name: name == failure for name in outcome.FAILURES},
            }
        }

    plan = [  # (nti, dpl) per scene
        ((True, None), (True, None)),
        ((False, "target_not_made"), (True, None)),
        ((False, "colour_bled"), (True, None)),
        ((True, None), (False, "wrong_object_changed")),
        ((False, "target_not_made"), (False, "target_not_made")),
    ]
    per_scene = [
        {"id": str(i), "methods": {"nti": result(*a), "dpl": result(*b)}}
        for i, (a, b) in enumerate(plan)
    ]
    counts = outcome_counts(per_scene, "nti")
    assert counts["nti"]["successes"] == 2 and counts["dpl"]["successes"] == 3
    assert (counts["dpl"]["only_method"], counts["dpl"]["only_baseline"]) == (2, 1)
    assert counts["dpl"]["sign_p"] == pytest.approx(binomtest(2, 3, 0.5).pvalue)
    assert counts["nti"]["failures"]["target_not_made"] == 2
    assert sum(counts["dpl"]["failures"].values()) == 2


def test_the_ideal_mask_of_a_shape_swap_is_the_new_shape():
    for scene in world_split("val", 20):
        places = outcome.ScenePlaces.of(scene)
        (_, old), (_, new) = places.source[places.edited], places.target[places.edited]
        expected = places.expected[places.edited]
        assert expected.sum() >= 12
        if old != new:  # the new shape, not the old one, is what the target must cover
            assert not np.array_equal(expected, scene.masks[scene.edited_object])
        assert (expected & ~scene.changed_region).sum() == 0
        assert world.SIZE == expected.shape[0]
