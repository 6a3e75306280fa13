"""One attention hook for recording and editing attention maps, plus the recording controllers.

A diffusers attention *processor* is installed only on the layers some controller wants; it
computes the attention probabilities explicitly and passes them through each controller in turn,
which may record them (with or without gradient) or return modified ones. Every other layer keeps
the fused scaled-dot-product path, so recording the 16x16 maps does not slow down the rest.

Layers are chosen by their spatial side length and identified by module name. The original code
counted calls to infer the layer, which breaks as soon as a forward pass is skipped or repeated.
Probabilities reach controllers as [batch, heads, queries, keys]; the batch layout is the
caller's, and each controller is told which rows it cares about.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from dpl_edit.engine.timers import timed


@dataclass(frozen=True)
class AttnLayer:
    """What a controller may know about an attention layer before it runs."""

    name: str
    is_cross: bool
    res: int
    heads: int


def attention_layers(unet: UNet2DConditionModel) -> dict[str, AttnLayer]:
    """Every attention layer of the UNet with the side length of its (square) feature map.

    Down blocks halve the resolution after themselves when they have a downsampler and up blocks
    double it, which holds for any UNet2DConditionModel, whatever its depth or block types.
    """
    sample_size = unet.config.sample_size
    res = int(sample_size if isinstance(sample_size, int) else sample_size[0])
    block_res: dict[str, int] = {}
    for i, block in enumerate(unet.down_blocks):
        block_res[f"down_blocks.{i}."] = res
        if getattr(block, "downsamplers", None):
            res //= 2
    block_res["mid_block."] = res
    for i, block in enumerate(unet.up_blocks):
        block_res[f"up_blocks.{i}."] = res
        if getattr(block, "upsamplers", None):
            res *= 2
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            prefix = next(p for p in block_res if name.startswith(p))
            layers[name] = AttnLayer(
                name, module.is_cross_attention, block_res[prefix], module.heads
            )
    return layers


def attention_levels(unet: UNet2DConditionModel, cross: bool) -> list[int]:
    """The side lengths at which the UNet has cross- (or self-) attention layers, ascending."""
    return sorted(
        {layer.res for layer in attention_layers(unet).values() if layer.is_cross == cross}
    )


class AttentionController:
    """Base class: sees the probabilities of the layers it wants; may return modified ones.

    The caller's step loop calls `begin_step(i)` before the UNet call of denoising step i and
    `end_step()` after it, so controllers know the step without counting layer calls.
    """

    step: int = 0

    def wants(self, layer: AttnLayer) -> bool:
        raise NotImplementedError

    def __call__(self, probs: torch.Tensor, layer: AttnLayer) -> torch.Tensor:
        raise NotImplementedError

    def begin_step(self, step: int) -> None:
        self.step = step

    def end_step(self) -> None:
        """Called after the step's UNet call; recorders fold the step into their averages."""


