"""The engine's settings and their defaults, in one place and free of heavy imports.

`invert`, `edit`, the benchmark and the `dpl` command all take their defaults from these
objects, so a default is written once; the command shows them in `--help` from here, which is
why this module must not import torch (help would take seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("ddim", "nti", "dpl")
"""Inversion methods: plain DDIM inversion, null-text inversion, NTI with Dynamic Prompt Learning."""
MODES = ("replace", "refine")
"""Prompt-to-Prompt edit modes: word swap, and refinement (words added or removed)."""
LEAK_REGIONS = ("background", "others", "others-split")
"""DPL's leakage regions (`dpl_edit.dpl.losses.LeakRegion` says what each keeps a word off)."""
LEAK_MEASURES = ("cosine", "mass")
"""How DPL's background loss scores a map against its region (`dpl_edit.dpl.losses.LeakMeasure`)."""
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


FAST_NULL_TEXT = NullTextSettings(inner_steps=5, lr=2e-2)
"""The speed options' null text (`--fast`, bench rows `nti-fast`/`dpl-fast`): half NTI's inner
steps at twice its rate. Its updates move the null text by about the same distance (Adam's
steps have a fixed size, and the loss falls almost linearly over the 10 steps); on the
validation split it reconstructs and localises as NTI does (docs/benchmarks.md)."""


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
