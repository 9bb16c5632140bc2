"""Checkpoint -> ONNX: export adapters outside the models, torch.onnx.export, checks, precision, parity.

The adapters (``export.exporter.adapters``, detectron2's export style) run the unchanged model, so the
exported graph is the trained graph, and add only what deployment needs inside the graph: the uint8 -> float
cast (normalisation is already in the models' forward) and a fixed-size top-k for the query-based families. Everything
data-dependent in size (thresholds, resampling to the original image, boxes from masks, RLE) is
left to the numpy runtime, configured by the metadata stored in the model.

Pipeline of ``export_checkpoint``: build the model from the checkpoint's config, export fp32
(K-Net and Mask2Former with the dynamo exporter, ``32 * Dim`` sides; Mask R-CNN with the TorchScript exporter, which
torchvision's detection models need), ``onnx.checker`` with shape inference, onnxruntime's basic
(hardware-independent) graph optimisations, optional fp16 conversion or calibrated static int8
quantization (``export.exporter.quantize``),
metadata, and the parity check of the final model against PyTorch fp32 on sample images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from export.exporter.adapters import export_adapter, metadata_mask_stride
from export.exporter.parity import ParityReport, compare_instances
from export.metadata import INPUT_NAME, OUTPUT_NAMES, ROI_FORMAT, TOPK_FORMAT, ModelInfo, replace_metadata_props
from export.runtime import Instances, Segmenter, check_image, decode_outputs, prepare_batch
from sp_ray import __version__
from sp_ray.checkpoint import load_checkpoint
from sp_ray.config import Config, config_hash
from sp_ray.data.images import load_image_rgb
from sp_ray.models import build_model
from sp_ray.models.common import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("sp_ray")

DEFAULT_OPSET = 18
PRECISIONS = ("fp32", "fp16", "int8")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Upper bound of each dynamic side, in units of 32 pixels (16384 px).
_MAX_SIDE_UNITS = 512


@dataclass
class ExportResult:
    """What ``export_checkpoint`` produced."""

    path: Path
    info: ModelInfo
    parity: ParityReport


def model_info(
    cfg: Config, *, class_names: Sequence[str], cat_ids: Sequence[int], input_size: tuple[int, int] | None,
    batch_size: int | None, precision: str = "fp32", source: str = "",
) -> ModelInfo:
    """The metadata of an export of a model built from ``cfg``."""
    adapter = export_adapter(cfg.model.name)
    if len(class_names) != cfg.model.num_classes or len(cat_ids) != cfg.model.num_classes:
        raise ValueError(f"{len(class_names)} class names and {len(cat_ids)} category ids for a model of "
                         f"{cfg.model.num_classes} classes")
    return ModelInfo(
        family=cfg.model.name,
        output_format=adapter.output_format,
        class_names=list(class_names),
        cat_ids=[int(c) for c in cat_ids],
        max_size=cfg.data.max_size,
        short_size=cfg.data.short_size,
        size_divisor=cfg.data.size_divisor,
        input_size=input_size,
        batch_size=batch_size,
        mask_stride=metadata_mask_stride(cfg.model.name),
        topk=topk_of(cfg),
        score_threshold=cfg.eval.score_threshold,
        mask_threshold=cfg.eval.mask_threshold,
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        precision=precision,
        config_hash=config_hash(cfg),
        source=source,
    )


def topk_of(cfg: Config) -> int:
    """Detections per image in the graph: ``eval.topk``, capped at N * C for the top-k families."""
    if export_adapter(cfg.model.name).output_format == TOPK_FORMAT:
        return min(cfg.eval.topk, cfg.model.num_kernels * cfg.model.num_classes)
    return cfg.eval.topk


@contextlib.contextmanager
def _quiet_converters(level: int = logging.WARNING) -> Iterator[None]:
    """Raise the log level of the exporter's optimiser and of onnxruntime's quantizer (which logs to the
    root logger) to ``level`` while they run: their INFO lines run to hundreds per model."""
    names = ("", "onnxscript", "onnx_ir", "torch.onnx", "torch.export")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), level))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _set_metadata(model: onnx.ModelProto, info: ModelInfo) -> None:
    replace_metadata_props(model, info)
    model.producer_name = "sp-ray"
    model.producer_version = __version__


def _check_input_size(info: ModelInfo) -> None:
    if info.input_size is None:
        return
    h, w = info.input_size
    if h <= 0 or w <= 0 or h % info.size_divisor or w % info.size_divisor:
        raise ValueError(
            f"--input-size {h}x{w}: both sides must be positive multiples of {info.size_divisor}"
        )


def export_model(
    model: nn.Module,
    info: ModelInfo,
    out: str | os.PathLike,
    *,
    sample: np.ndarray,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``model`` (eval mode, fp32) to ``out`` with metadata, checked and basic-optimised.

    Args:
        model: the trained model of family ``info.family``.
        info: metadata; ``input_size`` / ``batch_size`` None make that dimension dynamic.
        out: the .onnx path to write.
        sample: uint8 [B, 3, H, W] example input (from ``export.runtime.prepare_batch``), traced
            through the model; H, W multiples of 32.
        opset: ONNX opset.

    Returns:
        ``out``.
    """
    adapter = export_adapter(info.family)
    _check_input_size(info)
    if info.batch_size is None and not adapter.dynamic_batch:
        raise ValueError(f"{info.family} exports with a fixed batch only (torchvision's detection models "
                         "unroll their per-image loops when traced); use --batch N")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = adapter.wrap(model.eval(), info.topk).eval()
    example = torch.from_numpy(np.ascontiguousarray(sample))
    if info.batch_size is None and example.shape[0] < 2:
        # torch.export specialises a dimension of size 1; trace a batch of 2 for a dynamic batch.
        example = example.repeat(2, 1, 1, 1)
    output_names = list(OUTPUT_NAMES[info.output_format])
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad(), _quiet_converters():
            warnings.simplefilter("ignore")
            if adapter.dynamo:
                _export_dynamo(wrapper, example, raw, info, output_names, opset)
            else:
                _export_torchscript(wrapper, example, raw, info, output_names, opset)
        onnx.checker.check_model(str(raw), full_check=True)
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        # Basic level only: constant folding and redundant-node elimination keep the graph portable;
        # the hardware-specific (extended / layout) levels are applied by the runtime's session.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
        proto = onnx.load(str(optimized))
        # onnxruntime's optimiser leaves value_info on the constants it folded; an initializer's shape is
        # its own, and a stale copy breaks the int8 quantizer when it transposes a Gemm weight (QueryInst).
        initializers = {tensor.name for tensor in proto.graph.initializer}
        kept = [value for value in proto.graph.value_info if value.name not in initializers]
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(kept)
        _set_metadata(proto, info)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(out))
    return out


