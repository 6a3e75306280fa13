"""The speed benchmark: what a user waits for, measured side by side in one run, and why.

On one built-in scene: loading the model, a first call (warm-up), NTI inversion, DPL inversion
(the model's DPL defaults), an edit from a saved DPL inversion, `dpl run` end to end in a
fresh process, and NTI and DPL inversions with the speed options (bench rows `nti-fast`,
`dpl-fast`, `dpl-full`, `dpl-plateau`, `dpl-early`, `dpl-early25`), each with its UNet
passes; the edit on the threads `dpl edit` uses (and on the inversions' when those differ)
and on the model loaded in bfloat16 (with its PSNR against the float32 edit, so that a faster
precision is seen to keep the picture). Then one
more DPL inversion with the defaults and one as `dpl-full` (the defaults without their stopping
rules), each timed by the engine's
labelled timers (`dpl_edit.engine.timers`), split into UNet forward passes (with the attention
hooks inside them shown apart), backward passes, optimiser steps, DPL's loss code, text
encoding and the rest (Python, DDIM updates, K-means), so the next person knows where the time
goes.

    python -m dpl_edit.bench.speed --steps 50 --out docs/bench/speed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dpl_edit.bench.methods import METHODS
from dpl_edit.bench.scenes import load_rgb
from dpl_edit.bench.world_set import world_scene
from dpl_edit.dpl.losses import DplLossConfig
from dpl_edit.engine.artifact import Inversion
from dpl_edit.engine.edit import edit
from dpl_edit.engine.inversion import invert, reconstruction_image
from dpl_edit.engine.model import LoadedModel, load_model, use_threads
from dpl_edit.engine.timers import collect
from dpl_edit.errors import DplError
from dpl_edit.io.atomic import atomic_write_bytes
from dpl_edit.metrics import psnr

PROFILE_LABELS = {
    "unet forward": "unet_forward",
    "attention hooks (inside forward)": "attention_controllers",
    "backward": "backward",
    "optimiser steps": "optimiser",
    "DPL losses": "dpl_losses",
    "text encoding": "text_encode",
}
"""Report rows -> the engine's timer labels (`dpl_edit.engine.timers`)."""
DISJOINT_PARTS = ("unet forward", "backward", "optimiser steps", "DPL losses", "text encoding")
"""The rows that never overlap one another (the hooks run inside the forward passes)."""


@dataclass
class Timing:
    """One measured operation: wall seconds and UNet passes (None where not counted)."""

    name: str
    seconds: float
    unet_evals: int | None = None
    note: str = ""


SPEED_OPTIONS = ("nti-fast", "dpl-fast", "dpl-full", "dpl-plateau", "dpl-early", "dpl-early25")
"""Benchmark rows (`dpl_edit.bench.methods`) with the speed options, timed beside the defaults."""
QUICK_OPTIONS = ("dpl-full", "dpl-plateau", "dpl-early", "dpl-early25")
"""The speed options a `--quick` run times: DPL's stopping rules (`dpl-full`: none of them)."""


def _scene_image(split: str, index: int) -> tuple[Image.Image, str, str, list[str]]:
    scene = world_scene(split, index)
    return Image.fromarray(load_rgb(scene.image)), scene.source, scene.target, list(scene.masks)


def _timed_inversion(
    model: LoadedModel,
    image: Image.Image,
    prompt: str,
    method: str,
    steps: int,
    label: str | None = None,
    **options: Any,
) -> tuple[Inversion, Timing]:
    start = time.perf_counter()
    inversion = invert(model, image, prompt, method=method, steps=steps, progress=False, **options)
    seconds = time.perf_counter() - start
    rebuilt = reconstruction_image(model, inversion)
    quality = psnr(np.asarray(inversion.image), np.asarray(rebuilt))
    evals = sum(inversion.unet_evals.values())
    return inversion, Timing(
        label or f"{method.upper()} inversion", seconds, evals, f"PSNR {quality:.1f} dB"
    )


def _dpl_run(image: Image.Image, prompt: str, target: str, steps: int, folder: Path) -> Timing:
    """`dpl run` in a fresh process: what a user of the command waits for."""
    image.save(folder / "scene.png")
    command = [
        sys.executable, "-m", "dpl_edit.cli", "run", str(folder / "scene.png"), "--prompt", prompt,
        "--target", target,
        "--out", str(folder / "edit.png"), "--steps", str(steps), "--json",
    ]  # fmt: skip
    # The same thread count as this process, so the rows compare.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise DplError(f"dpl run failed: {done.stderr.strip().splitlines()[-1]}")
    return Timing("`dpl run` end to end (new process)", seconds, note="load + DPL + edit + files")


