"""The `dpl` command's research settings and what a run reports.

--dpl-preset and --dpl-config carry DPL's and the null text's research settings (a settings
file is untrusted input); every option they replaced is refused naming its replacement; `dpl
run` checks its edit before inverting; unknown words of both prompts are reported at once; the
reconstruction's PSNR is reported, with a warning when it is poor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dpl_edit.cli import _MOVED, _dpl_choice, _inversion_settings, build_parser, main
from dpl_edit.dpl.losses import DplLossConfig
from dpl_edit.dpl.presets import PRESETS, check_settings, choose
from dpl_edit.dpl.stage import ORIGINAL_NULL_TEXT, default_config
from dpl_edit.engine.artifact import Inversion
from dpl_edit.engine.inversion import reconstruction_image
from dpl_edit.engine.model import load_model
from dpl_edit.engine.settings import BUNDLED_MODELS, NullTextSettings
from dpl_edit.errors import DplError
from dpl_edit.metrics import psnr
from dpl_edit.outputs import POOR_RECONSTRUCTION_DB, poor_reconstruction

FAST = ["--steps", "2", "--device", "cpu"]
PROMPT = "a cat and a dog"


def _error(capsys, argv) -> str:
    """The one `error:` line of a command refused with exit code 2 (by argparse or a check)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def _settings_file(tmp_path: Path, settings, name: str = "settings.json") -> str:
    path = tmp_path / name
    path.write_text(settings if isinstance(settings, str) else json.dumps(settings))
    return str(path)


def _model_with_dpl(tiny_model_dir: Path, tmp_path: Path, dpl: dict) -> Path:
    """A copy of the tiny model folder whose dpl_defaults.json chooses DPL settings."""
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    defaults = json.loads((folder / "dpl_defaults.json").read_text())
    (folder / "dpl_defaults.json").write_text(json.dumps({**defaults, "dpl": dpl}))
    return folder


def _settings(model, *options: str) -> dict:
    """What `dpl invert --method dpl` with `options` gives `invert` for `model`."""
    argv = ["invert", "in.png", "--prompt", PROMPT, "--out", "out", "--method", "dpl", *options]
    args = build_parser().parse_args(argv)
    return _inversion_settings(args, _dpl_choice(args), model)


# --- help ---------------------------------------------------------------------------------------


