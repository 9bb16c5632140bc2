from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from sp_ray.data.coco import IMAGE_TOO_LARGE, CocoInstanceDataset, DatasetSkipWarning, link_images
from sp_ray.data.images import UNREADABLE, UnusableImageError, load_image_rgb
from sp_ray.data.transforms import build_transforms

H, W = 12, 14


def _write_json(
    path: Path, images: list[dict], annotations: list[dict], categories: list[dict] | None = None
) -> Path:
    categories = categories if categories is not None else [{"id": 1, "name": "thing"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _image(image_id: int, file_name: str, height: int = H, width: int = W) -> dict:
    return {"id": image_id, "file_name": file_name, "height": height, "width": width}


def _write_png(path: Path, height: int = H, width: int = W) -> None:
    pixels = (np.arange(height * width * 3) % 251).astype(np.uint8).reshape(height, width, 3)
    Image.fromarray(pixels).save(path)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE written by hand: column-major runs, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _box_mask(y1: int, y2: int, x1: int, x2: int, height: int = H, width: int = W) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def _ann(ann_id: int, segmentation, *, image_id: int = 1, category_id: int = 1, **extra) -> dict:
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation}
    return {**ann, **extra}


@pytest.fixture()
def no_skip_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetSkipWarning)
        yield


def test_polygon_rle_and_crowd_annotations_decode(tmp_path: Path, no_skip_warning) -> None:
    _write_png(tmp_path / "a.png")
    rle_mask = _box_mask(0, 4, 11, 13)
    compressed_mask = _box_mask(9, 12, 0, 5)
    compressed = mask_utils.encode(np.asfortranarray(compressed_mask.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode("ascii")
    annotations = [
        _ann(10, [[2, 2, 10, 2, 10, 8, 2, 8]], image_id=5, category_id=7),
        _ann(11, _uncompressed_rle(rle_mask), image_id=5, category_id=3),
        _ann(12, compressed, image_id=5, category_id=7),
        _ann(13, _uncompressed_rle(_box_mask(5, 9, 11, 14)), image_id=5, category_id=3, iscrowd=1),
    ]
    categories = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    path = _write_json(tmp_path / "a.json", [_image(5, "a.png")], annotations, categories)

    dataset = CocoInstanceDataset(path, tmp_path)
    assert dataset.class_names == ["three", "seven"]
    assert dataset.cat_ids == [3, 7]
    assert dataset.cat_id_to_label == {3: 0, 7: 1}
    assert dataset.image_ids == [5]
    assert len(dataset) == 1
    assert not dataset.skipped

    image, target = dataset[0]
    assert set(target) == {"labels", "masks", "boxes", "image_id", "orig_size", "image_size"}
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, H, W)
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(load_image_rgb(tmp_path / "a.png")))
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 0, 1]
    masks = target["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.bool and masks.shape == (3, H, W)
    polygon_mask = _box_mask(2, 8, 2, 10)  # pycocotools: polygon corners lie on pixel boundaries
    for got, expected in zip(masks, [polygon_mask, rle_mask, compressed_mask], strict=True):
        assert np.array_equal(got.numpy(), expected)
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[2, 2, 10, 8], [11, 0, 13, 4], [0, 9, 5, 12]]
    assert target["image_id"] == 5
    assert target["orig_size"] == (H, W) and target["image_size"] == (H, W)


def test_image_without_annotations_gives_empty_target(tmp_path: Path, no_skip_warning) -> None:
    _write_png(tmp_path / "a.png")
    path = _write_json(tmp_path / "a.json", [_image(1, "a.png")], [])
    transforms = build_transforms(train=True, max_size=40, short_size=24)
    dataset = CocoInstanceDataset(path, tmp_path, transforms=transforms)
    image, target = dataset[0]
    assert image.shape == (3, 24, 28)
    assert target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 24, 28) and target["masks"].dtype == torch.bool
    assert target["boxes"].shape == (0, 4)
    assert target["image_size"] == (24, 28) and target["orig_size"] == (H, W)


