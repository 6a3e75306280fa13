"""Dynamic Prompt Learning end to end on the tiny model: token stage, background, artifacts."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dpl_edit.dpl.losses import (
    DplLossConfig,
    LossReport,
    background_loss,
    balancing_loss,
    disjoint_loss,
)
from dpl_edit.dpl.stage import (
    ORIGINAL_NULL_TEXT,
    BackgroundSettings,
    TokenStage,
    default_config,
    word_token_groups,
)
from dpl_edit.engine.artifact import Inversion
from dpl_edit.engine.attention import CrossAttentionStore, controlled_attention
from dpl_edit.engine.ddim import Ddim
from dpl_edit.engine.edit import edit
from dpl_edit.engine.inversion import invert
from dpl_edit.engine.model import load_model
from dpl_edit.engine.text import encode_text, step_embeddings
from dpl_edit.errors import DplError

PROMPT = "a cat and a dog"
CAT, DOG = 2, 5
STEPS = 3
# No thresholds, so every inner step updates and the test does not depend on where the random
# model's losses start relative to the paper's thresholds.
FORCED = DplLossConfig(max_inner_steps=5, use_thresholds=False)


def _invert(model, prompt=PROMPT, **options):
    from conftest import tiny_image

    options.setdefault("dpl_config", FORCED)
    return invert(model, tiny_image(), prompt, method="dpl", steps=STEPS, progress=False, **options)


@pytest.fixture(scope="module")
def dpl_inversion(tiny_model):
    return _invert(tiny_model, words=["cat", "dog"])


def _embedding_rows(model, words):
    table = model.text_encoder.get_input_embeddings().weight
    ids = [
        model.tokenizer.convert_tokens_to_ids(t) for w in words for t in model.tokenizer.tokenize(w)
    ]
    return table[ids].detach().float()


@torch.no_grad()
def _maps(model, inversion, vectors, step):
    """Cross-attention of the conditional prompt at `step` on the inverted noisy latent, with
    the cat and dog vectors put in directly (independently of the DPL code's mapping)."""
    t = Ddim(model.scheduler, inversion.steps).timesteps[step]
    cond = encode_text(model, [PROMPT], {(0, CAT): vectors[0], (0, DOG): vectors[1]})
    store = CrossAttentionStore([model.defaults.cross_attention_res])
    with controlled_attention(model.unet, [store]):
        model.predict(inversion.latents[-1:], t, cond)
    return store.current(model.defaults.cross_attention_res)[0]


def test_learned_tokens_lower_balancing_and_disjoint_losses(tiny_model, dpl_inversion):
    """Step 0 runs on the noisiest inverted latent, so its losses can be recomputed exactly."""
    groups = [[CAT], [DOG]]
    before = _maps(tiny_model, dpl_inversion, _embedding_rows(tiny_model, ["cat", "dog"]), 0)
    after = _maps(tiny_model, dpl_inversion, dpl_inversion.dynamic_tokens.vectors[0], 0)
    assert balancing_loss(after, groups) < balancing_loss(before, groups) - 1e-3
    assert disjoint_loss(after, groups) < disjoint_loss(before, groups)
    first = dpl_inversion.extras["dpl_trace"][0]["first"]
    assert first["at"] == pytest.approx(float(balancing_loss(before, groups)), rel=1e-4)
    assert first["dj"] == pytest.approx(float(disjoint_loss(before, groups)), rel=1e-4)


def test_losses_read_the_chosen_level(tiny_model):
    """With `loss_res` set to the tiny model's coarser level, the first recorded balancing loss
    is the one of that level's maps, recomputed here from a separate UNet call."""
    coarse = 4
    assert coarse != tiny_model.defaults.cross_attention_res
    config = dataclasses.replace(FORCED, loss_res=(coarse,), max_inner_steps=1, use_bg=False)
    inversion = _invert(tiny_model, words=["cat", "dog"], dpl_config=config)
    t = Ddim(tiny_model.scheduler, STEPS).timesteps[0]
    cond = encode_text(tiny_model, [PROMPT])
    store = CrossAttentionStore([coarse])
    with torch.no_grad(), controlled_attention(tiny_model.unet, [store]):
        tiny_model.predict(inversion.latents[-1:], t, cond)
    maps = store.current(coarse)[0]
    assert maps.shape[:2] == (coarse, coarse)
    first = inversion.extras["dpl_trace"][0]["first"]
    assert first["at"] == pytest.approx(float(balancing_loss(maps, [[CAT], [DOG]])), rel=1e-4)
    assert inversion.settings["dpl"]["losses"]["loss_res"] == [coarse]


def test_a_level_the_model_lacks_is_refused_before_work(tiny_model):
    with pytest.raises(DplError, match="no cross-attention at 3x3"):
        _invert(tiny_model, words=["cat"], dpl_config=DplLossConfig(loss_res=(3,)))


def test_trace_costs_and_settings(tiny_model, dpl_inversion):
    trace = dpl_inversion.extras["dpl_trace"]
    assert [step["inner_steps"] for step in trace] == [5] * STEPS
    assert not any(step["stopped_early"] for step in trace)
    assert all(step["first"]["bg"] is not None for step in trace)
    assert trace[0]["first"]["th_at"] is None  # thresholds off in this run
    evals = dpl_inversion.unet_evals
    assert evals["dpl_tokens"] == 5 * STEPS
    assert evals["null_text"] == sum(dpl_inversion.extras["null_inner_steps"]) + 2 * STEPS
    assert {"dpl_tokens", "dpl_background", "null_text"} <= set(dpl_inversion.timings)
    settings = dpl_inversion.settings["dpl"]
    assert settings["words"] == ["cat", "dog"] and settings["token_groups"] == [[CAT], [DOG]]
    assert settings["background_source"] == "estimated"
    assert dpl_inversion.dynamic_tokens.vectors.shape == (STEPS, 2, 32)


def test_warm_start_and_early_stop_with_loose_thresholds(tiny_model):
    """Thresholds that every loss meets: no update at any step, the vectors stay the words' own
    embeddings, and each step costs exactly one UNet call."""
    loose = DplLossConfig(beta_at=10.0, beta_dj=10.0, beta_bg=10.0)
    inversion = _invert(tiny_model, words=["dog"], dpl_config=loose, null_text=ORIGINAL_NULL_TEXT)
    assert [step["inner_steps"] for step in inversion.extras["dpl_trace"]] == [0] * STEPS
    initial = _embedding_rows(tiny_model, ["dog"])
    for step in range(STEPS):
        torch.testing.assert_close(inversion.dynamic_tokens.vectors[step], initial)
    assert inversion.unet_evals["dpl_tokens"] == STEPS
    assert inversion.extras["null_inner_steps"] == [51] * STEPS  # the original code's null text


def test_other_words_and_the_model_are_untouched(tiny_model, tiny_model_dir, dpl_inversion):
    fresh = load_model(tiny_model_dir)
    for (name, param), original in zip(
        tiny_model.text_encoder.named_parameters(), fresh.text_encoder.parameters(), strict=True
    ):
        assert torch.equal(param, original), name
    for module in (tiny_model.unet, tiny_model.text_encoder, tiny_model.vae):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())

    # Token plus position embeddings, as the transformer receives them.
    inputs = []
    encoder = tiny_model.text_encoder
    embeddings = getattr(encoder, "text_model", encoder).embeddings  # transformers 4.x / 5.x
    hook = embeddings.register_forward_hook(
        lambda _m, _i, output: inputs.append(output.detach().clone())
    )
    try:
        for step in range(STEPS):
            step_embeddings(tiny_model, [PROMPT], dpl_inversion.dynamic_tokens, step, {})
            step_embeddings(tiny_model, [PROMPT], None, step, {})
    finally:
        hook.remove()
    for step in range(STEPS):
        learned, plain = inputs[2 * step][0], inputs[2 * step + 1][0]
        changed = (learned != plain).any(dim=-1).nonzero().flatten().tolist()
        assert changed == [CAT, DOG]
        torch.testing.assert_close(
            learned[[CAT, DOG]] - plain[[CAT, DOG]],
            dpl_inversion.dynamic_tokens.vectors[step]
            - _embedding_rows(tiny_model, ["cat", "dog"]),
        )


