"""End-to-end Prompt-to-Prompt edits of an inverted image on the tiny model."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from dpl_edit.engine.attention import attention_levels
from dpl_edit.engine.edit import cross_replace_alpha, edit, plan_edit
from dpl_edit.engine.inversion import invert, reconstruct
from dpl_edit.engine.text import DynamicTokens
from dpl_edit.errors import DplError

PROMPT = "a cat and a dog"


@pytest.fixture(scope="module")
def inversion(tiny_model):
    from conftest import tiny_image

    return invert(tiny_model, tiny_image(), PROMPT, method="nti", steps=6, progress=False)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_source_branch_is_the_reconstruction(tiny_model, inversion):
    result = edit(tiny_model, inversion, "a cat and a lion", blend=["dog", "lion"], progress=False)
    _, reconstruction = reconstruct(tiny_model, inversion)
    assert np.abs(_pixels(result.source) - _pixels(reconstruction)).max() <= 1
    assert result.unet_evals == {"edit": inversion.steps}
    assert result.attention.shape == (2, 8, 8, tiny_model.text_len)


def test_word_swap_changes_the_image_and_identity_edit_does_not(tiny_model, inversion):
    swapped = edit(tiny_model, inversion, "a cat and a lion", progress=False)
    same = edit(tiny_model, inversion, PROMPT, progress=False)
    assert np.abs(_pixels(same.image) - _pixels(same.source)).max() <= 1
    assert np.abs(_pixels(swapped.image) - _pixels(swapped.source)).mean() > 0.5


def test_local_blend_keeps_the_source_outside_the_mask(tiny_model, inversion):
    # The random model's maps are nearly flat, so a high threshold is needed for a partial mask.
    result = edit(
        tiny_model,
        inversion,
        "a cat and a lion",
        blend=["dog", "lion"],
        blend_threshold=0.97,
        progress=False,
    )
    mask = result.blend_mask[0, 0].bool()
    assert 0 < mask.sum() < mask.numel()
    source, target = result.latents
    torch.testing.assert_close(target[:, ~mask], source[:, ~mask])
    assert (target[:, mask] - source[:, mask]).abs().mean() > 1e-3


def test_refine_and_reweight_run_and_differ(tiny_model, inversion):
    refined = edit(tiny_model, inversion, "a cat and a big dog", mode="refine", progress=False)
    boosted = edit(tiny_model, inversion, PROMPT, reweight={"dog": 4.0}, progress=False)
    assert np.abs(_pixels(boosted.image) - _pixels(boosted.source)).mean() > 0.5
    assert np.abs(_pixels(refined.image) - _pixels(refined.source)).mean() > 0.5


def test_cross_replace_windows_per_word(tiny_model):
    alpha = cross_replace_alpha(
        {"default_": 0.5, "lion": (0.2, 1.0)}, "a cat and a lion", tiny_model.tokenizer, 10, 16
    )
    assert alpha[:, 1].tolist() == [1] * 5 + [0] * 5
    assert alpha[:, 5].tolist() == [0] * 2 + [1] * 8


@contextmanager
def _tokens_set_after_inversion(inversion):
    """Lets a test set `inversion.dynamic_tokens` after the fact. The stored source path no
    longer matches such tokens, so edits inside recompute it; both are put back afterwards."""
    trajectory, inversion.trajectory = inversion.trajectory, None
    try:
        yield
    finally:
        inversion.dynamic_tokens, inversion.trajectory = None, trajectory


def test_dynamic_tokens_are_used_in_both_branches(tiny_model, inversion):
    table = tiny_model.text_encoder.get_input_embeddings().weight
    dog = table[tiny_model.tokenizer.convert_tokens_to_ids("dog</w>")]
    target = "a big dog and a lion"
    with _tokens_set_after_inversion(inversion):
        # The learned vector equal to the word's own embedding changes nothing ...
        inversion.dynamic_tokens = DynamicTokens(["dog"], [[5]], dog.expand(inversion.steps, 1, -1))
        same = edit(tiny_model, inversion, target, mode="refine", progress=False)
        inversion.dynamic_tokens = DynamicTokens(
            ["dog"], [[5]], 3 * torch.randn(inversion.steps, 1, dog.shape[0])
        )
        moved = edit(tiny_model, inversion, target, mode="refine", progress=False)
        inversion.dynamic_tokens = None
        plain = edit(tiny_model, inversion, target, mode="refine", progress=False)
    assert np.abs(_pixels(same.image) - _pixels(plain.image)).max() <= 1
    # ... a different one changes the source branch and the target (which also has "dog").
    assert np.abs(_pixels(moved.source) - _pixels(plain.source)).mean() > 0.5
    assert np.abs(_pixels(moved.image) - _pixels(plain.image)).mean() > 0.5


def test_plain_target_tokens_keep_the_learned_vectors_in_the_source_only(tiny_model, inversion):
    table = tiny_model.text_encoder.get_input_embeddings().weight
    dog = table[tiny_model.tokenizer.convert_tokens_to_ids("dog</w>")]
    generator = torch.Generator().manual_seed(0)
    moved = dog + 3 * torch.randn(inversion.steps, 1, dog.shape[0], generator=generator)
    target = "a big dog and a lion"
    with _tokens_set_after_inversion(inversion):
        inversion.dynamic_tokens = DynamicTokens(["dog"], [[5]], moved)
        learned = edit(tiny_model, inversion, target, mode="refine", progress=False)
        plain = edit(
            tiny_model, inversion, target, mode="refine", progress=False, target_tokens="plain"
        )
        with pytest.raises(DplError, match="unknown target tokens"):
            edit(tiny_model, inversion, target, progress=False, target_tokens="both")
        inversion.dynamic_tokens = None
        untouched = edit(tiny_model, inversion, target, mode="refine", progress=False)
    # The source branch reads the learned vector either way ...
    assert np.abs(_pixels(plain.source) - _pixels(learned.source)).max() <= 1
    assert np.abs(_pixels(plain.source) - _pixels(untouched.source)).mean() > 0.5
    # ... and only "plain" gives the target the vocabulary's "dog", so its edit differs.
    assert np.abs(_pixels(plain.image) - _pixels(learned.image)).mean() > 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "a cat and a big lion"}, "mode .refine."),
        ({"target": PROMPT, "reweight": {"lion": 2.0}}, "'lion' is not in the prompt"),
        ({"target": PROMPT, "blend": ["tiger"]}, "in neither"),
        ({"target": PROMPT, "cross_replace_steps": {"tiger": 0.5}}, "'tiger' is not"),
        ({"target": PROMPT, "cross_replace_steps": 1.5}, "step fractions"),
        ({"target": PROMPT, "mode": "swap"}, "unknown edit mode"),
        ({"target": " ".join(["cat"] * 20)}, "at most"),
    ],
)
def test_bad_edits_are_user_errors(tiny_model, inversion, kwargs, message):
    with pytest.raises(DplError, match=message):
        edit(tiny_model, inversion, progress=False, **kwargs)


def test_edit_refuses_an_inversion_of_another_model(tiny_model, inversion):
    inversion.model_identity = "other@0123456789ab"
    try:
        with pytest.raises(DplError, match="was made with model"):
            edit(tiny_model, inversion, PROMPT, progress=False)
    finally:
        inversion.model_identity = tiny_model.identity


def test_an_edit_retraces_the_stored_source_path_with_a_smaller_batch(
    tiny_model, inversion, monkeypatch
):
    # The stored path is the guided replay of the inversion (computed independently here).
    latent, _ = reconstruct(tiny_model, inversion)
    torch.testing.assert_close(inversion.trajectory[-1:], latent.float(), atol=1e-5, rtol=0)
    rows = []
    predict = tiny_model.predict

    def counting(latents, t, context):
        rows.append(latents.shape[0])
        return predict(latents, t, context)

    monkeypatch.setattr(tiny_model, "predict", counting)
    kwargs = {"blend": ["dog", "lion"], "reweight": {"lion": 2.0}, "progress": False}
    retraced = edit(tiny_model, inversion, "a cat and a lion", **kwargs)
    assert set(rows) == {3}  # target unconditional, source and target conditional
    trajectory, inversion.trajectory = inversion.trajectory, None
    try:
        rows.clear()
        recomputed = edit(tiny_model, inversion, "a cat and a lion", **kwargs)
        assert set(rows) == {4}
    finally:
        inversion.trajectory = trajectory
    torch.testing.assert_close(retraced.latents, recomputed.latents, atol=1e-4, rtol=0)
    torch.testing.assert_close(retraced.attention, recomputed.attention, atol=1e-5, rtol=0)
    torch.testing.assert_close(retraced.blend_mask, recomputed.blend_mask)
    # Another guidance than the inversion's leaves the stored path: the source is recomputed.
    rows.clear()
    edit(tiny_model, inversion, "a cat and a lion", guidance=3.0, progress=False)
    assert set(rows) == {4}


def test_blend_res_picks_the_level_the_mask_is_cut_from(tiny_model, inversion):
    levels = attention_levels(tiny_model.unet, cross=True)
    default = plan_edit(tiny_model, PROMPT, "a cat and a lion", 6, blend=["dog", "lion"])
    assert default.local_blend.res == tiny_model.defaults.blend_res
    for res in levels:
        plan = plan_edit(tiny_model, PROMPT, "a cat and a lion", 6, blend=["dog"], blend_res=res)
        assert plan.local_blend.res == res
    finest = edit(
        tiny_model,
        inversion,
        "a cat and a lion",
        blend=["dog"],
        blend_res=levels[-1],
        progress=False,
    )
    assert finest.blend_mask.shape[-1] == tiny_model.latent_size
    with pytest.raises(DplError, match="blend resolution 3"):
        edit(tiny_model, inversion, "a cat and a lion", blend=["dog"], blend_res=3, progress=False)
