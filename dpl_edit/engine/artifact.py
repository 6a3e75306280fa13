"""The `Inversion` artifact: everything an edit needs to reproduce a real image, on disk as an
artifact folder (`dpl_edit.io.artifacts`: JSON, safetensors and PNGs, written atomically).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dpl_edit.engine.model import LoadedModel, same_model
from dpl_edit.engine.settings import METHODS
from dpl_edit.engine.text import DynamicTokens, has_word
from dpl_edit.errors import DplError
from dpl_edit.io.artifacts import Artifact, read_artifact, write_artifact
from dpl_edit.io.jsonl import excerpt

ARTIFACT_KIND = "inversion"


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
    trajectory: torch.Tensor | None = None
    """[steps + 1, C, h, w]: the guided path null-text inversion reconstructs the image along,
    noisiest first. An edit's source branch retraces exactly this path, so `edit` reads it
    instead of recomputing the source's unconditional pass. None for DDIM inversions (their
    guided replay is not fitted) and for folders saved before it was stored."""

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
        if self.trajectory is not None:
            tensors["trajectory"] = self.trajectory
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
        """Read an inversion folder, every key, type, range and tensor shape checked first
        (`InversionSchema`: a folder is untrusted input); with `model`, refuse one the model
        cannot edit (`check_model`)."""
        artifact = read_artifact(folder, ARTIFACT_KIND)
        InversionSchema(f"inversion '{folder}'").check(artifact)
        meta, tensors = artifact.meta, artifact.tensors
        images = dict(artifact.images)
        extras: dict[str, Any] = dict(meta["extras"])
        extras.update(
            {k.removeprefix("extras."): v for k, v in tensors.items() if k.startswith("extras.")}
        )
        extras.update({k: v for k, v in images.items() if k != "source"})
        dynamic = None
        if meta["dynamic_tokens"] is not None:
            dynamic = DynamicTokens(
                list(meta["dynamic_tokens"]["words"]),
                [list(p) for p in meta["dynamic_tokens"]["positions"]],
                tensors["dynamic_vectors"],
            )
        inversion = cls(
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
            trajectory=tensors.get("trajectory"),
        )
        if model is not None:
            inversion.check_model(model, f"inversion '{folder}'")
        return inversion

    def check_model(self, model: LoadedModel, name: str = "the inversion") -> None:
        """Refuse an inversion `model` cannot edit: made with another model, or (a tampered
        folder) with latents, null texts or word vectors of other sizes than the model's, or
        more steps than its scheduler has."""
        if not same_model(self.model_identity, model.identity):
            raise DplError(
                f"{name} was made with model {self.model_identity}, not with {model.identity}; "
                "load that model or invert again"
            )
        latent = (int(model.unet.config.in_channels), model.latent_size, model.latent_size)
        context = (model.text_len, int(model.unet.config.cross_attention_dim))
        sizes = [
            ("latents", tuple(self.latents.shape[1:]), latent),
            ("null_embeddings", tuple(self.null_embeddings.shape[1:]), context),
        ]
        if self.trajectory is not None:
            sizes.append(("trajectory", tuple(self.trajectory.shape[1:]), latent))
        if self.dynamic_tokens is not None:
            width = int(model.text_encoder.get_input_embeddings().embedding_dim)
            sizes.append(("dynamic_vectors", (self.dynamic_tokens.vectors.shape[2],), (width,)))
        for key, found, wanted in sizes:
            if found != wanted:
                raise DplError(
                    f"{name}: tensor '{key}' has rows of shape {list(found)}, but this model's "
                    f"are {list(wanted)}"
                )
        train_steps = int(model.scheduler.config.num_train_timesteps)
        if self.steps > train_steps:
            raise DplError(
                f"{name} has {self.steps} steps; this model's scheduler has {train_steps}"
            )


_BOUND = 1e4
"""Largest magnitude a stored latent or embedding may have: real ones stay within tens, and a
folder scaled beyond this (1e30, inf) would only decode to a black picture."""
_KEYS = {
    "format", "format_version", "package_version", "prompt", "method", "model_identity",
    "words", "settings", "timings", "unet_evals", "dynamic_tokens", "extras",
}  # fmt: skip
_TENSORS = {"latents", "null_embeddings", "attention", "trajectory", "dynamic_vectors"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_int(value) and value >= 1


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_numbers(value: Any) -> bool:
    return isinstance(value, dict) and all(_is_number(x) for x in value.values())


def _is_positions(value: Any, text_len: int) -> bool:
    return isinstance(value, list) and all(_is_int(p) and 0 <= p < text_len for p in value)


def _is_word(value: Any, text_len: int) -> bool:
    """A `words` entry: [word, [its token positions]]."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and _is_positions(value[1], text_len)
    )


