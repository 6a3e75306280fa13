"""A model that declares its vocabulary refuses unknown words before any work (issue 11).

BPE would split an unknown word ("dragon" -> d ra g on) into pieces the model never saw, and the
edit would be garbage rather than an error. The check runs in `invert`, `edit`, the benchmark's
scene check and `dpl run`, each before the first UNet call.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from dpl_edit.bench.runner import run_bench
from dpl_edit.bench.world_set import world_split
from dpl_edit.cli import main
from dpl_edit.engine.edit import edit
from dpl_edit.engine.inversion import invert
from dpl_edit.engine.model import load_model
from dpl_edit.engine.text import check_prompt
from dpl_edit.errors import DplError

KNOWN = ("a", "and", "cat", "dog", "lion", "on", "the", "grass")


@pytest.fixture(scope="module")
def strict_model(tiny_model):
    """The tiny model, declaring a small vocabulary (shares the weights, not the defaults)."""
    return replace(tiny_model, defaults=replace(tiny_model.defaults, vocabulary=KNOWN))


def _assert_names_word_and_lists_vocabulary(message: str, word: str) -> None:
    assert f"'{word}'" in message and "\n" not in message
    assert ", ".join(sorted(KNOWN)) in message


def test_vocabulary_is_read_from_the_model_folder(tiny_model_dir, tmp_path):
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    (copy / "dpl_defaults.json").write_text(json.dumps({"vocabulary": ["Cat", "dog"]}))
    assert load_model(copy).defaults.vocabulary == ("cat", "dog")


def test_known_words_pass_in_any_case_and_with_punctuation(strict_model):
    ids = check_prompt(strict_model, "A cat, and the Dog on the grass.")
    assert ids == strict_model.tokenizer("A cat, and the Dog on the grass.").input_ids
    for wordless in ("", " ", "..."):  # nothing to edit: refused before the vocabulary
        with pytest.raises(DplError, match="has no words"):
            check_prompt(strict_model, wordless)


def test_a_model_without_a_vocabulary_takes_any_word(tiny_model):
    assert tiny_model.defaults.vocabulary == ()
    check_prompt(tiny_model, "a purple dragon")


def test_invert_refuses_an_unknown_word_before_any_unet_call(strict_model, image_file):
    before = strict_model.unet_evals
    with pytest.raises(DplError) as error:
        invert(strict_model, image_file, "a cat and a dragon", method="nti", steps=2)
    _assert_names_word_and_lists_vocabulary(str(error.value), "dragon")
    assert strict_model.unet_evals == before


def test_edit_refuses_an_unknown_target_word_before_any_unet_call(strict_model, image_file):
    inversion = invert(strict_model, image_file, "a cat and a dog", "ddim", 2, progress=False)
    before = strict_model.unet_evals
    with pytest.raises(DplError) as error:
        edit(strict_model, inversion, "a cat and a hippopotamus", progress=False)
    _assert_names_word_and_lists_vocabulary(str(error.value), "hippopotamus")
    assert strict_model.unet_evals == before


def test_bench_refuses_a_scene_with_an_unknown_word_before_any_work(strict_model, tmp_path):
    scene = world_split("dev", 1)[0]  # world captions: colours and shapes the model lacks
    before = strict_model.unet_evals
    with pytest.raises(DplError) as error:
        run_bench(strict_model, [scene], tmp_path / "out", ["ddim"], progress=False)
    assert str(error.value).startswith(f"scene '{scene.id}': the word")  # or words
    assert not (tmp_path / "out").exists() and strict_model.unet_evals == before


def test_cli_run_with_an_unknown_target_word_exits_2_and_writes_nothing(
    tiny_model_dir, image_file, tmp_path, capsys
):
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "strict"))
    (copy / "dpl_defaults.json").write_text(json.dumps({"vocabulary": list(KNOWN)}))
    out = tmp_path / "edit.png"
    argv = ["run", str(image_file), "--prompt", "a cat and a dog"]
    argv += ["--target", "a cat and a dragon", "--out", str(out), "--model", str(copy)]
    argv += ["--method", "nti", "--steps", "2", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    _assert_names_word_and_lists_vocabulary(err, "dragon")
    assert list(tmp_path.glob("edit*")) == []
