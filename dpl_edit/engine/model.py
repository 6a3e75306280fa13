"""Loading a diffusers Stable Diffusion folder into the pieces the engine needs.

We load the components directly rather than through `StableDiffusionPipeline`: the engine
drives its own step loops (DDIM built from the folder's noise schedule, whatever scheduler it
ships) and must work for any UNet2DConditionModel layout (SD 1.x, 2.x, or the small bundled
model). Everything is frozen, because inversion and DPL optimise embeddings only; gradients
into the weights would just waste memory and time. Folders of other pipelines (SDXL,
inpainting, ...) are refused before any weights are read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from dpl_edit.engine.attention import (
    Recorder,
    attention_layers,
    attention_levels,
    controlled_attention,
)
from dpl_edit.engine.graphs import GraphedCalls
from dpl_edit.engine.settings import BUNDLED_MODEL, BUNDLED_MODELS, DEVICES, DTYPES
from dpl_edit.engine.timers import timed
from dpl_edit.errors import DplError
from dpl_edit.io.images import tensor_to_arrays

DEFAULTS_FILE = "dpl_defaults.json"
_DTYPES = {name: getattr(torch, name) for name in DTYPES}
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
_WEIGHTED = ("unet", "vae", "text_encoder")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_NOT_SD = "give a local diffusers Stable Diffusion folder instead"
SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)
"""`_class_name`s of model_index.json that `load_model` reads: Stable Diffusion 1.x and 2.x."""
_SUPPORTED = "dpl-edit supports Stable Diffusion 1.x and 2.x folders (StableDiffusionPipeline)"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelDefaults:
    """Per-model attention resolutions (spatial side lengths) and object words.

    The resolutions come from the UNet (`derived`): for SD 1.x and 2.x, cross-attention at
    16x16 and self-attention at 32x32 for a 64x64 latent, as in the papers; a model folder may
    override them in its `dpl_defaults.json`.
    """

    cross_attention_res: int
    self_attention_res: int
    blend_res: int
    object_words: tuple[str, ...] = ()
    vocabulary: tuple[str, ...] = ()
    """Every word the model was trained on, when it declares them (the bundled model does): a
    word outside it would be split into pieces the model never saw, so prompts are refused
    before any work (`dpl_edit.engine.text.check_prompt`). Empty: any word is accepted."""
    dpl: tuple[tuple[str, Any], ...] = ()
    """DPL settings chosen for this model (`DplLossConfig` fields), used when a user gives
    none; kept as pairs so the defaults stay hashable. Empty: the paper's settings."""
    threads: int | None = None
    """CPU threads this model's inversions (batch-1 passes) run fastest on, when measured;
    `use_threads` applies it, capped at the machine's physical cores, for the `dpl` commands
    unless told otherwise. None: torch's choice. The bundled models say two: 15-25% faster
    than one on a 2-core machine where each CPU is its own core. Another 2-core machine ran
    them 1.7x slower on two threads than on one; if its two CPUs were hyperthreads of one
    core, the cap gives one there (docs/research/speed.md, Threads)."""
    edit_threads: int | None = None
    """Threads for edits (batch-3 passes), capped at the machine's CPUs, when they differ from
    `threads`: two for the bundled models, faster than one on every machine measured. None:
    `threads`."""

    @classmethod
    def derived(cls, unet: UNet2DConditionModel) -> ModelDefaults:
        """SD's choice, found where this UNet's attention layers are: cross-attention maps (and
        the local blend) at the coarsest level with cross-attention outside the mid block (16
        of SD's 64, 32 and 16), self-attention at the next finer level that has it (32).

        The mid block counts only when nothing else has cross-attention: P2P and DPL read the
        levels shared by the down and up paths, where the maps have been refined on the way up.
        """
        layers = attention_layers(unet)
        cross = [layer.res for layer in layers.values() if layer.is_cross]
        if not cross:
            raise DplError(f"this UNet has no cross-attention layers; {_NOT_SD}")
        outside_mid = [layer.res for name, layer in layers.items()
                       if layer.is_cross and not name.startswith("mid_block.")]  # fmt: skip
        cross_res = min(outside_mid or cross)
        finer = [layer.res for layer in layers.values()
                 if not layer.is_cross and layer.res > cross_res]  # fmt: skip
        return cls(cross_res, min(finer, default=cross_res), cross_res)


