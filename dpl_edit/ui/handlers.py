"""What the web app's buttons do, as plain functions over the library (no Gradio here).

Each handler takes a loaded model and plain values, raises `DplError` for bad input (the same
message the CLI prints) and returns a typed result that the page (`dpl_edit.ui.app`) only lays
out. State lives in a `Session`: the input, the cached inversions and the session's own folder
for downloads, so that every edit starts from the cached inversions and one person's inversions
are never another's.
"""

from __future__ import annotations

import io
import shlex
import shutil
import threading
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpl_edit.bench.world_set import world_scene
from dpl_edit.dpl.stage import choose_words
from dpl_edit.engine.artifact import Inversion
from dpl_edit.engine.edit import edit
from dpl_edit.engine.inversion import invert, reconstruction_image
from dpl_edit.engine.model import LoadedModel
from dpl_edit.engine.settings import MAX_SEED, EditSettings, InversionSettings, TargetTokens
from dpl_edit.engine.text import bare_word
from dpl_edit.errors import DplError
from dpl_edit.io.atomic import atomic_write_bytes
from dpl_edit.io.images import save_png
from dpl_edit.io.pictures import attention_grid, overlay, word_maps
from dpl_edit.metrics import object_localisation, psnr

METHOD_CHOICES: dict[str, tuple[str, ...]] = {
    "DPL": ("dpl",),
    "NTI": ("nti",),
    "both": ("nti", "dpl"),
}
"""The page's method choice -> the inversions it runs ("both" compares NTI with DPL)."""
MODE_CHOICES = {"swap": "replace", "refine": "refine"}
"""The page's edit modes -> `edit`'s (a swap is P2P's word replacement)."""
UI_STEPS = 10
"""The page's starting number of steps: on a CPU, 50 steps of DPL take minutes and a web page
should answer sooner; the field goes up to the library's 50 (or more)."""
SCENE_SPLIT, SCENE_COUNT = "val", 6
"""The bundled scenes shown: the first of the benchmark's validation split (unseen in
training), whose exact masks give each word's leakage."""


@dataclass(frozen=True)
class Scene:
    """A bundled world scene: its picture, caption, a suggested word swap and exact masks."""

    id: str
    image: Image.Image
    caption: str
    target: str
    masks: dict[str, np.ndarray]


def bundled_scenes(count: int = SCENE_COUNT) -> list[Scene]:
    """The gallery's scenes (rendered, no model needed)."""
    scenes = [world_scene(SCENE_SPLIT, index) for index in range(count)]
    return [Scene(s.id, Image.fromarray(s.image), s.source, s.target, s.masks) for s in scenes]


def default_words(model: LoadedModel, prompt: str) -> list[str]:
    """The words DPL learns by default: the prompt's words in the model's object list (none
    when the model has no list or the prompt names none of them)."""
    if not model.defaults.object_words or not prompt.strip():
        return []
    try:
        return choose_words(model, prompt, None)
    except DplError:
        return []


def distinct_words(prompt: str) -> list[str]:
    """The prompt's words, bare (as the vocabulary lists them) and each once, in order."""
    words = [bare_word(word) for word in prompt.split()]
    return [word for i, word in enumerate(words) if word and word not in words[:i]]


def changed_words(source: str, target: str) -> list[str]:
    """Words in one prompt and not the other: where a swap changes the picture, the default
    local-blend words (as the benchmark blends the edited object's old and new noun)."""
    old, new = distinct_words(source), distinct_words(target)
    return [w for w in old if w not in new] + [w for w in new if w not in old]


@dataclass(frozen=True)
class InvertRequest:
    """What the Invert button sends; `words` as typed (an entry may hold several, spaced)."""

    prompt: str
    words: tuple[str, ...] = ()
    method: str = InversionSettings.method.upper()
    steps: int = UI_STEPS
    guidance: float = InversionSettings.guidance
    seed: int = 0


@dataclass(frozen=True)
class EditRequest:
    """What the Edit button sends; `reweight` and `blend` name words of the target."""

    target: str
    mode: str = "swap"
    reweight: Mapping[str, float] = field(default_factory=dict)
    blend: tuple[str, ...] = ()
    cross_steps: float = EditSettings.cross_replace_steps
    self_steps: float = EditSettings.self_replace_steps
    target_tokens: TargetTokens = EditSettings.target_tokens
    """Whether the target prompt reads DPL's learned word vectors (NTI edits have none)."""