@pytest.mark.parametrize(
    ("target", "options", "target_slots"),
    [
        ("a cat and a lion", {}, {CAT: 0}),  # word swap
        ("a big cat and a dog", {"mode": "refine"}, {CAT + 1: 0, DOG + 1: 1}),
        ("a cat and a dog", {"reweight": {"dog": 2.0}}, {CAT: 0, DOG: 1}),
        ("a cat and a lion", {"blend": ["dog", "lion"]}, {CAT: 0}),
    ],
)
def test_edit_uses_the_learned_vectors_for_both_prompts(
    tiny_model, dpl_inversion, monkeypatch, target, options, target_slots
):
    """Every P2P mode encodes source and target with the step's vectors (`target_slots`: the
    target positions of the learned words -> their row)."""
    import dpl_edit.engine.text as text_module

    calls = []

    def spy(model, prompts, token_vectors=None):
        calls.append((list(prompts), token_vectors))
        return encode_text(model, prompts, token_vectors)

    monkeypatch.setattr(text_module, "encode_text", spy)
    edit(tiny_model, dpl_inversion, target, progress=False, **options)
    assert len(calls) == STEPS
    vectors = dpl_inversion.dynamic_tokens.vectors
    for step, (prompts, token_vectors) in enumerate(calls):
        assert prompts == [PROMPT, target]
        expected = {(0, CAT): 0, (0, DOG): 1}
        expected.update({(1, position): row for position, row in target_slots.items()})
        assert set(token_vectors) == set(expected)
        for slot, row in expected.items():
            torch.testing.assert_close(token_vectors[slot], vectors[step, row])