def profile_inversion(
    model: LoadedModel,
    image: Image.Image,
    prompt: str,
    steps: int,
    words: Sequence[str] | None = None,
    dpl_config: DplLossConfig | None = None,
) -> dict[str, float]:
    """Seconds of one DPL inversion by kind of work, from the engine's labelled timers."""
    start = time.perf_counter()
    with collect() as totals:
        invert(
            model, image, prompt, method="dpl", steps=steps, progress=False, words=words,
            dpl_config=dpl_config,
        )  # fmt: skip
    result = {"total": time.perf_counter() - start}
    result.update({row: totals.get(label, 0.0) for row, label in PROFILE_LABELS.items()})
    counted = sum(result[row] for row in DISJOINT_PARTS)
    result["rest (Python, DDIM updates, K-means)"] = max(0.0, result["total"] - counted)
    return result


def run_speed(
    steps: int,
    split: str,
    index: int,
    threads: int | None,
    work: Path,
    quick: bool = False,
    repeats: int = 3,
) -> dict:
    """Every measurement of the benchmark, in the order a user meets them; `quick` keeps the
    inversions, DPL's stopping rules (`QUICK_OPTIONS`) and the edits (no `dpl run`, other
    speed options or profiles). The default NTI and DPL inversions run `repeats` times each,
    alternating, and report their median."""
    image, prompt, target, nouns = _scene_image(split, index)
    timings: list[Timing] = []
    start = time.perf_counter()
    model = load_model()
    timings.append(Timing("load the bundled model", time.perf_counter() - start))
    use_threads(model, threads)  # as the `dpl` commands do
    start = time.perf_counter()
    invert(model, image, prompt, method="nti", steps=1, progress=False)
    timings.append(Timing("first call (1-step NTI, warm-up)", time.perf_counter() - start))
    # NTI and DPL alternate, and each row is the median run: on a shared machine one run of
    # either can be 15% off, which alone moves their ratio by as much.
    runs: dict[str, list[tuple[Inversion, Timing]]] = {"nti": [], "dpl": []}
    for _ in range(repeats):
        for method, inversions in runs.items():
            inversions.append(_timed_inversion(model, image, prompt, method, steps))
    nti, dpl = (_median([timing for _, timing in inversions]) for inversions in runs.values())
    dpl_inversion = runs["dpl"][-1][0]
    timings += [nti, dpl]
    dpl_inversion.save(work / "dpl.inv", overwrite=True)
    saved = Inversion.load(work / "dpl.inv", model)
    # The edit runs on the threads `dpl edit` picks (the model's `edit_threads`), and is also
    # timed on the inversions' threads when those differ.
    inversion_threads = torch.get_num_threads()
    use_threads(model, threads, edit=True)
    edit_threads = torch.get_num_threads()
    label = f"edit from the saved DPL inversion, {edit_threads} thread{'s' * (edit_threads > 1)}"
    timing, edited = _timed_edit(model, saved, target, label)
    timings.append(timing)
    if edit_threads != inversion_threads:
        torch.set_num_threads(inversion_threads)
        label = f"the same edit on the inversions' {inversion_threads} thread(s)"
        timings.append(_timed_edit(model, saved, target, label)[0])
    timings.append(_bfloat16_edit(image, prompt, target, threads, work, edited))
    torch.set_num_threads(inversion_threads)
    if not quick:
        timings.append(_dpl_run(image, prompt, target, steps, work))
    fast = {}
    for name in QUICK_OPTIONS if quick else SPEED_OPTIONS:
        method = METHODS[name]
        _, fast[name] = _timed_inversion(
            model, image, prompt, method.inversion, steps,
            f"{method.inversion.upper()} inversion with the speed options (`{name}`)",
            **method.invert_kwargs(model, nouns),
        )  # fmt: skip
    timings += list(fast.values())
    record = {
        "steps": steps,
        "scene": f"{split}-{index:03d}",
        "prompt": prompt,
        "target": target,
        "threads": torch.get_num_threads(),
        "timings": [asdict(t) for t in timings],
        "dpl_over_nti": dpl.seconds / nti.seconds,
        "options_over_nti": {
            name: fast[name].seconds / nti.seconds for name in fast if name.startswith("dpl")
        },
    }
    if not quick:
        record["fast_dpl_over_fast_nti"] = fast["dpl-fast"].seconds / fast["nti-fast"].seconds
        record["profile"] = profile_inversion(model, image, prompt, steps)
        record["profile_full"] = profile_inversion(
            model, image, prompt, steps, dpl_config=METHODS["dpl-full"].dpl_config(model)
        )
    return record


