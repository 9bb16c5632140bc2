from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import nn

from sp_ray.cli import main
from sp_ray.config import Config, ConfigError, ProposeConfig, load_config
from sp_ray.data.coco import SIZE_MISMATCH, DatasetSkipWarning
from sp_ray.data.images import TOO_LARGE, UNREADABLE
from sp_ray.data.listing import list_images
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.models.common import IMAGENET_MEAN, IMAGENET_STD
from sp_ray.pretrain.propose import check_propose_config, proposal_identity, propose
from sp_ray.pretrain.saliency import SaliencyProposer, input_size
from sp_ray.pretrain.shards import (
    TOO_ELONGATED,
    UNDECODABLE,
    fingerprint,
    merge_shards,
    propose_images,
    write_shard,
)

SIZE = 128  # images and backbone input: C5 is 4x4 with 32-pixel cells


class _LabelBackbone(nn.Module):
    """Hand-made C5: the red level 40 k of a pixel means label k; a cell is the mix of its labels' vectors."""

    out_channels = [1, 1, 1, 16]

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("vectors", F.normalize(torch.randn(6, 16, generator=generator), dim=1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        red = x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        labels = (red / 40).round().long().clamp(0, 5)
        coverage = F.avg_pool2d(F.one_hot(labels, 6).permute(0, 3, 1, 2).float(), 32)  # (B, 6, h, w)
        return [x, x, x, torch.einsum("bkhw,kc->bchw", coverage, self.vectors)]


def _label_image(path: Path, boxes: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """Write a SIZE x SIZE PNG, red level 40 k inside box (y0, y1, x0, x1) of label k; return the labels."""
    labels = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for label, (y0, y1, x0, x1) in boxes.items():
        labels[y0:y1, x0:x1] = label
    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[..., 0] = labels * 40
    Image.fromarray(pixels).save(path)
    return labels


def _small_config(*overrides: str) -> Config:
    return load_config(
        None,
        [
            "model.depth=18",
            f"propose.max_size={SIZE}",
            f"propose.short_size={SIZE}",
            "propose.shard_size=3",
            "propose.batch_size=2",
            "propose.num_actors=1",
            *overrides,
        ],
    )


@pytest.fixture
def label_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path / "images"
    folder.mkdir()
    truths = {
        "a_two_objects.png": _label_image(
            folder / "a_two_objects.png", {1: (64, 128, 0, 64), 2: (32, 96, 96, 128)}
        ),
        "b_uniform.png": _label_image(folder / "b_uniform.png", {}),
        "c_one_object.png": _label_image(folder / "c_one_object.png", {3: (64, 96, 32, 96)}),
    }
    (folder / "d_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return folder, truths


def _saliency(cfg: ProposeConfig, backbone: nn.Module | None = None) -> SaliencyProposer:
    """The saliency proposer of ``cfg`` on the hand-made C5."""
    return SaliencyProposer(backbone or _LabelBackbone(), cfg, device=torch.device("cpu"))


def _decode(ann: dict) -> np.ndarray:
    return mask_utils.decode(ann["segmentation"]).astype(bool)


def test_propose_images_masks_prompts_and_skips(label_folder: tuple[Path, dict[str, np.ndarray]]) -> None:
    folder, truths = label_folder
    items = list_images(folder)
    assert [item["file_name"] for item in items] == [
        "a_two_objects.png",
        "b_uniform.png",
        "c_one_object.png",
        "d_broken.png",
    ]
    cfg = _small_config().propose
    result = propose_images(items, _saliency(cfg), cfg)

    # The undecodable file is skipped with its reason; the uniform image is kept without annotations.
    assert [entry["file_name"] for entry in result.failed] == ["d_broken.png"]
    assert result.failed[0]["reason"] == UNDECODABLE
    assert [image["id"] for image in result.images] == [1, 2, 3]
    assert all(image["height"] == SIZE and image["width"] == SIZE for image in result.images)
    by_image: dict[int, list[dict]] = {1: [], 2: [], 3: []}
    for ann in result.annotations:
        by_image[ann["image_id"]].append(ann)
    assert len(by_image[2]) == 0
    assert len(by_image[1]) == 2 and len(by_image[3]) == 1

    for image_id, name, labels in ((1, "a_two_objects.png", [1, 2]), (3, "c_one_object.png", [3])):
        masks = [_decode(ann) for ann in by_image[image_id]]
        for label in labels:
            truth = truths[name] == label
            # Not exactly 1: the bilinearly upsampled soft map rounds the corners of a mask one C5 cell
            # thick (0.81 for the 1x2-cell object), and a neighbour whose normalised correlation is above
            # 0 moves the 0.5 crossing a few pixels outwards.
            assert max((m & truth).sum() / (m | truth).sum() for m in masks) > 0.75
    for ann in result.annotations:
        assert ann["category_id"] == 1 and ann["iscrowd"] == 0 and ann["score"] >= 0.7
        assert ann["area"] == int(_decode(ann).sum())
        assert ann["bbox"] == [float(v) for v in mask_utils.toBbox(ann["segmentation"])]
    assert result.prompts.shape == (3, 16) and result.prompts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.prompts, axis=1), 1.0, atol=1e-5)


def test_batched_equals_single_image(label_folder: tuple[Path, dict[str, np.ndarray]]) -> None:
    folder, _ = label_folder
    items = list_images(folder)
    backbone = _LabelBackbone()
    one_cfg, three_cfg = _small_config("propose.batch_size=1").propose, _small_config("propose.batch_size=3").propose
    one = propose_images(items, _saliency(one_cfg, backbone), one_cfg)
    three = propose_images(items, _saliency(three_cfg, backbone), three_cfg)
    assert one.images == three.images and one.annotations == three.annotations and one.failed == three.failed
    np.testing.assert_allclose(one.prompts, three.prompts, atol=1e-6)


def test_truncated_jpegs_and_images_above_the_pixel_limit_are_counted_skips(
    label_folder: tuple[Path, dict[str, np.ndarray]], write_bad_image
) -> None:
    """The rule of every reader: one bad file (a decompression bomb included) is a counted skip, not an
    aborted run."""
    folder, _ = label_folder
    write_bad_image(folder / "e_cut.jpg", "truncated_jpeg")
    write_bad_image(folder / "f_bomb.png", "bomb_error")
    write_bad_image(folder / "g_bomb.png", "bomb_warning")
    items = list_images(folder)
    cfg = _small_config().propose
    result = propose_images(items, _saliency(cfg), cfg)
    reasons = {entry["file_name"]: entry["reason"] for entry in result.failed}
    assert reasons == {"d_broken.png": UNREADABLE, "e_cut.jpg": UNREADABLE, "f_bomb.png": TOO_LARGE,
                       "g_bomb.png": TOO_LARGE}
    assert [image["file_name"] for image in result.images] == ["a_two_objects.png", "b_uniform.png",
                                                               "c_one_object.png"]
    # A limit below the 128 x 128 images skips them too, with the size in the detail.
    small = propose_images(items[:1], _saliency(cfg), cfg, max_image_pixels=SIZE * SIZE - 1)
    assert small.images == [] and small.failed[0]["reason"] == TOO_LARGE
    assert "128x128 (HxW), 16,384 pixels" in small.failed[0]["detail"]
    # The limit changes which images are skipped, so it is part of a shard's fingerprint (the default is not).
    base = fingerprint(proposal_identity(_small_config()), items)
    assert fingerprint(proposal_identity(_small_config("data.max_image_pixels=1000")), items) != base
    with pytest.raises(ConfigError, match="data.max_image_pixels"):
        propose(folder, folder.parent / "out", _small_config("data.max_image_pixels=0"))


def test_merge_keeps_images_without_proposals(tmp_path: Path, label_folder: tuple[Path, dict]) -> None:
    folder, _ = label_folder
    items = list_images(folder)
    cfg = _small_config().propose
    backbone = _LabelBackbone()
    for index, shard in enumerate((items[:2], items[2:])):
        write_shard(
            tmp_path / "shards",
            index,
            propose_images(shard, _saliency(cfg, backbone), cfg),
            fingerprint=f"f{index}",
        )
    summary = merge_shards(tmp_path, ["f0", "f1"])
    assert summary["images"] == 3 and summary["annotations"] == 3
    assert summary["images_without_proposals"] == 1
    assert summary["failed"] == 1 and summary["failed_reasons"] == {UNDECODABLE: 1}
    data = json.loads((tmp_path / "annotations.json").read_text())
    assert [image["file_name"] for image in data["images"]] == [
        "a_two_objects.png",
        "b_uniform.png",
        "c_one_object.png",
    ]
    assert [ann["id"] for ann in data["annotations"]] == [1, 2, 3]
    prompts = np.load(tmp_path / "prompts.npy")
    assert prompts.shape == (3, 16)
    with pytest.raises(ValueError, match="shard 00001 is missing or stale"):
        merge_shards(tmp_path, ["f0", "other"])


def test_merge_with_no_annotation_at_all(tmp_path: Path, label_folder: tuple[Path, dict]) -> None:
    folder, _ = label_folder
    items = list_images(folder)[1:2]  # the uniform image only
    result = propose_images(items, _saliency(_small_config().propose), _small_config().propose)
    write_shard(tmp_path / "shards", 0, result, fingerprint="f")
    summary = merge_shards(tmp_path, ["f"])
    assert summary["images"] == 1 and summary["annotations"] == 0 and summary["images_without_proposals"] == 1
    assert np.load(tmp_path / "prompts.npy").shape == (0, 16)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "annotations.json"))
    assert coco.getImgIds() == [2] and coco.getAnnIds() == []


