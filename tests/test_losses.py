"""DPL losses and thresholds against values computed independently (numpy, by hand, the spec)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpl_edit.dpl.losses import (
    DplLossConfig,
    background_loss,
    balancing_loss,
    disjoint_loss,
    evaluate_losses,
    gaussian_kernel_3x3,
    thresholds,
)
from dpl_edit.dpl.word_maps import word_maps
from dpl_edit.errors import DplError


def random_maps(res: int, text_len: int, seed: int, concentration: float = 0.3) -> np.ndarray:
    """Attention-like maps: at each pixel a probability vector over the text tokens."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(text_len, concentration), size=(res, res))


def np_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)))


def np_balancing(maps, groups, temp=100.0, kernel_1d=None, reduce="max", end=None) -> float:
    """Section 4.3a written out with explicit loops, as an independent reference; `end` is
    the exclusive end of the softmax's positions (default: the paper's, all but the last)."""
    text_len = maps.shape[-1]
    logits = temp * maps[:, :, 1 : text_len - 1 if end is None else end]
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    sharp = exp / exp.sum(axis=-1, keepdims=True)
    res = maps.shape[0]
    losses = []
    for group in groups:
        word = sum(sharp[:, :, k - 1] for k in group)
        if kernel_1d is not None:
            kernel = np.outer(kernel_1d, kernel_1d)
            padded = np.pad(word, 1, mode="reflect")
            word = np.array(
                [
                    [(padded[i : i + 3, j : j + 3] * kernel).sum() for j in range(res)]
                    for i in range(res)
                ]
            )
        losses.append(max(0.0, 1.0 - word.max()))
    return max(losses) if reduce == "max" else float(np.mean(losses))


# The document's quirk: 1-D weights exp(-(x / (2 * 0.5))^2) = [e^-1, 1, e^-1], normalised.
QUIRK_1D = np.array([math.exp(-1), 1.0, math.exp(-1)]) / (1 + 2 * math.exp(-1))


class TestKernel:
    def test_quirk_values_from_the_document(self):
        kernel = gaussian_kernel_3x3()
        assert kernel[1, 1].item() == pytest.approx(0.3319, abs=1e-4)
        assert kernel[0, 1].item() == pytest.approx(0.1221, abs=1e-4)
        assert kernel[0, 0].item() == pytest.approx(0.0449, abs=1e-4)
        assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)

    def test_standard_gaussian_1d_profile(self):
        kernel = gaussian_kernel_3x3(formula="standard")
        profile = kernel.sum(dim=0)  # marginal of a separable kernel = its 1-D weights
        np.testing.assert_allclose(profile.numpy(), [0.1065, 0.7870, 0.1065], atol=1e-4)

    def test_bad_options_are_user_errors(self):
        with pytest.raises(DplError):
            gaussian_kernel_3x3(sigma=0.0)
        with pytest.raises(DplError):
            gaussian_kernel_3x3(formula="box")


def test_threshold_table_of_the_document():
    table = {
        0: (0.300, 0.900, 0.700),
        10: (0.201, 0.603, 0.573),
        20: (0.135, 0.404, 0.469),
        25: (0.110, 0.331, 0.425),
        30: (0.090, 0.271, 0.384),
        40: (0.061, 0.182, 0.315),
        49: (0.042, 0.127, 0.263),
    }
    for step, expected in table.items():
        th = thresholds(step)
        assert (th.at, th.dj, th.bg) == pytest.approx(expected, abs=6e-4), step


def test_background_threshold_counts_from_its_start_step():
    th = thresholds(15, DplLossConfig(bg_start_step=5))
    assert th.bg == pytest.approx(0.7 * math.exp(-10 / 50))
    assert th.at == pytest.approx(0.3 * math.exp(-15 / 25))


def test_fraction_index_follows_the_50_step_schedule():
    """Step 5 of 10 is step 25 of 50: the same thresholds as the paper's run at step 25."""
    by_fraction = DplLossConfig(threshold_index="fraction")
    ten = thresholds(5, by_fraction, total_steps=10)
    fifty = thresholds(25, by_fraction, total_steps=50)
    assert ten == fifty == thresholds(25)
    assert ten.at == pytest.approx(0.3 * math.exp(-25 / 25))
    assert ten.bg == pytest.approx(0.7 * math.exp(-25 / 50))
    # Indexed by step, a 10-step run never gets below the paper's step-9 thresholds.
    assert thresholds(9, DplLossConfig(), total_steps=10).at == pytest.approx(
        0.3 * math.exp(-9 / 25)
    )
    with pytest.raises(ValueError):
        thresholds(5, by_fraction)


