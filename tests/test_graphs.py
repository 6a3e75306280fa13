"""CUDA-graph replay of the inversion's UNet calls (`engine.graphs`), checked on the CPU.

Capture itself needs a GPU (`python -m dpl_edit.bench.sd_scale --cuda-graphs both` compares
graphed and eager inversions there); here stand-in captures check what does not: one capture per input
signature, outputs copied out of the static buffers a replay overwrites, and that the
inversion routes exactly its calls with gradient (and the pass after each null-text fit)
through the graphs, with the same results.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_image

from dpl_edit.batch.executors import ModelSpec
from dpl_edit.cli import main
from dpl_edit.dpl.losses import DplLossConfig
from dpl_edit.engine.graphs import GraphedCalls
from dpl_edit.engine.inversion import invert
from dpl_edit.engine.model import use_channels_last, use_cuda_graphs
from dpl_edit.errors import DplError
from dpl_edit.ui.app import serve


def _static_buffer_capture(captured: list):
    """Replays as a CUDA graph does: new inputs copied into the captured ones, outputs written
    into the same static tensors every time."""

    def capture(fn, samples):
        captured.append(tuple(s.shape for s in samples))
        static_out = fn(*samples)

        def replay(*args):
            with torch.no_grad():
                for static, arg in zip(samples, args, strict=True):
                    static.copy_(arg)
                static_out.copy_(fn(*samples))
            return static_out

        return replay

    return capture


def test_one_capture_per_signature_and_outputs_survive_the_next_replay():
    captured: list = []
    calls = GraphedCalls(_static_buffer_capture(captured))
    square = lambda x: x * x  # noqa: E731
    first = calls("square", square, torch.tensor([2.0, 3.0]))
    second = calls("square", square, torch.tensor([4.0, 5.0]))
    assert torch.equal(first, torch.tensor([4.0, 9.0]))  # not overwritten by the second call
    assert torch.equal(second, torch.tensor([16.0, 25.0]))
    assert len(calls) == 1
    calls("square", square, torch.tensor([1.0, 2.0, 3.0]))  # another shape
    calls("square", square, torch.tensor([1.0, 2.0], requires_grad=True))  # another grad state
    calls("cube", square, torch.tensor([1.0, 2.0]))  # another name
    assert len(calls) == 4 and captured[1] == ((3,),)


def test_the_least_recently_used_graph_is_dropped_beyond_the_limit():
    captured: list = []
    calls = GraphedCalls(_static_buffer_capture(captured), keep=2)
    double = lambda x: 2 * x  # noqa: E731
    calls("a", double, torch.tensor([1.0]))
    calls("b", double, torch.tensor([1.0]))
    calls("a", double, torch.tensor([2.0]))  # replayed: "b" is now the least recently used
    calls("c", double, torch.tensor([1.0]))
    assert [name for name, _ in calls.keys()] == ["a", "c"] and len(captured) == 3
    assert torch.equal(calls("b", double, torch.tensor([3.0])), torch.tensor([6.0]))
    assert len(captured) == 4  # captured again


def _dpl(model, seed: int = 0):
    config = DplLossConfig(max_inner_steps=3, use_thresholds=False)
    return invert(
        model, tiny_image(seed=seed), "a cat and a dog", method="dpl", steps=3,
        progress=False, dpl_config=config, words=["cat", "dog"],
    )  # fmt: skip


def _replaying_first_capture(routed: list[str]):
    """A stand-in capture that, like a CUDA graph, reruns the function as first captured
    (with its closure) on whatever tensors later calls bring."""

    def capture(fn, samples):
        def call(*args):
            routed.append(getattr(fn, "__name__", "?"))
            return fn(*args)

        return call

    return capture


def _same_inversion(a, b) -> bool:
    return (
        torch.equal(a.null_embeddings, b.null_embeddings)
        and torch.equal(a.dynamic_tokens.vectors, b.dynamic_tokens.vectors)
        and torch.equal(a.trajectory, b.trajectory)
    )


def test_dpl_inversion_through_the_graph_path_gives_the_eager_result(tiny_model):
    first_eager, second_eager = _dpl(tiny_model), _dpl(tiny_model, seed=1)
    routed: list[str] = []
    graphs = tiny_model.graphs = GraphedCalls(_replaying_first_capture(routed))
    try:
        first, second = _dpl(tiny_model), _dpl(tiny_model, seed=1)
    finally:
        tiny_model.graphs = None
    assert _same_inversion(first_eager, first)
    # The second picture (its own background masks) replays the first inversion's captures.
    assert not _same_inversion(first_eager, second_eager)
    assert _same_inversion(second_eager, second)
    # Every UNet pass goes through a graph: DDIM inversion with its stores, the conditional
    # pass with its store, null-text fits, the pass after each fit, and token steps.
    assert len(routed) == sum(first.unet_evals.values()) + sum(second.unet_evals.values())
    assert routed.count("_terms") == first.unet_evals["dpl_tokens"] * 2
    assert len(graphs) == 5 and not graphs.failed


def test_a_function_whose_capture_fails_runs_eagerly(tiny_model, caplog):
    eager = _dpl(tiny_model)

    def refuse(fn, samples):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = tiny_model.graphs = GraphedCalls(refuse)
    try:
        fallen_back = _dpl(tiny_model)
    finally:
        tiny_model.graphs = None
    assert _same_inversion(eager, fallen_back)
    assert len(graphs) == 5 and set(graphs.failed) == {name for name, _ in graphs.keys()}
    assert all("not permitted" in error for error in graphs.failed.values())
    assert "running it eagerly" in caplog.text


@pytest.mark.parametrize(
    ("flag", "option", "turn_on", "message"),
    [
        ("--cuda-graphs", "cuda_graphs", use_cuda_graphs, "CUDA graphs need a CUDA device"),
        ("--channels-last", "channels_last", use_channels_last, "channels-last needs a CUDA"),
    ],
)
def test_gpu_speed_options_are_refused_off_the_gpu(
    flag, option, turn_on, message, tiny_model, tiny_model_dir, image_file, tmp_path, capsys
):
    """Every way in (library, batch workers, web app, CLI) refuses before any work is done."""
    with pytest.raises(DplError, match=message):
        turn_on(tiny_model)
    with pytest.raises(DplError, match=message):
        ModelSpec(str(tiny_model_dir), "cpu", **{option: True}).load()
    with pytest.raises(DplError, match=message):
        serve(str(tiny_model_dir), "cpu", **{option: True})
    argv = ["invert", str(image_file), "--prompt", "a cat and a dog", flag]
    argv += ["--out", str(tmp_path / "inv"), "--model", str(tiny_model_dir), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not (tmp_path / "inv").exists()
    assert main(["ui", "--device", "cpu", flag]) == 2  # refused before serving
    assert capsys.readouterr().err.startswith(f"error: {message}")
