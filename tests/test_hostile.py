"""Hostile and careless input: no user file is ever lost, nothing outside an inversion folder is
read or written, and every bad input is one `error:` line with exit code 2 (a batch's bad lines
one line each), never a traceback and never garbage with exit code 0.

Runs use the tiny model at two steps; checks that must come before any model work run with a
`load_model` that fails the test if it is called.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from dpl_edit.batch.jobs import JobDefaults, read_jobs
from dpl_edit.batch.run import BatchSettings, check_job
from dpl_edit.cli import build_parser, main
from dpl_edit.engine.artifact import Inversion
from dpl_edit.engine.inversion import invert
from dpl_edit.errors import DplError
from dpl_edit.io.images import load_image, read_image
from dpl_edit.io.names import safe_stem
from dpl_edit.ui.app import ModelHolder, build_app, exposure_warning, served_address
from dpl_edit.ui.handlers import InvertRequest, invert_input

FAST = ["--steps", "2", "--device", "cpu"]
PROMPT, TARGET = "a cat and a dog", "a cat and a lion"


def _error(capsys, argv: list[str]) -> str:
    """Run the command; it must exit 2 with one `error:` line and nothing else."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _usage_error(capsys, argv: list[str]) -> str:
    """An option argparse refuses: exit 2 and one `error:` line, as any other user error."""
    with pytest.raises(SystemExit) as raised:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert raised.value.code == 2
    assert err.startswith("error: argument ") and "\n" not in err, err
    return err


@pytest.fixture
def no_model(monkeypatch):
    """The check under test must come before the model loads."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr("dpl_edit.engine.model.load_model", refuse)


@pytest.fixture(scope="module")
def inv(tiny_model_dir, tmp_path_factory) -> Path:
    """A DPL inversion folder (dynamic tokens, trace images) to tamper with."""
    folder = tmp_path_factory.mktemp("hostile")
    tiny_image().save(folder / "photo.png")
    argv = ["invert", str(folder / "photo.png"), "--prompt", PROMPT, "--words", "cat", "dog"]
    assert main([*argv, "--out", str(folder / "inv"), "--model", str(tiny_model_dir), *FAST]) == 0
    return folder / "inv"


def _copy(inv: Path, tmp_path: Path, name: str = "inv") -> Path:
    return Path(shutil.copytree(inv, tmp_path / name))


def _meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def _set_meta(folder: Path, meta: dict) -> None:
    (folder / "meta.json").write_text(json.dumps(meta))


def _set_tensors(folder: Path, change) -> None:
    tensors = load_file(str(folder / "tensors.safetensors"))
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "tensors.safetensors"))


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, bytes]:
    """Every file under `root` but inside `skip`, with its bytes."""
    return {
        str(p): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not (skip and (p == skip or skip in p.parents))
    }


def _png_header(width: int, height: int) -> bytes:
    """A PNG that only claims a size (no pixel data): how a decompression bomb starts."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _png_rgb16(pixels: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (Pillow cannot write one) of a [h, w, 3] uint16 array."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# --- No user file is lost --------------------------------------------------------------------


