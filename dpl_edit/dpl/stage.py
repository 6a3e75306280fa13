"""Dynamic Prompt Learning's token stage: per-step word vectors learned against attention leakage.

At every denoising step of null-text inversion, before the null text is fitted, the input
embedding of each chosen word is optimised so that its cross-attention map (a) has a strong peak
of its own, (b) does not overlap the other chosen words' maps and (c) stays off the background
(docs/algorithm.md section 4). The vectors of a step start from the previous step's, so the
noisiest step starts from the word's own token embedding and each later step only refines.

Only the vectors are optimised: they replace the token-embedding output at the word's positions
(see `dpl_edit.engine.text`), so the frozen model, its vocabulary and every other word are untouched.
The background mask comes from the DDIM inversion pass (K-means on self-attention, docs/algorithm.md section 3),
from a user's file, or not at all.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dpl_edit.dpl.background import (
    BackgroundEstimate,
    MaskResample,
    background_mask_at,
    estimate_background,
    leak_regions,
    load_mask_png,
    mask_image,
    mask_images,
    share_out_clusters,
)
from dpl_edit.dpl.losses import (
    DplLossConfig,
    LossReport,
    active_losses,
    loss_report,
    loss_terms,
    takes_background,
    usable_masks,
)
from dpl_edit.engine.attention import (
    CrossAttentionStore,
    ForwardStopped,
    Recorder,
    SelfAttentionStore,
    StopAfter,
    attention_levels,
    controlled_attention,
    last_layer,
)
from dpl_edit.engine.model import LoadedModel
from dpl_edit.engine.settings import NullTextSettings
from dpl_edit.engine.text import (
    DynamicTokens,
    bare_word,
    encode_text,
    prompt_tokens,
    word_spans,
    word_token_positions,
)
from dpl_edit.engine.timers import timed
from dpl_edit.errors import DplError

log = logging.getLogger(__name__)

ORIGINAL_NULL_TEXT = NullTextSettings(inner_steps=51, early_stop=None, warm_start=False)
"""The DPL code's null-text stage: 51 steps from the empty prompt's embedding at every step, no
early stop (docs/algorithm.md section 4.6). NTI's warm-started, early-stopped default is cheaper and is what we use
unless asked for this."""


@dataclass(frozen=True)
class BackgroundSettings:
    """How the background mask is estimated (docs/algorithm.md section 3) and brought to the loss's resolution.

    `resample` "majority" keeps the mask's area; "any" reproduces the original code's dilated
    mask (any cell the bicubic shrink leaves non-zero counts as background).
    """

    n_clusters: int = 5
    threshold: float = 0.2
    seed: int = 1
    n_init: int = 10
    resample: MaskResample = "majority"

    def __post_init__(self) -> None:
        """Fail before the inversion starts rather than after its first pass."""
        if self.n_clusters < 1 or self.n_init < 1:
            raise DplError("background estimation needs at least one cluster and one K-means run")
        if not 0.0 <= self.threshold <= 1.0:
            raise DplError(f"the background threshold must be in [0, 1], got {self.threshold}")
        if self.resample not in ("majority", "any"):
            raise DplError(f"unknown mask resampling {self.resample!r}; use 'majority' or 'any'")


def choose_words(model: LoadedModel, prompt: str, words: Sequence[str] | None) -> list[str]:
    """The words that get dynamic tokens: the given ones, else the prompt's object words.

    Object words come from the model folder's list (`dpl_defaults.json`); the original code
    tagged nouns with NLTK, which needs data files and guesses wrong on short captions.
    """
    if words:
        chosen = list(words)
        if len(set(chosen)) != len(chosen):
            raise DplError(f"each dynamic word may be named once, got {chosen}")
        for word in chosen:
            word_token_positions(model.tokenizer, prompt, word)
        return chosen
    objects = set(model.defaults.object_words)
    if not objects:
        raise DplError(
            "this model has no list of object words; name the words to learn with --words"
        )
    chosen = []
    for word, _ in word_spans(model.tokenizer, prompt):
        bare = bare_word(word)
        if bare in objects and bare not in chosen:
            chosen.append(bare)
    if not chosen:
        raise DplError(
            f"the prompt '{prompt}' names none of this model's object words; name the words "
            "to learn with --words"
        )
    return chosen


def word_token_groups(model: LoadedModel, prompt: str, words: Sequence[str]) -> list[list[int]]:
    """Each word's token positions in the prompt (every occurrence, every sub-token).

    The losses sum a word's token maps (`dpl_edit.dpl.word_maps`), so a word split by BPE, or
    written twice, is scored as one object.
    """
    groups = [word_token_positions(model.tokenizer, prompt, word) for word in words]
    seen: set[int] = set()
    for word, group in zip(words, groups, strict=True):
        if seen.intersection(group):
            raise DplError(f"the word '{word}' shares tokens with another dynamic word")
        seen.update(group)
    return groups


def initial_vectors(model: LoadedModel, words: Sequence[str]) -> torch.Tensor:
    """The words' own token-embedding rows, one per sub-token, words in order: [rows, dim].

    This is the row order `DynamicTokens` expects. Kept in float32 whatever the model's dtype,
    so that AdamW's small steps are not lost to half-precision rounding.
    """
    table = model.text_encoder.get_input_embeddings().weight
    ids = [
        model.tokenizer.convert_tokens_to_ids(token)
        for word in words
        for token in model.tokenizer.tokenize(word)
    ]
    return table[ids].detach().float().clone()


def _check_loss_levels(model: LoadedModel, levels: Sequence[int]) -> None:
    """Refuse a loss level where the model has no cross-attention (`--loss-res`), naming the
    ones it has. The model's own levels were checked when it loaded."""
    have = attention_levels(model.unet, cross=True)
    for res in levels:
        if res not in have:
            raise DplError(
                f"this model has no cross-attention at {res}x{res} for DPL's losses; it has "
                f"cross-attention at {', '.join(f'{r}x{r}' for r in have)}"
            )