def test_json_image_list_keeps_ids_and_checks_sizes(tmp_path: Path, label_folder: tuple[Path, dict]) -> None:
    folder, _ = label_folder
    listing = {
        "images": [
            {"id": 17, "file_name": "a_two_objects.png", "height": SIZE, "width": SIZE},
            {"id": 4, "file_name": "c_one_object.png", "height": SIZE + 1, "width": SIZE},
            {"id": 9, "file_name": "b_uniform.png"},
        ]
    }
    path = tmp_path / "unlabeled.json"
    path.write_text(json.dumps(listing))
    items = list_images(path, image_root=folder)
    assert [item["id"] for item in items] == [17, 4, 9]
    assert items[0]["path"] == str(folder / "a_two_objects.png")
    result = propose_images(items, _saliency(_small_config().propose), _small_config().propose)
    assert [image["id"] for image in result.images] == [17, 9]
    assert [(entry["file_name"], entry["reason"]) for entry in result.failed] == [
        ("c_one_object.png", SIZE_MISMATCH)
    ]
    # Without image_root the file names are relative to the json's folder.
    assert list_images(path)[0]["path"] == str(tmp_path / "a_two_objects.png")


def test_too_elongated_image_is_skipped_with_keep_ratio(
    tmp_path: Path, label_folder: tuple[Path, dict]
) -> None:
    folder, _ = label_folder
    Image.new("RGB", (400, 1)).save(folder / "e_line.png")
    items = [item for item in list_images(folder) if item["file_name"] in ("c_one_object.png", "e_line.png")]
    cfg = _small_config("propose.keep_ratio=true").propose
    result = propose_images(items, _saliency(cfg), cfg)
    assert [image["file_name"] for image in result.images] == ["c_one_object.png"]
    assert [(entry["file_name"], entry["reason"]) for entry in result.failed] == [
        ("e_line.png", TOO_ELONGATED)
    ]


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        list_images(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(ValueError, match="images\\[0\\] needs"):
        list_images(bad)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}]}))
    with pytest.raises(ValueError, match="unique integer"):
        list_images(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match="valid JSON"):
        list_images(bad)


