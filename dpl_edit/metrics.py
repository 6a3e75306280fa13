"""Benchmark metrics: attention localisation and leakage, image fidelity, bootstrap intervals.

Localisation follows the DPL paper's protocol (docs/algorithm.md section 6): a noun's
time-averaged cross-attention map is normalised by its max, resized to the mask size,
normalised by its max again and thresholded at τ; the IoU with the object mask is swept over τ.
The resize is **bilinear** (half-pixel centres, as PIL and OpenCV resize, antialiased when
shrinking): the reference code resizes an 8-bit image, and nearest-neighbour upsampling would
turn a 16×16 map into blocks whose edges sit on the grid rather than near the object's edge.
A pixel counts as attended when its value is ``>= τ``, so at τ = 0 everything is predicted (IoU
= the object's area share: the "predict everything" baseline) and at τ = 1 only the peak is.

Leakage needs no threshold: it is the share of the map's mass (after the same resize, which
keeps it non-negative) that falls outside the object, split into the part on the other objects
and the part on the background.

Image metrics take two images of the same shape and dtype, H×W or H×W×C, uint8 (peak 255) or
float (peak 1.0), and an optional H×W region mask. Undefined values (an empty region, a map with
no mass, an empty union) are NaN, never an exception, so one odd scene cannot stop a benchmark;
`bootstrap_ci` skips NaNs. Malformed arguments are programming errors and raise ValueError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_THRESHOLDS = np.linspace(0.0, 1.0, 21)

IOU_DEFINITION = (
    "attention IoU: a word's time-averaged cross-attention map is normalised by its maximum, "
    "resized bilinearly to the mask's size, normalised again and cut at thresholds 0, 0.05, "
    "..., 1; best IoU is the highest IoU with the object's mask over those thresholds"
)
LEAKAGE_DEFINITION = (
    "leakage: the share of the resized map's mass outside the object (on other objects and "
    "on the background)"
)
PSNR_DEFINITION = "PSNR: of 8-bit pictures, 10 log10(255^2 / MSE), capped at 100 dB"
DEFINITIONS = (IOU_DEFINITION, LEAKAGE_DEFINITION, PSNR_DEFINITION)
"""How the numbers are defined, in words: the benchmark report and the model card both state
these, because both compute with this module."""

# SSIM constants from Wang et al. (2004), the values every reference implementation uses.
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # 11-tap window
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


class LeakageShares(NamedTuple):
    """Shares of a map's mass; `other_objects + background == outside`."""

    outside: float
    other_objects: float
    background: float