def _export_dynamo(
    wrapper: nn.Module, example: Tensor, path: Path, info: ModelInfo, output_names: list[str], opset: int
) -> None:
    from torch.export import Dim

    dims: dict[int, object] = {}
    if info.batch_size is None:
        dims[0] = Dim("batch", min=1, max=1024)
    if info.input_size is None:
        unit = info.size_divisor
        dims[2] = unit * Dim("h32", min=1, max=_MAX_SIDE_UNITS)
        dims[3] = unit * Dim("w32", min=1, max=_MAX_SIDE_UNITS)
    program = torch.onnx.export(
        wrapper, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
        output_names=output_names, dynamic_shapes={"images": dims} if dims else None, verbose=False,
    )
    program.optimize()
    program.save(str(path))


def _export_torchscript(
    wrapper: nn.Module, example: Tensor, path: Path, info: ModelInfo, output_names: list[str], opset: int
) -> None:
    dynamic_axes: dict[str, dict[int, str]] = {name: {0: "detections"} for name in output_names}
    if info.input_size is None:
        dynamic_axes[INPUT_NAME] = {2: "height", 3: "width"}
    torch.onnx.export(
        wrapper, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
        output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
    )


def check_precision(family: str, precision: str) -> None:
    """Raise ValueError when ``family`` cannot be exported at ``precision`` (before any export work)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and not export_adapter(family).fp16:
        raise ValueError(f"--fp16 is not supported for {family}: onnxruntime's fp16 converter "
                         "produces an invalid graph for its NMS subgraphs; use fp32 or --int8")


def convert_precision(
    path: str | os.PathLike, precision: str, info: ModelInfo, *, calibration: Sequence[np.ndarray] = (),
    int8_kinds: Sequence[str] | None = None,
) -> ModelInfo:
    """Convert an fp32 export in place to fp16 weights and compute, or to calibrated static int8.

    fp16: onnxruntime's converter (``onnxruntime.transformers.float16``) with the inputs and outputs
    kept in their types; its output is repaired where it is invalid ONNX (duplicate Cast nodes,
    nodes out of topological order). int8: ``export.exporter.quantize.quantize_int8`` (QDQ, per-channel int8
    weights, uint8 activations whose ranges come from the ``calibration`` images; ``int8_kinds``, default
    ``export.exporter.quantize.INT8_KINDS`` of the family, says which kinds of node).

    Returns:
        ``info`` with ``precision`` set.
    """
    check_precision(info.family, precision)
    info = dataclasses.replace(info, precision=precision)
    path = Path(path)
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        converted = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
        _repair_graph(converted.graph)
    elif precision == "int8":
        from export.exporter.quantize import quantize_int8

        kept = quantize_int8(path, path, info, calibration, kinds=int8_kinds)
        log.info("int8: %d convolutions and matrix products kept in fp32 (export.exporter.quantize.INT8_KINDS)",
                 len(kept))
        converted = onnx.load(str(path))
    else:
        return info
    _set_metadata(converted, info)
    onnx.checker.check_model(converted)
    onnx.save(converted, str(path))
    return info


def load_calibration_images(
    folder: str | os.PathLike, *, count: int, what: str = "--calibration-images"
) -> list[np.ndarray]:
    """Up to ``count`` images of ``folder`` (recursive, by name, evenly spaced over the sorted list) for int8
    calibration; unreadable files are skipped and counted in a warning.

    Raises:
        FileNotFoundError / ValueError: no folder, or no readable image in it; the message names ``what``.
    """
    from sp_ray.data.images import UnusableImageError, list_image_files

    if count < 1:
        raise ValueError(f"--calibration-count must be >= 1, got {count}")
    try:
        files = list_image_files(folder)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{what}: {err}; int8 calibration needs real images like the ones the model will see") from None
    # Evenly spaced rather than the first N: file names often group images by source or scene.
    picked = [files[i] for i in np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int)]
    images, skipped = [], []
    for file in dict.fromkeys(picked):
        try:
            images.append(load_image_rgb(file))
        except UnusableImageError as err:
            skipped.append(f"{file.name} ({err.reason})")
    if skipped:
        log.warning("int8 calibration skipped %d unreadable image(s) of %s: %s", len(skipped), folder,
                    ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    if not images:
        raise ValueError(f"{what} {folder}: none of its {len(picked)} image files could be read")
    return images


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        graphs.extend(attr.graphs)
    return graphs


def _names_used(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for sub in _subgraphs(node):
            names |= _names_used(sub)
    return names


def _repair_graph(graph: onnx.GraphProto) -> None:
    """Drop exact duplicate nodes and restore topological order (stable), recursively.

    onnxruntime's fp16 converter adds one identical Cast per consumer of a value and appends its casts
    at the end of the node list; both make the model invalid for ``onnx.checker`` and onnxruntime.
    """
    seen: set[bytes] = set()
    nodes = []
    for node in graph.node:
        key = node.SerializeToString()
        if key not in seen:
            seen.add(key)
            nodes.append(node)
            for sub in _subgraphs(node):
                _repair_graph(sub)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    users: list[list[int]] = [[] for _ in nodes]
    pending = [0] * len(nodes)
    for i, node in enumerate(nodes):
        needed = set(node.input)
        for sub in _subgraphs(node):
            needed |= _names_used(sub)  # values a subgraph reads from the enclosing graph
        for j in {producer[name] for name in needed if name in producer and producer[name] != i}:
            users[j].append(i)
            pending[i] += 1
    ready = [i for i in range(len(nodes)) if pending[i] == 0]
    order = []
    while ready:
        ready.sort(reverse=True)
        i = ready.pop()
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise ValueError("the converted ONNX graph has a cycle; export in fp32 instead")
    reordered = [nodes[i] for i in order]
    del graph.node[:]
    graph.node.extend(reordered)


def sample_images(folder: str | os.PathLike | None, *, count: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Images for the parity check: the first ``count`` image files of ``folder`` by name, or generated ones.

    Generated images (when ``folder`` is None or missing) are smooth random colour fields with a few
    rectangles and discs, at odd sizes and aspect ratios, plus one blank image (no detections).
    """
    if folder is not None and Path(folder).is_dir():
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
        if files:
            return [load_image_rgb(p) for p in files]
        log.warning("no image files in %s; using generated parity images", folder)
    rng = np.random.default_rng(seed)
    sizes = [(173, 229), (240, 161), (97, 311), (128, 128)]
    images = []
    for i in range(max(1, count - 1)):
        h, w = sizes[i % len(sizes)]
        coarse = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
        image = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:h, :w]
        yy, xx = np.mgrid[:h, :w]
        for _ in range(3):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(8, max(9, min(h, w) // 3))
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
            y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
            bh, bw = rng.integers(6, h // 2), rng.integers(6, w // 2)
            image[y0 : y0 + bh, x0 : x0 + bw] = rng.integers(0, 256, 3)
        images.append(image.astype(np.uint8))
    images.append(np.zeros((150, 200, 3), np.uint8))
    return images[:count]


def torch_instances(
    model: nn.Module, info: ModelInfo, images: Sequence[np.ndarray], *, device: torch.device | None = None
) -> list[Instances]:
    """Instances of the PyTorch model (fp32 eager, through the export adapter) on ``images``,
    prepared and decoded by the runtime's own functions, with score threshold 0."""
    wrapper = export_adapter(info.family).wrap(model.eval(), info.topk).eval()
    device = device or next(model.parameters()).device
    results = []
    # Batched as the runtime's predict_batch batches, so both see the same padding.
    step = info.batch_size or max(1, len(images))
    for start in range(0, len(images), step):
        chunk = [check_image(image) for image in images[start : start + step]]
        batch, sizes = prepare_batch(chunk, info)
        with torch.no_grad():
            outputs = [o.cpu().numpy() for o in wrapper(torch.from_numpy(batch).to(device))]
        results.extend(
            decode_outputs(
                outputs, b, info, image_size=sizes[b], orig_size=image.shape[:2], score_threshold=0.0
            )
            for b, image in enumerate(chunk)
        )
    return results


def check_parity(
    model: nn.Module, path: str | os.PathLike, images: Sequence[np.ndarray], *, threads: int | None = None
) -> ParityReport:
    """Compare the ONNX model at ``path`` with ``model`` (PyTorch fp32) on ``images``; returns the report."""
    segmenter = Segmenter(path, providers=["CPUExecutionProvider"], threads=threads)
    reference = torch_instances(model, segmenter.info, images, device=torch.device("cpu"))
    candidate = segmenter.predict_batch(list(images), score_threshold=0.0)
    return compare_instances(reference, candidate, precision=segmenter.info.precision,
                             nms=segmenter.info.output_format == ROI_FORMAT)


class ParityError(ValueError):
    """The exported model does not reproduce PyTorch within the stated bounds."""


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    input_size: tuple[int, int] | None = None,
    batch_size: int | None = 1,
    precision: str = "fp32",
    parity_images: str | os.PathLike | None = None,
    parity_count: int = 4,
    calibration_images: str | os.PathLike | None = None,
    calibration_count: int = 32,
) -> ExportResult:
    """Export a checkpoint directory to ONNX and check parity against PyTorch.

    Args:
        checkpoint: directory written by ``sp-ray finetune`` (model.pt, config.yaml, meta.json with
            ``class_names`` and ``cat_ids``).
        out: the .onnx file.
        opset: ONNX opset.
        input_size: fixed (H, W) input (multiples of 32), or None for any size.
        batch_size: fixed batch, or None for any batch (K-Net only).
        precision: "fp32", "fp16" or "int8".
        parity_images: folder of sample images; default the config's ``data.val_images`` if it exists,
            else generated images.
        parity_count: number of sample images.
        calibration_images: int8 only: folder of calibration images; default the config's
            ``data.val_images``; neither is a ValueError asking for one.
        calibration_count: int8 only: number of calibration images.

    Returns:
        ``ExportResult`` with the model path, its metadata and the parity report.

    Raises:
        ParityError: parity outside the bounds; the model is left next to ``out`` as
            ``<stem>.parity-failed.onnx`` for inspection.
    """
    ckpt = load_checkpoint(checkpoint)
    if ckpt.config.pretrain.enabled:
        raise ValueError(f"{checkpoint} is a saliency-prompt pre-training checkpoint; fine-tune it "
                         "('sp-ray finetune --init') and export the fine-tuned checkpoint")
    # The checkpoint holds every weight; the backbone file named in the config may not exist here.
    cfg = ckpt.config
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone_weights=None))
    for key in ("class_names", "cat_ids"):
        if key not in ckpt.meta:
            raise ValueError(
                f"{checkpoint}/meta.json has no {key!r}; export a checkpoint written by sp-ray finetune"
            )
    model = build_model(cfg)
    model.load_state_dict(ckpt.model_state)
    model.eval()
    # A model trained with train.ema_decay is exported as its checkpoint holds it: the weight average.
    ema = ckpt.meta.get("ema")
    weights = f", EMA weights of decay {ema['decay']:g} after {ema['updates']} steps" if isinstance(ema, dict) else ""
    source = f"{Path(checkpoint).resolve()} (sp-ray {__version__}, torch {torch.__version__}{weights})"
    info = model_info(cfg, class_names=ckpt.meta["class_names"], cat_ids=ckpt.meta["cat_ids"],
                      input_size=input_size, batch_size=batch_size, source=source)
    images = sample_images(parity_images if parity_images is not None else cfg.data.val_images or None,
                           count=parity_count)
    check_precision(cfg.model.name, precision)
    calibration: list[np.ndarray] = []
    if precision == "int8":
        folder = calibration_images or cfg.data.val_images
        if not folder:
            raise ValueError(f"--int8 calibrates activation ranges on real images, and the config of {checkpoint} "
                             "names no data.val_images; pass --calibration-images DIR")
        calibration = load_calibration_images(
            folder, count=calibration_count,
            what="--calibration-images" if calibration_images else "data.val_images of the checkpoint's config")
    out = Path(out)
    staged = out.with_name(out.stem + ".staged.onnx")
    sample, _ = prepare_batch(images[: info.batch_size or 2], info)
    export_model(model, info, staged, sample=sample, opset=opset)
    info = convert_precision(staged, precision, info, calibration=calibration)
    report = check_parity(model, staged, images)
    log.info(report.summary())
    if not report.passed:
        failed = out.with_name(out.stem + ".parity-failed.onnx")
        os.replace(staged, failed)
        raise ParityError(f"{report.summary()}; the model is at {failed}")
    os.replace(staged, out)
    return ExportResult(path=out, info=info, parity=report)