@pytest.mark.parametrize("existing", ["photo.png", "photo_source.png", "photo_inversion"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_run_never_replaces_the_users_files_next_to_out(
    image_file, tmp_path, capsys, no_model, existing, overwrite
):
    out = tmp_path / "r"
    out.mkdir()
    if existing == "photo_inversion":
        (out / existing / "sub").mkdir(parents=True)
        (out / existing / "thesis.txt").write_text("mine")
        (out / existing / "sub" / "keep.txt").write_text("mine too")
    else:
        shutil.copy(image_file, out / existing)
    before = _snapshot(out)
    argv = ["run", str(image_file), "--prompt", PROMPT, "--target", TARGET]
    argv += ["--out", str(out / "photo.png"), "--model", "unused", *FAST]
    assert existing in _error(capsys, argv + ["--overwrite"] * overwrite)
    assert _snapshot(out) == before


def test_an_output_equal_to_an_input_is_refused(image_file, tmp_path, capsys, no_model):
    argv = ["run", str(image_file), "--prompt", PROMPT, "--target", TARGET, "--model", "x"]
    err = _error(capsys, [*argv, "--out", str(image_file), "--overwrite", *FAST])
    assert "is the input" in err
    source = tmp_path / "x_source.png"  # `--out x.png` writes x_source.png next to it
    shutil.copy(image_file, source)
    argv[1] = str(source)
    assert "is the input" in _error(capsys, [*argv, "--out", str(tmp_path / "x.png"), *FAST])
    assert source.read_bytes() == image_file.read_bytes()


def test_edit_never_replaces_a_users_file_and_replaces_its_own_when_asked(
    tiny_model_dir, inv, image_file, tmp_path, capsys
):
    user = tmp_path / "user_photo.png"
    shutil.copy(image_file, user)
    argv = ["edit", str(inv), "--target", TARGET, "--model", str(tiny_model_dir), "--out"]
    for extra in ([], ["--overwrite"]):
        assert "did not write it" in _error(capsys, [*argv, str(user), *extra])
    assert user.read_bytes() == image_file.read_bytes()
    assert main([*argv, str(tmp_path / "e.png")]) == 0
    capsys.readouterr()
    assert "pass --overwrite" in _error(capsys, [*argv, str(tmp_path / "e.png")])
    assert main([*argv, str(tmp_path / "e.png"), "--overwrite"]) == 0
    capsys.readouterr()
    edit_into = ["edit", str(inv), "--target", TARGET, "--out", str(inv / "source.png")]
    assert "inside the input" in _error(capsys, [*edit_into, "--overwrite"])


def test_invert_overwrite_never_deletes_a_folder_with_other_files(
    tiny_model_dir, inv, image_file, tmp_path, capsys, no_model
):
    foreign = tmp_path / "u"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "thesis.txt").write_text("three years")
    (foreign / "sub" / "keep.txt").write_text("keep")
    mixed = _copy(inv, tmp_path, "mixed")  # an inversion the user added a file to
    (mixed / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    argv = ["invert", str(image_file), "--prompt", PROMPT, "--model", "x", "--overwrite", *FAST]
    assert "not a folder dpl-edit made" in _error(capsys, [*argv, "--out", str(foreign)])
    assert "notes.txt" in _error(capsys, [*argv, "--out", str(mixed)])
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("current", ["foreign", "inversion"])
def test_out_dot_is_refused_and_leaves_nothing(
    inv, image_file, tmp_path, capsys, monkeypatch, no_model, current
):
    here = _copy(inv, tmp_path) if current == "inversion" else tmp_path / "work"
    here.mkdir(exist_ok=True)
    if current == "foreign":
        (here / "mine.txt").write_text("mine")
    before = _snapshot(tmp_path)
    monkeypatch.chdir(here)
    argv = ["invert", str(image_file), "--prompt", PROMPT, "--model", "x", "--overwrite"]
    _error(capsys, [*argv, "--out", ".", *FAST])
    assert _snapshot(tmp_path) == before
    assert not [p for p in tmp_path.rglob(".*") if p.suffix in (".tmp", ".old")]


def test_job_ids_that_would_share_a_folder_are_refused(tmp_path, tiny_model, capsys):
    tiny_image().save(tmp_path / "a.png")
    job = {"image": "a.png", "prompt": PROMPT, "edits": [{"target": TARGET}]}
    lines = [{**job, "id": "a/b"}, {**job, "id": safe_stem("a/b")}, {**job, "id": "A_B-x"}]
    lines.append({**job, "id": "a_b-X"})  # the same folder as A_B-x where case is ignored
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(DplError) as raised:
        read_jobs(path, JobDefaults(method="nti"))
    err = str(raised.value).splitlines()
    assert err[0].endswith("2 bad lines, nothing was run:")
    assert err[1].startswith(f"  line 2: id '{safe_stem('a/b')}' would share the job folder")
    assert err[2].startswith("  line 4: id 'a_b-X' would share the job folder 'jobs/A_B-x'")


def test_batch_refuses_an_output_folder_with_other_files(tmp_path, capsys, no_model):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.md").write_text("my notes")
    (tmp_path / "jobs.jsonl").write_text("{}\n")
    argv = ["batch", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "out"), *FAST]
    assert "a batch did not write" in _error(capsys, argv)
    assert (tmp_path / "out" / "summary.md").read_text() == "my notes"


# --- Nothing outside the folder --------------------------------------------------------------


@pytest.mark.parametrize("name", ["ABSOLUTE", "../../secret", "sub/secret", ".secret", ""])
@pytest.mark.parametrize("command", ["edit", "attention"])
def test_image_names_outside_the_folder_are_refused(inv, tmp_path, capsys, no_model, name, command):
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    tiny_image(seed=5).save(secret)
    folder = _copy(inv, tmp_path / "a" / "b")
    name = str(secret.with_suffix("")) if name == "ABSOLUTE" else name
    _set_meta(folder, {**_meta(folder), "images": ["source", name]})
    argv = [command, str(folder), "--out", str(tmp_path / "o.png")]
    argv += ["--target", TARGET] if command == "edit" else []
    assert "key 'images'" in _error(capsys, argv)
    with pytest.raises(DplError, match="key 'images'"):
        Inversion.load(folder)


def test_load_then_save_never_touches_a_file_outside_the_folder(inv, tmp_path):
    folder = _copy(inv, tmp_path / "in")
    inversion = Inversion.load(folder)
    before = _snapshot(tmp_path, skip=folder)
    inversion.save(folder, overwrite=True)
    inversion.extras["../../escape"] = tiny_image()  # only the API can name an image so
    with pytest.raises(DplError, match="not a plain file name"):
        inversion.save(folder, overwrite=True)
    with pytest.raises(DplError, match="not a plain file name"):
        inversion.save(tmp_path / "new")
    assert _snapshot(tmp_path, skip=folder) == before
    assert Inversion.load(folder).prompt == PROMPT


@pytest.mark.parametrize("file", ["source.png", "tensors.safetensors", "meta.json"])
def test_symlinks_out_of_the_folder_are_not_followed(inv, tmp_path, capsys, no_model, file):
    folder = _copy(inv, tmp_path)
    outside = tmp_path / f"outside-{file}"
    shutil.move(folder / file, outside)
    (folder / file).symlink_to(outside)
    argv = ["attention", str(folder), "--out", str(tmp_path / "a.png")]
    assert "symlink" in _error(capsys, argv)


def test_the_web_app_warns_when_others_can_reach_it(capsys):
    assert exposure_warning("127.0.0.1", False, False, "http://127.0.0.1:7860/") is None
    assert exposure_warning("localhost", False, False, "http://localhost:7860/") is None
    assert exposure_warning("0.0.0.0", False, True, "x") is None  # everyone logs in
    address = served_address("0.0.0.0", 7861)
    assert address.startswith(f"http://{__import__('socket').gethostname()}:7861/")
    assert "every interface" in address and "localhost" not in address
    warning = exposure_warning("0.0.0.0", False, False, address)
    assert warning.startswith("warning: the app has no authentication") and address in warning
    assert "--auth" in exposure_warning("127.0.0.1", True, False, "https://x.gradio.live")
    assert served_address("192.168.1.5", 80) == "http://192.168.1.5:80/"
    args = build_parser().parse_args(["ui", "--auth", "ann:pa:ss"])
    assert args.auth == ("ann", "pa:ss")
    for bad in ("ann", "ann:", ":pass"):
        assert "USER:PASS" in _usage_error(capsys, ["ui", "--auth", bad])


def test_a_failed_web_inversion_leaves_no_temp_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    demo = build_app(ModelHolder(lambda: None), [])
    (run_invert,) = [
        f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "run_invert"
    ]
    outputs = run_invert(None, None, PROMPT, "", "NTI", 2, 7.5, 0, None, None)
    assert outputs[-1].startswith("error: pick a bundled scene")
    assert not list(tmp_path.glob("dpl-ui-*"))


# --- No silent garbage -----------------------------------------------------------------------


def test_16_bit_images_keep_their_values(tmp_path):
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    grey = np.asarray(load_image(tmp_path / "grey16.png", 16))
    np.testing.assert_allclose(grey[..., 0], ramp / 257, atol=1.5)
    assert (grey[..., 0] == grey[..., 2]).all() and grey.min() < 5 and grey.max() > 250
    rgb = np.stack([ramp, 65535 - ramp, np.full_like(ramp, 32768)], axis=-1)
    (tmp_path / "rgb16.png").write_bytes(_png_rgb16(rgb))
    colour = np.asarray(load_image(tmp_path / "rgb16.png", 16)).astype(float)
    np.testing.assert_allclose(colour, rgb / 257, atol=1.5)
    floats = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(floats, mode="F").save(tmp_path / "float.tiff")
    np.testing.assert_allclose(np.asarray(load_image(tmp_path / "float.tiff", 16))[..., 1], floats * 255, atol=1.5)  # fmt: skip


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(tiny_model, image_file, inv, capsys, value):
    invert_argv = ["invert", str(image_file), "--prompt", PROMPT, "--out", "x"]
    assert "finite" in _usage_error(capsys, [*invert_argv, f"--guidance={value}"])
    edit_argv = ["edit", str(inv), "--target", TARGET, "--out", "x.png"]
    assert "finite" in _usage_error(capsys, [*edit_argv, f"--guidance={value}"])
    assert "WORD=NUMBER" in _usage_error(capsys, [*edit_argv, "--reweight", f"lion={value}"])
    with pytest.raises(DplError, match="finite"):
        invert(tiny_model, tiny_image(), PROMPT, method="nti", steps=2, guidance=float(value))


def test_out_of_range_seeds_are_refused(tiny_model, image_file, tmp_path, capsys):
    argv = ["invert", str(image_file), "--prompt", PROMPT, "--out", "x", "--seed"]
    for seed in ("-1", str(2**32), "1.5"):
        assert "--seed" in _usage_error(capsys, [*argv, seed])
    for seed in (-1, 2**32):
        with pytest.raises(DplError, match="the seed must be between 0 and"):
            invert_input(tiny_model, tiny_image(), InvertRequest(PROMPT, seed=seed), tmp_path)


@pytest.mark.parametrize("scale", [1e30, float("nan")])
def test_tampered_latents_are_refused(inv, tmp_path, capsys, no_model, scale):
    folder = _copy(inv, tmp_path)
    _set_tensors(folder, lambda t: t.update(latents=t["latents"] * scale))
    argv = ["edit", str(folder), "--target", TARGET, "--out", str(tmp_path / "e.png")]
    assert "tensor 'latents' holds values that are not finite" in _error(capsys, argv)


@pytest.mark.parametrize("prompt", ["...", "  ", "!?"])
def test_a_prompt_needs_a_word(image_file, inv, tmp_path, capsys, tiny_model_dir, prompt):
    argv = ["invert", str(image_file), "--prompt", prompt, "--out", str(tmp_path / "i")]
    assert "has no words" in _error(capsys, [*argv, "--model", str(tiny_model_dir), *FAST])
    argv = ["edit", str(inv), "--target", prompt, "--out", str(tmp_path / "e.png")]
    assert "has no words" in _error(capsys, [*argv, "--model", str(tiny_model_dir)])


# --- One line, never a traceback -------------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "message"), [(20000, "far too large"), (12000, "12000 x 12000 (144 megapixels)")]
)
def test_huge_images_and_decompression_bombs(tmp_path, capsys, no_model, recwarn, side, message):
    (tmp_path / "big.png").write_bytes(_png_header(side, side))
    argv = ["invert", str(tmp_path / "big.png"), "--prompt", PROMPT, "--out", str(tmp_path / "i")]
    err = _error(capsys, [*argv, "--model", "x", *FAST])
    assert message in err and "downscale it first" in err
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