def test_fraction_index_moves_the_background_start():
    """`bg_start_step` is a point of the 50-step schedule: step 2 of 10 is 10 of 50."""
    config = DplLossConfig(threshold_index="fraction", bg_start_step=10)
    maps = torch.from_numpy(random_maps(4, 8, seed=3))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2] = True
    assert evaluate_losses(maps, [[2]], mask, 1, config, total_steps=10).bg is None
    assert evaluate_losses(maps, [[2]], mask, 2, config, total_steps=10).bg is not None


class TestWordMaps:
    def test_sub_tokens_are_summed(self):
        maps = random_maps(4, 10, seed=0)
        combined = word_maps(torch.from_numpy(maps), [[2], [4, 5, 6]]).numpy()
        np.testing.assert_allclose(combined[0], maps[:, :, 2])
        np.testing.assert_allclose(combined[1], maps[:, :, 4] + maps[:, :, 5] + maps[:, :, 6])

    @pytest.mark.parametrize("groups", [[], [[]], [[0]], [[9]], [[2], [2, 3]]])
    def test_invalid_groups_are_rejected(self, groups):
        with pytest.raises(ValueError):
            word_maps(torch.from_numpy(random_maps(4, 10, seed=0)), groups)


class TestBalancing:
    @pytest.mark.parametrize("reduce", ["max", "mean"])
    @pytest.mark.parametrize("temp", [100.0, 3.0])
    def test_matches_numpy_reference(self, reduce, temp):
        maps = random_maps(6, 12, seed=1)
        groups = [[2], [5, 6], [9]]
        got = balancing_loss(torch.from_numpy(maps), groups, softmax_temp=temp, reduce=reduce)
        want = np_balancing(maps, groups, temp=temp, kernel_1d=QUIRK_1D, reduce=reduce)
        assert got.item() == pytest.approx(want, abs=1e-9)

    def test_word_softmax_leaves_padding_out(self):
        """A padding slot with a huge score wins the paper's softmax everywhere, so no word can
        peak; over the prompt's own tokens (1..3 here) the word owns its pixels again."""
        maps = random_maps(4, 10, seed=4) * 0.01
        maps[:, :, 2] += 0.05
        maps[:, :, 7] += 0.9  # padding: beyond the prompt's three tokens
        tensor = torch.from_numpy(maps)
        paper = balancing_loss(tensor, [[2]], smooth=False)
        words = balancing_loss(
            tensor, [[2]], smooth=False, softmax_tokens="words", n_prompt_tokens=3
        )
        assert paper.item() > 0.99
        assert words.item() < 0.05
        want = np_balancing(maps, [[2]], end=4)
        assert words.item() == pytest.approx(want, abs=1e-9)

    def test_word_softmax_needs_the_prompt_length(self):
        maps = torch.from_numpy(random_maps(4, 10, seed=4))
        with pytest.raises(ValueError):
            balancing_loss(maps, [[2]], softmax_tokens="words")
        with pytest.raises(ValueError):  # the word lies beyond the prompt
            balancing_loss(maps, [[5]], softmax_tokens="words", n_prompt_tokens=3)

    def test_levels_average_each_loss(self):
        fine = torch.from_numpy(random_maps(8, 10, seed=5))
        coarse = torch.from_numpy(random_maps(4, 10, seed=6))
        groups = [[2], [4]]
        report = evaluate_losses([fine, coarse], groups, [None, None], 0)
        want = (balancing_loss(fine, groups) + balancing_loss(coarse, groups)) / 2
        assert report.at.item() == pytest.approx(want.item())
        want_dj = (disjoint_loss(fine, groups) + disjoint_loss(coarse, groups)) / 2
        assert report.dj.item() == pytest.approx(want_dj.item())

    def test_without_smoothing_matches_numpy_reference(self):
        maps = random_maps(5, 8, seed=2)
        got = balancing_loss(torch.from_numpy(maps), [[1], [3]], softmax_temp=4.0, smooth=False)
        assert got.item() == pytest.approx(np_balancing(maps, [[1], [3]], temp=4.0), abs=1e-9)

    def test_single_pixel_peak_is_cut_by_the_kernel_centre(self):
        # After the x100 softmax the word owns one interior pixel outright; smoothing leaves
        # centre weight 0.5761^2 there, so the loss is 1 - 0.3319.
        maps = np.full((5, 5, 6), 0.2)
        maps[:, :, 2] = 0.0
        maps[2, 2] = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
        loss = balancing_loss(torch.from_numpy(maps), [[2]])
        assert loss.item() == pytest.approx(1 - QUIRK_1D[1] ** 2, abs=1e-6)
        standard = gaussian_kernel_3x3(formula="standard")
        loss = balancing_loss(torch.from_numpy(maps), [[2]], kernel=standard)
        assert loss.item() == pytest.approx(1 - standard[1, 1].item(), abs=1e-6)

    def test_strong_smoothed_peak_gives_zero(self):
        maps = np.full((6, 6, 5), 0.25)
        maps[:, :, 1] = 0.0
        maps[1:4, 1:4] = [0.0, 0.9, 0.05, 0.05, 0.0]  # a 3x3 block owned by token 1
        assert balancing_loss(torch.from_numpy(maps), [[1]]).item() == pytest.approx(0, abs=1e-9)

    def test_sot_and_last_slot_do_not_compete(self):
        # A 24-token text (the bundled model's length): SOT and the last slot hold most of the
        # probability, but both are dropped, so the word still wins every pixel.
        maps = np.full((4, 4, 24), 0.001)
        maps[:, :, 0] = 0.5
        maps[:, :, 23] = 0.3
        maps[:, :, 3] = 0.2 - 0.001 * 21
        loss = balancing_loss(torch.from_numpy(maps), [[3]])
        assert loss.item() == pytest.approx(0, abs=1e-6)

    def test_worst_word_dominates_with_max(self):
        maps = np.full((5, 5, 6), 0.0)
        maps[..., 4] = 1.0  # token 4 owns the image
        maps[2, 2] = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # token 1 owns one pixel
        loss_max = balancing_loss(torch.from_numpy(maps), [[1], [4]]).item()
        loss_mean = balancing_loss(torch.from_numpy(maps), [[1], [4]], reduce="mean").item()
        assert loss_max == pytest.approx(1 - QUIRK_1D[1] ** 2, abs=1e-6)
        assert loss_mean == pytest.approx((1 - QUIRK_1D[1] ** 2) / 2, abs=1e-6)