def _median(runs: list[Timing]) -> Timing:
    """The run of median time (the lower middle of an even count), its note listing all."""
    timing = sorted(runs, key=lambda run: run.seconds)[(len(runs) - 1) // 2]
    if len(runs) > 1:
        each = ", ".join(f"{run.seconds:.2f}" for run in runs)
        timing = replace(timing, note=f"{timing.note}; median of {len(runs)} runs ({each} s)")
    return timing


def _timed_edit(
    model: LoadedModel, inversion: Inversion, target: str, label: str
) -> tuple[Timing, Image.Image]:
    start = time.perf_counter()
    result = edit(model, inversion, target, progress=False)
    timing = Timing(label, time.perf_counter() - start, result.unet_evals["edit"])
    return timing, result.image


def _bfloat16_edit(
    image: Image.Image,
    prompt: str,
    target: str,
    threads: int | None,
    work: Path,
    reference: Image.Image,
) -> Timing:
    """The same edit from the same saved (float32) inversion on the model loaded in bfloat16
    (`dpl edit --dtype bfloat16`), after its own 1-step warm-up, with its PSNR against the
    float32 edit `reference`."""
    model = load_model(dtype="bfloat16")
    use_threads(model, threads, edit=True)
    invert(model, image, prompt, method="nti", steps=1, progress=False)
    saved = Inversion.load(work / "dpl.inv", model)
    label = "edit from the saved DPL inversion, model in bfloat16"
    timing, edited = _timed_edit(model, saved, target, label)
    timing.note = f"PSNR {psnr(np.asarray(reference), np.asarray(edited)):.1f} dB vs float32 edit"
    return timing


def report(record: dict) -> str:
    """Markdown tables: the timings, then the profile of one DPL inversion."""
    lines = [
        f'Scene {record["scene"]} ("{record["prompt"]}" -> "{record["target"]}"), '
        f"{record['steps']} steps, {record['threads']} torch threads.",
        "",
        "| operation | seconds | UNet passes | note |",
        "|---|---|---|---|",
    ]
    for t in record["timings"]:
        evals = "" if t["unet_evals"] is None else str(t["unet_evals"])
        lines.append(f"| {t['name']} | {t['seconds']:.2f} | {evals} | {t['note']} |")
    ratios = [f"{record['dpl_over_nti']:.2f}x (defaults)"]
    if "fast_dpl_over_fast_nti" in record:
        ratios.append(f"{record['fast_dpl_over_fast_nti']:.2f}x (both with the speed options)")
    for name, ratio in record["options_over_nti"].items():
        ratios.append(f"{ratio:.2f}x (`{name}` / default NTI)")
    lines += ["", "DPL inversion / NTI inversion: " + ", ".join(ratios)]
    profiles = {"the default DPL": "profile", "`dpl-full` (no stopping rules)": "profile_full"}
    for name, key in profiles.items():
        if key not in record:
            continue
        profiled = record[key]
        lines += [
            "",
            f"Where one DPL inversion's time goes, {name} (the engine's timers):",
            "",
            "| part | seconds | share |",
            "|---|---|---|",
        ]
        for part, seconds in profiled.items():
            if part != "total":
                share = 100 * seconds / profiled["total"]
                lines.append(f"| {part} | {seconds:.2f} | {share:.0f}% |")
        lines.append(f"| total (timed run) | {profiled['total']:.2f} | 100% |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dpl_edit.bench.speed", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    parser.add_argument("--split", default="val", choices=["val", "dev"])
    parser.add_argument("--scene", type=int, default=0, help="scene index in the split")
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: the model's, else torch's choice)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of the default NTI and DPL inversions, alternating; each row is the median "
        "(default: 3)",
    )
    parser.add_argument("--out", type=Path, help="write report.md and speed.json here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the inversions, DPL's stopping rules (dpl-full, dpl-plateau, dpl-early, "
        "dpl-early25) and the edits only (no dpl run, other speed options or profiles)",
    )
    args = parser.parse_args(argv)
    try:
        if args.steps < 1:
            raise DplError("--steps must be at least 1")
        if args.repeats < 1:
            raise DplError("--repeats must be at least 1")
        with tempfile.TemporaryDirectory() as work:
            record = run_speed(
                args.steps,
                args.split,
                args.scene,
                args.threads,
                Path(work),
                args.quick,
                args.repeats,
            )
    except DplError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = report(record)
    print(text, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out / "report.md", text.encode())
        atomic_write_bytes(args.out / "speed.json", (json.dumps(record, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
