"""Aggregate per-scene benchmark results with bootstrap intervals; write JSON, Markdown, pictures.

Per-scene result dict (the runner fills one per scene; every value may be None when it was not
measured or is undefined, and whole groups may be left out)::

    {
      "id": "scene id",
      "methods": {
        "<method>": {
          "localisation": {"iou_curves": {"<noun>": [IoU at each threshold, ...]}},
          "leakage": {"<noun>": {"outside": share, "other_objects": share, "background": share}},
          "reconstruction": {"psnr": dB},
          "preservation": {"background": {"psnr": dB, "ssim": x},
                           "other_objects": {"psnr": dB, "ssim": x}},
          "edit_fidelity": {"psnr": dB, "ssim": x, "checker_hit": bool},
          "cost": {"seconds": {"<stage>": s, ...}, "unet_evals": n, "peak_memory_mb": mb}
        }
      }
    }

Each method's result becomes one number per metric and scene (`scene_scalars`): per-noun values
are averaged within the scene first (localisation: the mean and the best IoU of each curve;
leakage: each share), every other leaf becomes a dotted name ("preservation.background.psnr",
"cost.seconds.invert") and booleans become 0/1, so "edit_fidelity.checker_hit" aggregates to a
rate. Intervals are percentile bootstraps over *scenes*, not nouns, because nouns of one scene
share an image and an inversion and are not independent samples. With a baseline method, the
paired difference (method − baseline, per scene) gets its own interval: much tighter than
comparing two marginal intervals, and the number that says whether a method beats another.

Aggregate dict::

    {"n_scenes": N, "ci": 0.95, "n_resamples": 2000, "seed": 0, "thresholds": [...],
     "baseline": "<method>" or None,
     "methods": {"<method>": {
         "metrics": {"<dotted name>": {"mean": x, "low": x, "high": x, "n": scenes}},
         "iou_curve": {"mean": [...], "low": [...], "high": [...]} or None,
         "difference": {"<dotted name>": {"mean", "low", "high", "n"}} (non-baseline methods)}}}

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written report; NaN is written as JSON null.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dpl_edit.io.atomic import atomic_write_bytes
from dpl_edit.io.pictures import save_figure
from dpl_edit.metrics import (
    DEFAULT_THRESHOLDS,
    LeakageShares,
    bootstrap_ci,
    normalised_map,
)
from dpl_edit.world import synthetic as world

GROUP_TITLES = {
    "outcome": "Edit outcome (the primary result; no method optimises it)",
    "localisation": "Localisation: IoU of attention maps with object masks (higher is better)",
    "leakage": "Leakage: share of attention mass outside the object (lower is better)",
    "reconstruction": "Reconstruction of the source image",
    "preservation": "Preservation outside the edited object, source against edit",
    "edit_fidelity": "Edit fidelity: edit against the ideal edit, inside old and new masks",
    "cost": "Cost",
}


@dataclass(frozen=True)
class ExampleRow:
    """One row of the example grid: a scene's images and the attention maps to show."""

    scene_id: str
    source: np.ndarray
    ideal: np.ndarray | None
    edits: dict[str, np.ndarray]  # method -> edited image, H×W×3
    attention: dict[str, np.ndarray]  # column label (e.g. "dpl: cat") -> 2-D map, any size


def _number(value: object) -> float:
    return float("nan") if value is None else float(value)


def _flatten(prefix: str, value: object, out: dict[str, float]) -> None:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}", sub, out)
    else:
        out[prefix] = _number(value)


def _nan_reduce(fn: Callable, values: object, axis: int | None = None) -> np.ndarray | float:
    """`np.nanmean`/`np.nanmax` where an all-NaN slice silently gives NaN (metric undefined)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(np.asarray(values, dtype=np.float64), axis=axis)


def _noun_curves(result: Mapping, n_thresholds: int) -> np.ndarray | None:
    """The method's per-noun IoU curves as a nouns × thresholds array, or None."""
    curves = (result.get("localisation") or {}).get("iou_curves")
    if not curves:
        return None
    arr = np.array([[_number(x) for x in c] for c in curves.values()], dtype=np.float64)
    if arr.shape[1] != n_thresholds:
        raise ValueError(f"IoU curves have {arr.shape[1]} points, thresholds {n_thresholds}")
    return arr


