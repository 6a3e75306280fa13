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
from dpl_edit.dpl.presets import DEFAULT_PRESET, PRESETS
from dpl_edit.engine.settings import (
    DEVICES,
    DTYPES,
    FAST_NULL_TEXT,
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
                           help="weights to load, e.g. fp16 (default: plain, else the only one)")  # fmt: skip
        group.add_argument("--threads", type=int, metavar="N",
                           help="CPU threads (default: the model folder's choice, else torch's)")  # fmt: skip
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
                       help="replay inversions' UNet passes as CUDA graphs (GPU; 4-5x faster on SD)")  # fmt: skip
    group.add_argument("--channels-last", action="store_true",
                       help="channels-last UNet (GPU; 1.2x faster on SD with --cuda-graphs)")  # fmt: skip


def _add_inversion_options(parser: argparse.ArgumentParser, one_image: bool = True) -> None:
    parser.add_argument("--method", choices=METHODS, default=_INVERSION.method,
                        help="inversion method (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--resize", action="store_true", help="stretch non-square images instead of cropping"
    )
    _add_dpl_options(parser, one_image)


def _add_dpl_options(parser: argparse.ArgumentParser, one_image: bool = True) -> None:
    """DPL's options, the research settings' preset and file (DPL's, and the null text's that
    NTI shares) and --fast; a batch (`one_image` False) has no --bg-mask, a mask being per
    image. The options these replaced are still recognised, and refused naming their new home."""
    group = parser.add_argument_group(
        "Dynamic Prompt Learning (--method dpl) and null text (nti, dpl)",
        "Research settings go in a --dpl-config file (docs/guide.md, DPL's settings).",
    )
    group.add_argument("--words", nargs="+", metavar="WORD",
                       help="words that get dynamic tokens (default: the prompt's words in the "
                       "model's object list)")  # fmt: skip
    if one_image:
        group.add_argument("--bg-mask", metavar="FILE",
                           help="background mask (white = background) instead of estimating one")  # fmt: skip
    group.add_argument("--dpl-preset", choices=list(PRESETS), metavar="NAME",
                       help="DPL's settings: "
                       + "; ".join(f"{name}: {preset.help}" for name, preset in PRESETS.items())
                       + f" (default: {DEFAULT_PRESET})")  # fmt: skip
    group.add_argument("--dpl-config", metavar="FILE",
                       help="JSON settings on top of the preset: DplLossConfig fields, optional "
                       "null_text and background objects")  # fmt: skip
    group.add_argument("--fast", action="store_true",
                       help=f"null text {FAST_NULL_TEXT.inner_steps} steps at rate "
                       f"{FAST_NULL_TEXT.lr}, DPL's stop_on_rise (research/speed.md)")  # fmt: skip
    for option, moved in _MOVED.items():
        parser.add_argument(option, action=_Moved, replacement=moved[1], nargs=moved[0])


def _config_value(text: str) -> Any:
    """An old option's value as it is written in a settings file ('none' is null)."""
    if text.strip().lower() == "none":
        return None
    with suppress(ValueError):
        return int(text)
    try:
        return _finite(text)
    except argparse.ArgumentTypeError:
        return text


def _setting(*keys: str, value: Any = None) -> Callable[[list[str]], str]:
    """The --dpl-config setting an old option became: `value` for a switch, else the option's
    own value (a list for an option that took several)."""

    def replacement(values: list[str]) -> str:
        given: Any = value
        if values:
            given = [_config_value(v) for v in values]
            given = given[0] if len(given) == 1 and keys[-1] != "loss_res" else given
        for key in reversed(keys):
            given = {key: given}
        return f"a --dpl-config setting: {json.dumps(given)}"

    return replacement


def _original_null_text(values: list[str]) -> str:
    from dpl_edit.dpl.stage import ORIGINAL_NULL_TEXT

    changed = {
        f.name: getattr(ORIGINAL_NULL_TEXT, f.name)
        for f in fields(NullTextSettings)
        if getattr(ORIGINAL_NULL_TEXT, f.name) != getattr(NullTextSettings(), f.name)
    }
    return f"a --dpl-config setting: {json.dumps({'null_text': changed})}"


