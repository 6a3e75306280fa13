"""What an inversion costs at Stable Diffusion scale, measured without SD's weights.

Runtime depends on shapes, not on weight values, so a randomly initialised UNet, VAE and text
encoder built from Stable Diffusion 1.5's configuration cost what the real ones cost. This
module times the units an inversion is made of at 512x512 (a UNet pass without gradient, a
null-text step, a DPL token step with and without stopping after the last loss layer, VAE
encode and decode), then multiplies them by the UNet-pass counts of a real inversion (a saved
inversion folder, e.g. one 50-step DPL run on the bundled model) to estimate seconds per image
for NTI and DPL, and records the peak memory of one token step and one null-text step. With
`--pipeline-steps N` it also runs the engine's own NTI and DPL inversions and an edit on the
SD-shaped model end to end, so the estimate is checked against a measured whole.

    python -m dpl_edit.bench.sd_scale --inversion runs/val-000.inv --device cuda --dtype float16
    python -m dpl_edit.bench.sd_scale --device cuda --dtype float16 --pipeline-steps 50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from dpl_edit.bench.cost import peak_memory
from dpl_edit.bench.world_set import world_scene
from dpl_edit.dpl.losses import DplLossConfig, evaluate_losses
from dpl_edit.engine.artifact import Inversion
from dpl_edit.engine.attention import (
    CrossAttentionStore,
    ForwardStopped,
    StopAfter,
    controlled_attention,
    last_layer,
)
from dpl_edit.engine.ddim import Ddim
from dpl_edit.engine.edit import edit
from dpl_edit.engine.inversion import invert
from dpl_edit.engine.model import (
    LoadedModel,
    check_gpu_options,
    resolve_device,
    sd_ddim_scheduler,
    use_channels_last,
    use_cuda_graphs,
)
from dpl_edit.errors import DplError
from dpl_edit.io.atomic import atomic_write_bytes
from dpl_edit.world.tokenizer import build_clip_tokenizer

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
"""Stable Diffusion 1.5's UNet configuration (the fields that differ from diffusers' defaults)."""
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "sample_size": 512,
}
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
SD15 = {"unet": SD15_UNET, "vae": SD15_VAE, "text": SD15_TEXT}
"""The three configurations; tests pass smaller ones of the same kinds."""
WORDS = [[2], [5]]
"""Two one-token nouns, as in "a cat and a dog": what the DPL losses score."""


@dataclass
class UnitCosts:
    """Seconds per unit (median of the repeats) and peak memory of the two optimisation steps."""

    device: str
    dtype: str
    unet_forward: float
    null_text_step: float
    token_step_full: float
    token_step_stopped: float
    vae_encode: float
    vae_decode: float
    text_encode: float
    null_text_peak_mb: float
    token_step_peak_mb: float


@dataclass
class PassCounts:
    """UNet passes of one inversion by kind, read from its folder's `inversion.json`."""

    steps: int
    no_grad: int
    null_text_steps: int
    token_updates: int
    token_checks: int

    @classmethod
    def from_inversion(cls, folder: Path) -> PassCounts:
        """DDIM inversion and each null-text step's two plain passes are gradient-free; the
        token stage evaluates its losses once per update, plus once more at a step where they
        fell under their thresholds."""
        inversion = Inversion.load(folder)
        steps = inversion.steps
        trace = inversion.extras.get("dpl_trace") or []
        updates = sum(int(step["inner_steps"]) for step in trace)
        return cls(
            steps=steps,
            no_grad=steps + 2 * steps,
            null_text_steps=sum(int(n) for n in inversion.extras.get("null_inner_steps") or []),
            token_updates=updates,
            token_checks=updates + sum(bool(step["stopped_early"]) for step in trace),
        )