def test_a_bomb_in_a_batch_does_not_stop_the_check_of_later_lines(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header(20000, 20000))
    line = {"id": "bomb", "image": "bomb.png", "prompt": PROMPT, "edits": [{"target": TARGET}]}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(line) + '\n{"id": \n')
    with pytest.raises(DplError) as raised:
        read_jobs(tmp_path / "jobs.jsonl", JobDefaults())
    err = str(raised.value).splitlines()
    assert len(err) == 3 and "far too large" in err[1] and err[2].startswith("  line 2: bad JSON")


def test_steps_beyond_the_scheduler_are_refused_before_work(
    tiny_model_dir, image_file, tmp_path, capsys
):
    argv = ["invert", str(image_file), "--prompt", PROMPT, "--out", str(tmp_path / "i")]
    argv += ["--model", str(tiny_model_dir), "--device", "cpu", "--steps"]
    assert "between 1 and 1000" in _error(capsys, [*argv, "1001"])
    assert "between 1 and 1000" in _error(capsys, [*argv, "0"])
    shutil.copy(image_file, tmp_path / "a.png")
    job = {"image": "a.png", "prompt": PROMPT, "edits": [{"target": TARGET}]}
    lines = [json.dumps({**job, "id": name}) for name in ("one", "two")]
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["batch", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--model", str(tiny_model_dir), "--steps", "1001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].endswith("2 bad lines, nothing was run:") and "between 1 and 1000" in err[2]
    assert not (tmp_path / "out" / "jobs").exists()


