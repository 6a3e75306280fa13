"""Training phase 1, the VAE, and phase 3, fine-tuning its decoder (resumable checkpoints).

The VAE (AutoencoderKL, downsampling 4, 4 latent channels) is fully convolutional (no mid
attention), so it trains on random 32x32 crops, four times cheaper than full scenes. Decoder
fine-tuning runs on full scenes with the encoder frozen: the latents do not move, so the UNet
stays valid and reconstruction can keep improving in a later run.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from tqdm import tqdm

from dpl_edit.io.images import tensor_to_arrays
from dpl_edit.metrics import psnr
from dpl_edit.world.synthetic import SIZE
from dpl_edit.world.training.data import (
    TRAIN_SEED_OFFSET,
    TrainConfig,
    load_optimizer,
    load_prefixed,
    optimizer_tensors,
    prefixed,
    save_state,
    scene_batch,
    steps_done,
)


def train_vae(cfg: TrainConfig, vae: AutoencoderKL, run: Path) -> float:
    """Train the VAE on random crops; returns held-out PSNR (dB) on full scenes."""
    ckpt = run / "vae.safetensors"
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    step = _resume_vae(ckpt, vae, opt)
    held_out, _, _ = scene_batch(cfg.seed, 0, 64, vae.device)
    gen = torch.Generator().manual_seed(cfg.seed + step)
    bar = tqdm(range(step, cfg.vae_steps), desc="vae", initial=step, total=cfg.vae_steps)
    score = float("nan")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        start = TRAIN_SEED_OFFSET + step * cfg.batch_size
        images, _, _ = scene_batch(cfg.seed, start, cfg.batch_size, vae.device)
        c = cfg.vae_crop
        ox, oy = (int(v) for v in torch.randint(0, SIZE - c + 1, (2,), generator=gen))
        crops = images[:, :, oy : oy + c, ox : ox + c]
        posterior = vae.encode(crops).latent_dist
        sample = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=gen
        ).to(vae.device)
        recon = vae.decode(sample).sample
        loss = (
            F.mse_loss(recon, crops) + 0.1 * F.l1_loss(recon, crops) + 1e-6 * posterior.kl().mean()
        )
        _update(opt, loss, bar)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.vae_steps:
            score = _vae_checkpoint("vae", ckpt, vae, opt, held_out, done, cfg)
    return vae_psnr(vae, held_out) if math.isnan(score) else score


def _update(opt: torch.optim.Optimizer, loss: torch.Tensor, bar: tqdm) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    bar.set_postfix(loss=f"{loss.item():.4f}")


def _resume_vae(ckpt: Path, vae: AutoencoderKL, opt: torch.optim.Optimizer) -> int:
    """Load a VAE checkpoint written by `_vae_checkpoint`, if any; returns the steps done."""
    if not ckpt.exists():
        return 0
    tensors = load_file(str(ckpt))
    load_prefixed(vae, tensors, "vae")
    load_optimizer(opt, tensors, "opt")
    return steps_done(ckpt)


def _vae_checkpoint(phase, ckpt, vae, opt, held_out, done: int, cfg: TrainConfig) -> float:
    """Measure held-out PSNR and save the VAE and its optimiser; returns the PSNR."""
    score = vae_psnr(vae, held_out)
    tqdm.write(f"{phase} step {done}: held-out PSNR {score:.2f} dB")
    meta = {"step": done, "psnr": score, "config": asdict(cfg)}
    save_state(ckpt, {**prefixed("vae", vae), **optimizer_tensors(opt, "opt")}, meta)
    return score


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean PSNR (dB) of encode -> decode over a [-1, 1] batch, as 8-bit pictures: the
    definition of the VAE quality gate (`dpl_edit.metrics.psnr`), so the two agree."""
    recon = vae.decode(vae.encode(images).latent_dist.mean).sample
    pairs = zip(tensor_to_arrays(recon), tensor_to_arrays(images), strict=True)
    return float(np.mean([psnr(a, b) for a, b in pairs]))


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, cfg: TrainConfig) -> float:
    """SD's scaling factor: 1 / std of the latents, so the UNet sees unit-variance inputs."""
    images, _, _ = scene_batch(cfg.seed, 10_000, 256, vae.device)
    return float(1.0 / vae.encode(images).latent_dist.mean.std())


def train_decoder(cfg: TrainConfig, vae: AutoencoderKL, run: Path) -> float:
    """Fine-tune the VAE decoder with the encoder frozen; returns held-out PSNR (dB)."""
    ckpt = run / "decoder.safetensors"
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.decoder_lr)
    step = _resume_vae(ckpt, vae, opt)
    held_out, _, _ = scene_batch(cfg.seed, 0, 64, vae.device)
    score = float("nan")
    bar = tqdm(
        range(step, cfg.decoder_steps), desc="decoder", initial=step, total=cfg.decoder_steps
    )
    for step in bar:
        start = TRAIN_SEED_OFFSET + 7 * 10**6 + step * cfg.batch_size
        images, _, _ = scene_batch(cfg.seed, start, cfg.batch_size, vae.device)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean
        # Whole scenes, not crops: GroupNorm statistics of a crop differ from the full image's.
        recon = vae.decode(latents).sample
        loss = F.mse_loss(recon, images) + 0.1 * F.l1_loss(recon, images)
        _update(opt, loss, bar)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.decoder_steps:
            score = _vae_checkpoint("decoder", ckpt, vae, opt, held_out, done, cfg)
    return score