def test_bad_inputs_are_skipped_with_one_counted_warning(tmp_path: Path) -> None:
    _write_png(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"this is not an image")
    _write_png(tmp_path / "other_size.png", height=10, width=10)
    images = [
        _image(1, "good.png"),
        _image(2, "missing.png"),
        _image(3, "broken.png"),
        _image(4, "other_size.png"),  # the json says 12x14, the file is 10x10
    ]
    square = [[2, 2, 10, 2, 10, 8, 2, 8]]
    annotations = [
        _ann(1, square, bbox=[2, 2, 8, 6]),
        _ann(2, [[1, 1, 5, 5]]),  # two points: not a polygon
        _ann(3, _uncompressed_rle(np.zeros((H, W), dtype=bool))),  # decodes to area 0
        _ann(4, square, bbox=[2, 2, 0, 6]),
        _ann(5, square, bbox=[100, 2, 8, 6]),
        _ann(6, square, category_id=99),
        _ann(7, square, image_id=42),
        _ann(8, square, image_id=2),
        _ann(9, {"size": [H + 1, W], "counts": [H * W + W]}),
        _ann(10, {"size": [H, W], "counts": "!!!!"}),  # not a valid compressed RLE string
    ]
    path = _write_json(tmp_path / "train.json", images, annotations)

    with pytest.warns(DatasetSkipWarning) as record:
        dataset = CocoInstanceDataset(path, tmp_path)
    messages = [str(w.message) for w in record if issubclass(w.category, DatasetSkipWarning)]
    assert len(messages) == 1
    message = messages[0]
    assert message.startswith("train.json: skipped 3 of 4 images (")
    assert "missing or unreadable image file: 2, e.g." in message
    assert str(tmp_path / "missing.png") in message and str(tmp_path / "broken.png") in message
    assert "image size differs from json width/height: 1" in message
    assert "and 9 of 10 annotations (" in message
    assert "empty or degenerate segmentation: 2, e.g. annotation id 2, annotation id 3" in message
    assert "box outside the image or non-positive width/height: 2" in message
    assert dataset.skipped == Counter(
        {
            "missing or unreadable image file": 2,
            "image size differs from json width/height": 1,
            "empty or degenerate segmentation": 2,
            "box outside the image or non-positive width/height": 2,
            "unknown category id": 1,
            "unknown image id": 1,
            "on a skipped image": 1,
            "malformed segmentation (RLE size or counts do not fit the image)": 2,
        }
    )
    assert dataset.image_ids == [1]
    _, target = dataset[0]
    assert target["labels"].tolist() == [0]


def test_compressed_rle_with_wrong_total_is_an_error_at_getitem(tmp_path: Path) -> None:
    _write_png(tmp_path / "a.png")
    # "52": runs 5 and 2, well-formed but covering 7 of 168 pixels; pycocotools decodes it to garbage.
    path = _write_json(tmp_path / "a.json", [_image(1, "a.png")], [_ann(4, {"size": [H, W], "counts": "52"})])
    dataset = CocoInstanceDataset(path, tmp_path)
    with pytest.raises(ValueError, match=r"annotation id 4 .*a\.png.*12x14"):
        dataset[0]


def test_image_that_fails_to_decode_later_names_the_file(tmp_path: Path) -> None:
    _write_png(tmp_path / "full.png", height=64, width=64)
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # header intact, pixel data truncated
    path = _write_json(tmp_path / "a.json", [_image(1, "cut.png", 64, 64)], [])
    dataset = CocoInstanceDataset(path, tmp_path)
    assert len(dataset) == 1
    with pytest.warns(DatasetSkipWarning, match="cut.png"), pytest.raises(UnusableImageError, match="cut.png") as info:
        dataset.load(0)
    assert info.value.reason == UNREADABLE
    # __getitem__ has no other image to give: it says so, naming the file.
    with pytest.raises(OSError, match=r"none of the 1 images .* decodes \(e.g. .*cut.png\)"):
        dataset[0]


def test_truncated_jpeg_is_counted_once_and_replaced_by_the_next_image(tmp_path: Path, write_bad_image) -> None:
    """Training goes on (no retried crash): the loader gets the next image; the skip is counted with its
    annotations, once however often the image is drawn."""
    write_bad_image(tmp_path / "cut.jpg", "truncated_jpeg")
    _write_png(tmp_path / "good.png")
    square = [[2, 2, 10, 2, 10, 8, 2, 8]]
    path = _write_json(
        tmp_path / "a.json", [_image(1, "cut.jpg", 64, 64), _image(2, "good.png")],
        [_ann(1, square, image_id=1), _ann(2, square, image_id=1), _ann(3, square, image_id=2)],
    )  # fmt: skip
    dataset = CocoInstanceDataset(path, tmp_path)
    assert dataset.image_ids == [1, 2]  # the header reads: found only when decoding
    warned = r"skipped image id 1 \(missing or unreadable image file.*with its 2 annotations"
    with pytest.warns(DatasetSkipWarning, match=warned):
        _, target = dataset[0]
    assert target["image_id"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetSkipWarning)  # no second warning for the same image
        assert dataset[0][1]["image_id"] == 2 and dataset[1][1]["image_id"] == 2
    assert dataset.unreadable == {1: UNREADABLE}
    assert dataset.skipped == Counter({UNREADABLE: 1, "on a skipped image": 2})
    assert dataset.skipped_images == Counter({UNREADABLE: 1})


