"""Background estimation on synthetic attention with known clusters, and mask files."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from dpl_edit.dpl.background import (
    background_mask_at,
    estimate_background,
    leak_regions,
    load_mask_png,
    share_out_clusters,
)
from dpl_edit.errors import DplError

RES = 8
TEXT_LEN = 8


def regions() -> np.ndarray:
    """Five regions of an 8x8 image, aligned with 2x2 blocks so a 4x4 map can describe them."""
    region = np.zeros((RES, RES), dtype=np.int64)
    region[2:4] = 1
    region[4:6] = 2
    region[6:, :4] = 3
    region[6:, 4:] = 4
    return region


def self_attention(seed: int = 0, merged: tuple[int, ...] = ()) -> torch.Tensor:
    """Each pixel attends (almost) uniformly to its own region: block-structured rows.

    Regions listed in `merged` attend to one another as one region, as two nearby objects do
    when K-means cannot tell them apart.
    """
    flat = regions().ravel()
    if merged:
        flat = np.where(np.isin(flat, merged), merged[0], flat)
    same = (flat[:, None] == flat[None, :]).astype(np.float64)
    noisy = same + 0.02 * np.random.default_rng(seed).random(same.shape)
    return torch.from_numpy(noisy / noisy.sum(axis=1, keepdims=True))


def regions_at(res: int) -> np.ndarray:
    """The region layout at another resolution (a divisor or a multiple of 8)."""
    if res <= RES:
        return regions()[:: RES // res, :: RES // res]
    factor = res // RES
    return regions().repeat(factor, axis=0).repeat(factor, axis=1)


def cross_maps(owned: dict[int | tuple[int, ...], list[int]], res: int = 4) -> torch.Tensor:
    """Cross-attention [res, res, TEXT_LEN]: token(s) of a word -> the regions it covers.

    A word's probability (split evenly over its tokens) is 0.8 on its regions and 0.05
    elsewhere; SOT takes the rest.
    """
    region = regions_at(res)
    maps = np.zeros((res, res, TEXT_LEN))
    for tokens, covered in owned.items():
        group = [tokens] if isinstance(tokens, int) else list(tokens)
        share = np.where(np.isin(region, covered), 0.8, 0.05) / len(group)
        for token in group:
            maps[:, :, token] += share
    maps[:, :, 0] = 1.0 - maps.sum(axis=-1)
    return torch.from_numpy(maps)


def estimate(owned, groups, words, res=4, **options):
    return estimate_background(self_attention(), cross_maps(owned, res), groups, words, **options)


def test_clusters_are_labelled_by_the_words_covering_them():
    result = estimate({2: [1], (4, 5): [3]}, [[2], [4, 5]], ["cat", "dog"])
    region = regions()
    np.testing.assert_array_equal(result.word_masks["cat"].numpy(), region == 1)
    np.testing.assert_array_equal(result.word_masks["dog"].numpy(), region == 3)
    np.testing.assert_array_equal(result.background.numpy(), np.isin(region, [0, 2, 4]))
    # K-means found the five regions: each cluster is exactly one region.
    clusters = result.clusters.numpy()
    for r in range(5):
        assert len(np.unique(clusters[region == r])) == 1
    assert Counter(result.cluster_owners) == {"cat": 1, "dog": 1, None: 3}


def test_leak_regions_are_everything_outside_a_words_clusters():
    region = regions()
    both = leak_regions(estimate({2: [1], (4, 5): [3]}, [[2], [4, 5]], ["cat", "dog"]))
    np.testing.assert_array_equal(both[0].numpy(), region != 1)
    np.testing.assert_array_equal(both[1].numpy(), region != 3)
    # A word that claims nothing keeps the plain background.
    weak = estimate({2: [1], 3: [3]}, [[2], [3]], ["cat", "dog"], threshold=0.95)
    assert not weak.word_masks["cat"].any()
    np.testing.assert_array_equal(leak_regions(weak)[0].numpy(), weak.background.numpy())
    # With no background, the other word's object is still there to stay off.
    full = leak_regions(estimate({2: [0, 1, 2], 3: [3, 4]}, [[2], [3]], ["cat", "dog"]))
    np.testing.assert_array_equal(full[0].numpy(), region >= 3)


def test_a_cluster_two_words_cover_is_split_between_them_pixel_by_pixel():
    # Regions 3 and 4 (cat's and dog's objects) form one self-attention cluster.
    merged = estimate_background(
        self_attention(merged=(3, 4)),
        cross_maps({2: [3], 3: [4], 4: [1]}),
        [[2], [3], [4]],
        ["cat", "dog", "bird"],
        n_clusters=4,
    )
    region = regions()
    # K-means merged them: one word claims both objects, the other claims nothing.
    owned = {word: merged.word_masks[word].numpy() for word in ("cat", "dog")}
    assert sorted(mask.sum() for mask in owned.values()) == [0, 16]
    split = share_out_clusters(merged)
    np.testing.assert_array_equal(split.word_masks["cat"].numpy(), region == 3)
    np.testing.assert_array_equal(split.word_masks["dog"].numpy(), region == 4)
    # A cluster only one word covers, and the background, are left as they were.
    np.testing.assert_array_equal(split.word_masks["bird"].numpy(), region == 1)
    np.testing.assert_array_equal(split.background.numpy(), merged.background.numpy())
    np.testing.assert_array_equal(leak_regions(split)[1].numpy(), region != 4)


def test_cluster_scores_are_mean_normalised_attention():
    result = estimate({2: [1], (4, 5): [3]}, [[2], [4, 5]], ["cat", "dog"])
    # Per word the 4x4 map is 0.8 on its region and 0.05 elsewhere: normalised
    # (m - min) / max gives 0.75/0.8 on its region and 0 elsewhere.
    region, clusters = regions(), result.clusters.numpy()
    for r in range(5):
        cluster = int(clusters[region == r][0])
        want = [0.75 / 0.8 if r == 1 else 0.0, 0.75 / 0.8 if r == 3 else 0.0]
        np.testing.assert_allclose(result.cluster_scores[cluster].numpy(), want, atol=1e-6)


def test_every_cluster_claimed_means_no_background():
    result = estimate({2: [0, 1, 2], 3: [3, 4]}, [[2], [3]], ["cat", "dog"])
    assert result.background is None
    assert None not in result.cluster_owners
    np.testing.assert_array_equal(result.word_masks["dog"].numpy(), regions() >= 3)


def test_weak_attention_stays_background():
    result = estimate({2: [1]}, [[2]], ["cat"], threshold=0.95)
    assert not result.word_masks["cat"].any()
    assert result.background.all()


def test_same_seed_same_clusters():
    # Three clusters for five regions: which regions share a cluster depends on the
    # initialisation, so only the fixed seed makes the result repeatable.
    first = estimate({2: [1]}, [[2]], ["cat"], seed=7, n_clusters=3)
    second = estimate({2: [1]}, [[2]], ["cat"], seed=7, n_clusters=3)
    assert torch.equal(first.clusters, second.clusters)
    assert first.cluster_owners == second.cluster_owners


@pytest.mark.parametrize("cross_res", [16, 3])
def test_cross_attention_at_other_resolutions(cross_res):
    if cross_res == 16:
        # 16 -> 8 averages 2x2 blocks, which recovers the 8x8 layout exactly.
        result = estimate({2: [1]}, [[2]], ["cat"], res=16)
        np.testing.assert_array_equal(result.word_masks["cat"].numpy(), regions() == 1)
    else:
        maps = torch.rand(3, 3, TEXT_LEN, generator=torch.Generator().manual_seed(0))
        result = estimate_background(self_attention(), maps, [[2]], ["cat"])
        assert result.clusters.shape == (RES, RES)
        assert result.cluster_scores.shape == (5, 1)


def test_invalid_inputs():
    with pytest.raises(ValueError):
        estimate_background(torch.ones(10, 10), cross_maps({2: [1]}), [[2]], ["cat"])
    with pytest.raises(DplError):
        estimate({2: [1], 3: [2]}, [[2], [3]], ["cat", "cat"])
    with pytest.raises(DplError):
        estimate({2: [1]}, [[2]], ["cat"], n_clusters=65)


class TestMaskResampling:
    def test_majority_downsample_by_hand(self):
        mask = torch.tensor(
            [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool
        )
        # 2x2 blocks hold 3, 0, 4 and 1 background pixels.
        want = torch.tensor([[True, False], [True, False]])
        assert torch.equal(background_mask_at(mask, 2), want)

    def test_majority_upsample_repeats_pixels(self):
        mask = torch.tensor([[True, False], [False, True]])
        want = mask.repeat_interleave(3, 0).repeat_interleave(3, 1)
        assert torch.equal(background_mask_at(mask, 6), want)

    def test_any_dilates_the_background(self):
        mask = torch.zeros(32, 32, dtype=torch.bool)
        mask[:, :16] = True  # left half is background
        clean = background_mask_at(mask, 16)
        dilated = background_mask_at(mask, 16, mode="any")
        assert clean[:, :8].all() and not clean[:, 8:].any()
        assert (dilated >= clean).all()
        assert dilated[:, 8].all() and not dilated[:, 10:].any()
        assert not background_mask_at(torch.zeros(32, 32, dtype=torch.bool), 16, "any").any()

    def test_unknown_mode(self):
        with pytest.raises(DplError):
            background_mask_at(torch.ones(4, 4, dtype=torch.bool), 2, mode="bicubic")


class TestMaskFiles:
    def test_load_white_is_background(self, tmp_path):
        pixels = np.zeros((64, 64, 3), dtype=np.uint8)
        pixels[:, :32] = 255
        Image.fromarray(pixels).save(tmp_path / "mask.png")
        mask = load_mask_png(tmp_path / "mask.png", 8)
        assert mask.dtype == torch.bool and mask[:, :4].all() and not mask[:, 4:].any()

    def test_unusable_files_are_user_errors(self, tmp_path):
        with pytest.raises(DplError, match="does not exist"):
            load_mask_png(tmp_path / "missing.png", 8)
        (tmp_path / "junk.png").write_bytes(b"not an image")
        with pytest.raises(DplError, match="cannot read"):
            load_mask_png(tmp_path / "junk.png", 8)
        Image.new("L", (64, 64), 255).save(tmp_path / "full.png")
        (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
        with pytest.raises(DplError, match="cannot read"):
            load_mask_png(tmp_path / "cut.png", 8)
        Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
        with pytest.raises(DplError, match="no white"):
            load_mask_png(tmp_path / "black.png", 8)