def test_round_trip_with_masks(tiny_model, dpl_inversion, tmp_path):
    folder = dpl_inversion.save(tmp_path / "inv")
    assert {"background.png", "word-cat.png", "word-dog.png"} <= {p.name for p in folder.iterdir()}
    loaded = Inversion.load(folder, tiny_model)
    assert loaded.method == "dpl" and loaded.settings == dpl_inversion.settings
    assert loaded.dynamic_tokens.words == ["cat", "dog"]
    assert loaded.dynamic_tokens.positions == [[CAT], [DOG]]
    torch.testing.assert_close(loaded.dynamic_tokens.vectors, dpl_inversion.dynamic_tokens.vectors)
    assert loaded.extras["dpl_trace"] == dpl_inversion.extras["dpl_trace"]
    assert loaded.timings == dpl_inversion.timings
    assert loaded.unet_evals == dpl_inversion.unet_evals
    assert loaded.trajectory.shape == (STEPS + 1, *dpl_inversion.latents.shape[1:])
    torch.testing.assert_close(loaded.trajectory, dpl_inversion.trajectory)
    for name in ("background", "word-cat", "word-dog"):
        image = loaded.extras[name]
        assert image.size == (tiny_model.resolution,) * 2
        assert np.array_equal(np.asarray(image), np.asarray(dpl_inversion.extras[name]))
    background = np.asarray(loaded.extras["background"]) > 0
    cat = np.asarray(loaded.extras["word-cat"]) > 0
    assert not (background & cat).any()  # a cluster is either a word's or the background


def test_one_multi_token_word_from_the_object_list(tiny_model):
    """One word: the disjoint loss is 0, never NaN; "hippopotamus" is three tokens, each with
    its own vector; the word is picked from the model's object list."""
    defaults = dataclasses.replace(tiny_model.defaults, object_words=("hippopotamus", "lion"))
    model = dataclasses.replace(tiny_model, defaults=defaults)
    inversion = _invert(model, "a photo of a hippopotamus")
    tokens = inversion.dynamic_tokens
    assert tokens.words == ["hippopotamus"] and tokens.positions == [[5, 6, 7]]
    assert tokens.vectors.shape == (STEPS, 3, 32)
    assert torch.isfinite(tokens.vectors).all()
    assert not torch.equal(tokens.vectors[-1], _embedding_rows(model, ["hippopotamus"]))
    assert all(step["first"]["dj"] == 0.0 for step in inversion.extras["dpl_trace"])


def test_no_background_found_skips_the_loss_with_one_warning(tiny_model, caplog):
    # Threshold 0 lets every cluster be claimed by a word, so nothing is left for background.
    caplog.set_level(logging.WARNING, logger="dpl_edit.dpl.stage")
    inversion = _invert(
        tiny_model, words=["cat", "dog"], background=BackgroundSettings(threshold=0.0)
    )
    assert inversion.settings["dpl"]["background_source"] == "estimated: none found"
    trace = inversion.extras["dpl_trace"]
    assert all(s["first"]["bg"] is None and s["first"]["bg_skipped"] for s in trace)
    assert len([r for r in caplog.records if "background" in r.getMessage()]) == 1
    assert "background" not in inversion.extras and "word-cat" in inversion.extras
    assert torch.isfinite(inversion.dynamic_tokens.vectors).all()


