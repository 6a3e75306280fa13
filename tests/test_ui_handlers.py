"""The web app's handlers (issue 10) on the tiny model: what the buttons compute, without a browser.

The numbers the page shows must be the library's (PSNR of the reconstruction, leakage of each
word's map), edits must come from the cached inversion, sessions must not share anything, the
`dpl run` line must parse to the same settings, and bad input must give the CLI's exact line.
"""

from __future__ import annotations

import json
import shlex
import shutil
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_image

from dpl_edit.cli import build_parser, main
from dpl_edit.engine.artifact import Inversion
from dpl_edit.engine.edit import edit
from dpl_edit.engine.inversion import reconstruct
from dpl_edit.engine.model import load_model
from dpl_edit.errors import DplError, error_line
from dpl_edit.io.images import read_image
from dpl_edit.io.pictures import word_maps
from dpl_edit.metrics import object_localisation, psnr
from dpl_edit.ui.app import ModelHolder, build_app, status_line
from dpl_edit.ui.handlers import (
    Cancelled,
    EditRequest,
    InvertRequest,
    bundled_scenes,
    cancellable,
    changed_words,
    default_words,
    discard_session,
    distinct_words,
    edit_session,
    invert_input,
    run_command,
)

PROMPT = "a cat and a dog"


def _masks(size: int = 32) -> dict[str, np.ndarray]:
    """Cat on the left third, dog on the right third, background between."""
    cat, dog = np.zeros((size, size), bool), np.zeros((size, size), bool)
    cat[:, : size // 3] = True
    dog[:, 2 * size // 3 :] = True
    return {"cat": cat, "dog": dog}


@pytest.fixture(scope="module")
def both(tiny_model, tmp_path_factory):
    """NTI and DPL inversions of one picture, 2 steps, with masks (shared by several tests)."""
    request = InvertRequest(PROMPT, ("cat dog",), "both", steps=2, guidance=7.5, seed=3)
    folder = tmp_path_factory.mktemp("session")
    return invert_input(tiny_model, tiny_image(), request, folder, _masks())


def test_invert_shows_the_library_psnr_and_leakage(tiny_model, both):
    assert list(both.session.inversions) == ["nti", "dpl"]
    assert [label for label, _ in both.reconstructions] == [
        "NTI reconstruction",
        "DPL reconstruction",
    ]
    for (_, picture), (method, inversion) in zip(
        both.reconstructions, both.session.inversions.items(), strict=True
    ):
        _, again = reconstruct(tiny_model, inversion)
        assert np.array_equal(np.asarray(picture), np.asarray(again))
        expected = psnr(np.asarray(inversion.image), np.asarray(again))
        assert both.psnr[method] == pytest.approx(expected) and 0 < expected < 100
    assert [row.word for row in both.leakage] == ["cat", "dog"]
    for index, row in zip((1, 4), both.leakage, strict=True):  # "a cat and a dog": 1 and 4
        for method, inversion in both.session.inversions.items():
            heat = word_maps(inversion.attention, inversion.words)[index]
            assert row.outside[method] == object_localisation(heat, _masks(), row.word)[1]
    dpl_maps = both.session.inversions["dpl"].attention
    assert not torch.equal(dpl_maps, both.session.inversions["nti"].attention)


def test_invert_writes_the_grid_and_a_zip_of_loadable_inversions(tiny_model, both, tmp_path):
    assert both.session.attention.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with zipfile.ZipFile(both.session.inversion_zip) as archive:
        archive.extractall(tmp_path)
    for method, cached in both.session.inversions.items():
        loaded = Inversion.load(tmp_path / f"inversion-{method}", tiny_model)
        assert loaded.method == method and torch.equal(loaded.latents, cached.latents)
    assert both.session.source_file.name == "source.png"


def test_edit_uses_the_cached_inversions_and_reproduces_edit(tiny_model, both):
    evals = tiny_model.unet_evals
    request = EditRequest("a cat and a lion", "swap", {"lion": 2.0}, ("dog", "lion"), 0.6, 0.4)
    result = edit_session(tiny_model, both.session, request)
    assert (
        tiny_model.unet_evals - evals == 2 * 2
    )  # one batched call per step and method, no inversion
    labels = [label for label, _ in result.pictures]
    assert labels == [f"{m} {p}" for m in ("NTI", "DPL") for p in ("source", "edit", "difference")]
    expected = edit(tiny_model, both.session.inversions["dpl"], "a cat and a lion",
                    reweight={"lion": 2.0}, blend=["dog", "lion"], cross_replace_steps=0.6,
                    self_replace_steps=0.4, progress=False)  # fmt: skip
    assert np.array_equal(np.asarray(result.pictures[4][1]), np.asarray(expected.image))
    assert [path.name for path in result.files] == [
        "edit-nti.png", "edit-dpl.png", "source.png", "attention.png", "inversion.zip",
    ]  # fmt: skip
    assert all(path.is_file() for path in result.files)


def test_the_command_line_parses_to_the_same_settings(tiny_model, both):
    request = EditRequest("a cat and a lion", "refine", {"lion": 2.5}, ("lion",), 0.7, 0.3)
    command = edit_session(tiny_model, both.session, request).commands[1]
    argv = shlex.split(command)
    assert argv[:2] == ["dpl", "run"]
    args = build_parser().parse_args(argv[1:])
    assert (args.image, args.prompt, args.target) == ("source.png", PROMPT, "a cat and a lion")
    assert (args.method, args.words, args.steps, args.guidance, args.seed) == (
        "dpl", ["cat", "dog"], 2, 7.5, 3,
    )  # fmt: skip
    assert (args.mode, args.reweight, args.blend) == ("refine", [("lion", 2.5)], ["lion"])
    assert (args.cross_steps, args.self_steps) == ([("default_", 0.7)], 0.3)
    assert args.model is None  # the bundled model is the CLI's default
    elsewhere = replace(
        both.session, model_args=("--model", "/models/sd 1.5", "--dtype", "float16")
    )
    args = build_parser().parse_args(
        shlex.split(run_command(elsewhere, "nti", request, "e.png"))[1:]
    )
    assert (args.model, args.dtype, args.device, args.method) == (
        "/models/sd 1.5", "float16", "auto", "nti",
    )  # fmt: skip


def test_plain_target_tokens_reach_the_dpl_edit_and_its_command(tiny_model, both):
    request = EditRequest("a cat and a lion", target_tokens="plain")
    result = edit_session(tiny_model, both.session, request)
    dpl = both.session.inversions["dpl"]
    expected = edit(tiny_model, dpl, "a cat and a lion", target_tokens="plain", progress=False)
    learned = edit(tiny_model, dpl, "a cat and a lion", progress=False)
    assert np.array_equal(np.asarray(result.pictures[4][1]), np.asarray(expected.image))
    assert not np.array_equal(np.asarray(expected.image), np.asarray(learned.image))
    nti_command, dpl_command = result.commands
    assert build_parser().parse_args(shlex.split(dpl_command)[1:]).target_tokens == "plain"
    assert "--target-tokens" not in nti_command  # NTI has no learned vectors to choose between


def test_sessions_do_not_share_state(tiny_model, tmp_path):
    one = invert_input(tiny_model, tiny_image(seed=1), InvertRequest(PROMPT, method="NTI", steps=2),
                       tmp_path / "one")  # fmt: skip
    two = invert_input(tiny_model, tiny_image(seed=2), InvertRequest(PROMPT, method="NTI", steps=2),
                       tmp_path / "two")  # fmt: skip
    latents = one.session.inversions["nti"].latents.clone()
    first = edit_session(tiny_model, one.session, EditRequest("a cat and a lion"))
    edit_session(tiny_model, two.session, EditRequest("a cat and a tiger"))
    again = edit_session(tiny_model, one.session, EditRequest("a cat and a lion"))
    assert torch.equal(one.session.inversions["nti"].latents, latents)
    assert np.array_equal(np.asarray(first.pictures[1][1]), np.asarray(again.pictures[1][1]))
    assert not np.array_equal(
        np.asarray(first.pictures[0][1]), np.asarray(two.reconstructions[0][1])
    )
    assert one.session.folder != two.session.folder
    discard_session(one.session)
    assert not one.session.folder.exists() and two.session.folder.is_dir()
    discard_session(None)  # a tab closed before its first inversion


def _cli_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err.strip()


def _handler_line(call) -> str:
    with pytest.raises(DplError) as error:
        call()
    return status_line(error.value)


@pytest.fixture(scope="module")
def strict_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's folder, declaring a vocabulary (so unknown words are refused)."""
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("strict") / "m"))
    defaults = json.loads((folder / "dpl_defaults.json").read_text())
    vocabulary = ["a", "and", "cat", "dog", "lion", "on", "the", "grass"]
    (folder / "dpl_defaults.json").write_text(json.dumps({**defaults, "vocabulary": vocabulary}))
    return folder


