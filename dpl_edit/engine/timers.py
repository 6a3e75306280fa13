"""Wall-clock accounting of the engine's parts, for the speed benchmark's profile.

torch's profiler records every operator, which at 50 steps fills tens of GB; these few labelled
timers cost a dictionary lookup when nobody collects and keep only one total per label.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_totals: ContextVar[defaultdict[str, float] | None] = ContextVar("dpl_timers", default=None)


@contextmanager
def timed(label: str) -> Iterator[None]:
    """Add the block's wall time to `label`'s total while `collect` is active; else nothing."""
    totals = _totals.get()
    if totals is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        totals[label] += time.perf_counter() - start


@contextmanager
def collect() -> Iterator[defaultdict[str, float]]:
    """Collect the labelled totals of the block (seconds per label; nested labels overlap)."""
    totals: defaultdict[str, float] = defaultdict(float)
    token = _totals.set(totals)
    try:
        yield totals
    finally:
        _totals.reset(token)
