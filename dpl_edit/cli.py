"""The `dpl` command: a thin argparse layer over the Python API.

Each subcommand is a `Command` (name, help, argument builder, runner) in `COMMANDS`; a new one is
added by appending to that list. Runners return a summary (outputs, seconds and UNet evaluations
per stage) that `--json` prints on stdout. User errors (`DplError`) become one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, NoReturn

from dpl_edit import __version__
from dpl_edit.engine.settings import (
    DEVICES,
    DTYPES,
    FAST_NULL_TEXT,
    LEAK_MEASURES,
    LEAK_REGIONS,
    MAX_SEED,
    METHODS,
    MODES,
    TARGET_TOKENS,
    EditSettings,
    InversionSettings,
    NullTextSettings,
)
from dpl_edit.errors import DplError, error_line

Summary = dict[str, Any]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Summary]


def _finite(text: str) -> float:
    """An argparse type: a finite number (float() also reads 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
    return value


def _seed(text: str) -> int:
    """An argparse type: a seed every random generator takes (0 to 2^32 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED}, got {text}")
    return value


def _word_scale(text: str) -> tuple[str, float]:
    word, sep, scale = text.rpartition("=")
    if sep and word:
        with suppress(argparse.ArgumentTypeError):
            return word, _finite(scale)
    raise argparse.ArgumentTypeError(f"expected WORD=NUMBER, got '{text}'")


def _cross_steps(text: str) -> tuple[str, float]:
    """`0.8` sets the default fraction; `lion=0.4` one word's."""
    if "=" in text:
        return _word_scale(text)
    try:
        return "default_", _finite(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction or WORD=FRACTION, got '{text}'"
        ) from None


_INVERSION = InversionSettings()
_THE_INVERSIONS = None
"""Default of an edit's steps and guidance: None, the inversion's own."""


def _add_common(
    parser: argparse.ArgumentParser,
    model: bool = True,
    steps: int | None = _INVERSION.steps,
    guidance: float | None = _INVERSION.guidance,
) -> None:
    """Options every model-using command takes; `steps` and `guidance` are its defaults."""
    group = parser.add_argument_group("common options")
    if model:
        _add_model_options(group)
        group.add_argument("--variant", metavar="NAME",
                           help="weight files to load, e.g. fp16 for *.fp16.safetensors "
                           "(default: the plain ones, else the folder's only variant)")  # fmt: skip
        group.add_argument("--threads", type=int, metavar="N",
                           help="CPU threads (default: the model's `threads`, for edits "
                           "its `edit_threads`, in dpl_defaults.json, else torch's choice)")  # fmt: skip
        group.add_argument("--seed", type=_seed, default=0,
                           help=f"random seed, 0 to {MAX_SEED} (default: %(default)s)")  # fmt: skip
        group.add_argument("--steps", type=int, default=steps,
                           help="DDIM steps (default: %(default)s)" if steps else
                           "DDIM steps (default and only choice: the inversion's)")  # fmt: skip
        group.add_argument("--guidance", type=_finite, default=guidance,
                           help="guidance scale (default: %(default)s)" if guidance else
                           "guidance scale (default: the inversion's)")  # fmt: skip
    group.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def _add_model_options(group: argparse._ActionsContainer) -> None:
    """Which model to load, and where: every command that loads one (`dpl ui` too)."""
    group.add_argument("--model", help="diffusers SD folder, bundled model name (world, "
                       "world-sink) or cached hub id (default: $DPL_MODEL, then world)")  # fmt: skip
    group.add_argument("--device", default="auto", help=f"{DEVICES} (default: %(default)s)")
    group.add_argument("--dtype", default=DTYPES[0], choices=DTYPES, help="(default: %(default)s)")
    group.add_argument("--cuda-graphs", action="store_true",
                       help="replay inversions' UNet passes from CUDA graphs (GPU only; the same "
                       "results, 4-5x faster at Stable Diffusion size on an H100)")  # fmt: skip
    group.add_argument("--channels-last", action="store_true",
                       help="keep the UNet channels-last (GPU only; the same arithmetic, not "
                       "bitwise; with --cuda-graphs 1.2x faster at Stable Diffusion size on an H100)")  # fmt: skip


def _add_inversion_options(parser: argparse.ArgumentParser, one_image: bool = True) -> None:
    parser.add_argument("--method", choices=METHODS, default=_INVERSION.method,
                        help="inversion method (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--resize", action="store_true", help="stretch non-square images instead of cropping"
    )
    _add_dpl_options(parser, one_image)


_NULL = NullTextSettings()


def _add_dpl_options(parser: argparse.ArgumentParser, one_image: bool = True) -> None:
    """DPL's options, the null text's (shared by NTI and DPL) and --fast, which sets both; a
    batch (`one_image` False) has no --bg-mask, a mask being per image."""
    group = parser.add_argument_group(
        "Dynamic Prompt Learning (--method dpl)",
        "Unset options keep the model's DPL settings (dpl_defaults.json), else the paper's.",
    )
    group.add_argument("--words", nargs="+", metavar="WORD",
                       help="words that get dynamic tokens (default: the prompt's words in the "
                       "model's object list)")  # fmt: skip
    if one_image:
        group.add_argument("--bg-mask", metavar="FILE",
                           help="background mask (white = background) instead of estimating one")  # fmt: skip
    group.add_argument("--no-bg", action="store_true", help="no background-leakage loss")
    group.add_argument("--paper-settings", action="store_true",
                       help="start from the paper's DPL settings instead of the model's chosen "
                       "defaults (dpl_defaults.json); other options apply on top")  # fmt: skip
    group.add_argument("--no-at", action="store_true", help="no attention-balancing loss")
    group.add_argument("--no-dj", action="store_true", help="no disjoint-object loss")
    group.add_argument("--lambda-at", type=_finite, metavar="W",
                       help="weight of the balancing loss")  # fmt: skip
    group.add_argument("--lambda-dj", type=_finite, metavar="W",
                       help="weight of the disjoint loss")  # fmt: skip
    group.add_argument("--lambda-bg", type=_finite, metavar="W",
                       help="weight of the background loss")  # fmt: skip
    group.add_argument("--token-inner-steps", type=int, metavar="N",
                       help="most token updates per step (0 keeps the words' embeddings)")  # fmt: skip
    group.add_argument("--no-thresholds", action="store_true",
                       help="take every inner step, ignoring the loss thresholds (ablation)")  # fmt: skip
    group.add_argument("--softmax-tokens", choices=["paper", "words"],
                       help="tokens in the balancing loss's sharpened softmax: every position "
                       "but the first and last (paper) or the prompt's own tokens (words)")  # fmt: skip
    group.add_argument("--loss-res", type=int, nargs="+", metavar="RES",
                       help="attention level(s) the losses read, as side lengths (unset: the "
                       "model's cross-attention level)")  # fmt: skip
    group.add_argument("--threshold-index", choices=["step", "fraction"],
                       help="index the loss thresholds by step, or by the fraction of the "
                       "schedule (a 10-step run then follows the 50-step schedule)")  # fmt: skip
    group.add_argument("--leak-region", choices=list(LEAK_REGIONS),
                       help="what the background loss keeps a word's map off: the estimated "
                       "background (paper), or everything outside the word's own clusters "
                       "(background and the other words' objects); others-split first shares "
                       "the clusters' pixels out, each to the word that attends most there")  # fmt: skip
    group.add_argument("--leak-measure", choices=list(LEAK_MEASURES),
                       help="how the background loss scores a word map against its region: "
                       "cosine similarity (paper) or the share of the map's mass inside it")  # fmt: skip
    group.add_argument("--max-drift", type=_drift, metavar="F",
                       help="keep each learned vector within F times its word embedding's norm "
                       "of that embedding ('none': unbounded, as in the paper)")  # fmt: skip
    group.add_argument("--bg-resample", choices=["majority", "any"],
                       help="background mask at the loss level: area majority, or any "
                       "background in the cell (the paper code's dilated mask)")  # fmt: skip
    group.add_argument("--gaussian-formula", choices=["ae-quirk", "standard"],
                       help="balancing-loss smoothing: the paper code's (ae-quirk) or textbook")  # fmt: skip
    group.add_argument("--plateau-tol", type=_plateau, metavar="F",
                       help="end a step's token updates once one lowers the loss by less than "
                       "F of it, undoing one that raises it (faster; not in the paper); "
                       "'none': no such rule")  # fmt: skip
    group.add_argument("--learn-until", type=_finite, metavar="F",
                       help="learn the word vectors only in the first F of the steps (0 < F <= "
                       "1); later steps keep the last ones (faster; not in the paper)")  # fmt: skip
    group.add_argument("--stop-on-rise", action="store_true",
                       help="end a step's token updates as soon as one raises the loss "
                       "(faster; not in the paper)")  # fmt: skip
    parser.add_argument("--fast", action="store_true",
                        help=f"the speed options: null text {FAST_NULL_TEXT.inner_steps} steps "
                        f"at rate {FAST_NULL_TEXT.lr} and, for DPL, --stop-on-rise (measured "
                        "in docs/research/speed.md)")  # fmt: skip
    null = parser.add_argument_group("Null-text inversion (--method nti and dpl)")
    null.add_argument("--null-text-original", action="store_true",
                      help="the DPL code's null text: many steps from the empty prompt at "
                      "every step, no early stop (unset: NTI's)")  # fmt: skip
    null.add_argument("--null-steps", type=int, metavar="N",
                      help=f"most null-text updates per step (default {_NULL.inner_steps})")  # fmt: skip
    null.add_argument("--null-lr", type=_finite, metavar="LR",
                      help=f"null-text learning rate at the first step (default {_NULL.lr})")  # fmt: skip


_DPL_KNOBS = {
    "lambda_at": "lambda_at",
    "lambda_dj": "lambda_dj",
    "lambda_bg": "lambda_bg",
    "token_inner_steps": "max_inner_steps",
    "gaussian_formula": "gaussian_formula",
    "softmax_tokens": "softmax_tokens",
    "loss_res": "loss_res",
    "threshold_index": "threshold_index",
    "leak_region": "leak_region",
    "leak_measure": "leak_measure",
    "max_drift": "max_drift",
    "plateau_tol": "plateau_tol",
    "learn_until": "learn_until",
}
"""CLI option -> `DplLossConfig` field, for the options that take a value."""
_DPL_SWITCHES = {"no_at": "use_at", "no_dj": "use_dj", "no_thresholds": "use_thresholds"}
"""CLI flag -> the `DplLossConfig` switch it turns off."""
_DPL_FLAGS = {"stop_on_rise": "stop_on_rise"}
"""CLI flag -> the `DplLossConfig` switch it turns on."""


_UNBOUNDED = "none"


def _number_or_none(valid: Callable[[float], bool], rule: str) -> Callable[[str], float | str]:
    """An argparse type: a number for which `valid` holds, or 'none' to turn the setting off."""

    def parse(text: str) -> float | str:
        if text.strip().lower() == _UNBOUNDED:
            return _UNBOUNDED
        try:
            value = _finite(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {rule} or 'none', got {text}")
        return value

    return parse


_drift = _number_or_none(lambda value: 0 < value < float("inf"), "a positive number")
"""--max-drift's value: 'none' leaves the learned vectors unbounded."""
_plateau = _number_or_none(lambda value: 0 <= value < 1, "in [0, 1)")
"""--plateau-tol's value: 'none' turns the plateau rule off."""


def _dpl_config(args: argparse.Namespace, model, any_method: bool = False) -> Any:
    """DPL's settings: the model's defaults (or the paper's, with --paper-settings) with the
    options given on top, or None when none was (so that `invert` can refuse them for another
    method instead of ignoring them)."""
    from dpl_edit.dpl.losses import DplLossConfig
    from dpl_edit.dpl.stage import default_config

    values = {field: getattr(args, name) for name, field in _DPL_KNOBS.items()}
    values = {field: value for field, value in values.items() if value is not None}
    for flag, field in _DPL_SWITCHES.items():
        if getattr(args, flag):
            values[field] = False
    for flag, field in _DPL_FLAGS.items():
        if getattr(args, flag):
            values[field] = True
    # --fast applies to DPL inversions only; a batch's settings reach only its DPL jobs.
    if args.fast and (any_method or args.method == "dpl"):
        values["stop_on_rise"] = True
    if "loss_res" in values:
        values["loss_res"] = tuple(values["loss_res"])
    for field in ("max_drift", "plateau_tol"):
        if values.get(field) == _UNBOUNDED:
            values[field] = None
    if not values and not args.paper_settings:
        return None
    return replace(DplLossConfig() if args.paper_settings else default_config(model), **values)


def _null_text(args: argparse.Namespace) -> NullTextSettings | None:
    """Null-text settings when an option changes them, else None (invert's default)."""
    from dpl_edit.dpl.stage import ORIGINAL_NULL_TEXT

    changes = {"inner_steps": args.null_steps, "lr": args.null_lr}
    changes = {field: value for field, value in changes.items() if value is not None}
    if args.null_text_original:
        if changes or args.fast:
            raise DplError("--null-text-original sets the null-text steps and rate itself")
        return ORIGINAL_NULL_TEXT
    if args.null_steps is not None and args.null_steps < 1:
        raise DplError(f"--null-steps must be at least 1, got {args.null_steps}")
    if args.null_lr is not None and not args.null_lr > 0:
        raise DplError(f"--null-lr must be positive, got {args.null_lr}")
    base = FAST_NULL_TEXT if args.fast else _NULL
    return replace(base, **changes) if changes or args.fast else None


def _background(args: argparse.Namespace) -> Any:
    """Background-estimation settings when an option changes them, else None."""
    from dpl_edit.dpl.stage import BackgroundSettings

    return None if args.bg_resample is None else BackgroundSettings(resample=args.bg_resample)


_EDIT = EditSettings()


def _add_edit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=_EDIT.mode,
        help="replace: swap words (same word count); refine: add/remove words (default: "
        "%(default)s)",
    )
    parser.add_argument(
        "--reweight",
        nargs="+",
        type=_word_scale,
        default=[],
        metavar="WORD=SCALE",
        help="scale the attention of target words",
    )
    parser.add_argument(
        "--blend",
        nargs="+",
        default=[],
        metavar="WORD",
        help="local blending: change only where these words attend",
    )
    parser.add_argument(
        "--cross-steps",
        nargs="+",
        type=_cross_steps,
        default=[],
        metavar="F|WORD=F",
        help=f"fraction of steps injecting cross-attention (default: {_EDIT.cross_replace_steps})",
    )
    parser.add_argument("--self-steps", type=_finite, default=_EDIT.self_replace_steps,
                        help="fraction of steps injecting self-attention (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--target-tokens",
        choices=TARGET_TOKENS,
        default=_EDIT.target_tokens,
        help="word vectors the target prompt reads for DPL's learned words: the learned ones"
        " (the paper) or the vocabulary's (default: %(default)s)",
    )


def _load_model(args: argparse.Namespace):
    import torch

    from dpl_edit.engine.model import load_model, use_threads

    torch.manual_seed(args.seed)
    if args.threads is not None and args.threads < 1:  # before the model loads
        raise DplError("--threads must be at least 1")
    model = load_model(
        args.model, args.device, args.dtype, args.cuda_graphs, args.channels_last, args.variant
    )
    use_threads(model, args.threads)
    return model


def _invert(args: argparse.Namespace, model, image) -> Any:
    from dpl_edit.engine.inversion import invert

    return invert(
        model,
        image,
        args.prompt,
        method=args.method,
        steps=args.steps,
        guidance=args.guidance,
        resize=args.resize,
        null_text=_null_text(args),
        words=args.words,
        dpl_config=_dpl_config(args, model),
        background=_background(args),
        bg_mask=args.bg_mask,
        no_bg=args.no_bg,
    )


def _inner_steps(inversion) -> dict[str, list[int]]:
    """Inner optimisation steps taken at each denoising step, per stage that has them."""
    inner = {}
    if "dpl_trace" in inversion.extras:
        inner["dpl_tokens"] = [step["inner_steps"] for step in inversion.extras["dpl_trace"]]
    if "null_inner_steps" in inversion.extras:
        inner["null_text"] = list(inversion.extras["null_inner_steps"])
    return inner


def _cross_windows(args: argparse.Namespace) -> dict[str, float]:
    """--cross-steps as `edit` takes it: the default fraction, then per-word ones."""
    return {"default_": _EDIT.cross_replace_steps, **dict(args.cross_steps)}


def _edit(args: argparse.Namespace, model, inversion) -> Any:
    from dpl_edit.engine.edit import edit
    from dpl_edit.engine.model import use_threads

    use_threads(model, args.threads, edit=True)
    if args.steps is not None and args.steps != inversion.steps:
        raise DplError(f"the inversion has {inversion.steps} steps; edit cannot change that")
    return edit(
        model,
        inversion,
        args.target,
        mode=args.mode,
        reweight=dict(args.reweight),
        blend=args.blend,
        cross_replace_steps=_cross_windows(args),
        self_replace_steps=args.self_steps,
        guidance=args.guidance,
        target_tokens=args.target_tokens,
    )


def _summary(
    outputs: dict[str, Path | str],
    seconds: dict[str, float],
    evals: dict[str, int],
    inner_steps: dict[str, list[int]] | None = None,
) -> Summary:
    import torch

    peak = {"cpu_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {
        "outputs": {k: str(v) for k, v in outputs.items()},
        "seconds": seconds,
        "unet_evals": evals,
        "inner_steps": inner_steps or {},
        "peak_memory": peak,
    }


def _inputs(*paths: str | None) -> list[Path]:
    """The command's input files and folders, which no output may be, hold or sit inside."""
    return [Path(path) for path in paths if path]


def _run_invert(args: argparse.Namespace) -> Summary:
    from dpl_edit.io.images import read_image
    from dpl_edit.io.targets import check_folder_target

    check_folder_target(args.out, args.overwrite, _inputs(args.image, args.bg_mask))
    image = read_image(args.image)
    model = _load_model(args)
    inversion = _invert(args, model, image)
    folder = inversion.save(args.out, overwrite=args.overwrite)
    return _summary(
        {"inversion": folder}, inversion.timings, inversion.unet_evals, _inner_steps(inversion)
    )


def _run_edit(args: argparse.Namespace) -> Summary:
    from dpl_edit.engine.artifact import Inversion
    from dpl_edit.io.targets import check_image_target

    check_image_target(args.out, args.overwrite, _inputs(args.folder))
    inversion = Inversion.load(args.folder)  # a bad folder fails before the model loads
    model = _load_model(args)
    result = _edit(args, model, inversion)  # edit() refuses an inversion of another model
    return _summary({"image": result.save(args.out)}, result.timings, result.unet_evals)


def _run_attention(args: argparse.Namespace) -> Summary:
    from dpl_edit.engine.artifact import Inversion
    from dpl_edit.io.pictures import attention_grid
    from dpl_edit.io.targets import check_image_target

    check_image_target(args.out, args.overwrite, _inputs(args.folder, args.compare))
    inversion = Inversion.load(args.folder)
    rows = [(inversion.method.upper(), inversion.attention)]
    if args.compare:
        other = Inversion.load(args.compare)
        _check_comparable(inversion, other, args.compare)
        rows.append((other.method.upper(), other.attention))
    path = attention_grid(inversion.image, inversion.words, rows, args.out)
    return _summary({"attention": path}, {}, {})


def _check_comparable(inversion, other, folder: str) -> None:
    """Rows of one grid must show the same words of the same image under the same model."""
    import numpy as np

    from dpl_edit.engine.model import same_model

    if other.prompt != inversion.prompt:
        raise DplError(f"'{folder}' inverts '{other.prompt}', not '{inversion.prompt}'")
    if not same_model(other.model_identity, inversion.model_identity):
        raise DplError(f"'{folder}' was made with another model ({other.model_identity})")
    if not np.array_equal(np.asarray(other.image), np.asarray(inversion.image)):
        raise DplError(f"'{folder}' is an inversion of another image")


def _run_run(args: argparse.Namespace) -> Summary:
    from dpl_edit.engine.text import check_prompt
    from dpl_edit.io.images import read_image
    from dpl_edit.outputs import RunFiles

    files = RunFiles.next_to(Path(args.out))
    files.check(args.overwrite, _inputs(args.image, args.bg_mask))
    image = read_image(args.image)
    model = _load_model(args)
    check_prompt(model, args.target)  # the edit's target is refused before the inversion runs
    inversion = _invert(args, model, image)
    result = _edit(args, model, inversion)
    return _summary(
        files.save(inversion, [result]),
        {**inversion.timings, **result.timings},
        {**inversion.unet_evals, **result.unet_evals},
        _inner_steps(inversion),
    )


def _add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing output if it is {what}; a file or folder "
                        "dpl-edit did not make is never replaced")  # fmt: skip


