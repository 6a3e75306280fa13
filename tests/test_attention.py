"""The attention hook: layer selection, recording, composition, and fidelity to fused attention."""

from __future__ import annotations

from contextlib import suppress

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from dpl_edit.engine.attention import (
    AttentionController,
    AttnLayer,
    ControlledAttnProcessor,
    CrossAttentionStore,
    ForwardStopped,
    SelfAttentionStore,
    StopAfter,
    attention_layers,
    controlled_attention,
    last_layer,
)
from dpl_edit.engine.text import encode_text


def _inputs(model, batch=2):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, 16, 16, generator=g)
    context = encode_text(model, ["a cat and a dog", "a lion"][:batch])
    return latents, context


def test_layer_resolutions_follow_the_unet_layout(tiny_model):
    layers = attention_layers(tiny_model.unet)
    cross = {name: layer.res for name, layer in layers.items() if layer.is_cross}
    assert cross == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2": 16,
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2": 8,
        "mid_block.attentions.0.transformer_blocks.0.attn2": 4,
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2": 8,
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2": 8,
        "up_blocks.2.attentions.0.transformer_blocks.0.attn2": 16,
        "up_blocks.2.attentions.1.transformer_blocks.0.attn2": 16,
    }
    assert sum(not layer.is_cross for layer in layers.values()) == 7


def test_processors_only_where_wanted_and_restored(tiny_model):
    unet = tiny_model.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    store = CrossAttentionStore([8])
    with controlled_attention(unet, [store]):
        controlled = [
            k for k, v in unet.attn_processors.items() if isinstance(v, ControlledAttnProcessor)
        ]
        fused = [v for v in unet.attn_processors.values() if isinstance(v, AttnProcessor2_0)]
        assert len(controlled) == 3 and all("attn2" in k for k in controlled)
        assert len(fused) == 11
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


class _Everything(AttentionController):
    def wants(self, layer: AttnLayer) -> bool:
        return True

    def __call__(self, probs, layer):
        return probs


def test_explicit_attention_matches_fused_attention(tiny_model):
    latents, context = _inputs(tiny_model)
    with torch.no_grad():
        reference = tiny_model.unet(latents, 981, encoder_hidden_states=context).sample
        with controlled_attention(tiny_model.unet, [_Everything()]):
            explicit = tiny_model.unet(latents, 981, encoder_hidden_states=context).sample
    torch.testing.assert_close(explicit, reference, rtol=1e-4, atol=1e-5)


def test_cross_store_maps_sum_to_one_and_average_over_steps(tiny_model):
    latents, context = _inputs(tiny_model)
    store = CrossAttentionStore([8, 16], rows=[1])
    per_step = []
    with torch.no_grad(), controlled_attention(tiny_model.unet, [store]) as chain:
        for step, t in enumerate((981, 501)):
            chain.begin_step(step)
            tiny_model.unet(latents, t, encoder_hidden_states=context)
            per_step.append(store.current(8))
            chain.end_step()
    assert per_step[0].shape == (1, 8, 8, tiny_model.text_len)
    torch.testing.assert_close(per_step[0].sum(-1), torch.ones(1, 8, 8))
    torch.testing.assert_close(store.average(8), (per_step[0] + per_step[1]) / 2)
    assert store.average(16).shape == (1, 16, 16, tiny_model.text_len)
    assert not torch.allclose(per_step[0], per_step[1])
    with pytest.raises(RuntimeError):
        store.average(4)


def test_cross_store_keeps_gradient_when_asked(tiny_model):
    latents, context = _inputs(tiny_model, batch=1)
    context = context.clone().requires_grad_(True)
    store = CrossAttentionStore([8], grad=True)
    with controlled_attention(tiny_model.unet, [store]):
        tiny_model.unet(latents, 501, encoder_hidden_states=context)
    maps = store.current(8)
    maps[..., 2].max().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
    store.end_step()
    assert not store.average(8).requires_grad


