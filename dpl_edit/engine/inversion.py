"""Inverting a real image (DDIM, NTI or DPL) into an `Inversion`, and replaying it.

`invert` runs DDIM inversion, then (for NTI and DPL) null-text inversion, with DPL's token stage
(`dpl_edit.dpl.stage`) plugged into the null-text loop. The layers only import downwards: the
passes (`null_text`) and DPL's stage know nothing of this module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from dpl_edit.dpl.losses import DplLossConfig
from dpl_edit.dpl.stage import BackgroundSettings, DplPlan
from dpl_edit.engine.artifact import Inversion
from dpl_edit.engine.attention import CrossAttentionStore
from dpl_edit.engine.ddim import Ddim, denoise_step
from dpl_edit.engine.model import LoadedModel
from dpl_edit.engine.null_text import ddim_inversion, null_text_inversion
from dpl_edit.engine.settings import METHODS, InversionSettings, NullTextSettings
from dpl_edit.engine.text import check_prompt, encode_text, step_embeddings, word_spans
from dpl_edit.errors import DplError
from dpl_edit.io.images import image_to_tensor, load_image, prepare_image


def plan_inversion(
    model: LoadedModel,
    prompt: str,
    method: str = InversionSettings.method,
    steps: int = InversionSettings.steps,
    words: Sequence[str] | None = None,
    dpl_config: DplLossConfig | None = None,
    background: BackgroundSettings | None = None,
    bg_mask: str | Path | None = None,
    no_bg: bool = False,
) -> DplPlan | None:
    """Every check `invert` makes before any work, and DPL's plan (None for other methods).

    Separate from `invert` so that a batch can refuse a bad job before the first one runs,
    with exactly the errors `invert` would give.
    """
    if method not in METHODS:
        raise DplError(f"unknown inversion method '{method}' (use {', '.join(METHODS)})")
    train_steps = int(model.scheduler.config.num_train_timesteps)
    if not 1 <= steps <= train_steps:
        raise DplError(f"the number of steps must be between 1 and {train_steps} (the "
                       f"scheduler's), got {steps}")  # fmt: skip
    dpl_options = words or dpl_config or background or bg_mask is not None or no_bg
    if method != "dpl" and dpl_options:
        raise DplError(f"words and background options need method 'dpl', not '{method}'")
    check_prompt(model, prompt)  # a prompt the model cannot take is the first thing to report
    if method != "dpl":
        return None
    return DplPlan.create(model, prompt, words, dpl_config, background, bg_mask, no_bg)


def invert(
    model: LoadedModel,
    image: Image.Image | str | Path,
    prompt: str,
    method: str = InversionSettings.method,
    steps: int = InversionSettings.steps,
    guidance: float = InversionSettings.guidance,
    null_text: NullTextSettings | None = None,
    resize: bool = False,
    progress: bool = True,
    words: Sequence[str] | None = None,
    dpl_config: DplLossConfig | None = None,
    background: BackgroundSettings | None = None,
    bg_mask: str | Path | None = None,
    no_bg: bool = False,
) -> Inversion:
    """Invert a real image (a path or PIL image) under `prompt` with DDIM, NTI or DPL.

    DPL ("dpl") is NTI whose every step first learns the vectors of `words` (default: the
    prompt's words in the model's object list) against attention leakage; `dpl_config` holds its
    losses and optimiser, `background` how the background mask is estimated, `bg_mask` a user's
    mask file (white = background) instead, and `no_bg` turns the background loss off.
    """
    plan = plan_inversion(
        model, prompt, method, steps, words, dpl_config, background, bg_mask, no_bg
    )
    if not math.isfinite(guidance):
        raise DplError(f"the guidance scale must be a finite number, got {guidance}")
    null_text = null_text or NullTextSettings()
    if isinstance(image, Image.Image):
        image = prepare_image(image, model.resolution, resize)
    else:
        image = load_image(image, model.resolution, resize)
    timings: dict[str, float] = {}
    evals: dict[str, int] = {}
    ddim = Ddim(model.scheduler, steps)

    start, evals_before = time.perf_counter(), model.unet_evals
    cond = encode_text(model, [prompt])
    uncond = encode_text(model, [""])
    z0 = model.encode_image(image_to_tensor(image))
    timings["encode"] = time.perf_counter() - start

    start = time.perf_counter()
    store = CrossAttentionStore([model.defaults.cross_attention_res])
    recorders = [store, *(plan.inversion_recorders if plan else [])]
    latents = ddim_inversion(model, ddim, z0, cond, recorders, progress)
    timings["ddim_inversion"] = time.perf_counter() - start
    evals["ddim_inversion"] = model.unet_evals - evals_before

    extras: dict[str, Any] = {}
    dynamic_tokens, trajectory = None, None
    if method == "ddim":
        nulls = uncond.expand(steps, -1, -1)
        attention = store.average(model.defaults.cross_attention_res)[0]
    else:
        stage = None
        if plan is not None:
            stage = plan.token_stage(store.average(model.defaults.cross_attention_res)[0], steps)
            timings["dpl_background"] = plan.seconds
        start, evals_before = time.perf_counter(), model.unet_evals
        result = null_text_inversion(
            model, ddim, latents, cond, uncond, guidance, null_text, stage, progress
        )
        timings["null_text"] = time.perf_counter() - start
        evals["null_text"] = model.unet_evals - evals_before
        nulls, attention = result.null_embeddings, result.attention
        trajectory = result.trajectory.float().cpu()
        extras.update(null_inner_steps=result.inner_steps, null_losses=result.losses)
        if stage is not None:
            # The token stage ran inside the null-text loop: report the two apart.
            timings["null_text"] -= stage.seconds
            evals["null_text"] -= stage.unet_evals
            timings["dpl_tokens"] = stage.seconds
            evals["dpl_tokens"] = stage.unet_evals
            dynamic_tokens = stage.dynamic_tokens()
            extras.update(plan.masks, dpl_trace=stage.trace)

    settings = {
        "steps": steps,
        "guidance": guidance,
        "resolution": model.resolution,
        "resize": resize,
        "cross_attention_res": model.defaults.cross_attention_res,
        "dtype": str(model.dtype).removeprefix("torch."),
        "null_text": asdict(null_text) if method != "ddim" else None,
        "dpl": plan.settings() if plan else None,
    }
    return Inversion(
        prompt=prompt,
        method=method,
        model_identity=model.identity,
        latents=latents.float().cpu(),
        null_embeddings=nulls.float().cpu().contiguous(),
        attention=attention.float().cpu(),
        words=word_spans(model.tokenizer, prompt),
        image=image,
        settings=settings,
        timings=timings,
        unet_evals=evals,
        dynamic_tokens=dynamic_tokens,
        extras=extras,
        trajectory=trajectory,
    )


@torch.no_grad()
def reconstruct(
    model: LoadedModel, inversion: Inversion, progress: bool = False
) -> tuple[torch.Tensor, Image.Image]:
    """Replay the inversion with guidance: the final latent [1, C, h, w] and the decoded image."""
    ddim = Ddim(model.scheduler, inversion.steps)
    latent = inversion.latents[-1:].to(model.device, model.dtype)
    cache: dict[str, torch.Tensor] = {}
    for i, t in enumerate(tqdm(ddim.timesteps, desc="reconstruction", disable=not progress)):
        cond = step_embeddings(model, [inversion.prompt], inversion.dynamic_tokens, i, cache)
        null = inversion.null_embeddings[i : i + 1].to(model.device, model.dtype)
        latent = denoise_step(model, ddim, latent, t, null, cond, inversion.guidance)
    return latent, model.decode_latents(latent)[0]


@torch.no_grad()
def reconstruction_image(model: LoadedModel, inversion: Inversion) -> Image.Image:
    """The inversion's reconstruction of its image: the end of the stored guided path, decoded,
    or (for DDIM inversions and older folders, which store none) a replay with `reconstruct`."""
    if inversion.trajectory is None:
        return reconstruct(model, inversion)[1]
    return model.decode_latents(inversion.trajectory[-1:].to(model.device, model.dtype))[0]
