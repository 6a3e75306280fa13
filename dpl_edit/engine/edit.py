"""Prompt-to-Prompt editing of an inverted real image, without inverting again.

The source and target branches run side by side in one UNet call per step, batch
[null_src, null_tgt, cond_src, cond_tgt], both starting from the inverted noise and both using the
inversion's per-step null texts (and, after DPL, its per-step word vectors). The source branch is
therefore exactly the reconstruction, and the attention controllers carry its layout over to the
target branch.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from dpl_edit.engine.align import refinement_mapper, replacement_mapper
from dpl_edit.engine.artifact import Inversion
from dpl_edit.engine.attention import (
    AttentionController,
    CrossAttentionStore,
    attention_levels,
    controlled_attention,
)
from dpl_edit.engine.ddim import Ddim, denoise_beside_source, denoise_step
from dpl_edit.engine.model import LoadedModel
from dpl_edit.engine.p2p import (
    AttentionEdit,
    AttentionRefine,
    AttentionReplace,
    AttentionReweight,
    LocalBlend,
)
from dpl_edit.engine.settings import MODES, TARGET_TOKENS, EditSettings, TargetTokens
from dpl_edit.engine.text import (
    check_prompt,
    encode_text,
    find_word,
    step_embeddings,
    word_token_positions,
)
from dpl_edit.errors import DplError
from dpl_edit.io.images import save_image

Window = float | tuple[float, float]


@dataclass
class EditResult:
    """The edited image, the source branch (the reconstruction) and what the edit saw."""

    image: Image.Image
    source: Image.Image
    source_prompt: str
    target_prompt: str
    attention: torch.Tensor
    """[2, res, res, text_len]: time-averaged cross-attention of the source and target branch."""
    blend_mask: torch.Tensor | None
    """[1, 1, h, w] latent-resolution mask of the local blend at the last step, if blending."""
    latents: torch.Tensor
    """[2, C, h, w]: final latents of the source and target branch."""
    timings: dict[str, float] = field(default_factory=dict)
    unet_evals: dict[str, int] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the edited image atomically, as PNG or JPEG by the extension."""
        return save_image(self.image, path)


def _window_steps(window: Window, steps: int) -> tuple[int, int]:
    """P2P's step window: a fraction f means steps [0, f*steps), a pair (a, b) [a*steps, b*steps)."""
    start, end = (0.0, window) if isinstance(window, int | float) else window
    if not 0.0 <= start <= end <= 1.0:
        raise DplError(f"step fractions must satisfy 0 <= start <= end <= 1, got {window}")
    return int(start * steps), int(end * steps)


def cross_replace_alpha(
    cross_replace_steps: Window | Mapping[str, Window],
    target: str,
    tokenizer,
    steps: int,
    text_len: int,
) -> torch.Tensor:
    """[steps, text_len]: 1 where target token j takes injected attention at a step.

    A mapping gives per-word windows (words of the target prompt) and "default_" for the rest.
    """
    windows = (
        dict(cross_replace_steps)
        if isinstance(cross_replace_steps, Mapping)
        else {"default_": cross_replace_steps}
    )
    alpha = torch.zeros(steps, text_len)
    start, end = _window_steps(windows.pop("default_", 1.0), steps)
    alpha[start:end] = 1.0
    for word, window in windows.items():
        positions = word_token_positions(tokenizer, target, word)
        start, end = _window_steps(window, steps)
        alpha[:, positions] = 0.0
        alpha[start:end, positions] = 1.0
    return alpha


def _build_controller(
    model: LoadedModel,
    source: str,
    target: str,
    mode: str,
    reweight: Mapping[str, float],
    windows: dict,
) -> AttentionEdit:
    tokenizer, text_len = model.tokenizer, model.text_len
    if mode == "replace":
        mapper = replacement_mapper(source, target, tokenizer, text_len)
        controller: AttentionEdit = AttentionReplace(mapper, **windows)
    elif mode == "refine":
        mapper, alphas = refinement_mapper(source, target, tokenizer, text_len)
        controller = AttentionRefine(mapper, alphas, **windows)
    else:
        raise DplError(f"unknown edit mode '{mode}' (use {', '.join(MODES)})")
    if reweight:
        scales = torch.ones(text_len)
        for word, scale in reweight.items():
            scales[word_token_positions(tokenizer, target, word)] = float(scale)
        controller = AttentionReweight(scales, base=controller, **windows)
    return controller