def _invert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image file (anything Pillow reads)")
    parser.add_argument("--prompt", required=True, help="text describing the image")
    parser.add_argument("--out", required=True, help="inversion folder to create")
    _add_overwrite(parser, "an inversion folder it made")
    _add_inversion_options(parser)
    _add_common(parser)


def _edit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="inversion folder made by `dpl invert`")
    parser.add_argument("--target", required=True, help="the edited prompt")
    parser.add_argument("--out", required=True, help="edited image (.png or .jpg)")
    _add_overwrite(parser, "an image it made")
    _add_edit_options(parser)
    _add_common(parser, steps=_THE_INVERSIONS, guidance=_THE_INVERSIONS)


def _attention_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="inversion folder made by `dpl invert`")
    parser.add_argument("--out", required=True, help="attention grid (.png or .jpg)")
    _add_overwrite(parser, "an image it made")
    parser.add_argument(
        "--compare",
        metavar="FOLDER",
        help="another inversion of the same image and prompt (e.g. NTI), drawn as a second row",
    )
    _add_common(parser, model=False)


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image file (anything Pillow reads)")
    parser.add_argument("--prompt", required=True, help="text describing the image")
    parser.add_argument("--target", required=True, help="the edited prompt")
    parser.add_argument(
        "--out",
        required=True,
        help="edited image (.png or .jpg); OUT_source.png, OUT_attention.png and the "
        "OUT_inversion folder are written next to it",
    )
    _add_overwrite(parser, "files and a folder it made")
    _add_inversion_options(parser)
    _add_edit_options(parser)
    _add_common(parser)