def test_invert_help_fits_one_screen_and_hides_the_moved_options():
    env = {**os.environ, "COLUMNS": "100"}
    result = subprocess.run(
        [sys.executable, "-m", "dpl_edit.cli", "invert", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert len(lines) <= 52 and max(len(line) for line in lines) <= 100
    assert "--dpl-preset" in result.stdout and "--dpl-config" in result.stdout
    for option in _MOVED:
        assert option not in result.stdout
    assert "own-region DPL" in " ".join(result.stdout.split())  # the bundled models' preset


# --- the options that moved ---------------------------------------------------------------------

SAMPLES = {
    "--lambda-at": ["2"], "--lambda-dj": ["0.5"], "--lambda-bg": ["2"],
    "--token-inner-steps": ["3"], "--softmax-tokens": ["words"], "--loss-res": ["4", "8"],
    "--threshold-index": ["fraction"], "--leak-region": ["others"], "--leak-measure": ["mass"],
    "--max-drift": ["none"], "--bg-resample": ["any"], "--gaussian-formula": ["standard"],
    "--plateau-tol": ["0.001"], "--learn-until": ["0.5"], "--null-steps": ["3"],
    "--null-lr": ["0.02"],
}  # fmt: skip
"""A value for each moved option that took one (the others are switches)."""


@pytest.mark.parametrize("option", sorted(_MOVED))
@pytest.mark.parametrize("command", ["invert", "run", "batch"])
def test_every_moved_option_names_a_replacement_that_is_accepted(option, command, tmp_path, capsys):
    nargs = _MOVED[option][0]
    values = SAMPLES[option] if nargs else []
    argv = [command, "in.png", option, *values]
    err = _error(capsys, argv)
    assert err.startswith(f"error: {option} is now ")
    if option == "--paper-settings":
        assert "--dpl-preset paper" in err and "paper" in PRESETS
        return
    pasted = err.split("--dpl-config setting: ", 1)[1].rsplit(" (see", 1)[0]
    dpl, sections = check_settings(json.loads(pasted))  # what it says to write is valid
    assert dpl or any(sections.values())
    if values:  # the value given is the one to write
        written = json.dumps(json.loads(pasted))
        assert all(value in written for value in values if value != "none")


def test_the_null_text_original_replacement_is_the_original_null_text(capsys):
    err = _error(capsys, ["invert", "in.png", "--prompt", PROMPT, "--null-text-original"])
    pasted = json.loads(err.split("setting: ", 1)[1].rsplit(" (see", 1)[0])
    assert replace(NullTextSettings(), **pasted["null_text"]) == ORIGINAL_NULL_TEXT


# --- presets and the settings file --------------------------------------------------------------


def test_every_preset_and_every_bundled_models_dpl_block_is_valid():
    for name in PRESETS:
        choose(name)
    for defaults in BUNDLED_MODELS.glob("*/dpl_defaults.json"):
        check_settings(json.loads(defaults.read_text()).get("dpl", {}))


def test_presets_and_the_file_on_top(tiny_model_dir, tmp_path):
    own = {"use_at": False, "lambda_bg": 1.0, "max_drift": 0.5}
    model = load_model(_model_with_dpl(tiny_model_dir, tmp_path, own))
    assert _settings(model)["dpl_config"] is None  # invert's default: the model's own
    assert _settings(model, "--dpl-preset", "model")["dpl_config"] == default_config(model)
    assert default_config(model) == DplLossConfig(**own)
    assert _settings(model, "--dpl-preset", "paper")["dpl_config"] == DplLossConfig()
    file = _settings_file(tmp_path, {"lambda_dj": 0.5, "max_drift": None})
    on_paper = _settings(model, "--dpl-preset", "paper", "--dpl-config", file)["dpl_config"]
    assert on_paper == DplLossConfig(lambda_dj=0.5)
    on_model = _settings(model, "--dpl-config", file)["dpl_config"]
    assert on_model == DplLossConfig(**{**own, "lambda_dj": 0.5, "max_drift": None})


def test_fast_and_the_files_null_text_and_background(tiny_model, tmp_path):
    from dpl_edit.engine.settings import FAST_NULL_TEXT

    file = _settings_file(tmp_path, {"null_text": {"lr": 0.05}, "background": {"resample": "any"}})
    settings = _settings(tiny_model, "--fast", "--dpl-config", file)
    assert settings["null_text"] == replace(FAST_NULL_TEXT, lr=0.05)  # the file has the last word
    assert settings["dpl_config"].stop_on_rise is True
    assert settings["background"].resample == "any"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"lamda_bg": 1}, "'lamda_bg' is not a setting of DPL; did you mean 'lambda_bg'?"),
        ({"lambda_bg": "2"}, "'lambda_bg' must be a number, got \"2\""),
        ({"lambda_bg": True}, "'lambda_bg' must be a number"),
        ({"lambda_bg": -1}, "lambda_bg must be >= 0"),
        ({"use_at": 1}, "'use_at' must be true or false"),
        ({"max_inner_steps": 2.5}, "'max_inner_steps' must be a whole number"),
        ({"leak_region": "sky"}, "'leak_region' must be one of \"background\""),
        ({"loss_res": [8, "x"]}, "'loss_res' must be a list of whole numbers"),
        ({"loss_res": [0]}, "loss_res must be positive"),
        ({"learn_until": 2}, "learn_until must be in (0, 1]"),
        ({"null_text": {"inner_step": 3}}, "'null_text.inner_step' is not a setting in"),
        ({"null_text": {"lr": 0}}, "null_text: lr must be > 0"),
        ({"null_text": [1]}, "'null_text' must be a JSON object"),
        ({"background": {"resample": "all"}}, "'background.resample' must be one of"),
        ('{"lambda_bg": NaN}', "NaN is not a number JSON allows"),
        ('{"lambda_bg": 1, "lambda_bg": 2}', "the key 'lambda_bg' is given twice"),
        ("[1, 2]", "must hold a JSON object, not list"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_a_bad_settings_file_is_one_error_naming_the_key_before_the_model_loads(
    tiny_model_dir, image_file, tmp_path, capsys, monkeypatch, content, message
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("dpl_edit.engine.model.load_model", no_loading)
    file = _settings_file(tmp_path, content)
    argv = ["invert", str(image_file), "--prompt", PROMPT, "--out", str(tmp_path / "inv")]
    err = _error(capsys, [*argv, "--dpl-config", file, "--model", str(tiny_model_dir), *FAST])
    assert err.startswith(f"error: --dpl-config '{file}': ") and message in err
    assert not (tmp_path / "inv").exists()


def test_a_missing_settings_file(tmp_path, image_file, capsys):
    argv = ["invert", str(image_file), "--prompt", PROMPT, "--out", str(tmp_path / "inv")]
    assert "does not exist" in _error(capsys, [*argv, "--dpl-config", str(tmp_path / "no.json")])


@pytest.mark.parametrize("options", [["--dpl-preset", "paper"], ["--dpl-config", "dpl.json"]])
def test_another_method_refuses_dpl_settings(
    tiny_model_dir, image_file, tmp_path, capsys, monkeypatch, options
):
    monkeypatch.chdir(tmp_path)
    _settings_file(tmp_path, {"lambda_bg": 2.0}, "dpl.json")
    argv = ["invert", str(image_file), "--prompt", PROMPT, "--out", "inv", "--method", "nti"]
    err = _error(capsys, [*argv, *options, "--model", str(tiny_model_dir), *FAST])
    assert "need --method dpl, not 'nti'" in err


def test_batch_takes_a_preset_and_a_settings_file_for_its_dpl_jobs(
    tiny_model_dir, tmp_path, capsys
):
    from test_batch import JOBS, write_jobs

    jobs = write_jobs(tmp_path, [JOBS[0], JOBS[2]])  # an NTI job and a DPL job
    file = _settings_file(tmp_path, {"max_inner_steps": 1, "null_text": {"inner_steps": 2}})
    argv = ["batch", str(jobs), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir)]
    argv += ["--method", "nti", "--dpl-preset", "paper", "--dpl-config", file, "--json", *FAST]
    assert main(argv) == 0
    capsys.readouterr()
    tiger = Inversion.load(tmp_path / "out" / "jobs" / "tiger" / "inversion").settings
    losses = tiger["dpl"]["losses"]
    assert losses["max_inner_steps"] == 1 and losses["lambda_dj"] == DplLossConfig().lambda_dj
    cat = Inversion.load(tmp_path / "out" / "jobs" / "cat" / "inversion").settings
    assert cat["dpl"] is None and cat["null_text"]["inner_steps"] == 2


# --- the run's checks ---------------------------------------------------------------------------


def _no_inversion(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("inverted before the edit was checked")

    monkeypatch.setattr("dpl_edit.engine.inversion.invert", refuse)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "a cat and a big lion"], "mode 'refine'"),
        (["--target", "a cat and a lion", "--reweight", "tiger=2"], "'tiger' is not in"),
        (["--target", "a cat and a lion", "--blend", "tiger"], "in neither"),
    ],
)
def test_run_checks_the_edit_before_inverting(
    tiny_model_dir, image_file, tmp_path, capsys, monkeypatch, extra, message
):
    _no_inversion(monkeypatch)
    argv = ["run", str(image_file), "--prompt", PROMPT, "--out", str(tmp_path / "e.png")]
    argv += ["--method", "nti", "--model", str(tiny_model_dir), *FAST, *extra]
    assert message in _error(capsys, argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == [image_file.name]


@pytest.fixture
def strict_model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model declaring a vocabulary without 'tiger', 'red' and 'big'."""
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "strict"))
    known = ["a", "and", "cat", "dog", "lion", "on", "the", "grass"]
    defaults = json.loads((folder / "dpl_defaults.json").read_text())
    (folder / "dpl_defaults.json").write_text(json.dumps({**defaults, "vocabulary": known}))
    return folder


def test_every_unknown_word_of_both_prompts_is_reported_at_once(
    strict_model_dir, image_file, tmp_path, capsys, monkeypatch
):
    _no_inversion(monkeypatch)
    argv = [
        "run",
        str(image_file),
        "--prompt",
        "a tiger and a dog",
        "--out",
        str(tmp_path / "e.png"),
    ]
    argv += ["--target", "a red tiger and a big dog", "--model", str(strict_model_dir), *FAST]
    err = _error(capsys, [*argv, "--method", "nti"])
    assert err.startswith("error: the words 'tiger' in 'a tiger and a dog', 'red' in ")
    assert err.index("'tiger'") < err.index("'red'") < err.index("'big'")
    assert err.count("'tiger'") == 1
    assert "it knows: a, and, cat, dog, grass, lion, on, the" in err
    assert "coloured shapes" in err and "--model FOLDER" in err


def test_a_batch_job_reports_every_unknown_word_of_its_prompts(strict_model_dir, tmp_path, capsys):
    from test_batch import write_jobs

    job = {"id": "j", "image": "img/a.png", "prompt": "a tiger and a dog"}
    job["edits"] = [{"target": "a tiger and a lion"}, {"target": "a big tiger and a dog"}]
    argv = ["batch", str(write_jobs(tmp_path, [job])), "--out", str(tmp_path / "out")]
    assert main([*argv, "--model", str(strict_model_dir), "--method", "nti", *FAST]) == 2
    line = capsys.readouterr().err.strip().splitlines()[1]
    assert line.startswith("  line 1: the words 'tiger' in 'a tiger and a dog', 'big' in ")


def test_the_words_error_names_the_option(tiny_model_dir, image_file, tmp_path, capsys):
    argv = ["invert", str(image_file), "--prompt", PROMPT, "--out", str(tmp_path / "inv")]
    err = _error(capsys, [*argv, "--model", str(tiny_model_dir), *FAST])
    assert "no list of object words" in err and "--words" in err


# --- the reconstruction -------------------------------------------------------------------------


def test_poor_reconstruction_threshold():
    warning = poor_reconstruction(POOR_RECONSTRUCTION_DB - 0.1, "nti")
    assert f"under {POOR_RECONSTRUCTION_DB:.0f} dB" in warning
    assert "cannot represent this image" in warning and "--model FOLDER" in warning
    assert "--method nti" in poor_reconstruction(5.0, "ddim")
    assert poor_reconstruction(POOR_RECONSTRUCTION_DB, "nti") is None


def test_invert_reports_the_reconstruction_psnr(tiny_model_dir, image_file, tmp_path, capsys):
    argv = ["invert", str(image_file), "--prompt", PROMPT, "--method", "nti"]
    argv += ["--model", str(tiny_model_dir), *FAST]
    assert main([*argv, "--out", str(tmp_path / "inv"), "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)["reconstruction_psnr_db"]
    inversion = Inversion.load(tmp_path / "inv")
    picture = reconstruction_image(load_model(tiny_model_dir), inversion)
    assert reported == pytest.approx(
        psnr(np.asarray(inversion.image), np.asarray(picture)), abs=0.01
    )
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0
    assert f"reconstruction: {reported:.1f} dB PSNR against the input" in capsys.readouterr().out


@pytest.mark.parametrize("threshold", [0.0, 101.0])
def test_run_reports_the_psnr_and_warns_under_the_threshold(
    tiny_model_dir, image_file, tmp_path, capsys, monkeypatch, threshold
):
    monkeypatch.setattr("dpl_edit.outputs.POOR_RECONSTRUCTION_DB", threshold)
    out = tmp_path / "e.png"
    argv = ["run", str(image_file), "--prompt", PROMPT, "--target", "a cat and a lion"]
    argv += ["--out", str(out), "--method", "nti", "--model", str(tiny_model_dir), "--json"]
    assert main([*argv, *FAST]) == 0
    captured = capsys.readouterr()
    reported = json.loads(captured.out)["reconstruction_psnr_db"]
    source = np.asarray(Image.open(tmp_path / "e_source.png"))
    image = np.asarray(Inversion.load(tmp_path / "e_inversion").image)
    assert reported == pytest.approx(psnr(image, source), abs=0.01)
    warned = "warning: the reconstruction is poor" in captured.err
    assert warned == (threshold > 100)
    if warned:
        assert f"{reported:.1f} dB PSNR against the input, under 101 dB" in captured.err


def test_batch_summaries_report_the_psnr(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from test_batch import JOBS, write_jobs

    monkeypatch.setattr("dpl_edit.outputs.POOR_RECONSTRUCTION_DB", 101.0)
    monkeypatch.setattr("dpl_edit.batch.run.POOR_RECONSTRUCTION_DB", 101.0)
    out = tmp_path / "out"
    argv = ["batch", str(write_jobs(tmp_path, [JOBS[0]])), "--out", str(out), "--json"]
    assert main([*argv, "--model", str(tiny_model_dir), "--method", "nti", *FAST]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["poor_reconstruction"] == ["cat"]
    assert "warning: 1 of 1 jobs reconstructed under 101 dB PSNR (first: 'cat')" in captured.err
    row = json.loads((out / "summary.jsonl").read_text())
    folder = out / "jobs" / "cat"
    source = np.asarray(Image.open(folder / "source.png"))
    image = np.asarray(Inversion.load(folder / "inversion").image)
    assert row["reconstruction_psnr_db"] == pytest.approx(psnr(image, source), abs=0.01)
    table = (out / "summary.md").read_text()
    assert "reconstruction (PSNR)" in table
    assert f"| cat | ok | {row['reconstruction_psnr_db']:.1f} dB |" in table
    assert "1 reconstructed under 101 dB PSNR" in table


def test_the_guides_example_settings_file_is_valid():
    guide = (Path(__file__).parent.parent / "docs" / "guide.md").read_text()
    section = guide.split("## DPL's settings", 1)[1].split("\n## ", 1)[0]
    example = section.split("```json\n", 1)[1].split("```", 1)[0]
    dpl, sections = check_settings(json.loads(example))
    assert dpl and sections["null_text"]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_KEYS = st.sampled_from(
    [f.name for f in fields(DplLossConfig)] + ["null_text", "background", "lambda", ""]
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        _KEYS,
        _JSON
        | st.dictionaries(
            st.sampled_from(["inner_steps", "lr", "resample", "n_clusters", "x"]), _JSON
        ),
        max_size=4,
    )
)
def test_any_settings_object_is_accepted_or_refused_with_one_line(data):
    try:
        dpl, sections = check_settings(data)
    except DplError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400
        return
    DplLossConfig(**dpl)
    NullTextSettings(**sections["null_text"])