def _frozen(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`module` without gradients, in eval mode, on `device` in `dtype`."""
    module.requires_grad_(False).eval().to(device)
    if dtype != torch.float32:  # a cast to float32 would only warn
        module.to(dtype)
    return module


def build_models(device: torch.device, dtype: torch.dtype, configs: dict = SD15, seed: int = 0):
    """A randomly initialised UNet, VAE and text encoder of `configs`' shapes, frozen."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**configs["unet"])
    vae = AutoencoderKL(**configs["vae"])
    text = CLIPTextModel(CLIPTextConfig(**configs["text"]))
    return tuple(_frozen(module, device, dtype) for module in (unet, vae, text))


def _synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of `fn` over `repeats` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_units(
    device: torch.device, dtype: torch.dtype, repeats: int, configs: dict = SD15
) -> UnitCosts:
    """Time every unit once the models are built; optimised tensors are kept in float32.

    The losses read the level at a quarter of the latent size (SD's 16x16), as DPL does.
    """
    unet, vae, text = build_models(device, dtype, configs)
    ddim = Ddim(DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False), 50)
    t = int(ddim.timesteps[10])
    latent_size, image_size = configs["unet"]["sample_size"], configs["vae"]["sample_size"]
    level = latent_size // 4
    text_len = configs["text"]["max_position_embeddings"]
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, latent_size, latent_size, generator=g).to(device, dtype)
    target = torch.randn(1, 4, latent_size, latent_size, generator=g).to(device, dtype)
    ids = torch.randint(0, configs["text"]["vocab_size"], (1, text_len), generator=g).to(device)
    image = torch.rand(1, 3, image_size, image_size, generator=g).to(device, dtype) * 2 - 1
    with torch.no_grad():
        context = text(ids)[0]
        cond_output = unet(latent, t, encoder_hidden_states=context).sample
    config = DplLossConfig(use_thresholds=False, loss_res=(level,))

    @torch.no_grad()
    def forward() -> None:
        unet(latent, t, encoder_hidden_states=context)

    def null_step() -> None:
        null = context.detach().float().requires_grad_(True)
        uncond = unet(latent, t, encoder_hidden_states=null.to(dtype)).sample
        step = ddim.guided_step(uncond.float(), cond_output.float(), 7.5, t, latent.float())
        F.mse_loss(step, target.float()).backward()

    def token_step(stop: bool) -> None:
        words = context.detach().float().requires_grad_(True)
        store = CrossAttentionStore([level], grad=True)
        controllers = [store, StopAfter(last_layer(unet, store))] if stop else [store]
        with controlled_attention(unet, controllers), suppress(ForwardStopped):
            unet(latent, t, encoder_hidden_states=words.to(dtype))
        maps = store.current(level)[0]
        report = evaluate_losses([maps], WORDS, [None], 10, config, 50, n_prompt_tokens=6)
        report.total.backward()

    with torch.no_grad():
        encode = _timed(lambda: vae.encode(image), repeats, device)
        decode = _timed(lambda: vae.decode(latent), repeats, device)
        text_time = _timed(lambda: text(ids), repeats, device)
    with peak_memory(device) as null_peak:
        null_step()
    with peak_memory(device) as token_peak:
        token_step(stop=True)
    return UnitCosts(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        unet_forward=_timed(forward, repeats, device),
        null_text_step=_timed(null_step, repeats, device),
        token_step_full=_timed(lambda: token_step(False), repeats, device),
        token_step_stopped=_timed(lambda: token_step(True), repeats, device),
        vae_encode=encode,
        vae_decode=decode,
        text_encode=text_time,
        null_text_peak_mb=null_peak["peak_memory_mb"],
        token_step_peak_mb=token_peak["peak_memory_mb"],
    )


@dataclass
class PipelineStage:
    """One stage of the engine's own pipeline on the SD-shaped model, measured whole."""

    name: str
    seconds: float
    unet_evals: dict[str, int]
    """UNet passes by part of the stage, as the engine counts them (`Inversion.unet_evals`)."""
    peak_mb: float


def random_sd_model(
    device: torch.device, dtype: torch.dtype, configs: dict = SD15, seed: int = 0
) -> LoadedModel:
    """The random SD-shaped models as the engine's `LoadedModel`, with SD's full CLIP tokenizer,
    DDIM schedule and latent size: `invert` and `edit` then run on them exactly as on a real
    Stable Diffusion folder, with no weights on disk."""
    unet, vae, text = build_models(device, dtype, configs, seed)
    tokenizer = build_clip_tokenizer(model_max_length=configs["text"]["max_position_embeddings"])
    return LoadedModel.from_components(
        vae, text, tokenizer, unet, sd_ddim_scheduler(), "random-sd15-shapes", device, dtype
    )


GRAPH_MODES = ("off", "on", "both")
"""`measure_pipeline`'s CUDA-graph modes: eager only, graphed only, or eager then graphed with
the largest differences between their results."""