class Recorder(AttentionController):
    """A controller that only records, so that a UNet call with it can be one pure function
    (`dpl_edit.engine.model.LoadedModel.predict_recorded`, replayable from a CUDA graph): a
    `fresh` copy records the call, its `step_maps` come out as tensors, and the original
    `add_step`s them. `key` names the settings, which decide what is recorded, and
    `maps_per_step` how many tensors `step_maps` gives."""

    maps_per_step: int = 1

    def fresh(self) -> Recorder:
        raise NotImplementedError

    def key(self) -> str:
        raise NotImplementedError

    def step_maps(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def add_step(self, maps: Sequence[torch.Tensor]) -> None:
        raise NotImplementedError


class ControllerChain:
    """The controllers active in one `controlled_attention` block, called in order."""

    def __init__(self, controllers: Sequence[AttentionController]) -> None:
        self.controllers = list(controllers)

    def __call__(self, probs: torch.Tensor, layer: AttnLayer) -> torch.Tensor:
        for controller in self.controllers:
            if controller.wants(layer):
                probs = controller(probs, layer)
        return probs

    def begin_step(self, step: int) -> None:
        for controller in self.controllers:
            controller.begin_step(step)

    def end_step(self) -> None:
        for controller in self.controllers:
            controller.end_step()


class ForwardStopped(Exception):
    """Raised by `StopAfter` to end a UNet call early; whoever made the call catches it."""


class StopAfter(AttentionController):
    """Ends the UNet call as soon as layer `name` has computed its attention.

    For passes that only need attention maps (DPL's token updates): nothing that runs after the
    last recorded layer can change its maps or their gradients, so skipping it saves work
    without changing a result. Put it after the recorders in the chain so they see the layer
    first. In Stable Diffusion, stopping after the last 16x16 layer skips the 32x32 and 64x64
    up blocks, the most expensive part of the UNet.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def wants(self, layer: AttnLayer) -> bool:
        return layer.name == self.name

    def __call__(self, probs: torch.Tensor, layer: AttnLayer) -> torch.Tensor:
        raise ForwardStopped(layer.name)


def last_layer(unet: UNet2DConditionModel, controller: AttentionController) -> str:
    """The name of the last attention layer, in execution order, that `controller` wants.

    Module registration order is execution order for a UNet2DConditionModel's attention layers
    (down blocks, mid block, up blocks; each block's layers in order).
    """
    names = [name for name, layer in attention_layers(unet).items() if controller.wants(layer)]
    if not names:
        raise ValueError("the controller wants no attention layer of this UNet")
    return names[-1]


class ControlledAttnProcessor:
    """Standard attention with explicit probabilities routed through a controller chain."""

    def __init__(self, chain: ControllerChain, layer: AttnLayer) -> None:
        self.chain = chain
        self.layer = layer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **_kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, key_len = context.shape[0], context.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        probs = probs.view(batch, attn.heads, *probs.shape[1:])
        with timed("attention_controllers"):
            probs = self.chain(probs, self.layer)
        probs = probs.reshape(batch * attn.heads, *probs.shape[2:])
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs.to(value.dtype), value))

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def controlled_attention(
    unet: UNet2DConditionModel, controllers: Sequence[AttentionController]
) -> Iterator[ControllerChain]:
    """Install the controllers for the duration of the block, then restore the old processors.

    Nested blocks work: the inner block replaces the outer one's controllers until it exits.
    """
    chain = ControllerChain(controllers)
    layers = attention_layers(unet)
    original = unet.attn_processors
    processors = {}
    for key in original:
        layer = layers[key.removesuffix(".processor")]
        wanted = any(c.wants(layer) for c in controllers)
        processors[key] = ControlledAttnProcessor(chain, layer) if wanted else AttnProcessor2_0()
    unet.set_attn_processor(processors)
    try:
        yield chain
    finally:
        unet.set_attn_processor(original)


Rows = Sequence[int] | Literal["conditional"] | None
"""Which batch rows a recorder keeps: all (None), the listed ones, or "conditional": the
batch's second half, where classifier-free guidance puts the conditional passes."""


def _select_rows(probs: torch.Tensor, rows: Rows) -> torch.Tensor:
    if rows is None:
        return probs
    if rows == "conditional":
        return probs[probs.shape[0] // 2 :]
    return probs[list(rows)]


class CrossAttentionStore(Recorder):
    """Records cross-attention maps at chosen resolutions, per step and averaged over steps.

    Maps are averaged over heads and over every layer of a resolution, giving
    [rows, res, res, text_len] per resolution. With `grad=True` the current step's maps keep
    their graph (DPL's losses backpropagate through them); the time average is always detached.
    Within a step, a later UNet call overwrites an earlier one layer by layer.
    """

    def __init__(self, resolutions: Sequence[int], rows: Rows = None, grad: bool = False) -> None:
        self.resolutions = tuple(sorted(set(resolutions)))
        self.maps_per_step = len(self.resolutions)
        self.rows = rows
        self.grad = grad
        self._current: dict[str, tuple[int, torch.Tensor]] = {}
        self._sum: dict[int, torch.Tensor] = {}
        self.steps_recorded = 0

    def wants(self, layer: AttnLayer) -> bool:
        return layer.is_cross and layer.res in self.resolutions

    def __call__(self, probs: torch.Tensor, layer: AttnLayer) -> torch.Tensor:
        maps = _select_rows(probs, self.rows).mean(dim=1)
        self._current[layer.name] = (layer.res, maps if self.grad else maps.detach())
        return probs

    def current(self, res: int) -> torch.Tensor:
        """This step's maps at `res`: [rows, res, res, text_len]."""
        maps = [m for r, m in self._current.values() if r == res]
        if not maps:
            raise RuntimeError(f"no cross-attention recorded at {res}x{res} in this step")
        mean = torch.stack(maps).mean(dim=0)
        return mean.reshape(mean.shape[0], res, res, mean.shape[-1])

    def end_step(self) -> None:
        if not self._current:
            return
        for res in {r for r, _ in self._current.values()}:
            self._add(res, self.current(res))
        self.steps_recorded += 1
        self._current = {}

    def fresh(self) -> CrossAttentionStore:
        """An empty store with the same settings (`Recorder`)."""
        return CrossAttentionStore(self.resolutions, self.rows, self.grad)

    def key(self) -> str:
        return f"cross{self.resolutions}:{self.rows}:{self.grad}"

    def step_maps(self) -> tuple[torch.Tensor, ...]:
        """This step's maps, one per resolution (`Recorder`)."""
        return tuple(self.current(res) for res in self.resolutions)

    def add_step(self, maps: Sequence[torch.Tensor]) -> None:
        """Add one step's maps, one per resolution, to the time average (`Recorder`)."""
        for res, step_maps in zip(self.resolutions, maps, strict=True):
            self._add(res, step_maps)
        self.steps_recorded += 1

    def _add(self, res: int, step_maps: torch.Tensor) -> None:
        step_maps = step_maps.detach().float()
        self._sum[res] = self._sum[res] + step_maps if res in self._sum else step_maps

    def average(self, res: int) -> torch.Tensor:
        """Maps at `res` averaged over the recorded steps: [rows, res, res, text_len]."""
        if res not in self._sum:
            raise RuntimeError(f"no cross-attention recorded at {res}x{res}")
        return self._sum[res] / self.steps_recorded


class SelfAttentionStore(Recorder):
    """Records self-attention at one resolution, averaged over layers, heads and steps.

    Background estimation clusters the rows of this [rows, res*res, res*res] matrix.
    """

    def __init__(self, res: int, rows: Rows = None) -> None:
        self.res = res
        self.rows = rows
        self._current: dict[str, torch.Tensor] = {}
        self._sum: torch.Tensor | None = None
        self.steps_recorded = 0

    def wants(self, layer: AttnLayer) -> bool:
        return not layer.is_cross and layer.res == self.res

    def __call__(self, probs: torch.Tensor, layer: AttnLayer) -> torch.Tensor:
        self._current[layer.name] = _select_rows(probs, self.rows).detach().float().mean(dim=1)
        return probs

    def end_step(self) -> None:
        if not self._current:
            return
        self.add_step(self.step_maps())
        self._current = {}

    def fresh(self) -> SelfAttentionStore:
        """An empty store with the same settings (`Recorder`)."""
        return SelfAttentionStore(self.res, self.rows)

    def key(self) -> str:
        return f"self{self.res}:{self.rows}"

    def step_maps(self) -> tuple[torch.Tensor, ...]:
        """This step's self-attention, averaged over layers (`Recorder`)."""
        return (torch.stack(list(self._current.values())).mean(dim=0),)

    def add_step(self, maps: Sequence[torch.Tensor]) -> None:
        """Add one step's `step_maps` to the time average (`Recorder`)."""
        (step_mean,) = maps
        self._sum = step_mean if self._sum is None else self._sum + step_mean
        self.steps_recorded += 1

    def average(self) -> torch.Tensor:
        if self._sum is None:
            raise RuntimeError(f"no self-attention recorded at {self.res}x{self.res}")
        return self._sum / self.steps_recorded
