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
from dpl_edit.engine.model import use_cuda_graphs
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


def test_dpl_inversion_through_the_graph_path_gives_the_eager_result(tiny_model):
    def dpl():
        config = DplLossConfig(max_inner_steps=3, use_thresholds=False)
        return invert(
            tiny_model, tiny_image(), "a cat and a dog", method="dpl", steps=3,
            progress=False, dpl_config=config, words=["cat", "dog"],
        )  # fmt: skip

    eager = dpl()
    routed: list[str] = []

    def passthrough(fn, samples):
        def call(*args):
            routed.append(fn.__name__)
            return fn(*args)

        return call

    graphs = tiny_model.graphs = GraphedCalls(passthrough)
    try:
        graphed = dpl()
    finally:
        tiny_model.graphs = None
    assert torch.equal(eager.null_embeddings, graphed.null_embeddings)
    assert torch.equal(eager.dynamic_tokens.vectors, graphed.dynamic_tokens.vectors)
    assert torch.equal(eager.trajectory, graphed.trajectory)
    # Null-text fits with gradient, the pass after each fit without, and the token stage's maps.
    assert len(graphs) == 3
    null_passes = graphed.unet_evals["null_text"] - 3  # the conditional passes stay eager
    assert routed.count("unet_output") == null_passes
    assert routed.count("_maps") == graphed.unet_evals["dpl_tokens"]


def test_cuda_graphs_are_refused_off_the_gpu(
    tiny_model, tiny_model_dir, image_file, tmp_path, capsys
):
    """Every way in (library, batch workers, web app, CLI) refuses before any work is done."""
    with pytest.raises(DplError, match="CUDA device"):
        use_cuda_graphs(tiny_model)
    with pytest.raises(DplError, match="CUDA device"):
        ModelSpec(str(tiny_model_dir), "cpu", cuda_graphs=True).load()
    with pytest.raises(DplError, match="CUDA device"):
        serve(str(tiny_model_dir), "cpu", cuda_graphs=True)
    argv = ["invert", str(image_file), "--prompt", "a cat and a dog", "--cuda-graphs"]
    argv += ["--out", str(tmp_path / "inv"), "--model", str(tiny_model_dir), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: CUDA graphs need a CUDA device") and "\n" not in err
    assert not (tmp_path / "inv").exists()
    assert main(["ui", "--device", "cpu", "--cuda-graphs"]) == 2  # refused before serving
    assert capsys.readouterr().err.startswith("error: CUDA graphs need a CUDA device")
