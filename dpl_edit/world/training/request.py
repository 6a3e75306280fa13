"""What a training call asks for, apart from the training code so that `dpl --help` (which
shows these defaults) does not import torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpl_edit.engine.settings import BUNDLED_MODEL


@dataclass(frozen=True)
class TrainRequest:
    """What one training call asks for: where to work, and which of the run's settings change.

    Settings left None keep the run's (its `config.json`, else the shipped model's recipe when
    resuming from one, else `TrainConfig`'s defaults).
    """

    run: Path = Path("runs/world")
    out: Path = BUNDLED_MODEL
    seed: int = 0
    """Seed of a new run (a resumed run keeps its own)."""
    threads: int = 0
    """CPU threads (0: torch's default)."""
    vae_steps: int | None = None
    unet_steps: int | None = None
    decoder_steps: int | None = None
    attn_guide_weight: float | None = None
    sink_weight: float | None = None
    """Weight of the start-token sink term (`unet.sink_guide`; 0 = off)."""
    ema_decay: float | None = None
    """Decay of the exported EMA weights; a short fine-tune needs a shorter memory than 0.999."""
    lr_decay_from: int | None = None
    resume_from: Path | None = None
    """A shipped model folder to start an empty run from."""
    export_only: bool = False