def test_user_mask_and_no_background(tiny_model, tmp_path, caplog):
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :16] = 255
    Image.fromarray(mask).save(tmp_path / "bg.png")
    user = _invert(tiny_model, words=["dog"], bg_mask=tmp_path / "bg.png")
    assert user.settings["dpl"]["background_source"] == "file"
    assert np.array_equal(np.asarray(user.extras["background"]) > 0, mask > 0)
    assert all(s["first"]["bg"] is not None for s in user.extras["dpl_trace"])

    caplog.set_level(logging.WARNING, logger="dpl_edit.dpl.stage")
    off = _invert(tiny_model, words=["dog"], no_bg=True)
    assert off.settings["dpl"]["background_source"] == "off"
    assert all(not s["first"]["bg_skipped"] for s in off.extras["dpl_trace"])
    assert not caplog.records
    with pytest.raises(DplError, match="contradict"):
        _invert(tiny_model, words=["dog"], no_bg=True, bg_mask=tmp_path / "bg.png")
    others = dataclasses.replace(FORCED, leak_region="others")
    with pytest.raises(DplError, match="needs the estimated word clusters"):
        _invert(tiny_model, words=["dog"], dpl_config=others, bg_mask=tmp_path / "bg.png")


@pytest.mark.parametrize("region", ["others", "others-split"])
def test_leak_region_others_scores_each_word_against_its_own_region(tiny_model, region):
    """The first recorded background loss equals the loss recomputed from a separate UNet call
    with each word's region built from the masks the inversion saved (for "others-split" the
    saved masks are the shared-out ones, so the same check covers it)."""
    config = dataclasses.replace(
        FORCED, leak_region=region, use_at=False, use_dj=False, max_inner_steps=1
    )
    inversion = _invert(tiny_model, words=["cat", "dog"], dpl_config=config)
    res = tiny_model.defaults.cross_attention_res
    owned = {
        w: torch.from_numpy(np.asarray(inversion.extras[f"word-{w}"].resize((res, res))) > 127)
        for w in ("cat", "dog")
    }
    background = inversion.extras.get("background")
    background = (
        torch.zeros(res, res, dtype=torch.bool)
        if background is None
        else torch.from_numpy(np.asarray(background.resize((res, res))) > 127)
    )
    regions = torch.stack([~m if m.any() else background for m in owned.values()])
    t = Ddim(tiny_model.scheduler, STEPS).timesteps[0]
    store = CrossAttentionStore([res])
    with torch.no_grad(), controlled_attention(tiny_model.unet, [store]):
        tiny_model.predict(inversion.latents[-1:], t, encode_text(tiny_model, [PROMPT]))
    want = background_loss(store.current(res)[0], [[CAT], [DOG]], regions)
    assert inversion.extras["dpl_trace"][0]["first"]["bg"] == pytest.approx(float(want), rel=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"words": ["lion"]}, "word 'lion' is not in the prompt"),
        ({"words": ["dog", "dog"]}, "named once"),
        ({}, "no list of object words.*name the words to learn"),
    ],
)
def test_user_errors(tiny_model, options, message):
    with pytest.raises(DplError, match=message):
        _invert(tiny_model, **options)


def test_no_object_word_in_the_prompt_and_options_without_dpl(tiny_model):
    from conftest import tiny_image

    defaults = dataclasses.replace(tiny_model.defaults, object_words=("lion",))
    model = dataclasses.replace(tiny_model, defaults=defaults)
    with pytest.raises(DplError, match="none of this model's object words.*name the words"):
        _invert(model)
    with pytest.raises(DplError, match="need method 'dpl'"):
        invert(tiny_model, tiny_image(), PROMPT, method="nti", words=["dog"])
    with pytest.raises(DplError, match="threshold must be in"):
        BackgroundSettings(threshold=2.0)


