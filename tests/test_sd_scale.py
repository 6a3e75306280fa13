"""The SD-scale cost estimate: pass counts read from a real inversion, units on tiny shapes."""

from __future__ import annotations

import dataclasses

import pytest

from dpl_edit.bench import sd_scale
from dpl_edit.dpl.losses import DplLossConfig
from dpl_edit.engine.inversion import invert
from dpl_edit.errors import DplError

TINY = {
    "unet": {
        **sd_scale.SD15_UNET,
        "sample_size": 16,
        "block_out_channels": (32, 32, 64, 64),
        "cross_attention_dim": 32,
        "layers_per_block": 1,
        "norm_num_groups": 8,
    },
    "vae": {
        **sd_scale.SD15_VAE,
        "block_out_channels": (8, 8, 16, 16),
        "sample_size": 128,
        "layers_per_block": 1,
        "norm_num_groups": 8,
    },
    "text": {
        **sd_scale.SD15_TEXT,
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    },
}


def test_pass_counts_match_the_inversions_own_unet_counts(tiny_model, tmp_path):
    from conftest import tiny_image

    config = DplLossConfig(max_inner_steps=3, use_thresholds=False)
    inversion = invert(
        tiny_model, tiny_image(), "a cat and a dog", method="dpl", steps=3, progress=False,
        words=["cat", "dog"], dpl_config=config,
    )  # fmt: skip
    inversion.save(tmp_path / "inv")
    counts = sd_scale.PassCounts.from_inversion(tmp_path / "inv")
    evals = inversion.unet_evals
    assert counts.steps == evals["ddim_inversion"] == 3
    assert counts.token_checks == evals["dpl_tokens"] == counts.token_updates == 9
    assert counts.no_grad - counts.steps + counts.null_text_steps == evals["null_text"]


def test_estimate_prices_each_pass_kind():
    units = sd_scale.UnitCosts(
        "cpu", "float32", unet_forward=2.0, null_text_step=5.0, token_step_full=9.0,
        token_step_stopped=7.0, vae_encode=1.0, vae_decode=3.0, text_encode=0.5,
        null_text_peak_mb=0.0, token_step_peak_mb=0.0,
    )  # fmt: skip
    counts = sd_scale.PassCounts(
        steps=2, no_grad=6, null_text_steps=10, token_updates=4, token_checks=5
    )
    cost = sd_scale.estimate(units, counts)
    assert cost["nti_seconds"] == pytest.approx(1 + 3 + 2 * 0.5 + 6 * 2 + 10 * 5)
    assert cost["dpl_token_seconds"] == pytest.approx(5 * 7)
    assert cost["dpl_seconds"] == pytest.approx(cost["nti_seconds"] + 35)


def test_units_are_measured_on_models_of_the_given_shapes():
    units = sd_scale.measure_units(sd_scale.resolve_device("cpu"), sd_scale.torch.float32, 1, TINY)
    values = dataclasses.asdict(units)
    assert all(values[name] > 0 for name in values if name not in ("device", "dtype"))
    assert units.dtype == "float32"


def test_cli_reports_a_bad_folder_in_one_line(tmp_path, capsys):
    assert sd_scale.main(["--inversion", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_the_engines_pipeline_runs_on_the_sd_shaped_model():
    """NTI, DPL and the edit run unchanged on SD-kind models (SD's full tokenizer, so the text
    encoder keeps SD's vocabulary); each stage's passes are the engine's own counts."""
    configs = {**TINY, "text": {**TINY["text"], "vocab_size": 49408}}
    device = sd_scale.resolve_device("cpu")
    model = sd_scale.random_sd_model(device, sd_scale.torch.float32, configs)
    assert model.resolution == 16 * 8 and model.text_len == 77
    stages, differences = sd_scale.measure_pipeline(device, sd_scale.torch.float32, 2, configs)
    assert differences == {}
    assert [s.name.split()[0] for s in stages] == ["NTI", "DPL", "edit"]
    nti, dpl, edited = stages
    assert nti.unet_evals["ddim_inversion"] == dpl.unet_evals["ddim_inversion"] == 2
    assert "dpl_tokens" in dpl.unet_evals and "dpl_tokens" not in nti.unet_evals
    assert edited.unet_evals == {"edit": 2}
    assert all(s.seconds > 0 and s.peak_mb > 0 for s in stages)
    table = sd_scale.report(
        sd_scale.measure_units(device, sd_scale.torch.float32, 1, configs), None, stages
    )
    assert "| DPL inversion (paper settings) |" in table


def test_overhead_probe_times_each_batch_and_leaves_graphs_to_the_gpu():
    cpu = sd_scale.resolve_device("cpu")
    overhead = sd_scale.measure_overhead(cpu, sd_scale.torch.float32, 1, TINY)
    assert sorted(overhead.forward_by_batch) == [1, 2, 4]
    assert all(seconds > 0 for seconds in overhead.forward_by_batch.values())
    assert overhead.null_step > 0
    assert overhead.graphed_forward is None and overhead.graphed_null_step is None
    text = sd_scale.report(
        sd_scale.measure_units(cpu, sd_scale.torch.float32, 1, TINY), None, (), overhead
    )
    assert "| eager forward, batch 4 |" in text and "| graphed forward, batch 1 | - |" in text


def test_pipeline_refuses_cuda_graphs_off_the_gpu(capsys):
    cpu = sd_scale.resolve_device("cpu")
    with pytest.raises(DplError, match="CUDA device"):
        sd_scale.measure_pipeline(cpu, sd_scale.torch.float32, 2, TINY, graphs="on")
    # The command refuses before it measures anything (SD-sized units take minutes on a CPU).
    assert sd_scale.main(["--cuda-graphs", "both", "--pipeline-steps", "2"]) == 2
    assert "CUDA graphs need a CUDA device" in capsys.readouterr().err
    assert sd_scale.main(["--cuda-graphs", "on"]) == 2
    assert "give --pipeline-steps" in capsys.readouterr().err
    assert sd_scale.main(["--channels-last", "--pipeline-steps", "2"]) == 2
    assert "channels-last needs a CUDA device" in capsys.readouterr().err
    assert sd_scale.main(["--channels-last"]) == 2
    assert "give --pipeline-steps" in capsys.readouterr().err