def _run_bench(args: argparse.Namespace) -> Summary:
    import time

    from dpl_edit.bench.methods import BenchSettings, resolve_methods
    from dpl_edit.bench.runner import rescore, run_bench
    from dpl_edit.bench.scenes import load_jsonl
    from dpl_edit.bench.world_set import check_split, export_world, world_split

    check_split(args.split, args.final, args.scenes is not None)
    if args.export_world:
        path = export_world(args.export_world, args.split, args.limit, args.categories)
        return _summary({"scenes": path}, {}, {})
    if args.scenes and args.rescore:
        raise DplError("--rescore works on the built-in world splits only")
    resolve_methods(args.methods)  # a bad method or scene list fails before the model loads
    if args.scenes:
        scenes = load_jsonl(args.scenes)[: args.limit]
        scene_set = f"{args.scenes}, {len(scenes)} scenes"
    else:
        scenes = world_split(args.split, args.limit, args.categories, args.per_category)
        which = "" if not args.categories else f" ({', '.join(args.categories)})"
        each = "" if args.per_category is None else f", first {args.per_category} per category"
        scene_set = f"built-in world {args.split} split{which}{each}, {len(scenes)} scenes"
    start = time.perf_counter()
    if args.rescore:
        rescore(args.out, scenes)
        outputs = {name: Path(args.out) / name for name in ("report.md", "aggregate.json")}
        return _summary(outputs, {"rescore": time.perf_counter() - start}, {})
    settings = BenchSettings(steps=args.steps, guidance=args.guidance, seed=args.seed)
    model = _load_model(args)
    with _executor(args, model) as executor:
        run_bench(
            model,
            scenes,
            args.out,
            args.methods,
            settings,
            scene_set,
            executor=executor,
            inversion_dir=args.inversions,
            final=args.final,
        )
    outputs = {name: Path(args.out) / name for name in ("report.md", "aggregate.json")}
    return _summary(outputs, {"bench": time.perf_counter() - start}, {})


