"""Calibrated static int8 quantization of an exported fp32 graph (onnxruntime QDQ, numpy only).

``quantize_int8`` runs onnxruntime's ``quant_pre_process`` (symbolic shape inference and its graph
optimisations, so that Conv + BatchNorm + Relu are one node before quantization) and then
``quantize_static`` in QDQ format: per-channel int8 weights, uint8 activations whose ranges are the
min / max seen on calibration images, prepared exactly as the runtime prepares an image
(``export.runtime.prepare_batch``). The convolutions and matrix products of the backbone and heads are
quantized; the nodes of ``FP32_SCOPES`` stay in fp32, because quantizing them costs accuracy.

uint8 activations with int8 weights (U8S8) are what onnxruntime's x86 kernels run fastest with VNNI
(AVX-512 VNNI, AVX-VNNI, AMX); on CPUs without VNNI its AVX2 kernels can saturate the int16 sums of U8S8
products, so there ``reduce_range`` (7-bit weights) keeps the accuracy at some speed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from export.metadata import INPUT_NAME, ModelInfo
from export.runtime import check_image, prepare_batch

log = logging.getLogger("sp_ray")

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# Nodes kept in fp32, by the module path the exporter records (a node is kept when its path or name
# contains one of these). See the docstring of each entry for what its quantization cost.
FP32_SCOPES: dict[str, tuple[str, ...]] = {
    "knet": (),
    "mask2former": (),
    "queryinst": (),
    "maskrcnn": (),
}


class CalibrationImages:
    """onnxruntime's ``CalibrationDataReader`` protocol over images prepared by the runtime.

    Args:
        images: uint8 [H, W, 3] RGB arrays, any sizes.
        info: the model's metadata (resize rule, fixed input size and batch).
    """

    def __init__(self, images: Sequence[np.ndarray], info: ModelInfo) -> None:
        self.images = [check_image(image, where=f"calibration image {i}") for i, image in enumerate(images)]
        self.info = info
        self._next = iter(self._batches())

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        # One image per run (a fixed-batch graph gets blank images beside it, as the runtime fills its last
        # batch): each image's own size, so a dynamic-size graph is calibrated at the sizes it will see.
        for image in self.images:
            batch, _ = prepare_batch([image], self.info)
            yield {INPUT_NAME: batch}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._next, None)

    def rewind(self) -> None:
        self._next = iter(self._batches())


def node_scope(node: onnx.NodeProto) -> str:
    """The module path of a node: the dynamo exporter's ``namespace`` metadata, else the node name
    (the TorchScript exporter names nodes after their module path, ``/model/backbone/body/...``)."""
    for prop in node.metadata_props:
        if prop.key in ("namespace", "pkg.torch.onnx.name_scopes"):
            return prop.value
    return node.name


def fp32_nodes(model: onnx.ModelProto, scopes: Sequence[str]) -> list[str]:
    """Names of the quantizable nodes of ``model`` whose scope contains one of ``scopes``."""
    if not scopes:
        return []
    return [node.name for node in model.graph.node
            if node.op_type in QUANTIZED_OPS and any(scope in node_scope(node) for scope in scopes)]


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
    reduce_range: bool = False,
) -> list[str]:
    """Write the static int8 (QDQ) quantization of the fp32 model at ``path`` to ``out``.

    Args:
        path: an fp32 export (``export.onnx_export.export_model``).
        out: the .onnx file to write (may equal ``path``).
        info: the model's metadata (for the calibration preprocessing and ``FP32_SCOPES``).
        images: calibration images, uint8 [H, W, 3] RGB; at least one.
        reduce_range: 7-bit weights, for CPUs without VNNI (see the module docstring).

    Returns:
        The names of the nodes kept in fp32.

    Raises:
        ValueError: no calibration images.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not images:
        raise ValueError("static int8 quantization needs at least one calibration image")
    reader = CalibrationImages(images, info)
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(path), str(prepared), skip_symbolic_shape=False, auto_merge=True)
        kept = fp32_nodes(onnx.load(str(prepared)), FP32_SCOPES[info.family])
        staged = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared), str(staged), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=kept,
            calibrate_method=CalibrationMethod.MinMax,
        )
        os.replace(staged, out)
    return kept
