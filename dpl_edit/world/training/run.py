"""Train the bundled model: a small Stable-Diffusion-format pipeline on the synthetic world.

Two phases, both resumable from checkpoints in the run folder:

1. VAE (AutoencoderKL, downsampling 4, 4 latent channels). It is fully convolutional (no mid
   attention), so it trains on random 32x32 crops, four times cheaper than full scenes.
2. UNet + a one-layer CLIP text encoder, jointly, on the frozen VAE's latents (16x16), with
   classifier-free-guidance dropout, EMA weights, min-SNR loss weighting and warm-up.
3. Decoder fine-tuning on full scenes with the encoder frozen (`--decoder-steps`). The latents
   do not move, so the UNet stays valid: reconstruction quality can keep improving afterwards,
   in a later session, without retraining anything else.

Cross-attention that localises is the whole point of this model (DPL repairs leaking maps; a
flat map gives it nothing to repair), so the run measures it from the start: every
`eval_every` steps the EMA UNet denoises held-out scenes and each shape word's time-averaged
16x16 map is compared with its object's mask (best-threshold IoU). Design choices aimed at it:
captions in random object order; a *causal one-layer* text encoder, so a shape token carries
its colour word and nothing after it; a short text length (24) with few padding tokens; cross-
attention keys initialised with a larger scale, so attention starts peaked, off the flat spot.
Those alone left attention flat (the shipped run: IoU 0.07 after 500 steps), so the run can add a
weak, capped attention hint for a few hundred steps (`--attn-guide-weight`, see
`attention_guide`) to break the symmetry; the model card says when it was on.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from dpl_edit.engine.attention import CrossAttentionStore, controlled_attention
from dpl_edit.engine.model import BUNDLED_MODEL, sd_ddim_scheduler
from dpl_edit.engine.text import find_word
from dpl_edit.errors import DplError
from dpl_edit.world import synthetic as world
from dpl_edit.world.tokenizer import build_clip_tokenizer

TEXT_LEN = 24
# Where training runs: the GPU when there is one (set in `main`); random numbers are always drawn
# on the CPU so a run is reproducible on either.
DEVICE = torch.device("cpu")
TRAIN_SEED_OFFSET = 1_000_000  # held-out scenes use indices below this, training above


@dataclass
class TrainConfig:
    """Every knob of a run; saved next to the checkpoints so a run can be reproduced."""

    seed: int = 0
    batch_size: int = 32
    vae_steps: int = 1500
    vae_lr: float = 1e-3
    vae_crop: int = 32
    unet_steps: int = 6000
    decoder_steps: int = 0
    decoder_lr: float = 2e-4
    unet_lr: float = 3e-4
    text_lr: float = 3e-4
    warmup: int = 200
    warm_start: int = 0
    lr_decay_from: int = 0
    lr_floor: float = 0.1
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    key_init_scale: float = 3.0
    attn_guide_weight: float = 0.0
    attn_guide_target: float = 0.6
    unet_widths: tuple[int, ...] = (64, 128, 192)
    text_width: int = 128
    text_layers: int = 1
    eval_every: int = 250
    eval_scenes: int = 24
    checkpoint_every: int = 250
    threads: int = 0
    extra: dict = field(default_factory=dict)


def build_components(cfg: TrainConfig):
    """Fresh, seeded VAE, tokenizer, text encoder and UNet of the bundled model's layout."""
    torch.manual_seed(cfg.seed)
    tokenizer = build_clip_tokenizer(list(world.VOCABULARY), model_max_length=TEXT_LEN)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        latent_channels=4,
        sample_size=world.SIZE,
        norm_num_groups=16,
        mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_width,
            intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            max_position_embeddings=TEXT_LEN,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        block_out_channels=cfg.unet_widths,
        layers_per_block=1,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=(4, 8, 8),
        norm_num_groups=32,
    )
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_k.weight.mul_(cfg.key_init_scale)
    return vae, tokenizer, text_encoder, unet