_MOVED: dict[str, tuple[int | str, Callable[[list[str]], str]]] = {
    "--paper-settings": (0, lambda values: "--dpl-preset paper"),
    "--no-bg": (0, _setting("use_bg", value=False)),
    "--no-at": (0, _setting("use_at", value=False)),
    "--no-dj": (0, _setting("use_dj", value=False)),
    "--no-thresholds": (0, _setting("use_thresholds", value=False)),
    "--stop-on-rise": (0, _setting("stop_on_rise", value=True)),
    "--lambda-at": (1, _setting("lambda_at")),
    "--lambda-dj": (1, _setting("lambda_dj")),
    "--lambda-bg": (1, _setting("lambda_bg")),
    "--token-inner-steps": (1, _setting("max_inner_steps")),
    "--softmax-tokens": (1, _setting("softmax_tokens")),
    "--loss-res": ("+", _setting("loss_res")),
    "--threshold-index": (1, _setting("threshold_index")),
    "--leak-region": (1, _setting("leak_region")),
    "--leak-measure": (1, _setting("leak_measure")),
    "--max-drift": (1, _setting("max_drift")),
    "--bg-resample": (1, _setting("background", "resample")),
    "--gaussian-formula": (1, _setting("gaussian_formula")),
    "--plateau-tol": (1, _setting("plateau_tol")),
    "--learn-until": (1, _setting("learn_until")),
    "--null-text-original": (0, _original_null_text),
    "--null-steps": (1, _setting("null_text", "inner_steps")),
    "--null-lr": (1, _setting("null_text", "lr")),
}
"""Options that became a preset or a --dpl-config setting: nargs, and what replaces them."""


class _Moved(argparse.Action):
    """An option that moved: recognised, left out of --help, and refused with one line that
    names its replacement (with the value given, ready to paste into a settings file)."""

    def __init__(self, option_strings, dest, replacement, **kwargs) -> None:
        self.replacement = replacement
        super().__init__(
            option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs
        )

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        parser.error(f"{option_string} is now {self.replacement(values or [])}")


def _dpl_choice(args: argparse.Namespace) -> Any:
    """--dpl-preset and --dpl-config, both checked before the model loads."""
    from dpl_edit.dpl.presets import choose

    return choose(args.dpl_preset, args.dpl_config)


def _inversion_settings(
    args: argparse.Namespace, choice: Any, model, any_method: bool = False
) -> dict[str, Any]:
    """`invert`'s null_text, dpl_config and background: --dpl-preset, then --fast, then
    --dpl-config's settings. Each is None where nothing changes it (so that `invert` keeps its
    defaults, and a batch folder's recorded settings stay those of a plain run). A batch
    (`any_method`) applies DPL's to its DPL jobs only; one inversion by another method
    refuses them rather than ignoring them."""
    from dpl_edit.dpl.stage import BackgroundSettings, default_config

    dpl_method = any_method or args.method == "dpl"
    if choice.has_dpl and not dpl_method:
        raise DplError(
            f"--dpl-preset and --dpl-config's DPL settings need --method dpl, not '{args.method}'"
        )
    fast = {"stop_on_rise": True} if args.fast and dpl_method else {}
    dpl_config = None
    if choice.has_dpl or fast:
        dpl_config = choice.dpl_config(default_config(model), fast)
    if getattr(args, "bg_mask", None) and dpl_config is not None and not dpl_config.use_bg:
        raise DplError("--bg-mask and use_bg false (no background loss) contradict each other")
    null_text = None
    if args.fast or choice.null_text:
        null_text = replace(FAST_NULL_TEXT if args.fast else NullTextSettings(), **choice.null_text)
    background = BackgroundSettings(**choice.background) if choice.background else None
    return {"null_text": null_text, "dpl_config": dpl_config, "background": background}


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