@dataclass
class Session:
    """One visitor's work: the input, its cached inversions (method -> inversion), what they
    drew, and the folder the downloads are written to."""

    folder: Path
    source_file: Path
    request: InvertRequest
    inversions: dict[str, Inversion]
    attention: Path
    """The attention grid (a row per method)."""
    inversion_zip: Path
    masks: dict[str, np.ndarray] | None = None
    model_args: tuple[str, ...] = ()
    """The `dpl` options that load the server's model (`--model`, `--device`, `--dtype`)."""

    @property
    def downloads(self) -> list[Path]:
        """The input, the attention grid and the inversion folders: offered with every result."""
        return [self.source_file, self.attention, self.inversion_zip]


def discard_session(session: Session | None) -> None:
    """Delete a session's folder once its browser tab is gone (the page served copies)."""
    if session is not None:
        shutil.rmtree(session.folder, ignore_errors=True)


@dataclass(frozen=True)
class WordLeakage:
    """A word's share of attention outside its object, per method (known masks only)."""

    word: str
    outside: dict[str, float]


@dataclass(frozen=True)
class Inverted:
    """The Invert button's result."""

    session: Session
    reconstructions: list[tuple[str, Image.Image]]
    psnr: dict[str, float]
    leakage: list[WordLeakage]


@dataclass(frozen=True)
class Edited:
    """The Edit button's result: per method the source (reconstruction), the edit and the
    difference heatmap, the files to download and the command lines that reproduce them."""

    pictures: list[tuple[str, Image.Image]]
    files: list[Path]
    commands: list[str]


def _parse_words(words: Sequence[str]) -> tuple[str, ...]:
    return tuple(word for text in words for word in text.split())


def invert_input(
    model: LoadedModel,
    image: Image.Image,
    request: InvertRequest,
    folder: Path,
    masks: dict[str, np.ndarray] | None = None,
    model_args: tuple[str, ...] = (),
    source_file: Path | None = None,
) -> Inverted:
    """Invert `image` with each method of `request.method` and draw what the inversions saw.

    `masks` (a bundled scene's) add each word's leakage; `source_file` is the file the user gave
    (the command line refers to it), else the image is saved into `folder` as `source.png`.
    """
    if request.method not in METHOD_CHOICES:
        raise DplError(f"unknown method '{request.method}' (use {', '.join(METHOD_CHOICES)})")
    if not 0 <= request.seed <= MAX_SEED:
        raise DplError(f"the seed must be between 0 and {MAX_SEED}, got {request.seed}")
    folder.mkdir(parents=True, exist_ok=True)
    words = _parse_words(request.words)
    inversions: dict[str, Inversion] = {}
    for method in METHOD_CHOICES[request.method]:
        torch.manual_seed(request.seed)  # as `dpl run --seed` does before loading the model
        inversions[method] = invert(
            model,
            image,
            request.prompt,
            method=method,
            steps=int(request.steps),
            guidance=float(request.guidance),
            words=words if method == "dpl" and words else None,
        )
    if source_file is None:
        source_file = save_png(image, folder / "source.png")
    reconstructions, scores = [], {}
    for method, inversion in inversions.items():
        picture = reconstruction_image(model, inversion)
        reconstructions.append((f"{method.upper()} reconstruction", picture))
        scores[method] = psnr(np.asarray(inversion.image), np.asarray(picture))
    first = next(iter(inversions.values()))
    rows = [(method.upper(), inversion.attention) for method, inversion in inversions.items()]
    grid = attention_grid(first.image, first.words, rows, folder / "attention.png")
    archive = _zip_inversions(inversions, folder / "inversion.zip")
    session = Session(folder, source_file, request, inversions, grid, archive, masks, model_args)
    return Inverted(session, reconstructions, scores, _leakage(inversions, masks))


