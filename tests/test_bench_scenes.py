"""External scene lists: a valid file loads exactly, and each user error names its file and line."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpl_edit.bench.scenes import BenchScene, caption_words, load_jsonl
from dpl_edit.errors import DplError

CAT = np.zeros((8, 10), dtype=bool)
CAT[1:4, 1:5] = True
DOG = np.zeros((8, 10), dtype=bool)
DOG[5:8, 6:10] = True


def _good_record() -> dict:
    return {
        "id": "s1",
        "image": "img/s1.png",
        "source": "A cat, and a dog.",
        "target": "A cat, and a fox.",
        "masks": {"cat": "masks/cat.png", "dog": "masks/dog.png"},
        "edited_object": "dog",
        "ideal": "img/ideal.png",
    }


@pytest.fixture
def scene_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    (tmp_path / "masks").mkdir()
    pixels = np.arange(8 * 10 * 3, dtype=np.uint8).reshape(8, 10, 3)
    Image.fromarray(pixels).save(tmp_path / "img/s1.png")
    Image.fromarray(255 - pixels).save(tmp_path / "img/ideal.png")
    Image.fromarray(pixels[:4]).save(tmp_path / "img/small.png")
    Image.fromarray(CAT.astype(np.uint8) * 255).save(tmp_path / "masks/cat.png")
    Image.fromarray(DOG.astype(np.uint8)).save(tmp_path / "masks/dog.png")  # 0/1 values
    Image.fromarray(CAT[:4].astype(np.uint8) * 255).save(tmp_path / "masks/small.png")
    return tmp_path


def _write(directory: Path, *records: dict | str) -> Path:
    path = directory / "scenes.jsonl"
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_valid_file_loads_images_masks_and_paths_relative_to_it(scene_dir: Path):
    no_ideal = {**_good_record(), "id": "s2", "ideal": None}
    del no_ideal["ideal"]
    scenes = load_jsonl(_write(scene_dir, _good_record(), "", no_ideal))
    assert [s.id for s in scenes] == ["s1", "s2"]
    s1, s2 = scenes
    np.testing.assert_array_equal(s1.masks["cat"], CAT)
    np.testing.assert_array_equal(s1.masks["dog"], DOG)
    np.testing.assert_array_equal(s1.background_mask, ~(CAT | DOG))
    np.testing.assert_array_equal(s1.other_objects_mask("cat"), DOG)
    assert s1.source_image()[0, 1].tolist() == [3, 4, 5]
    assert s1.ideal_image()[0, 0].tolist() == [255, 254, 253]
    assert s2.ideal is None and s2.ideal_image() is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"masks": None}, "'masks' must be a non-empty object"),
        ({"image": "img/nope.png"}, "image file .*nope.png not found"),
        ({"ideal": "img/nope.png"}, "ideal file .*nope.png not found"),
        ({"masks": {"cat": "masks/nope.png"}, "edited_object": "cat"}, "mask file .*not found"),
        ({"masks": {"cat": "masks/small.png"}, "edited_object": "cat"}, "mask 'cat' is 4×10"),
        ({"ideal": "img/small.png"}, "ideal image is not the image's size 8×10"),
        ({"edited_object": "fox"}, "edited_object 'fox' is not one of the masks"),
        (
            {"masks": {"cow": "masks/cat.png"}, "edited_object": "cow"},
            "mask noun 'cow' is not a word",
        ),
        ({"source": "a cat and a cat and a dog"}, "mask noun 'cat' appears 2 times"),
        ({"image": 3}, "'image' must be a path string"),
        ({"target": ""}, "'target' must be a non-empty string"),
    ],
)
def test_bad_scene_fields_name_the_line(scene_dir: Path, change: dict, message: str):
    path = _write(scene_dir, _good_record(), {**_good_record(), "id": "s2", **change})
    with pytest.raises(DplError, match=rf"scenes\.jsonl:2: {message}"):
        load_jsonl(path)


def test_missing_keys_are_listed(scene_dir: Path):
    record = _good_record()
    del record["source"], record["edited_object"]
    with pytest.raises(DplError, match=r"scenes\.jsonl:1: missing keys: source, edited_object"):
        load_jsonl(_write(scene_dir, record))


def test_bad_json_and_non_object_lines(scene_dir: Path):
    with pytest.raises(DplError, match=r"scenes\.jsonl:3: bad JSON"):
        load_jsonl(_write(scene_dir, _good_record(), "", '{"id": "s2",'))
    with pytest.raises(DplError, match=r"scenes\.jsonl:1: line is not a JSON object"):
        load_jsonl(_write(scene_dir, "[1, 2]"))


def test_duplicate_ids_missing_and_empty_files(scene_dir: Path):
    with pytest.raises(DplError, match=r"scenes\.jsonl:2: duplicate id 's1'"):
        load_jsonl(_write(scene_dir, _good_record(), _good_record()))
    with pytest.raises(DplError, match="scene list .*absent.jsonl not found"):
        load_jsonl(scene_dir / "absent.jsonl")
    with pytest.raises(DplError, match="has no scenes"):
        load_jsonl(_write(scene_dir, ""))


def test_scene_from_arrays_is_validated_too():
    image = np.zeros((8, 10, 3), dtype=np.uint8)
    scene = BenchScene("w1", image, "a cat and a dog", "a cat and a fox", {"cat": CAT}, "cat")
    assert scene.source_image() is image
    with pytest.raises(DplError, match="mask 'cat' is 8×10 \\(uint8\\)"):
        BenchScene("w1", image, "a cat", "a dog", {"cat": CAT.astype(np.uint8)}, "cat")


def test_caption_words_drop_punctuation_and_case():
    assert caption_words("A red-ish Cat's toy, and a dog.") == [
        "a",
        "red-ish",
        "cat's",
        "toy",
        "and",
        "a",
        "dog",
    ]