class TestDisjoint:
    def test_non_overlapping_maps_give_zero(self):
        maps = np.zeros((4, 4, 6))
        maps[:2, :, 1] = 1.0
        maps[2:, :, 3] = 1.0
        assert disjoint_loss(torch.from_numpy(maps), [[1], [3]]).item() == 0.0

    def test_identical_maps_give_one(self):
        maps = random_maps(4, 6, seed=3)
        maps[:, :, 3] = maps[:, :, 1]
        loss = disjoint_loss(torch.from_numpy(maps), [[1], [3]])
        assert loss.item() == pytest.approx(1.0, abs=1e-12)

    def test_mean_over_pairs_matches_numpy(self):
        maps = random_maps(5, 9, seed=4)
        words = [maps[:, :, 1], maps[:, :, 3] + maps[:, :, 4], maps[:, :, 6]]
        want = np.mean(
            [
                np_cosine(words[1], words[0]),
                np_cosine(words[2], words[0]),
                np_cosine(words[2], words[1]),
            ]
        )
        got = disjoint_loss(torch.from_numpy(maps), [[1], [3, 4], [6]])
        assert got.item() == pytest.approx(want, abs=1e-12)

    def test_one_word_is_zero_and_finite(self):
        maps = torch.from_numpy(random_maps(4, 6, seed=5)).requires_grad_()
        loss = disjoint_loss(maps, [[2]])
        assert loss.item() == 0.0
        report = evaluate_losses(maps, [[2]], None, 0)
        report.total.backward()
        assert torch.isfinite(maps.grad).all()

    def test_zero_map_is_not_nan(self):
        maps = torch.from_numpy(random_maps(4, 6, seed=6))
        maps[:, :, 2] = 0.0
        maps.requires_grad_()
        loss = disjoint_loss(maps, [[1], [2]])
        loss.backward()
        assert loss.item() == 0.0
        assert torch.isfinite(maps.grad).all()


