"""Prompt-to-Prompt attention controllers and local blending.

The edit runs source and target together in one batch, [null_src, null_tgt, cond_src, cond_tgt]
(any batch whose second half is [cond_src, cond_tgt...] works). Only the conditional half is
touched: the target's cross-attention is replaced by the source's (through a token mapping) for
the chosen steps and tokens, and its self-attention by the source's for the first steps, which
keeps the layout while the new words change the content.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpl_edit.engine.attention import AttentionController, AttnLayer, CrossAttentionStore


class AttentionEdit(AttentionController):
    """Base edit: subclasses say how source cross-attention becomes the target's.

    `cross_alpha[step, j]` is 1 where target token j takes the injected map at that step and 0
    where it keeps its own (P2P's per-word cross-replace windows). Self-attention is copied from
    the source for steps in [self_steps[0], self_steps[1]) in layers of side <= `self_max_res`.
    """

    def __init__(
        self, cross_alpha: torch.Tensor, self_steps: tuple[int, int], self_max_res: int
    ) -> None:
        self.cross_alpha = cross_alpha
        self.self_steps = self_steps
        self.self_max_res = self_max_res

    def inject(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Source maps [heads, queries, tokens] -> maps for the targets [n, heads, queries, tokens]."""
        raise NotImplementedError

    def wants(self, layer: AttnLayer) -> bool:
        return layer.is_cross or layer.res <= self.self_max_res

    def __call__(self, probs: torch.Tensor, layer: AttnLayer) -> torch.Tensor:
        half = probs.shape[0] // 2
        source, target = probs[half], probs[half + 1 :]
        if layer.is_cross:
            alpha = self.cross_alpha[self.step].to(probs)
            if not alpha.any():
                return probs
            edited = self.inject(source, target) * alpha + target * (1 - alpha)
        elif self.self_steps[0] <= self.step < self.self_steps[1]:
            edited = source.expand_as(target)
        else:
            return probs
        return torch.cat([probs[: half + 1], edited])


class AttentionReplace(AttentionEdit):
    """Word swap: target token j gets sum_i source_i * mapper[i, j]."""

    def __init__(self, mapper: torch.Tensor, **windows) -> None:
        super().__init__(**windows)
        self.mapper = mapper

    def inject(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mapped = torch.einsum("hqs,st->hqt", source, self.mapper.to(source))
        return mapped.expand_as(target)


class AttentionRefine(AttentionEdit):
    """Refinement: aligned target tokens take their source token's map, inserted ones keep theirs."""

    def __init__(self, mapper: torch.Tensor, alphas: torch.Tensor, **windows) -> None:
        super().__init__(**windows)
        self.mapper = mapper.clamp(min=0)  # inserted tokens (-1) have alpha 0: any index will do
        self.alphas = alphas

    def inject(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        alphas = self.alphas.to(source)
        return source[..., self.mapper.to(source.device)] * alphas + target * (1 - alphas)


class AttentionReweight(AttentionEdit):
    """Re-weighting: scale chosen target tokens' injected maps (after an optional swap/refine)."""

    def __init__(self, scales: torch.Tensor, base: AttentionEdit | None = None, **windows) -> None:
        super().__init__(**windows)
        self.scales = scales
        self.base = base

    def inject(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        injected = source if self.base is None else self.base.inject(source, target)
        return injected * self.scales.to(source)


class LocalBlend:
    """P2P's local blending: outside the edited words' attention, keep the source latent.

    The mask comes from the time-averaged cross-attention of the words (source words on the
    source row, target words on the target row) at one resolution: 3x3 max-pool, nearest resize
    to the latent, divide by the maximum, threshold; the union of both rows' masks is edited.
    """

    def __init__(
        self,
        store: CrossAttentionStore,
        res: int,
        source_positions: list[int],
        target_positions: list[int],
        start_step: int,
        threshold: float = 0.3,
    ) -> None:
        self.store = store
        self.res = res
        self.positions = (source_positions, target_positions)
        self.start_step = start_step
        self.threshold = threshold

    def mask(self, size: int) -> torch.Tensor:
        """Current mask [1, 1, size, size] (1 where the target may differ from the source)."""
        maps = self.store.average(self.res)  # [2, res, res, tokens]: source row, target row
        word_maps = torch.stack(
            [maps[row, ..., positions].sum(-1) for row, positions in enumerate(self.positions)]
        ).unsqueeze(1)
        pooled = F.max_pool2d(word_maps, kernel_size=3, stride=1, padding=1)
        resized = F.interpolate(pooled, size=(size, size), mode="nearest")
        peak = resized.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        masks = (resized / peak) > self.threshold
        return (masks[:1] | masks[1:2]).float()

    def __call__(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        """Blend latents [source, target...] after the DDIM step of `step`."""
        if step < self.start_step:
            return latents
        mask = self.mask(latents.shape[-1]).to(latents)
        return torch.cat([latents[:1], latents[:1] + mask * (latents[1:] - latents[:1])])