def _cli_error(capsys, argv) -> str:
    from dpl_edit.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--method", "dpl", "--words", "lion"], "word 'lion' is not in the prompt"),
        (["--method", "dpl"], "no list of object words; name the words to learn"),
        (["--method", "nti", "--words", "dog"], "need method 'dpl'"),
        (["--method", "nti", "--dpl-preset", "paper"], "need --method dpl"),
        ([], "no list of object words"),  # DPL is the default method
        (["--words", "dog", "--dpl-config", "no-bg.json", "--bg-mask", "m.png"], "contradict"),
    ],
)
def test_cli_errors(tiny_model_dir, image_file, tmp_path, capsys, options, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no-bg.json").write_text('{"use_bg": false}')
    Image.new("L", (32, 32)).save(tmp_path / "m.png")
    argv = ["invert", str(image_file), "--prompt", PROMPT, "--out", str(tmp_path / "inv")]
    err = _cli_error(capsys, [*argv, "--model", str(tiny_model_dir), "--steps", "2", *options])
    assert message in err
    assert not (tmp_path / "inv").exists()


def test_cli_run_and_attention_comparison(tiny_model_dir, image_file, tmp_path, capsys):
    import json

    from dpl_edit.cli import main

    common = ["--model", str(tiny_model_dir), "--steps", str(STEPS), "--json"]
    argv = ["run", str(image_file), "--prompt", PROMPT, "--target", "a cat and a lion"]
    argv += ["--out", str(tmp_path / "e.png"), "--method", "dpl", "--words", "cat", "dog"]
    settings = {"max_inner_steps": 2, "use_thresholds": False, "gaussian_formula": "standard"}
    settings |= {"softmax_tokens": "words", "loss_res": [4, 8], "threshold_index": "fraction"}
    settings["background"] = {"resample": "any"}
    (tmp_path / "research.json").write_text(json.dumps(settings))
    argv += ["--dpl-config", str(tmp_path / "research.json")]
    assert main(argv + common) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["inner_steps"]["dpl_tokens"] == [2] * STEPS
    assert len(summary["inner_steps"]["null_text"]) == STEPS
    assert summary["unet_evals"]["dpl_tokens"] == 2 * STEPS
    folder = tmp_path / "e_inversion"
    assert {"background.png", "word-cat.png", "word-dog.png"} <= {p.name for p in folder.iterdir()}
    losses = Inversion.load(folder).settings["dpl"]["losses"]
    assert losses["gaussian_formula"] == "standard" and losses["max_inner_steps"] == 2
    assert losses["softmax_tokens"] == "words" and losses["loss_res"] == [4, 8]
    assert losses["threshold_index"] == "fraction"
    assert Inversion.load(folder).settings["dpl"]["background"]["resample"] == "any"

    argv = ["invert", str(image_file), "--prompt", PROMPT, "--out", str(tmp_path / "nti")]
    assert main([*argv, "--method", "nti", *common]) == 0
    capsys.readouterr()
    single, double = tmp_path / "one.png", tmp_path / "two.png"
    assert main(["attention", str(folder), "--out", str(single)]) == 0
    assert (
        main(["attention", str(folder), "--compare", str(tmp_path / "nti"), "--out", str(double)])
        == 0
    )
    assert Image.open(double).height > 1.5 * Image.open(single).height

    argv = ["invert", str(image_file), "--prompt", "a dog and a cat", "--out", str(tmp_path / "o")]
    assert main([*argv, "--method", "nti", *common]) == 0
    capsys.readouterr()
    argv = ["attention", str(folder), "--compare", str(tmp_path / "o"), "--out", str(double)]
    argv.append("--overwrite")  # the error under test is the comparison's, not the output's
    assert "inverts 'a dog and a cat', not 'a cat and a dog'" in _cli_error(capsys, argv)


def _model_with_dpl_defaults(tiny_model_dir, tmp_path, dpl):
    """A copy of the tiny model folder whose dpl_defaults.json chooses DPL settings."""
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    defaults = json.loads((folder / "dpl_defaults.json").read_text())
    (folder / "dpl_defaults.json").write_text(json.dumps({**defaults, "dpl": dpl}))
    return load_model(folder)


def test_model_dpl_defaults_are_used_when_none_are_given(tiny_model_dir, tmp_path):
    chosen = {"use_at": False, "lambda_bg": 1.0, "loss_res": [4, 8], "max_inner_steps": 2}
    model = _model_with_dpl_defaults(tiny_model_dir, tmp_path, chosen)
    from conftest import tiny_image

    inversion = invert(model, tiny_image(), PROMPT, "dpl", steps=2, words=["cat"], progress=False)
    losses = inversion.settings["dpl"]["losses"]
    assert losses["use_at"] is False and losses["lambda_bg"] == 1.0
    assert losses["loss_res"] == [4, 8] and losses["max_inner_steps"] == 2
    assert losses["lambda_dj"] == DplLossConfig().lambda_dj  # the rest stays the paper's
    assert all(step["first"]["at"] is None for step in inversion.extras["dpl_trace"])
    # An explicit configuration wins over the model's.
    given = invert(
        model, tiny_image(), PROMPT, "dpl", steps=2, words=["cat"], progress=False,
        dpl_config=DplLossConfig(max_inner_steps=1),
    )  # fmt: skip
    assert given.settings["dpl"]["losses"]["use_at"] is True


def test_unknown_model_dpl_default_is_a_clear_error(tiny_model_dir, tmp_path):
    model = _model_with_dpl_defaults(tiny_model_dir, tmp_path, {"lambda_xx": 1.0})
    from conftest import tiny_image

    with pytest.raises(DplError, match="unknown settings: lambda_xx"):
        invert(model, tiny_image(), PROMPT, "dpl", steps=2, words=["cat"], progress=False)


class _Quadratic(TokenStage):
    """A token stage whose total loss is the squared distance of the vectors to `target`, so
    whether an update overshoots (and raises the loss) is known in advance."""

    target: torch.Tensor

    def losses(self, vectors, step, t, latent):
        total = (vectors - self.target).square().sum()
        # One active loss and no thresholds: never satisfied, so only the stopping rules stop.
        return LossReport(total, None, None, total, None, False)


def _one_quadratic_step(
    model, distance: float, **switches
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One step of `_Quadratic` from `distance` away in every coordinate (AdamW at lr 1, no
    weight decay, at most 4 updates unless `switches` say otherwise): start vectors, end
    vectors and the updates taken."""
    groups = word_token_groups(model, PROMPT, ["cat"])
    config = dataclasses.replace(
        FORCED, **{"lr": 1.0, "weight_decay": 0.0, "max_inner_steps": 4, **switches}
    )
    stage = _Quadratic(model, PROMPT, ["cat"], groups, [None], config, STEPS)
    start = stage.vectors.clone()
    stage.target = start + distance
    stage(0, 500, torch.zeros(1))  # the latent is unused by the quadratic loss
    return start, stage.vectors, stage.trace[0]["inner_steps"]


@pytest.mark.parametrize("distance", [0.1, 10.0])
def test_stop_on_rise_undoes_the_update_that_raised_the_loss(tiny_model, distance):
    # AdamW's first steps move every coordinate by about lr = 1: from 0.1 away that
    # overshoots (the loss rises at once); from 10 away every update lowers the loss.
    _, free, free_updates = _one_quadratic_step(tiny_model, distance)
    start, vectors, updates = _one_quadratic_step(tiny_model, distance, stop_on_rise=True)
    assert free_updates == 4
    if distance < 1:
        torch.testing.assert_close(vectors, start)
        assert updates == 0
    else:
        torch.testing.assert_close(vectors, free)
        assert updates == 4


@pytest.mark.parametrize(
    ("distance", "tol", "updates"), [(10.0, 0.0, 4), (10.0, 0.5, 1), (0.1, 0.0, 0)]
)
def test_plateau_tol_ends_a_step_once_an_update_gains_too_little(
    tiny_model, distance, tol, updates
):
    # From 10 away, AdamW's first update (lr 1) moves every coordinate by exactly 1, so the
    # loss falls by 1 - (9/10)^2 = 19% of itself: under a tolerance of 50% the step ends right
    # after it; a tolerance of 0 lets a falling loss run every update. From 0.1 away the first
    # update overshoots, raises the loss and is undone.
    _, free, free_updates = _one_quadratic_step(tiny_model, distance)
    start, vectors, taken = _one_quadratic_step(tiny_model, distance, plateau_tol=tol)
    assert taken == updates and free_updates == 4
    expected = {4: free, 1: start + 1.0, 0: start}[updates]
    torch.testing.assert_close(vectors, expected)


@pytest.mark.parametrize(
    ("name", "value"),
    [("plateau_tol", -0.1), ("plateau_tol", 1.0)]
    + [("learn_until", fraction) for fraction in (0.0, -0.5, 1.5)],
)
def test_stopping_rules_must_be_fractions(name, value):
    with pytest.raises(DplError, match=name):
        DplLossConfig(**{name: value})


def _cli_dpl_config(model, tmp_path, settings=None):
    """The DPL configuration `dpl invert --method dpl` builds for `model` with `settings` in a
    --dpl-config file (None: no file)."""
    import json

    from dpl_edit.cli import _dpl_choice, _inversion_settings, build_parser

    argv = ["invert", "in.png", "--prompt", PROMPT, "--out", "out", "--method", "dpl"]
    if settings is not None:
        (tmp_path / "settings.json").write_text(json.dumps(settings))
        argv += ["--dpl-config", str(tmp_path / "settings.json")]
    args = build_parser().parse_args(argv)
    return _inversion_settings(args, _dpl_choice(args), model)["dpl_config"]


@pytest.mark.parametrize(("name", "value"), [("plateau_tol", 0.001), ("learn_until", 0.25)])
def test_cli_stopping_rules_reach_the_dpl_settings(tiny_model, tmp_path, name, value):
    assert getattr(_cli_dpl_config(tiny_model, tmp_path, {name: value}), name) == value


def test_learn_until_keeps_the_last_learned_vectors_without_unet_calls(tiny_model):
    # 3 steps, learn_until 0.5: steps 0 and 1 (< 1.5) learn with all 5 forced updates, step 2
    # keeps step 1's vectors and calls the UNet only for the null text.
    config = dataclasses.replace(FORCED, learn_until=0.5)
    inversion = _invert(tiny_model, words=["cat", "dog"], dpl_config=config)
    trace = inversion.extras["dpl_trace"]
    assert [step["inner_steps"] for step in trace] == [5, 5, 0]
    assert inversion.unet_evals["dpl_tokens"] == 10
    vectors = inversion.dynamic_tokens.vectors
    torch.testing.assert_close(vectors[2], vectors[1])
    assert not torch.equal(vectors[1], vectors[0])


@pytest.mark.parametrize("max_drift", [None, 0.5, 1e6])
def test_max_drift_pulls_vectors_back_onto_the_sphere_around_their_embedding(tiny_model, max_drift):
    # One AdamW step without weight decay moves every coordinate by exactly lr towards the
    # target; a bound keeps that direction but cuts the offset to max_drift x the row's norm.
    start, vectors, _ = _one_quadratic_step(
        tiny_model, 10.0, max_inner_steps=1, max_drift=max_drift
    )
    step = torch.ones_like(start)  # lr 1 in every coordinate
    if max_drift == 0.5:
        step = step / step.norm(dim=-1, keepdim=True) * 0.5 * start.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(vectors, start + step)


def test_max_drift_must_be_positive():
    with pytest.raises(DplError, match="max_drift"):
        DplLossConfig(max_drift=0.0)


@pytest.mark.parametrize(
    ("field", "model_value", "value", "expected"),
    [
        ("max_drift", 0.5, "unset", 0.5),
        ("max_drift", 0.5, 0.3, 0.3),
        ("max_drift", 0.5, None, None),
        ("plateau_tol", 1e-4, "unset", 1e-4),
        ("plateau_tol", 1e-4, 0.001, 0.001),
        ("plateau_tol", 1e-4, None, None),
    ],
)
def test_cli_setting_or_null_overrides_the_models_setting(
    tiny_model_dir, tmp_path, field, model_value, value, expected
):
    model = _model_with_dpl_defaults(tiny_model_dir, tmp_path, {field: model_value})
    config = _cli_dpl_config(model, tmp_path, None if value == "unset" else {field: value})
    assert getattr(config or default_config(model), field) == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_drift", v) for v in (0, -1, "wide")] + [("plateau_tol", v) for v in (1, -0.1, "wide")],
)
def test_cli_refuses_a_bound_out_of_range(
    tiny_model_dir, image_file, tmp_path, field, value, capsys
):
    import json

    (tmp_path / "settings.json").write_text(json.dumps({field: value}))
    argv = ["invert", str(image_file), "--prompt", PROMPT, "--out", str(tmp_path / "o")]
    argv += ["--dpl-config", str(tmp_path / "settings.json"), "--model", str(tiny_model_dir)]
    assert field in _cli_error(capsys, argv)