def test_list_images_recurses_and_skips_hidden(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".cache").mkdir()
    for name in ("b.JPG", "sub/a.png", ".cache/c.png", "readme.md"):
        (tmp_path / name).write_bytes(b"")
    assert [(item["id"], item["file_name"]) for item in list_images(tmp_path)] == [
        (1, "b.JPG"),
        (2, "sub/a.png"),
    ]


def test_input_size_rounds_to_the_c5_stride() -> None:
    paper = Config().propose
    assert input_size(480, 640, paper) == (800, 1344)
    assert input_size(640, 480, paper) == (800, 1344)  # keep_ratio false ignores the image's shape
    keep = load_config(None, ["propose.keep_ratio=true"]).propose
    assert input_size(480, 640, keep) == (800, 1056)  # 800 x 1066 rounded to multiples of 32
    assert input_size(640, 480, keep) == (1056, 800)


def test_bad_config_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="propose.mask_threshold"):
        check_propose_config(_small_config("propose.mask_threshold=1.5").propose)
    with pytest.raises(ConfigError, match="propose.scales"):
        check_propose_config(_small_config("propose.scales=[]").propose)
    with pytest.raises(ConfigError, match="propose.shard_size"):
        check_propose_config(_small_config("propose.shard_size=0").propose)


def test_shard_fingerprint_follows_results_not_scheduling(label_folder: tuple[Path, dict]) -> None:
    items = list_images(label_folder[0])
    base = fingerprint(proposal_identity(_small_config()), items)
    scheduling = _small_config("propose.batch_size=7", "propose.num_actors=3", "propose.cpus_per_actor=2")
    assert fingerprint(proposal_identity(scheduling), items) == base
    for change in ("propose.min_maskness=0.8", "model.depth=34", "train.seed=1", "propose.keep_ratio=true"):
        assert fingerprint(proposal_identity(_small_config(change)), items) != base, change
    assert fingerprint(proposal_identity(_small_config()), items[:2]) != base


