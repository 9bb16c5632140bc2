"""The onnxruntime runtime: no torch, input checks, training's pre-processing, PyTorch's post-processing."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export.metadata import TOPK_FORMAT, ModelInfo
from export.rle import decode_rle
from export.runtime import Segmenter
from sp_ray.checkpoint import load_checkpoint
from sp_ray.data.coco import CocoInstanceDataset
from sp_ray.data.images import load_image_rgb
from sp_ray.data.transforms import build_transforms, collate
from sp_ray.models import build_model
from sp_ray.models.postprocess import postprocess

from .conftest import IMAGE_SIZE, REPO


@pytest.fixture(scope="module")
def segmenter(knet_export) -> Segmenter:
    return Segmenter(knet_export.path, providers=["CPUExecutionProvider"], threads=1)


RUNTIME_MODULES = ("runtime", "geometry", "resample", "rle", "metadata", "providers", "client", "coco_results")


def test_importing_the_runtime_loads_neither_torch_nor_ray() -> None:
    """The runtime layer (every module of ``export/`` outside ``export/exporter/``) is numpy + onnxruntime only."""
    assert sorted(p.stem for p in (REPO / "export").glob("*.py") if p.stem != "__init__") == sorted(RUNTIME_MODULES)
    code = (
        "import sys, json; " + "; ".join(f"import export.{name}" for name in RUNTIME_MODULES) + "; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'torchvision', 'ray', 'sp_ray', 'scipy', 'pycocotools'})))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []


@pytest.mark.parametrize(
    "image,match",
    [
        (np.zeros((20, 30, 3), np.float32), "uint8"),
        (np.zeros((20, 30), np.uint8), r"grayscale\? convert"),
        (np.zeros((20, 30, 4), np.uint8), "RGBA"),
        (np.zeros((3, 20, 30), np.uint8), "channels first"),
        (np.zeros((0, 30, 3), np.uint8), "empty image"),
        (np.zeros((2, 20, 30, 3), np.uint8), "rank 4"),
        ([[0, 1], [2, 3]], "numpy uint8 array"),
    ],
)
def test_bad_images_raise_value_errors_saying_what_was_expected(segmenter, image, match) -> None:
    with pytest.raises(ValueError, match=match):
        segmenter.predict(image)


def test_logs_the_execution_provider_and_rejects_unknown_ones(knet_export, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="export.runtime"):
        seg = Segmenter(knet_export.path, providers=["CPUExecutionProvider"])
    assert seg.providers == ["CPUExecutionProvider"]
    assert "runs on CPUExecutionProvider" in caplog.text
    with pytest.raises(ValueError, match="not available"):
        Segmenter(knet_export.path, providers=["NoSuchExecutionProvider"])
    with pytest.raises(FileNotFoundError):
        Segmenter(knet_export.path.with_name("missing.onnx"))


def test_a_model_without_sp_ray_metadata_is_refused(tmp_path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["scores"])], "plain",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, [1])],
        [helper.make_tensor_value_info("scores", TensorProto.UINT8, [1])],
    )  # fmt: skip
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ValueError, match="no sp-ray metadata"):
        Segmenter(path)


def test_metadata_round_trips_and_names_missing_fields(segmenter) -> None:
    info = segmenter.info
    assert ModelInfo.from_props(info.to_props()) == info
    assert info.family == "knet" and info.input_size is None and info.batch_size is None
    assert info.max_size == IMAGE_SIZE and info.class_names == ["disk", "square", "triangle", "ring"]
    props = info.to_props()
    del props["cat_ids"]
    with pytest.raises(ValueError, match="cat_ids"):
        ModelInfo.from_props(props)


def test_the_topk_format_string_is_the_one_older_exports_carry(knet_export, segmenter) -> None:
    """``TOPK_FORMAT`` (``KNET_FORMAT`` before the rename) keeps its value, so models exported before it still load."""
    assert TOPK_FORMAT == "topk_mask_logits"
    props = {p.key: p.value for p in onnx.load(str(knet_export.path), load_external_data=False).metadata_props}
    assert props["output_format"] == '"topk_mask_logits"'
    assert segmenter.info.output_format == TOPK_FORMAT
    older = {**props, "output_format": json.dumps("topk_mask_logits")}
    assert ModelInfo.from_props(older) == segmenter.info


@pytest.mark.parametrize("shape", [(61, 47), (64, 64), (30, 100), (129, 77)])
def test_round_trip_on_odd_sizes(segmenter, shape) -> None:
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    found = segmenter.predict(image)
    k = len(found)
    assert 1 <= k <= segmenter.info.topk and np.all(found.scores > 0)  # default score threshold: 0
    assert found.masks.shape == (k, *shape) and found.masks.dtype == bool
    assert found.boxes.shape == (k, 4) and found.boxes.dtype == np.float32
    assert np.all(found.boxes[:, 2] <= shape[1]) and np.all(found.boxes[:, 3] <= shape[0])
    assert np.all(np.diff(found.scores) <= 0)
    assert set(found.category_ids.tolist()) <= set(segmenter.info.cat_ids)
    np.testing.assert_array_equal(found.category_ids, np.asarray(segmenter.info.cat_ids)[found.labels])


def test_a_grayscale_image_is_refused_with_a_hint_whose_conversion_matches_the_loader(
    segmenter, synthetic, tmp_path
) -> None:
    """A 2-D (grayscale) array is refused, and the conversion the error names gives what a user gets
    from a grayscale file through ``load_image_rgb``: the same pixels, so the same predictions as
    the RGB file holding the same gray in its three channels."""
    from PIL import Image

    source = Image.open(sorted(synthetic["images"].iterdir())[0]).convert("L")
    gray = np.asarray(source)
    assert gray.ndim == 2 and gray.std() > 0
    with pytest.raises(ValueError, match=r"np\.repeat\(image\[\.\.\., None\], 3, axis=2\)"):
        segmenter.predict(gray)
    converted = np.repeat(gray[..., None], 3, axis=2)  # the conversion the error message names
    source.save(tmp_path / "gray.png")  # an 8-bit grayscale ("L") file
    Image.fromarray(converted, "RGB").save(tmp_path / "rgb.png")
    from_gray_file = load_image_rgb(tmp_path / "gray.png")
    assert from_gray_file.shape == (*gray.shape, 3) and from_gray_file.dtype == np.uint8
    np.testing.assert_array_equal(from_gray_file, converted)
    expected = segmenter.predict(load_image_rgb(tmp_path / "rgb.png"))
    assert len(expected) > 0 and expected.masks.any()
    for image in (converted, from_gray_file):
        found = segmenter.predict(image)
        np.testing.assert_array_equal(found.labels, expected.labels)
        np.testing.assert_allclose(found.scores, expected.scores, atol=1e-6)
        np.testing.assert_array_equal(found.masks, expected.masks)


def test_batch_equals_single_images_of_the_same_size_and_thresholds_apply(segmenter, synthetic) -> None:
    files = sorted(synthetic["images"].iterdir())[:3]
    images = [load_image_rgb(f) for f in files]
    batched = segmenter.predict_batch(images)
    for image, found in zip(images, batched, strict=True):
        single = segmenter.predict(image)
        np.testing.assert_allclose(found.scores, single.scores, atol=1e-5)
        assert (found.masks != single.masks).mean() < 1e-3
    threshold = float(np.median(batched[0].scores))
    kept = segmenter.predict(images[0], score_threshold=threshold)
    assert len(kept) > 0 and np.all(kept.scores > threshold)


def test_rle_output_decodes_to_the_masks(segmenter, synthetic) -> None:
    image = load_image_rgb(sorted(synthetic["images"].iterdir())[0])
    dense = segmenter.predict(image)
    coded = segmenter.predict(image, rle=True)
    assert coded.masks is None and len(coded.rles) == len(dense)
    for rle, mask in zip(coded.rles, dense.masks, strict=True):
        assert rle["size"] == list(image.shape[:2]) and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(decode_rle(rle), mask)


def test_runtime_instances_equal_the_pytorch_evaluation_path(segmenter, trained_knet, synthetic) -> None:
    """numpy resize + pad + decode == torchvision transform + collate + sp_ray postprocess."""
    ckpt = load_checkpoint(trained_knet)
    model = build_model(ckpt.config)
    model.load_state_dict(ckpt.model_state)
    model.eval()
    transforms = build_transforms(train=False, max_size=IMAGE_SIZE, short_size=IMAGE_SIZE)
    dataset = CocoInstanceDataset(synthetic["val"], synthetic["images"], transforms=transforms)
    for index in range(len(dataset)):
        images, targets = collate([dataset[index]])
        with torch.no_grad():
            (expected,) = postprocess(model(images.float()), image_sizes=[targets[0]["image_size"]],
                                      orig_sizes=[targets[0]["orig_size"]], k=segmenter.info.topk)
        info = dataset.coco.imgs[dataset.image_ids[index]]
        found = segmenter.predict(load_image_rgb(synthetic["images"] / info["file_name"]))
        np.testing.assert_allclose(found.scores, expected["scores"].numpy(), atol=1e-4)
        np.testing.assert_array_equal(found.labels, expected["labels"].numpy())
        assert (found.masks != expected["masks"].numpy()).mean() < 1e-3


def test_repr_names_the_provider(segmenter) -> None:
    assert "provider=CPUExecutionProvider" in repr(segmenter) and "family=knet" in repr(segmenter)


def test_images_above_the_pixel_limit_are_refused_before_any_work(knet_export) -> None:
    small = Segmenter(knet_export.path, providers=["CPUExecutionProvider"], threads=1, max_image_pixels=40 * 50 - 1)
    with pytest.raises(ValueError, match=r"image 0: 40x50 \(HxW\) is 2,000 pixels, more than the limit of 1,999; "
                                         r"downscale the image, or raise Segmenter\(\.\.\., max_image_pixels=N\)"):
        small.predict(np.zeros((40, 50, 3), np.uint8))
    assert len(small.predict(np.zeros((40, 49, 3), np.uint8)).scores) >= 0
    with pytest.raises(ValueError, match="max_image_pixels must be >= 1"):
        Segmenter(knet_export.path, max_image_pixels=0)


_LARGE_IMAGE_RUN = """
import json, sys
import numpy as np
from PIL import Image
from export.runtime import Segmenter


