"""CUDA-graph replay of the inversion's UNet calls with gradient (GPU only, opt-in).

At Stable Diffusion scale on one H100 a UNet pass is launch-bound: the host issues about a
thousand kernels per pass, and a batch of 4 costs what a batch of 1 costs (docs/benchmarks.md,
"Stable Diffusion scale"). A CUDA graph records those kernels once and replays them with one
launch; `torch.cuda.make_graphed_callables` does that for a forward pass and its backward, so
null-text and token updates keep using autograd as before.

Only pure functions of their tensor arguments can be graphed: Python runs once, at capture, and
each replay reruns the recorded kernels on new values copied into the captured inputs. So the
functions given here install their attention controllers themselves and return what those record
instead of leaving it in a store, and the timestep is a device tensor, not a Python number.
Each distinct (name, shapes, dtypes, which inputs require grad) is captured once, on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Capture = Callable[[Callable[..., Any], tuple[torch.Tensor, ...]], Callable[..., Any]]


def _signature(args: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    return tuple((tuple(a.shape), a.dtype, str(a.device), a.requires_grad) for a in args)


class GraphedCalls:
    """Captured versions of pure functions of tensors, keyed by name and input signature.

    `capture` makes the graphed function (default `torch.cuda.make_graphed_callables`); tests
    pass a stand-in, since capture needs a GPU.
    """

    def __init__(self, capture: Capture | None = None) -> None:
        self._capture = capture or torch.cuda.make_graphed_callables
        self._graphs: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, name: str, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
        """fn(*args), replayed from the graph captured for this name and signature.

        Outputs are copied out of the graph's static buffers, which its next replay overwrites,
        so a caller may keep them across calls (DPL keeps the last loss report).
        """
        key = (name, _signature(args))
        graphed = self._graphs.get(key)
        if graphed is None:
            samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
            graphed = self._graphs[key] = self._capture(fn, samples)
        out = graphed(*args)
        if isinstance(out, torch.Tensor):
            return out.clone()
        return type(out)(o.clone() for o in out)
