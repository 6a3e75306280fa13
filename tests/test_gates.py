"""The quality-gate script: its verdicts, the model card it writes, and the shipped card itself."""

import json
import re

import pytest

from dpl_edit.engine.model import BUNDLED_MODELS, bundled_model_names, load_model
from dpl_edit.world import gates

RESULTS = {
    "vae_psnr": 31.5,
    "generation_rate": 0.42,
    "nti_psnr": 29.0,
    "attention_iou": 0.61,
    "attention_leakage": 0.33,
    "checker_accuracy": 0.99,
    "passed": {"vae_psnr": True, "generation_rate": False, "nti_psnr": True, "attention_iou": True},
}


def test_card_rows_carry_each_figure_with_its_verdict():
    card = gates.model_card(RESULTS, {"summary": "", "notes": ""})
    rows = {
        line.split("|")[1].strip(): line
        for line in card.splitlines()
        if line.startswith("| ") and "gate" not in line
    }
    generation = next(row for name, row in rows.items() if name.startswith("generation"))
    assert "0.420" in generation and "**fail**" in generation
    vae = next(row for name, row in rows.items() if name.startswith("VAE"))
    assert "31.50" in vae and "pass" in vae and "fail" not in vae
    assert "0.330" in card  # leakage is reported beside the IoU gate


def test_training_summary_names_a_continued_run_and_its_decay():
    training = {
        "unet_steps": 8500,
        "decoder_steps": 400,
        "history": [{"step": 3250, "iou": 0.7, "leakage": 0.31}],
        "config": {"batch_size": 32, "warm_start": 3000, "lr_decay_from": 3000, "lr_floor": 0.1},
    }
    summary = gates.training_summary(training)
    assert "8500 steps of batch 32" in summary
    assert "Continued from step 3000" in summary
    assert "cosine down to 10%" in summary
    assert "step 3250: IoU 0.700, leakage 0.310" in summary
    plain = gates.training_summary({**training, "config": {"batch_size": 32}})
    assert "Continued" not in plain and "cosine" not in plain


@pytest.mark.parametrize("name", bundled_model_names())
def test_shipped_card_states_the_measured_gates(name):
    folder = BUNDLED_MODELS / name
    measured = json.loads((folder / "gates.json").read_text())
    card = (folder / "README.md").read_text()
    for key, fmt in (("vae_psnr", ".2f"), ("generation_rate", ".3f"), ("nti_psnr", ".2f")):
        assert format(measured[key], fmt) in card, key
    assert format(measured["attention_iou"], ".3f") in card
    steps = json.loads((folder / "dpl_defaults.json").read_text())["training"]
    assert re.search(rf"{steps['unet_steps']} steps of batch", card)


@pytest.mark.parametrize("name", bundled_model_names())
def test_vae_gate_on_a_few_held_out_scenes(name):
    value = gates.vae_psnr(load_model(name), count=8, batch=8)
    assert value >= 28.0  # the full gate (500 scenes) is 30 dB; 8 scenes vary more


def test_long_histories_are_thinned_to_the_early_steps_and_every_thousand():
    history = [{"step": s, "iou": 0.5, "leakage": 0.3} for s in range(250, 5001, 250)]
    summary = gates.training_summary({"history": history[:-1], "config": {}})
    steps = [int(m) for m in re.findall(r"step (\d+):", summary)]
    assert steps == [250, 500, 750, 1000, 2000, 3000, 4000, 4750]


def test_card_only_rewrites_the_card_from_gates_json(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    training = {"unet_steps": 7, "history": [], "config": {"batch_size": 2}, "notes": "\nNOTE-X"}
    (folder / "dpl_defaults.json").write_text(json.dumps({"training": training}))
    with pytest.raises(SystemExit) as exit_info:
        gates.main(["--model", str(folder), "--card-only"])
    assert exit_info.value.code == 2
    assert "gates.json not found" in capsys.readouterr().err
    (folder / "gates.json").write_text(json.dumps(RESULTS))
    gates.main(["--model", str(folder), "--card-only"])
    card = (folder / "README.md").read_text()
    assert "7 steps of batch 2" in card and "NOTE-X" in card and "0.420" in card
