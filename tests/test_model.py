"""Model loading: layouts, defaults, identity, frozen weights and the errors users can cause."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

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
    assert load_model(copy).defaults == ModelDefaults(4, 8, 4, ())
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
