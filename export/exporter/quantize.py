"""Calibrated static int8 quantization of an exported fp32 graph (onnxruntime QDQ, numpy only).

``quantize_int8`` runs onnxruntime's ``quant_pre_process`` (ONNX shape inference and its graph
optimisations, so that Conv + BatchNorm + Relu are one node before quantization) and then
``quantize_static`` in QDQ format: per-channel int8 weights, uint8 activations whose ranges are the
min / max seen on calibration images, prepared exactly as the runtime prepares an image
(``export.runtime.prepare_batch``). The convolutions and matrix products of the backbone and heads are
quantized by kind (``INT8_KINDS``); the others stay in fp32, where quantizing them costs accuracy.

uint8 activations with int8 weights (U8S8) are what onnxruntime's x86 kernels run fastest with VNNI
(AVX-512 VNNI, AVX-VNNI, AMX); on CPUs without VNNI its AVX2 kernels can saturate the int16 sums of U8S8
products (onnxruntime's ``reduce_range``, 7-bit weights, is the remedy there; not exposed until it is
measured on such a CPU).

``quantize_static_int8`` is the same code path for any one-input graph and ready calibration batches
(``quantize_int8`` prepares its batches with ``CalibrationImages``), e.g. a benchmark's bare backbone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from export.metadata import INPUT_NAME, ModelInfo, replace_metadata_props
from export.runtime import check_image, prepare_batch

log = logging.getLogger("sp_ray")

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# What a quantizable node computes, by its inputs: "conv" (a convolution with its weights; "roi_conv" when
# it works on RoIAlign's per-box features: Mask R-CNN's mask head, QueryInst's mask branch), "linear" (a
# MatMul / Gemm with a weight initializer: MLPs, FFNs, attention projections, class heads) and "dynamic"
# (a MatMul of two activations: kernels x features, attention scores), whose both sides get
# activation ranges. The exporter's optimiser drops module paths, so the kind is what a rule can name.
KINDS = ("conv", "roi_conv", "linear", "dynamic")
# The kinds quantized per family; the others stay fp32. Chosen with benchmarks/int8_kinds.py on the demo's
# trained tiny models (benchmarks/results/int8_kinds_<family>.md: segm AP on the demo's 80 val images, parity
# on 8). K-Net: convolutions alone keep AP (15.19 fp32 -> 15.18) and parity (151/158 matched, pooled mask IoU
# 0.976); its linear layers (kernel-update MLPs, FFNs, class heads) moved scores by up to 0.05 (103/158
# matched) for little time, and the activation products (kernels x features) further (92/158).
# Mask2Former: its linear layers (attention and FFNs of 9 decoder layers) are a large share of its time,
# and quantizing them keeps AP (15.88 -> 16.09) and parity (121/130, IoU 0.970). QueryInst: its RoI-head
# convolutions quantize as well as the backbone's (153/155 matched, IoU 0.986); its linear layers include
# batched MatMuls whose per-channel weights onnxruntime's QLinearMatMul refuses. Mask R-CNN: the box head's
# two fully connected layers over 1000 RoIs are much of its time.
INT8_KINDS: dict[str, tuple[str, ...]] = {
    "knet": ("conv",),
    "mask2former": ("conv", "linear"),
    "queryinst": ("conv", "roi_conv"),
    "maskrcnn": ("conv", "roi_conv", "linear"),
}


def node_kinds(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> kind (``KINDS``) of every quantizable node of ``model``'s main graph."""
    constants = {tensor.name for tensor in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    after_roi: set[str] = set()  # values computed from RoIAlign's output (nodes are in topological order)
    kinds = {}
    for node in model.graph.node:
        from_roi = node.op_type == "RoiAlign" or any(name in after_roi for name in node.input)
        if from_roi:
            after_roi.update(node.output)
        if node.op_type == "Conv":
            kinds[node.name] = "roi_conv" if from_roi else "conv"
        elif node.op_type in ("MatMul", "Gemm"):
            kinds[node.name] = "linear" if any(name in constants for name in node.input[:2]) else "dynamic"
    return kinds


class CalibrationBatches:
    """onnxruntime's ``CalibrationDataReader`` protocol over ready graph inputs.

    Args:
        batches: the calibration runs, each a graph input (uint8 [B, 3, H, W] for sp-ray's graphs); at least one.
        input_name: the graph input they feed.

    Raises:
        ValueError: no batches.
    """

    def __init__(self, batches: Sequence[np.ndarray], input_name: str = INPUT_NAME) -> None:
        if not batches:
            raise ValueError("static int8 quantization needs at least one calibration batch")
        self.batches = list(batches)
        self.input_name = input_name
        self._next = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._next, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._next = iter(self.batches)


class CalibrationImages(CalibrationBatches):
    """``CalibrationBatches`` of images prepared exactly as the runtime prepares them (``prepare_batch``).

    Args:
        images: uint8 [H, W, 3] RGB arrays, any sizes; at least one.
        info: the model's metadata (resize rule, fixed input size and batch).

    Raises:
        ValueError: no images, or an image the runtime would refuse.
    """

    def __init__(self, images: Sequence[np.ndarray], info: ModelInfo) -> None:
        if not images:
            raise ValueError("static int8 quantization needs at least one calibration image")
        checked = [check_image(image, where=f"calibration image {i}") for i, image in enumerate(images)]
        self.info = info
        # One image per run (a fixed-batch graph gets blank images beside it, as the runtime fills its last
        # batch): each image's own size, so a dynamic-size graph is calibrated at the sizes it will see.
        super().__init__([prepare_batch([image], info)[0] for image in checked])


@contextlib.contextmanager
def _quiet(level: int = logging.ERROR) -> Iterator[None]:
    # onnxruntime's quantizer logs INFO / WARNING lines to the root logger, hundreds per model.
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, level))
    try:
        yield
    finally:
        root.setLevel(previous)


