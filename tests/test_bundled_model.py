"""The bundled world model end to end: loading, DPL without --words, edits that stay local.

These run the real shipped weights (a few seconds each on a CPU at 10 steps), so they check what
a user of `dpl run` gets, not only the mechanics the tiny random model can show.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpl_edit.cli import main
from dpl_edit.demo import SCENE, TARGET
from dpl_edit.engine.model import BUNDLED_MODEL, load_model
from dpl_edit.metrics import psnr
from dpl_edit.world import synthetic as world

pytestmark = pytest.mark.skipif(
    not (BUNDLED_MODEL / "model_index.json").exists(), reason="bundled model not trained yet"
)
STEPS = ["--steps", "10", "--device", "cpu"]


@pytest.fixture(scope="module")
def bundled():
    return load_model()


def test_bundled_model_loads_with_its_defaults(bundled):
    assert bundled.resolution == world.SIZE and bundled.latent_size == world.SIZE // 4
    assert set(bundled.defaults.object_words) == set(world.SHAPES)
    assert bundled.defaults.vocabulary == world.VOCABULARY
    assert bundled.text_len == 24
    assert not any(p.requires_grad for p in bundled.unet.parameters())


def test_dpl_run_uses_the_models_object_words_and_edits_locally(tmp_path, capsys):
    source, ideal = SCENE.render(), TARGET.render()
    Image.fromarray(source.image).save(tmp_path / "scene.png")
    out = tmp_path / "edit.png"
    argv = ["run", str(tmp_path / "scene.png"), "--prompt", source.caption]
    argv += ["--target", ideal.caption, "--method", "dpl", "--out", str(out), "--json", *STEPS]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    folder = Path(summary["outputs"]["inversion"])
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["method"] == "dpl"
    assert (folder / "word-circle.png").exists() and (folder / "word-square.png").exists()
    assert len(summary["inner_steps"]["dpl_tokens"]) == 10

    edited = np.asarray(Image.open(out).convert("RGB")).astype(float)
    recon = np.asarray(Image.open(tmp_path / "edit_source.png").convert("RGB")).astype(float)
    change = np.abs(edited - recon).mean(-1)
    region = source.masks["square"] | ideal.masks["triangle"]
    assert change[region].mean() > 2 * change[~region].mean()


def test_null_text_inversion_beats_ddim_on_the_bundled_model(bundled):
    from dpl_edit.engine.inversion import invert, reconstruct

    render = world.scene_at(31337, 0).render()
    image = Image.fromarray(render.image)
    scores = {}
    for method in ("ddim", "nti"):
        inversion = invert(bundled, image, render.caption, method, steps=10, progress=False)
        scores[method] = psnr(np.asarray(reconstruct(bundled, inversion)[1]), render.image)
    assert scores["nti"] > scores["ddim"] + 1.0


def test_unknown_word_is_refused_with_the_vocabulary_before_any_work(tmp_path, capsys):
    """The issue's example: "dragon" is not a world word (BPE would give d ra g on)."""
    Image.fromarray(SCENE.render().image).save(tmp_path / "scene.png")
    argv = ["run", str(tmp_path / "scene.png")]
    argv += ["--prompt", "a purple dragon and a blue circle on a white background"]
    argv += ["--target", "a purple star and a blue circle on a white background"]
    assert main(argv + ["--out", str(tmp_path / "edit.png"), *STEPS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the word 'dragon'") and "\n" not in err
    assert ", ".join(sorted(world.VOCABULARY)) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.png"]