def scene_batch(seed: int, start: int, count: int) -> tuple[torch.Tensor, list[str], list]:
    """Scenes `start..start+count` of the world as a [-1, 1] image batch, captions, renders."""
    renders = [world.scene_at(seed, i).render() for i in range(start, start + count)]
    images = np.stack([r.image for r in renders]).astype(np.float32) / 127.5 - 1.0
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).to(DEVICE)
    return batch, [r.caption for r in renders], renders


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] batches, on the 0..1 scale."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-10))


# ---------------------------------------------------------------- checkpoints (no pickle)


def _save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    meta_tmp = path.with_suffix(".json.tmp")
    meta_tmp.write_text(json.dumps(meta, indent=1))
    meta_tmp.replace(path.with_suffix(".json"))


def _optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{prefix}.{i}.{key}"] = torch.as_tensor(value)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str):
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    if state:
        sd["state"] = state
        opt.load_state_dict(sd)


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _load_prefixed(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str):
    n = len(prefix) + 1
    module.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


# ---------------------------------------------------------------- phase 1: VAE


def train_vae(cfg: TrainConfig, vae: AutoencoderKL, run: Path) -> float:
    """Train the VAE on random crops; returns held-out PSNR (dB) on full scenes."""
    ckpt = run / "vae.safetensors"
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    step = _resume_vae(ckpt, vae, opt)
    held_out, _, _ = scene_batch(cfg.seed, 0, 64)
    gen = torch.Generator().manual_seed(cfg.seed + step)
    bar = tqdm(range(step, cfg.vae_steps), desc="vae", initial=step, total=cfg.vae_steps)
    score = float("nan")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        images, _, _ = scene_batch(
            cfg.seed, TRAIN_SEED_OFFSET + step * cfg.batch_size, cfg.batch_size
        )
        c = cfg.vae_crop
        ox, oy = (int(v) for v in torch.randint(0, world.SIZE - c + 1, (2,), generator=gen))
        crops = images[:, :, oy : oy + c, ox : ox + c]
        posterior = vae.encode(crops).latent_dist
        sample = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=gen
        ).to(DEVICE)
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
    _load_prefixed(vae, tensors, "vae")
    _load_optimizer(opt, tensors, "opt")
    return json.loads(ckpt.with_suffix(".json").read_text())["step"]


def _vae_checkpoint(phase, ckpt, vae, opt, held_out, done: int, cfg: TrainConfig) -> float:
    """Measure held-out PSNR and save the VAE and its optimiser; returns the PSNR."""
    score = vae_psnr(vae, held_out)
    tqdm.write(f"{phase} step {done}: held-out PSNR {score:.2f} dB")
    meta = {"step": done, "psnr": score, "config": asdict(cfg)}
    _save_state(ckpt, {**_prefixed("vae", vae), **_optimizer_tensors(opt, "opt")}, meta)
    return score


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    recon = vae.decode(vae.encode(images).latent_dist.mean).sample
    return psnr(recon, images)


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, cfg: TrainConfig) -> float:
    """SD's scaling factor: 1 / std of the latents, so the UNet sees unit-variance inputs."""
    images, _, _ = scene_batch(cfg.seed, 10_000, 256)
    return float(1.0 / vae.encode(images).latent_dist.mean.std())


def train_decoder(cfg: TrainConfig, vae: AutoencoderKL, run: Path) -> float:
    """Fine-tune the VAE decoder with the encoder frozen; returns held-out PSNR (dB)."""
    ckpt = run / "decoder.safetensors"
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.decoder_lr)
    step = _resume_vae(ckpt, vae, opt)
    held_out, _, _ = scene_batch(cfg.seed, 0, 64)
    score = float("nan")
    bar = tqdm(
        range(step, cfg.decoder_steps), desc="decoder", initial=step, total=cfg.decoder_steps
    )
    for step in bar:
        start = TRAIN_SEED_OFFSET + 7 * 10**6 + step * cfg.batch_size
        images, _, _ = scene_batch(cfg.seed, start, cfg.batch_size)
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


# ---------------------------------------------------------------- phase 2: UNet + text


