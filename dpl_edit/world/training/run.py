"""Train the bundled model: a small Stable-Diffusion-format pipeline on the synthetic world.

Three phases, each resumable from its checkpoint in the run folder: the VAE (`vae.train_vae`),
the UNet with the text encoder (`unet.train_unet`), and optionally the decoder
(`vae.train_decoder`); then the EMA weights are exported as the model folder (`export`). A run
can also start from a shipped model folder, to continue its training.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from dpl_edit.engine.model import DEFAULTS_FILE
from dpl_edit.errors import DplError
from dpl_edit.io.atomic import atomic_write_bytes
from dpl_edit.world.training.data import TrainConfig, build_components
from dpl_edit.world.training.export import export, seed_run
from dpl_edit.world.training.request import TrainRequest
from dpl_edit.world.training.unet import train_unet
from dpl_edit.world.training.vae import latent_scale, train_decoder, train_vae

_STEP_COUNTS = ("vae_steps", "unet_steps", "decoder_steps", "lr_decay_from")


def _check(request: TrainRequest) -> None:
    """Refuse bad requests before anything is written."""
    resume = request.resume_from
    if resume is not None and not (resume / DEFAULTS_FILE).is_file():
        raise DplError(
            f"cannot resume from {resume}: not a world model folder (no {DEFAULTS_FILE})"
        )
    if request.export_only and not (request.run / "unet.safetensors").is_file():
        raise DplError(f"nothing to export: {request.run} holds no UNet checkpoint")
    for name in (*_STEP_COUNTS, "sink_weight"):
        if (getattr(request, name) or 0) < 0:
            raise DplError(f"{name.replace('_', ' ')} must be >= 0, got {getattr(request, name)}")
    if request.ema_decay is not None and not 0 <= request.ema_decay < 1:
        raise DplError(f"EMA decay must be in [0, 1), got {request.ema_decay}")


def _config(request: TrainRequest, shipped: dict | None) -> TrainConfig:
    """The run's configuration with the request's changes on top."""
    cfg_path = request.run / "config.json"
    if cfg_path.exists():
        cfg = TrainConfig.from_record(json.loads(cfg_path.read_text()))
    elif shipped:  # the shipped model's own recipe, so its weights fit
        cfg = TrainConfig.from_record(shipped["config"])
    else:
        cfg = TrainConfig(seed=request.seed)
    for name in (*_STEP_COUNTS, "attn_guide_weight", "sink_weight", "ema_decay"):
        if getattr(request, name) is not None:
            setattr(cfg, name, getattr(request, name))
    return cfg


def train(request: TrainRequest) -> Path:
    """Run (or resume) every phase in `request.run`, export the model; returns its folder."""
    _check(request)
    request.run.mkdir(parents=True, exist_ok=True)
    shipped = None
    if request.resume_from:
        shipped = json.loads((request.resume_from / DEFAULTS_FILE).read_text())["training"]
    cfg = _config(request, shipped)
    seeding = shipped is not None and not (request.run / "unet.safetensors").exists()
    if seeding:  # a fresh optimiser on trained weights warms up again
        cfg.warm_start = shipped["unet_steps"]
    atomic_write_bytes(request.run / "config.json", json.dumps(asdict(cfg), indent=1).encode())
    if seeding:
        seed_run(request.resume_from, shipped, request.run, cfg)
    if request.threads:
        torch.set_num_threads(request.threads)
    if request.export_only:
        export(request.run, request.out, cfg, request.resume_from)
        return request.out
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae, tokenizer, text_encoder, unet = build_components(cfg)
    for module in (vae, text_encoder, unet):
        module.to(device)
    tqdm.write(f"training on {device}; run folder {request.run}", file=sys.stderr)
    train_vae(cfg, vae, request.run)
    vae.requires_grad_(False).eval()
    unet_meta = request.run / "unet.json"  # a resumed UNet keeps the latent scale it learned with
    scale = json.loads(unet_meta.read_text())["scale"] if unet_meta.exists() else None
    scale = scale or latent_scale(vae, cfg)
    train_unet(cfg, vae, text_encoder, unet, tokenizer, scale, request.run)
    if cfg.decoder_steps:
        train_decoder(cfg, vae, request.run)
    export(request.run, request.out, cfg, request.resume_from)
    return request.out