@dataclass
class LoadedModel:
    """A frozen SD model plus the facts about it the engine needs."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    identity: str
    resolution: int
    latent_size: int
    scaling_factor: float
    defaults: ModelDefaults
    device: torch.device
    dtype: torch.dtype
    safety: SafetyCheck | None = None
    """The folder's safety checker, applied to every decoded image, when it has one."""
    unet_evals: int = field(default=0)
    graphs: GraphedCalls | None = None
    """CUDA graphs of the inversion's pure UNet calls, when `use_cuda_graphs` turned them on."""
    _timesteps: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_components(
        cls,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: DDIMScheduler,
        identity: str,
        device: torch.device,
        dtype: torch.dtype,
        defaults: Callable[[UNet2DConditionModel], ModelDefaults] = ModelDefaults.derived,
    ) -> LoadedModel:
        """Wrap loaded components, reading the latent size, image resolution and latent scale
        from their configs; `defaults` gets the UNet (a folder's file, else SD's choice)."""
        sample_size = unet.config.sample_size
        latent_size = int(sample_size if isinstance(sample_size, int) else sample_size[0])
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        return cls(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            identity=identity,
            resolution=latent_size * vae_factor,
            latent_size=latent_size,
            scaling_factor=float(vae.config.scaling_factor),
            defaults=defaults(unet),
            device=device,
            dtype=dtype,
        )

    @property
    def text_len(self) -> int:
        """Token length of every encoded prompt (77 for SD, shorter for small models)."""
        return int(self.tokenizer.model_max_length)

    def predict(self, latents: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
        """One UNet call (raw output: epsilon or v), counted so stages can report their cost.

        Timed for the speed benchmark's profile (`dpl_edit.engine.timers`)."""
        self.unet_evals += 1
        with timed("unet_forward"):
            return self.unet_output(latents, t, context)

    def unet_output(
        self, latents: torch.Tensor, t: int | torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's raw output, uncounted: the body of `predict` and of `predict_pure`'s
        functions."""
        return self.unet(latents, t, encoder_hidden_states=context).sample

    def timestep(self, t: int) -> torch.Tensor:
        """A timestep as a tensor on the model's device, as `predict_pure` needs it (a graph
        cannot copy a Python number to the device at replay). The UNet reads it exactly as it
        reads the number. Made once per timestep and shared, so never written to: on a GPU each
        copy from the host waits for the device to finish its queue."""
        if t not in self._timesteps:
            self._timesteps[t] = torch.tensor(t, device=self.device)
        return self._timesteps[t]

    def predict_pure(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: torch.Tensor,
        label: str | None = "unet_forward",
    ) -> Any:
        """One UNet call made by `fn(*args)`, a pure function of its tensors (it installs any
        attention controllers itself and returns what they record), counted once.

        Replayed from a CUDA graph captured per `name` and input signature when `graphs` is on
        (`use_cuda_graphs`); called directly otherwise, with the same result. `name` must tell
        apart everything else `fn` depends on, since a replay reruns the first capture's
        kernels. Timed under `label`; None when `fn` times its own parts (DPL's token step:
        text encoding, UNet and losses)."""
        self.unet_evals += 1
        with timed(label) if label else nullcontext():
            return fn(*args) if self.graphs is None else self.graphs(name, fn, *args)

    def predict_replayable(
        self, latents: torch.Tensor, t: int, context: torch.Tensor
    ) -> torch.Tensor:
        """`predict` made one pure call (`predict_pure`), so that a CUDA graph can replay it:
        the null-text fits and the guided step after each."""
        return self.predict_pure("unet", self.unet_output, latents, self.timestep(t), context)

    def predict_recorded(
        self, latents: torch.Tensor, t: int, context: torch.Tensor, recorders: Sequence[Recorder]
    ) -> torch.Tensor:
        """`predict` with `recorders` recording the call as one step each, made one pure call
        (`predict_pure`) so that it too can be replayed from a CUDA graph."""
        name = "recorded:" + ",".join(recorder.key() for recorder in recorders)

        def call(
            latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor
        ) -> tuple[torch.Tensor, ...]:
            fresh = [recorder.fresh() for recorder in recorders]
            with controlled_attention(self.unet, fresh):
                output = self.unet_output(latents, t, context)
            return (output, *(maps for recorder in fresh for maps in recorder.step_maps()))

        output, *maps = self.predict_pure(name, call, latents, self.timestep(t), context)
        for recorder in recorders:
            recorder.add_step(maps[: recorder.maps_per_step])
            maps = maps[recorder.maps_per_step :]
        return output

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latent (posterior mean, as null-text inversion does)."""
        pixels = pixels.to(self.device, self.dtype)
        return self.vae.encode(pixels).latent_dist.mean * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """Scaled latents -> RGB images (through the safety checker, when there is one)."""
        pixels = self.vae.decode(latents.to(self.dtype) / self.scaling_factor).sample
        arrays = tensor_to_arrays(pixels)
        if self.safety is not None:
            arrays = self.safety(arrays)
        return [Image.fromarray(array) for array in arrays]


@dataclass
class SafetyCheck:
    """A folder's safety checker and its feature extractor, used as `StableDiffusionPipeline`
    uses them: an image the checker flags is returned black."""

    checker: torch.nn.Module
    features: Any
    """The image processor that makes the checker's CLIP input (the folder's feature_extractor)."""

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        param = next(self.checker.parameters())
        clip_input = self.features(
            [Image.fromarray(array) for array in arrays], return_tensors="pt"
        ).pixel_values.to(param.device, param.dtype)
        _, flagged = self.checker(images=np.stack(arrays), clip_input=clip_input)
        return [np.zeros_like(a) if bad else a for a, bad in zip(arrays, flagged, strict=True)]


def available_cores() -> int:
    """CPUs this process may use (its CPU affinity where the OS tells, as in a container)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use: hyperthreads of one core share its
    arithmetic units, so a second thread there mostly adds contention. From Linux's CPU
    topology; elsewhere (or if it is unreadable) every CPU counts as a core."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    try:
        cores = {
            Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text()
            for cpu in cpus
        }
    except OSError:
        cores = set()
    return len(cores) or available_cores()


def use_threads(model: LoadedModel, threads: int | None = None, edit: bool = False) -> None:
    """Run `model` on `threads` CPU threads, else on the count its folder suggests
    (`ModelDefaults.threads`, capped at the physical cores, or for an `edit` its
    `edit_threads`, capped at the CPUs); off the CPU, or with neither, torch's choice
    stays. torch's setting is per process, so this is for commands and benchmarks, not for
    a library call in someone else's program."""
    if threads is not None and threads < 1:
        raise DplError(f"the number of threads must be at least 1, got {threads}")
    if edit and model.defaults.edit_threads is not None:
        suggested: int | None = min(model.defaults.edit_threads, available_cores())
    elif model.defaults.threads is not None:
        suggested = min(model.defaults.threads, physical_cores())
    else:
        suggested = None
    chosen = threads or suggested
    if chosen is not None and model.device.type == "cpu":
        torch.set_num_threads(chosen)


def check_gpu_options(
    device: torch.device, cuda_graphs: bool = False, channels_last: bool = False
) -> None:
    """Refuse the GPU-only speed options off a CUDA device (before any loading, so the error
    comes first): CUDA graphs need one, and channels-last was measured on one only."""
    if device.type == "cuda":
        return
    if cuda_graphs:
        raise DplError(f"CUDA graphs need a CUDA device; the model is on {device.type}")
    if channels_last:
        raise DplError(
            f"channels-last needs a CUDA device, where it was measured; the model is on "
            f"{device.type}"
        )


def use_cuda_graphs(model: LoadedModel, on: bool = True) -> None:
    """Replay the inversion's UNet calls (`predict_pure`: DDIM inversion and conditional
    passes, null-text updates and the pass after each fit, DPL token updates) from CUDA
    graphs: the same kernels on the same values, without the per-kernel launch cost that
    dominates SD-sized passes on a GPU."""
    check_gpu_options(model.device, cuda_graphs=on)
    model.graphs = GraphedCalls() if on else None


def use_channels_last(model: LoadedModel, on: bool = True) -> None:
    """Keep the UNet's weights and activations channels-last (NHWC). On a GPU, cuDNN's
    tensor-core convolutions work in that layout: with the default layout about a third of
    an SD-sized pass on an H100 went to converting between the two (docs/research/speed.md).
    The arithmetic is the same but not bitwise (other convolution kernels), so it is opt-in.
    Turn it on before `use_cuda_graphs`: a graph keeps the layout it was captured with."""
    check_gpu_options(model.device, channels_last=on)
    layout = torch.channels_last if on else torch.contiguous_format
    model.unet.to(memory_format=layout)


def resolve_device(device: str) -> torch.device:
    """Parse a device name, refusing ones torch does not know or this machine lacks.

    "auto" is the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise DplError(f"unknown device '{device}' (use {DEVICES})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise DplError(f"device '{device}' is not available on this machine")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise DplError(f"device '{device}' is not available on this machine")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise DplError(f"unsupported device '{device}' (use {DEVICES})")
    return parsed


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise DplError(f"unknown dtype '{dtype}' (use {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def bundled_model_names() -> list[str]:
    """Names `--model` accepts for the shipped models (`world`, `world-sink`)."""
    return sorted(p.parent.name for p in BUNDLED_MODELS.glob("*/model_index.json"))


def model_folder(path_or_hub_id: str | os.PathLike | None) -> tuple[Path, str]:
    """Find the model folder and its name: an argument, then $DPL_MODEL, then the bundled model.

    An argument is a folder, else the name of a bundled model, else a cached hub id.
    """
    if path_or_hub_id is None:
        path_or_hub_id = os.environ.get("DPL_MODEL") or None
    if path_or_hub_id is None:
        if not (BUNDLED_MODEL / "model_index.json").is_file():
            raise DplError(
                "the bundled model is not installed; give a model folder or set DPL_MODEL"
            )
        return BUNDLED_MODEL, BUNDLED_MODEL.name
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path, path.resolve().name
    if path.exists():
        raise DplError(f"model '{path_or_hub_id}' is a file, not a folder; {_NOT_SD}")
    if str(path_or_hub_id) in bundled_model_names():
        return BUNDLED_MODELS / str(path_or_hub_id), str(path_or_hub_id)
    return _cached_hub_folder(str(path_or_hub_id)), str(path_or_hub_id)


def _cached_hub_folder(hub_id: str) -> Path:
    """A hub id works only if it is already in the local cache: there is no network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        bundled = ", ".join(bundled_model_names())
        raise DplError(
            f"model '{hub_id}' is neither a folder, a bundled model ({bundled}) nor in the"
            f" local cache; {_NOT_SD}"
        ) from None


def _identity(folder: Path, name: str, variants: dict[str, str | None]) -> str:
    """Stable id: name plus a hash of the UNet/text-encoder/VAE configs and weights.

    Retrained weights of the same architecture must get a new id (stored inversions and
    benchmark results are refused across models), so weight contents count, not only sizes.
    Files up to 64 MiB are hashed whole; larger ones (SD's multi-GB UNets) by four 1 MiB
    samples spread over the file plus the size, which keeps loading instant and still changes
    with any retraining (every tensor moves). Only the weights of the loaded `variants` count.
    """
    digest = hashlib.sha256()
    for component in ("unet", "text_encoder", "vae"):  # load_model checked they exist
        for file in sorted((folder / component).iterdir()):
            if _is_weights(file) and _file_variant(file.name) != variants[component]:
                continue
            if file.name == "config.json":
                config = json.loads(file.read_text())
                config = {k: v for k, v in config.items() if not k.startswith("_")}
                digest.update(json.dumps(config, sort_keys=True).encode())
            elif file.is_file():
                digest.update(f"{component}/{file.name}:{file.stat().st_size}".encode())
                digest.update(_content_sample(file))
    return f"{name}@{digest.hexdigest()[:12]}"


def _content_sample(file: Path, whole_limit: int = 64 << 20, chunk: int = 1 << 20) -> bytes:
    """The file's bytes if small, else four `chunk`-sized samples at evenly spaced offsets."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        if size <= whole_limit:
            return handle.read()
        samples = []
        for offset in (0, size // 3, 2 * size // 3, size - chunk):
            handle.seek(offset)
            samples.append(handle.read(chunk))
    return b"".join(samples)


def same_model(identity_a: str, identity_b: str) -> bool:
    """Compare identities by their hash, so a renamed or moved folder still matches."""
    return identity_a.rsplit("@", 1)[-1] == identity_b.rsplit("@", 1)[-1]


def _read_defaults(folder: Path, unet: UNet2DConditionModel) -> ModelDefaults:
    """The folder's `dpl_defaults.json` over the defaults derived from its UNet; an attention
    resolution there must be one where the UNet has attention of that kind."""
    base = ModelDefaults.derived(unet)
    file = folder / DEFAULTS_FILE
    if not file.is_file():
        return base
    try:
        data = json.loads(file.read_text())
        defaults = ModelDefaults(
            cross_attention_res=int(data.get("cross_attention_res", base.cross_attention_res)),
            self_attention_res=int(data.get("self_attention_res", base.self_attention_res)),
            blend_res=int(data.get("blend_res", data.get("cross_attention_res", base.blend_res))),
            object_words=tuple(str(w) for w in data.get("object_words", [])),
            vocabulary=tuple(str(w).lower() for w in data.get("vocabulary", [])),
            dpl=tuple(
                (str(k), tuple(v) if isinstance(v, list) else v)
                for k, v in sorted(dict(data.get("dpl", {})).items())
            ),
            threads=None if data.get("threads") is None else int(data["threads"]),
            edit_threads=None if data.get("edit_threads") is None else int(data["edit_threads"]),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise DplError(f"{file} is not valid: {exc}") from None
    for key, cross in (("cross_attention_res", True), ("self_attention_res", False),
                       ("blend_res", True)):  # fmt: skip
        levels = attention_levels(unet, cross)
        if getattr(defaults, key) not in levels:
            kind = "cross" if cross else "self"
            raise DplError(
                f"{file}: {key} {getattr(defaults, key)} is not a resolution where this model "
                f"has {kind}-attention ({', '.join(map(str, levels))}); remove it to use "
                f"{getattr(base, key)}"
            )
    return defaults


def sd_ddim_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """DDIM with Stable Diffusion's training schedule (scaled_linear 0.00085-0.012, 1000 steps)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _scheduler(folder: Path) -> DDIMScheduler:
    """DDIM with the noise schedule of the folder's scheduler, whichever class it is (SD 1.x
    ships PNDM, others Euler or DPM-Solver): betas, timestep spacing, final alpha and
    prediction type are the model's; the sampler is always DDIM, which inversion needs.

    As `StableDiffusionPipeline` runs it: steps offset by 1 and x0 never clipped (the
    pipeline rewrites older configs so), and never thresholded either, since a clipped x0
    cannot be inverted. Without a scheduler config: SD's schedule (`sd_ddim_scheduler`)."""
    config_file = folder / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        return sd_ddim_scheduler()
    try:
        config = json.loads(config_file.read_text())
        prediction_type = config.get("prediction_type", "epsilon")
    except (ValueError, AttributeError) as exc:
        raise DplError(f"{config_file} is not valid: {exc}") from None
    if prediction_type not in ("epsilon", "v_prediction"):
        raise DplError(f"unsupported prediction type '{prediction_type}' in {config_file}")
    try:
        with _quiet_loading():
            return DDIMScheduler.from_config(
                config, steps_offset=1, clip_sample=False, thresholding=False
            )
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise DplError(f"{config_file} is not valid: {exc}") from None


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence the libraries' per-file progress bars, advice and logged errors while loading:
    a failed load raises, and becomes one `DplError` line (diffusers also logs it first)."""
    levels = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity())
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    transformers_logging.set_verbosity(transformers_logging.CRITICAL)
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        transformers_logging.enable_progress_bar()


def save_model_folder(
    folder: str | os.PathLike,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
) -> Path:
    """Write the four components and the scheduler as a diffusers SD folder `load_model` reads.

    The folder is what `StableDiffusionPipeline.save_pretrained` writes, without building the
    pipeline: importing it pulls in transformers' image processors, whose import-time warnings
    (no torchvision) would otherwise reach every user of the package.
    """
    folder = Path(folder)
    for name, component in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
        component.save_pretrained(folder / name, safe_serialization=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", type(text_encoder).__name__],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "unet": ["diffusers", type(unet).__name__],
        "vae": ["diffusers", type(vae).__name__],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def _read_index(folder: Path) -> dict[str, Any]:
    """The folder's model_index.json, refusing any pipeline but `SUPPORTED_PIPELINES` and
    any SD folder whose UNet is not a text-to-image one, before a weight is read."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise DplError(
            f"'{folder}' is not a diffusers Stable Diffusion model (it has no model_index.json);"
            f" {_NOT_SD}"
        )
    try:
        index = json.loads(index_file.read_text())
        pipeline = index.get("_class_name")
    except (ValueError, AttributeError) as exc:
        raise DplError(f"{index_file} is not valid: {exc}") from None
    if pipeline is not None and pipeline not in SUPPORTED_PIPELINES:
        raise DplError(f"'{folder}' holds a {pipeline}, which dpl-edit cannot edit; {_SUPPORTED}")
    missing = [c for c in _COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise DplError(
            f"'{folder}' is not a diffusers Stable Diffusion model (it lacks "
            f"{', '.join(missing)}); {_NOT_SD}"
        )
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        shape = (unet.get("in_channels", 4), unet.get("out_channels", 4))
        extra = unet.get("addition_embed_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise DplError(
            f"cannot read '{folder / 'unet' / 'config.json'}' ({exc}); {_NOT_SD}"
        ) from None
    if shape[0] != shape[1] or extra is not None:
        what = f"{shape[0]} input channels" if extra is None else f"'{extra}' conditioning"
        raise DplError(
            f"'{folder}' has a UNet with {what}, not a text-to-image Stable Diffusion UNet; "
            f"{_SUPPORTED}"
        )
    return index


def _is_weights(file: Path) -> bool:
    return file.name.endswith(_WEIGHT_SUFFIXES) and file.is_file()


def _file_variant(name: str) -> str | None:
    """The variant a weight file belongs to, from its name as diffusers and transformers write
    it: `model.fp16.safetensors` and `model.fp16-00001-of-00002.safetensors` are "fp16",
    `model.safetensors` and `model-00001-of-00002.safetensors` the plain weights (None)."""
    parts = name.split(".")
    return parts[-2].split("-")[0] if len(parts) > 2 else None


def _weight_variants(directory: Path) -> set[str | None]:
    if not directory.is_dir():
        return set()
    return {_file_variant(file.name) for file in directory.iterdir() if _is_weights(file)}


def _describe(variants: set[str | None]) -> str:
    return ", ".join(sorted("plain" if v is None else repr(v) for v in variants))


def _choose_variants(
    folder: Path, variant: str | None, components: Sequence[str] = _WEIGHTED
) -> dict[str, str | None]:
    """The weight variant each component loads: `variant` where the component has it, else
    its plain weights (as diffusers' pipelines fall back). Without `variant`, the plain
    weights, or the one variant the folder holds where a component has no plain ones."""
    found = {component: _weight_variants(folder / component) for component in components}
    empty = [component for component, variants in found.items() if not variants]
    if empty:
        raise DplError(f"'{folder}' has no weights in {', '.join(empty)}; {_NOT_SD}")
    if variant is None:
        needed = set().union(*(v for v in found.values() if None not in v))
        if len(needed) > 1:
            raise DplError(
                f"'{folder}' holds its weights in the variants {_describe(needed)}; choose one "
                "with --variant"
            )
        variant = next(iter(needed), None)
    elif not any(variant in variants for variants in found.values()):
        every = set().union(*found.values())
        raise DplError(f"'{folder}' has no '{variant}' weights (it has {_describe(every)})")
    chosen = {}
    for component, variants in found.items():
        if variant not in variants and None not in variants:
            raise DplError(
                f"'{folder}' has no '{variant}' or plain weights in {component} (it has "
                f"{_describe(variants)})"
            )
        chosen[component] = variant if variant in variants else None
    return chosen


def _lists_safety_checker(folder: Path, index: dict[str, Any]) -> bool:
    """Whether the folder has a safety checker to load: model_index.json lists one, and its
    weights and feature extractor are there. Listed without them, it is skipped with a
    one-line note, as diffusers loads such a folder when told `safety_checker=None`."""
    if not isinstance(index.get("safety_checker"), list) or None in index["safety_checker"]:
        return False
    lacking = [part for part, present in (
        ("weights", bool(_weight_variants(folder / "safety_checker"))),
        ("feature extractor", (folder / "feature_extractor").is_dir()),
    ) if not present]  # fmt: skip
    if lacking:
        _log.warning(
            "note: '%s' lists a safety checker without its %s; images are not checked",
            folder, " and ".join(lacking),
        )  # fmt: skip
    return not lacking


def _load_safety_check(folder: Path, variant: str | None, dtype: torch.dtype) -> SafetyCheck:
    # Imported here: only folders with a safety checker pay for CLIP's vision model.
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessorPil

    checker = StableDiffusionSafetyChecker.from_pretrained(
        folder / "safety_checker", variant=variant, dtype=dtype, local_files_only=True
    )
    features = CLIPImageProcessorPil.from_pretrained(folder / "feature_extractor")
    return SafetyCheck(checker.requires_grad_(False).eval(), features)


def load_model(
    path_or_hub_id: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype: str = DTYPES[0],
    cuda_graphs: bool = False,
    channels_last: bool = False,
    variant: str | None = None,
    safety_checker: bool = True,
) -> LoadedModel:
    """Load a diffusers SD folder (or cached hub id); None means $DPL_MODEL or the bundled model.

    `device` is cpu, cuda, cuda:N, mps, or "auto" (the GPU when there is one); `cuda_graphs`
    and `channels_last` (CUDA only) turn on `use_cuda_graphs` and `use_channels_last`.
    `variant` picks weight files such as `diffusion_pytorch_model.fp16.safetensors` ("fp16");
    without it the plain files load, or the folder's only variant. The weights are cast to
    `dtype` either way. The folder's safety checker, if it has one, checks every decoded
    image unless `safety_checker` is False."""
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    check_gpu_options(torch_device, cuda_graphs, channels_last)
    folder, name = model_folder(path_or_hub_id)
    index = _read_index(folder)
    checked = safety_checker and _lists_safety_checker(folder, index)
    variants = _choose_variants(folder, variant, _WEIGHTED + (("safety_checker",) * checked))
    scheduler = _scheduler(folder)
    try:
        with _quiet_loading():
            unet = UNet2DConditionModel.from_pretrained(
                folder, subfolder="unet", torch_dtype=torch_dtype, local_files_only=True,
                variant=variants["unet"],
            )  # fmt: skip
            vae = AutoencoderKL.from_pretrained(
                folder, subfolder="vae", torch_dtype=torch_dtype, local_files_only=True,
                variant=variants["vae"],
            )  # fmt: skip
            text_encoder = CLIPTextModel.from_pretrained(
                folder, subfolder="text_encoder", local_files_only=True,
                variant=variants["text_encoder"],
            )  # fmt: skip
            tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
            safety = (
                _load_safety_check(folder, variants["safety_checker"], torch_dtype)
                if checked
                else None
            )
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DplError(f"cannot load '{folder}' ({first_line}); {_NOT_SD}") from None
    text_encoder.to(dtype=torch_dtype)
    for module in (unet, vae, text_encoder, *(() if safety is None else (safety.checker,))):
        module.requires_grad_(False).eval().to(torch_device)
    model = LoadedModel.from_components(
        vae, text_encoder, tokenizer, unet, scheduler, _identity(folder, name, variants),
        torch_device, torch_dtype, defaults=lambda unet: _read_defaults(folder, unet),
    )  # fmt: skip
    model.safety = safety
    use_channels_last(model, channels_last)
    use_cuda_graphs(model, cuda_graphs)
    return model
