"""Peak memory of one benchmark stage, on GPU or CPU.

On CUDA, torch's allocator statistics give the peak of the stage exactly. On CPU, torch's tensors
bypass Python's allocator, so tracemalloc would miss them; the process's peak resident set size is
used instead. Linux lets a process reset that peak (writing 5 to /proc/self/clear_refs), which
makes it per stage; elsewhere the value is the process's peak so far, an upper bound.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _reset_cpu_peak() -> bool:
    """Reset the process's peak RSS; False where the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _cpu_peak_mb(was_reset: bool) -> float:
    if was_reset:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs kB


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Measure the block's peak memory; the yielded dict gets "peak_memory_mb" on exit.

    GPU: peak allocated tensor memory. CPU: peak resident memory of the whole process.
    """
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    was_reset = _reset_cpu_peak() if _STATUS.is_file() else False
    yield result
    result["peak_memory_mb"] = _cpu_peak_mb(was_reset)