def _add_executor_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "parallel runs", "Every worker loads the model once; results are written here."
    )
    group.add_argument("--workers", type=int, metavar="N",
                       help="local worker processes, each with cores/N threads (default: 1, this "
                       "process); with --ray the number of Ray workers (default: one per GPU, "
                       "else per CPU, of the cluster)")  # fmt: skip
    group.add_argument("--ray", metavar="ADDRESS",
                       help="run on a Ray cluster: auto (the one this machine is in), local "
                       "(start one here) or HOST:PORT; needs pip install 'dpl-edit[ray]'")  # fmt: skip
    group.add_argument("--gpus-per-job", type=_finite, metavar="G",
                       help="GPUs each Ray worker reserves (default: 1 on a cluster with GPUs, "
                       "else 0)")  # fmt: skip


def _executor(args: argparse.Namespace, model) -> Any:
    """The executor --workers, --ray and --gpus-per-job ask for (this process by default)."""
    import os

    from dpl_edit.batch.executors import ModelSpec, make_executor

    spec = ModelSpec(
        args.model or os.environ.get("DPL_MODEL"),
        args.device,
        args.dtype,
        args.cuda_graphs,
        args.channels_last,
        args.variant,
    )
    return make_executor(model, spec, args.workers, args.ray, args.gpus_per_job)


