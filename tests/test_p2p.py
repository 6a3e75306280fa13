"""P2P controllers on synthetic attention: replace copies, refine aligns, reweight scales, blend masks."""

from __future__ import annotations

import torch

from dpl_edit.engine.attention import AttnLayer, CrossAttentionStore
from dpl_edit.engine.p2p import AttentionRefine, AttentionReplace, AttentionReweight, LocalBlend

TOKENS, STEPS = 6, 10
CROSS = AttnLayer("x.attn2", is_cross=True, res=4, heads=2)
SELF = AttnLayer("x.attn1", is_cross=False, res=4, heads=2)


def _probs(seed: int = 0, keys: int = TOKENS) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, 2, 16, keys, generator=g).softmax(-1)  # [null_s, null_t, cond_s, cond_t]


def _windows(cross_steps: int = 8, self_steps: int = 5, tokens: int = TOKENS) -> dict:
    alpha = torch.zeros(STEPS, tokens)
    alpha[:cross_steps] = 1.0
    return {"cross_alpha": alpha, "self_steps": (0, self_steps), "self_max_res": 4}


def test_replace_copies_source_maps_through_the_mapper():
    probs = _probs()
    mapper = torch.eye(TOKENS)
    mapper[3, 3], mapper[3, 4], mapper[4, 4] = 0.5, 0.5, 0.0  # source token 3 feeds target 3 and 4
    controller = AttentionReplace(mapper, **_windows())
    controller.begin_step(0)
    out = controller(probs, CROSS)
    torch.testing.assert_close(out[:3], probs[:3])  # unconditional rows and source untouched
    expected = probs[2] @ mapper
    torch.testing.assert_close(out[3], expected)
    controller.begin_step(8)  # outside the cross-replace window: the target keeps its own maps
    torch.testing.assert_close(controller(probs, CROSS), probs)


def test_per_token_windows_mix_own_and_injected_maps():
    probs = _probs()
    windows = _windows()
    windows["cross_alpha"][:, 2] = 0.0  # token 2 never injected
    controller = AttentionReplace(torch.eye(TOKENS), **windows)
    out = controller(probs, CROSS)
    torch.testing.assert_close(out[3, ..., 2], probs[3, ..., 2])
    torch.testing.assert_close(out[3, ..., 3], probs[2, ..., 3])


def test_self_attention_copied_only_in_its_window_and_small_layers():
    probs = _probs(keys=16)
    controller = AttentionReplace(torch.eye(TOKENS), **_windows())
    controller.begin_step(4)
    torch.testing.assert_close(controller(probs, SELF)[3], probs[2])
    controller.begin_step(5)
    torch.testing.assert_close(controller(probs, SELF), probs)
    assert not controller.wants(AttnLayer("big.attn1", is_cross=False, res=8, heads=2))


def test_refine_takes_aligned_tokens_from_source():
    probs = _probs()
    mapper = torch.tensor([0, 1, -1, 2, 3, 5])
    alphas = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    out = AttentionRefine(mapper, alphas, **_windows())(probs, CROSS)
    torch.testing.assert_close(out[3, ..., 2], probs[3, ..., 2])  # inserted: its own map
    torch.testing.assert_close(out[3, ..., 3], probs[2, ..., 2])
    torch.testing.assert_close(out[3, ..., 5], probs[2, ..., 5])


def test_reweight_scales_chosen_tokens():
    probs = _probs()
    scales = torch.ones(TOKENS)
    scales[4] = 3.0
    plain = AttentionReweight(scales, **_windows())(probs, CROSS)
    torch.testing.assert_close(plain[3, ..., 4], 3.0 * probs[2, ..., 4])
    torch.testing.assert_close(plain[3, ..., :4], probs[2, ..., :4])
    mapper = torch.eye(TOKENS)[[1, 0, 2, 3, 4, 5]]  # source 0 -> target 1 and back
    base = AttentionReplace(mapper, **_windows())
    on_swap = AttentionReweight(scales, base=base, **_windows())(probs, CROSS)
    torch.testing.assert_close(on_swap[3, ..., 1], probs[2, ..., 0])
    torch.testing.assert_close(on_swap[3, ..., 4], 3.0 * probs[2, ..., 4])


def test_local_blend_mask_and_blending():
    store = CrossAttentionStore([4], rows=[2, 3])
    maps = torch.full((4, 2, 16, TOKENS), 0.01)
    maps[2, :, 0, 1] = 1.0  # source word (token 1) attends to the top-left cell
    maps[3, :, 15, 2] = 1.0  # target word (token 2) attends to the bottom-right cell
    store(maps, CROSS)
    store.end_step()
    blend = LocalBlend(store, 4, [1], [2], start_step=2, threshold=0.3)
    mask = blend.mask(8)[0, 0]
    expected = torch.zeros(8, 8)
    expected[:4, :4] = 1.0  # 3x3 max-pool spreads the top-left cell to 2x2, nearest x2 -> 4x4
    expected[4:, 4:] = 1.0
    torch.testing.assert_close(mask, expected)
    latents = torch.stack([torch.zeros(4, 8, 8), torch.ones(4, 8, 8)])
    torch.testing.assert_close(blend(latents, 1), latents)  # before the start step
    blended = blend(latents, 2)
    torch.testing.assert_close(blended[0], latents[0])
    torch.testing.assert_close(blended[1], expected.expand(4, 8, 8))
