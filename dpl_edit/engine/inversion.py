"""DDIM inversion and null-text inversion (NTI) of a real image, and reconstruction from them.

DDIM inversion runs the sampler backwards with the conditional prediction only. Replaying it with
classifier-free guidance (7.5) drifts away from the image, so NTI optimises one unconditional
("null") embedding per step so that each guided step lands on the inverted trajectory.

The null-text loop takes an optional per-step *stage* that runs first at every step and returns
the conditional embedding for that step: Dynamic Prompt Learning plugs in there, updating its
token vectors on the current latent before the null text is fitted to them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from dpl_edit.dpl.losses import DplLossConfig
from dpl_edit.engine.attention import AttentionController, CrossAttentionStore, controlled_attention
from dpl_edit.engine.ddim import Ddim
from dpl_edit.engine.model import LoadedModel, same_model
from dpl_edit.engine.text import encode_text, find_word, prompt_tokens, word_spans
from dpl_edit.errors import DplError
from dpl_edit.io.artifacts import Artifact, read_artifact, write_artifact
from dpl_edit.io.images import image_to_tensor, load_image, prepare_image

if TYPE_CHECKING:
    from dpl_edit.dpl.stage import BackgroundSettings

METHODS = ("ddim", "nti", "dpl")
ARTIFACT_KIND = "inversion"


@dataclass(frozen=True)
class NullTextSettings:
    """NTI's defaults: 10 Adam steps at lr 1e-2*(1 - i/100), early stop, warm start.

    `early_stop=None` disables early stopping and `warm_start=False` restarts every step from
    the empty prompt's embedding; together with `inner_steps=51` that is the DPL code's variant.
    """

    inner_steps: int = 10
    lr: float = 1e-2
    early_stop: float | None = 1e-5
    early_stop_slope: float = 2e-5
    warm_start: bool = True


class StepStage(Protocol):
    """Work done at each denoising step before the null text is fitted (DPL's token update).

    Called with the step index, its timestep and the current reconstruction latent (no grad);
    returns the conditional text embedding [1, text_len, dim] to use for this step.
    """

    def __call__(self, step: int, t: int, latent: torch.Tensor) -> torch.Tensor: ...


@dataclass
class DynamicTokens:
    """Per-step input-embedding vectors learned for chosen words (filled in by DPL).

    `vectors[i]` holds, for step i, one row per sub-token of each word, words in order. Any
    prompt containing a word gets these rows at each of the word's occurrences, which is how the
    target prompt of an edit reuses the vectors learned on the source prompt.
    """

    words: list[str]
    positions: list[list[int]]
    """Source-prompt positions of each word's sub-tokens (for the record and for DPL's losses)."""
    vectors: torch.Tensor

    def token_vectors(
        self, tokenizer: Any, prompts: Sequence[str], step: int
    ) -> dict[tuple[int, int], torch.Tensor]:
        """(prompt index, position) -> vector at `step`, for every learned word in each prompt."""
        out: dict[tuple[int, int], torch.Tensor] = {}
        for index, prompt in enumerate(prompts):
            row = 0
            for word in self.words:
                count = len(tokenizer.tokenize(word))
                for k, position in enumerate(find_word(tokenizer, prompt, word)):
                    out[(index, position)] = self.vectors[step, row + k % count]
                row += count
        return out


@dataclass
class Inversion:
    """Everything an edit needs to reproduce a real image: latents, null texts, prompt, model."""

    prompt: str
    method: str
    model_identity: str
    latents: torch.Tensor
    """[steps + 1, C, h, w]: index 0 is the clean image latent, index `steps` the noisiest."""
    null_embeddings: torch.Tensor
    """[steps, text_len, dim]: the unconditional embedding used at each denoising step."""
    attention: torch.Tensor
    """[res, res, text_len]: time-averaged conditional cross-attention of the prompt."""
    words: list[tuple[str, list[int]]]
    """The prompt's words with their token positions (for labelling attention maps)."""
    image: Image.Image
    settings: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    unet_evals: dict[str, int] = field(default_factory=dict)
    dynamic_tokens: DynamicTokens | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    """DPL traces: tensors (saved as safetensors), PIL images (PNG) or JSON values."""

    @property
    def steps(self) -> int:
        return int(self.null_embeddings.shape[0])

    @property
    def guidance(self) -> float:
        return float(self.settings["guidance"])

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the inversion folder atomically (refusing an existing one unless `overwrite`)."""
        tensors = {
            "latents": self.latents,
            "null_embeddings": self.null_embeddings,
            "attention": self.attention,
        }
        images, extras_json = {"source": self.image}, {}
        for key, value in self.extras.items():
            if isinstance(value, torch.Tensor):
                tensors[f"extras.{key}"] = value
            elif isinstance(value, Image.Image):
                images[key] = value
            else:
                extras_json[key] = value
        dynamic = None
        if self.dynamic_tokens is not None:
            tensors["dynamic_vectors"] = self.dynamic_tokens.vectors
            dynamic = {
                "words": self.dynamic_tokens.words,
                "positions": self.dynamic_tokens.positions,
            }
        meta = {
            "prompt": self.prompt,
            "method": self.method,
            "model_identity": self.model_identity,
            "words": self.words,
            "settings": self.settings,
            "timings": self.timings,
            "unet_evals": self.unet_evals,
            "dynamic_tokens": dynamic,
            "extras": extras_json,
        }
        return write_artifact(folder, ARTIFACT_KIND, Artifact(meta, tensors, images), overwrite)

    @classmethod
    def load(cls, folder: str | Path, model: LoadedModel | None = None) -> Inversion:
        """Read an inversion folder; with `model`, refuse one made with a different model."""
        artifact = read_artifact(folder, ARTIFACT_KIND)
        meta, tensors = artifact.meta, artifact.tensors
        if model is not None and not same_model(meta["model_identity"], model.identity):
            raise DplError(
                f"inversion '{folder}' was made with model {meta['model_identity']}, not with "
                f"{model.identity}; pass the same --model or invert again"
            )
        images = dict(artifact.images)
        extras: dict[str, Any] = dict(meta["extras"])
        extras.update(
            {k.removeprefix("extras."): v for k, v in tensors.items() if k.startswith("extras.")}
        )
        extras.update({k: v for k, v in images.items() if k != "source"})
        dynamic = None
        if meta["dynamic_tokens"] is not None:
            dynamic = DynamicTokens(
                meta["dynamic_tokens"]["words"],
                meta["dynamic_tokens"]["positions"],
                tensors["dynamic_vectors"],
            )
        return cls(
            prompt=meta["prompt"],
            method=meta["method"],
            model_identity=meta["model_identity"],
            latents=tensors["latents"],
            null_embeddings=tensors["null_embeddings"],
            attention=tensors["attention"],
            words=[(w, list(p)) for w, p in meta["words"]],
            image=images["source"].convert("RGB"),
            settings=meta["settings"],
            timings=meta["timings"],
            unet_evals=meta["unet_evals"],
            dynamic_tokens=dynamic,
            extras=extras,
        )


def step_embeddings(
    model: LoadedModel,
    prompts: Sequence[str],
    dynamic: DynamicTokens | None,
    step: int,
    cache: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Conditional embeddings of `prompts` at a step: with that step's dynamic tokens if any.

    Without dynamic tokens the encoding never changes, so it is computed once into `cache`.
    """
    if dynamic is None:
        if "static" not in cache:
            cache["static"] = encode_text(model, prompts)
        return cache["static"]
    vectors = dynamic.token_vectors(model.tokenizer, prompts, step)
    return encode_text(model, prompts, {k: v.to(model.device) for k, v in vectors.items()})


