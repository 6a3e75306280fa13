"""One metrics module for training, the quality gates and the benchmark (issue 11).

The model card's IoU and the benchmark's IoU used to be different numbers under one name; now
every consumer calls `dpl_edit.metrics`, and the card and the report state the same definitions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from dpl_edit import metrics
from dpl_edit.io.images import tensor_to_arrays
from dpl_edit.world import gates
from dpl_edit.world.training.vae import vae_psnr

OBJ = np.zeros((16, 16), dtype=bool)
OBJ[2:8, 2:8] = True
OTHER = np.zeros((16, 16), dtype=bool)
OTHER[10:15, 10:15] = True


def test_object_localisation_is_the_benchmarks_best_iou_and_leakage():
    attn = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    iou, leak = metrics.object_localisation(attn, {"cat": OBJ, "dog": OTHER}, "cat")
    assert iou == metrics.best_iou(attn, OBJ)
    assert leak == metrics.leakage(attn, OBJ, OTHER, ~(OBJ | OTHER)).outside
    assert 0 < leak < 1


def test_training_vae_psnr_is_the_gates_psnr_of_8_bit_pictures():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), norm_num_groups=8, latent_channels=4,
    ).eval()  # fmt: skip
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mean).sample
    expected = np.mean(
        [
            metrics.psnr(a, b)
            for a, b in zip(tensor_to_arrays(recon), tensor_to_arrays(images), strict=True)
        ]
    )
    assert vae_psnr(vae, images) == pytest.approx(expected)


def test_the_model_card_states_the_benchmarks_definitions():
    results = {
        "vae_psnr": 30.0, "generation_rate": 0.9, "nti_psnr": 29.0, "attention_iou": 0.8,
        "attention_leakage": 0.4, "checker_accuracy": 1.0, "passed": {},
    }  # fmt: skip
    card = " ".join(gates.model_card(results, {"summary": "", "notes": ""}).split())
    for definition in metrics.DEFINITIONS:
        assert definition in card
