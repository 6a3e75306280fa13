"""From a run folder to a model folder and back: export the EMA weights as a diffusers SD folder
(what ships as the bundled model), and seed a new run from a shipped model to continue training.

Checkpoints are not committed (too large); the model folder is, so a later run continues
from it. No `StableDiffusionPipeline` is built either way (see `engine.model.save_model_folder`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from dpl_edit.engine.model import (
    DEFAULTS_FILE,
    load_model,
    save_model_folder,
    sd_ddim_scheduler,
)
from dpl_edit.io.atomic import atomic_folder
from dpl_edit.world import synthetic as world
from dpl_edit.world.training.data import (
    TrainConfig,
    build_components,
    load_prefixed,
    prefixed,
    save_state,
    steps_done,
)


def seed_run(model: Path, training: dict, run: Path, cfg: TrainConfig) -> None:
    """Start a run folder from a shipped model, so training continues from what ships.

    Its weights become both the live and the EMA weights, its step count and history
    (`training`, the record in its `dpl_defaults.json`) carry over; the optimiser starts fresh.
    """
    shipped = load_model(model)
    vae_meta = {"step": cfg.vae_steps, "psnr": None, "config": asdict(cfg)}
    save_state(run / "vae.safetensors", prefixed("vae", shipped.vae), vae_meta)
    if training.get("decoder_steps"):
        meta = {"step": training["decoder_steps"], "psnr": None, "config": asdict(cfg)}
        save_state(run / "decoder.safetensors", prefixed("vae", shipped.vae), meta)
    tensors = {
        **prefixed("unet", shipped.unet),
        **prefixed("text", shipped.text_encoder),
        **{k: v.clone() for k, v in prefixed("ema_unet", shipped.unet).items()},
        **{k: v.clone() for k, v in prefixed("ema_text", shipped.text_encoder).items()},
    }
    meta = {
        "step": training["unet_steps"],
        "scale": shipped.scaling_factor,
        "history": training["history"],
        "config": asdict(cfg),
    }
    save_state(run / "unet.safetensors", tensors, meta)


_HAND_SET = ("dpl", "threads", "edit_threads")
"""Keys of `dpl_defaults.json` chosen after training (on the benchmark), not by the run."""


def export(run: Path, out: Path, cfg: TrainConfig, source: Path | None = None) -> None:
    """Write the EMA weights as a diffusers SD folder (fp16 on disk), replacing `out` atomically.

    The hand-set parts of the model's `dpl_defaults.json` (DPL defaults, threads, the training
    notes) are carried over from `out` when it is already a model folder, else from `source`
    (the model the run started from), and so is `out`'s README; everything else is the run's.
    """
    vae, tokenizer, text_encoder, unet = build_components(cfg)
    vae_ckpt = run / "decoder.safetensors"
    if not vae_ckpt.exists():
        vae_ckpt = run / "vae.safetensors"
    load_prefixed(vae, load_file(str(vae_ckpt)), "vae")
    tensors = load_file(str(run / "unet.safetensors"))
    meta = json.loads((run / "unet.json").read_text())
    load_prefixed(unet, tensors, "ema_unet")
    load_prefixed(text_encoder, tensors, "ema_text")
    vae.register_to_config(scaling_factor=meta["scale"])
    defaults = {
        "cross_attention_res": world.SIZE // 4,
        "self_attention_res": world.SIZE // 4,
        # The local blend's mask from the finest cross-attention level (latent/1, not latent/2):
        # a cell of the coarser one and its dilation reach the neighbouring objects of these
        # small scenes, which edits then change (docs/research/edit-outcome.md).
        "blend_res": world.SIZE // 4,
        "object_words": list(world.OBJECT_WORDS),
        "vocabulary": list(world.VOCABULARY),
        "training": {
            "unet_steps": meta["step"],
            "decoder_steps": steps_done(run / "decoder.safetensors"),
            "history": meta["history"],
            "config": asdict(cfg),
        },
    }
    origin = out if (out / DEFAULTS_FILE).exists() else source
    if origin is not None and (origin / DEFAULTS_FILE).exists():
        previous = json.loads((origin / DEFAULTS_FILE).read_text())
        defaults |= {key: previous[key] for key in _HAND_SET if key in previous}
        notes = previous["training"].get("notes")
        if notes:
            defaults["training"]["notes"] = notes
    modules = [module.to(torch.float16) for module in (vae, text_encoder, unet)]
    with atomic_folder(out, overwrite=True) as tmp:
        save_model_folder(tmp, modules[0], modules[1], tokenizer, modules[2], sd_ddim_scheduler())
        (tmp / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=1))
        if (out / "README.md").exists():
            shutil.copy(out / "README.md", tmp / "README.md")