def scene_scalars(result: Mapping, n_thresholds: int = len(DEFAULT_THRESHOLDS)) -> dict[str, float]:
    """One method's per-scene result as {dotted metric name: number} (see the module docstring)."""
    out: dict[str, float] = {}
    for group, value in result.items():
        if group == "localisation":
            curves = _noun_curves(result, n_thresholds)
            if curves is not None:
                per_noun_mean = _nan_reduce(np.nanmean, curves, axis=1)
                per_noun_best = _nan_reduce(np.nanmax, curves, axis=1)
                out["localisation.mean_iou"] = float(_nan_reduce(np.nanmean, per_noun_mean))
                out["localisation.best_iou"] = float(_nan_reduce(np.nanmean, per_noun_best))
        elif group == "leakage":
            for part in LeakageShares._fields:
                values = [_number((shares or {}).get(part)) for shares in (value or {}).values()]
                out[f"leakage.{part}"] = float(_nan_reduce(np.nanmean, values))
        else:
            _flatten(group, value, out)
    return out


def _interval(values: Sequence[float], ci: float, n_resamples: int, seed: int) -> dict:
    mean, low, high = bootstrap_ci(values, n_resamples=n_resamples, ci=ci, seed=seed)
    n = int(np.isfinite(np.asarray(values, dtype=np.float64)).sum())
    return {"mean": mean, "low": low, "high": high, "n": n}


