"""Dynamic Prompt Learning's three attention losses and its gradual-optimisation thresholds.

Everything here is a pure function of tensors so it can be tested on synthetic maps; the
per-step loop that feeds it the UNet's cross-attention and updates the dynamic tokens lives
elsewhere. Inputs are cross-attention probabilities `maps` [res, res, text_len] averaged over the
layers and heads at one resolution (softmax over text tokens, SOT at index 0), and word token
groups (see `dpl_edit.dpl.word_maps`). Reference: docs/algorithm.md sections 4.3 and 4.4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Literal

import torch
import torch.nn.functional as F

from dpl_edit.dpl.word_maps import (
    WordTokenGroups,
    check_word_token_groups,
    combine_token_maps,
    word_maps,
)
from dpl_edit.engine.graphs import device_index
from dpl_edit.engine.settings import LEAK_MEASURES, LEAK_REGIONS, LeakMeasure, LeakRegion
from dpl_edit.errors import DplError

GaussianFormula = Literal["ae-quirk", "standard"]
Reduce = Literal["max", "mean"]
SoftmaxTokens = Literal["paper", "words"]
"""Which text positions compete in the balancing loss's sharpened softmax: "paper" is every
position but the first and the last (the authors' code), "words" the prompt's own tokens only
(Attend-and-Excite's convention), which leaves out end-of-text and padding."""
ThresholdIndex = Literal["step", "fraction"]
"""How Eq. 10's thresholds are indexed: by the step number, or by the fraction of the schedule
done, mapped onto a `schedule_steps`-step run (so that 10 steps follow the 50-step schedule)."""

_NORM_EPS = 1e-8
"""Floor for vector norms in cosines, so an all-zero map gives cosine 0 instead of NaN."""


def gaussian_kernel_3x3(sigma: float = 0.5, formula: GaussianFormula = "ae-quirk") -> torch.Tensor:
    """The normalised 3x3 smoothing kernel of the balancing loss.

    "ae-quirk" is what Attend-and-Excite's code (and therefore DPL's) computes: the 1-D weight
    exp(-((x - mu) / (2 sigma))^2) instead of the textbook exp(-(x - mu)^2 / (2 sigma^2)). With
    sigma 0.5 that is [0.2119, 0.5761, 0.2119], much flatter than the textbook
    [0.1065, 0.7870, 0.1065]. The paper's thresholds were tuned with the quirk, so it is the
    default; "standard" is there for users who want the Gaussian the paper names. The kernel is
    float64 and cast to the maps' dtype where it is applied, so it is rounded only once.
    """
    if not sigma > 0:
        raise DplError(f"the smoothing sigma must be positive, got {sigma}")
    offsets = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    if formula == "ae-quirk":
        weights = torch.exp(-((offsets / (2 * sigma)) ** 2))
    elif formula == "standard":
        weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    else:
        raise DplError(f"unknown Gaussian formula {formula!r}; use 'ae-quirk' or 'standard'")
    weights = weights / weights.sum()
    return torch.outer(weights, weights)


def _as_float(maps: torch.Tensor) -> torch.Tensor:
    """Half-precision maps are upcast: a x100 softmax and cosines of 256-dim vectors lose too
    much in fp16/bf16 (the original code always ran this stage in fp32)."""
    return maps.float() if maps.dtype in (torch.float16, torch.bfloat16) else maps


def _smooth(word_maps_: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Reflect-pad and convolve each [res, res] map with an odd square kernel, as A&E does."""
    pad = kernel.shape[-1] // 2
    padded = F.pad(word_maps_[:, None], (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(padded, kernel.to(word_maps_)[None, None])[:, 0]


def balancing_loss(
    maps: torch.Tensor,
    word_token_groups: WordTokenGroups,
    softmax_temp: float = 100.0,
    smooth: bool = True,
    kernel: torch.Tensor | None = None,
    reduce: Reduce = "max",
    softmax_tokens: SoftmaxTokens = "paper",
    n_prompt_tokens: int | None = None,
) -> torch.Tensor:
    """Attention balancing L_at: how far the weakest word is from owning some region outright.

    Following docs/algorithm.md section 4.3: drop SOT (index 0) and the last slot (`text_len - 1`), sharpen with
    a softmax of `softmax_temp` x maps over the remaining tokens at each pixel (with
    `softmax_tokens` "words", over the prompt's `n_prompt_tokens` tokens 1..n only, so that
    end-of-text and padding, which can hold most of the mass, never win), take each word's
    map (sum over its sub-tokens *after* the softmax, i.e. its probability mass; see
    `dpl_edit.dpl.word_maps`), optionally smooth it (`kernel`, default the quirk Gaussian with
    sigma 0.5), and score the word by max(0, 1 - peak). `reduce` "max" (the paper's default)
    returns the worst word's score, "mean" the average. Returns a scalar with grad.
    """
    if not softmax_temp > 0:
        raise DplError(f"the softmax temperature must be positive, got {softmax_temp}")
    if reduce not in ("max", "mean"):
        raise DplError(f"unknown reduction {reduce!r}; use 'max' or 'mean'")
    maps = _as_float(maps)
    if maps.ndim != 3:
        raise ValueError(f"expected maps of shape [res, res, text_len], got {tuple(maps.shape)}")
    text_len = maps.shape[-1]
    check_word_token_groups(word_token_groups, text_len)
    end = _softmax_end(softmax_tokens, n_prompt_tokens, word_token_groups, text_len)
    sharpened = torch.softmax(softmax_temp * maps[:, :, 1:end], dim=-1)
    # Dropping SOT shifts every token index down by one.
    shifted = [[index - 1 for index in group] for group in word_token_groups]
    per_word = combine_token_maps(sharpened, shifted)
    if smooth:
        per_word = _smooth(per_word, gaussian_kernel_3x3() if kernel is None else kernel)
    peaks = per_word.flatten(1).max(dim=1).values
    per_word_loss = torch.clamp(1.0 - peaks, min=0.0)
    return per_word_loss.max() if reduce == "max" else per_word_loss.mean()


def _softmax_end(
    softmax_tokens: SoftmaxTokens,
    n_prompt_tokens: int | None,
    word_token_groups: WordTokenGroups,
    text_len: int,
) -> int:
    """The exclusive end of the positions the balancing softmax runs over (it starts at 1)."""
    if softmax_tokens == "paper":
        return text_len - 1
    if softmax_tokens != "words":
        raise DplError(f"unknown softmax tokens {softmax_tokens!r}; use 'paper' or 'words'")
    if n_prompt_tokens is None:
        raise ValueError("softmax over the prompt's words needs the number of prompt tokens")
    end = 1 + n_prompt_tokens
    if any(index >= end for group in word_token_groups for index in group):
        raise ValueError(f"a word token lies beyond the prompt's {n_prompt_tokens} tokens")
    return min(end, text_len - 1)


def _unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length; rows of (near) zero stay (near) zero, with finite gradients.

    The clamp sits *inside* the square root: sqrt'(0) is infinite, and a zero map (a word that
    gets no attention at all at this resolution) must not turn the token update into NaN.
    """
    norms = torch.sqrt(torch.clamp((vectors**2).sum(dim=-1, keepdim=True), min=_NORM_EPS**2))
    return vectors / norms


def disjoint_loss(maps: torch.Tensor, word_token_groups: WordTokenGroups) -> torch.Tensor:
    """Disjoint-object loss L_dj: mean cosine similarity of the raw word maps over word pairs.

    Raw means the averaged attention probabilities, not re-sharpened or smoothed (section
    4.3c). With one word there is no pair: the original code's mean over an empty set is NaN,
    which never passes a threshold; here it is 0, which always does.
    """
    vectors = word_maps(_as_float(maps), word_token_groups).flatten(1)
    n_words = vectors.shape[0]
    if n_words < 2:
        return vectors.new_zeros(())
    unit = _unit_rows(vectors)
    cosines = unit @ unit.T
    pairs = tuple(i * n_words + j for i in range(n_words) for j in range(i))
    return cosines.flatten().index_select(0, device_index(pairs, vectors.device)).mean()


def background_loss(
    maps: torch.Tensor,
    word_token_groups: WordTokenGroups,
    bg_mask: torch.Tensor | None,
    measure: LeakMeasure = "cosine",
) -> torch.Tensor | None:
    """Background-leakage loss L_bg: mean over words of cosine(raw word map, background mask),
    or with `measure` "mass" the share of the word map's mass inside the mask.

    `bg_mask` is a bool [res, res] map at the maps' resolution (True = background), or one such
    map per word [words, res, res] when each word has its own region to stay out of
    (`leak_region` "others" or "others-split"). Returns None when there is nothing to leak
    into (no mask, or only empty ones): the loss is then undefined rather than 0, and the
    caller decides how to report skipping it.
    """
    if bg_mask is None or not bool(bg_mask.any()):
        return None
    return _leakage(maps, word_token_groups, bg_mask, measure)


def _leakage(
    maps: torch.Tensor,
    word_token_groups: WordTokenGroups,
    bg_mask: torch.Tensor,
    measure: LeakMeasure,
) -> torch.Tensor:
    """`background_loss` for a mask known to mark something (no test of its values)."""
    maps = _as_float(maps)
    if tuple(bg_mask.shape[-2:]) != tuple(maps.shape[:2]):
        raise ValueError(
            f"background mask {tuple(bg_mask.shape)} does not match maps {tuple(maps.shape[:2])}"
        )
    words = word_maps(maps, word_token_groups).flatten(1)
    if bg_mask.ndim == 3 and bg_mask.shape[0] != words.shape[0]:
        raise ValueError(f"{bg_mask.shape[0]} word masks for {words.shape[0]} words")
    masks = bg_mask.reshape(-1, words.shape[1]).to(words)
    if measure == "mass":
        return ((words * masks).sum(dim=1) / words.sum(dim=1).clamp_min(_NORM_EPS)).mean()
    return (_unit_rows(words) * _unit_rows(masks)).sum(dim=1).mean()


@dataclass(frozen=True)
class DplLossConfig:
    """Every knob of DPL's token stage, with the paper's defaults (`DPL.sh`, supp. section D).

    A loss takes part only when its `use_*` flag is on *and* its weight is positive (the
    original code gates the background loss on its weight the same way). The background loss
    also waits until step `bg_start_step` (the original `max_iter_to_alter`). `use_thresholds`
    False is the paper's "w/o gradual optimisation" ablation: every inner step runs.
    `max_inner_steps`, `lr` and `weight_decay` are not used here but by the loop that applies
    the AdamW updates; they live here so one object describes the whole token stage.
    """

    lambda_at: float = 1.0
    lambda_dj: float = 0.05
    lambda_bg: float = 0.05
    alpha_at: float = 25.0
    beta_at: float = 0.3
    alpha_dj: float = 25.0
    beta_dj: float = 0.9
    alpha_bg: float = 50.0
    beta_bg: float = 0.7
    bg_start_step: int = 0
    softmax_temp: float = 100.0
    smooth: bool = True
    smooth_sigma: float = 0.5
    gaussian_formula: GaussianFormula = "ae-quirk"
    at_reduce: Reduce = "max"
    use_at: bool = True
    use_dj: bool = True
    use_bg: bool = True
    use_thresholds: bool = True
    softmax_tokens: SoftmaxTokens = "paper"
    loss_res: tuple[int, ...] = ()
    """Attention level(s) the losses read, as side lengths; empty = the model's cross-attention
    level (the one maps are reported at). With several, each loss is the mean over levels."""
    threshold_index: ThresholdIndex = "step"
    leak_region: LeakRegion = "background"
    leak_measure: LeakMeasure = "cosine"
    schedule_steps: int = 50
    """The run length the thresholds' alphas were tuned for, used by `threshold_index`
    "fraction"."""
    max_inner_steps: int = 21
    stop_on_rise: bool = False
    """End a step's updates as soon as one raises the total loss, keeping the vectors from
    before it. Not in the paper: where the thresholds are out of reach (late steps on the
    bundled model) the updates only oscillate around a plateau, and this saves their cost."""
    plateau_tol: float | None = None
    """End a step's updates as soon as one lowers the total loss by less than this fraction of
    it (an update that raises it is undone, as with `stop_on_rise`). None (the paper) runs until
    the thresholds or `max_inner_steps`. Not in the paper: with the bundled model's default
    loss, after the first few steps 21 updates move the loss by under 0.1%, so nearly all of
    the token stage's UNet passes change nothing (docs/research/speed.md, stopping rules)."""
    learn_until: float = 1.0
    """Fraction of the denoising steps, counted from the first (noisiest), in which the word
    vectors are learned; the later steps keep the last learned vectors and cost no token-stage
    UNet pass. 1.0 (the paper) learns at every step. Not in the paper: the layout that the
    maps describe is settled in the early steps, and on the bundled model the vectors stop
    moving in the second half while updates late in the schedule, where the null text has
    the least room to follow, cost reconstruction (docs/research/speed.md, stopping rules)."""
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_drift: float | None = None
    """Largest distance of a learned vector from its word's own embedding, as a fraction of
    that embedding's norm: after every update a vector further out is pulled back onto that
    sphere. None (the paper) leaves them free. Not in the paper: vectors that carry over 50
    steps of updates end up twice their own norm away, where the word means something else
    to the text encoder, and an edit that changes a neighbouring word then breaks."""

    def __post_init__(self) -> None:
        """Fail at configuration time, naming the option, rather than mid-inversion."""
        for name in ("lambda_at", "lambda_dj", "lambda_bg", "weight_decay"):
            if getattr(self, name) < 0:
                raise DplError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("alpha_at", "alpha_dj", "alpha_bg", "softmax_temp", "smooth_sigma", "lr"):
            if not getattr(self, name) > 0:
                raise DplError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_drift is not None and not self.max_drift > 0:
            raise DplError(f"max_drift must be > 0 (or None), got {self.max_drift}")
        if self.plateau_tol is not None and not 0 <= self.plateau_tol < 1:
            raise DplError(f"plateau_tol must be in [0, 1) (or None), got {self.plateau_tol}")
        if not 0 < self.learn_until <= 1:
            raise DplError(f"learn_until must be in (0, 1], got {self.learn_until}")
        if self.max_inner_steps < 0:
            raise DplError(f"max_inner_steps must be >= 0, got {self.max_inner_steps}")
        if self.gaussian_formula not in ("ae-quirk", "standard"):
            raise DplError(f"unknown Gaussian formula {self.gaussian_formula!r}")
        if self.at_reduce not in ("max", "mean"):
            raise DplError(f"unknown balancing reduction {self.at_reduce!r}")
        if self.softmax_tokens not in ("paper", "words"):
            raise DplError(f"unknown softmax tokens {self.softmax_tokens!r}; use paper or words")
        if self.threshold_index not in ("step", "fraction"):
            raise DplError(
                f"unknown threshold index {self.threshold_index!r}; use step or fraction"
            )
        if self.leak_region not in LEAK_REGIONS:
            raise DplError(
                f"unknown leakage region {self.leak_region!r}; use {', '.join(LEAK_REGIONS)}"
            )
        if self.leak_measure not in LEAK_MEASURES:
            raise DplError(
                f"unknown leak measure {self.leak_measure!r}; use {', '.join(LEAK_MEASURES)}"
            )
        if self.schedule_steps < 1:
            raise DplError(f"schedule_steps must be >= 1, got {self.schedule_steps}")
        if any(int(res) < 1 for res in self.loss_res):
            raise DplError(f"loss_res must be positive side lengths, got {self.loss_res}")
        object.__setattr__(self, "loss_res", tuple(int(res) for res in self.loss_res))


@dataclass(frozen=True)
class Thresholds:
    """Per-loss thresholds at one denoising step (Eq. 10)."""

    at: float
    dj: float
    bg: float


def schedule_index(
    step_index: int, config: DplLossConfig | None = None, total_steps: int | None = None
) -> float:
    """The `i` of Eq. 10 for denoising step `step_index` of `total_steps`.

    With `threshold_index` "step" it is the step itself. With "fraction" it is the same point of
    the schedule on a `schedule_steps`-step run: step 5 of 10 and step 25 of 50 both give 25,
    so a short run tightens its thresholds as far as the paper's 50-step run does.
    """
    config = config or DplLossConfig()
    if config.threshold_index == "step":
        return float(step_index)
    if total_steps is None or total_steps < 1:
        raise ValueError("thresholds indexed by fraction need the run's number of steps")
    return step_index * config.schedule_steps / total_steps


def thresholds(
    step_index: int, config: DplLossConfig | None = None, total_steps: int | None = None
) -> Thresholds:
    """TH_x(i) = beta_x * exp(-i / alpha_x); the background one counts from `bg_start_step`.

    `step_index` 0 is the first (noisiest) denoising step; `i` is `schedule_index` of it. The
    thresholds shrink as denoising proceeds: early, noisy steps accept rough maps, later ones
    demand sharper ones.
    """
    config = config or DplLossConfig()
    i = schedule_index(step_index, config, total_steps)
    return Thresholds(
        at=config.beta_at * math.exp(-i / config.alpha_at),
        dj=config.beta_dj * math.exp(-i / config.alpha_dj),
        bg=config.beta_bg * math.exp(-(i - config.bg_start_step) / config.alpha_bg),
    )


@dataclass(frozen=True)
class LossReport:
    """The losses of one inner step, and whether the token update can stop.

    A loss is None when it does not take part (switched off, zero weight, before
    `bg_start_step`, or no background); `bg_skipped` says the background loss should have taken
    part but had no mask, so the caller can warn. `total` is the weighted sum of the active
    losses and carries the gradient. `thresholds` is None in the no-thresholds ablation.
    """

    at: torch.Tensor | None
    dj: torch.Tensor | None
    bg: torch.Tensor | None
    total: torch.Tensor
    thresholds: Thresholds | None
    bg_skipped: bool

    @cached_property
    def numbers(self) -> dict[str, float]:
        """The active losses and the total as plain numbers, read off the device in one go:
        on a GPU every separate read waits for the device's whole queue."""
        named = {
            name: loss
            for name, loss in (("at", self.at), ("dj", self.dj), ("bg", self.bg))
            if loss is not None
        }
        named["total"] = self.total
        values = torch.stack([loss.detach().float() for loss in named.values()]).tolist()
        return dict(zip(named, values, strict=True))

    @property
    def satisfied(self) -> bool:
        """Every active loss strictly under its threshold (Eq. 10), i.e. the inner loop should
        stop without updating. Without thresholds only when no loss is active at all, since
        there is then nothing to optimise."""
        active = {name: value for name, value in self.numbers.items() if name != "total"}
        if self.thresholds is None:
            return not active
        return all(value < getattr(self.thresholds, name) for name, value in active.items())

    def as_record(self) -> dict[str, float | bool | None]:
        """Plain numbers for the per-step trace written next to an inversion."""
        th = self.thresholds
        return {
            "at": self.numbers.get("at"),
            "dj": self.numbers.get("dj"),
            "bg": self.numbers.get("bg"),
            "total": self.numbers["total"],
            "th_at": None if th is None else th.at,
            "th_dj": None if th is None else th.dj,
            "th_bg": None if th is None else th.bg,
            "satisfied": self.satisfied,
            "bg_skipped": self.bg_skipped,
        }


def takes_background(
    step_index: int, config: DplLossConfig, total_steps: int | None = None
) -> bool:
    """Whether the background loss takes part at this step (on, weighted, past its start)."""
    i = schedule_index(step_index, config, total_steps)
    return config.use_bg and config.lambda_bg > 0 and i >= config.bg_start_step


def active_losses(config: DplLossConfig, with_bg: bool) -> tuple[str, ...]:
    """The names of the losses that take part, in `loss_terms`' order."""
    names = []
    if config.use_at and config.lambda_at > 0:
        names.append("at")
    if config.use_dj and config.lambda_dj > 0:
        names.append("dj")
    if with_bg:
        names.append("bg")
    return tuple(names)


@cache
def _kernel_on(sigma: float, formula: GaussianFormula, device: torch.device) -> torch.Tensor:
    """The smoothing kernel, made once per device (no host copy per evaluation)."""
    return gaussian_kernel_3x3(sigma, formula).to(device)


def loss_terms(
    levels: Sequence[torch.Tensor],
    word_token_groups: WordTokenGroups,
    bg_masks: Sequence[torch.Tensor] | None,
    config: DplLossConfig,
    n_prompt_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """The active losses (`active_losses`, each the mean over the attention `levels`) and their
    weighted "total", last: tensors only, with no test of their values, so that the token step
    can run it inside a CUDA graph. `bg_masks` holds one non-empty mask per level, or is None
    when the background loss does not take part."""
    terms: dict[str, torch.Tensor] = {}
    names = active_losses(config, bg_masks is not None)
    if "at" in names:
        kernel = _kernel_on(config.smooth_sigma, config.gaussian_formula, levels[0].device)
        terms["at"] = torch.stack(
            [
                balancing_loss(
                    level,
                    word_token_groups,
                    softmax_temp=config.softmax_temp,
                    smooth=config.smooth,
                    kernel=kernel,
                    reduce=config.at_reduce,
                    softmax_tokens=config.softmax_tokens,
                    n_prompt_tokens=n_prompt_tokens,
                )
                for level in levels
            ]
        ).mean()
    if "dj" in names:
        terms["dj"] = torch.stack(
            [disjoint_loss(level, word_token_groups) for level in levels]
        ).mean()
    if bg_masks is not None:
        terms["bg"] = torch.stack(
            [
                _leakage(level, word_token_groups, mask, config.leak_measure)
                for level, mask in zip(levels, bg_masks, strict=True)
            ]
        ).mean()
    weights = {"at": config.lambda_at, "dj": config.lambda_dj, "bg": config.lambda_bg}
    total = _as_float(levels[0]).new_zeros(())
    for name in names:
        total = total + weights[name] * terms[name]
    terms["total"] = total
    return terms


def loss_report(
    terms: dict[str, torch.Tensor],
    step_index: int,
    config: DplLossConfig,
    total_steps: int | None = None,
    bg_skipped: bool = False,
) -> LossReport:
    """`loss_terms`' values with the step's thresholds (Eq. 10), which `satisfied` judges."""
    return LossReport(
        at=terms.get("at"),
        dj=terms.get("dj"),
        bg=terms.get("bg"),
        total=terms["total"],
        thresholds=thresholds(step_index, config, total_steps) if config.use_thresholds else None,
        bg_skipped=bg_skipped,
    )


def evaluate_losses(
    maps: torch.Tensor | Sequence[torch.Tensor],
    word_token_groups: WordTokenGroups,
    bg_mask: torch.Tensor | None | Sequence[torch.Tensor | None],
    step_index: int,
    config: DplLossConfig | None = None,
    total_steps: int | None = None,
    n_prompt_tokens: int | None = None,
) -> LossReport:
    """All of DPL's losses at one inner step, their weighted total, and the stopping test.

    `maps` is one level's [res, res, text_len] maps or a list of levels (`loss_res`), each with
    its own background mask in `bg_mask`; a loss is then the mean of its per-level values.
    `total_steps` is needed for thresholds indexed by fraction, `n_prompt_tokens` for the
    word-only balancing softmax. `satisfied` is True when every active loss is strictly under
    its threshold (inactive ones pass), i.e. the inner loop should stop without updating.
    Without thresholds it is True only when no loss is active at all, since there is then
    nothing to optimise. The background loss is skipped (and `bg_skipped` says so) when any
    level's mask is missing or empty.
    """
    config = config or DplLossConfig()
    levels = [maps] if isinstance(maps, torch.Tensor) else list(maps)
    masks = [bg_mask] * len(levels) if not isinstance(bg_mask, Sequence) else list(bg_mask)
    if not levels or len(masks) != len(levels):
        raise ValueError(f"{len(levels)} attention levels but {len(masks)} background masks")
    wants_bg = takes_background(step_index, config, total_steps)
    present = usable_masks(masks) if wants_bg else None  # no mask test when it is not used
    terms = loss_terms(levels, word_token_groups, present, config, n_prompt_tokens)
    return loss_report(
        terms, step_index, config, total_steps, bg_skipped=wants_bg and present is None
    )


def usable_masks(masks: Sequence[torch.Tensor | None]) -> list[torch.Tensor] | None:
    """The masks, if every one exists and marks something; else None (nothing to leak into)."""
    if any(mask is None or not bool(mask.any()) for mask in masks):
        return None
    return [mask for mask in masks if mask is not None]
