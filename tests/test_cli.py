"""The `dpl` command: a full run on the tiny model, and a one-line error for every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dpl_edit.cli import main

FAST = ["--steps", "3", "--device", "cpu"]


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def inversion_dir(tiny_model_dir, tmp_path_factory):
    from conftest import tiny_image

    folder = tmp_path_factory.mktemp("cli")
    tiny_image().save(folder / "photo.png")
    argv = ["invert", str(folder / "photo.png"), "--prompt", "a cat and a dog", "--method", "nti"]
    argv += ["--out", str(folder / "inv"), "--model", str(tiny_model_dir), *FAST]
    assert main(argv) == 0
    return folder / "inv"


def test_run_writes_everything_and_reports_json(tiny_model_dir, image_file, tmp_path, capsys):
    out = tmp_path / "edit.png"
    argv = ["run", str(image_file), "--prompt", "a cat and a dog", "--target", "a cat and a lion"]
    argv += ["--out", str(out), "--model", str(tiny_model_dir), "--blend", "dog", "lion", "--json"]
    argv += ["--method", "nti"]
    assert main(argv + FAST) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["command"] == "run"
    assert set(summary["outputs"]) == {"image", "source", "inversion", "attention"}
    for path in summary["outputs"].values():
        assert Path(path).exists()
    assert Image.open(out).size == (32, 32)
    assert summary["unet_evals"]["edit"] == 3 and summary["unet_evals"]["ddim_inversion"] == 3
    assert summary["seconds"]["null_text"] > 0 and summary["peak_memory"]["cpu_rss_mb"] > 0
    assert main(argv + FAST) == 2  # its own outputs are replaced only when asked
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(argv + FAST + ["--overwrite"]) == 0


def test_edit_and_attention_from_a_folder(tiny_model_dir, inversion_dir, tmp_path, capsys):
    argv = ["edit", str(inversion_dir), "--target", "a cat and a big dog", "--mode", "refine"]
    argv += ["--reweight", "big=2", "--cross-steps", "0.6", "big=0.3", "--out"]
    assert main([*argv, str(tmp_path / "e.png"), "--model", str(tiny_model_dir)]) == 0
    assert Image.open(tmp_path / "e.png").size == (32, 32)
    assert main(["attention", str(inversion_dir), "--out", str(tmp_path / "a.png")]) == 0
    assert Image.open(tmp_path / "a.png").width > 32
    assert "attention:" in capsys.readouterr().out


def test_help_lists_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "dpl_edit.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for command in ("invert", "edit", "attention", "run"):
        assert command in result.stdout


def test_missing_image(tiny_model_dir, tmp_path, capsys):
    argv = ["invert", str(tmp_path / "nope.png"), "--prompt", "a cat", "--out", str(tmp_path / "i")]
    assert "does not exist" in _error(capsys, argv + ["--model", str(tiny_model_dir)])


def test_corrupt_image(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"definitely not a jpeg")
    argv = ["invert", str(tmp_path / "bad.jpg"), "--prompt", "a cat", "--out", str(tmp_path / "i")]
    assert "cannot read image" in _error(capsys, argv + ["--model", str(tiny_model_dir)])


def test_prompt_too_long(tiny_model_dir, image_file, tmp_path, capsys):
    argv = ["invert", str(image_file), "--prompt", " ".join(["cat"] * 30)]
    argv += ["--out", str(tmp_path / "i"), "--model", str(tiny_model_dir), *FAST]
    assert "tokens long" in _error(capsys, argv)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "a cat and a big lion"], "mode 'refine'"),
        (["--target", "a cat and a lion", "--reweight", "tiger=2"], "'tiger' is not in"),
        (["--target", "a cat and a lion", "--blend", "tiger"], "in neither"),
        (["--target", "a cat and a lion", "--steps", "7"], "has 3 steps"),
    ],
)
def test_bad_edits(tiny_model_dir, inversion_dir, tmp_path, capsys, extra, message):
    argv = ["edit", str(inversion_dir), "--out", str(tmp_path / "e.png")]
    assert message in _error(capsys, argv + ["--model", str(tiny_model_dir), *extra])


def test_inversion_of_another_model(tiny_model_dir, inversion_dir, tmp_path, capsys):
    folder = Path(shutil.copytree(inversion_dir, tmp_path / "inv"))
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "model_identity": "sd@0123456789ab"}))
    argv = ["edit", str(folder), "--target", "a cat and a lion", "--out", str(tmp_path / "e.png")]
    assert "was made with model sd@" in _error(capsys, argv + ["--model", str(tiny_model_dir)])


def test_inversion_of_another_format_version(tiny_model_dir, inversion_dir, tmp_path, capsys):
    folder = Path(shutil.copytree(inversion_dir, tmp_path / "inv"))
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))
    argv = ["edit", str(folder), "--target", "a cat and a lion", "--out", str(tmp_path / "e.png")]
    assert "format version 0" in _error(capsys, argv + ["--model", str(tiny_model_dir)])


def test_unknown_device(tiny_model_dir, image_file, tmp_path, capsys):
    argv = ["invert", str(image_file), "--prompt", "a cat", "--out", str(tmp_path / "i")]
    argv += ["--model", str(tiny_model_dir), "--device", "warp-drive"]
    assert "unknown device" in _error(capsys, argv)


def test_model_folder_that_is_not_sd(image_file, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["invert", str(image_file), "--prompt", "a cat", "--out", str(tmp_path / "i")]
    message = _error(capsys, argv + ["--model", str(tmp_path / "empty")])
    assert "not a diffusers Stable Diffusion model" in message


def test_existing_output_folder(tiny_model_dir, image_file, inversion_dir, capsys):
    argv = ["invert", str(image_file), "--prompt", "a cat", "--out", str(inversion_dir)]
    assert "already exists" in _error(capsys, argv + ["--model", str(tiny_model_dir), *FAST])


def test_bad_option_values_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["edit", "x", "--target", "t", "--out", "o", "--reweight", "dog"])
    assert raised.value.code == 2
    assert "expected WORD=NUMBER" in capsys.readouterr().err


def test_threads_come_from_the_option_else_the_model(tiny_model_dir, image_file, tmp_path):
    """`--threads` wins; without it the model folder's `threads` is used (torch's global)."""
    import json as json_

    import torch

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    defaults = json_.loads((model / "dpl_defaults.json").read_text())
    (model / "dpl_defaults.json").write_text(json_.dumps({**defaults, "threads": 1}))
    argv = ["invert", str(image_file), "--prompt", "a cat", "--method", "ddim", "--model"]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main([*argv, str(model), "--out", str(tmp_path / "a"), *FAST]) == 0
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert main([*argv, str(tiny_model_dir), "--out", str(tmp_path / "b"), *FAST]) == 0
        assert torch.get_num_threads() == 2  # no suggestion: left alone
        out = str(tmp_path / "c")
        assert main([*argv, str(model), "--out", out, "--threads", "2", *FAST]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_edits_run_on_the_models_edit_threads_capped_at_the_cores(
    tiny_model_dir, inversion_dir, image_file, tmp_path, monkeypatch
):
    """A folder's `edit_threads` applies to `dpl edit` (and a run's edit), capped at the CPUs;
    its `threads` to the rest, capped at the physical cores; an explicit `--threads` wins."""
    import json as json_

    import torch

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    defaults = json_.loads((model / "dpl_defaults.json").read_text())
    (model / "dpl_defaults.json").write_text(
        json_.dumps({**defaults, "threads": 4, "edit_threads": 8})
    )
    monkeypatch.setattr("dpl_edit.engine.model.available_cores", lambda: 2)
    monkeypatch.setattr("dpl_edit.engine.model.physical_cores", lambda: 1)
    argv = ["edit", str(inversion_dir), "--target", "a cat and a lion", "--model", str(model)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        code = main([*argv, "--out", str(tmp_path / "e.png"), "--device", "cpu"])
        assert (code, torch.get_num_threads()) == (0, 2)  # 8 suggested, 2 cores
        code = main([*argv, "--out", str(tmp_path / "f.png"), "--device", "cpu", "--threads", "3"])
        assert (code, torch.get_num_threads()) == (0, 3)
        invert = ["invert", str(image_file), "--prompt", "a cat", "--method", "ddim"]
        code = main([*invert, "--model", str(model), "--out", str(tmp_path / "i"), *FAST])
        assert (code, torch.get_num_threads()) == (0, 1)  # 4 suggested, 1 physical core
    finally:
        torch.set_num_threads(before)


def test_null_text_settings_reach_the_inversion(tiny_model_dir, image_file, tmp_path, capsys):
    from dpl_edit.engine.artifact import Inversion

    config = tmp_path / "null.json"
    config.write_text(json.dumps({"null_text": {"inner_steps": 2, "lr": 0.5}}))
    argv = ["invert", str(image_file), "--prompt", "a cat and a dog", "--method", "nti"]
    argv += ["--out", str(tmp_path / "inv"), "--model", str(tiny_model_dir), "--json", *FAST]
    assert main([*argv, "--dpl-config", str(config)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["inner_steps"]["null_text"] and max(summary["inner_steps"]["null_text"]) <= 2
    assert Inversion.load(tmp_path / "inv").settings["null_text"]["lr"] == 0.5
    config.write_text(json.dumps({"null_text": {"inner_steps": 0}}))
    err = _error(capsys, [*argv, "--overwrite", "--dpl-config", str(config)])
    assert "null_text: inner_steps must be at least 1" in err


def test_fast_sets_the_null_text_and_dpl_speed_options(tiny_model_dir, image_file, tmp_path):
    from dpl_edit.engine.artifact import Inversion
    from dpl_edit.engine.settings import FAST_NULL_TEXT

    argv = ["invert", str(image_file), "--prompt", "a cat and a dog", "--words", "cat", "dog"]
    argv += ["--model", str(tiny_model_dir), "--fast", *FAST]
    assert main([*argv, "--out", str(tmp_path / "dpl")]) == 0
    settings = Inversion.load(tmp_path / "dpl").settings
    assert settings["null_text"]["inner_steps"] == FAST_NULL_TEXT.inner_steps
    assert settings["null_text"]["lr"] == FAST_NULL_TEXT.lr
    assert settings["dpl"]["losses"]["stop_on_rise"] is True
    # With NTI, --fast is the null text alone (no DPL settings to refuse).
    nti = [a for a in argv if a not in ("--words", "cat", "dog")] + ["--method", "nti"]
    assert main([*nti, "--out", str(tmp_path / "nti")]) == 0
    assert Inversion.load(tmp_path / "nti").settings["null_text"]["inner_steps"] == 5