def test_unwritable_outputs_are_refused_before_the_model_loads(
    inv, image_file, tmp_path, capsys, no_model, monkeypatch
):
    (tmp_path / "file").write_text("a file, not a folder")
    edit = ["edit", str(inv), "--target", TARGET, "--out"]
    assert "is a file, not a folder" in _error(capsys, [*edit, str(tmp_path / "file" / "e.png")])
    assert "is a folder" in _error(capsys, [*edit, str(tmp_path)])
    if Path("/proc/self").is_dir():  # read-only even for root
        assert "cannot write" in _error(capsys, [*edit, "/proc/dpl-edit-test.png"])
    monkeypatch.setattr(
        "dpl_edit.io.targets.shutil.disk_usage", lambda _: shutil._ntuple_diskusage(10, 9, 1)
    )
    invert_argv = ["invert", str(image_file), "--prompt", PROMPT, "--out", str(tmp_path / "i")]
    assert "MB free" in _error(capsys, [*invert_argv, *FAST])
    assert "MB free" in _error(capsys, [*edit, str(tmp_path / "e.png")])


_MISSING = ["prompt", "method", "model_identity", "words", "settings", "extras", "dynamic_tokens"]
_WRONG = [
    ("words", "abc"),
    ("words", [["cat", [10**12]]]),
    ("words", [["cat"]]),
    ("prompt", 123),
    ("settings", []),
    ("settings", {"steps": 2, "guidance": "high"}),
    ("settings", {"steps": 2, "guidance": float("nan")}),
    ("settings", {"steps": "2", "guidance": 7.5}),
    ("method", "magic"),
    ("dynamic_tokens", {"words": ["cat"], "positions": [[10**12]]}),
    ("dynamic_tokens", {"words": "cat", "positions": [[2]]}),
    ("dynamic_tokens", []),
    ("extras", "x"),
    ("timings", {"a": "slow"}),
]


