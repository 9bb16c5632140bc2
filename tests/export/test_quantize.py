"""Static int8 export: what is quantized, parity of every family, calibration images and their errors."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from export.onnx_export import (
    check_parity,
    convert_precision,
    export_checkpoint,
    export_model,
    load_calibration_images,
    model_info,
    sample_images,
)
from export.quantize import node_kinds
from export.runtime import prepare_batch
from sp_ray.cli import main
from sp_ray.config import load_config
from sp_ray.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _weight_inputs(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """Node name -> the op types producing its first two inputs."""
    producer = {out: node.op_type for node in graph.node for out in node.output}
    return {node.name: [producer.get(name, "initializer") for name in node.input[:2]] for node in graph.node}


def test_static_int8_quantizes_the_convolutions_and_keeps_the_kernel_updates_in_fp32(
        knet_export, synthetic, tmp_path) -> None:
    path = tmp_path / "knet_int8.onnx"
    shutil.copy(knet_export.path, path)
    convert_precision(path, "int8", knet_export.info, calibration=sample_images(synthetic["images"], count=4))
    graph = onnx.load(str(path)).graph
    inputs = _weight_inputs(graph)
    convs = [node for node in graph.node if node.op_type == "Conv"]
    linears = [node for node in graph.node if node.op_type in ("MatMul", "Gemm")]
    assert convs and linears
    # QDQ: a quantized Conv reads its activation and its weight through DequantizeLinear.
    assert all(inputs[node.name] == ["DequantizeLinear", "DequantizeLinear"] for node in convs)
    assert not any("DequantizeLinear" in inputs[node.name] for node in linears)
    per_channel = [node for node in graph.node if node.op_type == "DequantizeLinear"
                   and any(a.name == "axis" for a in node.attribute)]
    assert per_channel, "weights are quantized per output channel"


def test_node_kinds_tell_weights_from_activation_products() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1])
    w = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [onnx.helper.make_node("MatMul", ["x", "w"], ["h"], name="linear"),
             onnx.helper.make_node("Transpose", ["h"], ["ht"], name="t"),
             onnx.helper.make_node("MatMul", ["x", "ht"], ["y"], name="product")]
    graph = onnx.helper.make_graph(nodes, "g", [x], [y], initializer=[w])
    assert node_kinds(onnx.helper.make_model(graph)) == {"linear": "linear", "product": "dynamic"}


@pytest.mark.parametrize("family", ["mask2former", "queryinst"])
def test_static_int8_of_the_other_query_families_passes_its_parity_bounds(family, tmp_path) -> None:
    torch.manual_seed(0)
    # 128 px: at 64 the random QueryInst's RoI masks are all empty, and there would be nothing to compare.
    cfg = load_config(f"configs/demo/{family}_tiny_synthetic.yaml", [
        "data.max_size=128", "data.short_size=128", "model.num_classes=4", "eval.topk=10"])
    model = build_model(cfg)
    model.eval()
    info = model_info(cfg, class_names=list("abcd"), cat_ids=[1, 2, 3, 4], input_size=None, batch_size=1)
    images = sample_images(None, count=4)
    sample, _ = prepare_batch(images[:1], info)
    path = export_model(model, info, tmp_path / f"{family}.onnx", sample=sample)
    assert convert_precision(path, "int8", info, calibration=images).precision == "int8"
    report = check_parity(model, path, images, threads=1)
    assert report.precision == "int8" and report.detections > 0 and report.passed, report.summary()


def _write_images(folder, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((20 + i, 30, 3), 10 * i, np.uint8)).save(folder / name)


def test_calibration_reads_evenly_spaced_images_and_counts_the_unreadable(tmp_path, caplog) -> None:
    _write_images(tmp_path / "images", [f"{i}.png" for i in range(5)])
    (tmp_path / "images" / "2.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="sp_ray"):
        images = load_calibration_images(tmp_path / "images", count=3)
    # 3 of 5 evenly spaced: 0, 2, 4; 2.png is unreadable, skipped and named.
    assert [image.shape[0] for image in images] == [20, 24]
    assert "skipped 1 unreadable image" in caplog.text and "2.png" in caplog.text
    assert len(load_calibration_images(tmp_path / "images", count=50)) == 4


def test_calibration_refuses_an_empty_or_missing_folder(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"--calibration-images: no image files .* found under"):
        load_calibration_images(tmp_path / "empty", count=4)
    with pytest.raises(FileNotFoundError, match="--calibration-images"):
        load_calibration_images(tmp_path / "missing", count=4)
    _write_images(tmp_path / "bad", ["a.png"])
    (tmp_path / "bad" / "a.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="none of its 1 image files could be read"):
        load_calibration_images(tmp_path / "bad", count=4)


def test_cli_int8_export_refuses_an_empty_calibration_folder(trained_knet, tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["export", "--checkpoint", str(trained_knet), "--out", str(tmp_path / "q.onnx"), "--int8",
                 "--calibration-images", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 2 and "--calibration-images" in err and "no image files" in err
    assert not (tmp_path / "q.onnx").exists()


def test_int8_export_calibrates_on_the_config_val_images_by_default(trained_knet, tmp_path) -> None:
    result = export_checkpoint(trained_knet, tmp_path / "q.onnx", input_size=None, batch_size=None,
                               precision="int8", calibration_count=4)
    assert result.info.precision == "int8" and result.parity.passed, result.parity.summary()


def test_int8_export_without_val_images_asks_for_calibration_images(trained_knet, tmp_path) -> None:
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(trained_knet, checkpoint)
    config = checkpoint / "config.yaml"
    text = config.read_text()
    config.write_text("\n".join(line for line in text.splitlines() if "val_images" not in line) + "\n")
    with pytest.raises(ValueError, match="names no data.val_images; pass --calibration-images DIR"):
        export_checkpoint(checkpoint, tmp_path / "q.onnx", precision="int8")