def default_config(model: LoadedModel) -> DplLossConfig:
    """The DPL settings for `model` when the user gives none: the model folder's chosen ones
    (`dpl` in `dpl_defaults.json`, picked on a validation split), else the paper's."""
    known = {f.name for f in fields(DplLossConfig)}
    chosen = dict(model.defaults.dpl)
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise DplError(f"the model's DPL defaults name unknown settings: {', '.join(unknown)}")
    return DplLossConfig(**chosen)


def loss_levels(model: LoadedModel, config: DplLossConfig) -> tuple[int, ...]:
    """The attention levels DPL's losses read: the configured ones, else the model's
    cross-attention level (where maps are reported, SD's 16x16)."""
    return config.loss_res or (model.defaults.cross_attention_res,)


class TokenStage:
    """The `StepStage` of DPL: updates the word vectors at each step, returns the conditioning.

    Per step: a fresh AdamW (lr 1e-3, weight decay 0.01 by default) over a copy of the previous
    step's vectors; up to `max_inner_steps` times, a conditional-only UNet call on the current
    latent records the cross-attention at the loss resolution with gradient, the losses are
    evaluated, and the loop stops as soon as they are all under their thresholds (or, with
    `stop_on_rise` or `plateau_tol`, as soon as an update raised the total loss, undoing it;
    with `plateau_tol`, also once an update lowered it by less than that fraction), else takes
    one optimiser step. Steps past `learn_until` of the schedule keep the vectors as they are,
    with no UNet call. The original code's vocabulary growing and row restoring is replaced by
    optimising the vectors alone, which is the same update (docs/algorithm.md section 4.7).
    """

    def __init__(
        self,
        model: LoadedModel,
        prompt: str,
        words: Sequence[str],
        groups: Sequence[Sequence[int]],
        bg_masks: Sequence[torch.Tensor | None],
        config: DplLossConfig,
        total_steps: int,
    ) -> None:
        self.model = model
        self.prompt = prompt
        self.words = list(words)
        self.groups = [list(group) for group in groups]
        self.levels = loss_levels(model, config)
        # The last layer the losses read: every loss evaluation stops the UNet call there.
        self.stop_layer = last_layer(model.unet, CrossAttentionStore(self.levels))
        if len(bg_masks) != len(self.levels):
            raise ValueError(f"{len(self.levels)} loss levels but {len(bg_masks)} masks")
        # The masks on the device, or None when any level has none (no background loss).
        self._masks = usable_masks(
            [None if mask is None else mask.to(model.device) for mask in bg_masks]
        )
        self.config = config
        self.total_steps = total_steps
        self.n_prompt_tokens = len(prompt_tokens(model.tokenizer, prompt)) - 2
        self.initial = initial_vectors(model, words).to(model.device)
        self.vectors = self.initial.clone()
        self.steps: list[torch.Tensor] = []
        self.trace: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.unet_evals = 0
        self._warned = False
        # What `_terms` depends on besides its tensors, as the short name of its CUDA graph.
        settings = repr((prompt, self.words, self.groups, self.stop_layer, self.levels, config))
        self._key = hashlib.sha256(settings.encode()).hexdigest()[:12]

    def conditioning(self, vectors: torch.Tensor) -> torch.Tensor:
        """The prompt's text embedding with `vectors` at the words' positions.

        Goes through `DynamicTokens.token_vectors`, the same mapping editing uses, so what is
        learned here is exactly what an edit substitutes.
        """
        tokens = DynamicTokens(self.words, self.groups, vectors[None])
        return encode_text(
            self.model, [self.prompt], tokens.token_vectors(self.model.tokenizer, [self.prompt], 0)
        )

    def losses(self, vectors: torch.Tensor, step: int, t: int, latent: torch.Tensor) -> LossReport:
        """DPL's losses for `vectors` on `latent` at `step`, differentiable w.r.t. `vectors`.

        Text encoding, the UNet call and the losses are one pure call (`_terms`), which a CUDA
        graph can replay; only the judging against the step's thresholds happens outside.
        """
        wants_bg = takes_background(step, self.config, self.total_steps)
        masks = self._masks if wants_bg and self._masks is not None else []
        with_bg = bool(masks)
        out = self.model.predict_pure(
            f"dpl-step:{self._key}:bg={with_bg}",
            self._terms,
            vectors,
            latent,
            self.model.timestep(t),
            *masks,
            label=None,
        )
        terms = dict(zip((*active_losses(self.config, with_bg), "total"), out, strict=True))
        return loss_report(
            terms, step, self.config, self.total_steps, bg_skipped=wants_bg and not with_bg
        )

    def _terms(
        self, vectors: torch.Tensor, latent: torch.Tensor, t: torch.Tensor, *masks: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """`loss_terms`' values for `vectors` on `latent`: a pure function of its tensors
        (the background masks come in as arguments, and everything else it reads is named by
        `_key`), so it can be replayed from a CUDA graph.

        The UNet call stops after the last layer the losses read (`StopAfter`): the losses need
        no noise prediction, and the layers after it change neither the maps nor their gradients.
        """
        context = self.conditioning(vectors)
        store = CrossAttentionStore(self.levels, grad=True)
        stop = StopAfter(self.stop_layer)
        with (
            timed("unet_forward"),
            controlled_attention(self.model.unet, [store, stop]),
            suppress(ForwardStopped),
        ):
            self.model.unet_output(latent, t, context)
        maps = [store.current(res)[0] for res in self.levels]
        with timed("dpl_losses"):
            terms = loss_terms(maps, self.groups, masks or None, self.config, self.n_prompt_tokens)
        return tuple(terms.values())

    def __call__(self, step: int, t: int, latent: torch.Tensor) -> torch.Tensor:
        start, evals_before = time.perf_counter(), self.model.unet_evals
        vectors = torch.nn.Parameter(self.vectors.clone())
        optimizer = torch.optim.AdamW(
            [vectors], lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        first: dict[str, Any] | None = None
        report: LossReport | None = None
        before: tuple[torch.Tensor, LossReport] | None = None
        updates = 0
        learning = step < self.config.learn_until * self.total_steps
        with torch.enable_grad():
            for _ in range(self.config.max_inner_steps if learning else 0):
                report = self.losses(vectors, step, t, latent)
                if first is None:  # as plain numbers: a kept report would keep its graph
                    first = report.as_record()
                self._warn_if_background_skipped(report)
                if report.satisfied:
                    break
                if before is not None and report.numbers["total"] > before[1].numbers["total"]:
                    with torch.no_grad():
                        vectors.copy_(before[0])
                    report, updates = before[1], updates - 1
                    break
                if before is not None and self._plateaued(before[1], report):
                    break
                if self.config.stop_on_rise or self.config.plateau_tol is not None:
                    before = (vectors.detach().clone(), report)
                optimizer.zero_grad()
                with timed("backward"):
                    report.total.backward()
                with timed("optimiser"):
                    optimizer.step()
                    if self.config.max_drift is not None:
                        self._pull_back(vectors)
                updates += 1
        self.vectors = vectors.detach()
        self.steps.append(self.vectors.cpu())
        self.trace.append(
            {
                "inner_steps": updates,
                "stopped_early": report is not None and report.satisfied,
                "first": first,
                "last": None if report is None else report.as_record(),
            }
        )
        with torch.no_grad():
            cond = self.conditioning(self.vectors)
        self.seconds += time.perf_counter() - start
        self.unet_evals += self.model.unet_evals - evals_before
        return cond

    def _plateaued(self, before: LossReport, now: LossReport) -> bool:
        """Did the last update lower the total loss by less than `plateau_tol` of it?"""
        tol = self.config.plateau_tol
        if tol is None:
            return False
        previous = before.numbers["total"]
        return previous - now.numbers["total"] < tol * abs(previous)

    @torch.no_grad()
    def _pull_back(self, vectors: torch.Tensor) -> None:
        """Put every row further than `max_drift` x its own norm from its initial embedding
        back onto that sphere (`DplLossConfig.max_drift`)."""
        offset = vectors - self.initial
        radius = self.config.max_drift * self.initial.norm(dim=-1, keepdim=True)
        scale = (radius / offset.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        vectors.copy_(self.initial + offset * scale)

    def _warn_if_background_skipped(self, report: LossReport) -> None:
        if report.bg_skipped and not self._warned:
            log.warning(
                "no background was found, so DPL's background-leakage loss is skipped; "
                "give a background mask, or turn the background loss off"
            )
            self._warned = True

    def dynamic_tokens(self) -> DynamicTokens:
        """The learned vectors of every step so far, for the inversion: [steps, rows, dim]."""
        return DynamicTokens(self.words, self.groups, torch.stack(self.steps).float())


@dataclass
class DplPlan:
    """DPL's part of an inversion, decided before any UNet call so user errors fail fast.

    `inversion_recorders` are added to the DDIM inversion pass (the self-attention store that
    background estimation needs); `token_stage` then builds the stage from that pass's maps.
    """

    model: LoadedModel
    prompt: str
    words: list[str]
    groups: list[list[int]]
    config: DplLossConfig
    background: BackgroundSettings
    user_mask: torch.Tensor | None
    self_store: SelfAttentionStore | None
    bg_source: str
    masks: dict[str, Image.Image] = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def create(
        cls,
        model: LoadedModel,
        prompt: str,
        words: Sequence[str] | None = None,
        config: DplLossConfig | None = None,
        background: BackgroundSettings | None = None,
        bg_mask: str | Path | None = None,
        no_bg: bool = False,
    ) -> DplPlan:
        """Check the words and the background options, and read a user's mask."""
        config = config or default_config(model)
        background = background or BackgroundSettings()
        if bg_mask is not None and no_bg:
            raise DplError("a background mask and no background loss contradict each other")
        chosen = choose_words(model, prompt, words)
        groups = word_token_groups(model, prompt, chosen)
        levels = loss_levels(model, config)
        _check_loss_levels(model, levels)
        if no_bg:
            config = replace(config, use_bg=False)
        wants_bg = config.use_bg and config.lambda_bg > 0
        if wants_bg and bg_mask is not None and config.leak_region != "background":
            raise DplError(
                f"the leakage region {config.leak_region!r} needs the estimated word clusters; "
                "it cannot be used with a background mask file"
            )
        user_mask, self_store, source = None, None, "off"
        if wants_bg and bg_mask is not None:
            user_mask = load_mask_png(bg_mask, max(levels), background.resample)
            source = "file"
        elif wants_bg:
            self_store = SelfAttentionStore(model.defaults.self_attention_res)
            source = "estimated"
        return cls(model, prompt, chosen, groups, config, background, user_mask, self_store, source)

    @property
    def inversion_recorders(self) -> list[Recorder]:
        return [] if self.self_store is None else [self.self_store]

    def token_stage(self, cross_maps: torch.Tensor, total_steps: int) -> TokenStage:
        """The stage for null-text inversion of `total_steps` steps; `cross_maps`
        [res, res, text_len] are the DDIM inversion's time-averaged cross-attention, which
        labels the K-means clusters."""
        start = time.perf_counter()
        size = self.model.resolution
        levels = loss_levels(self.model, self.config)
        background: torch.Tensor | None = None
        if self.user_mask is not None:
            self.masks = {"background": mask_image(self.user_mask, size)}
            background = self.user_mask
        elif self.self_store is not None:
            estimate = self.estimate(cross_maps)
            if self.config.leak_region == "others-split":
                estimate = share_out_clusters(estimate)
            self.masks = mask_images(estimate, size)
            if estimate.background is None:
                self.bg_source = "estimated: none found"
            background = estimate.background
            if self.config.leak_region != "background":
                background = leak_regions(estimate)
        masks = [
            None if background is None else self._at_resolution(background, res) for res in levels
        ]
        self.seconds = time.perf_counter() - start
        return TokenStage(
            self.model, self.prompt, self.words, self.groups, masks, self.config, total_steps
        )

    def estimate(self, cross_maps: torch.Tensor) -> BackgroundEstimate:
        """The K-means estimate of the words' regions and the background, from the DDIM
        inversion's self-attention (recorded by `inversion_recorders`) and `cross_maps`."""
        if self.self_store is None:
            raise DplError("no background estimate: the background loss is off or uses a file")
        settings = self.background
        return estimate_background(
            self.self_store.average()[0],
            cross_maps,
            self.groups,
            self.words,
            n_clusters=settings.n_clusters,
            threshold=settings.threshold,
            seed=settings.seed,
            n_init=settings.n_init,
        )

    def _at_resolution(self, mask: torch.Tensor, res: int) -> torch.Tensor:
        """`mask` [h, w] or per-word masks [words, h, w] brought to a loss level, with the
        configured resampling."""
        if mask.ndim == 3:
            return torch.stack([self._at_resolution(word_mask, res) for word_mask in mask])
        return background_mask_at(mask, res, self.background.resample)

    def settings(self) -> dict[str, Any]:
        """What the inversion records about DPL's configuration (JSON)."""
        return {
            "words": self.words,
            "token_groups": self.groups,
            "losses": {**asdict(self.config), "loss_res": list(self.config.loss_res)},
            "background": asdict(self.background),
            "background_source": self.bg_source,
        }
