from __future__ import annotations

import json
from pathlib import Path

import pytest

from sp_ray.data.split import fraction_tag, split_fractions

NUM_IMAGES = 40


@pytest.fixture()
def train_json(tmp_path: Path) -> Path:
    """40 images with non-contiguous ids listed out of order, 0..3 annotations each."""
    ids = [3 * i + 5 for i in range(NUM_IMAGES)][::-1]
    images = [{"id": i, "file_name": f"img_{i}.jpg", "height": 10, "width": 10} for i in ids]
    annotations = []
    for image_id in ids:
        for _ in range(image_id % 4):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": [[0, 0, 5, 0, 5, 5]],
                    "area": 12.5,
                    "bbox": [0, 0, 5, 5],
                    "iscrowd": 0,
                }
            )
    data = {
        "info": {"description": "fixture"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    return path


def _image_ids(path: Path) -> set[int]:
    return {image["id"] for image in json.loads(path.read_text())["images"]}


def test_fraction_tag() -> None:
    tags = [fraction_tag(f) for f in (0.01, 0.05, 0.1, 0.005, 1.0, 0.07)]
    assert tags == ["1", "5", "10", "0.5", "100", "7"]


def test_same_seed_gives_identical_files(train_json: Path, tmp_path: Path) -> None:
    first = split_fractions(train_json, [0.05, 0.1], seed=3, out_dir=tmp_path / "a")
    second = split_fractions(train_json, [0.1, 0.05], seed=3, out_dir=tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert names == [
        "split_seed3.json",
        "train_10pct_seed3.json",
        "train_10pct_seed3_unlabeled.txt",
        "train_5pct_seed3.json",
        "train_5pct_seed3_unlabeled.txt",
    ]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert {f: p.name for f, p in first.items()} == {f: p.name for f, p in second.items()}
    other = split_fractions(train_json, [0.1], seed=4, out_dir=tmp_path / "c")
    assert _image_ids(other[0.1]) != _image_ids(first[0.1])


def test_fractions_are_nested_with_the_right_counts(train_json: Path, tmp_path: Path) -> None:
    fractions = [0.01, 0.05, 0.1, 0.5, 1.0]
    paths = split_fractions(train_json, fractions, seed=0, out_dir=tmp_path / "out")
    assert set(paths) == set(fractions)
    assert paths[0.01].name == "train_1pct_seed0.json"
    counts = {f: len(_image_ids(paths[f])) for f in fractions}
    assert counts == {0.01: 1, 0.05: 2, 0.1: 4, 0.5: 20, 1.0: 40}
    for smaller, larger in zip(fractions[:-1], fractions[1:], strict=True):
        assert _image_ids(paths[smaller]) <= _image_ids(paths[larger])

    source = json.loads(train_json.read_text())
    summary = json.loads((tmp_path / "out" / "split_seed0.json").read_text())
    assert summary["num_images"] == NUM_IMAGES and summary["seed"] == 0
    for fraction in fractions:
        subset = json.loads(paths[fraction].read_text())
        chosen = {image["id"] for image in subset["images"]}
        assert subset["categories"] == source["categories"] and subset["info"] == source["info"]
        expected_anns = [ann for ann in source["annotations"] if ann["image_id"] in chosen]
        assert subset["annotations"] == expected_anns
        entry = summary["fractions"][fraction_tag(fraction)]
        assert entry["num_images"] == len(chosen)
        assert entry["num_annotations"] == len(expected_anns)
        assert entry["num_unlabeled"] == NUM_IMAGES - len(chosen)


def test_unlabeled_list_is_the_complement(train_json: Path, tmp_path: Path) -> None:
    paths = split_fractions(train_json, [0.1, 1.0], seed=0, out_dir=tmp_path)
    source = json.loads(train_json.read_text())
    labeled = {image["file_name"] for image in json.loads(paths[0.1].read_text())["images"]}
    unlabeled_lines = (tmp_path / "train_10pct_seed0_unlabeled.txt").read_text().splitlines()
    assert len(unlabeled_lines) == len(set(unlabeled_lines)) == NUM_IMAGES - 4
    assert labeled.isdisjoint(unlabeled_lines)
    assert labeled | set(unlabeled_lines) == {image["file_name"] for image in source["images"]}
    assert (tmp_path / "train_100pct_seed0_unlabeled.txt").read_text() == ""


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_bad_fraction_is_an_error(train_json: Path, tmp_path: Path, fraction: float) -> None:
    with pytest.raises(ValueError, match=r"not in \(0, 1\]"):
        split_fractions(train_json, [0.1, fraction], seed=0, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_fractions_is_an_error(train_json: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fractions is empty"):
        split_fractions(train_json, [], seed=0, out_dir=tmp_path)