class TestBackground:
    def test_map_equal_to_mask_gives_one(self):
        mask = np.zeros((4, 4), dtype=bool)
        mask[:, :2] = True
        maps = np.zeros((4, 4, 5))
        maps[..., 2] = mask
        loss = background_loss(torch.from_numpy(maps), [[2]], torch.from_numpy(mask))
        assert loss.item() == pytest.approx(1.0, abs=1e-12)

    def test_map_outside_mask_gives_zero(self):
        mask = torch.zeros(4, 4, dtype=torch.bool)
        mask[:, :2] = True
        maps = torch.zeros(4, 4, 5)
        maps[:, 2:, 2] = 1.0
        assert background_loss(maps, [[2]], mask).item() == 0.0

    def test_mean_over_words_matches_numpy(self):
        maps = random_maps(4, 7, seed=7)
        mask = np.zeros((4, 4), dtype=bool)
        mask[1:, 3] = mask[3, :] = True
        want = np.mean(
            [np_cosine(maps[:, :, 1], mask), np_cosine(maps[:, :, 2] + maps[:, :, 4], mask)]
        )
        got = background_loss(torch.from_numpy(maps), [[1], [2, 4]], torch.from_numpy(mask))
        assert got.item() == pytest.approx(want, abs=1e-12)

    def test_missing_or_empty_mask_is_skipped(self):
        maps = torch.from_numpy(random_maps(4, 6, seed=8))
        assert background_loss(maps, [[1]], None) is None
        assert background_loss(maps, [[1]], torch.zeros(4, 4, dtype=torch.bool)) is None

    def test_per_word_masks_match_numpy(self):
        """`leak_region` "others": each word's cosine is taken with its own mask."""
        maps = random_maps(4, 7, seed=9)
        masks = np.zeros((2, 4, 4), dtype=bool)
        masks[0, :, :2] = True
        masks[1, 3, :] = True
        want = np.mean(
            [np_cosine(maps[:, :, 1], masks[0]), np_cosine(maps[:, :, 2] + maps[:, :, 4], masks[1])]
        )
        got = background_loss(torch.from_numpy(maps), [[1], [2, 4]], torch.from_numpy(masks))
        assert got.item() == pytest.approx(want, abs=1e-12)

    def test_mass_measure_is_the_share_of_each_word_map_inside_its_mask(self):
        maps = random_maps(4, 7, seed=10)
        masks = np.zeros((2, 4, 4), dtype=bool)
        masks[0, :, :2] = True
        masks[1, 3, :] = True
        words = [maps[:, :, 1], maps[:, :, 2] + maps[:, :, 4]]
        want = np.mean([w[m].sum() / w.sum() for w, m in zip(words, masks, strict=True)])
        got = background_loss(
            torch.from_numpy(maps), [[1], [2, 4]], torch.from_numpy(masks), measure="mass"
        )
        assert got.item() == pytest.approx(want, abs=1e-12)

    def test_cosine_barely_sees_a_peak_inside_a_large_region_and_mass_does(self):
        """Why the mass measure exists: a map peaked on one cell of a 15-cell region."""
        maps = np.zeros((4, 4, 3))
        maps[2, 2, 1] = 1.0
        region = np.ones((4, 4), dtype=bool)
        region[0, 0] = False  # the word's own cell
        args = (torch.from_numpy(maps), [[1]], torch.from_numpy(region))
        assert background_loss(*args).item() == pytest.approx(1 / np.sqrt(15))
        assert background_loss(*args, measure="mass").item() == pytest.approx(1.0)

    def test_per_word_masks_must_match_the_words(self):
        maps = torch.from_numpy(random_maps(4, 6, seed=8))
        with pytest.raises(ValueError, match="3 word masks for 2 words"):
            background_loss(maps, [[1], [2]], torch.ones(3, 4, 4, dtype=torch.bool))

    def test_mask_at_another_resolution_is_a_bug(self):
        maps = torch.from_numpy(random_maps(4, 6, seed=8))
        with pytest.raises(ValueError):
            background_loss(maps, [[1]], torch.ones(8, 8, dtype=torch.bool))


def two_word_scene() -> tuple[torch.Tensor, torch.Tensor]:
    """Words 1 and 3 each own a separate 3x3 block; the rest is background (token 5)."""
    maps = np.full((8, 8, 7), 0.0)
    maps[..., 5] = 1.0
    maps[0:3, 0:3] = [0, 1.0, 0, 0, 0, 0, 0]
    maps[4:7, 4:7] = [0, 0, 0, 1.0, 0, 0, 0]
    mask = np.ones((8, 8), dtype=bool)
    mask[0:3, 0:3] = mask[4:7, 4:7] = False
    return torch.from_numpy(maps), torch.from_numpy(mask)


