"""DDIM and null-text inversion, reconstruction, and the inversion folder format."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from dpl_edit.engine.artifact import Inversion
from dpl_edit.engine.inversion import invert, reconstruct, reconstruction_image
from dpl_edit.engine.settings import NullTextSettings
from dpl_edit.engine.text import DynamicTokens
from dpl_edit.errors import DplError

PROMPT = "a cat and a dog"


@pytest.fixture(scope="module")
def inversions(tiny_model):
    from conftest import tiny_image

    image = tiny_image()
    return {
        method: invert(tiny_model, image, PROMPT, method=method, steps=10, progress=False)
        for method in ("ddim", "nti")
    }


def _final_error(model, inversion):
    latent, _ = reconstruct(model, inversion)
    return (latent[0] - inversion.latents[0]).pow(2).mean().item()


def test_nti_reconstructs_ten_times_better_than_ddim(tiny_model, inversions):
    assert inversions["ddim"].guidance == inversions["nti"].guidance == 7.5
    ddim_error = _final_error(tiny_model, inversions["ddim"])
    nti_error = _final_error(tiny_model, inversions["nti"])
    assert nti_error * 10 < ddim_error


def test_ddim_inversion_reconstructs_without_guidance(tiny_model, inversions):
    """Guidance is what breaks plain DDIM inversion: at guidance 1 it replays almost exactly."""
    unguided = copy.copy(inversions["ddim"])
    unguided.settings = {**unguided.settings, "guidance": 1.0}
    assert _final_error(tiny_model, unguided) * 10 < _final_error(tiny_model, inversions["ddim"])


def test_inversion_contents_and_costs(tiny_model, inversions):
    nti = inversions["nti"]
    assert nti.latents.shape == (11, 4, 16, 16)
    assert nti.null_embeddings.shape == (10, tiny_model.text_len, 32)
    assert nti.attention.shape == (8, 8, tiny_model.text_len)
    torch.testing.assert_close(nti.attention.sum(-1), torch.ones(8, 8))
    assert nti.words == [("a", [1]), ("cat", [2]), ("and", [3]), ("a", [4]), ("dog", [5])]
    assert nti.unet_evals["ddim_inversion"] == 10
    inner = nti.extras["null_inner_steps"]
    # per step: 1 conditional call, the inner steps, 1 call to advance the latent
    assert nti.unet_evals["null_text"] == sum(inner) + 2 * 10
    assert set(nti.timings) == {"encode", "ddim_inversion", "null_text"}
    # warm start: the null text drifts step by step away from the empty prompt's embedding
    assert not torch.allclose(nti.null_embeddings[0], nti.null_embeddings[-1])
    ddim = inversions["ddim"]
    torch.testing.assert_close(ddim.null_embeddings[0], ddim.null_embeddings[-1])


def test_early_stop_cuts_inner_steps(tiny_model):
    from conftest import tiny_image

    loose = NullTextSettings(early_stop=1.0)
    inversion = invert(
        tiny_model, tiny_image(), PROMPT, "nti", steps=3, null_text=loose, progress=False
    )
    assert inversion.extras["null_inner_steps"] == [1, 1, 1]


def test_save_load_round_trip(tiny_model, inversions, tmp_path):
    nti = inversions["nti"]
    nti.dynamic_tokens = DynamicTokens(["dog"], [[5]], torch.randn(10, 1, 32))
    nti.extras["trace"] = torch.arange(4.0)
    try:
        nti.save(tmp_path / "inv")
    finally:
        nti.dynamic_tokens = None
        del nti.extras["trace"]
    loaded = Inversion.load(tmp_path / "inv", tiny_model)
    torch.testing.assert_close(loaded.latents, nti.latents)
    torch.testing.assert_close(loaded.null_embeddings, nti.null_embeddings)
    torch.testing.assert_close(loaded.attention, nti.attention)
    assert (loaded.prompt, loaded.method, loaded.words) == (nti.prompt, nti.method, nti.words)
    assert loaded.settings == nti.settings and loaded.unet_evals == nti.unet_evals
    assert loaded.extras["null_inner_steps"] == nti.extras["null_inner_steps"]
    torch.testing.assert_close(loaded.extras["trace"], torch.arange(4.0))
    assert loaded.dynamic_tokens.words == ["dog"] and loaded.dynamic_tokens.positions == [[5]]
    assert np.array_equal(np.asarray(loaded.image), np.asarray(nti.image))
    meta = json.loads((tmp_path / "inv" / "meta.json").read_text())
    assert meta["format"] == "inversion" and meta["package_version"]
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


def test_existing_folder_is_refused_then_swapped(inversions, tmp_path):
    ddim, nti = inversions["ddim"], inversions["nti"]
    ddim.save(tmp_path / "inv")
    with pytest.raises(DplError, match="already exists"):
        nti.save(tmp_path / "inv")
    assert Inversion.load(tmp_path / "inv").method == "ddim"
    nti.save(tmp_path / "inv", overwrite=True)
    assert Inversion.load(tmp_path / "inv").method == "nti"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inv"]


def test_failed_write_leaves_the_old_folder(inversions, tmp_path, monkeypatch):
    inversions["ddim"].save(tmp_path / "inv")

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("dpl_edit.io.artifacts.save_file", explode)
    with pytest.raises(OSError):
        inversions["nti"].save(tmp_path / "inv", overwrite=True)
    assert Inversion.load(tmp_path / "inv").method == "ddim"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inv"]


def test_load_refuses_other_model_and_format(tiny_model, inversions, tmp_path):
    inversions["ddim"].save(tmp_path / "inv")
    meta_file = tmp_path / "inv" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "model_identity": "other@0123456789ab"}))
    with pytest.raises(DplError, match="was made with model other@"):
        Inversion.load(tmp_path / "inv", tiny_model)
    meta_file.write_text(json.dumps({**meta, "format_version": 999}))
    with pytest.raises(DplError, match="format version 999"):
        Inversion.load(tmp_path / "inv")
    with pytest.raises(DplError, match="not a dpl-edit inversion folder"):
        Inversion.load(tmp_path)


def test_unknown_method(tiny_model):
    from conftest import tiny_image

    with pytest.raises(DplError, match="unknown inversion method"):
        invert(tiny_model, tiny_image(), PROMPT, method="magic")


def test_dynamic_tokens_follow_words_into_other_prompts(tiny_model):
    vectors = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    tokens = DynamicTokens(["hippopotamus", "dog"], [[2, 3, 4], [7]], vectors)
    got = tokens.token_vectors(
        tiny_model.tokenizer, ["a hippopotamus and a dog", "a big dog and a cat"], step=1
    )
    assert set(got) == {(0, 2), (0, 3), (0, 4), (0, 7), (1, 3)}
    torch.testing.assert_close(got[(0, 3)], vectors[1, 1])
    torch.testing.assert_close(got[(1, 3)], vectors[1, 3])


def test_same_input_gives_identical_inversions(tiny_model):
    from conftest import tiny_image

    first, second = (
        invert(tiny_model, tiny_image(), PROMPT, "nti", steps=2, progress=False) for _ in range(2)
    )
    assert torch.equal(first.latents, second.latents)
    assert torch.equal(first.null_embeddings, second.null_embeddings)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inverts_learns_tokens_and_edits(tiny_model_dir, tiny_model, dtype):
    """In half precision the null text and the word vectors are optimised in float32: the
    inversion stays finite and its null text still beats plain DDIM inversion by far."""
    from conftest import tiny_image

    from dpl_edit.engine.edit import edit
    from dpl_edit.engine.model import load_model

    half = load_model(tiny_model_dir, dtype=dtype)
    ddim = invert(half, tiny_image(), PROMPT, method="ddim", steps=10, progress=False)
    dpl = invert(
        half, tiny_image(), PROMPT, method="dpl", steps=10, progress=False, words=["cat", "dog"]
    )
    assert dpl.null_embeddings.dtype == torch.float32
    assert torch.isfinite(dpl.null_embeddings).all()
    assert torch.isfinite(dpl.dynamic_tokens.vectors).all()
    assert _final_error(half, dpl) * 10 < _final_error(half, ddim)
    result = edit(half, dpl, "a cat and a lion", progress=False)
    assert np.isfinite(np.asarray(result.image, dtype=np.float64)).all()
    assert result.latents.isfinite().all()


def test_the_reconstruction_image_is_the_stored_path_decoded_or_a_replay(tiny_model, inversions):
    assert inversions["ddim"].trajectory is None  # DDIM has no fitted guided path
    inversion = copy.copy(inversions["nti"])
    stored = np.asarray(reconstruction_image(tiny_model, inversion), dtype=np.float64)
    inversion.trajectory = None  # as for a folder saved before paths were stored
    replayed = np.asarray(reconstruction_image(tiny_model, inversion), dtype=np.float64)
    assert np.abs(stored - replayed).max() <= 1