def aggregate(
    per_scene: Sequence[Mapping],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    baseline: str | None = None,
    ci: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Means and bootstrap intervals over scenes for every method and metric."""
    n_thr = len(thresholds)
    methods: list[str] = []
    for scene in per_scene:
        methods += [m for m in scene["methods"] if m not in methods]
    if baseline is not None and baseline not in methods:
        raise ValueError(f"baseline '{baseline}' is not one of the methods {methods}")
    # scalars[method][i]: scene i's numbers; a scene without the method contributes NaNs.
    scalars = {
        m: [scene_scalars(s["methods"].get(m, {}), n_thr) for s in per_scene] for m in methods
    }
    names = {m: list(dict.fromkeys(k for row in scalars[m] for k in row)) for m in methods}

    def column(m: str, name: str) -> np.ndarray:
        return np.array([row.get(name, np.nan) for row in scalars[m]], dtype=np.float64)

    def interval(values: np.ndarray) -> dict:
        return _interval(values, ci, n_resamples, seed)

    out_methods: dict[str, dict] = {}
    for m in methods:
        entry: dict = {"metrics": {name: interval(column(m, name)) for name in names[m]}}
        curves = [_noun_curves(s["methods"].get(m, {}), n_thr) for s in per_scene]
        if any(c is not None for c in curves):
            nan_curve = np.full((1, n_thr), np.nan)
            per_thr = np.stack(
                [_nan_reduce(np.nanmean, nan_curve if c is None else c, axis=0) for c in curves]
            )
            bands = [interval(per_thr[:, j]) for j in range(n_thr)]
            entry["iou_curve"] = {k: [b[k] for b in bands] for k in ("mean", "low", "high")}
        else:
            entry["iou_curve"] = None
        if baseline is not None and m != baseline:
            shared = [n for n in names[m] if n in names[baseline]]
            entry["difference"] = {n: interval(column(m, n) - column(baseline, n)) for n in shared}
        out_methods[m] = entry
    return {
        "n_scenes": len(per_scene),
        "ci": ci,
        "n_resamples": n_resamples,
        "seed": seed,
        "thresholds": [float(t) for t in thresholds],
        "baseline": baseline,
        "methods": out_methods,
    }


def _jsonable(value: object) -> object:
    """Plain JSON types: numpy scalars and arrays unwrapped, NaN and infinities as null."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, value: object) -> None:
    """Write `value` as indented JSON, atomically."""
    text = json.dumps(_jsonable(value), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def plot_iou_curves(agg: Mapping, path: Path) -> None:
    """IoU against threshold per method: mean over scenes with its confidence band."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    thresholds = agg["thresholds"]
    for method, entry in agg["methods"].items():
        curve = entry["iou_curve"]
        if curve is None:
            continue
        (line,) = ax.plot(thresholds, curve["mean"], label=method)
        ax.fill_between(thresholds, curve["low"], curve["high"], color=line.get_color(), alpha=0.2)
    ax.set(xlabel="threshold τ", ylabel="IoU with object mask", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(f"Attention localisation ({agg['n_scenes']} scenes, {agg['ci']:.0%} CI)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, dpi=120, bbox_inches="tight")


def plot_leakage(agg: Mapping, path: Path) -> None:
    """Grouped bars per method: attention mass on other objects and on the background."""
    methods = list(agg["methods"])
    fig = Figure(figsize=(max(4.0, 1.2 * len(methods) + 2), 4))
    ax = fig.add_subplot()
    x = np.arange(len(methods))
    width = 0.38
    for i, part in enumerate(("other_objects", "background")):
        stats = [agg["methods"][m]["metrics"].get(f"leakage.{part}") for m in methods]
        mean = np.array([_number(s and s["mean"]) for s in stats])
        low = np.array([_number(s and s["low"]) for s in stats])
        high = np.array([_number(s and s["high"]) for s in stats])
        ax.bar(
            x + (i - 0.5) * width,
            mean,
            width,
            yerr=np.stack([mean - low, high - mean]),
            capsize=3,
            label=f"on {part.replace('_', ' ')}",
        )
    ax.set_xticks(x, methods)
    ax.set(ylabel="share of attention mass", ylim=(0, 1))
    ax.set_title(f"Attention leakage ({agg['ci']:.0%} CI)")
    ax.legend()
    save_figure(fig, path, dpi=120, bbox_inches="tight")


def plot_example_grid(rows: Sequence[ExampleRow], path: Path) -> None:
    """Rows = scenes; columns = source | ideal | each method's edit | attention maps.

    Attention maps are drawn as the protocol's normalised map over the greyed source, so one
    sees which object each word attends to. All rows must have the same methods and maps.
    """
    if not rows:
        raise ValueError("no example rows")
    methods, maps = list(rows[0].edits), list(rows[0].attention)
    for row in rows:
        if list(row.edits) != methods or list(row.attention) != maps:
            raise ValueError(f"row {row.scene_id} has other columns than row {rows[0].scene_id}")
    titles = ["source", "ideal", *methods, *maps]
    fig = Figure(figsize=(1.6 * len(titles), 1.7 * len(rows)))
    axes = fig.subplots(len(rows), len(titles), squeeze=False)
    for r, row in enumerate(rows):
        grey = row.source.mean(axis=2) if row.source.ndim == 3 else row.source
        # (image, attention map drawn over it) per column
        cells = [(row.source, None), (row.ideal, None)]
        cells += [(row.edits[m], None) for m in methods]
        cells += [(grey, row.attention[k]) for k in maps]
        for c, (image, attn) in enumerate(cells):
            ax = axes[r, c]
            if image is None:
                ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
            if attn is not None:
                overlay = normalised_map(attn, image.shape[:2])
                ax.imshow(overlay, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
        axes[r, 0].set_ylabel(row.scene_id, fontsize=8)
    save_figure(fig, path, dpi=120, bbox_inches="tight")


def _cell(stats: Mapping | None, n_scenes: int) -> str:
    """ "mean [low, high]", all three with the decimals the largest of them needs."""
    if stats is None:
        return "–"
    values = [_number(stats[k]) for k in ("mean", "low", "high")]
    if not math.isfinite(values[0]):
        return "–"
    scale = max(abs(v) for v in values if math.isfinite(v))
    digits = 0 if scale >= 100 else 1 if scale >= 10 else 3
    mean, low, high = (f"{v:.{digits}f}" if math.isfinite(v) else "–" for v in values)
    text = f"{mean} [{low}, {high}]"
    return text if stats["n"] >= n_scenes else f"{text} (n={stats['n']})"


def _table(
    agg: Mapping, key: str, columns: Sequence[str], names: Sequence[str], label: Callable
) -> list[str]:
    """Markdown table: one row per metric (named by `label`), one column per method."""
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in names:
        row = [_cell(agg["methods"][m].get(key, {}).get(name), agg["n_scenes"]) for m in columns]
        lines.append(f"| {label(name)} | " + " | ".join(row) + " |")
    return lines


def _group(name: str) -> str:
    return name.split(".", 1)[0]


def _in_group(name: str) -> str:
    return name.split(".", 1)[-1]


def markdown_report(
    agg: Mapping, title: str, preamble: Sequence[str] = (), pictures: Sequence[str] = ()
) -> str:
    """The report as Markdown: tables of mean [low, high] per metric group, then pictures."""
    methods = list(agg["methods"])
    names = list(dict.fromkeys(n for m in methods for n in agg["methods"][m]["metrics"]))
    lines = [f"# {title}", ""]
    if preamble:
        lines += [*preamble, ""]
    lines += [
        f"{agg['n_scenes']} scenes. Cells are mean [low, high]: {agg['ci']:.0%} percentile-"
        f"bootstrap intervals over scenes ({agg['n_resamples']} resamples, seed {agg['seed']});"
        " per-noun values are averaged within each scene first; (n=k) marks metrics defined on"
        " fewer scenes.",
    ]
    groups = list(dict.fromkeys(map(_group, names)))
    groups.sort(
        key=lambda g: list(GROUP_TITLES).index(g) if g in GROUP_TITLES else len(GROUP_TITLES)
    )
    for group in groups:
        if group == "outcome":
            lines += outcome_tables(agg)
        in_group = [n for n in names if _group(n) == group]
        lines += ["", f"## {GROUP_TITLES.get(group, group)}", ""]
        lines += _table(agg, "metrics", methods, in_group, _in_group)
    baseline = agg["baseline"]
    others = [m for m in methods if m != baseline]
    if baseline is not None and others:
        lines += ["", f"## Paired difference from {baseline} (method − {baseline}, per scene)", ""]
        diff_names = [n for n in names if any(n in agg["methods"][m]["difference"] for m in others)]
        lines += _table(agg, "difference", others, diff_names, str)
    if pictures:
        lines += ["", "## Pictures", ""]
        lines += [f"![{Path(p).stem.replace('_', ' ')}]({p})\n" for p in pictures]
    return "\n".join(lines).rstrip() + "\n"


CATEGORY_METRICS = (
    "outcome.selective_success",
    "outcome.target_made",
    "outcome.others_kept",
    "outcome.background_kept",
    "outcome.others_psnr",
    "leakage.outside",
    "leakage.background",
    "leakage.other_objects",
    "localisation.best_iou",
    "reconstruction.psnr",
    "preservation.background.psnr",
    "preservation.other_objects.psnr",
    "edit_fidelity.checker_hit",
)
"""The metrics a per-category section shows (the full tables cover every metric overall)."""


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test of paired yes/no outcomes: the p-value of `wins` against
    `losses` among the discordant pairs (1.0 when there are none)."""
    from scipy.stats import binomtest

    n = wins + losses
    return 1.0 if n == 0 else float(binomtest(wins, n, 0.5).pvalue)


def outcome_counts(per_scene: Sequence[Mapping], baseline: str | None) -> dict[str, dict]:
    """Per method: selective successes, failures by class and, against `baseline`, the
    discordant pairs (scenes only the method edits selectively, only the baseline does) with
    the exact sign test's p-value."""
    methods = list(dict.fromkeys(m for s in per_scene for m in s["methods"]))
    out: dict[str, dict] = {}
    for m in methods:
        outcomes = [(s["methods"].get(m) or {}).get("outcome") for s in per_scene]
        judged = [o for o in outcomes if o]
        failures: dict[str, int] = {}
        for o in judged:
            for name, hit in o["failure"].items():
                failures[name] = failures.get(name, 0) + bool(hit)
        entry = {
            "n": len(judged),
            "successes": sum(bool(o["selective_success"]) for o in judged),
            "failures": failures,
        }
        if baseline is not None and m != baseline:
            wins = losses = 0
            for s in per_scene:
                a = (s["methods"].get(m) or {}).get("outcome")
                b = (s["methods"].get(baseline) or {}).get("outcome")
                if a and b and a["selective_success"] != b["selective_success"]:
                    wins += bool(a["selective_success"])
                    losses += bool(b["selective_success"])
            entry.update(only_method=wins, only_baseline=losses, sign_p=sign_test(wins, losses))
        out[m] = entry
    return out


def outcome_tables(agg: Mapping, level: int = 2) -> list[str]:
    """Markdown: selective success per method (with the paired difference, the discordant
    pairs and the sign test against the baseline) and the failure classes, under a heading of
    `level` (deeper inside a per-category section)."""
    counts = agg.get("outcome_counts")
    if not counts or not any(c["n"] for c in counts.values()):
        return []
    baseline = agg["baseline"]
    title = "Selective success: target made, other objects kept, background kept"
    lines = ["", f"{'#' * level} {title}", ""]
    head = "| method | successes | rate [95% CI] |"
    rule = "|---|---|---|"
    if baseline is not None:
        head += f" − {baseline} [95% CI] | only this / only {baseline} | sign test p |"
        rule += "---|---|---|"
    lines += [head, rule]
    for m, c in counts.items():
        stats = agg["methods"][m]["metrics"].get("outcome.selective_success")
        row = f"| {m} | {c['successes']}/{c['n']} | {_cell(stats, agg['n_scenes'])} |"
        if baseline is not None:
            if m == baseline:
                row += " – | – | – |"
            else:
                diff = agg["methods"][m]["difference"].get("outcome.selective_success")
                row += (
                    f" {_cell(diff, agg['n_scenes'])} | {c['only_method']} / {c['only_baseline']}"
                )
                row += f" | {c['sign_p']:.3f} |"
        lines.append(row)
    classes = list(dict.fromkeys(k for c in counts.values() for k in c["failures"]))
    lines += ["", "Failures by class (scenes; each failed scene has exactly one class):", ""]
    lines += ["| class | " + " | ".join(counts) + " |", "|---" * (len(counts) + 1) + "|"]
    for name in classes:
        cells = [str(c["failures"].get(name, 0)) for c in counts.values()]
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return lines


LEAKAGE_GROUP = "leakage-prone (" + ", ".join(world.LEAKAGE_CATEGORIES) + ")"
"""The pooled section of the categories where leaky maps should make edits fail."""


def _group_aggregate(
    scenes: Sequence[Mapping], thresholds: Sequence[float], baseline: str | None
) -> dict:
    """`aggregate` with the outcome counts, against `baseline` where every scene ran it."""
    ran = {m for s in scenes for m in s["methods"]}
    chosen = baseline if baseline in ran else None
    out = aggregate(scenes, thresholds, chosen)
    out["outcome_counts"] = outcome_counts(scenes, chosen)
    return out


def category_aggregates(
    per_scene: Sequence[Mapping], thresholds: Sequence[float], baseline: str | None
) -> dict[str, dict]:
    """`aggregate` of each scene category, when the scenes come in more than one, and of the
    leakage-prone categories pooled (`LEAKAGE_GROUP`), when more than one of them is there."""
    categories = list(dict.fromkeys(str(s.get("category", "")) for s in per_scene))
    if len(categories) < 2:
        return {}
    out = {}
    for category in categories:
        scenes = [s for s in per_scene if s.get("category", "") == category]
        out[category] = _group_aggregate(scenes, thresholds, baseline)
    prone = [c for c in categories if c in world.LEAKAGE_CATEGORIES]
    if len(prone) > 1:
        scenes = [s for s in per_scene if s.get("category", "") in prone]
        out[LEAKAGE_GROUP] = _group_aggregate(scenes, thresholds, baseline)
    return out


def category_report(by_category: Mapping[str, Mapping]) -> str:
    """Markdown: per category, the key metrics per method and the paired differences."""
    lines = ["", "## Per scene category", ""]
    for category, agg in by_category.items():
        methods = list(agg["methods"])
        lines += ["", f"### {category or 'uncategorised'} ({agg['n_scenes']} scenes)"]
        lines += outcome_tables(agg, level=4)
        lines += [""]
        lines += _table(agg, "metrics", methods, CATEGORY_METRICS, str)
        others = [m for m in methods if m != agg["baseline"]]
        if agg["baseline"] is not None and others:
            lines += ["", f"Paired difference from {agg['baseline']}:", ""]
            lines += _table(agg, "difference", others, CATEGORY_METRICS, str)
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: Path,
    per_scene: Sequence[Mapping],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    baseline: str | None = None,
    title: str = "Leakage benchmark",
    preamble: Sequence[str] = (),
    examples: Sequence[ExampleRow] = (),
    failures: Sequence[ExampleRow] = (),
) -> dict:
    """Write per_scene.json, aggregate.json, report.md and the pictures; return the aggregate.

    `failures` rows become `failures.png`, the gallery of typical failures of each class."""
    out_dir = Path(out_dir)
    agg = aggregate(per_scene, thresholds, baseline=baseline)
    agg["outcome_counts"] = outcome_counts(per_scene, baseline)
    by_category = category_aggregates(per_scene, thresholds, baseline)
    if by_category:
        agg["categories"] = by_category
    write_json(out_dir / "per_scene.json", list(per_scene))
    write_json(out_dir / "aggregate.json", agg)
    plot_iou_curves(agg, out_dir / "iou_curves.png")
    plot_leakage(agg, out_dir / "leakage.png")
    pictures = ["iou_curves.png", "leakage.png"]
    if examples:
        plot_example_grid(examples, out_dir / "examples.png")
        pictures.append("examples.png")
    if failures:
        plot_example_grid(failures, out_dir / "failures.png")
        pictures.append("failures.png")
    text = markdown_report(agg, title, preamble, pictures)
    if by_category:
        text += category_report(by_category)
    atomic_write_bytes(out_dir / "report.md", text.encode("utf-8"))
    return agg
