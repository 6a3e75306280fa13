"""Attention-mass shares (start token, prompt words, end-of-text + padding) on the tiny model."""

from __future__ import annotations

import pytest
import torch

from dpl_edit.bench.sink import MASS_FILE, mass_section, measure_mass
from dpl_edit.engine.attention import CrossAttentionStore
from dpl_edit.engine.ddim import Ddim
from dpl_edit.engine.null_text import ddim_inversion
from dpl_edit.engine.text import encode_text
from dpl_edit.io.images import image_to_tensor

PROMPT = "a cat and a dog"  # 5 tokens: positions 1-5, end-of-text at 6


def test_level_shares_match_the_attention_store(tiny_model):
    """One inversion step: a level's shares are its maps' mean over pixels, grouped by
    position, recorded here by the engine's own store."""
    from conftest import tiny_image

    image = tiny_image()
    table = measure_mass(tiny_model, [image], [PROMPT], steps=1)
    store = CrossAttentionStore([4, 8])
    z0 = tiny_model.encode_image(image_to_tensor(image))
    ddim = Ddim(tiny_model.scheduler, 1)
    with torch.no_grad():
        ddim_inversion(tiny_model, ddim, z0, encode_text(tiny_model, [PROMPT]), [store], False)
    for res in (4, 8):
        per_token = store.average(res)[0].mean(dim=(0, 1))
        row = table[f"level-{res}"]
        assert row["start"] == pytest.approx(float(per_token[0]), abs=1e-5)
        assert row["words"] == pytest.approx(float(per_token[1:6].sum()), abs=1e-5)
        assert row["end_padding"] == pytest.approx(float(per_token[6:].sum()), abs=1e-5)
    for name, row in table.items():
        assert row["start"] + row["words"] + row["end_padding"] == pytest.approx(1, abs=1e-5), name


def test_card_section_only_when_measured(tmp_path, tiny_model):
    from conftest import tiny_image

    from dpl_edit.bench.report import write_json

    assert mass_section(tmp_path) == ""
    table = measure_mass(tiny_model, [tiny_image()], [PROMPT], steps=1)
    write_json(tmp_path / MASS_FILE, {"scenes": 1, "steps": 1, "shares": table})
    section = mass_section(tmp_path)
    assert f"| all | all | {table['all']['start']:.3f} |" in section


@pytest.mark.parametrize(("start", "says"), [(0.92, "sink here too"), (0.06, "competes with")])
def test_card_says_whether_the_start_token_is_the_sink(tmp_path, start, says):
    from dpl_edit.bench.report import write_json

    row = {"res": 0, "start": start, "words": (1 - start) / 2, "end_padding": (1 - start) / 2}
    write_json(tmp_path / MASS_FILE, {"scenes": 1, "steps": 1, "shares": {"all": row}})
    section = mass_section(tmp_path)
    assert says in section and f"takes {start:.0%}" in section