def test_images_above_the_pixel_limit_are_skipped_and_counted(tmp_path: Path, write_bad_image) -> None:
    _write_png(tmp_path / "small.png", height=8, width=8)
    _write_png(tmp_path / "big.png")  # 12 x 14 = 168 pixels
    write_bad_image(tmp_path / "bomb.png", "bomb_error")  # PIL's decompression-bomb error, the same rule
    square = [[1, 1, 6, 1, 6, 6, 1, 6]]
    images = [_image(1, "small.png", 8, 8), _image(2, "big.png"), _image(3, "bomb.png", 20_000, 20_000)]
    path = _write_json(tmp_path / "a.json", images, [_ann(1, square, image_id=2)])
    with pytest.warns(DatasetSkipWarning, match=r"skipped 2 of 3 images \(image larger than max_image_pixels: 2"):
        dataset = CocoInstanceDataset(path, tmp_path, max_image_pixels=100)
    assert dataset.image_ids == [1]
    assert dataset.skipped == Counter({IMAGE_TOO_LARGE: 2, "on a skipped image": 1})
    with pytest.raises(ValueError, match="data.max_image_pixels"):
        CocoInstanceDataset(path, tmp_path, max_image_pixels=0)


def test_instances_emptied_by_resize_are_dropped_and_counted(tmp_path: Path, no_skip_warning) -> None:
    _write_png(tmp_path / "a.png", height=40, width=40)
    dot = _box_mask(1, 2, 1, 2, 40, 40)  # one pixel that a 4x nearest-neighbour downscale does not sample
    square = _box_mask(8, 32, 8, 32, 40, 40)
    annotations = [_ann(1, _uncompressed_rle(dot)), _ann(2, _uncompressed_rle(square))]
    path = _write_json(tmp_path / "a.json", [_image(1, "a.png", 40, 40)], annotations)
    transforms = build_transforms(train=False, max_size=20, short_size=10)
    dataset = CocoInstanceDataset(path, tmp_path, transforms=transforms)
    _, target = dataset[0]
    assert target["labels"].tolist() == [0]
    assert target["masks"].shape == (1, 10, 10) and isinstance(target["masks"], tv_tensors.Mask)
    assert target["boxes"].tolist() == [[2.0, 2.0, 8.0, 8.0]]
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert dataset.skipped == Counter({"instance empty after transforms": 1})


def _mode_case(mode: str) -> tuple[Image.Image, np.ndarray]:
    """A 4x6 image in ``mode`` and the RGB uint8 [4, 6, 3] it must load as."""
    ramp = np.arange(24, dtype=np.int64).reshape(4, 6)
    if mode == "L":
        gray = (ramp * 10).astype(np.uint8)
        return Image.fromarray(gray, mode="L"), np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "RGBA":
        rgba = np.stack([ramp * 10, 255 - ramp * 10, ramp, (ramp * 7) % 256], axis=2).astype(np.uint8)
        return Image.fromarray(rgba, mode="RGBA"), rgba[:, :, :3]
    if mode == "P":
        palette = np.arange(256 * 3, dtype=np.int64).reshape(256, 3) * 5 % 256
        indices = (ramp * 3).astype(np.uint8)
        image = Image.fromarray(indices, mode="L")
        image = image.convert("P")
        image.putpalette(palette.astype(np.uint8).flatten().tolist())
        return image, palette[indices].astype(np.uint8)
    if mode == "I;16":
        values = (ramp * 2849).astype(np.uint16)  # up to 65527: spans the 16-bit range
        expected = np.rint(values / 257.0).astype(np.uint8)
        return Image.fromarray(values), np.repeat(expected[:, :, None], 3, axis=2)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_image_modes_load_as_rgb_uint8(tmp_path: Path, mode: str, no_skip_warning) -> None:
    image, expected = _mode_case(mode)
    image.save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == mode
    path = _write_json(tmp_path / "a.json", [_image(1, "a.png", 4, 6)], [])
    loaded, _ = CocoInstanceDataset(path, tmp_path)[0]
    assert loaded.dtype == torch.uint8 and loaded.shape == (3, 4, 6)
    assert np.array_equal(loaded.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path: Path, suffix: str, no_skip_warning) -> None:
    stored = np.zeros((8, 16, 3), dtype=np.uint8)
    stored[:, :8] = 255  # left half white as stored; orientation 6 displays it rotated 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / f"a{suffix}", exif=exif, quality=95)
    top_half = [[0, 0, 8, 0, 8, 8, 0, 8]]
    path = _write_json(tmp_path / "a.json", [_image(1, f"a{suffix}", 16, 8)], [_ann(1, top_half)])
    image, target = CocoInstanceDataset(path, tmp_path)[0]
    assert image.shape == (3, 16, 8)
    assert image[:, 1:7, 1:7].min() > 200 and image[:, 9:15, 1:7].max() < 50
    assert target["masks"][0, :8].all() and not target["masks"][0, 8:].any()
    assert target["orig_size"] == (16, 8)