def test_bad_input_gives_the_clis_line(tiny_model, tiny_model_dir, strict_dir, both, image_file,
                                       tmp_path, capsys):  # fmt: skip
    model = ["--model", str(tiny_model_dir), "--steps", "2"]
    out = ["--out", str(tmp_path / "out")]
    cases = {
        "not an image": (
            lambda: read_image(_text_file(tmp_path)),
            ["invert", str(_text_file(tmp_path)), "--prompt", PROMPT, *out, *model],
        ),
        "empty prompt": (
            lambda: invert_input(
                tiny_model, tiny_image(), InvertRequest("", method="NTI"), tmp_path
            ),
            ["invert", str(image_file), "--prompt", "", "--method", "nti", *out, *model],
        ),
        "word not in prompt": (
            lambda: invert_input(
                tiny_model, tiny_image(), InvertRequest(PROMPT, ("lion",)), tmp_path
            ),
            ["invert", str(image_file), "--prompt", PROMPT, "--words", "lion", *out, *model],
        ),
        "unknown word": (
            lambda: invert_input(
                load_model(strict_dir),
                tiny_image(),
                InvertRequest("a cat and a hippopotamus", method="NTI"),
                tmp_path,
            ),  # fmt: skip
            [
                "invert",
                str(image_file),
                "--prompt",
                "a cat and a hippopotamus",
                "--method",
                "nti",
                *out,
                "--model",
                str(strict_dir),
            ],  # fmt: skip
        ),
    }
    for name, (handler, argv) in cases.items():
        line = _handler_line(handler)
        assert line == _cli_line(capsys, argv), name
        assert line.startswith("error: ") and "\n" not in line
    with zipfile.ZipFile(both.session.inversion_zip) as archive:
        archive.extractall(tmp_path / "inv")
    swap = "a cat and a big lion"  # one word more: a swap needs the same count
    line = _handler_line(lambda: edit_session(tiny_model, both.session, EditRequest(swap)))
    argv = ["edit", str(tmp_path / "inv" / "inversion-nti"), "--target", swap, "--out",
            str(tmp_path / "e.png"), "--model", str(tiny_model_dir)]  # fmt: skip
    assert line == _cli_line(capsys, argv) and "word" in line


