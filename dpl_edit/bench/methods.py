"""The benchmark's methods (one inversion recipe each) and the settings they all share.

A method is a row of a table: the `invert` method it uses and, for DPL, which of its losses and
thresholds are switched off. A new variant (another ablation, another inversion) is one more row;
the runner never special-cases a method by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from dpl_edit.engine.settings import (
    FAST_NULL_TEXT,
    EditSettings,
    InversionSettings,
    NullTextSettings,
)
from dpl_edit.errors import DplError


@dataclass(frozen=True)
class BenchMethod:
    """How one method inverts: `invert(..., method=inversion, **invert_kwargs(model, nouns))`.

    A DPL row's settings are `dpl_switches` on top of a base: the model's chosen defaults
    (`base` "model", so `dpl` is what users get and its ablations remove one part of that) or
    the paper's settings (`base` "paper", so each lever is measured against the recipe it
    changes).
    """

    name: str
    inversion: str
    description: str
    dpl_switches: dict[str, Any] | None = field(default=None)
    """`DplLossConfig` fields to override (empty: the base as it is); None for non-DPL rows."""
    base: Literal["model", "paper"] = "model"
    null_switches: dict[str, Any] | None = field(default=None)
    """`NullTextSettings` fields to override (NTI and DPL rows); None keeps invert's default."""
    edit_switches: dict[str, Any] | None = field(default=None)
    """Extra `edit` arguments (e.g. `target_tokens`); None edits with `edit`'s defaults. Rows
    that differ only here share one inversion per scene (`runner.run_scene`)."""

    def null_text(self) -> NullTextSettings | None:
        """The null-text settings this row runs with, or None for `invert`'s default."""
        return None if self.null_switches is None else NullTextSettings(**self.null_switches)

    def dpl_config(self, model: Any) -> Any:
        """The `DplLossConfig` this row runs on `model`, or None for non-DPL rows."""
        if self.dpl_switches is None:
            return None
        from dpl_edit.dpl.losses import DplLossConfig
        from dpl_edit.dpl.stage import default_config  # torch-heavy; only DPL rows need it

        base = default_config(model) if self.base == "model" else DplLossConfig()
        return replace(base, **self.dpl_switches)

    def invert_kwargs(self, model: Any, nouns: Sequence[str]) -> dict[str, Any]:
        """Extra `invert` arguments: DPL learns the object nouns' tokens under its loss config."""
        config = self.dpl_config(model)
        kwargs = {} if config is None else {"words": list(nouns), "dpl_config": config}
        null_text = self.null_text()
        return kwargs if null_text is None else {**kwargs, "null_text": null_text}

    def inversion_key(self, model: Any) -> str:
        """What decides this row's inversion: rows with equal keys invert a scene identically."""
        config, null_text = self.dpl_config(model), self.null_text()
        return repr((self.inversion, config, null_text))


