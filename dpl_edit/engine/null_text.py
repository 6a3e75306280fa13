"""DDIM inversion and null-text inversion (NTI), the two passes every inversion is built from.

DDIM inversion runs the sampler backwards with the conditional prediction only. Replaying it with
classifier-free guidance (7.5) drifts away from the image, so NTI optimises one unconditional
("null") embedding per step so that each guided step lands on the inverted trajectory.

The null-text loop takes an optional per-step *stage* that runs first at every step and returns
the conditional embedding for that step: Dynamic Prompt Learning plugs in there, updating its
token vectors on the current latent before the null text is fitted to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dpl_edit.engine.attention import CrossAttentionStore, Recorder
from dpl_edit.engine.ddim import Ddim
from dpl_edit.engine.model import LoadedModel
from dpl_edit.engine.settings import NullTextSettings
from dpl_edit.engine.timers import timed


class StepStage(Protocol):
    """Work done at each denoising step before the null text is fitted (DPL's token update).

    Called with the step index, its timestep and the current reconstruction latent (no grad);
    returns the conditional text embedding [1, text_len, dim] to use for this step.
    """

    def __call__(self, step: int, t: int, latent: torch.Tensor) -> torch.Tensor: ...


@torch.no_grad()
def ddim_inversion(
    model: LoadedModel,
    ddim: Ddim,
    latent: torch.Tensor,
    cond: torch.Tensor,
    recorders: Sequence[Recorder] = (),
    progress: bool = True,
) -> torch.Tensor:
    """Conditional-only DDIM inversion; returns all latents [steps + 1, C, h, w], clean first.

    `recorders` see every inversion step (e.g. attention stores for background estimation),
    each step one pure call (`LoadedModel.predict_recorded`), which a CUDA graph can replay.
    """
    latents = [latent]
    for t in tqdm(ddim.timesteps[::-1], desc="DDIM inversion", disable=not progress):
        output = model.predict_recorded(latent, t, cond, recorders)
        latent = ddim.inverse_step(output, t, latent)
        latents.append(latent)
    return torch.cat(latents)


def optimize_null(
    model: LoadedModel,
    ddim: Ddim,
    step: int,
    latent: torch.Tensor,
    target: torch.Tensor,
    cond_output: torch.Tensor,
    null_init: torch.Tensor,
    guidance: float,
    settings: NullTextSettings,
) -> tuple[torch.Tensor, int, float]:
    """Fit the null embedding of one step so the guided DDIM step from `latent` hits `target`.

    `cond_output` is the UNet's conditional output at this step (fixed). Returns the embedding,
    the inner steps taken and the last loss.
    """
    t = ddim.timesteps[step]
    # Optimised in float32 whatever the model's dtype: Adam's epsilon and small steps vanish in
    # float16, which turns the null text into inf/NaN.
    null = null_init.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([null], lr=settings.lr * (1.0 - step / 100.0))
    cond_output, latent32, target = cond_output.float(), latent.float(), target.float()
    loss_value, taken = float("nan"), 0
    for taken in range(1, settings.inner_steps + 1):  # noqa: B007 - `taken` is reported
        uncond_output = model.predict_replayable(latent, t, null.to(model.dtype)).float()
        loss = F.mse_loss(
            ddim.guided_step(uncond_output, cond_output, guidance, t, latent32), target
        )
        optimizer.zero_grad()
        with timed("backward"):
            loss.backward()
        with timed("optimiser"):
            optimizer.step()
        loss_value = loss.item()
        if settings.early_stop is not None:
            if loss_value < settings.early_stop + step * settings.early_stop_slope:
                break
    return null.detach(), taken, loss_value


@dataclass
class NullTextResult:
    """Per step: the fitted null embeddings, inner steps taken and last losses; the
    time-averaged conditional cross-attention [res, res, text_len] of the guided trajectory,
    and that trajectory [steps + 1, C, h, w] itself, noisiest latent first."""

    null_embeddings: torch.Tensor
    attention: torch.Tensor
    inner_steps: list[int]
    losses: list[float]
    trajectory: torch.Tensor


def null_text_inversion(
    model: LoadedModel,
    ddim: Ddim,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
    settings: NullTextSettings,
    stage: StepStage | None = None,
    progress: bool = True,
) -> NullTextResult:
    """NTI over all steps, following the reconstruction latent from the noisiest inverted one.

    Per step: (1) `stage` (if any) returns the step's conditional embedding, (2) the null text is
    optimised against the inverted latent one level down, (3) the latent advances with guidance.
    The conditional cross-attention of step (3)'s trajectory is recorded for the attention grid.
    """
    steps = len(ddim.timesteps)
    store = CrossAttentionStore([model.defaults.cross_attention_res])
    latent, null = latents[-1:], uncond
    nulls, inner_steps, losses, path = [], [], [], [latent]
    # The stage and the null text alternate at every step, so one bar counts both.
    desc = "null-text inversion" if stage is None else "token learning + null-text inversion"
    bar = tqdm(total=steps * settings.inner_steps, desc=desc, disable=not progress)
    for i, t in enumerate(ddim.timesteps):
        step_cond = cond if stage is None else stage(i, t, latent).detach()
        with torch.no_grad():
            cond_output = model.predict_recorded(latent, t, step_cond, [store])
        init = null if settings.warm_start else uncond
        null, taken, loss = optimize_null(
            model, ddim, i, latent, latents[steps - i - 1 : steps - i], cond_output, init,
            guidance, settings,
        )  # fmt: skip
        nulls.append(null[0])
        inner_steps.append(taken)
        losses.append(loss)
        bar.update(settings.inner_steps)
        with torch.no_grad():
            uncond_output = model.predict_replayable(latent, t, null.to(model.dtype))
            latent = ddim.guided_step(uncond_output, cond_output, guidance, t, latent)
        path.append(latent)
    bar.close()
    return NullTextResult(
        torch.stack(nulls),
        store.average(store.resolutions[0])[0],
        inner_steps,
        losses,
        torch.cat(path),
    )