def memory_mb(field):
    # /proc, not getrusage: ru_maxrss survives exec, so a child would report pytest's own peak.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


segmenter = Segmenter(sys.argv[1], providers=["CPUExecutionProvider"], threads=1)
tile = np.asarray(Image.open(sys.argv[2]).convert("RGB"))
segmenter.predict(tile)
image = np.repeat(np.repeat(tile, 63, axis=0), 63, axis=1)[:4000, :4000]  # the shapes, 62.5 times larger
before = memory_mb("VmRSS")
coded = segmenter.predict(image, rle=True)
after_rle = memory_mb("VmHWM")
dense = segmenter.predict(image)
peak = memory_mb("VmHWM")
area = float(((dense.boxes[:, 2] - dense.boxes[:, 0]) * (dense.boxes[:, 3] - dense.boxes[:, 1])).sum())
print(json.dumps({"before_mb": before, "rle_peak_mb": after_rle, "peak_mb": peak, "instances": len(dense),
                  "rles": len(coded.rles), "mask_pixels": int(dense.masks.sum()), "box_area": area,
                  "shape": list(dense.masks.shape)}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak memory is read from /proc (Linux)")
def test_masks_of_a_4000_pixel_image_are_pasted_per_box_under_a_memory_cap(knet_export, synthetic) -> None:
    """A 4000 x 4000 image through the runtime in a fresh process (numpy + onnxruntime only). Resampling
    every top-k mask at image size took 4 x 16M bytes per detection (1.3 GB for these 20) plus as much
    again in temporaries; per box, the run holds the image (48 MB, and a transposed copy while resizing),
    the returned dense masks (16 MB each) and one box at a time."""
    tile = sorted(synthetic["images"].iterdir())[0]
    done = subprocess.run([sys.executable, "-c", _LARGE_IMAGE_RUN, str(knet_export.path), str(tile)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["shape"] == [found["instances"], 4000, 4000] and found["rles"] == found["instances"] > 0
    assert 0 < found["mask_pixels"] <= found["box_area"]
    assert found["rle_peak_mb"] - found["before_mb"] < 300, found
    assert found["peak_mb"] - found["before_mb"] < 300 + 16 * found["instances"], found