def _synthetic_folder(root: Path) -> Path:
    images = write_synthetic_dataset(root / "synthetic", num_images=6, image_size=SIZE, seed=3)["images"]
    (images / "zz_broken.png").write_bytes(b"not an image at all")
    return images


@pytest.mark.slow
def test_propose_end_to_end_with_ray_and_resume(tmp_path: Path, local_ray, capsys) -> None:
    images = _synthetic_folder(tmp_path)
    out = tmp_path / "pseudo"
    cfg = _small_config()
    with pytest.warns(
        DatasetSkipWarning, match=r"skipped 1 of 7 images \(missing or unreadable image file: 1, e.g. zz_broken"
    ):
        first = propose(images, out, cfg)
    assert first["images_listed"] == 7 and first["images"] == 6 and first["failed"] == 1
    assert first["shards"] == 3 and first["shards_computed"] == 3 and first["shards_reused"] == 0
    assert first["images_per_s"] > 0

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out / "annotations.json"))
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "object"}]
    assert sorted(coco.getImgIds()) == [1, 2, 3, 4, 5, 6]
    anns = coco.loadAnns(sorted(coco.getAnnIds()))
    assert len(anns) == first["annotations"] > 0
    assert [ann["id"] for ann in anns] == list(range(1, len(anns) + 1))
    for ann in anns:
        mask = coco.annToMask(ann)
        assert mask.shape == (SIZE, SIZE) and mask.sum() == ann["area"] > 0
        assert isinstance(ann["segmentation"]["counts"], str) and 0.7 <= ann["score"] <= 1.0
    prompts = np.load(out / "prompts.npy")
    assert prompts.shape == (len(anns), 512) and prompts.dtype == np.float32
    assert first["images_without_proposals"] == sum(not coco.getAnnIds(imgIds=[i]) for i in coco.getImgIds())

    # A rerun (here through the CLI) reuses every shard: nothing is rewritten.
    parts = sorted((out / "shards").glob("*.json")) + sorted((out / "shards").glob("*.npy"))
    stamps = {path: path.stat().st_mtime_ns for path in parts}
    before = (out / "annotations.json").read_text()
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetSkipWarning)
        code = main(
            [
                "propose",
                "--images",
                str(images),
                "--out",
                str(out),
                "model.depth=18",
                f"propose.max_size={SIZE}",
                f"propose.short_size={SIZE}",
                "propose.shard_size=3",
                "propose.batch_size=2",
                "propose.num_actors=1",
            ]
        )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert (
        printed["shards_computed"] == 0 and printed["shards_reused"] == 3 and printed["images_per_s"] is None
    )
    assert {path: path.stat().st_mtime_ns for path in parts} == stamps
    assert (out / "annotations.json").read_text() == before

    # After an interruption that lost shard 1, only shard 1 is recomputed, with the same result.
    (out / "shards" / "00001.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetSkipWarning)
        again = propose(images, out, cfg)
    assert again["shards_computed"] == 1 and again["shards_reused"] == 2
    changed = {path for path in parts if not path.exists() or path.stat().st_mtime_ns != stamps[path]}
    assert changed == {out / "shards" / "00001.json", out / "shards" / "00001.npy"}
    assert (out / "annotations.json").read_text() == before
    np.testing.assert_array_equal(np.load(out / "prompts.npy"), prompts)
