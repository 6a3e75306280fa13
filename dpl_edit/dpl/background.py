"""Background estimation for DPL's background-leakage loss, and background masks as PNG files.

The background mask B comes from the inversion pass (docs/algorithm.md section 3): pixels
are clustered by their time-averaged self-attention rows (pixels of one object attend to the
same places), and each cluster is handed to the chosen word whose cross-attention covers it
best, or to the background when no word covers it well. A user may supply B as a PNG instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.cluster import KMeans

from dpl_edit.dpl.word_maps import WordTokenGroups, word_maps
from dpl_edit.errors import DplError

MaskResample = Literal["majority", "any"]

_OFFICIAL_PNG_SIZE = 512
"""The original code saves masks at 512x512 and re-reads them; its "any" downsampling is
reproduced from that size so the dilation matches."""


@dataclass(frozen=True)
class BackgroundEstimate:
    """The outcome of `estimate_background`, at the self-attention resolution r.

    `clusters` [r, r] holds each pixel's K-means cluster id; `cluster_scores` [n_clusters,
    words] the mean normalised cross-attention of each word over each cluster (0 for an empty
    cluster); `cluster_owners` the word that claimed each cluster, None for background.
    `word_masks` has one bool [r, r] mask per word, in `words` order, all False for a word that
    claimed no cluster. `background` is the bool [r, r] union of unclaimed clusters, or None when
    every pixel was claimed (the background loss must then be skipped). `word_scores`
    [words, r, r] are the normalised cross-attention maps the clusters were labelled with
    (`share_out_clusters` reads them).
    """

    words: tuple[str, ...]
    clusters: torch.Tensor
    cluster_scores: torch.Tensor
    cluster_owners: tuple[str | None, ...]
    word_masks: dict[str, torch.Tensor]
    background: torch.Tensor | None
    word_scores: torch.Tensor


def _resize_maps(maps: torch.Tensor, res: int) -> torch.Tensor:
    """Resize [words, rc, rc] maps to [words, res, res].

    An integer upscale repeats pixels, exactly as the original code does (16 -> 32). Otherwise
    shrinking averages areas (no pixel is skipped) and other upscales interpolate bilinearly.
    """
    source = maps.shape[-1]
    if res % source == 0:
        factor = res // source
        return maps.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    mode = "area" if res < source else "bilinear"
    extra = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(maps[:, None], size=(res, res), mode=mode, **extra)[:, 0]


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Per map (m - |min m|) / max m, the original formula that TH = 0.2 was chosen with.

    For attention probabilities (never negative) this is (m - min) / max. A map that is zero
    everywhere gets scores of 0 rather than NaN.
    """
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.abs()[:, None, None]
    high = flat.max(dim=1).values[:, None, None]
    safe_high = torch.where(high > 0, high, torch.ones_like(high))
    return torch.where(high > 0, (maps - low) / safe_high, torch.zeros_like(maps))


def estimate_background(
    self_attn: torch.Tensor,
    cross_maps: torch.Tensor,
    word_token_groups: WordTokenGroups,
    words: Sequence[str],
    n_clusters: int = 5,
    threshold: float = 0.2,
    seed: int = 1,
    n_init: int = 10,
) -> BackgroundEstimate:
    """Cluster pixels by self-attention and label each cluster with a word or as background.

    `self_attn` [N, N] is the inversion-averaged self-attention at resolution r (N = r*r, one
    row per query pixel, in row-major pixel order); `cross_maps` [rc, rc, text_len] the averaged
    cross-attention. `word_token_groups[k]` are the token indices of `words[k]`; multi-token
    words are combined by `dpl_edit.dpl.word_maps`. K-means (`n_init` restarts, `random_state=seed`
    so a rerun gives the same clusters) groups the N rows; each word's map is resized to r x r
    and normalised; a cluster goes to the word with the highest mean score over its pixels if
    that score exceeds `threshold`, otherwise to the background. Same-label clusters merge.
    """
    if self_attn.ndim != 2 or self_attn.shape[0] != self_attn.shape[1]:
        raise ValueError(f"self-attention must be [N, N], got {tuple(self_attn.shape)}")
    res = math.isqrt(self_attn.shape[0])
    if res * res != self_attn.shape[0]:
        raise ValueError(f"self-attention size {self_attn.shape[0]} is not a square resolution")
    if len(words) != len(word_token_groups):
        raise ValueError(f"{len(words)} words but {len(word_token_groups)} token groups")
    if len(set(words)) != len(words):
        raise DplError(f"each dynamic word may be named once, got {list(words)}")
    if not 1 <= n_clusters <= res * res:
        raise DplError(f"the number of clusters must be in 1..{res * res}, got {n_clusters}")
    if n_init < 1:
        raise DplError(f"K-means needs at least one initialisation, got {n_init}")

    features = self_attn.detach().to(device="cpu", dtype=torch.float64).numpy()
    kmeans = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    clusters = torch.from_numpy(kmeans.fit_predict(features).astype(np.int64)).reshape(res, res)

    per_word = word_maps(
        cross_maps.detach().to(device="cpu", dtype=torch.float64), word_token_groups
    )
    normalised = _normalise(_resize_maps(per_word, res)).flatten(1)  # [words, N]
    membership = F.one_hot(clusters.flatten(), n_clusters).T.to(torch.float64)  # [clusters, N]
    sizes = membership.sum(dim=1, keepdim=True).clamp(min=1)
    scores = membership @ normalised.T / sizes  # [clusters, words]

    best_score, best_word = scores.max(dim=1)
    owners = tuple(
        words[int(k)] if float(score) > threshold else None
        for score, k in zip(best_score, best_word, strict=True)
    )

    def union(owner: str | None) -> torch.Tensor:
        ids = torch.tensor([c for c, o in enumerate(owners) if o == owner], dtype=torch.int64)
        return torch.isin(clusters, ids)

    background = union(None)
    return BackgroundEstimate(
        words=tuple(words),
        clusters=clusters,
        cluster_scores=scores.float(),
        cluster_owners=owners,
        word_masks={word: union(word) for word in words},
        background=background if bool(background.any()) else None,
        word_scores=normalised.reshape(len(words), res, res).float(),
    )