@pytest.mark.parametrize("command", ["edit", "attention"])
@pytest.mark.parametrize(
    ("key", "value"), [(key, None) for key in _MISSING] + _WRONG, ids=lambda v: str(v)[:20]
)
def test_tampered_meta_json_is_one_line_naming_the_key(
    inv, tmp_path, capsys, no_model, command, key, value
):
    folder = _copy(inv, tmp_path)
    meta = _meta(folder)
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    _set_meta(folder, meta)
    argv = [command, str(folder), "--out", str(tmp_path / "o.png")]
    argv += ["--target", TARGET] if command == "edit" else []
    assert f"'{key}" in _error(capsys, argv)


@pytest.mark.parametrize(
    ("key", "change"),
    [
        ("latents", lambda t: t.pop("latents")),
        ("latents", lambda t: t.update(latents=t["latents"][:2])),
        ("latents", lambda t: t.update(latents=t["latents"][0])),
        ("null_embeddings", lambda t: t.update(null_embeddings=t["null_embeddings"][0])),
        ("attention", lambda t: t.update(null_embeddings=t["null_embeddings"][:, :3])),
        ("attention", lambda t: t.update(attention=t["attention"][..., :3])),
        ("attention", lambda t: t.update(attention=t["attention"].to(torch.int64))),
        ("trajectory", lambda t: t.update(trajectory=t["trajectory"][..., :4])),
        ("dynamic_vectors", lambda t: t.update(dynamic_vectors=t["dynamic_vectors"][:, :1])),
        ("dynamic_vectors", lambda t: t.pop("dynamic_vectors")),
        ("surprise", lambda t: t.update(surprise=torch.zeros(1))),
    ],
)
def test_tampered_tensors_are_one_line_naming_the_tensor(
    inv, tmp_path, capsys, no_model, key, change
):
    folder = _copy(inv, tmp_path)
    _set_tensors(folder, change)
    argv = ["edit", str(folder), "--target", TARGET, "--out", str(tmp_path / "e.png")]
    assert f"'{key}'" in _error(capsys, argv)


