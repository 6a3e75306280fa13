"""Model loading: layouts, defaults, identity, frozen weights and the errors users can cause."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_defaults
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from sd_folders import build_diffusers_sd, tiny_safety_checker

from dpl_edit.cli import main
from dpl_edit.engine.model import ModelDefaults, load_model, same_model
from dpl_edit.errors import DplError


def test_loads_sd_layout_with_sd_scheduler_settings(tiny_model):
    config = tiny_model.scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert (config.num_train_timesteps, config.steps_offset) == (1000, 1)
    assert not config.set_alpha_to_one and not config.clip_sample
    assert config.prediction_type == "epsilon"
    assert (tiny_model.latent_size, tiny_model.resolution, tiny_model.text_len) == (16, 32, 16)
    assert tiny_model.scaling_factor == 5.0


def test_all_weights_are_frozen(tiny_model):
    for module in (tiny_model.unet, tiny_model.vae, tiny_model.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())


def test_defaults_file_is_read(tiny_model):
    assert tiny_model.defaults == ModelDefaults(8, 16, 8, ())


def test_sd_defaults_without_file_and_object_words(tiny_model_dir, tmp_path):
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    (copy / "dpl_defaults.json").unlink()
    # Cross-attention at 16 and 8 (and the mid block's 4): SD's choice is the coarser, 8.
    assert load_model(copy).defaults == ModelDefaults(8, 16, 8, ())
    (copy / "dpl_defaults.json").write_text(json.dumps({"object_words": ["cat", "dog"]}))
    assert load_model(copy).defaults.object_words == ("cat", "dog")


def test_identity_is_stable_and_tells_models_apart(tiny_model, tiny_model_dir, tiny_vpred_dir):
    again = load_model(tiny_model_dir)
    assert again.identity == tiny_model.identity
    assert tiny_model.identity.startswith("tiny-sd@")
    other = load_model(tiny_vpred_dir)
    assert other.scheduler.config.prediction_type == "v_prediction"
    # The v-prediction copy has the same UNet and text encoder: identity is about those.
    assert same_model(other.identity, tiny_model.identity)
    assert not same_model("x@0123456789ab", tiny_model.identity)


def test_retrained_weights_get_a_new_identity(tiny_model, tiny_model_dir, tmp_path):
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny-sd"))
    weights = next((copy / "unet").glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] + 1e-3  # same architecture, same file size, other weights
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert (
        weights.stat().st_size
        == next((tiny_model_dir / "unet").glob("*.safetensors")).stat().st_size
    )
    assert not same_model(load_model(copy).identity, tiny_model.identity)


def test_large_weight_files_are_sampled_not_read_whole(tmp_path):
    from dpl_edit.engine.model import _content_sample

    big = tmp_path / "big.bin"
    data = bytearray(8 << 20)
    big.write_bytes(bytes(data))
    before = _content_sample(big, whole_limit=1 << 20, chunk=1 << 16)
    assert len(before) == 4 << 16
    data[(8 << 20) // 3 + 5] = 1  # inside the second sample
    big.write_bytes(bytes(data))
    assert _content_sample(big, whole_limit=1 << 20, chunk=1 << 16) != before


def test_env_var_and_bundled_fallback(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("DPL_MODEL", str(tiny_model_dir))
    assert load_model().identity.startswith("tiny-sd@")
    monkeypatch.delenv("DPL_MODEL")
    monkeypatch.setattr("dpl_edit.engine.model.BUNDLED_MODEL", Path("/nonexistent/world"))
    with pytest.raises(DplError, match="DPL_MODEL"):
        load_model()


def test_bundled_models_are_addressed_by_name(tiny_model_dir, tmp_path, monkeypatch):
    shelf = tmp_path / "models"
    shelf.mkdir()
    (shelf / "world-x").symlink_to(tiny_model_dir, target_is_directory=True)
    (shelf / "not-a-model").mkdir()  # a folder without model_index.json is no model
    monkeypatch.setattr("dpl_edit.engine.model.BUNDLED_MODELS", shelf)
    monkeypatch.chdir(tmp_path)  # no local folder called world-x
    assert load_model("world-x").identity.startswith("world-x@")
    with pytest.raises(DplError, match=r"bundled model \(world-x\)"):
        load_model("not-a-model")


@pytest.mark.parametrize("bad", ["not-a-folder-xyz/model", "missing_components"])
def test_not_an_sd_model(bad, tmp_path):
    if bad == "missing_components":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "model_index.json").write_text("{}")
        bad = str(tmp_path / "m")
    with pytest.raises(DplError, match="give a local diffusers Stable Diffusion folder"):
        load_model(bad)


def test_corrupt_weights_are_a_user_error(tiny_model_dir, tmp_path):
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    (copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DplError, match="cannot load"):
        load_model(copy)


@pytest.mark.parametrize("device", ["gpu", "cuda:banana", "tpu"])
def test_unknown_device(device, tiny_model_dir):
    with pytest.raises(DplError, match="device"):
        load_model(tiny_model_dir, device=device)


def test_unknown_dtype(tiny_model_dir):
    with pytest.raises(DplError, match="dtype"):
        load_model(tiny_model_dir, dtype="float8")


def test_encode_decode_round_trip_shapes(tiny_model):
    pixels = torch.zeros(1, 3, 32, 32)
    latent = tiny_model.encode_image(pixels)
    assert latent.shape == (1, 4, 16, 16)
    (image,) = tiny_model.decode_latents(latent)
    assert image.size == (32, 32) and image.mode == "RGB"


def test_auto_device_is_the_gpu_when_there_is_one(tiny_model_dir):
    model = load_model(tiny_model_dir, device="auto")
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def _unet(sample_size: int, down: tuple[str, ...], up: tuple[str, ...]) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size, block_out_channels=(8,) * len(down), layers_per_block=1,
        down_block_types=down, up_block_types=up, cross_attention_dim=8, attention_head_dim=2,
        norm_num_groups=4,
    )  # fmt: skip


_CROSS, _PLAIN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"


@pytest.mark.parametrize(
    ("sample_size", "down", "up", "levels"),
    [
        # SD 1.x/2.x: cross-attention at 64, 32 and 16 (the mid block's 8 does not count).
        (
            64,
            (_CROSS, _CROSS, _CROSS, _PLAIN),
            (_PLAIN_UP, _CROSS_UP, _CROSS_UP, _CROSS_UP),
            (16, 32, 16),
        ),
        # diffusers' test layout: cross-attention only in the second block, at 16.
        (32, (_PLAIN, _CROSS), (_CROSS_UP, _PLAIN_UP), (16, 16, 16)),
        # SDXL's layout: cross-attention at 64 and 32 for a 128 latent, none at 128.
        (128, (_PLAIN, _CROSS, _CROSS), (_CROSS_UP, _CROSS_UP, _PLAIN_UP), (32, 64, 32)),
    ],
    ids=["sd", "diffusers-test", "sdxl"],
)
def test_attention_levels_are_derived_from_the_unet(sample_size, down, up, levels):
    assert ModelDefaults.derived(_unet(sample_size, down, up)) == ModelDefaults(*levels)


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory) -> Path:
    return build_diffusers_sd(tmp_path_factory.mktemp("sd1") / "sd1", "sd1")


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory) -> Path:
    return build_diffusers_sd(tmp_path_factory.mktemp("fp16") / "sd1", "sd1", variant="fp16")


def test_defaults_file_overrides_only_levels_the_unet_has(tiny_model_dir, sd1_dir, tmp_path):
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    write_defaults(copy, cross_attention_res=16)
    # The blend follows the cross-attention maps; self-attention stays derived.
    assert load_model(copy).defaults == ModelDefaults(16, 16, 16)
    write_defaults(copy, self_attention_res=32)
    with pytest.raises(DplError, match=r"self_attention_res 32 .* self-attention \(4, 8, 16\)"):
        load_model(copy)
    copy = Path(shutil.copytree(sd1_dir, tmp_path / "sd1"))
    write_defaults(copy, cross_attention_res=8)  # latent/4: no cross-attention there
    with pytest.raises(DplError, match=r"cross_attention_res 8 .* cross-attention \(16\)"):
        load_model(copy)


def _weights(model) -> torch.Tensor:
    return model.unet.conv_in.weight


def test_a_folder_with_one_variant_loads_it_on_its_own(fp16_dir, sd1_dir):
    model = load_model(fp16_dir)
    assert _weights(model).dtype == torch.float32  # cast to the asked dtype
    plain = _weights(load_model(sd1_dir))
    assert torch.equal(_weights(model), plain.half().float())
    assert torch.equal(_weights(load_model(fp16_dir, variant="fp16")), _weights(model))


def test_variant_chooses_among_weights_and_counts_in_the_identity(fp16_dir, sd1_dir, tmp_path):
    both = Path(shutil.copytree(sd1_dir, tmp_path / "both"))
    shutil.copytree(fp16_dir, both, dirs_exist_ok=True)
    plain, half = load_model(both), load_model(both, variant="fp16")
    assert torch.equal(_weights(plain), _weights(load_model(sd1_dir)))
    assert torch.equal(_weights(half), _weights(load_model(fp16_dir)))
    assert not same_model(plain.identity, half.identity)
    with pytest.raises(DplError, match=r"no 'bf16' weights \(it has 'fp16', plain\)"):
        load_model(both, variant="bf16")


def test_several_variants_and_no_plain_weights_need_a_choice(fp16_dir, tmp_path):
    two = Path(shutil.copytree(fp16_dir, tmp_path / "two"))
    for file in list(two.glob("*/*.fp16.safetensors")):
        shutil.copy(file, file.with_name(file.name.replace(".fp16.", ".ema.")))
    with pytest.raises(DplError, match=r"variants 'ema', 'fp16'; choose one with --variant"):
        load_model(two)
    assert torch.equal(_weights(load_model(two, variant="ema")), _weights(load_model(fp16_dir)))


def test_cli_variant_option_and_one_line_errors(fp16_dir, image_file, tmp_path, capfd):
    argv = ["invert", str(image_file), "--prompt", "a cat", "--method", "ddim", "--steps", "1"]
    argv += ["--model", str(fp16_dir), "--device", "cpu", "--out"]
    assert main([*argv, str(tmp_path / "inv"), "--variant", "fp16"]) == 0
    capfd.readouterr()
    assert main([*argv, str(tmp_path / "inv2"), "--variant", "fp32"]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [
        f"error: '{fp16_dir}' has no 'fp32' weights (it has 'fp16')"
    ]


def test_broken_weights_give_one_line_without_the_libraries_logs(fp16_dir, tmp_path, capfd):
    copy = Path(shutil.copytree(fp16_dir, tmp_path / "copy"))
    (copy / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"garbage")
    with pytest.raises(DplError, match="cannot load"):
        load_model(copy)
    captured = capfd.readouterr()
    assert captured.out == captured.err == ""


@pytest.mark.parametrize("flags_everything", [True, False])
def test_a_safety_checker_with_weights_checks_every_decoded_image(flags_everything, tmp_path):
    checker = tiny_safety_checker(flags_everything)
    folder = build_diffusers_sd(tmp_path / "checked", "sd1", safety_checker=checker)
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    checked = [np.asarray(i) for i in load_model(folder).decode_latents(latents)]
    unchecked = load_model(folder, safety_checker=False)
    assert unchecked.safety is None
    plain_images = [np.asarray(i) for i in unchecked.decode_latents(latents)]
    for ours, plain in zip(checked, plain_images, strict=True):
        assert plain.any()
        assert np.array_equal(ours, np.zeros_like(plain) if flags_everything else plain)


def test_a_safety_checker_without_weights_is_skipped_with_a_note(tmp_path, caplog):
    folder = build_diffusers_sd(
        tmp_path / "listed", "sd1", safety_checker=tiny_safety_checker(True)
    )
    for file in (folder / "safety_checker").glob("*.safetensors"):
        file.unlink()
    with caplog.at_level(logging.WARNING, logger="dpl_edit.engine.model"):
        model = load_model(folder)
    assert model.safety is None
    assert [r.getMessage() for r in caplog.records] == [
        f"note: '{folder}' lists a safety checker without its weights; images are not checked"
    ]


@pytest.mark.parametrize(
    "pipeline",
    [
        "StableDiffusionXLPipeline",
        "StableDiffusion3Pipeline",
        "FluxPipeline",
        "KandinskyV22Pipeline",
        "StableDiffusionInpaintPipeline",
    ],  # fmt: skip
)
def test_other_pipelines_are_refused_before_any_work(pipeline, image_file, tmp_path, capsys):
    folder = tmp_path / "other"
    folder.mkdir()  # no components at all: nothing is read but model_index.json
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    message = (f"'{folder}' holds a {pipeline}, which dpl-edit cannot edit; dpl-edit supports "
               "Stable Diffusion 1.x and 2.x folders (StableDiffusionPipeline)")  # fmt: skip
    argv = ["run", str(image_file), "--prompt", "a cat", "--target", "a dog"]
    assert main([*argv, "--out", str(tmp_path / "x.png"), "--model", str(folder)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"in_channels": 9}, "9 input channels"),
        ({"addition_embed_type": "text_time"}, "'text_time' conditioning"),
    ],
)
def test_a_unet_that_is_not_text_to_image_is_refused(change, message, sd1_dir, tmp_path):
    copy = Path(shutil.copytree(sd1_dir, tmp_path / "copy"))
    config_file = copy / "unet" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(DplError, match=message):
        load_model(copy)


def test_the_scheduler_config_gives_the_noise_schedule(tiny_model_dir, sd1_dir, tmp_path):
    pndm = json.loads((sd1_dir / "scheduler" / "scheduler_config.json").read_text())
    assert pndm["_class_name"] == "PNDMScheduler"
    scheduler = load_model(sd1_dir).scheduler
    assert type(scheduler).__name__ == "DDIMScheduler" and not scheduler.config.clip_sample
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    config_file = copy / "scheduler" / "scheduler_config.json"
    config = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "linear",
              "steps_offset": 0, "clip_sample": True}  # fmt: skip
    config_file.write_text(json.dumps(config))
    scheduler = load_model(copy).scheduler
    expected = DDIMScheduler(beta_schedule="linear").alphas_cumprod
    assert torch.equal(scheduler.alphas_cumprod, expected)
    # As StableDiffusionPipeline runs any scheduler: offset 1, no clipping.
    assert scheduler.config.steps_offset == 1 and not scheduler.config.clip_sample
    config_file.write_text(json.dumps({**config, "prediction_type": "sample"}))
    with pytest.raises(DplError, match="unsupported prediction type 'sample'"):
        load_model(copy)


def test_a_cached_hub_snapshot_loads_by_its_id(fp16_dir, tmp_path, monkeypatch):
    """The hub cache's layout: a snapshot folder of links into content-addressed blobs."""
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    commit = "0" * 40
    (repo / "blobs").mkdir(parents=True)
    for i, file in enumerate(sorted(p for p in fp16_dir.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"{i:064x}"
        shutil.copy(file, blob)
        link = repo / "snapshots" / commit / file.relative_to(fp16_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    model = load_model("someone/tiny-sd")
    assert model.identity.startswith("someone/tiny-sd@")
    assert same_model(model.identity, load_model(fp16_dir).identity)