def _blend(
    model: LoadedModel,
    store: CrossAttentionStore,
    source: str,
    target: str,
    words: Sequence[str],
    steps: int,
    start: float,
    threshold: float,
    res: int,
) -> LocalBlend:
    source_positions, target_positions = [], []
    for word in words:
        in_source = find_word(model.tokenizer, source, word)
        in_target = find_word(model.tokenizer, target, word)
        if not in_source and not in_target:
            raise DplError(f"blend word '{word}' is in neither '{source}' nor '{target}'")
        source_positions += in_source
        target_positions += in_target
    return LocalBlend(
        store,
        res,
        source_positions,
        target_positions,
        start_step=int(start * steps),
        threshold=threshold,
    )


@dataclass(frozen=True)
class EditPlan:
    """The attention controllers of one edit: what `edit` hooks into the UNet."""

    store: CrossAttentionStore
    controller: AttentionEdit
    local_blend: LocalBlend | None


def plan_edit(
    model: LoadedModel,
    source: str,
    target: str,
    steps: int,
    mode: str = EditSettings.mode,
    reweight: Mapping[str, float] | None = None,
    blend: Sequence[str] | None = None,
    cross_replace_steps: Window | Mapping[str, Window] = EditSettings.cross_replace_steps,
    self_replace_steps: Window = EditSettings.self_replace_steps,
    self_replace_max_res: int | None = None,
    blend_threshold: float = EditSettings.blend_threshold,
    blend_start: float = EditSettings.blend_start,
    blend_res: int | None = EditSettings.blend_res,
) -> EditPlan:
    """Check an edit of `source` into `target` and build its controllers, before any UNet work.

    `edit` runs it first; a batch runs it for every edit of every job before the first job, so
    a bad edit is refused up front with exactly the error `edit` would give.
    """
    check_prompt(model, target)
    windows = {
        "cross_alpha": cross_replace_alpha(
            cross_replace_steps, target, model.tokenizer, steps, model.text_len
        ),
        "self_steps": _window_steps(self_replace_steps, steps),
        "self_max_res": self_replace_max_res or model.latent_size // 2,
    }
    controller = _build_controller(model, source, target, mode, reweight or {}, windows)
    if blend_res is None:
        blend_res = model.defaults.blend_res  # checked against the UNet when the model loaded
    else:
        levels = attention_levels(model.unet, cross=True)
        if blend_res not in levels:
            have = ", ".join(f"{r}x{r}" for r in levels)
            raise DplError(
                f"blend resolution {blend_res}: this model has cross-attention at {have}"
            )
    resolutions = [model.defaults.cross_attention_res, blend_res]
    store = CrossAttentionStore(resolutions, rows="conditional")
    local_blend = None
    if blend:
        local_blend = _blend(
            model, store, source, target, blend, steps, blend_start, blend_threshold, blend_res
        )
    return EditPlan(store, controller, local_blend)


def _edit_embeddings(
    model: LoadedModel,
    source: str,
    target: str,
    inversion: Inversion,
    target_tokens: TargetTokens,
    step: int,
    cache: dict[str, torch.Tensor],
) -> torch.Tensor:
    """[2, L, D] conditional embeddings of source and target at a step of the edit."""
    dynamic = inversion.dynamic_tokens
    if target_tokens == "learned" or dynamic is None:
        return step_embeddings(model, [source, target], dynamic, step, cache)
    if "target" not in cache:
        cache["target"] = encode_text(model, [target])
    source_row = step_embeddings(model, [source], dynamic, step, cache)
    return torch.cat([source_row, cache["target"]])


