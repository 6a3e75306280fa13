"""Tiny Stable Diffusion folders written by diffusers itself, as a user would have them.

Components are built as diffusers' own fast tests build them (`get_dummy_components` of the
SD 1 and SD 2 pipeline tests: block_out_channels (32, 64) with cross-attention only in the
second block, a 5-layer CLIP text encoder) and saved with `StableDiffusionPipeline(...)
.save_pretrained`, so the folders carry whatever diffusers writes: the scheduler class the
pipeline had (PNDM with SD 1.x's own settings for SD 1), variant file names, safety-checker
entries. The departures: the tokenizer is the project's offline CLIP tokenizer (the tests' hub
one is out of reach), and, as in conftest, the random weights are calmed and the latents
scaled to unit variance so that inversion behaves as on a trained model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from conftest import TINY_WORDS, _calm_down
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModel

from dpl_edit.world.tokenizer import build_clip_tokenizer

LAYOUTS = ("sd1", "sd2")
"""sd1: epsilon, PNDM scheduler config; sd2: v-prediction DDIM config, attention_head_dim as a
list and linear projections (the SD 2 pipeline tests' settings)."""


def _components(layout: str, seed: int = 0) -> dict:
    sd2 = layout == "sd2"
    tokenizer = build_clip_tokenizer(TINY_WORDS)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        **({"attention_head_dim": (2, 4), "use_linear_projection": True} if sd2 else {}),
    )
    if sd2:
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            prediction_type="v_prediction",
        )
    else:  # SD 1.x's own scheduler config
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        scaling_factor=3.0,  # unit-variance latents from the random encoder, as in conftest
        **({"sample_size": 128} if sd2 else {}),
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),
            **({"hidden_act": "gelu", "projection_dim": 512} if sd2 else {}),
        )
    )
    _calm_down(unet, text_encoder)
    with torch.no_grad():  # a prompt that moves the sample, so that guidance has an effect
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_v.weight.mul_(3.0)
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


@torch.no_grad()
def tiny_safety_checker(flags_everything: bool) -> tuple[StableDiffusionSafetyChecker, Any]:
    """A random safety checker with its feature extractor. Its concept thresholds decide
    alone: below any cosine similarity, every image is flagged; above, none is."""
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
              "num_hidden_layers": 1, "image_size": 32, "patch_size": 8}  # fmt: skip
    config = CLIPConfig(text_config={"hidden_size": 32}, vision_config=vision, projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    checker.concept_embeds_weights.fill_(-2.0 if flags_everything else 2.0)
    features = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return checker, features


def build_diffusers_sd(
    folder: Path,
    layout: str,
    variant: str | None = None,
    safety_checker: tuple[StableDiffusionSafetyChecker, Any] | None = None,
) -> Path:
    """Save the tiny pipeline of `layout` (`LAYOUTS`) with `save_pretrained`; `variant` names
    its weight files as half-precision folders are shipped (`...fp16.safetensors`), and
    `safety_checker` (checker, feature extractor) is saved with it as SD 1.x ships one."""
    components = _components(layout)
    if safety_checker is not None:
        components.update(
            safety_checker=safety_checker[0],
            feature_extractor=safety_checker[1],
            requires_safety_checker=True,
        )
    pipeline = StableDiffusionPipeline(**components)
    if variant == "fp16":
        pipeline.to(torch.float16)
    pipeline.save_pretrained(folder, variant=variant)
    return folder
