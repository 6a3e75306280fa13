"""The benchmark's methods (one inversion recipe each) and the settings they all share.

A method is a row of a table: the `invert` method it uses and, for DPL, which of its losses and
thresholds are switched off. A new variant (another ablation, another inversion) is one more row;
the runner never special-cases a method by name. DPL rows are refused with a clear message while
the inversion engine does not offer "dpl" yet, instead of failing deep inside a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dpl_edit.errors import DplError


@dataclass(frozen=True)
class BenchMethod:
    """How one method inverts: `invert(..., method=inversion, **invert_kwargs(nouns))`."""

    name: str
    inversion: str
    description: str
    dpl_switches: dict[str, bool] | None = field(default=None)
    """`DplLossConfig` flags to override (empty: DPL's defaults); None for non-DPL methods."""

    def invert_kwargs(self, nouns: Sequence[str]) -> dict[str, Any]:
        """Extra `invert` arguments: DPL learns the object nouns' tokens under its loss config."""
        if self.dpl_switches is None:
            return {}
        from dpl_edit.losses import DplLossConfig  # torch-heavy; only DPL rows need it

        return {"words": list(nouns), "dpl_config": DplLossConfig(**self.dpl_switches)}


_TABLE = (
    BenchMethod("ddim", "ddim", "DDIM inversion + P2P"),
    BenchMethod("nti", "nti", "null-text inversion + P2P"),
    BenchMethod("dpl", "dpl", "Dynamic Prompt Learning + P2P", {}),
    BenchMethod(
        "dpl-at", "dpl", "DPL, attention-balancing loss only", {"use_dj": False, "use_bg": False}
    ),
    BenchMethod("dpl-dj", "dpl", "DPL, disjoint loss only", {"use_at": False, "use_bg": False}),
    BenchMethod("dpl-bg", "dpl", "DPL, background loss only", {"use_at": False, "use_dj": False}),
    BenchMethod(
        "dpl-no-thresholds", "dpl", "DPL without gradual thresholds", {"use_thresholds": False}
    ),
)
METHODS: dict[str, BenchMethod] = {m.name: m for m in _TABLE}
DEFAULT_METHODS = ("ddim", "nti", "dpl")
BASELINE = "nti"
"""The method paired differences are reported against: DPL's claim is to improve on NTI."""


@dataclass(frozen=True)
class BenchSettings:
    """Everything shared by all methods; stored with each scene so resuming cannot mix runs."""

    steps: int = 10
    """`make bench`'s 20 scenes of three methods fit 45 minutes on 2 cores (README); use 50 for
    full runs."""
    guidance: float = 7.5
    cross_replace_steps: float = 0.8
    self_replace_steps: float = 0.5
    blend: bool = True
    """P2P local blend on the edited object's words: what leaky attention would spoil."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise DplError(f"--steps must be at least 1, got {self.steps}")


def resolve_methods(names: Sequence[str]) -> list[BenchMethod]:
    """Look up method names ("all" = every row), refusing unknown or not-yet-available ones."""
    from dpl_edit.inversion import METHODS as INVERSION_METHODS

    if "all" in names:
        names = list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise DplError(f"unknown method '{unknown[0]}' (use {', '.join(METHODS)} or all)")
    if not names:
        raise DplError("no methods to run")
    chosen = [METHODS[n] for n in dict.fromkeys(names)]
    missing = [m.name for m in chosen if m.inversion not in INVERSION_METHODS]
    if missing:
        raise DplError(
            f"method {', '.join(missing)} needs '{METHODS[missing[0]].inversion}' inversion,"
            f" which this installation does not provide yet (it has"
            f" {', '.join(INVERSION_METHODS)}); choose others with --methods"
        )
    return chosen