def test_size_mismatch_found_only_at_decode_is_an_error(tmp_path: Path) -> None:
    _write_png(tmp_path / "a.png")
    path = _write_json(tmp_path / "a.json", [_image(1, "a.png")], [])
    dataset = CocoInstanceDataset(path, tmp_path)
    _write_png(tmp_path / "a.png", height=W, width=H)  # replaced after the header check
    with pytest.raises(ValueError, match=r"a\.png.*12x14"):
        dataset[0]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "top level is a list"),
        (json.dumps({"images": [], "categories": []}), "'annotations' is missing"),
        (
            json.dumps({"images": [{"id": 1, "height": 4, "width": 4}], "annotations": [], "categories": []}),
            r"images\[0\] lacks required field\(s\) file_name",
        ),
        (
            json.dumps(
                {
                    "images": [_image(1, "a.png")],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1}],
                    "categories": [],
                }
            ),
            r"annotations\[0\] lacks required field\(s\) segmentation",
        ),
        (
            json.dumps(
                {"images": [_image(1, "a.png"), _image(1, "b.png")], "annotations": [], "categories": []}
            ),
            "duplicate images id",
        ),
        (json.dumps({"images": [_image(1, "a.png", 0, 4)], "annotations": [], "categories": []}), "positive"),
    ],
)
def test_non_coco_json_is_an_error_naming_the_file(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        CocoInstanceDataset(path, tmp_path)
    assert "broken.json" in str(info.value)


def test_missing_annotation_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        CocoInstanceDataset(tmp_path / "nowhere.json", tmp_path)


def test_link_images_links_the_images_of_a_json_and_keeps_existing_links(tmp_path: Path) -> None:
    (tmp_path / "images" / "sub").mkdir(parents=True)
    _write_png(tmp_path / "images" / "a.png")
    _write_png(tmp_path / "images" / "sub" / "b.png")
    _write_png(tmp_path / "images" / "unlisted.png")
    gt = _write_json(tmp_path / "gt.json", [_image(1, "a.png"), _image(2, "sub/b.png")], [])
    folder = link_images(gt, tmp_path / "images", tmp_path / "links")
    assert folder == tmp_path / "links"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png")) == ["a.png", "sub/b.png"]
    assert (folder / "sub" / "b.png").resolve() == (tmp_path / "images" / "sub" / "b.png").resolve()
    assert link_images(gt, tmp_path / "images", folder) == folder  # again: the links exist, nothing fails


def test_instances_rotated_out_of_the_image_are_dropped_and_counted(tmp_path: Path, no_skip_warning) -> None:
    _write_png(tmp_path / "a.png", height=40, width=40)
    corner = _box_mask(0, 2, 0, 2, 40, 40)  # a 2x2 corner: 30 degrees about the centre take it off the canvas
    square = _box_mask(12, 28, 12, 28, 40, 40)
    annotations = [_ann(1, _uncompressed_rle(corner)), _ann(2, _uncompressed_rle(square))]
    path = _write_json(tmp_path / "a.json", [_image(1, "a.png", 40, 40)], annotations)
    transforms = build_transforms(
        train=True, max_size=40, short_size=40, flip_prob=0.0, rotate_level=10, rotate_prob=1.0
    )
    dataset = CocoInstanceDataset(path, tmp_path, transforms=transforms)
    torch.manual_seed(0)
    image, target = dataset[0]
    assert target["labels"].tolist() == [0] and target["masks"].shape == (1, 40, 40)
    assert dataset.skipped == Counter({"instance empty after transforms": 1})
    box = target["boxes"].tolist()[0]
    assert box != [12.0, 12.0, 28.0, 28.0] and box[2] - box[0] > 16  # the square turned: its box grew
    assert int(image[:, 0, 0].float().mean()) == 128