def test_an_inversion_of_other_sizes_than_the_models_is_refused(
    tiny_model_dir, inv, tmp_path, capsys
):
    folder = _copy(inv, tmp_path)
    half = {key: lambda x: x[..., ::2, ::2].contiguous() for key in ("latents", "trajectory")}
    _set_tensors(folder, lambda t: t.update({k: f(t[k]) for k, f in half.items()}))
    argv = ["edit", str(folder), "--target", TARGET, "--out", str(tmp_path / "e.png")]
    err = _error(capsys, [*argv, "--model", str(tiny_model_dir)])
    assert "tensor 'latents' has rows of shape [4, 8, 8], but this model's are [4, 16, 16]" in err


# --- Minor: modes, formats, batch output ----------------------------------------------------


@pytest.mark.parametrize(("umask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])  # fmt: skip
def test_outputs_follow_the_umask(
    tiny_model_dir, image_file, tmp_path, umask, file_mode, folder_mode
):
    old = os.umask(umask)
    try:
        argv = ["run", str(image_file), "--prompt", PROMPT, "--target", TARGET, "--method"]
        argv += ["ddim", "--out", str(tmp_path / "r.png"), "--model", str(tiny_model_dir)]
        assert main([*argv, *FAST]) == 0
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.name != image_file.name]
    folders = [p for p in written if p.is_dir()]
    assert folders and {p.stat().st_mode & 0o777 for p in folders} == {folder_mode}
    assert {p.stat().st_mode & 0o777 for p in written if p.is_file()} == {file_mode}


def test_image_outputs_are_written_in_the_format_their_name_says(
    tiny_model_dir, inv, tmp_path, capsys
):
    edit = ["edit", str(inv), "--target", TARGET, "--model", str(tiny_model_dir), "--out"]
    assert main([*edit, str(tmp_path / "e.jpg")]) == 0
    assert main(["attention", str(inv), "--out", str(tmp_path / "a.JPEG")]) == 0
    for name in ("e.jpg", "a.JPEG"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
    assert main([*edit, str(tmp_path / "e.png")]) == 0
    assert Image.open(tmp_path / "e.png").format == "PNG"
    capsys.readouterr()
    for name in ("e.webp", "e.gif", "e"):
        assert "PNG or JPEG" in _error(capsys, [*edit, str(tmp_path / name)])


def test_thousands_of_bad_batch_lines_are_counted_not_all_printed(tmp_path):
    (tmp_path / "jobs.jsonl").write_text('{"id": \n' * 5000)
    with pytest.raises(DplError) as raised:
        read_jobs(tmp_path / "jobs.jsonl", JobDefaults())
    lines = str(raised.value).splitlines()
    assert lines[0].endswith("5000 bad lines, nothing was run:")
    assert [line.split(":")[0] for line in lines[1:21]] == [f"  line {n}" for n in range(1, 21)]
    assert lines[21:] == ["  ... and 4980 more"]
    assert len(str(raised.value)) < 3000


# --- Properties: any folder or job file loads or fails in one line ---------------------------

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats()
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
_META_KEYS = [*_MISSING, "images", "format", "format_version", "timings", "unet_evals"]
_ESCAPES = st.sampled_from(["../secret", "../../secret", "ABSOLUTE", "sub/secret", "source/.."])


def _outside_and_folder(inv: Path, root: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """A copy of the folder with a secret image beside it and another further out."""
    tiny_image(seed=7).save(root / "secret.png")
    (root / "deep").mkdir()
    folder = Path(shutil.copytree(inv, root / "deep" / "inv"))
    return root / "secret.png", folder, _snapshot(root, skip=folder)


def _loads_or_fails_in_one_line(folder: Path, root: Path, before: dict[str, bytes]) -> None:
    try:
        inversion = Inversion.load(folder)
        inversion.save(folder, overwrite=True)
        Inversion.load(folder)
    except DplError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600
    assert _snapshot(root, skip=folder) == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(_META_KEYS),
            st.sampled_from(["drop", "set", "set-inner", "escape"]),
            _JSON,
            _ESCAPES,
        ),
        min_size=1,
        max_size=3,
    )
)
def test_any_mutated_meta_json_loads_or_fails_in_one_line(inv, edits):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        secret, folder, before = _outside_and_folder(inv, root)
        meta = _meta(folder)
        for key, action, value, escape in edits:
            if action == "drop":
                meta.pop(key, None)
            elif action == "set":
                meta[key] = value
            elif action == "set-inner" and isinstance(meta.get(key), dict) and meta[key]:
                meta[key][sorted(meta[key])[0]] = value
            elif action == "escape":
                name = str(secret.with_suffix("")) if escape == "ABSOLUTE" else escape
                meta["images"] = [*meta.get("images", []), name]
        (folder / "meta.json").write_text(json.dumps(meta))
        _loads_or_fails_in_one_line(folder, root, before)


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_meta_json_bytes_load_or_fail_in_one_line(inv, data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, folder, before = _outside_and_folder(inv, root)
        (folder / "meta.json").write_bytes(data)
        _loads_or_fails_in_one_line(folder, root, before)


@settings(max_examples=40, deadline=None)
@given(
    key=st.sampled_from(
        ["latents", "null_embeddings", "attention", "trajectory", "dynamic_vectors", "extras.x"]
    ),  # fmt: skip
    shape=st.lists(st.integers(0, 5), max_size=5),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int32, torch.bool]),
    scale=st.sampled_from([1.0, 1e5, float("inf"), float("nan")]),
)
def test_any_tensor_loads_or_fails_in_one_line(inv, key, shape, dtype, scale):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, folder, before = _outside_and_folder(inv, root)
        value = (torch.randn(shape) * scale).to(dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)  # fmt: skip
        _set_tensors(folder, lambda t: t.update({key: value}))
        _loads_or_fails_in_one_line(folder, root, before)


