"""The `Inversion` artifact: everything an edit needs to reproduce a real image, on disk as an
artifact folder (`dpl_edit.io.artifacts`: JSON, safetensors and PNGs, written atomically).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dpl_edit.engine.model import LoadedModel, same_model
from dpl_edit.engine.text import DynamicTokens
from dpl_edit.errors import DplError
from dpl_edit.io.artifacts import Artifact, read_artifact, write_artifact

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
        """Read an inversion folder; with `model`, refuse one made with a different model."""
        artifact = read_artifact(folder, ARTIFACT_KIND)
        meta, tensors = artifact.meta, artifact.tensors
        if model is not None and not same_model(meta["model_identity"], model.identity):
            raise DplError(
                f"inversion '{folder}' was made with model {meta['model_identity']}, not with "
                f"{model.identity}; load that model or invert again"
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
            trajectory=tensors.get("trajectory"),
        )
