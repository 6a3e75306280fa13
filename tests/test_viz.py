"""Attention grid: word maps, overlay colours, and the saved grid's layout."""

from __future__ import annotations

import torch
from PIL import Image

from dpl_edit.io.pictures import attention_grid, overlay, word_maps


def test_word_maps_sum_sub_tokens():
    maps = torch.arange(2 * 2 * 5, dtype=torch.float32).reshape(2, 2, 5)
    cat, hippo = word_maps(maps, [("cat", [1]), ("hippopotamus", [2, 3, 4])])
    torch.testing.assert_close(cat, maps[..., 1])
    torch.testing.assert_close(hippo, maps[..., 2] + maps[..., 3] + maps[..., 4])


def test_overlay_is_hot_where_the_map_peaks():
    image = Image.new("RGB", (8, 8), (128, 128, 128))
    heat = torch.zeros(2, 2)
    heat[0, 0] = 1.0
    pixels = overlay(image, heat)
    assert pixels.shape == (8, 8, 3)
    assert pixels[0, 0, 0] > pixels[0, 0, 2]  # jet: red where the map is 1
    assert pixels[7, 7, 2] > pixels[7, 7, 0]  # blue where it is 0


def test_grid_has_a_column_per_word_and_a_row_per_map_set(tmp_path):
    image = Image.new("RGB", (32, 32), (200, 100, 50))
    words = [("a", [1]), ("cat", [2]), ("and", [3]), ("a", [4]), ("dog", [5])]
    maps = torch.rand(4, 4, 16).softmax(-1)
    one = Image.open(attention_grid(image, words, [("NTI", maps)], tmp_path / "one.png"))
    two = Image.open(
        attention_grid(image, words, [("NTI", maps), ("DPL", maps)], tmp_path / "two.png")
    )
    assert one.width == two.width == 180 * 6
    assert two.height > one.height
    assert not list(tmp_path.glob(".*"))  # written atomically, no temporary files left
