"""CUDA-graph replay of the inversion's UNet calls, with and without gradient (GPU only, opt-in).

At Stable Diffusion scale on one H100 a UNet pass is launch-bound: the host issues about a
thousand kernels per pass, and a batch of 4 costs what a batch of 1 costs (docs/research/
speed.md, "Stable Diffusion scale"). A CUDA graph records those kernels once and replays them with one
launch; `torch.cuda.make_graphed_callables` does that for a forward pass and its backward, so
null-text and token updates keep using autograd as before.

Only pure functions of their tensor arguments can be graphed: Python runs once, at capture, and
each replay reruns the recorded kernels on new values copied into the captured inputs. So the
functions given here install their attention controllers themselves and return what those record
instead of leaving it in a store, and the timestep is a device tensor, not a Python number.
Each distinct (name, shapes, dtypes, which inputs require grad) is captured once, on first use,
so the name must tell apart everything else the function reads. Nor may a captured function
copy from the host or read a tensor's value: constants it indexes with (token positions, word
token groups) are made on the device once, by `device_index`, and kept, and value tests (DPL's
thresholds) happen after the replay.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

log = logging.getLogger(__name__)

Capture = Callable[[Callable[..., Any], tuple[torch.Tensor, ...]], Callable[..., Any]]


def _signature(args: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    return tuple((tuple(a.shape), a.dtype, str(a.device), a.requires_grad) for a in args)


@cache
def device_index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`values` as an int64 tensor on `device`, made once and shared, so never written to.

    Indexing a GPU tensor with a Python list copies the list to the device at every call: a
    stall eagerly, and an error inside a graph capture. Kept for the process's life: a
    captured graph reads the tensor where it lay at capture.
    """
    return torch.tensor(values, dtype=torch.long, device=device)


class GraphedCalls:
    """Captured versions of pure functions of tensors, keyed by name and input signature.

    `capture` makes the graphed function (default `torch.cuda.make_graphed_callables`); tests
    pass a stand-in, since capture needs a GPU. A function whose capture fails (a library
    version that syncs with the host inside it, say) runs eagerly from then on, with a
    warning, and is listed in `failed`: the same result, without the speed-up. At most
    `keep` graphs are kept, the least recently used dropped first: each holds its own
    memory, and a long-running web app meets a new token step (a new graph) with every
    prompt.
    """

    def __init__(self, capture: Capture | None = None, keep: int = 16) -> None:
        self._capture = capture or torch.cuda.make_graphed_callables
        self._graphs: OrderedDict[tuple[Any, ...], Callable[..., Any]] = OrderedDict()
        self.keep = keep
        self.failed: dict[str, str] = {}
        """Name -> the error its capture raised."""

    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self) -> list[tuple[Any, ...]]:
        """(name, input signature) of every function captured (or fallen back) so far."""
        return list(self._graphs)

    def __call__(self, name: str, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
        """fn(*args), replayed from the graph captured for this name and signature.

        Outputs are copied out of the graph's static buffers, which its next replay overwrites,
        so a caller may keep them across calls (DPL keeps the last loss report).
        """
        key = (name, _signature(args))
        graphed = self._graphs.get(key)
        if graphed is not None:
            self._graphs.move_to_end(key)
        else:
            samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
            try:
                graphed = self._capture(fn, samples)
            except RuntimeError as error:
                log.warning("CUDA graph capture of %s failed, running it eagerly: %s", name, error)
                self.failed[name] = str(error).splitlines()[0] if str(error) else repr(error)
                graphed = fn
            self._graphs[key] = graphed
            while len(self._graphs) > self.keep:
                self._graphs.popitem(last=False)
        out = graphed(*args)
        if isinstance(out, torch.Tensor):
            return out.clone()
        return type(out)(o.clone() for o in out)
