"""Image input: modes, cropping vs stretching, bad files; atomic PNG output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dpl_edit.errors import DplError
from dpl_edit.io.images import image_to_tensor, load_image, save_png


def test_rgba_and_grayscale_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.save(tmp_path / "a.png")
    Image.new("L", (10, 10), 77).save(tmp_path / "g.png")
    image = load_image(tmp_path / "a.png", 8)
    assert image.mode == "RGB" and image.size == (8, 8)
    assert np.asarray(image).min() == 255
    gray = np.asarray(load_image(tmp_path / "g.png", 8))
    assert gray.shape == (8, 8, 3) and (gray == 77).all()


def test_non_square_is_centre_cropped_or_stretched(tmp_path):
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, :10] = (255, 0, 0)  # left third red, middle green, right third blue
    wide[:, 10:20] = (0, 255, 0)
    wide[:, 20:] = (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    cropped = np.asarray(load_image(tmp_path / "wide.png", 10))
    assert (cropped == (0, 255, 0)).all()  # only the middle survives a centre crop
    stretched = np.asarray(load_image(tmp_path / "wide.png", 30, resize=True))
    assert stretched[:, 0, 0].min() > 200 and stretched[:, -1, 2].min() > 200


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DplError, match="does not exist"):
        load_image(tmp_path / "missing.png", 8)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DplError, match="cannot read image"):
        load_image(tmp_path / "bad.png", 8)


def test_tensor_range_and_atomic_png(tmp_path):
    image = Image.new("RGB", (4, 4), (255, 0, 127))
    tensor = image_to_tensor(image)
    assert tensor.shape == (1, 3, 4, 4)
    torch.testing.assert_close(tensor[0, :, 0, 0], torch.tensor([1.0, -1.0, 127 / 127.5 - 1]))
    path = save_png(image, tmp_path / "sub" / "out.png")
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
    assert [p.name for p in path.parent.iterdir()] == ["out.png"]