def _run_batch(args: argparse.Namespace) -> Summary:
    from dpl_edit.batch.executors import require_ray
    from dpl_edit.batch.jobs import EditJob, JobDefaults, read_jobs
    from dpl_edit.batch.run import BatchSettings, check_batch_folder, check_job, run_batch

    if args.example_jobs:
        from dpl_edit.bench.world_set import export_jobs

        path = export_jobs(args.example_jobs, args.split, args.limit)
        return _summary({"jobs": path}, {}, {})
    if not args.jobs or not args.out:
        raise DplError("give a job file and --out (or --example-jobs DIR)")
    check_batch_folder(args.out)
    if args.ray:
        require_ray()  # before minutes of checking and loading
    model = _load_model(args)
    settings = BatchSettings(
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        resize=args.resize,
        null_text=_null_text(args),
        dpl_config=_dpl_config(args, model, any_method=True),
        background=_background(args),
        no_bg=args.no_bg,
    )
    defaults = JobDefaults(
        method=args.method,
        words=tuple(args.words) if args.words else None,
        edit=EditJob(
            target="",
            mode=args.mode,
            reweight=dict(args.reweight),
            blend=tuple(args.blend),
            cross_steps=_cross_windows(args),
            self_steps=args.self_steps,
            target_tokens=args.target_tokens,
        ),
    )
    jobs = read_jobs(args.jobs, defaults, lambda job: check_job(model, job, settings))
    with _executor(args, model) as executor:
        report = run_batch(model, jobs, args.out, settings, executor)
    summary = _summary(
        {"summary": report.summary_md, "summary_jsonl": report.summary_jsonl},
        {"batch": report.wall_seconds},
        {},
    )
    summary["jobs"] = {
        "total": report.total,
        "ran": report.ran,
        "skipped": report.skipped,
        "failed": report.failed,
    }
    if report.failed:
        print(
            f"error: {len(report.failed)} of {report.total} jobs failed (first: "
            f"'{report.failed[0]}'); see {report.summary_md}",
            file=sys.stderr,
        )
        summary["exit_code"] = 1
    return summary