def test_self_store_rows_are_distributions(tiny_model):
    latents, context = _inputs(tiny_model)
    store = SelfAttentionStore(16, rows=[0])
    with torch.no_grad(), controlled_attention(tiny_model.unet, [store]):
        tiny_model.unet(latents, 501, encoder_hidden_states=context)
    store.end_step()
    average = store.average()
    assert average.shape == (1, 256, 256)
    torch.testing.assert_close(average.sum(-1), torch.ones(1, 256))


class _Uniform(AttentionController):
    """Replaces cross-attention at 8x8 by uniform maps (an editing controller in miniature)."""

    def wants(self, layer):
        return layer.is_cross and layer.res == 8

    def __call__(self, probs, layer):
        return torch.full_like(probs, 1.0 / probs.shape[-1])


def test_controllers_compose_in_order(tiny_model):
    latents, context = _inputs(tiny_model)
    before, after = CrossAttentionStore([8]), CrossAttentionStore([8])
    with torch.no_grad():
        plain = tiny_model.unet(latents, 501, encoder_hidden_states=context).sample
        with controlled_attention(tiny_model.unet, [before, _Uniform(), after]):
            edited = tiny_model.unet(latents, 501, encoder_hidden_states=context).sample
    uniform = torch.full_like(after.current(8), 1.0 / tiny_model.text_len)
    torch.testing.assert_close(after.current(8), uniform)
    assert not torch.allclose(before.current(8), uniform)
    assert not torch.allclose(edited, plain)


class _LayerLog(AttentionController):
    """Records the names of the layers that ran, in order."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def wants(self, layer: AttnLayer) -> bool:
        return True

    def __call__(self, probs: torch.Tensor, layer: AttnLayer) -> torch.Tensor:
        self.names.append(layer.name)
        return probs


def test_stopping_after_the_last_recorded_layer_keeps_maps_and_gradients(tiny_model):
    """Stopping the UNet call after the 8x8 level's last layer skips the later layers and
    leaves the recorded maps and their gradient w.r.t. the text exactly as in a full call."""
    latents, context = _inputs(tiny_model, batch=1)
    results = []
    for stop in (False, True):
        ctx = context.clone().requires_grad_(True)
        store, log = CrossAttentionStore([8], grad=True), _LayerLog()
        controllers = [log, store]
        if stop:
            controllers.append(StopAfter(last_layer(tiny_model.unet, store)))
        with controlled_attention(tiny_model.unet, controllers), suppress(ForwardStopped):
            tiny_model.predict(latents, 500, ctx)
        maps = store.current(8)
        (grad,) = torch.autograd.grad(maps[..., 2].square().sum(), ctx)
        results.append((log.names, maps.detach(), grad))
    (full_names, full_maps, full_grad), (cut_names, cut_maps, cut_grad) = results
    assert cut_names[-1] == "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    assert cut_names == full_names[: len(cut_names)] and len(cut_names) < len(full_names)
    assert torch.equal(cut_maps, full_maps)
    torch.testing.assert_close(cut_grad, full_grad, rtol=1e-5, atol=1e-7)
    assert cut_grad.abs().sum() > 0


def test_a_recorded_call_gives_the_stores_what_recording_in_place_does(tiny_model):
    """`predict_recorded` (fresh stores inside one pure call, their maps added afterwards, so a
    CUDA graph can replay it) leaves the stores exactly as installing them for the call does."""
    latents, context = _inputs(tiny_model)
    in_place = [CrossAttentionStore([8, 16], rows=[1]), SelfAttentionStore(16, rows=[0])]
    recorded = [store.fresh() for store in in_place]
    with torch.no_grad():
        for step, t in enumerate((981, 501)):
            with controlled_attention(tiny_model.unet, in_place) as chain:
                chain.begin_step(step)
                want = tiny_model.unet(latents, t, encoder_hidden_states=context).sample
                chain.end_step()
            got = tiny_model.predict_recorded(latents, t, context, recorded)
            assert torch.equal(got, want)
    for res in (8, 16):
        assert torch.equal(recorded[0].average(res), in_place[0].average(res))
    assert torch.equal(recorded[1].average(), in_place[1].average())
    assert recorded[0].steps_recorded == recorded[1].steps_recorded == 2