class TestEvaluate:
    def test_clean_maps_satisfy_every_threshold(self):
        maps, mask = two_word_scene()
        report = evaluate_losses(maps, [[1], [3]], mask, step_index=49)
        assert (report.at.item(), report.dj.item(), report.bg.item()) == (0.0, 0.0, 0.0)
        assert report.satisfied and not report.bg_skipped
        assert report.total.item() == 0.0

    def test_total_is_the_weighted_sum_and_thresholds_decide(self):
        maps = torch.from_numpy(random_maps(6, 9, seed=9))
        mask = torch.zeros(6, 6, dtype=torch.bool)
        mask[:, :3] = True
        config = DplLossConfig(lambda_at=0.7, lambda_dj=0.2, lambda_bg=0.1)
        report = evaluate_losses(maps, [[1], [4]], mask, 10, config)
        at = balancing_loss(maps, [[1], [4]])
        dj = disjoint_loss(maps, [[1], [4]])
        bg = background_loss(maps, [[1], [4]], mask)
        assert report.total.item() == pytest.approx(0.7 * at + 0.2 * dj + 0.1 * bg)
        th = thresholds(10)
        expected = at.item() < th.at and dj.item() < th.dj and bg.item() < th.bg
        assert report.satisfied == expected
        record = report.as_record()
        assert record["th_dj"] == pytest.approx(th.dj) and record["bg"] == pytest.approx(bg.item())

    def test_failing_loss_blocks_and_disabled_loss_passes(self):
        maps, mask = two_word_scene()
        overlap = maps.clone()
        overlap[..., 3] = overlap[..., 1]  # identical maps: disjoint loss 1 > 0.9
        # (balancing is off here: the two words now split every softmax, 1 - 0.5 > 0.3)
        no_at = DplLossConfig(use_at=False)
        report = evaluate_losses(overlap, [[1], [3]], mask, 0, no_at)
        assert report.at is None and report.dj.item() == pytest.approx(1.0)
        assert not report.satisfied
        for config in (
            DplLossConfig(use_at=False, use_dj=False),
            DplLossConfig(use_at=False, lambda_dj=0.0),
        ):
            report = evaluate_losses(overlap, [[1], [3]], mask, 0, config)
            assert report.dj is None and report.satisfied
        assert evaluate_losses(overlap, [[1], [3]], mask, 0).at.item() == pytest.approx(0.5)

    def test_background_skipped_without_mask_and_before_start(self):
        maps, mask = two_word_scene()
        report = evaluate_losses(maps, [[1], [3]], None, 3)
        assert report.bg is None and report.bg_skipped and report.satisfied
        report = evaluate_losses(maps, [[1], [3]], mask, 3, DplLossConfig(bg_start_step=4))
        assert report.bg is None and not report.bg_skipped

    def test_no_thresholds_never_stops_early(self):
        maps, mask = two_word_scene()
        report = evaluate_losses(maps, [[1], [3]], mask, 0, DplLossConfig(use_thresholds=False))
        assert report.thresholds is None and not report.satisfied
        nothing = DplLossConfig(use_thresholds=False, use_at=False, use_dj=False, use_bg=False)
        assert evaluate_losses(maps, [[1], [3]], mask, 0, nothing).satisfied

    def test_gradients_reach_the_maps(self):
        maps = torch.from_numpy(random_maps(6, 9, seed=10)).float().requires_grad_()
        mask = torch.zeros(6, 6, dtype=torch.bool)
        mask[3:] = True
        report = evaluate_losses(maps, [[1], [4, 5]], mask, 0)
        report.total.backward()
        assert torch.isfinite(maps.grad).all()
        assert maps.grad[..., 1].abs().sum() > 0 and maps.grad[..., 5].abs().sum() > 0

    def test_half_precision_maps_are_upcast(self):
        maps = torch.from_numpy(random_maps(6, 9, seed=11)).half()
        report = evaluate_losses(maps, [[1], [4]], None, 0)
        reference = evaluate_losses(maps.float(), [[1], [4]], None, 0)
        assert report.total.dtype == torch.float32
        assert report.total.item() == reference.total.item()

    @pytest.mark.parametrize(
        "options",
        [
            {"lambda_at": -1.0},
            {"alpha_bg": 0.0},
            {"softmax_temp": 0.0},
            {"at_reduce": "sum"},
            {"leak_region": "objects"},
        ],
    )
    def test_bad_config_is_a_user_error(self, options):
        with pytest.raises(DplError):
            DplLossConfig(**options)