_JOB_VALUES = _JSON | st.sampled_from(["a.png", PROMPT, TARGET, "nti", "dpl", "refine", "cat"])
_JOB_KEYS = ["id", "image", "prompt", "words", "method", "edits", "surprise"]
_EDIT_KEYS = ["target", "mode", "reweight", "blend", "cross_steps", "self_steps", "target_tokens"]
_GOOD_JOB = {"id": "j", "image": "a.png", "prompt": PROMPT, "edits": [{"target": TARGET}]}


@st.composite
def _job_lines(draw) -> str:
    kind = draw(st.sampled_from(["text", "json", "job"]))
    if kind == "text":
        return draw(st.text(max_size=40)).replace("\n", " ").replace("\r", " ")
    if kind == "json":
        return json.dumps(draw(_JSON))
    job = dict(_GOOD_JOB, id=draw(st.text(min_size=1, max_size=12)))
    for key in draw(st.lists(st.sampled_from(_JOB_KEYS), max_size=2)):
        job[key] = draw(_JOB_VALUES)
    if draw(st.booleans()):
        edit = {"target": TARGET}
        for key in draw(st.lists(st.sampled_from(_EDIT_KEYS), max_size=2)):
            edit[key] = draw(_JOB_VALUES)
        job["edits"] = [edit]
    return json.dumps(job)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(lines=st.lists(_job_lines(), min_size=1, max_size=6))
def test_any_job_file_reads_or_reports_each_bad_line(tiny_model, lines):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny_image().save(root / "a.png")
        path = root / "jobs.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        before = _snapshot(root)
        check = BatchSettings(steps=2)
        try:
            jobs = read_jobs(path, JobDefaults(method="nti"), lambda j: check_job(tiny_model, j, check))  # fmt: skip
            assert len({job.folder.casefold() for job in jobs}) == len(jobs)
        except DplError as exc:
            report = str(exc).splitlines()
            assert "nothing was run:" in report[0] or "no jobs" in report[0]
            assert all(line.startswith(("  line ", "  ... and")) for line in report[1:])
            assert all(len(line) < 600 for line in report)
        assert _snapshot(root) == before
        assert read_image(root / "a.png").size == (32, 32)