@torch.no_grad()
def edit(
    model: LoadedModel,
    inversion: Inversion,
    target: str,
    mode: str = EditSettings.mode,
    reweight: Mapping[str, float] | None = None,
    blend: Sequence[str] | None = None,
    cross_replace_steps: Window | Mapping[str, Window] = EditSettings.cross_replace_steps,
    self_replace_steps: Window = EditSettings.self_replace_steps,
    self_replace_max_res: int | None = None,
    blend_threshold: float = EditSettings.blend_threshold,
    blend_start: float = EditSettings.blend_start,
    guidance: float | None = None,
    progress: bool = True,
    target_tokens: TargetTokens = EditSettings.target_tokens,
    blend_res: int | None = EditSettings.blend_res,
) -> EditResult:
    """Edit the inverted image towards `target` with Prompt-to-Prompt.

    `reweight` scales target words' attention; `blend` words restrict the change to where they
    attend. Self-attention is injected in layers of side <= `self_replace_max_res` (default half
    the latent size, as in the null-text paper's notebook: 32 for SD's 64x64 latents).
    `guidance` defaults to the inversion's, the scale its null texts were fitted for.
    `target_tokens` says whether the target prompt reads DPL's learned word vectors too
    (`engine.settings.TargetTokens`).
    """
    if target_tokens not in TARGET_TOKENS:
        raise DplError(
            f"unknown target tokens {target_tokens!r}; choose one of {', '.join(TARGET_TOKENS)}"
        )
    inversion.check_model(model)
    source, steps = inversion.prompt, inversion.steps
    guidance = inversion.guidance if guidance is None else guidance
    if not math.isfinite(guidance):
        raise DplError(f"the guidance scale must be a finite number, got {guidance}")
    start_time, evals_before = time.perf_counter(), model.unet_evals
    plan = plan_edit(
        model,
        source,
        target,
        steps,
        mode,
        reweight,
        blend,
        cross_replace_steps,
        self_replace_steps,
        self_replace_max_res,
        blend_threshold,
        blend_start,
        blend_res,
    )
    store, local_blend = plan.store, plan.local_blend
    # The store comes first so it records each branch's own maps, before the edit rewrites them.
    controllers: list[AttentionController] = [store, plan.controller]

    ddim = Ddim(model.scheduler, steps)
    latents = inversion.latents[-1:].to(model.device, model.dtype).expand(2, -1, -1, -1)
    # At the inversion's own guidance the source branch retraces the stored path, so only the
    # source's attention (its conditional pass) is computed, not its unconditional one.
    path = inversion.trajectory if guidance == inversion.guidance else None
    if path is not None:
        path = path.to(model.device, model.dtype)
    cache: dict[str, torch.Tensor] = {}
    with controlled_attention(model.unet, controllers) as chain:
        for i, t in enumerate(tqdm(ddim.timesteps, desc="editing", disable=not progress)):
            cond = _edit_embeddings(model, source, target, inversion, target_tokens, i, cache)
            null = inversion.null_embeddings[i : i + 1].to(model.device, model.dtype)
            chain.begin_step(i)
            if path is None:
                latents = denoise_step(model, ddim, latents, t, null, cond, guidance)
            else:
                targets = denoise_beside_source(
                    model, ddim, path[i : i + 1], latents[1:], t, null, cond, guidance
                )
                latents = torch.cat([path[i + 1 : i + 2], targets])
            chain.end_step()
            if local_blend is not None:
                latents = local_blend(latents, i)
    source_image, edited_image = model.decode_latents(latents)
    return EditResult(
        image=edited_image,
        source=source_image,
        source_prompt=source,
        target_prompt=target,
        attention=store.average(model.defaults.cross_attention_res).cpu(),
        blend_mask=None if local_blend is None else local_blend.mask(model.latent_size).cpu(),
        latents=latents.float().cpu(),
        timings={"edit": time.perf_counter() - start_time},
        unet_evals={"edit": model.unet_evals - evals_before},
    )
