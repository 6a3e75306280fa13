"""Training of the bundled model: the learning-rate schedule, seeding, resuming and export.

The real recipe takes hours; these runs use a tiny configuration (a few steps, narrow UNet) that
exercises the same code path end to end: VAE phase, UNet phase, checkpoints, export to a
diffusers folder that `load_model` accepts.
"""

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpl_edit.cli import main
from dpl_edit.engine.attention import attention_layers, controlled_attention
from dpl_edit.engine.model import load_model
from dpl_edit.world.training.data import TEXT_LEN, TrainConfig, build_components
from dpl_edit.world.training.unet import StartTokenShare, lr_factor, sink_guide


def test_warmup_ramps_linearly_from_the_fresh_optimiser_step():
    cfg = TrainConfig(warmup=100, unet_steps=1000)
    assert lr_factor(cfg, 0) == pytest.approx(0.01)
    assert lr_factor(cfg, 49) == pytest.approx(0.5)
    assert lr_factor(cfg, 99) == 1.0
    assert lr_factor(cfg, 999) == 1.0  # no decay requested: constant after warm-up
    resumed = TrainConfig(warmup=100, unet_steps=1000, warm_start=500)
    assert lr_factor(resumed, 500) == pytest.approx(0.01)
    assert lr_factor(resumed, 549) == pytest.approx(0.5)


def test_cosine_decay_runs_from_its_start_to_the_floor():
    cfg = TrainConfig(warmup=10, unet_steps=1100, lr_decay_from=100, lr_floor=0.1)
    assert lr_factor(cfg, 99) == 1.0
    assert lr_factor(cfg, 100) == pytest.approx(1.0)
    halfway = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_factor(cfg, 600) == pytest.approx(halfway)
    assert lr_factor(cfg, 1100) == pytest.approx(0.1)
    factors = [lr_factor(cfg, s) for s in range(100, 1100)]
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))


def _tiny_run(run: Path, out: Path, unet_steps: int, extra: list[str] | None = None) -> None:
    """Train (or resume) a tiny configuration in `run`, exporting it to `out`."""
    if not (run / "config.json").exists():
        run.mkdir(parents=True)
        cfg = TrainConfig(
            seed=3,
            batch_size=2,
            vae_steps=2,
            unet_steps=unet_steps,
            unet_widths=(32, 32, 32),
            text_width=32,
            eval_every=1000,
            eval_scenes=2,
            checkpoint_every=1,
        )
        (run / "config.json").write_text(json.dumps(asdict(cfg)))
    args = ["train-world", "--run", str(run), "--out", str(out), "--unet-steps", str(unet_steps)]
    assert main(args + (extra or [])) == 0


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    _tiny_run(root / "a", root / "model_a", 2)
    _tiny_run(root / "b", root / "model_b", 2)
    return root