@torch.no_grad()
def ddim_inversion(
    model: LoadedModel,
    ddim: Ddim,
    latent: torch.Tensor,
    cond: torch.Tensor,
    controllers: Sequence[AttentionController] = (),
    progress: bool = True,
) -> torch.Tensor:
    """Conditional-only DDIM inversion; returns all latents [steps + 1, C, h, w], clean first.

    `controllers` see every inversion step (e.g. attention stores for background estimation).
    """
    latents = [latent]
    with controlled_attention(model.unet, controllers) as chain:
        for i, t in enumerate(
            tqdm(ddim.timesteps[::-1], desc="DDIM inversion", disable=not progress)
        ):
            chain.begin_step(i)
            latent = ddim.inverse_step(model.predict(latent, t, cond), t, latent)
            chain.end_step()
            latents.append(latent)
    return torch.cat(latents)


def optimize_null(
    model: LoadedModel,
    ddim: Ddim,
    step: int,
    latent: torch.Tensor,
    target: torch.Tensor,
    cond_output: torch.Tensor,
    null_init: torch.Tensor,
    guidance: float,
    settings: NullTextSettings,
) -> tuple[torch.Tensor, int, float]:
    """Fit the null embedding of one step so the guided DDIM step from `latent` hits `target`.

    `cond_output` is the UNet's conditional output at this step (fixed). Returns the embedding,
    the inner steps taken and the last loss.
    """
    t = ddim.timesteps[step]
    null = null_init.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([null], lr=settings.lr * (1.0 - step / 100.0))
    loss_value, taken = float("nan"), 0
    for taken in range(1, settings.inner_steps + 1):  # noqa: B007 - `taken` is reported
        uncond_output = model.predict(latent, t, null)
        guided = uncond_output + guidance * (cond_output - uncond_output)
        loss = F.mse_loss(ddim.step(guided, t, latent), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if settings.early_stop is not None:
            if loss_value < settings.early_stop + step * settings.early_stop_slope:
                break
    return null.detach(), taken, loss_value


@dataclass
class NullTextResult:
    null_embeddings: torch.Tensor
    attention: torch.Tensor
    inner_steps: list[int]
    losses: list[float]


def null_text_inversion(
    model: LoadedModel,
    ddim: Ddim,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
    settings: NullTextSettings,
    stage: StepStage | None = None,
    progress: bool = True,
) -> NullTextResult:
    """NTI over all steps, following the reconstruction latent from the noisiest inverted one.

    Per step: (1) `stage` (if any) returns the step's conditional embedding, (2) the null text is
    optimised against the inverted latent one level down, (3) the latent advances with guidance.
    The conditional cross-attention of step (3)'s trajectory is recorded for the attention grid.
    """
    steps = len(ddim.timesteps)
    store = CrossAttentionStore([model.defaults.cross_attention_res])
    latent, null = latents[-1:], uncond
    nulls, inner_steps, losses = [], [], []
    bar = tqdm(total=steps * settings.inner_steps, desc="null-text inversion", disable=not progress)
    for i, t in enumerate(ddim.timesteps):
        step_cond = cond if stage is None else stage(i, t, latent).detach()
        with torch.no_grad(), controlled_attention(model.unet, [store]):
            cond_output = model.predict(latent, t, step_cond)
        store.end_step()
        init = null if settings.warm_start else uncond
        null, taken, loss = optimize_null(
            model, ddim, i, latent, latents[steps - i - 1 : steps - i], cond_output, init,
            guidance, settings,
        )  # fmt: skip
        nulls.append(null[0])
        inner_steps.append(taken)
        losses.append(loss)
        bar.update(settings.inner_steps)
        with torch.no_grad():
            uncond_output = model.predict(latent, t, null)
            latent = ddim.step(uncond_output + guidance * (cond_output - uncond_output), t, latent)
    bar.close()
    return NullTextResult(
        torch.stack(nulls), store.average(store.resolutions[0])[0], inner_steps, losses
    )


def invert(
    model: LoadedModel,
    image: Image.Image | str | Path,
    prompt: str,
    method: str = "dpl",
    steps: int = 50,
    guidance: float = 7.5,
    null_text: NullTextSettings | None = None,
    resize: bool = False,
    progress: bool = True,
    words: Sequence[str] | None = None,
    dpl_config: DplLossConfig | None = None,
    background: BackgroundSettings | None = None,
    bg_mask: str | Path | None = None,
    no_bg: bool = False,
) -> Inversion:
    """Invert a real image (a path or PIL image) under `prompt` with DDIM, NTI or DPL.

    DPL ("dpl") is NTI whose every step first learns the vectors of `words` (default: the
    prompt's words in the model's object list) against attention leakage; `dpl_config` holds its
    losses and optimiser, `background` how the background mask is estimated, `bg_mask` a user's
    mask file (white = background) instead, and `no_bg` turns the background loss off.
    """
    if method not in METHODS:
        raise DplError(f"unknown inversion method '{method}' (use {', '.join(METHODS)})")
    if steps < 1:
        raise DplError("the number of steps must be at least 1")
    dpl_options = words or dpl_config or background or bg_mask is not None or no_bg
    if method != "dpl" and dpl_options:
        raise DplError(f"words and background options need method 'dpl', not '{method}'")
    null_text = null_text or NullTextSettings()
    prompt_tokens(model.tokenizer, prompt)  # an over-long prompt is the first thing to report
    plan = None
    if method == "dpl":
        # dpl.py builds on this module, so it is imported when used rather than at the top.
        from dpl_edit.dpl.stage import DplPlan

        plan = DplPlan.create(model, prompt, words, dpl_config, background, bg_mask, no_bg)
    if isinstance(image, Image.Image):
        image = prepare_image(image, model.resolution, resize)
    else:
        image = load_image(image, model.resolution, resize)
    timings: dict[str, float] = {}
    evals: dict[str, int] = {}
    ddim = Ddim(model.scheduler, steps)

    start, evals_before = time.perf_counter(), model.unet_evals
    cond = encode_text(model, [prompt])
    uncond = encode_text(model, [""])
    z0 = model.encode_image(image_to_tensor(image))
    timings["encode"] = time.perf_counter() - start

    start = time.perf_counter()
    store = CrossAttentionStore([model.defaults.cross_attention_res])
    controllers = [store, *(plan.inversion_controllers if plan else [])]
    latents = ddim_inversion(model, ddim, z0, cond, controllers, progress)
    timings["ddim_inversion"] = time.perf_counter() - start
    evals["ddim_inversion"] = model.unet_evals - evals_before

    extras: dict[str, Any] = {}
    dynamic_tokens = None
    if method == "ddim":
        nulls = uncond.expand(steps, -1, -1)
        attention = store.average(model.defaults.cross_attention_res)[0]
    else:
        stage = None
        if plan is not None:
            stage = plan.token_stage(store.average(model.defaults.cross_attention_res)[0], steps)
            timings["dpl_background"] = plan.seconds
        start, evals_before = time.perf_counter(), model.unet_evals
        result = null_text_inversion(
            model, ddim, latents, cond, uncond, guidance, null_text, stage, progress
        )
        timings["null_text"] = time.perf_counter() - start
        evals["null_text"] = model.unet_evals - evals_before
        nulls, attention = result.null_embeddings, result.attention
        extras.update(null_inner_steps=result.inner_steps, null_losses=result.losses)
        if stage is not None:
            # The token stage ran inside the null-text loop: report the two apart.
            timings["null_text"] -= stage.seconds
            evals["null_text"] -= stage.unet_evals
            timings["dpl_tokens"] = stage.seconds
            evals["dpl_tokens"] = stage.unet_evals
            dynamic_tokens = stage.dynamic_tokens()
            extras.update(plan.masks, dpl_trace=stage.trace)

    settings = {
        "steps": steps,
        "guidance": guidance,
        "resolution": model.resolution,
        "resize": resize,
        "cross_attention_res": model.defaults.cross_attention_res,
        "dtype": str(model.dtype).removeprefix("torch."),
        "null_text": asdict(null_text) if method != "ddim" else None,
        "dpl": plan.settings() if plan else None,
    }
    return Inversion(
        prompt=prompt,
        method=method,
        model_identity=model.identity,
        latents=latents.float().cpu(),
        null_embeddings=nulls.float().cpu().contiguous(),
        attention=attention.float().cpu(),
        words=word_spans(model.tokenizer, prompt),
        image=image,
        settings=settings,
        timings=timings,
        unet_evals=evals,
        dynamic_tokens=dynamic_tokens,
        extras=extras,
    )


@torch.no_grad()
def reconstruct(
    model: LoadedModel, inversion: Inversion, progress: bool = False
) -> tuple[torch.Tensor, Image.Image]:
    """Replay the inversion with guidance: the final latent [1, C, h, w] and the decoded image."""
    ddim = Ddim(model.scheduler, inversion.steps)
    latent = inversion.latents[-1:].to(model.device, model.dtype)
    cache: dict[str, torch.Tensor] = {}
    for i, t in enumerate(tqdm(ddim.timesteps, desc="reconstruction", disable=not progress)):
        cond = step_embeddings(model, [inversion.prompt], inversion.dynamic_tokens, i, cache)
        null = inversion.null_embeddings[i : i + 1].to(model.device, model.dtype)
        output = model.predict(torch.cat([latent, latent]), t, torch.cat([null, cond]))
        uncond_output, cond_output = output.chunk(2)
        guided = uncond_output + inversion.guidance * (cond_output - uncond_output)
        latent = ddim.step(guided, t, latent)
    return latent, model.decode_latents(latent)[0]