def quantize_int8(
    path: str | os.PathLike,
    out: str | os.PathLike,
    info: ModelInfo,
    images: Sequence[np.ndarray],
    *,
    kinds: Sequence[str] | None = None,
) -> list[str]:
    """Write the static int8 (QDQ) quantization of the fp32 sp-ray model at ``path`` to ``out``, its metadata
    saying precision "int8".

    Args:
        path: an fp32 export (``export.exporter.onnx_export.export_model``).
        out: the .onnx file to write (may equal ``path``).
        info: the model's metadata (for the calibration preprocessing and ``INT8_KINDS``).
        images: calibration images, uint8 [H, W, 3] RGB; at least one.
        kinds: the kinds of node to quantize (``KINDS``); default ``INT8_KINDS[info.family]``.

    Returns:
        The names of the nodes kept in fp32.

    Raises:
        ValueError: no calibration images, or unknown kinds.
    """
    kinds = INT8_KINDS[info.family] if kinds is None else kinds
    kept = quantize_static_int8(path, out, CalibrationImages(images, info).batches, kinds=kinds)
    # The quantizer copies the fp32 model's metadata, which would still say "fp32" (and the parity bounds
    # and the runtime's repr follow ``precision``).
    _write_metadata(out, dataclasses.replace(info, precision="int8"))
    return kept


def quantize_static_int8(
    path: str | os.PathLike,
    out: str | os.PathLike,
    batches: Sequence[np.ndarray],
    *,
    kinds: Sequence[str],
    input_name: str = INPUT_NAME,
) -> list[str]:
    """Write the static int8 (QDQ) quantization of any one-input fp32 graph at ``path`` to ``out``.

    The one code path of ``quantize_int8``, also for graphs without sp-ray metadata (a benchmark's bare
    backbone): the caller prepares the calibration inputs (``CalibrationImages(images, info).batches`` for
    an sp-ray model).

    Args:
        path: an fp32 ONNX model with one input.
        out: the .onnx file to write (may equal ``path``).
        batches: the calibration runs, each a ready input of the graph (uint8 [B, 3, H, W] for sp-ray's
            graphs); at least one.
        kinds: the kinds of node to quantize (``KINDS``); the others stay fp32.
        input_name: the graph input the batches feed.

    Returns:
        The names of the nodes kept in fp32.

    Raises:
        ValueError: no calibration batches, or unknown kinds.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    kinds = tuple(kinds)
    if unknown := set(kinds) - set(KINDS):
        raise ValueError(f"unknown node kinds {sorted(unknown)}; kinds: {KINDS}")
    reader = CalibrationBatches(batches, input_name)
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX shape inference only: the symbolic one cannot multiply the `32 * Dim` sides of a dynamic-size
        # graph (sympy TypeError), and the Conv-only quantization needs no activation shapes.
        quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
        kept = [name for name, kind in node_kinds(onnx.load(str(prepared))).items()
                if kind not in kinds]
        staged = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared), str(staged), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=kept,
            calibrate_method=CalibrationMethod.MinMax,
        )
        os.replace(staged, out)
    return kept


def _write_metadata(path: str | os.PathLike, info: ModelInfo) -> None:
    """Replace the sp-ray metadata of the model at ``path`` with ``info``."""
    model = onnx.load(str(path))
    replace_metadata_props(model, info)
    onnx.save(model, str(path))