def _invert(args: argparse.Namespace, model, image, choice: Any) -> Any:
    from dpl_edit.engine.inversion import invert

    return invert(
        model,
        image,
        args.prompt,
        method=args.method,
        steps=args.steps,
        guidance=args.guidance,
        resize=args.resize,
        words=args.words,
        bg_mask=args.bg_mask,
        **_inversion_settings(args, choice, model),
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


def _edit_options(args: argparse.Namespace) -> dict[str, Any]:
    """What `edit` and `plan_edit` both take from the edit options."""
    return {
        "mode": args.mode,
        "reweight": dict(args.reweight),
        "blend": args.blend,
        "cross_replace_steps": _cross_windows(args),
        "self_replace_steps": args.self_steps,
    }


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
        guidance=args.guidance,
        target_tokens=args.target_tokens,
        **_edit_options(args),
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


def _reconstruction(summary: Summary, inversion, reconstruction) -> Summary:
    """`summary` with the reconstruction's PSNR against the input, warning on stderr when it
    is too poor for edits to be worth anything."""
    from dpl_edit.outputs import poor_reconstruction, reconstruction_psnr

    value = reconstruction_psnr(inversion, reconstruction)
    warning = poor_reconstruction(value, inversion.method)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return {**summary, "reconstruction_psnr_db": round(value, 2)}


def _run_invert(args: argparse.Namespace) -> Summary:
    from dpl_edit.engine.inversion import reconstruction_image
    from dpl_edit.io.images import read_image
    from dpl_edit.io.targets import check_folder_target

    check_folder_target(args.out, args.overwrite, _inputs(args.image, args.bg_mask))
    choice = _dpl_choice(args)
    image = read_image(args.image)
    model = _load_model(args)
    inversion = _invert(args, model, image, choice)
    folder = inversion.save(args.out, overwrite=args.overwrite)
    summary = _summary(
        {"inversion": folder}, inversion.timings, inversion.unet_evals, _inner_steps(inversion)
    )
    if inversion.trajectory is None:  # DDIM: measuring would replay the whole path
        return summary
    return _reconstruction(summary, inversion, reconstruction_image(model, inversion))


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
    from dpl_edit.engine.edit import plan_edit
    from dpl_edit.engine.text import check_vocabulary
    from dpl_edit.io.images import read_image
    from dpl_edit.outputs import RunFiles

    files = RunFiles.next_to(Path(args.out))
    files.check(args.overwrite, _inputs(args.image, args.bg_mask))
    choice = _dpl_choice(args)
    image = read_image(args.image)
    model = _load_model(args)
    # The edit is refused before the inversion runs, both prompts' unknown words at once.
    check_vocabulary(model, [args.prompt, args.target])
    plan_edit(model, args.prompt, args.target, args.steps, **_edit_options(args))
    inversion = _invert(args, model, image, choice)
    result = _edit(args, model, inversion)
    summary = _summary(
        files.save(inversion, [result]),
        {**inversion.timings, **result.timings},
        {**inversion.unet_evals, **result.unet_evals},
        _inner_steps(inversion),
    )
    return _reconstruction(summary, inversion, result.source)


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
    from dpl_edit.outputs import POOR_RECONSTRUCTION_DB

    if args.example_jobs:
        from dpl_edit.bench.world_set import export_jobs

        path = export_jobs(args.example_jobs, args.split, args.limit)
        return _summary({"jobs": path}, {}, {})
    if not args.jobs or not args.out:
        raise DplError("give a job file and --out (or --example-jobs DIR)")
    check_batch_folder(args.out)
    if args.ray:
        require_ray()  # before minutes of checking and loading
    choice = _dpl_choice(args)
    model = _load_model(args)
    settings = BatchSettings(
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        resize=args.resize,
        **_inversion_settings(args, choice, model, any_method=True),
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
    summary["poor_reconstruction"] = report.poor
    if report.poor:
        print(
            f"warning: {len(report.poor)} of {report.total} jobs reconstructed under "
            f"{POOR_RECONSTRUCTION_DB:.0f} dB PSNR (first: '{report.poor[0]}'): the model cannot "
            f"represent those images; see {report.summary_md}",
            file=sys.stderr,
        )
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
        if "reconstruction_psnr_db" in summary:
            print(
                f"reconstruction: {summary['reconstruction_psnr_db']:.1f} dB PSNR against the input"
            )
    return code


if __name__ == "__main__":
    sys.exit(main())