def _check_map(attn_map: np.ndarray | torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(attn_map).detach().to(device="cpu", dtype=torch.float64)
    if m.ndim != 2:
        raise ValueError(f"attention map must be 2-D, got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all() or (m < 0).any():
        raise ValueError("attention map must be finite and non-negative")
    return m


def _check_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(f"{name} must be a 2-D bool array, got {mask.dtype} {mask.shape}")
    return mask


def resize_map(attn_map: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a non-negative 2-D map to `shape` (H, W); the result stays non-negative."""
    m = _check_map(attn_map)
    if tuple(m.shape) != tuple(shape):
        m = F.interpolate(
            m[None, None], size=tuple(shape), mode="bilinear", align_corners=False, antialias=True
        )[0, 0]
    return m.clamp_min(0.0).numpy()


def _max_normalised(m: np.ndarray) -> np.ndarray:
    peak = m.max()
    return m / peak if peak > 0 else np.zeros_like(m)


def normalised_map(attn_map: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """The protocol's map: normalise by max, resize to `shape`, normalise by max again."""
    return _max_normalised(resize_map(_max_normalised(_check_map(attn_map).numpy()), shape))


def iou_curve(
    attn_map: np.ndarray | torch.Tensor,
    mask: np.ndarray,
    thresholds: np.ndarray = DEFAULT_THRESHOLDS,
) -> np.ndarray:
    """IoU of the thresholded, normalised map with `mask`, one value per threshold.

    NaN where both the prediction and the mask are empty (IoU is undefined there).
    """
    mask = _check_mask(mask)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.ndim != 1:
        raise ValueError("thresholds must be 1-D")
    m = normalised_map(attn_map, mask.shape)
    pred = m[None] >= thresholds[:, None, None]
    inter = (pred & mask).sum(axis=(1, 2))
    union = (pred | mask).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def best_iou(
    attn_map: np.ndarray | torch.Tensor,
    mask: np.ndarray,
    thresholds: np.ndarray = DEFAULT_THRESHOLDS,
) -> float:
    """Highest IoU over the thresholds: how well the map localises with the best cut-off."""
    curve = iou_curve(attn_map, mask, thresholds)
    return float(np.nanmax(curve)) if np.isfinite(curve).any() else float("nan")


def leakage(
    attn_map: np.ndarray | torch.Tensor,
    object_mask: np.ndarray,
    other_objects_mask: np.ndarray,
    background_mask: np.ndarray,
) -> LeakageShares:
    """Shares of the map's mass outside the object, on other objects and on the background.

    The three masks must cover the image and the other objects must not overlap the background;
    a pixel on both the object and another object counts as the object's (it is not leakage).
    All shares are NaN for a map with no mass.
    """
    obj = _check_mask(object_mask, "object_mask")
    other = _check_mask(other_objects_mask, "other_objects_mask")
    bg = _check_mask(background_mask, "background_mask")
    if not obj.shape == other.shape == bg.shape:
        raise ValueError(f"mask shapes differ: {obj.shape}, {other.shape}, {bg.shape}")
    if (other & bg).any():
        raise ValueError("other_objects_mask and background_mask overlap")
    if not (obj | other | bg).all():
        raise ValueError("object, other-object and background masks do not cover the image")
    m = resize_map(attn_map, obj.shape)
    total = m.sum()
    if total <= 0:
        return LeakageShares(float("nan"), float("nan"), float("nan"))
    outside = ~obj
    on_other = m[outside & other].sum() / total
    on_bg = m[outside & bg].sum() / total
    return LeakageShares(float(on_other + on_bg), float(on_other), float(on_bg))


def object_localisation(
    attn_map: np.ndarray | torch.Tensor, masks: Mapping[str, np.ndarray], name: str
) -> tuple[float, float]:
    """(best IoU, leakage outside the object) of the map of object `name` among `masks`.

    The other objects are the other masks and the background is every pixel on no object, as
    the benchmark counts them. The quality gate and training's progress checks use this, so the
    model card's numbers are the benchmark's.
    """
    mask = _check_mask(masks[name], name)
    others = np.zeros_like(mask)
    for other, other_mask in masks.items():
        if other != name:
            others |= _check_mask(other_mask, other)
    background = ~(mask | others)
    return best_iou(attn_map, mask), leakage(attn_map, mask, others & ~mask, background).outside


def _check_images(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray | None, max_val: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """Validate a pair of images; return them as float64 with their mask and peak value."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"images differ: {a.dtype} {a.shape} vs {b.dtype} {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"images must be H×W or H×W×C, got shape {a.shape}")
    if a.dtype != np.uint8 and not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float, got {a.dtype}")
    if mask is not None:
        mask = _check_mask(mask)
        if mask.shape != a.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match image {a.shape[:2]}")
    if max_val is None:
        max_val = 255.0 if a.dtype == np.uint8 else 1.0
    return a.astype(np.float64), b.astype(np.float64), mask, float(max_val)


def psnr(
    a: np.ndarray,
    b: np.ndarray,
    mask: np.ndarray | None = None,
    max_val: float | None = None,
    cap: float = 100.0,
) -> float:
    """PSNR in dB over the pixels in `mask` (all pixels when None), all channels.

    `max_val` defaults to 255 for uint8 and 1.0 for float images. Identical regions would give
    infinity, which breaks means and confidence intervals, so the value is capped at `cap`
    (100 dB is far above any real difference: an 8-bit image off by one level in a single pixel
    of 512×512 scores about 102 dB). NaN for an empty mask.
    """
    a, b, mask, max_val = _check_images(a, b, mask, max_val)
    diff = (a - b) ** 2
    if mask is not None:
        diff = diff[mask]
    if diff.size == 0:
        return float("nan")
    mse = diff.mean()
    if mse == 0:
        return float(cap)
    return float(min(cap, 10.0 * np.log10(max_val**2 / mse)))


def _gaussian_blur(x: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur over the first two axes, mirror-padded to keep the size.

    Mirroring (edge pixel repeated, like scipy's 'reflect') lets SSIM be computed for every
    pixel, so a mask touching the border still has values to average.
    """
    taps = np.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2 * _SSIM_SIGMA**2))
    kernel /= kernel.sum()
    r = _SSIM_RADIUS
    pad = [(r, r), (r, r)] + [(0, 0)] * (x.ndim - 2)
    xp = np.pad(x, pad, mode="symmetric")
    h, w = x.shape[:2]
    rows = sum(k * xp[i : i + h] for i, k in enumerate(kernel))
    return sum(k * rows[:, i : i + w] for i, k in enumerate(kernel))


def ssim(
    a: np.ndarray,
    b: np.ndarray,
    mask: np.ndarray | None = None,
    max_val: float | None = None,
) -> float:
    """Mean SSIM (Wang et al. 2004) over the pixels in `mask`, all channels.

    The SSIM map is computed on the full image (11-tap Gaussian window, σ = 1.5, K1 = 0.01,
    K2 = 0.03, population statistics as in the paper) and only then averaged inside the mask:
    cropping first would let the region's outline change the statistics. Each channel is
    treated as a grey image. NaN for an empty mask.
    """
    a, b, mask, max_val = _check_images(a, b, mask, max_val)
    c1, c2 = (_SSIM_K1 * max_val) ** 2, (_SSIM_K2 * max_val) ** 2
    mu_a, mu_b = _gaussian_blur(a), _gaussian_blur(b)
    var_a = _gaussian_blur(a * a) - mu_a**2
    var_b = _gaussian_blur(b * b) - mu_b**2
    cov = _gaussian_blur(a * b) - mu_a * mu_b
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    if mask is not None:
        smap = smap[mask]
    return float(smap.mean()) if smap.size else float("nan")


def bootstrap_ci(
    values: np.ndarray | list[float],
    n_resamples: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean: (mean, low, high).

    NaNs are dropped (a metric undefined for a scene does not count); no values give NaNs and a
    single value gives a zero-width interval. A fixed `seed` makes reports reproducible.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_resamples, v.size))].mean(axis=1)
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(low), float(high)