def _leakage(
    inversions: Mapping[str, Inversion], masks: Mapping[str, np.ndarray] | None
) -> list[WordLeakage]:
    """Each masked word's leakage under each method, as the benchmark measures it."""
    if not masks:
        return []
    maps = {method: word_maps(inv.attention, inv.words) for method, inv in inversions.items()}
    rows = []
    for index, (word, _) in enumerate(next(iter(inversions.values())).words):
        noun = bare_word(word)
        if noun in masks:
            outside = {
                m: object_localisation(heat[index], masks, noun)[1] for m, heat in maps.items()
            }
            rows.append(WordLeakage(noun, outside))
    return rows


def _zip_inversions(inversions: Mapping[str, Inversion], path: Path) -> Path:
    """The inversion folders (one per method, as `dpl invert` writes them) in one zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for method, inversion in inversions.items():
            saved = inversion.save(path.parent / f"inversion-{method}", overwrite=True)
            for file in sorted(saved.rglob("*")):
                if file.is_file():
                    archive.write(file, f"inversion-{method}/{file.relative_to(saved)}")
    return atomic_write_bytes(path, buffer.getvalue())


def edit_session(model: LoadedModel, session: Session, request: EditRequest) -> Edited:
    """Edit every cached inversion of the session towards `request.target` (no new inversion)."""
    if request.mode not in MODE_CHOICES:
        raise DplError(f"unknown edit mode '{request.mode}' (use {', '.join(MODE_CHOICES)})")
    pictures: list[tuple[str, Image.Image]] = []
    files, commands = [], []
    for method, inversion in session.inversions.items():
        result = edit(
            model,
            inversion,
            request.target,
            mode=MODE_CHOICES[request.mode],
            reweight=dict(request.reweight),
            blend=list(request.blend),
            cross_replace_steps=float(request.cross_steps),
            self_replace_steps=float(request.self_steps),
            target_tokens=request.target_tokens,
        )
        label = method.upper()
        pictures += [
            (f"{label} source", result.source),
            (f"{label} edit", result.image),
            (f"{label} difference", difference_heatmap(result.source, result.image)),
        ]
        files.append(result.save(session.folder / f"edit-{method}.png"))
        commands.append(run_command(session, method, request, f"edit-{method}.png"))
    return Edited(pictures, files + session.downloads, commands)


def difference_heatmap(source: Image.Image, edited: Image.Image) -> Image.Image:
    """Where the edit changed the picture: the mean absolute pixel difference, max-normalised,
    as a heat map over the source (the attention maps' colours)."""
    diff = np.abs(np.asarray(edited, np.float32) - np.asarray(source, np.float32)).mean(-1)
    blended = overlay(source, torch.from_numpy(diff))
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def run_command(session: Session, method: str, request: EditRequest, out: str) -> str:
    """The `dpl run` line that reproduces this inversion and edit from the session's input."""
    invert_request = session.request
    args = ["dpl", "run", session.source_file.name, "--prompt", invert_request.prompt]
    args += ["--target", request.target, "--out", out, "--method", method]
    words = _parse_words(invert_request.words)
    if method == "dpl" and words:
        args += ["--words", *words]
    args += ["--steps", str(int(invert_request.steps)), "--guidance", str(invert_request.guidance)]
    args += ["--seed", str(int(invert_request.seed)), "--mode", MODE_CHOICES[request.mode]]
    if request.reweight:
        args += ["--reweight", *(f"{word}={scale:g}" for word, scale in request.reweight.items())]
    if request.blend:
        args += ["--blend", *request.blend]
    args += ["--cross-steps", f"{request.cross_steps:g}", "--self-steps", f"{request.self_steps:g}"]
    if method == "dpl" and request.target_tokens != EditSettings.target_tokens:
        args += ["--target-tokens", request.target_tokens]
    return shlex.join([*args, *session.model_args])


class Cancelled(DplError):
    """The user pressed Cancel; the job stops at its next UNet call."""


@contextmanager
def cancellable(model: LoadedModel, cancel: threading.Event) -> Iterator[None]:
    """Stop the job in the block at its next UNet call once `cancel` is set.

    Jobs on one model run one at a time, so the hook during the block is this job's; raising
    from it unwinds the engine's context managers, which restore the attention processors.
    """

    def check(_module: torch.nn.Module, _inputs: tuple) -> None:
        if cancel.is_set():
            raise Cancelled("cancelled")

    handle = model.unet.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()