def best_iou(attn: np.ndarray, mask: np.ndarray) -> float:
    """Best IoU over thresholds of a max-normalised, nearest-upsampled map with a mask."""
    up = np.kron(attn, np.ones((mask.shape[0] // attn.shape[0],) * 2))
    up = up / max(up.max(), 1e-12)
    return max(
        float((m & mask).sum() / max((m | mask).sum(), 1))
        for m in (up >= t for t in np.linspace(0.05, 0.95, 19))
    )


@torch.no_grad()
def localisation(unet, text_encoder, tokenizer, vae_scale_latents, renders, captions) -> dict:
    """Mean best-threshold IoU and leakage of shape-word maps on held-out scenes."""
    scheduler = sd_ddim_scheduler()
    res = vae_scale_latents.shape[-1]
    store = CrossAttentionStore([res])
    ids = tokenizer(captions, padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
    context = text_encoder(ids.input_ids.to(DEVICE)).last_hidden_state
    gen = torch.Generator().manual_seed(0)
    with controlled_attention(unet, [store]):
        for t in (100, 300, 500, 700):
            noise = torch.randn(vae_scale_latents.shape, generator=gen).to(DEVICE)
            ts = torch.full((len(captions),), t, dtype=torch.long, device=DEVICE)
            unet(scheduler.add_noise(vae_scale_latents, noise, ts), ts, context)
            store.end_step()
    maps = store.average(res).flatten(1, 2).cpu()  # [batch, pixels, tokens]
    ious, leaks = [], []
    for b, render in enumerate(renders):
        for word, mask in render.masks.items():
            pos = find_word(tokenizer, captions[b], word)
            m = maps[b][:, pos].sum(-1).view(res, res).numpy()
            ious.append(best_iou(m, mask))
            up = np.kron(m, np.ones((mask.shape[0] // res,) * 2))
            leaks.append(float(up[~mask].sum() / max(up.sum(), 1e-12)))
    return {
        "iou": float(np.mean(ious)),
        "leakage": float(np.mean(leaks)),
        "max_prob": float(maps.max()),
    }


def attention_guide(
    maps: torch.Tensor, renders: list, captions: list[str], tokenizer, target: float
) -> torch.Tensor:
    """Weak localisation hint: each object word should put `target` of its mass on its object.

    `maps` [batch, res, res, tokens] are this step's cross-attention probabilities (with grad).
    A hinge, relu(target - mass inside the object), stops pulling once the share is reached, so
    maps keep leaking 1 - target of their mass: enough to localise, not so much that there is
    nothing left for DPL to repair. Only used when plain training leaves attention flat.
    """
    res = maps.shape[1]
    losses = []
    for b, (render, caption) in enumerate(zip(renders, captions, strict=True)):
        if not caption:  # dropped for classifier-free guidance
            continue
        for word, mask in render.masks.items():
            word_map = maps[b][..., find_word(tokenizer, caption, word)].sum(-1)
            share = torch.from_numpy(mask.astype(np.float32)).to(maps.device)
            share = F.adaptive_avg_pool2d(share[None, None], res)[0, 0]
            inside = (word_map * share).sum() / word_map.sum().clamp_min(1e-8)
            losses.append(F.relu(target - inside))
    return torch.stack(losses).mean() if losses else maps.sum() * 0


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the UNet and text learning rates at `step`.

    Linear warm-up over `warmup` steps from `warm_start` (the step where the optimiser started
    fresh: 0, or the shipped model's step count when a run continues from it, since a fresh Adam
    needs the ramp again), then constant; with `lr_decay_from` > 0 it follows a cosine from that
    step down to `lr_floor` at the last step, which is what sharpens samples late in training.
    """
    factor = min(1.0, (step + 1 - cfg.warm_start) / cfg.warmup)
    if 0 < cfg.lr_decay_from <= step:
        span = max(1, cfg.unet_steps - cfg.lr_decay_from)
        progress = min(1.0, (step - cfg.lr_decay_from) / span)
        factor *= cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def train_unet(cfg: TrainConfig, vae, text_encoder, unet, tokenizer, scale: float, run: Path):
    """Joint UNet + text-encoder training on VAE latents; checkpoints and EMA weights in `run`."""
    ckpt = run / "unet.safetensors"
    params = [
        {"params": list(unet.parameters()), "lr": cfg.unet_lr},
        {"params": list(text_encoder.parameters()), "lr": cfg.text_lr},
    ]
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_text = {k: v.detach().clone() for k, v in text_encoder.state_dict().items()}
    step, history = 0, []
    if ckpt.exists():
        tensors = load_file(str(ckpt))
        _load_prefixed(unet, tensors, "unet")
        _load_prefixed(text_encoder, tensors, "text")
        ema_unet = {k[9:]: v.to(DEVICE) for k, v in tensors.items() if k.startswith("ema_unet.")}
        ema_text = {k[9:]: v.to(DEVICE) for k, v in tensors.items() if k.startswith("ema_text.")}
        _load_optimizer(opt, tensors, "opt")
        meta = json.loads(ckpt.with_suffix(".json").read_text())
        step, history = meta["step"], meta["history"]
    scheduler = sd_ddim_scheduler()
    alphas = scheduler.alphas_cumprod
    snr = (alphas / (1 - alphas)).to(DEVICE)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    _, eval_captions, eval_renders = scene_batch(cfg.seed, 500, cfg.eval_scenes)
    eval_images = (
        torch.from_numpy(np.stack([r.image for r in eval_renders]).astype(np.float32) / 127.5 - 1)
        .permute(0, 3, 1, 2)
        .to(DEVICE)
    )
    with torch.no_grad():
        eval_latents = vae.encode(eval_images).latent_dist.mean * scale
    bar = tqdm(range(step, cfg.unet_steps), desc="unet", initial=step, total=cfg.unet_steps)
    for step in bar:
        factor = lr_factor(cfg, step)
        for g, base in zip(opt.param_groups, (cfg.unet_lr, cfg.text_lr), strict=True):
            g["lr"] = base * factor
        images, captions, renders = scene_batch(
            cfg.seed, TRAIN_SEED_OFFSET + step * cfg.batch_size, cfg.batch_size
        )
        drop = torch.rand(len(captions), generator=gen) < cfg.cfg_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean * scale
        ids = tokenizer(captions, padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
        context = text_encoder(ids.input_ids.to(DEVICE)).last_hidden_state
        noise = torch.randn(latents.shape, generator=gen).to(DEVICE)
        t = torch.randint(0, 1000, (len(captions),), generator=gen).to(DEVICE)
        noisy = scheduler.add_noise(latents, noise, t)
        if cfg.attn_guide_weight > 0:
            res = latents.shape[-1]
            store = CrossAttentionStore([res], grad=True)
            with controlled_attention(unet, [store]):
                pred = unet(noisy, t, context).sample
            guide = attention_guide(
                store.current(res), renders, captions, tokenizer, cfg.attn_guide_target
            )
        else:
            pred, guide = unet(noisy, t, context).sample, torch.zeros(())
        weight = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        loss = loss + cfg.attn_guide_weight * guide
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for ema, module in ((ema_unet, unet), (ema_text, text_encoder)):
                for k, v in module.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].mul_(decay).add_(v, alpha=1 - decay)
                    else:
                        ema[k].copy_(v)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.unet_steps:
            metrics = evaluate_ema(
                unet,
                text_encoder,
                ema_unet,
                ema_text,
                tokenizer,
                eval_latents,
                eval_renders,
                eval_captions,
            )
            history.append({"step": done, "loss": loss.item(), "time": time.time(), **metrics})
            tqdm.write(f"unet step {done}: {json.dumps(metrics)}")
        if done % cfg.checkpoint_every == 0 or done == cfg.unet_steps:
            tensors = {
                **_prefixed("unet", unet),
                **_prefixed("text", text_encoder),
                **{f"ema_unet.{k}": v for k, v in ema_unet.items()},
                **{f"ema_text.{k}": v for k, v in ema_text.items()},
                **_optimizer_tensors(opt, "opt"),
            }
            meta = {"step": done, "scale": scale, "history": history, "config": asdict(cfg)}
            _save_state(ckpt, tensors, meta)
    return ema_unet, ema_text, history


def evaluate_ema(unet, text_encoder, ema_unet, ema_text, tokenizer, latents, renders, captions):
    """Localisation of the EMA weights (swapped in and out of the live modules)."""
    live_unet = {k: v.clone() for k, v in unet.state_dict().items()}
    live_text = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    unet.load_state_dict(ema_unet)
    text_encoder.load_state_dict(ema_text)
    try:
        return localisation(unet, text_encoder, tokenizer, latents, renders, captions)
    finally:
        unet.load_state_dict(live_unet)
        text_encoder.load_state_dict(live_text)


# ---------------------------------------------------------------- export and re-import


def seed_run(model: Path, training: dict, run: Path, cfg: TrainConfig) -> None:
    """Start a run folder from a shipped model, so training continues across sessions.

    Checkpoints are not committed (too large); the model folder is. Its weights become both the
    live and the EMA weights, its step count and history (`training`, the record in its
    `dpl_defaults.json`) carry over; the optimiser starts fresh.
    """
    pipe = StableDiffusionPipeline.from_pretrained(str(model), dtype=torch.float32)
    vae_meta = {"step": cfg.vae_steps, "psnr": None, "config": asdict(cfg)}
    _save_state(run / "vae.safetensors", _prefixed("vae", pipe.vae), vae_meta)
    if training.get("decoder_steps"):
        meta = {"step": training["decoder_steps"], "psnr": None, "config": asdict(cfg)}
        _save_state(run / "decoder.safetensors", _prefixed("vae", pipe.vae), meta)
    tensors = {
        **_prefixed("unet", pipe.unet),
        **_prefixed("text", pipe.text_encoder),
        **{k: v.clone() for k, v in _prefixed("ema_unet", pipe.unet).items()},
        **{k: v.clone() for k, v in _prefixed("ema_text", pipe.text_encoder).items()},
    }
    meta = {
        "step": training["unet_steps"],
        "scale": pipe.vae.config.scaling_factor,
        "history": training["history"],
        "config": asdict(cfg),
    }
    _save_state(run / "unet.safetensors", tensors, meta)


def export(run: Path, out: Path, cfg: TrainConfig) -> None:
    """Write the EMA weights as a diffusers StableDiffusionPipeline folder (fp16 on disk)."""
    vae, tokenizer, text_encoder, unet = build_components(cfg)
    vae_ckpt = run / "decoder.safetensors"
    if not vae_ckpt.exists():
        vae_ckpt = run / "vae.safetensors"
    _load_prefixed(vae, load_file(str(vae_ckpt)), "vae")
    tensors = load_file(str(run / "unet.safetensors"))
    meta = json.loads((run / "unet.json").read_text())
    unet.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("ema_unet.")})
    text_encoder.load_state_dict(
        {k[9:]: v for k, v in tensors.items() if k.startswith("ema_text.")}
    )
    vae.register_to_config(scaling_factor=meta["scale"])
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    defaults = {
        "cross_attention_res": world.SIZE // 4,
        "self_attention_res": world.SIZE // 4,
        "blend_res": world.SIZE // 8,
        "object_words": list(world.OBJECT_WORDS),
        "training": {
            "unet_steps": meta["step"],
            "decoder_steps": _step(run / "decoder.json"),
            "history": meta["history"],
            "config": asdict(cfg),
        },
    }
    if (out / "dpl_defaults.json").exists():  # hand-written notes of the model card stay
        notes = json.loads((out / "dpl_defaults.json").read_text())["training"].get("notes")
        if notes:
            defaults["training"]["notes"] = notes
    (tmp / "dpl_defaults.json").write_text(json.dumps(defaults, indent=1))
    if (out / "README.md").exists():
        shutil.copy(out / "README.md", tmp / "README.md")
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dpl train-world` (also `python -m dpl_edit.world.training.run`)."""
    parser.add_argument("--run", type=Path, default=Path("runs/world"), help="checkpoint folder")
    parser.add_argument(
        "--out", type=Path, default=BUNDLED_MODEL,
        help="where the finished diffusers folder goes (default: the bundled model)",
    )  # fmt: skip
    parser.add_argument("--vae-steps", type=int, help="VAE steps (total, resumable)")
    parser.add_argument("--unet-steps", type=int, help="UNet steps (total, resumable)")
    parser.add_argument("--decoder-steps", type=int, help="decoder fine-tuning steps")
    parser.add_argument("--attn-guide-weight", type=float, help="weak attention hint (0 = off)")
    parser.add_argument(
        "--lr-decay-from", type=int, metavar="STEP",
        help="cosine-decay the UNet/text learning rate from STEP to 10%% at the last step",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of a new run")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--export-only", action="store_true", help="only write --out from --run")
    parser.add_argument(
        "--resume-from", type=Path, metavar="MODEL",
        help="start an empty --run from a shipped model folder (e.g. the bundled one)",
    )  # fmt: skip


def _step(meta_path: Path) -> int:
    return json.loads(meta_path.read_text())["step"] if meta_path.exists() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        train(parser.parse_args(argv))
    except DplError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def train(args: argparse.Namespace) -> None:
    """Run (or resume) both phases in `args.run`, then export the model to `args.out`."""
    if args.resume_from and not (args.resume_from / "dpl_defaults.json").is_file():
        raise DplError(
            f"--resume-from {args.resume_from}: not a world model folder (no dpl_defaults.json)"
        )
    if args.export_only and not (args.run / "unet.safetensors").is_file():
        raise DplError(f"--export-only: {args.run} holds no UNet checkpoint to export")
    for name in ("vae_steps", "unet_steps", "decoder_steps", "lr_decay_from"):
        if (getattr(args, name) or 0) < 0:
            raise DplError(f"--{name.replace('_', '-')} must be >= 0")
    args.run.mkdir(parents=True, exist_ok=True)
    shipped = None
    if args.resume_from:
        shipped = json.loads((args.resume_from / "dpl_defaults.json").read_text())["training"]
    cfg_path = args.run / "config.json"
    if cfg_path.exists():
        cfg = TrainConfig(**json.loads(cfg_path.read_text()))
    elif shipped:  # the shipped model's own recipe, so its weights fit
        cfg = TrainConfig(**shipped["config"])
    else:
        cfg = TrainConfig(seed=args.seed)
    cfg.unet_widths = tuple(cfg.unet_widths)
    if args.vae_steps is not None:
        cfg.vae_steps = args.vae_steps
    if args.unet_steps is not None:
        cfg.unet_steps = args.unet_steps
    if args.decoder_steps is not None:
        cfg.decoder_steps = args.decoder_steps
    if args.attn_guide_weight is not None:
        cfg.attn_guide_weight = args.attn_guide_weight
    if args.lr_decay_from is not None:
        cfg.lr_decay_from = args.lr_decay_from
    seeding = shipped is not None and not (args.run / "unet.safetensors").exists()
    if seeding:  # a fresh optimiser on trained weights warms up again
        cfg.warm_start = shipped["unet_steps"]
    cfg_path.write_text(json.dumps(asdict(cfg), indent=1))
    if seeding:
        seed_run(args.resume_from, shipped, args.run, cfg)
    if args.threads:
        torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.export_only:
        export(args.run, args.out, cfg)
        return
    vae, tokenizer, text_encoder, unet = build_components(cfg)
    for module in (vae, text_encoder, unet):
        module.to(DEVICE)
    print(f"training on {DEVICE}; run folder {args.run}")
    train_vae(cfg, vae, args.run)
    vae.requires_grad_(False).eval()
    unet_meta = args.run / "unet.json"  # a resumed UNet keeps the latent scale it learned with
    scale = json.loads(unet_meta.read_text())["scale"] if unet_meta.exists() else None
    scale = scale or latent_scale(vae, cfg)
    train_unet(cfg, vae, text_encoder, unet, tokenizer, scale, args.run)
    if cfg.decoder_steps:
        train_decoder(cfg, vae, args.run)
    export(args.run, args.out, cfg)


if __name__ == "__main__":
    sys.exit(main())
