"""Training phase 2: the UNet and the one-layer CLIP text encoder, jointly, on the frozen VAE's
latents (16x16), with classifier-free-guidance dropout, EMA weights, min-SNR loss weighting and
warm-up (resumable checkpoints).

Cross-attention that localises is the whole point of this model (DPL repairs leaking maps; a
flat map gives it nothing to repair), so the run measures it from the start: every
`eval_every` steps the EMA UNet denoises held-out scenes and each shape word's time-averaged
16x16 map is compared with its object's mask (`localisation`). Design choices aimed at it:
captions in random object order; a *causal one-layer* text encoder, so a shape token carries
its colour word and nothing after it; a short text length (24) with few padding tokens; cross-
attention keys initialised with a larger scale, so attention starts peaked, off the flat spot.
Those alone left attention flat (the shipped run: IoU 0.07 after 500 steps), so the run can add a
weak, capped attention hint for a few hundred steps (`attn_guide_weight`, see
`attention_guide`) to break the symmetry; the model card says when it was on.

A run can also teach the start token to be the attention sink, as it is in Stable Diffusion
(`sink_weight`, see `StartTokenShare`): the `world-sink` variant is the shipped model fine-tuned
with that term, so DPL can be measured where the spare attention goes where CLIP puts it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from dpl_edit.engine.attention import (
    AttentionController,
    AttnLayer,
    CrossAttentionStore,
    controlled_attention,
)
from dpl_edit.engine.model import sd_ddim_scheduler
from dpl_edit.engine.text import find_word
from dpl_edit.metrics import object_localisation
from dpl_edit.world.training.data import (
    TEXT_LEN,
    TRAIN_SEED_OFFSET,
    TrainConfig,
    load_optimizer,
    load_prefixed,
    optimizer_tensors,
    prefixed,
    save_state,
    scene_batch,
)


@torch.no_grad()
def localisation(unet, text_encoder, tokenizer, vae_scale_latents, renders, captions) -> dict:
    """Mean best-threshold IoU and leakage of shape-word maps on held-out scenes.

    Measured as the quality gate and the benchmark measure them (`metrics.object_localisation`),
    on maps of teacher-forced denoising at four noise levels instead of a whole inversion.
    """
    scheduler, device = sd_ddim_scheduler(), unet.device
    res = vae_scale_latents.shape[-1]
    store = CrossAttentionStore([res])
    ids = tokenizer(captions, padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
    context = text_encoder(ids.input_ids.to(device)).last_hidden_state
    gen = torch.Generator().manual_seed(0)
    with controlled_attention(unet, [store]):
        for t in (100, 300, 500, 700):
            noise = torch.randn(vae_scale_latents.shape, generator=gen).to(device)
            ts = torch.full((len(captions),), t, dtype=torch.long, device=device)
            unet(scheduler.add_noise(vae_scale_latents, noise, ts), ts, context)
            store.end_step()
    maps = store.average(res).flatten(1, 2).cpu()  # [batch, pixels, tokens]
    ious, leaks = [], []
    for b, render in enumerate(renders):
        for word in render.masks:
            word_map = maps[b][:, find_word(tokenizer, captions[b], word)].sum(-1)
            iou, leak = object_localisation(word_map.view(res, res), render.masks, word)
            ious.append(iou)
            leaks.append(leak)
    return {
        "iou": float(np.mean(ious)),
        "leakage": float(np.mean(leaks)),
        "max_prob": float(maps.max()),
        "start_share": float(maps[..., 0].mean()),
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


class StartTokenShare(AttentionController):
    """This UNet call's share of attention on the start token, per cross-attention layer.

    In Stable Diffusion the start token takes 0.9-0.99 of every cross-attention layer's mass: its
    embedding is the same for every prompt (the text encoder is causal), so it works as a
    no-op key where attention has nowhere useful to go. Shares keep their graph, for `sink_guide`.
    """

    def __init__(self) -> None:
        self.shares: list[torch.Tensor] = []

    def wants(self, layer: AttnLayer) -> bool:
        return layer.is_cross

    def __call__(self, probs: torch.Tensor, layer: AttnLayer) -> torch.Tensor:
        self.shares.append(probs[..., 0].mean())  # over batch, heads and pixels
        return probs


def sink_guide(shares: list[torch.Tensor], target: float) -> torch.Tensor:
    """Hinge per layer, relu(target - start share), averaged: it asks every layer for the sink,
    stops pulling once a layer is there, and never looks at an object or its mask."""
    return torch.stack([F.relu(target - share) for share in shares]).mean()


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
    device = unet.device
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
        load_prefixed(unet, tensors, "unet")
        load_prefixed(text_encoder, tensors, "text")
        ema_unet = {k[9:]: v.to(device) for k, v in tensors.items() if k.startswith("ema_unet.")}
        ema_text = {k[9:]: v.to(device) for k, v in tensors.items() if k.startswith("ema_text.")}
        load_optimizer(opt, tensors, "opt")
        meta = json.loads(ckpt.with_suffix(".json").read_text())
        step, history = meta["step"], meta["history"]
    scheduler = sd_ddim_scheduler()
    alphas = scheduler.alphas_cumprod
    snr = (alphas / (1 - alphas)).to(device)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    _, eval_captions, eval_renders = scene_batch(cfg.seed, 500, cfg.eval_scenes, device)
    eval_images = (
        torch.from_numpy(np.stack([r.image for r in eval_renders]).astype(np.float32) / 127.5 - 1)
        .permute(0, 3, 1, 2)
        .to(device)
    )
    with torch.no_grad():
        eval_latents = vae.encode(eval_images).latent_dist.mean * scale
    bar = tqdm(range(step, cfg.unet_steps), desc="unet", initial=step, total=cfg.unet_steps)
    for step in bar:
        factor = lr_factor(cfg, step)
        for g, base in zip(opt.param_groups, (cfg.unet_lr, cfg.text_lr), strict=True):
            g["lr"] = base * factor
        start = TRAIN_SEED_OFFSET + step * cfg.batch_size
        images, captions, renders = scene_batch(cfg.seed, start, cfg.batch_size, device)
        drop = torch.rand(len(captions), generator=gen) < cfg.cfg_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean * scale
        ids = tokenizer(captions, padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
        context = text_encoder(ids.input_ids.to(device)).last_hidden_state
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (len(captions),), generator=gen).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        res = latents.shape[-1]
        store = CrossAttentionStore([res], grad=True) if cfg.attn_guide_weight > 0 else None
        sink = StartTokenShare() if cfg.sink_weight > 0 else None
        with controlled_attention(unet, [c for c in (store, sink) if c is not None]):
            pred = unet(noisy, t, context).sample
        weight = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        if store is not None:
            guide = attention_guide(
                store.current(res), renders, captions, tokenizer, cfg.attn_guide_target
            )
            loss = loss + cfg.attn_guide_weight * guide
        if sink is not None:
            loss = loss + cfg.sink_weight * sink_guide(sink.shares, cfg.sink_target)
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
        shown = {"loss": f"{loss.item():.4f}"}
        if sink is not None:
            shown["start"] = f"{torch.stack(sink.shares).mean().item():.3f}"
        bar.set_postfix(shown)
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
                **prefixed("unet", unet),
                **prefixed("text", text_encoder),
                **{f"ema_unet.{k}": v for k, v in ema_unet.items()},
                **{f"ema_text.{k}": v for k, v in ema_text.items()},
                **optimizer_tensors(opt, "opt"),
            }
            meta = {"step": done, "scale": scale, "history": history, "config": asdict(cfg)}
            save_state(ckpt, tensors, meta)
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