def _text_file(folder: Path) -> Path:
    path = folder / "notes.txt"
    path.write_text("not a picture")
    return path


def test_a_bug_becomes_one_line_without_a_traceback():
    line = status_line(RuntimeError("boom\nwith a second line"))
    assert line == "error: internal error (RuntimeError); the server's log has the details"
    assert status_line(DplError("bad")) == error_line(DplError("bad")) == "error: bad"


def test_cancel_stops_at_the_next_unet_call_and_restores_the_model(tiny_model, tmp_path):
    processors = {k: type(v) for k, v in tiny_model.unet.attn_processors.items()}
    flag = threading.Event()
    flag.set()
    with pytest.raises(Cancelled), cancellable(tiny_model, flag):
        invert_input(
            tiny_model, tiny_image(), InvertRequest(PROMPT, method="NTI", steps=2), tmp_path
        )
    assert {k: type(v) for k, v in tiny_model.unet.attn_processors.items()} == processors
    invert_input(tiny_model, tiny_image(), InvertRequest(PROMPT, method="NTI", steps=1), tmp_path)


def test_the_page_builds_without_loading_the_model():
    calls = []
    holder = ModelHolder(lambda: calls.append(1))
    build_app(holder, bundled_scenes(2))
    assert calls == []


def test_bundled_scenes_and_word_suggestions(tiny_model):
    scenes = bundled_scenes(3)
    for scene in scenes:
        assert scene.image.size == (64, 64) and set(scene.masks) <= set(
            distinct_words(scene.caption)
        )
        assert len(changed_words(scene.caption, scene.target)) == 2  # one word swapped
    assert default_words(tiny_model, PROMPT) == []  # the tiny model has no object list
    assert distinct_words("A cat, and a dog.") == ["a", "cat", "and", "dog"]