class InversionSchema:
    """The checks an inversion folder passes before any of it is used: every meta.json key
    with its type and range, every tensor with its dtype, shape and range. Each failure is one
    `DplError` naming the key (and the folder, as `name`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def fail(self, key: str, rule: str, value: Any) -> DplError:
        return DplError(f"{self.name}: meta.json key '{key}' must be {rule}, got {excerpt(value)}")

    def key(
        self,
        record: dict[str, Any],
        key: str,
        valid: Callable[[Any], bool],
        rule: str,
        parent: str = "",
    ) -> Any:
        """`record[key]`, which must be there and be valid; `parent` names the object that
        holds it ("settings."), for the message."""
        if key not in record:
            raise DplError(f"{self.name}: meta.json has no key '{parent}{key}'")
        if not valid(record[key]):
            raise self.fail(f"{parent}{key}", rule, record[key])
        return record[key]

    def tensor(
        self,
        tensors: dict[str, torch.Tensor],
        key: str,
        shape: list[int | None],
        limit: float = _BOUND,
    ) -> torch.Tensor:
        """A float tensor of `shape` (None: any size) with finite values within +-`limit`."""
        if key not in tensors:
            raise DplError(f"{self.name}: tensors.safetensors has no tensor '{key}'")
        value, sizes = tensors[key], list(tensors[key].shape)
        if len(sizes) != len(shape) or not all(
            wanted is None or size == wanted for size, wanted in zip(sizes, shape, strict=True)
        ):
            wanted = ", ".join("?" if size is None else str(size) for size in shape)
            raise DplError(f"{self.name}: tensor '{key}' must have shape [{wanted}], got {sizes}")
        if not value.is_floating_point():
            raise DplError(f"{self.name}: tensor '{key}' must hold floats, not {value.dtype}")
        if not bool(torch.isfinite(value).all()) or bool((value.abs() > limit).any()):
            raise DplError(
                f"{self.name}: tensor '{key}' holds values that are not finite or beyond "
                f"+-{limit:g}"
            )
        return value

    def check(self, artifact: Artifact) -> None:
        meta, tensors = artifact.meta, artifact.tensors
        unknown = sorted(set(meta) - _KEYS)
        if unknown:
            raise DplError(f"{self.name}: meta.json has an unknown key '{unknown[0]}'")
        self.key(meta, "package_version", lambda v: isinstance(v, str), "a version string")
        self.key(meta, "prompt", lambda v: isinstance(v, str) and has_word(v), "a prompt")
        self.key(meta, "method", lambda v: v in METHODS, f"one of {', '.join(METHODS)}")
        self.key(meta, "model_identity", lambda v: isinstance(v, str) and bool(v), "a name")
        settings = self.key(meta, "settings", lambda v: isinstance(v, dict), "an object")
        steps = self.key(settings, "steps", _is_count, "a whole number >= 1", "settings.")
        self.key(settings, "guidance", _is_number, "a finite number", "settings.")
        for key, valid, rule in _SETTINGS:
            if key in settings and not valid(settings[key]):
                raise self.fail(f"settings.{key}", rule, settings[key])
        for key in ("timings", "unet_evals"):
            self.key(meta, key, _is_numbers, "an object of numbers")
        self.key(meta, "extras", lambda v: isinstance(v, dict), "an object")
        unknown = sorted(k for k in set(tensors) - _TENSORS if not k.startswith("extras."))
        if unknown:
            raise DplError(f"{self.name}: tensors.safetensors has an unknown tensor '{unknown[0]}'")
        latents = self.tensor(tensors, "latents", [steps + 1, None, None, None])
        nulls = self.tensor(tensors, "null_embeddings", [steps, None, None])
        text_len = nulls.shape[1]
        self.tensor(tensors, "attention", [None, None, text_len], limit=1.001)
        if "trajectory" in tensors:
            self.tensor(tensors, "trajectory", list(latents.shape))
        self.key(
            meta,
            "words",
            lambda v: isinstance(v, list) and all(_is_word(w, text_len) for w in v),
            f"a list of [word, [positions < {text_len}]]",
        )
        dynamic = self.key(
            meta,
            "dynamic_tokens",
            lambda v: v is None or (isinstance(v, dict) and set(v) == {"words", "positions"}),
            'null or {"words": [...], "positions": [...]}',
        )
        if dynamic is not None:
            words = dynamic["words"]
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise self.fail("dynamic_tokens.words", "a list of words", words)
            positions = dynamic["positions"]
            if not (
                isinstance(positions, list)
                and len(positions) == len(words)
                and all(_is_positions(p, text_len) for p in positions)
            ):
                rule = f"one list of positions < {text_len} per word"
                raise self.fail("dynamic_tokens.positions", rule, positions)
            rows = sum(len(p) for p in positions)
            self.tensor(tensors, "dynamic_vectors", [steps, rows, None])
        elif "dynamic_vectors" in tensors:
            raise DplError(
                f"{self.name}: tensor 'dynamic_vectors' without meta.json 'dynamic_tokens'"
            )
        if "source" not in artifact.images:
            raise DplError(f"{self.name}: meta.json key 'images' does not list 'source'")


_SETTINGS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("resolution", _is_count, "a whole number >= 1"),
    ("cross_attention_res", _is_count, "a whole number >= 1"),
    ("resize", lambda v: isinstance(v, bool), "true or false"),
    ("dtype", lambda v: isinstance(v, str), "a dtype name"),
    ("null_text", lambda v: v is None or isinstance(v, dict), "null or an object"),
    ("dpl", lambda v: v is None or isinstance(v, dict), "null or an object"),
]
"""The settings an inversion records besides steps and guidance, checked when present."""