def _batch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jobs", nargs="?", help="job file (JSONL, one job a line; see README)")
    parser.add_argument("--out", help="output folder (resumable: finished jobs are skipped)")
    parser.add_argument("--example-jobs", metavar="DIR",
                        help="write the built-in world scenes of --split as a job file (a word "
                        "swap each) with their images into DIR and stop")  # fmt: skip
    parser.add_argument("--split", choices=["val", "dev"], default="val",
                        help="scenes for --example-jobs (default: %(default)s)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=20,
                        help="number of scenes for --example-jobs (default: %(default)s)")  # fmt: skip
    _add_inversion_options(parser, one_image=False)
    parser.set_defaults(bg_mask=None)
    _add_edit_options(parser)
    _add_executor_options(parser)
    _add_common(parser)
    parser.epilog = "Options a job or edit sets itself override these (README, `dpl batch`)."


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from dpl_edit.bench.methods import DEFAULT_METHODS, METHODS, BenchSettings

    parser.add_argument("--split", choices=["val", "dev", "test"], default="val",
                        help="built-in world split (val: every choice; dev: the former test split;"
                        " test: sealed, only with --final)")  # fmt: skip
    parser.add_argument("--final", action="store_true",
                        help="a final run on the sealed test split, for a configuration that will"
                        " be reported: records its configuration hash and commit")  # fmt: skip
    parser.add_argument("--scenes", help="external scene list (JSONL) instead of the world")
    parser.add_argument("--limit", type=int, help="only the first N scenes")
    parser.add_argument("--per-category", type=int, metavar="N",
                        help="only the first N scenes of each category")  # fmt: skip
    parser.add_argument("--rescore", action="store_true",
                        help="measure the edit outcome again from the edits in --out (same scene"
                        " options as the run) and rebuild its report; no model work")  # fmt: skip
    parser.add_argument("--inversions", metavar="DIR",
                        help="keep each scene's inversions in DIR and reuse them: rows that differ"
                        " only in their edit settings never invert a scene twice")  # fmt: skip
    parser.add_argument("--categories", nargs="+", metavar="CATEGORY",
                        help="built-in scene categories to run (default: all; see README)")  # fmt: skip
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        metavar="METHOD",
        help=f"any of {', '.join(METHODS)} or all (default: {' '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--out", default="bench/results", help="results folder (resumable)")
    parser.add_argument(
        "--export-world",
        metavar="DIR",
        help="write the --split scenes as JSONL + PNGs into DIR and stop",
    )
    _add_executor_options(parser)
    _add_common(parser, steps=BenchSettings.steps, guidance=BenchSettings.guidance)
    parser.epilog = "Cost grows with --steps and --limit (README, `dpl bench`)."


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from dpl_edit.world.training.request import TrainRequest

    defaults = TrainRequest()
    parser.add_argument("--run", type=Path, default=defaults.run,
                        help="checkpoint folder (default: %(default)s)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=defaults.out,
                        help="where the finished diffusers folder goes (default: the bundled model)")  # fmt: skip
    parser.add_argument("--vae-steps", type=int, help="VAE steps (total, resumable)")
    parser.add_argument("--unet-steps", type=int, help="UNet steps (total, resumable)")
    parser.add_argument("--decoder-steps", type=int, help="decoder fine-tuning steps")
    parser.add_argument("--attn-guide-weight", type=_finite, help="weak attention hint (0 = off)")
    parser.add_argument("--sink-weight", type=_finite,
                        help="weight of the term that makes the start token the attention sink, "
                        "as in Stable Diffusion (0 = off)")  # fmt: skip
    parser.add_argument("--ema-decay", type=_finite,
                        help="decay of the exported EMA weights (the recipe's: 0.999)")  # fmt: skip
    parser.add_argument("--lr-decay-from", type=int, metavar="STEP",
                        help="cosine-decay the UNet/text learning rate from STEP to its floor at "
                        "the last step")  # fmt: skip
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of a new run (default: %(default)s)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="CPU threads (default: %(default)s, torch's choice)")  # fmt: skip
    parser.add_argument("--export-only", action="store_true", help="only write --out from --run")
    parser.add_argument("--resume-from", type=Path, metavar="MODEL",
                        help="start an empty --run from a shipped model folder (e.g. the bundled one)")  # fmt: skip
    _add_common(parser, model=False)


