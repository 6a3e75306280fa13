"""Report aggregation on a hand-made example, and the files it writes."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpl_edit.bench.report import (
    LEAKAGE_GROUP,
    ExampleRow,
    aggregate,
    plot_example_grid,
    write_report,
)
from dpl_edit.metrics import bootstrap_ci

THRESHOLDS = [0.0, 0.5, 1.0]


def _leak(outside: float, other: float, background: float) -> dict:
    return {"outside": outside, "other_objects": other, "background": background}


PER_SCENE = [
    {
        "id": "a",
        "methods": {
            "nti": {
                "localisation": {"iou_curves": {"cat": [0.2, 0.6, 0.1], "dog": [0.2, 0.4, None]}},
                "leakage": {"cat": _leak(0.5, 0.2, 0.3), "dog": _leak(0.3, 0.1, 0.2)},
                "reconstruction": {"psnr": 30.0},
                "edit_fidelity": {"psnr": 20.0, "ssim": 0.8, "checker_hit": True},
                "cost": {"seconds": {"invert": 10.0}, "unet_evals": 100},
            },
            "dpl": {
                "localisation": {"iou_curves": {"cat": [0.5, 0.9, 0.2], "dog": [0.5, 0.7, 0.3]}},
                "leakage": {"cat": _leak(0.2, 0.1, 0.1), "dog": _leak(0.1, 0.05, 0.05)},
                "reconstruction": {"psnr": 31.0},
                "cost": {"seconds": {"invert": 20.0, "dpl": 5.0}, "unet_evals": 300},
            },
        },
    },
    {
        "id": "b",
        "methods": {
            "nti": {
                "localisation": {"iou_curves": {"cat": [0.4, 0.8, 0.0]}},
                "leakage": {"cat": _leak(0.2, 0.1, 0.1)},
                "reconstruction": {"psnr": 32.0},
                "edit_fidelity": {"psnr": None, "ssim": None, "checker_hit": False},
                "cost": {"seconds": {"invert": 12.0}, "unet_evals": 100},
            },
            "dpl": {
                "localisation": {"iou_curves": {"cat": [0.4, 1.0, 0.1]}},
                "leakage": {"cat": _leak(0.0, 0.0, 0.0)},
                "reconstruction": {"psnr": 33.0},
                "cost": {"seconds": {"invert": 22.0, "dpl": 7.0}, "unet_evals": 300},
            },
        },
    },
    {
        "id": "c",
        "methods": {
            "dpl": {
                "localisation": {"iou_curves": {"cat": [0.1, 0.4, 0.1]}},
                "leakage": {"cat": _leak(0.6, 0.3, 0.3)},
                "reconstruction": {"psnr": 29.0},
            }
        },
    },
]


def _stat(agg: dict, method: str, name: str, key: str = "metrics") -> dict:
    return agg["methods"][method][key][name]


def test_aggregate_averages_nouns_within_scenes_then_scenes():
    agg = aggregate(PER_SCENE, THRESHOLDS, baseline="nti")
    assert agg["n_scenes"] == 3 and list(agg["methods"]) == ["nti", "dpl"]
    # nti: scene a mean IoU = mean(0.3, 0.3), best = mean(0.6, 0.4); scene b 0.4 and 0.8.
    assert _stat(agg, "nti", "localisation.mean_iou")["mean"] == pytest.approx(0.35)
    assert _stat(agg, "nti", "localisation.mean_iou")["n"] == 2
    assert _stat(agg, "nti", "localisation.best_iou")["mean"] == pytest.approx(0.65)
    assert _stat(agg, "nti", "leakage.outside")["mean"] == pytest.approx((0.4 + 0.2) / 2)
    assert _stat(agg, "nti", "leakage.other_objects")["mean"] == pytest.approx((0.15 + 0.1) / 2)
    assert _stat(agg, "nti", "edit_fidelity.checker_hit")["mean"] == pytest.approx(0.5)
    assert _stat(agg, "nti", "edit_fidelity.psnr") == {
        "mean": 20.0,
        "low": 20.0,
        "high": 20.0,
        "n": 1,
    }
    assert _stat(agg, "nti", "cost.seconds.invert")["mean"] == pytest.approx(11.0)
    np.testing.assert_allclose(agg["methods"]["nti"]["iou_curve"]["mean"], [0.3, 0.65, 0.05])
    # dpl, scene a: cat mean 1.6/3, dog 0.5 -> 0.51667; b 0.5; c 0.2.
    dpl = _stat(agg, "dpl", "localisation.mean_iou")
    expected = bootstrap_ci([(1.6 / 3 + 0.5) / 2, 0.5, 0.2], seed=0)
    assert (dpl["mean"], dpl["low"], dpl["high"]) == pytest.approx(expected)
    assert dpl["low"] <= dpl["mean"] <= dpl["high"]
    assert _stat(agg, "dpl", "cost.seconds.dpl")["mean"] == pytest.approx(6.0)


def test_paired_difference_uses_scenes_both_methods_ran():
    agg = aggregate(PER_SCENE, THRESHOLDS, baseline="nti")
    diff = _stat(agg, "dpl", "localisation.mean_iou", key="difference")
    assert diff["n"] == 2
    assert diff["mean"] == pytest.approx(((1.6 / 3 + 0.5) / 2 - 0.3 + 0.5 - 0.4) / 2)
    assert _stat(agg, "dpl", "reconstruction.psnr", key="difference")["mean"] == pytest.approx(1.0)
    assert "difference" not in agg["methods"]["nti"]
    with pytest.raises(ValueError, match="baseline"):
        aggregate(PER_SCENE, THRESHOLDS, baseline="ddim")
    with pytest.raises(ValueError, match="3 points"):
        aggregate(PER_SCENE, [0.0, 1.0])


def _example(scene_id: str, methods: tuple[str, ...]) -> ExampleRow:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    return ExampleRow(
        scene_id=scene_id,
        source=image,
        ideal=None if scene_id == "b" else image,
        edits={m: image for m in methods},
        attention={f"{m}: cat": rng.random((4, 4)) for m in methods},
    )


def test_write_report_writes_parsable_files_atomically(tmp_path: Path):
    examples = [_example("a", ("nti", "dpl")), _example("b", ("nti", "dpl"))]
    out = tmp_path / "results"
    agg = write_report(out, PER_SCENE, THRESHOLDS, baseline="nti", examples=examples)
    names = {"per_scene.json", "aggregate.json", "report.md"}
    names |= {"iou_curves.png", "leakage.png", "examples.png"}
    assert {p.name for p in out.iterdir()} == names  # no temporary files left behind
    assert json.loads((out / "per_scene.json").read_text())[1]["id"] == "b"
    stored = json.loads((out / "aggregate.json").read_text())
    assert stored["methods"]["dpl"]["metrics"] == agg["methods"]["dpl"]["metrics"]
    for name in ("iou_curves.png", "leakage.png", "examples.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 100
    report = (out / "report.md").read_text()
    assert "| mean_iou | 0.350 [" in report
    assert "| psnr | 20.0 [20.0, 20.0] (n=1) | – |" in report
    assert "## Paired difference from nti" in report
    assert "![examples](examples.png)" in report


def test_report_adds_a_section_per_category(tmp_path: Path):
    per_scene = [
        {**s, "category": c} for s, c in zip(PER_SCENE, ["close", "close", "far"], strict=True)
    ]
    agg = write_report(tmp_path, per_scene, THRESHOLDS, baseline="nti")
    close = agg["categories"]["close"]
    assert close["n_scenes"] == 2 and agg["categories"]["far"]["n_scenes"] == 1
    # Scenes a and b: dpl's outside leakage (0.15, 0.0) minus nti's (0.4, 0.2), averaged.
    diff = close["methods"]["dpl"]["difference"]["leakage.outside"]["mean"]
    assert diff == pytest.approx(((0.15 - 0.4) + (0.0 - 0.2)) / 2)
    report = (tmp_path / "report.md").read_text()
    assert "### close (2 scenes)" in report and "### far (1 scenes)" in report
    assert "categories" not in write_report(tmp_path / "one", PER_SCENE, THRESHOLDS, "nti")


def test_report_pools_the_leakage_prone_categories(tmp_path: Path):
    per_scene = [
        {**s, "category": c}
        for s, c in zip(PER_SCENE, ["close", "same-colour", "two-objects"], strict=True)
    ]
    agg = write_report(tmp_path, per_scene, THRESHOLDS, baseline="nti")
    pooled = agg["categories"][LEAKAGE_GROUP]
    assert pooled["n_scenes"] == 2  # the close and same-colour scenes, not the two-object one
    diff = pooled["methods"]["dpl"]["difference"]["leakage.outside"]["mean"]
    assert diff == pytest.approx(((0.15 - 0.4) + (0.0 - 0.2)) / 2)
    report = (tmp_path / "report.md").read_text()
    assert f"### {LEAKAGE_GROUP} (2 scenes)" in report
    # One close scene alone is its own category, not a pool.
    alone = [{**PER_SCENE[0], "category": "close"}, {**PER_SCENE[1], "category": "two-objects"}]
    assert LEAKAGE_GROUP not in write_report(tmp_path / "one", alone, THRESHOLDS)["categories"]


def test_example_grid_needs_the_same_columns_in_every_row(tmp_path: Path):
    rows = [_example("a", ("nti", "dpl")), _example("b", ("nti",))]
    with pytest.raises(ValueError, match="other columns"):
        plot_example_grid(rows, tmp_path / "grid.png")