def share_out_clusters(estimate: BackgroundEstimate) -> BackgroundEstimate:
    """The estimate with the claimed clusters' pixels shared out between the words.

    K-means often puts two nearby objects into one cluster, which one word claims while the
    other claims none (measured in docs/research/leakage.md, section 5), or gives one word's
    cluster part of another object; the word's own region then holds the other object too, so
    nothing keeps it off that object. Here every pixel of a claimed cluster goes to the word
    whose normalised cross-attention is highest there: the clusters still decide what is
    object and what is background, the words' maps decide which object is whose. Unclaimed
    clusters (the background) stay as they are.
    """
    claimed = torch.isin(
        estimate.clusters,
        torch.tensor([c for c, o in enumerate(estimate.cluster_owners) if o is not None]),
    )
    pick = estimate.word_scores.argmax(dim=0)  # [r, r]
    masks = {word: claimed & (pick == k) for k, word in enumerate(estimate.words)}
    return replace(estimate, word_masks=masks)


def leak_regions(estimate: BackgroundEstimate) -> torch.Tensor | None:
    """Per word, the region its map should stay out of under `leak_region` "others": [words, r, r].

    That is every pixel outside the word's own clusters (the background and the other words'
    objects). A word that claimed no cluster has no known region of its own, so it keeps the
    plain background. None when no word has anything to stay out of.
    """
    background = estimate.background
    if background is None:
        background = torch.zeros_like(estimate.clusters, dtype=torch.bool)
    owned = [estimate.word_masks[word] for word in estimate.words]
    regions = torch.stack([~own if bool(own.any()) else background for own in owned])
    return regions if bool(regions.any()) else None


def background_mask_at(
    mask: torch.Tensor, res: int, mode: MaskResample = "majority"
) -> torch.Tensor:
    """Resample a bool mask [h, w] (True = background) to [res, res] for the loss.

    "majority" (default): a cell is background when at least half of the area it covers is,
    so the mask neither grows nor shrinks on average; integer upscales repeat pixels.
    "any": the original code's behaviour -- the mask drawn at 512 px, shrunk with Pillow's
    bicubic filter, and every cell with any non-zero value kept -- which dilates the
    background by about one cell.
    """
    if mask.ndim != 2:
        raise ValueError(f"expected a [h, w] mask, got {tuple(mask.shape)}")
    if res < 1:
        raise ValueError(f"resolution must be positive, got {res}")
    if mode == "majority":
        area = F.interpolate(mask[None, None].float(), size=(res, res), mode="area")[0, 0]
        return area >= 0.5
    if mode == "any":
        image = Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255)
        if max(mask.shape) < _OFFICIAL_PNG_SIZE:
            size = (_OFFICIAL_PNG_SIZE, _OFFICIAL_PNG_SIZE)
            image = image.resize(size, Image.Resampling.NEAREST)
        shrunk = image.resize((res, res), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(shrunk) > 0)
    raise DplError(f"unknown mask resampling {mode!r}; use 'majority' or 'any'")


def load_mask_png(path: str | Path, res: int, mode: MaskResample = "majority") -> torch.Tensor:
    """Read a user's background mask (white = background) as bool [res, res].

    The mask must be aligned with the input image; it is resized to a square like the image.
    A mask with no background left at `res` is an error rather than a silently skipped loss:
    the user asked for this loss explicitly.
    """
    path = Path(path)
    if not path.is_file():
        raise DplError(f"background mask {path} does not exist")
    try:
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DplError(f"cannot read background mask {path}: {error}") from error
    mask = torch.from_numpy(grey >= 128)
    if not bool(mask.any()):
        raise DplError(f"background mask {path} has no white (background) pixels")
    resampled = background_mask_at(mask, res, mode)
    if not bool(resampled.any()):
        raise DplError(f"background mask {path} leaves no background at {res}x{res}")
    return resampled


def _file_stem(word: str) -> str:
    """A word as a safe file name part: anything but letters, digits, '-' and '_' becomes '_'."""
    return re.sub(r"[^\w-]", "_", word)


def mask_image(mask: torch.Tensor, size: int) -> Image.Image:
    """A bool mask as a black/white (white = True) greyscale image of `size` x `size` pixels."""
    image = Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255)
    return image.resize((size, size), Image.Resampling.NEAREST)


def mask_images(estimate: BackgroundEstimate, size: int) -> dict[str, Image.Image]:
    """`background` (if any) and one `word-<word>` image per word, keyed by file stem.

    Word masks carry a prefix so that a dynamic word called "background" cannot overwrite the
    background mask. The inversion folder stores these images.
    """
    stems = [_file_stem(word) for word in estimate.words]
    if len(set(stems)) != len(stems):
        raise DplError(f"words {list(estimate.words)} do not give distinct file names")
    images = {}
    if estimate.background is not None:
        images["background"] = mask_image(estimate.background, size)
    for word, stem in zip(estimate.words, stems, strict=True):
        images[f"word-{stem}"] = mask_image(estimate.word_masks[word], size)
    return images
