"""Shared fixtures: a tiny, randomly initialised Stable Diffusion folder and its loaded model.

The folder has SD's structure (CLIP text encoder and tokenizer, AutoencoderKL, a UNet with
cross-attention at two resolutions, DDIM scheduler config) but only a few thousand weights, so
inversion and editing run in seconds on a CPU. Other test files (DPL, bench) reuse these fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from dpl_edit.engine.model import LoadedModel, load_model, save_model_folder, sd_ddim_scheduler
from dpl_edit.world.tokenizer import build_clip_tokenizer

torch.set_num_threads(1)

TINY_WORDS = [
    "a", "photo", "of", "cat", "dog", "lion", "tiger", "and", "the", "on", "grass", "big",
    "red", "blue", "circle", "square", "triangle", "sitting", "hippopotamus", "armadillo",
]  # fmt: skip
"""Words the tiny tokenizer splits exactly as SD's does (hippopotamus/armadillo: several tokens)."""
TINY_TEXT_LEN = 16


def build_tiny_sd(
    folder: Path,
    prediction_type: str = "epsilon",
    seed: int = 0,
    words: list[str] = TINY_WORDS,
    text_len: int = TINY_TEXT_LEN,
) -> Path:
    """Write a tiny random SD model (16x16 latents, 32x32 images) in diffusers layout.

    `words` and `text_len` set the tokenizer's vocabulary and prompt length, so a test can build
    one that fits other prompts (the benchmark's world captions need 17 tokens).
    """
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words, model_max_length=text_len)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=text_len,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=5.0,  # the random encoder's posterior has std ~0.2: unit-variance latents
    )
    _calm_down(unet, text_encoder)
    scheduler = sd_ddim_scheduler(prediction_type)
    save_model_folder(folder, vae, text_encoder, tokenizer, unet, scheduler)
    # Like the bundled model: attention sizes chosen for a small latent, not SD's ratios.
    write_defaults(folder, cross_attention_res=8, self_attention_res=16, blend_res=8)
    return folder


@torch.no_grad()
def _calm_down(unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> None:
    """Rescale random weights so the model behaves like a trained one where tests depend on it.

    A random UNet predicts large noise that varies wildly with the latent, so DDIM inversion
    does not even invert at guidance 1; shrinking its output makes the DDIM ODE smooth, as for a
    trained denoiser. Shrinking the text encoder's output by 10 (and growing the cross-attention
    key/value projections to compensate, which leaves the model's function unchanged) makes the
    gap between prompt and empty-prompt embeddings small compared with NTI's learning rate, as
    it is for SD; otherwise 10 Adam steps of 1e-2 could not move the null text far enough.
    """
    unet.conv_out.weight.mul_(0.1)
    unet.conv_out.bias.mul_(0.1)
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # 4.x/5.x
    final_norm.weight.mul_(0.1)
    final_norm.bias.mul_(0.1)
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.to_k.weight.mul_(10.0)
            module.to_v.weight.mul_(10.0)


def tiny_image(size: int = 32, seed: int = 0) -> Image.Image:
    """A smooth synthetic picture: two coloured blobs on a gradient (not pure noise)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    centres = torch.rand(2, 2, generator=g) * 0.6 + 0.2
    blobs = [torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02) for cx, cy in centres]
    rgb = torch.stack([0.2 + 0.6 * blobs[0], 0.3 * y + 0.6 * blobs[1], 0.5 * x])
    array = (rgb.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    """Shared loaded model; tests must not leave state on it (processors are restored)."""
    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_vpred_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v") / "tiny-sd-v", "v_prediction")


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    tiny_image().save(path)
    return path


def write_defaults(folder: Path, **values: object) -> None:
    (folder / "dpl_defaults.json").write_text(json.dumps(values))
