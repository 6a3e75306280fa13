"""The engine draws what diffusers draws, on tiny SD 1 and SD 2 folders written by diffusers.

Each folder is saved by `StableDiffusionPipeline.save_pretrained` from components built as
diffusers' own tests build them (`sd_folders`): SD 1 with a PNDM scheduler config (epsilon,
linear betas), SD 2 with a v-prediction DDIM config and attention_head_dim as a list, both with
diffusers' test layout (cross-attention only in the second of two blocks, at 16x16 for 32x32
latents), and SD 1 again as an fp16 variant. On each: the engine's guided DDIM sampling equals
diffusers' pipeline with `DDIMScheduler`, DDIM inversion replays at guidance 1, null-text
inversion reconstructs at 7.5, and `dpl run` works with every method.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_image
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from PIL import Image
from sd_folders import build_diffusers_sd

from dpl_edit.cli import main
from dpl_edit.engine.inversion import invert, reconstruct
from dpl_edit.engine.model import load_model, sd_ddim_scheduler

PROMPT = "a cat and a dog"
STEPS = 10
MAX_DIFFERENCE = 1e-6
"""Largest difference of the final latents, relative to their largest value: a few float32
roundings (float32 ulp is 1.2e-7). These random models' latents reach ~30, so the bound is up
to 3e-5; measured differences are 1e-6 to 1.2e-5. Float32 on a CPU, the engine and diffusers
make the same UNet calls on the same batches; only the order of a few additions differs."""

FOLDERS = [("sd1", None), ("sd2", None), ("sd1", "fp16")]


@pytest.fixture(scope="module", params=FOLDERS, ids=lambda p: "-".join(filter(None, p)))
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout, variant = request.param
    name = "-".join(filter(None, request.param))
    return build_diffusers_sd(tmp_path_factory.mktemp(name) / name, layout, variant)


@pytest.fixture(scope="module")
def model(folder: Path):
    return load_model(folder)  # an fp16 folder's only variant is found on its own


@pytest.fixture(scope="module")
def ddim_inversion(model):
    return invert(model, tiny_image(model.resolution), PROMPT, "ddim", STEPS, progress=False)


def diffusers_ddim_pipeline(folder: Path, variant: str | None = None) -> StableDiffusionPipeline:
    """diffusers' own pipeline on the folder, with DDIM made from the folder's scheduler config
    (the pipeline then sets steps_offset 1 and turns clip_sample off, as it does for any)."""
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    pipeline = StableDiffusionPipeline.from_pretrained(
        folder, scheduler=scheduler, variant=variant, dtype=torch.float32, local_files_only=True
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _variant(folder: Path) -> str | None:
    return "fp16" if folder.name.endswith("fp16") else None


def _from_given_latent(model, inversion):
    """A DDIM inversion replays its noisiest latent with the empty prompt's embedding at each
    step, which is guided sampling from that latent: here the latent is a random one."""
    shape = (1, 4, model.latent_size, model.latent_size)
    given = copy.copy(inversion)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    given.latents = torch.cat([inversion.latents[:-1], start])
    return given


def _sample_both(folder: Path, model, given) -> tuple[torch.Tensor, np.ndarray, ...]:
    """Guided DDIM sampling at 7.5 from the `given` inversion's noisiest latent, by the engine
    and by diffusers: (our final latent, our image, diffusers' final latent, their image)."""
    pipeline = diffusers_ddim_pipeline(folder, _variant(folder))
    start = given.latents[-1:]
    ours, our_image = reconstruct(model, given)
    assert (ours[0] - start[0]).abs().max() > 0.1  # the sampler did move the latent

    def diffusers(output_type: str) -> np.ndarray:
        images = pipeline(
            PROMPT, latents=start.clone(), num_inference_steps=STEPS, guidance_scale=7.5,
            output_type=output_type,
        ).images  # fmt: skip
        return np.asarray(images[0])

    return ours[0], np.asarray(our_image), torch.as_tensor(diffusers("latent")), diffusers("np")


def _assert_same(ours: torch.Tensor, our_image, theirs: torch.Tensor, their_image) -> None:
    assert (ours - theirs).abs().max() <= MAX_DIFFERENCE * theirs.abs().max()
    # The decoded images agree to the rounding of our 8-bit pixels.
    assert np.abs(our_image / 255 - their_image).max() <= 0.5 / 255 + 1e-5


def test_guided_ddim_sampling_is_diffusers_pipeline(folder, model, ddim_inversion):
    _assert_same(*_sample_both(folder, model, _from_given_latent(model, ddim_inversion)))


@pytest.mark.parametrize(
    "scheduler",
    [
        PNDMScheduler(skip_prk_steps=True),  # diffusers' test default: linear betas, offset 0
        EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="trailing",
        ),  # fmt: skip
    ],
    ids=["pndm-linear", "euler-trailing"],
)
def test_sampling_follows_any_scheduler_config_the_folder_ships(scheduler, tmp_path):
    folder = build_diffusers_sd(tmp_path / "sd1", "sd1")
    scheduler.save_pretrained(folder / "scheduler")
    model = load_model(folder)
    inversion = invert(model, tiny_image(model.resolution), PROMPT, "ddim", STEPS, progress=False)
    given = _from_given_latent(model, inversion)
    ours, our_image, theirs, their_image = _sample_both(folder, model, given)
    _assert_same(ours, our_image, theirs, their_image)
    sd_schedule = copy.copy(model)
    sd_schedule.scheduler = sd_ddim_scheduler()
    other, _ = reconstruct(sd_schedule, given)
    assert (other[0] - theirs).abs().max() > 1e-3  # the folder's schedule made the difference


def _final_error(model, inversion, guidance: float) -> float:
    replay = copy.copy(inversion)
    replay.settings = {**inversion.settings, "guidance": guidance}
    latent, _ = reconstruct(model, replay)
    return (latent[0] - inversion.latents[0]).pow(2).mean().item()


def _power(inversion) -> float:
    return inversion.latents[0].pow(2).mean().item()


def test_ddim_inversion_then_sampling_at_guidance_one_returns_the_latent(model, ddim_inversion):
    error = _final_error(model, ddim_inversion, 1.0)
    assert error < 1e-2 * _power(ddim_inversion)
    assert error * 4 < _final_error(model, ddim_inversion, 7.5)  # where guidance breaks it


def test_null_text_inversion_reconstructs_at_guidance_7_5(model, ddim_inversion):
    nti = invert(model, tiny_image(model.resolution), PROMPT, "nti", STEPS, progress=False)
    assert nti.guidance == 7.5
    error = _final_error(model, nti, 7.5)
    assert error < 1e-2 * _power(nti)
    assert error * 4 < _final_error(model, ddim_inversion, 7.5)


@pytest.mark.parametrize("method", ["ddim", "nti", "dpl"])
def test_dpl_run_edits_with_every_method(folder, model, method, tmp_path):
    image = tmp_path / "photo.png"
    tiny_image(model.resolution).save(image)
    out = tmp_path / "edit.png"
    argv = ["run", str(image), "--prompt", PROMPT, "--target", "a cat and a lion"]
    argv += ["--out", str(out), "--model", str(folder), "--method", method, "--steps", "2"]
    argv += ["--device", "cpu", *(["--words", "cat", "dog"] if method == "dpl" else [])]
    assert main(argv) == 0
    assert Image.open(out).size == (model.resolution, model.resolution)