def _differences(eager: Any, graphed: Any) -> dict[str, float]:
    """Largest absolute differences between an eager and a graphed inversion's results."""
    diffs = {"null_embeddings": (eager.null_embeddings - graphed.null_embeddings).abs().max()}
    if eager.trajectory is not None and graphed.trajectory is not None:
        diffs["trajectory"] = (eager.trajectory - graphed.trajectory).abs().max()
    if eager.dynamic_tokens is not None and graphed.dynamic_tokens is not None:
        vectors = eager.dynamic_tokens.vectors - graphed.dynamic_tokens.vectors
        diffs["word_vectors"] = vectors.abs().max()
    return {name: float(value) for name, value in diffs.items()}


def measure_pipeline(
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    configs: dict = SD15,
    graphs: str = "off",
    channels_last: bool = False,
) -> tuple[list[PipelineStage], dict[str, dict[str, float]]]:
    """NTI inversion, DPL inversion and the edit from it, timed whole on the SD-shaped model.

    One validation scene of the bundled world (upscaled to the model's resolution) with its
    prompts and nouns; DPL runs the paper's settings, what a plain SD folder gets. Random weights
    make the adaptive loops (null-text early stop, the token stage's thresholds) run as they
    happen to, not as on SD's weights, so each stage's UNet passes are recorded beside its time;
    a 1-step NTI inversion first takes the first-call costs (kernel selection, allocator).
    `graphs` ("on" or "both", GPU only) replays the inversions' UNet passes from CUDA graphs
    (`use_cuda_graphs`); with "both", the eager stages run first and the second value
    returned holds, per inversion, the largest differences between the two runs' results.
    `channels_last` (GPU only) keeps the UNet channels-last (`use_channels_last`).
    """
    if graphs not in GRAPH_MODES:
        raise DplError(f"unknown CUDA-graph mode {graphs!r}; choose one of {GRAPH_MODES}")
    check_gpu_options(device, graphs != "off", channels_last)
    model = random_sd_model(device, dtype, configs)
    use_channels_last(model, channels_last)
    scene = world_scene("val", 0)
    image = Image.fromarray(scene.source_image())
    stages: list[PipelineStage] = []

    def stage(name: str, run: Callable[[], Any]) -> Any:
        with peak_memory(device) as peak:
            _synchronize(device)
            start = time.perf_counter()
            result = run()
            _synchronize(device)
            seconds = time.perf_counter() - start
        stages.append(PipelineStage(name, seconds, dict(result.unet_evals), peak["peak_memory_mb"]))
        return result

    def inversion(method: str, steps: int = steps, **options: Any) -> Any:
        return invert(
            model, image, scene.source, method=method, steps=steps, progress=False, **options
        )

    runs = {}
    for graphed in {"off": [False], "on": [True], "both": [False, True]}[graphs]:
        use_cuda_graphs(model, graphed)
        parts = [
            name for name, on in (("CUDA graphs", graphed), ("channels-last", channels_last)) if on
        ]
        label = f" ({', '.join(parts)})" if parts else ""
        # First-call costs (and, graphed, the captures) before anything is timed.
        inversion("nti", steps=1)
        inversion("dpl", words=list(scene.masks), steps=1)
        nti = stage(f"NTI inversion{label}", lambda: inversion("nti"))
        dpl = stage(
            f"DPL inversion (paper settings){label}",
            lambda: inversion("dpl", words=list(scene.masks)),
        )
        stage(
            f"edit from the DPL inversion{label}",
            partial(edit, model, dpl, scene.target, progress=False),
        )
        runs[graphed] = (nti, dpl)
    differences = {}
    if len(runs) == 2:
        for i, name in enumerate(("NTI", "DPL")):
            differences[name] = _differences(runs[False][i], runs[True][i])
    return stages, differences


@dataclass
class Overhead:
    """How much of a UNet pass is the host's work (Python, kernel launches) rather than the
    device's arithmetic: if a batch of 4 costs about what a batch of 1 costs, or a CUDA graph's
    replay of the same pass is much faster, the pass is launch-bound and fewer, larger or
    graph-captured calls are the lever, not cheaper arithmetic."""

    device: str
    dtype: str
    forward_by_batch: dict[int, float]
    """Seconds of an eager UNet pass without gradient, by batch size."""
    null_step: float
    """Seconds of an eager forward + backward to the text embedding (a null-text step's core)."""
    graphed_forward: float | None
    """The batch-1 pass without gradient replayed from a CUDA graph (GPU only)."""
    graphed_null_step: float | None
    """The forward + backward through `torch.cuda.make_graphed_callables` (GPU only)."""
    notes: list[str]
    """Why a graphed figure is missing, if it is."""