def _run_train(args: argparse.Namespace) -> Summary:
    from dpl_edit.world.training.request import TrainRequest
    from dpl_edit.world.training.run import train

    names = [field.name for field in fields(TrainRequest)]  # each has its option
    model = train(TrainRequest(**{name: getattr(args, name) for name in names}))
    return _summary({"model": model, "run": args.run}, {}, {})


def _credentials(text: str) -> tuple[str, str]:
    """--auth's value: USER:PASS, neither empty (the password may hold colons)."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected USER:PASS")
    return user, password


def _ui_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only)")  # fmt: skip
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public Gradio share link (off unless given)")  # fmt: skip
    parser.add_argument("--auth", type=_credentials, metavar="USER:PASS",
                        help="ask for this user name and password (the app has no accounts of "
                        "its own; use it with --host or --share on a shared machine)")  # fmt: skip
    _add_common(parser, model=False)
    _add_model_options(parser.add_argument_group("model"))


def _run_ui(args: argparse.Namespace) -> Summary:
    from dpl_edit.ui.app import serve

    address = serve(
        args.model,
        args.device,
        args.dtype,
        args.host,
        args.port,
        args.share,
        args.cuda_graphs,
        args.channels_last,
        args.auth,
    )
    return _summary({"address": address}, {}, {})


COMMANDS: list[Command] = [
    Command("invert", "invert a real image (DDIM, null-text inversion or DPL)", _invert_arguments, _run_invert),
    Command("edit", "edit an inverted image with Prompt-to-Prompt", _edit_arguments, _run_edit),
    Command("attention", "draw each word's cross-attention", _attention_arguments, _run_attention),
    Command("run", "invert and edit in one go", _run_arguments, _run_run),
    Command("batch", "invert and edit many images from a job file (resumable, parallel)", _batch_arguments, _run_batch),
    Command("bench", "leakage benchmark of DDIM, NTI, DPL (+ ablations)", _bench_arguments, _run_bench),
    Command("ui", "the web app: invert, see the attention, edit (local Gradio server)", _ui_arguments, _run_ui),
    Command("train-world", "train the bundled model on the synthetic world (resumable)", _train_arguments, _run_train),
]  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one `error:` line and exit code 2, like every other
    user error (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dpl", description="Edit real images with text (null-text inversion, P2P, DPL)."
    )
    parser.add_argument("--version", action="version", version=f"dpl-edit {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(runner=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = args.runner(args)
    except DplError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    code = summary.pop("exit_code", 0)  # e.g. a batch whose every input was fine but a job failed
    if args.json:
        print(json.dumps({"command": args.command, **summary}, indent=2))
    else:
        for name, path in summary["outputs"].items():
            print(f"{name}: {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
