"""Export: parity for K-Net and Mask R-CNN at fixed and dynamic sizes, precisions, the CLI, AP agreement."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from export.exporter import onnx_export
from export.exporter.adapters import (
    ADAPTERS,
    ROI_METADATA_MASK_STRIDE,
    export_adapter,
    metadata_mask_stride,
)
from export.exporter.onnx_export import (
    ParityError,
    check_parity,
    convert_precision,
    export_checkpoint,
    export_model,
    model_info,
    sample_images,
)
from export.exporter.parity import BOUNDS, ParityReport, compare_instances
from export.metadata import ROI_FORMAT, TOPK_FORMAT
from export.runtime import Instances, Segmenter, prepare_batch
from sp_ray.checkpoint import load_checkpoint
from sp_ray.cli import main
from sp_ray.config import load_config
from sp_ray.models import FAMILIES
from sp_ray.models.maskrcnn import build_maskrcnn

from .conftest import IMAGE_SIZE

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(checkpoint):
    from sp_ray.models import build_model

    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt.config)
    model.load_state_dict(ckpt.model_state)
    return model.eval()


def test_each_family_gets_its_adapter_and_mask_stride_from_the_one_family_table() -> None:
    for name, family in FAMILIES.items():
        adapter = export_adapter(name)
        if family.mask_stride is None:  # per-RoI masks
            assert adapter is ADAPTERS[ROI_FORMAT] and metadata_mask_stride(name) == ROI_METADATA_MASK_STRIDE
        else:
            assert adapter is ADAPTERS[TOPK_FORMAT] and metadata_mask_stride(name) == family.mask_stride
    assert {name: metadata_mask_stride(name) for name in FAMILIES} == {
        "knet": 8, "mask2former": 4, "queryinst": 4, "maskrcnn": 8}  # what the exports' metadata has always said
    with pytest.raises(ValueError, match="not one of"):
        export_adapter("nosuchfamily")


def test_dynamic_knet_export_passes_fp32_parity_with_a_static_graph(knet_export) -> None:
    report = knet_export.parity
    assert report.passed and report.precision == "fp32" and report.bounds == BOUNDS["fp32"]
    assert report.detections > 0 and report.matched == report.detections
    assert report.max_score_diff <= 1e-3 and report.pooled_iou >= 0.99
    graph = onnx.load(str(knet_export.path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in graph.output] == ["scores", "labels", "mask_logits"]
    # Fixed-size top-k: no data-dependent control flow or shapes in the graph.
    assert not {n.op_type for n in graph.node} & {"Loop", "If", "NonZero", "NonMaxSuppression"}
    shape = graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in (shape[0], shape[2], shape[3])) and shape[1].dim_value == 3


def test_cli_exports_a_fixed_size_fixed_batch_model(trained_knet, synthetic, tmp_path, capsys) -> None:
    out = tmp_path / "fixed.onnx"
    code = main(["export", "--checkpoint", str(trained_knet), "--out", str(out), "--input-size", "64x64",
                 "--batch", "2", "--parity-images", str(synthetic["images"])])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "parity fp32" in printed and "PASS" in printed and "input 64x64, batch 2" in printed
    segmenter = Segmenter(out, providers=["CPUExecutionProvider"], threads=1)
    assert segmenter.info.input_size == (64, 64) and segmenter.info.batch_size == 2
    assert segmenter.session.get_inputs()[0].shape == [2, 3, 64, 64]
    images = sample_images(None, count=3)
    found = segmenter.predict_batch(images)
    assert [f.masks.shape[1:] for f in found] == [image.shape[:2] for image in images]


def test_bad_export_arguments_are_reported(trained_knet, tmp_path, capsys) -> None:
    code = main(["export", "--checkpoint", str(trained_knet), "--out", str(tmp_path / "x.onnx"),
                 "--input-size", "60x64"])
    assert code == 2 and "multiples of 32" in capsys.readouterr().err
    code = main(["export", "--checkpoint", str(trained_knet), "--out", str(tmp_path / "x.onnx"),
                 "--input-size", "big"])
    assert code == 2 and "HxW" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_a_fixed_size_graph_shrinks_images_that_do_not_fit(knet_export) -> None:
    info = dataclasses.replace(knet_export.info, input_size=(32, 64), batch_size=None)
    batch, sizes = prepare_batch([np.full((64, 64, 3), 200, np.uint8), np.zeros((20, 70, 3), np.uint8)], info)
    assert batch.shape == (2, 3, 32, 64) and sizes == [(32, 32), (18, 64)]
    assert batch[0, :, :32, :32].min() == 200 and batch[0, :, :, 32:].max() == 0


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_stays_within_its_stated_bounds(knet_export, trained_knet, synthetic, tmp_path,
                                                          precision) -> None:
    path = tmp_path / f"knet_{precision}.onnx"
    shutil.copy(knet_export.path, path)
    images = sample_images(synthetic["images"], count=4)
    info = convert_precision(path, precision, knet_export.info, calibration=images)
    assert info.precision == precision
    report = check_parity(_model(trained_knet), path, images, threads=1)
    print(report.summary())
    assert report.precision == precision and report.passed, report.summary()
    assert Segmenter(path, providers=["CPUExecutionProvider"]).info.precision == precision


@pytest.fixture(scope="module")
def tiny_maskrcnn():
    torch.manual_seed(0)
    return build_maskrcnn(num_classes=4, depth=18, frozen_stages=-1, detections_per_image=10,
                          test_proposals=40).eval()


def _maskrcnn_info(input_size, batch_size):
    cfg = load_config(None, ["model.name=maskrcnn", "model.num_classes=4", f"data.max_size={IMAGE_SIZE}",
                             f"data.short_size={IMAGE_SIZE}", "eval.topk=10"])
    return model_info(cfg, class_names=list("abcd"), cat_ids=[1, 2, 3, 7], input_size=input_size,
                      batch_size=batch_size)


@pytest.mark.parametrize("input_size,batch_size", [(None, 1), ((64, 64), 2)])
def test_maskrcnn_exports_with_parity(tiny_maskrcnn, tmp_path, input_size, batch_size) -> None:
    info = _maskrcnn_info(input_size, batch_size)
    images = sample_images(None, count=3)
    sample, _ = prepare_batch(images[:batch_size], info)
    path = export_model(tiny_maskrcnn, info, tmp_path / "maskrcnn.onnx", sample=sample)
    report = check_parity(tiny_maskrcnn, path, images, threads=1)
    assert report.passed and report.detections > 0, report.summary()
    segmenter = Segmenter(path, providers=["CPUExecutionProvider"], threads=1)
    found = segmenter.predict(images[0])
    assert found.masks.shape[1:] == images[0].shape[:2] and len(found) <= 10
    assert set(found.category_ids.tolist()) <= {1, 2, 3, 7}
    if input_size is None:
        convert_precision(path, "int8", info, calibration=images)
        report = check_parity(tiny_maskrcnn, path, images, threads=1)
        assert report.precision == "int8" and report.passed, report.summary()


def test_maskrcnn_refuses_dynamic_batch_and_fp16(tiny_maskrcnn, tmp_path) -> None:
    info = _maskrcnn_info(None, None)
    with pytest.raises(ValueError, match="fixed batch"):
        export_model(tiny_maskrcnn, info, tmp_path / "m.onnx", sample=np.zeros((1, 3, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="--fp16 is not supported for maskrcnn"):
        convert_precision(tmp_path / "m.onnx", "fp16", _maskrcnn_info(None, 1))


def _instances(scores, labels, masks) -> Instances:
    return Instances(boxes=np.zeros((len(scores), 4), np.float32), scores=np.asarray(scores, np.float32),
                     labels=np.asarray(labels), category_ids=np.asarray(labels), masks=np.asarray(masks))


def test_parity_matching_tolerates_tie_order_but_not_label_or_mask_changes() -> None:
    masks = np.zeros((3, 8, 8), bool)
    masks[0, :4], masks[1, 4:], masks[2, :, :2] = True, True, True
    reference = [_instances([0.9, 0.5, 0.5], [1, 2, 3], masks)]
    swapped = [_instances([0.9, 0.5, 0.5], [1, 3, 2], masks[[0, 2, 1]])]
    assert compare_instances(reference, swapped, precision="fp32").passed
    relabelled = [_instances([0.9, 0.5, 0.5], [1, 2, 0], masks)]
    report = compare_instances(reference, relabelled, precision="fp32")
    assert report.matched == 2 and not report.passed
    shifted = masks.copy()
    shifted[0] = np.roll(masks[0], 1, axis=0)  # IoU 0.6: the same object, badly segmented
    report = compare_instances(reference, [_instances([0.9, 0.5, 0.5], [1, 2, 3], shifted)], precision="fp32")
    assert report.matched == 3 and report.pooled_iou == pytest.approx(72 / 88) and not report.passed
    assert report.mean_iou == pytest.approx((0.6 + 1 + 1) / 3)  # each pair alike: 24/40 and two exact masks
    shifted[0] = np.roll(masks[0], 3, axis=0)  # IoU 0.14: another object
    report = compare_instances(reference, [_instances([0.9, 0.5, 0.5], [1, 2, 3], shifted)], precision="fp32")
    assert report.matched == 2 and report.pooled_iou == 1.0 and not report.passed
    rescored = [_instances([0.9, 0.5, 0.52], [1, 2, 3], masks)]
    assert not compare_instances(reference, rescored, precision="fp32").passed
    assert compare_instances(reference, rescored, precision="int8").passed


def test_a_failed_parity_check_keeps_the_model_out_of_place(trained_knet, knet_export, tmp_path,
                                                            monkeypatch) -> None:
    def fake_export(model, info, out, *, sample, opset):
        shutil.copy(knet_export.path, out)
        return out

    failing = ParityReport(precision="fp32", images=1, detections=10, matched=9, max_score_diff=0.0,
                           pooled_iou=1.0, min_iou=1.0, bounds=BOUNDS["fp32"])
    monkeypatch.setattr(onnx_export, "export_model", fake_export)
    monkeypatch.setattr(onnx_export, "check_parity", lambda *args, **kwargs: failing)
    out = tmp_path / "model.onnx"
    with pytest.raises(ParityError, match="matched 9/10"):
        export_checkpoint(trained_knet, out)
    assert not out.exists() and (tmp_path / "model.parity-failed.onnx").exists()


def test_onnx_ap_agrees_with_the_checkpoint_ap(trained_knet, knet_export, synthetic, tmp_path) -> None:
    common = ["--annotations", str(synthetic["train"]), "--images", str(synthetic["images"])]
    assert main(["evaluate", "--checkpoint", str(trained_knet), "--out", str(tmp_path / "pt.json"),
                 *common]) == 0
    assert main(["evaluate", "--onnx", str(knet_export.path), "--out", str(tmp_path / "ort.json"),
                 *common]) == 0
    torch_ap = json.loads((tmp_path / "pt.json").read_text())
    onnx_ap = json.loads((tmp_path / "ort.json").read_text())
    assert torch_ap["segm"]["AP"] > 5 and torch_ap["bbox"]["AP"] > 5, torch_ap
    for iou_type in ("segm", "bbox"):
        for metric in ("AP", "AP50", "AP75"):
            assert abs(torch_ap[iou_type][metric] - onnx_ap[iou_type][metric]) <= 0.2, (iou_type, metric)
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert predictions and {p["category_id"] for p in predictions} <= {1, 2, 3, 4}


def test_nms_models_may_lose_two_percent_of_detections_in_fp32() -> None:
    masks = np.zeros((50, 10, 10), bool)
    for i in range(50):
        masks[i].flat[i] = True
    scores = np.linspace(0.9, 0.1, 50)
    reference = [_instances(scores, np.zeros(50, int), masks)]
    one_lost = [_instances(scores[1:], np.zeros(49, int), masks[1:])]
    assert not compare_instances(reference, one_lost, precision="fp32").passed
    assert compare_instances(reference, one_lost, precision="fp32", nms=True).passed


def test_parity_counts_missing_detections_as_mismatches() -> None:
    masks = np.ones((2, 4, 4), bool)
    report = compare_instances([_instances([0.9, 0.8], [0, 1], masks)], [_instances([], [], masks[:0])],
                               precision="fp16")
    assert report.detections == 2 and report.matched == 0 and not report.passed
