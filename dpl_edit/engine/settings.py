"""The engine's settings and their defaults, in one place and free of heavy imports.

`invert`, `edit`, the benchmark and the `dpl` command all take their defaults from these
objects, so a default is written once; the command shows them in `--help` from here, which is
why this module must not import torch (help would take seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from dpl_edit.errors import DplError

BUNDLED_MODELS = Path(__file__).parent.parent / "models"
"""Models shipped with the package, each a diffusers SD folder, addressed by folder name."""
BUNDLED_MODEL = BUNDLED_MODELS / "world"

METHODS = ("ddim", "nti", "dpl")
"""Inversion methods: plain DDIM inversion, null-text inversion, NTI with Dynamic Prompt Learning."""
MODES = ("replace", "refine")
"""Prompt-to-Prompt edit modes: word swap, and refinement (words added or removed)."""
LeakRegion = Literal["background", "others", "others-split"]
"""Where the background-leakage loss keeps a word's map off: the estimated background (the
paper), or everything the word's own K-means clusters do not cover, i.e. the background *and*
the other words' objects, which stops two words' maps from swapping objects. "others-split"
is "others" after the claimed clusters' pixels are shared out, each to the word whose
cross-attention is highest there (`dpl_edit.dpl.background.share_out_clusters`), so that
each word owns its own object even when K-means merged two objects into one cluster."""
LEAK_REGIONS: tuple[str, ...] = get_args(LeakRegion)
LeakMeasure = Literal["cosine", "mass"]
"""How the background loss scores a word map against the region it should stay out of: the
paper's cosine similarity, or the share of the map's mass inside the region. A cosine with a
large region is small for *any* peaked map, wherever the peak is, so it barely resists a word
moving onto another object; the mass share is exactly the leakage it should prevent."""
LEAK_MEASURES: tuple[str, ...] = get_args(LeakMeasure)
TargetTokens = Literal["learned", "plain"]
"""Which word vectors an edit's target prompt reads for the words DPL learned: the same per-step
table as the source (the paper's code), or the vocabulary's own embeddings. The source branch
always reads the learned ones (its maps are what the edit injects); with "plain" the target
draws the unchanged words from their usual meaning, not from a vector that was fitted only for
the source prompt's context."""
TARGET_TOKENS: tuple[str, ...] = get_args(TargetTokens)
MAX_SEED = 2**32 - 1
"""The largest seed: every random generator the tool seeds (torch, numpy) takes 0 to 2^32 - 1."""
DTYPES = ("float32", "float16", "bfloat16")
DEVICES = "cpu, cuda, cuda:N, mps or auto"


@dataclass(frozen=True)
class InversionSettings:
    """Defaults of `invert`: DPL, SD's usual 50 steps and guidance 7.5."""

    method: str = "dpl"
    steps: int = 50
    guidance: float = 7.5


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

    def __post_init__(self) -> None:
        """Fail when the settings are made, naming the field, rather than mid-inversion."""
        if self.inner_steps < 1:
            raise DplError(f"inner_steps must be at least 1, got {self.inner_steps}")
        if not self.lr > 0:
            raise DplError(f"lr must be > 0, got {self.lr}")
        if self.early_stop is not None and not self.early_stop >= 0:
            raise DplError(f"early_stop must be >= 0 (or None), got {self.early_stop}")
        if not self.early_stop_slope >= 0:
            raise DplError(f"early_stop_slope must be >= 0, got {self.early_stop_slope}")


FAST_NULL_TEXT = NullTextSettings(inner_steps=5, lr=2e-2)
"""The speed options' null text (`--fast`, bench rows `nti-fast`/`dpl-fast`): half NTI's inner
steps at twice its rate. Its updates move the null text by about the same distance (Adam's
steps have a fixed size, and the loss falls almost linearly over the 10 steps); on the
validation split it reconstructs and localises as NTI does (docs/research/speed.md)."""


@dataclass(frozen=True)
class EditSettings:
    """Defaults of `edit`: P2P's word swap with its notebook's injection windows and blending."""

    mode: str = "replace"
    cross_replace_steps: float = 0.8
    """Fraction of steps in which the source's cross-attention is injected."""
    self_replace_steps: float = 0.5
    """Fraction of steps in which the source's self-attention is injected."""
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    """Fraction of steps after which local blending starts."""
    blend_res: int | None = None
    """Side of the cross-attention maps the local-blend mask is cut from; None: the model's
    `blend_res` (dpl_defaults.json). A finer level gives a tighter mask: one cell of the
    mask, and its 3x3 dilation, covers fewer pixels around the edited object."""
    target_tokens: TargetTokens = "learned"
    """The paper's: the target prompt reads DPL's learned vectors too (see `TargetTokens`)."""
