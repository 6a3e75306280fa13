"""What every training phase shares: the run's configuration, the model's components, batches
of world scenes, and checkpoints (safetensors and JSON, written atomically, never pickle).

Random numbers are always drawn on the CPU, so a run is reproducible on a GPU or without one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save
from transformers import CLIPTextConfig, CLIPTextModel

from dpl_edit.io.atomic import atomic_write_bytes
from dpl_edit.world import synthetic as world
from dpl_edit.world.tokenizer import build_clip_tokenizer

TEXT_LEN = 24
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
    sink_weight: float = 0.0
    sink_target: float = 0.9
    unet_widths: tuple[int, ...] = (64, 128, 192)
    text_width: int = 128
    text_layers: int = 1
    eval_every: int = 250
    eval_scenes: int = 24
    checkpoint_every: int = 250

    @classmethod
    def from_record(cls, record: dict) -> TrainConfig:
        """A config from a stored record (a run's config.json, a model's training record).

        Records keep the fields of the code that wrote them; fields since removed (the unused
        `threads` and `extra` of older runs) are dropped rather than refused.
        """
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in record.items() if k in known})
        config.unet_widths = tuple(config.unet_widths)
        return config


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


def scene_batch(
    seed: int, start: int, count: int, device: torch.device
) -> tuple[torch.Tensor, list[str], list]:
    """Scenes `start..start+count` of the world as a [-1, 1] image batch, captions, renders."""
    renders = [world.scene_at(seed, i).render() for i in range(start, start + count)]
    images = np.stack([r.image for r in renders]).astype(np.float32) / 127.5 - 1.0
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
    return batch, [r.caption for r in renders], renders


def save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """A checkpoint: tensors as safetensors at `path`, `meta` as JSON beside it, both atomic.

    The tensors go first, so a crash between the two leaves the old step count, and a resume
    redoes those steps instead of claiming steps whose weights were never written."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors))
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())


def steps_done(checkpoint: Path) -> int:
    """The step count a checkpoint's JSON records; 0 when there is none yet."""
    meta = checkpoint.with_suffix(".json")
    return json.loads(meta.read_text())["step"] if meta.exists() else 0


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """An optimiser's state as named tensors (safetensors holds tensors only; no pickle)."""
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{prefix}.{i}.{key}"] = torch.as_tensor(value)
    return out


def load_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str
) -> None:
    """Restore what `optimizer_tensors` saved under `prefix`."""
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    if state:
        sd["state"] = state
        opt.load_state_dict(sd)


def prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's weights under `prefix.`, so several modules share one checkpoint file."""
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_prefixed(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Load the weights `prefixed` stored under `prefix` into `module`."""
    n = len(prefix) + 1
    module.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
