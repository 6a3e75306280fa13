"""Benchmark metrics against hand-made masks, maps and images with known answers."""

import numpy as np
import pytest

from dpl_edit.metrics import (
    best_iou,
    bootstrap_ci,
    iou_curve,
    leakage,
    normalised_map,
    psnr,
    ssim,
)


def _box(shape: tuple[int, int], top: int, left: int, size: int) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[top : top + size, left : left + size] = True
    return m


OBJ = _box((16, 16), 2, 2, 6)  # 36 px
OTHER = _box((16, 16), 9, 9, 5)  # 25 px
BG = ~(OBJ | OTHER)  # 195 px


def test_perfect_map_has_iou_one_above_zero_and_area_share_at_zero():
    curve = iou_curve(OBJ.astype(float) * 0.2, OBJ)
    assert curve[0] == pytest.approx(36 / 256)  # τ = 0 predicts every pixel
    np.testing.assert_allclose(curve[1:], 1.0)
    assert best_iou(OBJ.astype(float), OBJ) == 1.0


def test_coarse_block_map_is_upsampled_bilinearly():
    coarse = np.zeros((8, 8))
    coarse[1:4, 1:4] = 1.0  # covers OBJ exactly at twice the resolution
    thresholds = np.array([0.5, 0.55, 0.6])
    curve = iou_curve(coarse, OBJ, thresholds)
    # Half-pixel bilinear 2x: inner corner pixels get 0.75 * 0.75 = 0.5625, edge pixels outside
    # get 0.25, so cuts at 0.5 and 0.55 are exact and 0.6 loses the 4 inner corners.
    np.testing.assert_allclose(curve, [1.0, 1.0, 32 / 36])


def test_map_on_another_object_has_iou_zero_and_leakage_one():
    attn = OTHER.astype(np.float32)
    curve = iou_curve(attn, OBJ)
    np.testing.assert_allclose(curve[1:], 0.0)
    shares = leakage(attn, OBJ, OTHER, BG)
    assert shares == pytest.approx((1.0, 1.0, 0.0))


def test_uniform_map_leaks_in_proportion_to_area():
    shares = leakage(np.ones((4, 4)), OBJ, OTHER, BG)
    assert shares.outside == pytest.approx(220 / 256)
    assert shares.other_objects == pytest.approx(25 / 256)
    assert shares.background == pytest.approx(195 / 256)


def test_leakage_weights_pixels_by_mass_and_gives_overlaps_to_the_object():
    other = OTHER | _box((16, 16), 2, 2, 1)  # shares one pixel with OBJ
    attn = np.where(OBJ, 3.0, np.where(OTHER, 1.0, 2.0))
    total = 36 * 3 + 25 * 1 + 195 * 2
    shares = leakage(attn, OBJ, other, ~(OBJ | other))
    assert shares == pytest.approx((415 / total, 25 / total, 390 / total))


def test_leakage_rejects_masks_that_do_not_partition_and_handles_empty_maps():
    with pytest.raises(ValueError, match="cover"):
        leakage(np.ones((16, 16)), OBJ, OTHER, BG & ~_box((16, 16), 15, 0, 1))
    with pytest.raises(ValueError, match="overlap"):
        leakage(np.ones((16, 16)), OBJ, OTHER, BG | OTHER)
    assert np.isnan(leakage(np.zeros((16, 16)), OBJ, OTHER, BG)).all()


def test_normalised_map_peaks_at_one_and_rejects_bad_maps():
    m = normalised_map(np.array([[0.0, 0.01], [0.02, 0.04]]), (8, 8))
    assert m.shape == (8, 8) and m.max() == pytest.approx(1.0) and m.min() >= 0
    with pytest.raises(ValueError):
        iou_curve(-np.ones((4, 4)), OBJ)
    with pytest.raises(ValueError):
        iou_curve(np.ones((4, 4)), OBJ.astype(np.uint8))


def test_psnr_matches_hand_computed_mse_and_caps_identical_images():
    a = np.zeros((4, 4), dtype=np.uint8)
    b = a.copy()
    b[1, 2] = 10  # MSE = 100 / 16
    assert psnr(a, b) == pytest.approx(40.17200343523835)
    assert psnr(a, a) == 100.0
    assert psnr(a, a, cap=60.0) == 60.0
    away = np.ones((4, 4), dtype=bool)
    away[1, 2] = False
    assert psnr(a, b, mask=away) == 100.0
    assert np.isnan(psnr(a, b, mask=np.zeros((4, 4), dtype=bool)))


def test_psnr_on_float_colour_images_uses_peak_one():
    a = np.zeros((2, 2, 2))
    b = a.copy()
    b[0, 0] = 0.1  # two of eight values off by 0.1
    assert psnr(a, b) == pytest.approx(26.020599913279625)
    with pytest.raises(ValueError):
        psnr(a, b.astype(np.float32))


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    assert ssim(img, img) == pytest.approx(1.0)
    noisy = np.clip(img + rng.normal(0, 40, img.shape), 0, 255).astype(np.uint8)
    assert ssim(img, noisy) < 0.9


def test_ssim_of_flat_images_follows_the_luminance_term():
    a = np.full((20, 20), 0.2)
    b = np.full((20, 20), 0.6)
    c1 = 0.01**2
    assert ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1))


def test_ssim_averages_the_full_image_map_inside_the_mask():
    rng = np.random.default_rng(1)
    a = rng.random((40, 40))
    b = a.copy()
    b[:8, :8] = rng.random((8, 8))
    far = _box((40, 40), 20, 20, 20)  # more than a window radius from the change
    assert ssim(a, b, mask=far) == pytest.approx(1.0)
    assert ssim(a, b, mask=_box((40, 40), 0, 0, 8)) < 0.5


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = np.random.default_rng(2).normal(5.0, 1.0, size=400)
    mean, low, high = bootstrap_ci(values)
    assert low < mean < high
    assert mean == pytest.approx(values.mean())
    # The bootstrap interval of a mean is close to the normal one, ±1.96 s / sqrt(n).
    assert (high - low) / 2 == pytest.approx(1.96 * values.std() / 20, rel=0.15)
    assert bootstrap_ci(values) == (mean, low, high)
    assert bootstrap_ci(values, seed=1) != (mean, low, high)


def test_bootstrap_ci_ignores_nan_and_handles_tiny_inputs():
    values = [0.2, 0.4, float("nan"), 0.9]
    assert bootstrap_ci(values) == bootstrap_ci([0.2, 0.4, 0.9])
    assert bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)
    assert np.isnan(bootstrap_ci([float("nan")])).all()
    with pytest.raises(ValueError):
        bootstrap_ci(values, ci=1.5)