def test_same_seed_gives_the_same_weights(tiny_runs):
    a = load_file(str(tiny_runs / "a" / "unet.safetensors"))
    b = load_file(str(tiny_runs / "b" / "unet.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_export_is_a_loadable_model_with_its_recipe(tiny_runs):
    model = load_model(tiny_runs / "model_a")
    assert model.unet.config.block_out_channels == [32, 32, 32]
    defaults = json.loads((tiny_runs / "model_a" / "dpl_defaults.json").read_text())
    assert defaults["training"]["unet_steps"] == 2
    assert defaults["training"]["config"]["seed"] == 3


def test_resume_continues_the_step_count_and_history(tiny_runs, tmp_path):
    run = tmp_path / "resumed"
    _tiny_run(run, tmp_path / "model", 1)
    first = json.loads((run / "unet.json").read_text())
    before = load_file(str(run / "unet.safetensors"))
    _tiny_run(run, tmp_path / "model", 3)
    meta = json.loads((run / "unet.json").read_text())
    assert (first["step"], meta["step"]) == (1, 3)
    assert [h["step"] for h in meta["history"]] == [1, 3]
    after = load_file(str(run / "unet.safetensors"))
    assert not torch.equal(before["unet.conv_in.weight"], after["unet.conv_in.weight"])


def test_resume_from_a_shipped_model_warms_up_a_fresh_optimiser(tiny_runs, tmp_path):
    run = tmp_path / "continued"
    args = ["train-world", "--run", str(run), "--out", str(tmp_path / "model")]
    args += ["--unet-steps", "3", "--resume-from", str(tiny_runs / "model_a")]
    assert main(args + ["--lr-decay-from", "2"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["warm_start"], cfg["lr_decay_from"], cfg["unet_steps"]) == (2, 2, 3)
    assert json.loads((run / "unet.json").read_text())["step"] == 3
    shipped = load_model(tiny_runs / "model_a").unet.conv_in.weight.float()
    continued = load_model(tmp_path / "model").unet.conv_in.weight.float()
    assert continued.shape == shipped.shape
    scales = [
        load_model(f).vae.config.scaling_factor
        for f in (tiny_runs / "model_a", run.parent / "model")
    ]
    assert scales[0] == scales[1]  # the UNet keeps learning with the latent scale it started with
    assert not torch.equal(continued, shipped)


def test_sink_guide_is_a_hinge_per_layer():
    shares = [torch.tensor(0.95), torch.tensor(0.5), torch.tensor(0.9)]
    assert sink_guide(shares, 0.9).item() == pytest.approx((0 + 0.4 + 0) / 3)


def test_sink_term_moves_attention_onto_the_start_token():
    cfg = TrainConfig(unet_widths=(32, 32, 32), text_width=32)
    _, tokenizer, text_encoder, unet = build_components(cfg)
    ids = tokenizer(["a red circle", ""], padding="max_length", max_length=TEXT_LEN,
                    return_tensors="pt").input_ids  # fmt: skip
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    n_cross = sum(layer.is_cross for layer in attention_layers(unet).values())
    means = []
    for _ in range(3):
        share = StartTokenShare()
        with controlled_attention(unet, [share]):
            unet(latents, t, text_encoder(ids).last_hidden_state)
        assert len(share.shares) == n_cross  # one share per cross-attention layer
        means.append(torch.stack(share.shares).mean().item())
        opt.zero_grad()
        sink_guide(share.shares, 0.9).backward()
        opt.step()
    assert means[0] < means[1] < means[2]


def test_fine_tune_records_its_settings_and_keeps_the_hand_set_defaults(tiny_runs, tmp_path):
    source = tmp_path / "shipped"
    shutil.copytree(tiny_runs / "model_a", source)
    defaults = json.loads((source / "dpl_defaults.json").read_text())
    defaults |= {"dpl": {"max_drift": 0.5}, "threads": 1}
    (source / "dpl_defaults.json").write_text(json.dumps(defaults))
    run, out = tmp_path / "run", tmp_path / "variant"
    args = ["train-world", "--run", str(run), "--out", str(out), "--unet-steps", "3"]
    args += ["--resume-from", str(source), "--sink-weight", "0.5", "--ema-decay", "0.9"]
    assert main(args) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["sink_weight"], cfg["ema_decay"]) == (0.5, 0.9)
    exported = json.loads((out / "dpl_defaults.json").read_text())
    assert (exported["dpl"], exported["threads"]) == ({"max_drift": 0.5}, 1)
    assert exported["training"]["config"]["sink_weight"] == 0.5


def test_cli_prints_a_json_summary(tiny_runs, capsys):
    run, out = tiny_runs / "a", tiny_runs / "exported"
    assert (
        main(["train-world", "--run", str(run), "--out", str(out), "--export-only", "--json"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["command"] == "train-world"
    assert Path(summary["outputs"]["model"]) == out
    assert (out / "unet" / "config.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--resume-from", "{tmp}/nowhere"], "not a world model folder"),
        (["--export-only"], "holds no UNet checkpoint"),
        (["--unet-steps", "-1"], "unet steps must be >= 0"),
        (["--sink-weight", "-1"], "sink weight must be >= 0"),
        (["--ema-decay", "1"], "EMA decay must be in [0, 1)"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    run = tmp_path / "run"
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["train-world", "--run", str(run), "--out", str(tmp_path / "m"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not run.exists() and not (tmp_path / "m").exists()
