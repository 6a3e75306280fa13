"""DDIM algebra: timesteps, inverse/forward steps, v-prediction conversion."""

from __future__ import annotations

import pytest
import torch

from dpl_edit.engine.ddim import Ddim
from dpl_edit.engine.model import sd_ddim_scheduler


def test_sd_timesteps():
    ddim = Ddim(sd_ddim_scheduler(), 50)
    assert ddim.timesteps[0] == 981 and ddim.timesteps[-1] == 1 and len(ddim.timesteps) == 50
    assert ddim.stride == 20
    assert ddim.alpha(-19) == pytest.approx(float(sd_ddim_scheduler().alphas_cumprod[0]))


def test_inverse_then_forward_step_returns_the_latent():
    ddim = Ddim(sd_ddim_scheduler(), 50)
    g = torch.Generator().manual_seed(0)
    latent, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for t in (1, 481, 981):
        noisier = ddim.inverse_step(eps, t, latent)
        assert not torch.allclose(noisier, latent)
        torch.testing.assert_close(ddim.step(eps, t, noisier), latent, rtol=1e-4, atol=1e-4)


def test_forward_step_matches_diffusers():
    scheduler = sd_ddim_scheduler()
    ddim = Ddim(scheduler, 50)
    g = torch.Generator().manual_seed(1)
    latent, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for t in (981, 501, 1):
        expected = scheduler.step(eps, t, latent, eta=0.0).prev_sample
        torch.testing.assert_close(ddim.step(eps, t, latent), expected, rtol=1e-5, atol=1e-5)


def test_v_prediction_is_converted_to_eps_and_x0():
    ddim = Ddim(sd_ddim_scheduler("v_prediction"), 50)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = 481
    a = float(ddim.alphas_cumprod[t])
    latent = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    v = a**0.5 * eps - (1 - a) ** 0.5 * x0
    got_eps, got_x0 = ddim.split(v, latent, t)
    torch.testing.assert_close(got_eps, eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x0, x0, rtol=1e-5, atol=1e-5)
    # A v-model's step lands where an epsilon-model with the same eps lands.
    eps_ddim = Ddim(sd_ddim_scheduler(), 50)
    torch.testing.assert_close(ddim.step(v, t, latent), eps_ddim.step(eps, t, latent))