def measure_overhead(
    device: torch.device, dtype: torch.dtype, repeats: int, configs: dict = SD15
) -> Overhead:
    """Time the UNet pass eagerly at batch 1, 2 and 4 and, on a GPU, replayed from CUDA graphs.

    The timestep is a device tensor so that no host-to-device copy happens inside a capture.
    """
    torch.manual_seed(0)
    unet = _frozen(UNet2DConditionModel(**configs["unet"]), device, dtype)  # the UNet alone
    size, dim = configs["unet"]["sample_size"], configs["unet"]["cross_attention_dim"]
    text_len = configs["text"]["max_position_embeddings"]
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(500, device=device)

    def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        latent = torch.randn(batch, 4, size, size, generator=g).to(device, dtype)
        context = torch.randn(batch, text_len, dim, generator=g).to(device, dtype)
        return latent, context

    def unet_call(latent: torch.Tensor, context: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(latent, t, encoder_hidden_states=context).sample

    by_batch = {}
    with torch.no_grad():
        for batch in (1, 2, 4):
            latent, context = inputs(batch)
            by_batch[batch] = _timed(partial(unet_call, latent, context, t), repeats, device)
    latent, context = inputs(1)
    context.requires_grad_(True)

    def null_step(call: Callable[..., torch.Tensor]) -> None:
        call(latent, context, t).float().square().mean().backward()

    eager_null = _timed(lambda: null_step(unet_call), repeats, device)
    graphed_forward = graphed_null = None
    notes = []
    if device.type == "cuda":
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        unet_call(latent, context, t)
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(graph):
                    unet_call(latent, context, t)
            graphed_forward = _timed(graph.replay, repeats, device)
        except RuntimeError as error:
            notes.append(f"graphed forward: {error}")
        try:
            graphed = torch.cuda.make_graphed_callables(unet_call, (latent, context, t))
            graphed_null = _timed(lambda: null_step(graphed), repeats, device)
        except RuntimeError as error:
            notes.append(f"graphed null step: {error}")
    return Overhead(
        str(device),
        str(dtype).removeprefix("torch."),
        by_batch,
        eager_null,
        graphed_forward,
        graphed_null,
        notes,
    )


def estimate(units: UnitCosts, counts: PassCounts) -> dict[str, float]:
    """Seconds per image for NTI and DPL from the unit costs and an inversion's pass counts.

    NTI is everything but the token stage; the token stage's checks without an update are
    priced as full token steps (their backward is skipped, so this is an upper bound).
    """
    shared = units.vae_encode + units.vae_decode + 2 * units.text_encode
    nti = (
        shared + counts.no_grad * units.unet_forward + counts.null_text_steps * units.null_text_step
    )
    tokens = counts.token_checks * units.token_step_stopped
    return {"nti_seconds": nti, "dpl_seconds": nti + tokens, "dpl_token_seconds": tokens}


def report(
    units: UnitCosts,
    counts: PassCounts | None,
    pipeline: Sequence[PipelineStage] = (),
    overhead: Overhead | None = None,
    differences: dict[str, dict[str, float]] | None = None,
) -> str:
    """Markdown tables of the unit costs, the per-image estimate given pass counts, the
    measured pipeline stages and the launch-overhead probe, each given."""
    lines = [
        f"SD 1.5-shaped models (random weights), 512x512, {units.device}, {units.dtype}",
        "",
        "| unit | seconds |",
        "|---|---|",
    ]
    for name in (
        "unet_forward",
        "null_text_step",
        "token_step_full",
        "token_step_stopped",
        "vae_encode",
        "vae_decode",
        "text_encode",
    ):
        lines.append(f"| {name} | {getattr(units, name):.3f} |")
    lines += [
        "",
        f"Peak memory: null-text step {units.null_text_peak_mb:.0f} MB, DPL token step "
        f"{units.token_step_peak_mb:.0f} MB (GPU: allocated tensors; CPU: process RSS).",
    ]
    if counts is not None:
        cost = estimate(units, counts)
        lines += [
            "",
            f"Pass counts ({counts.steps} steps): {counts.no_grad} passes without gradient, "
            f"{counts.null_text_steps} null-text steps, {counts.token_checks} token-loss "
            f"evaluations ({counts.token_updates} updates).",
            f"Estimate per image: NTI {cost['nti_seconds']:.1f} s, DPL {cost['dpl_seconds']:.1f} s"
            f" (token stage {cost['dpl_token_seconds']:.1f} s).",
        ]
    if pipeline:
        lines += [
            "",
            "The engine's own pipeline on the SD-shaped model, measured whole:",
            "",
            "| stage | seconds | UNet passes | peak memory MB |",
            "|---|---|---|---|",
        ]
        for stage in pipeline:
            passes = ", ".join(f"{part} {n}" for part, n in stage.unet_evals.items())
            lines.append(
                f"| {stage.name} | {stage.seconds:.1f} | {sum(stage.unet_evals.values())}"
                f" ({passes}) | {stage.peak_mb:.0f} |"
            )
    if differences:
        lines += ["", "Largest differences, eager against CUDA graphs:", ""]
        for name, diffs in differences.items():
            values = ", ".join(f"{part} {value:.2e}" for part, value in diffs.items())
            lines.append(f"- {name} inversion: {values}")
    if overhead is not None:
        lines += ["", "Launch overhead (eager against CUDA-graph replay):", ""]
        lines += ["| pass | seconds |", "|---|---|"]
        for batch, seconds in overhead.forward_by_batch.items():
            lines.append(f"| eager forward, batch {batch} | {seconds:.4f} |")
        rows = [
            ("eager forward + backward to the text embedding", overhead.null_step),
            ("graphed forward, batch 1", overhead.graphed_forward),
            ("graphed forward + backward", overhead.graphed_null_step),
        ]
        lines += [f"| {name} | {'-' if v is None else f'{v:.4f}'} |" for name, v in rows]
        lines += [f"Note: {note.splitlines()[0]}" for note in overhead.notes]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dpl_edit.bench.sd_scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--inversion", type=Path, help="a saved inversion folder for pass counts")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per unit")
    parser.add_argument(
        "--pipeline-steps",
        type=int,
        default=0,
        metavar="N",
        help="also time the engine's NTI and DPL inversions (N DDIM steps) and an edit on the "
        "SD-shaped model (default: 0, not run)",
    )
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="also time the UNet pass at batch 1, 2 and 4 and, on a GPU, replayed from CUDA "
        "graphs (how much of a pass is launch overhead)",
    )
    parser.add_argument(
        "--cuda-graphs",
        choices=GRAPH_MODES,
        default="off",
        help="the pipeline's inversions with CUDA graphs (GPU only): off, on, or both (eager "
        "first, then graphed, with the largest differences between their results)",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="the pipeline's UNet in the channels-last layout (GPU only)",
    )
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        if args.repeats < 1:
            raise DplError("--repeats must be at least 1")
        if args.pipeline_steps < 0:
            raise DplError("--pipeline-steps must be 0 (not run) or more")
        pipeline_only = [
            flag
            for flag, on in (
                ("--cuda-graphs", args.cuda_graphs != "off"),
                ("--channels-last", args.channels_last),
            )
            if on
        ]
        if pipeline_only and not args.pipeline_steps:
            raise DplError(f"{pipeline_only[0]} applies to the pipeline: give --pipeline-steps N")
        counts = None if args.inversion is None else PassCounts.from_inversion(args.inversion)
        device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
        # Before minutes of measuring.
        check_gpu_options(device, args.cuda_graphs != "off", args.channels_last)
        units = measure_units(device, dtype, args.repeats)
        overhead = measure_overhead(device, dtype, args.repeats) if args.overhead else None
        pipeline, differences = (
            measure_pipeline(
                device,
                dtype,
                args.pipeline_steps,
                graphs=args.cuda_graphs,
                channels_last=args.channels_last,
            )
            if args.pipeline_steps
            else ([], {})
        )
    except DplError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report(units, counts, pipeline, overhead, differences), end="")
    if args.out is not None:
        record = {
            "units": asdict(units),
            "counts": None if counts is None else asdict(counts),
            "pipeline": [asdict(stage) for stage in pipeline],
            "overhead": None if overhead is None else asdict(overhead),
            "differences": differences,
        }
        if counts is not None:
            record["estimate"] = estimate(units, counts)
        atomic_write_bytes(args.out, (json.dumps(record, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
