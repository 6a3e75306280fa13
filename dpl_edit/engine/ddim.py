"""Deterministic DDIM steps in both directions, straight from the scheduler's alphas_cumprod.

Inversion needs the *inverse* step (clean -> noisy), which diffusers' DDIMScheduler lacks, and the
null-text loop needs the forward step to be differentiable; both are a few lines of algebra, so we
write them once here for epsilon and v-prediction models alike.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from dpl_edit.engine.model import LoadedModel


class Ddim:
    """The `steps` DDIM timesteps of a scheduler (981, 961, ..., 1 for 50) and their steps."""

    def __init__(self, scheduler: DDIMScheduler, steps: int) -> None:
        scheduler.set_timesteps(steps)
        self.timesteps: list[int] = [int(t) for t in scheduler.timesteps]
        self.stride = scheduler.config.num_train_timesteps // steps
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        # alpha-bar past the last step: the first one for SD (set_alpha_to_one=False), else 1.
        self.final_alpha = float(scheduler.final_alpha_cumprod)
        self.prediction_type: str = scheduler.config.prediction_type

    def alpha(self, t: int) -> float:
        """alpha-bar at train timestep t; below zero is the final ("clean") level."""
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha

    def split(
        self, output: torch.Tensor, latent: torch.Tensor, t: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(epsilon, x0) from a UNet output evaluated at timestep t on `latent`.

        v-prediction is converted with alpha-bar of t, the level the network was told it is at.
        """
        a = self.alpha(t)
        if self.prediction_type == "v_prediction":
            eps = a**0.5 * output + (1 - a) ** 0.5 * latent
            x0 = a**0.5 * latent - (1 - a) ** 0.5 * output
            return eps, x0
        return output, (latent - (1 - a) ** 0.5 * output) / a**0.5

    @staticmethod
    def _move(eps: torch.Tensor, x0: torch.Tensor, a_to: float) -> torch.Tensor:
        return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps

    def step(self, output: torch.Tensor, t: int, latent: torch.Tensor) -> torch.Tensor:
        """Denoise from level t to t - stride (eta = 0)."""
        eps, x0 = self.split(output, latent, t)
        return self._move(eps, x0, self.alpha(t - self.stride))

    def guided_step(
        self,
        uncond_output: torch.Tensor,
        cond_output: torch.Tensor,
        guidance: float,
        t: int,
        latent: torch.Tensor,
    ) -> torch.Tensor:
        """Classifier-free guidance, then `step`: the one guided step that sampling, null-text
        fitting, reconstruction and editing all take, so they cannot drift apart."""
        return self.step(uncond_output + guidance * (cond_output - uncond_output), t, latent)

    def inverse_step(self, output: torch.Tensor, t: int, latent: torch.Tensor) -> torch.Tensor:
        """Noise from level t - stride to t, with the UNet output evaluated at t (as NTI does)."""
        a_from = self.alpha(t - self.stride)
        if self.prediction_type == "v_prediction":
            eps, _ = self.split(output, latent, t)
        else:
            eps = output
        x0 = (latent - (1 - a_from) ** 0.5 * eps) / a_from**0.5
        return self._move(eps, x0, self.alpha(t))


def denoise_step(
    model: LoadedModel,
    ddim: Ddim,
    latents: torch.Tensor,
    t: int,
    null: torch.Tensor,
    cond: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """One guided DDIM step for a batch of latents, in a single UNet call on [null..., cond...].

    `null` [1 or n, text_len, dim] is shared by every latent when it has one row; `cond` has one
    row per latent. Attention controllers see the batch in that order.
    """
    n = latents.shape[0]
    context = torch.cat([null.expand(n, -1, -1), cond])
    uncond_output, cond_output = model.predict(torch.cat([latents, latents]), t, context).chunk(2)
    return ddim.guided_step(uncond_output, cond_output, guidance, t, latents)


def denoise_beside_source(
    model: LoadedModel,
    ddim: Ddim,
    source: torch.Tensor,
    targets: torch.Tensor,
    t: int,
    null: torch.Tensor,
    cond: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """One guided DDIM step for `targets` [n, C, h, w] when the source's own step is known.

    A single UNet call on [targets with null..., source with cond[0], targets with cond[1:]]:
    the source's conditional pass stays because its attention maps drive a Prompt-to-Prompt
    edit, but its unconditional pass, needed only to move the source, is skipped. The
    conditional rows are again the batch's second half from the source on, the layout the
    edit controllers read. Returns the targets' next latents.
    """
    n = targets.shape[0]
    context = torch.cat([null.expand(n, -1, -1), cond])
    output = model.predict(torch.cat([targets, source, targets]), t, context)
    return ddim.guided_step(output[:n], output[n + 1 :], guidance, t, targets)