_WORDS = {"softmax_tokens": "words"}
_FRACTION = {"threshold_index": "fraction"}
_COARSE = {"loss_res": (8,)}
_LEVELS = {"loss_res": (8, 16)}
_FAST_NULL = asdict(FAST_NULL_TEXT)
_OWN_MASS = {"leak_region": "others-split", "leak_measure": "mass", "use_dj": False}
"""Each word's share of attention mass outside its own cells as the only leakage loss."""
_TABLE = (
    BenchMethod("ddim", "ddim", "DDIM inversion + P2P"),
    BenchMethod("nti", "nti", "null-text inversion + P2P"),
    BenchMethod(
        "dpl",
        "dpl",
        "own-region DPL + P2P (the bundled models' DPL variant and default: each word's share of"
        " attention mass outside its own region as the only loss, learned vectors bounded; not"
        " the paper's three losses)",
        {},
    ),
    BenchMethod(
        "dpl-at", "dpl", "DPL, attention-balancing loss only", {"use_dj": False, "use_bg": False}
    ),
    BenchMethod("dpl-dj", "dpl", "DPL, disjoint loss only", {"use_at": False, "use_bg": False}),
    BenchMethod("dpl-bg", "dpl", "DPL, background loss only", {"use_at": False, "use_dj": False}),
    BenchMethod(
        "dpl-no-thresholds", "dpl", "DPL without gradual thresholds", {"use_thresholds": False}
    ),
    BenchMethod(
        "dpl-paper",
        "dpl",
        "paper DPL + P2P (the paper's recipe: balancing, disjoint and background losses with"
        " their thresholds)",
        {},
        "paper",
    ),
    BenchMethod("dpl-words", "dpl", "paper DPL, balancing softmax over the words", _WORDS, "paper"),
    BenchMethod(
        "dpl-fraction", "dpl", "paper DPL, thresholds by schedule fraction", _FRACTION, "paper"
    ),
    BenchMethod("dpl-res8", "dpl", "paper DPL, losses on the 8x8 level", _COARSE, "paper"),
    BenchMethod(
        "dpl-levels", "dpl", "paper DPL, losses on the 8x8 and 16x16 levels", _LEVELS, "paper"
    ),
    BenchMethod(
        "dpl-bg1", "dpl", "paper DPL, background loss weight 1", {"lambda_bg": 1.0}, "paper"
    ),
    BenchMethod(
        "dpl-words-fraction",
        "dpl",
        "paper DPL, word softmax and fraction thresholds",
        {**_WORDS, **_FRACTION},
        "paper",
    ),
    BenchMethod(
        "dpl-words-bg1",
        "dpl",
        "paper DPL, word softmax, background weight 1",
        {**_WORDS, "lambda_bg": 1.0},
        "paper",
    ),
    BenchMethod(
        "dpl-words-bg1-levels",
        "dpl",
        "paper DPL, word softmax, background weight 1, losses on the 8x8 and 16x16 levels",
        {**_WORDS, **_LEVELS, "lambda_bg": 1.0},
        "paper",
    ),
    BenchMethod(
        "dpl-words-bg3-levels",
        "dpl",
        "paper DPL, word softmax, background weight 3, losses on the 8x8 and 16x16 levels",
        {**_WORDS, **_LEVELS, "lambda_bg": 3.0},
        "paper",
    ),
    BenchMethod(
        "dpl-words-fraction-bg1",
        "dpl",
        "paper DPL, word softmax, fraction thresholds, background weight 1",
        {**_WORDS, **_FRACTION, "lambda_bg": 1.0},
        "paper",
    ),
    BenchMethod(
        "dpl-words-bg1-levels-fraction",
        "dpl",
        "paper DPL, word softmax, background weight 1, both levels, fraction thresholds",
        {**_WORDS, **_LEVELS, **_FRACTION, "lambda_bg": 1.0},
        "paper",
    ),
    BenchMethod(
        "dpl-dj-bg1-levels-fraction",
        "dpl",
        "paper DPL without balancing, background weight 1, both levels, fraction thresholds",
        {**_LEVELS, **_FRACTION, "use_at": False, "lambda_bg": 1.0},
        "paper",
    ),
    BenchMethod(
        "dpl-dj1-bg1-levels",
        "dpl",
        "paper DPL without balancing, disjoint and background weight 1, both levels",
        {**_LEVELS, "use_at": False, "lambda_dj": 1.0, "lambda_bg": 1.0},
        "paper",
    ),
    BenchMethod(
        "dpl-dj1-bg1-levels-fraction",
        "dpl",
        "paper DPL without balancing, disjoint and background weight 1, both levels, fraction"
        " thresholds",
        {**_LEVELS, **_FRACTION, "use_at": False, "lambda_dj": 1.0, "lambda_bg": 1.0},
        "paper",
    ),
    BenchMethod(
        "dpl-others",
        "dpl",
        "DPL (model defaults), each word kept off everything outside its own clusters",
        {"leak_region": "others"},
    ),
    BenchMethod(
        "dpl-others-split",
        "dpl",
        "DPL (model defaults), each word kept off everything outside its own pixels: the"
        " clusters' pixels shared out by cross-attention",
        {"leak_region": "others-split"},
    ),
    BenchMethod(
        "dpl-others-mass",
        "dpl",
        "DPL (model defaults), each word's share of attention mass outside its own clusters as"
        " the background loss",
        {"leak_measure": "mass"},
    ),
    BenchMethod(
        "dpl-split-mass",
        "dpl",
        "DPL (model defaults), each word's share of attention mass outside its own pixels (the"
        " clusters' pixels shared out by cross-attention) as the background loss",
        {"leak_region": "others-split", "leak_measure": "mass"},
    ),
    BenchMethod(
        "dpl-split-mass-nodj",
        "dpl",
        "DPL (model defaults) with dpl-split-mass's background loss and no disjoint-object loss",
        _OWN_MASS,
    ),
    BenchMethod(
        "dpl-own-mass-d05",
        "dpl",
        "dpl-split-mass-nodj with each learned vector kept within half its embedding's norm of"
        " it (max_drift 0.5)",
        {**_OWN_MASS, "max_drift": 0.5},
    ),
    BenchMethod(
        "dpl-own-mass-d10",
        "dpl",
        "dpl-split-mass-nodj with each learned vector kept within its embedding's norm of it"
        " (max_drift 1)",
        {**_OWN_MASS, "max_drift": 1.0},
    ),
    BenchMethod(
        "dpl-plain-target",
        "dpl",
        "DPL (model defaults); the edit's target prompt reads the vocabulary's word vectors, not"
        " the learned ones (target_tokens plain)",
        {},
        edit_switches={"target_tokens": "plain"},
    ),
    BenchMethod(
        "nti-fast",
        "nti",
        "null-text inversion with 5 inner steps at twice the learning rate (speed option)",
        null_switches=_FAST_NULL,
    ),
    BenchMethod(
        "dpl-fast",
        "dpl",
        "DPL (model defaults) with the fast null text and token updates stopped when the loss"
        " rises (speed options)",
        {"stop_on_rise": True},
        null_switches=_FAST_NULL,
    ),
    BenchMethod(
        "dpl-rise",
        "dpl",
        "DPL (model defaults), token updates stopped when the loss rises (speed option)",
        {"stop_on_rise": True},
    ),
    BenchMethod(
        "dpl-plateau",
        "dpl",
        "DPL (model defaults), a step's token updates end once one lowers the loss by under"
        " 0.01% of it, vectors learned at every step (speed option)",
        {"plateau_tol": 1e-4, "learn_until": 1.0},
    ),
    BenchMethod(
        "dpl-full",
        "dpl",
        "DPL (model defaults) without the stopping rules: every step runs its token updates"
        " until the thresholds or the cap (the bundled models' default before learn_until)",
        {"plateau_tol": None, "learn_until": 1.0},
    ),
    BenchMethod(
        "dpl-others-words",
        "dpl",
        "DPL (model defaults), leakage region outside own clusters, word softmax, balancing on",
        {"leak_region": "others", **_WORDS, "use_at": True},
    ),
    BenchMethod(
        "dpl-words-fraction-res8",
        "dpl",
        "paper DPL, word softmax, fraction thresholds, losses on 8x8",
        {**_WORDS, **_FRACTION, **_COARSE},
        "paper",
    ),
)
_EARLY = (
    ("dpl-early25", 0.25, "quarter"),
    ("dpl-early", 0.5, "half"),
    ("dpl-early75", 0.75, "three quarters"),
)
"""The speed rows that stop learning the word vectors part-way (`learn_until`), with plateau;
`dpl-early75`'s settings are the bundled models' DPL defaults since it passed both test splits."""
_TABLE += tuple(
    BenchMethod(
        name,
        "dpl",
        f"dpl-plateau whose word vectors are learned in the first {part} of the steps only"
        f" (learn_until {until}; speed option)",
        {"plateau_tol": 1e-4, "learn_until": until},
    )
    for name, until, part in _EARLY
)
_DRIFTS = (("dpl-drift025", 0.25), ("dpl-drift035", 0.35), ("dpl-drift075", 0.75))
"""The radius sweep around the default's `max_drift` 0.5: a smaller radius keeps the learned
vectors closer to the vocabulary (edits like NTI's), a larger one lets the maps move further."""
_TABLE += tuple(
    BenchMethod(
        name,
        "dpl",
        f"DPL (model defaults) with each learned vector kept within {radius} x its embedding's"
        " norm of it (max_drift sweep)",
        {"max_drift": radius},
    )
    for name, radius in _DRIFTS
)
_EDIT_SWEEP = (
    ("c04", "cross-attention injected for 40% of the steps", {"cross_replace_steps": 0.4}),
    ("c06", "cross-attention injected for 60% of the steps", {"cross_replace_steps": 0.6}),
    ("s02", "self-attention injected for 20% of the steps", {"self_replace_steps": 0.2}),
    ("s00", "no self-attention injection", {"self_replace_steps": 0.0}),
    ("b02", "local-blend threshold 0.2", {"blend_threshold": 0.2}),
    ("b05", "local-blend threshold 0.5", {"blend_threshold": 0.5}),
    ("r16", "local-blend mask from the 16x16 maps", {"blend_res": 16}),
    (
        "r16b05",
        "local-blend mask from the 16x16 maps, threshold 0.5",
        {"blend_res": 16, "blend_threshold": 0.5},
    ),
)
"""One edit setting moved at a time from the shared P2P settings (and the finer blend mask
with a higher threshold), for NTI and both DPLs alike, so that each method's own best edit
settings are chosen on validation (the rows share each scene's inversion with their method's
default row)."""
_BY_NAME = {m.name: m for m in _TABLE}
_TABLE += tuple(
    replace(
        _BY_NAME[base],
        name=f"{base}-{suffix}",
        description=f"{_BY_NAME[base].description}; {what}",
        edit_switches={**(_BY_NAME[base].edit_switches or {}), **switches},
    )
    for base in ("nti", "dpl", "dpl-paper")
    for suffix, what, switches in _EDIT_SWEEP
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
    guidance: float = InversionSettings.guidance
    cross_replace_steps: float = EditSettings.cross_replace_steps
    self_replace_steps: float = EditSettings.self_replace_steps
    blend: bool = True
    """P2P local blend on the edited object's words: what leaky attention would spoil."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise DplError(f"steps must be at least 1, got {self.steps}")


def resolve_methods(names: Sequence[str]) -> list[BenchMethod]:
    """Look up method names ("all" = every row), refusing unknown ones."""
    if "all" in names:
        names = list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise DplError(f"unknown method '{unknown[0]}' (use {', '.join(METHODS)} or all)")
    if not names:
        raise DplError("no methods to run")
    return [METHODS[n] for n in dict.fromkeys(names)]
