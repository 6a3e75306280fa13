"""The speed benchmark's profile: every part is found and the parts fit inside the total."""

from __future__ import annotations

from conftest import tiny_image

from dpl_edit.bench import speed
from dpl_edit.dpl.losses import DplLossConfig


def test_profile_splits_a_dpl_inversion_into_parts_that_fit_its_total(tiny_model):
    config = DplLossConfig(max_inner_steps=2, use_thresholds=False)
    parts = speed.profile_inversion(
        tiny_model, tiny_image(), "a cat and a dog", 2, ["cat", "dog"], config
    )
    total = parts["total"]
    for part in ("unet forward", "backward", "optimiser steps", "DPL losses", "text encoding"):
        assert 0 < parts[part] < total, part
    assert 0 < parts["attention hooks (inside forward)"] <= parts["unet forward"]
    assert sum(parts[p] for p in speed.DISJOINT_PARTS) <= total
    assert parts["rest (Python, DDIM updates, K-means)"] > 0


QUICK_RECORD = {
    "scene": "val-000", "prompt": "a", "target": "b", "steps": 2, "threads": 1,
    "timings": [{"name": "NTI inversion", "seconds": 2.0, "unet_evals": 10, "note": ""}],
    "dpl_over_nti": 1.5,
    "options_over_nti": {"dpl-plateau": 1.125, "dpl-early": 0.75},
}  # fmt: skip
"""What `run_speed(..., quick=True)` records: no `--fast` ratio (`fast_dpl_over_fast_nti`), no
profiles."""


def test_report_lists_every_timing_and_share():
    record = {
        **QUICK_RECORD,
        "fast_dpl_over_fast_nti": 1.25,
        "profile": {"total": 4.0, "unet forward": 1.0, "backward": 3.0},
        "profile_full": {"total": 2.0, "unet forward": 0.5, "backward": 1.0},
    }
    text = speed.report(record)
    assert "| NTI inversion | 2.00 | 10 |" in text
    assert "| backward | 3.00 | 75% |" in text and "1.50x" in text and "1.25x" in text
    assert "| backward | 1.00 | 50% |" in text and "1.12x" in text


def test_a_quick_report_leaves_out_what_was_not_run():
    text = speed.report(QUICK_RECORD)
    assert "1.50x (defaults), 1.12x (`dpl-plateau`" in text and "speed options" not in text
    assert "0.75x (`dpl-early` / default NTI)" in text
    assert "Where one DPL inversion's time goes" not in text


def test_the_median_run_is_reported_with_every_run_listed():
    runs = [speed.Timing("NTI inversion", s, 10, "PSNR 31.5 dB") for s in (3.0, 1.0, 2.0)]
    timing = speed._median(runs)
    assert timing.seconds == 2.0
    assert timing.note == "PSNR 31.5 dB; median of 3 runs (3.00, 1.00, 2.00 s)"
    assert speed._median(runs[:2]).seconds == 1.0  # the lower middle of an even count
    assert speed._median(runs[:1]) == runs[0]  # one run: as measured, no note added
