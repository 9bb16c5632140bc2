"""Run an exported sp-ray model with onnxruntime: numpy image in, instances out (numpy + onnxruntime only).

    from export.runtime import Segmenter
    segmenter = Segmenter("model.onnx")            # CUDA / TensorRT when present, else CPU
    found = segmenter.predict(image)               # image: uint8 [H, W, 3] RGB, any size
    found.boxes, found.scores, found.category_ids, found.masks

Pre-processing is training's evaluation transform (keep-ratio antialiased resize, zero padding to a
multiple of 32 at the bottom/right); post-processing is PyTorch's (crop the valid region, resample to
the original size, threshold; boxes from masks for K-Net, pasted RoI masks for Mask R-CNN), computed
box by box, so its cost grows with the instances' areas, not with the image times top-k. Images above
``max_image_pixels`` (default ``export.geometry.MAX_IMAGE_PIXELS``) are refused with a ValueError.
The providers and their options (device, TensorRT engine cache, fp16 and profile, IO binding) come
from ``export.providers``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from export.geometry import MAX_IMAGE_PIXELS, check_pixel_count, fit_within, padded_size, resize_for_inference
from export.metadata import INPUT_NAME, OUTPUT_NAMES, TOPK_FORMAT, ModelInfo
from export.providers import GPU_PROVIDERS, TENSORRT, GpuSettings, default_providers, provider_options
from export.resample import gather_masks, paste_mask_logits, paste_roi_masks, resize_image

log = logging.getLogger("export.runtime")

# torchvision pastes Mask R-CNN masks into boxes enlarged by one mask cell on each side.
ROI_PASTE_PADDING = 1
# Fixed graph input sizes for which the shrink-to-fit warning was given (once per size and process).
_FIT_WARNED: set[tuple[int, int]] = set()


@dataclass
class Instances:
    """The instances found in one image, in original image pixels, by descending score.

    Attributes:
        boxes: float32 [K, 4] xyxy (x2 / y2 exclusive for K-Net, whose boxes are the mask extents).
        scores: float32 [K].
        labels: int64 [K], contiguous class indices (``Segmenter.class_names``).
        category_ids: int64 [K], COCO category ids.
        masks: bool [K, H0, W0], or None when RLE output was requested.
        rles: COCO compressed RLEs ({"size": [H0, W0], "counts": str}) when requested, else None.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    category_ids: np.ndarray
    masks: np.ndarray | None
    rles: list[dict[str, object]] | None = None

    def __len__(self) -> int:
        return len(self.scores)


def check_image(image: object, *, where: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Validate one input image.

    Args:
        image: the candidate, expected uint8 [H, W, 3] RGB.
        where: names the image in messages.
        max_pixels: the largest H * W accepted.

    Raises:
        ValueError: not a numpy uint8 array [H, W, 3] with 0 < H * W <= max_pixels; the message says
            what was expected and how to convert common mistakes (grayscale, RGBA, CHW, float images).
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{where}: expected a numpy uint8 array [H, W, 3] (RGB), got {type(image).__name__}")
    if image.ndim != 3:
        hint = " (grayscale? convert with np.repeat(image[..., None], 3, axis=2))" if image.ndim == 2 else ""
        raise ValueError(f"{where}: expected shape [H, W, 3], got {image.shape} (rank {image.ndim}){hint}")
    if image.shape[2] != 3:
        hint = ""
        if image.shape[2] == 4:
            hint = " (RGBA? drop alpha with image[..., :3])"
        elif image.shape[0] == 3:
            hint = " (channels first? use image.transpose(1, 2, 0))"
        raise ValueError(f"{where}: expected 3 channels (RGB) in the last axis, got {image.shape}{hint}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{where}: empty image of shape {image.shape}; expected H, W > 0")
    if image.dtype != np.uint8:
        raise ValueError(
            f"{where}: expected dtype uint8 (0..255), got {image.dtype}; for a float image in 0..1 use "
            "(image * 255).round().clip(0, 255).astype(np.uint8)"
        )
    check_pixel_count(image.shape[0], image.shape[1], limit=max_pixels, what=where,
                      setting="Segmenter(..., max_image_pixels=N)")
    return image


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """The session options of every ``Segmenter`` (and of benchmarks that time a bare graph alike).

    All graph optimisations (the hardware-specific fusions and layouts included); with ``threads``, that
    many intra-op threads and one inter-op thread, so that ``threads`` bounds the session's compute threads.

    Raises:
        ValueError: ``threads`` below 1.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def _logit(p: float) -> float:
    """The logit threshold equivalent to sigmoid(x) > p."""
    if p <= 0:
        return -math.inf
    if p >= 1:
        return math.inf
    return math.log(p / (1 - p))


class Segmenter:
    """An exported sp-ray instance segmenter in an onnxruntime session.

    Args:
        path: the ``.onnx`` file written by ``sp-ray export``.
        providers: execution providers in order of preference; None picks TensorRT and CUDA when the
            installed onnxruntime offers them and a GPU is present (``default_providers``), then CPU.
            The providers the session really uses are in ``self.providers`` and are logged
            (onnxruntime falls back to CPU when CUDA libraries are missing).
        threads: intra-op threads of the CPU provider; None lets onnxruntime decide (one per core).
        max_image_pixels: the largest image (H x W) ``predict`` accepts; a larger one is a ValueError
            before any work. Dense masks take K x H x W bytes, so a deployment that keeps them sets
            this to what its memory allows.
        gpu: device, TensorRT engine cache, fp16, batch range and IO binding of the GPU providers
            (``export.providers.GpuSettings``; None: its defaults). The options given to onnxruntime
            are ``export.providers.provider_options`` of ``providers``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown provider names, a limit below 1, or a model without sp-ray metadata.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 gpu: GpuSettings | None = None) -> None:
        if max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1, got {max_image_pixels}")
        if gpu is not None and not isinstance(gpu, GpuSettings):
            raise ValueError(f"gpu must be an export.providers.GpuSettings or None, got {type(gpu).__name__}")
        self.max_image_pixels = max_image_pixels
        self.gpu = gpu or GpuSettings()
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"ONNX model {self.path} does not exist; export one with 'sp-ray export'")
        available = ort.get_available_providers()
        if providers is None:
            providers = default_providers()
        else:
            unknown = [p for p in providers if p not in available]
            if unknown:
                raise ValueError(f"execution providers {unknown} are not available in this onnxruntime "
                                 f"({ort.__version__}); available: {available}")
        providers = list(providers)
        options = session_options(threads)
        info = None
        if TENSORRT in providers:
            # TensorRT's optimisation profile comes from the metadata, which only a session reads.
            info = read_metadata(self.path)
            if self.gpu.trt_cache_dir is not None:
                os.makedirs(self.gpu.trt_cache_dir, exist_ok=True)
        chosen = provider_options(providers, info, self.gpu)
        self.session = ort.InferenceSession(self.path, sess_options=options, providers=[n for n, _ in chosen],
                                            provider_options=[o for _, o in chosen])
        self.providers: list[str] = self.session.get_providers()
        requested = providers[0] if providers else "CPUExecutionProvider"
        if requested not in self.providers:
            log.warning("onnxruntime could not start %s (missing libraries?); running on %s",
                        requested, self.providers)
        # Decided on the provider that really runs: a GPU session fallen back to the CPU runs plainly.
        self.io_binding: bool = self.gpu.uses_io_binding(self.providers[0])
        self._bound_device = "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"
        log.info("onnxruntime %s: %s runs on %s%s", ort.__version__, os.path.basename(self.path),
                 self.providers[0], " (IO binding)" if self.io_binding else "")
        self.info = ModelInfo.from_props(self.session.get_modelmeta().custom_metadata_map, where=self.path)
        self._output_names = list(OUTPUT_NAMES[self.info.output_format])

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    def __repr__(self) -> str:
        size = "x".join(map(str, self.info.input_size)) if self.info.input_size else "any"
        return (f"Segmenter({self.path!r}, family={self.info.family}, precision={self.info.precision}, "
                f"input={size}, batch={self.info.batch_size or 'any'}, provider={self.providers[0]})")

    def predict(
        self, image: np.ndarray, *, score_threshold: float | None = None, rle: bool = False
    ) -> Instances:
        """Segment one image.

        Args:
            image: uint8 [H, W, 3] RGB, any size.
            score_threshold: keep instances with score > this (default: the model's ``score_threshold``).
            rle: return COCO RLEs in ``rles`` instead of dense ``masks``.

        Returns:
            ``Instances`` at the image's size.
        """
        return self.predict_batch([image], score_threshold=score_threshold, rle=rle)[0]

    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        score_threshold: float | None = None,
        rle: bool = False,
        batch_size: int | None = None,
    ) -> list[Instances]:
        """Segment several images, run in batches padded to a common size as training's collate does.

        Args:
            images: uint8 [H_i, W_i, 3] RGB arrays.
            score_threshold: as in ``predict``.
            rle: as in ``predict``.
            batch_size: images per graph run for a dynamic-batch model (default: all at once); a
                fixed-batch model runs its own batch size, the last batch filled with blank images.

        Returns:
            One ``Instances`` per image, in order.
        """
        checked = [check_image(image, where=f"image {i}", max_pixels=self.max_image_pixels)
                   for i, image in enumerate(images)]
        threshold = self.info.score_threshold if score_threshold is None else score_threshold
        step = self.info.batch_size or batch_size or max(1, len(checked))
        results: list[Instances] = []
        for start in range(0, len(checked), step):
            chunk = checked[start : start + step]
            batch, sizes = self.prepare_batch(chunk)
            outputs = self.run(batch)
            for b, image in enumerate(chunk):
                results.append(self.decode(outputs, b, image_size=sizes[b], orig_size=image.shape[:2],
                                           score_threshold=threshold, rle=rle))
        return results

    def prepare_batch(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """``prepare_batch`` with this model's metadata."""
        return prepare_batch(images, self.info)

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run the graph on a prepared uint8 [B, 3, H, W] batch; returns the raw outputs in format order.

        With ``self.io_binding`` (the default on a GPU provider) the run goes through
        ``run_with_io_binding``; otherwise through ``session.run``. Both return the same arrays.
        """
        if self.io_binding:
            return self.run_with_io_binding(batch)
        return self.session.run(self._output_names, {INPUT_NAME: batch})

    def run_with_io_binding(self, batch: np.ndarray) -> list[np.ndarray]:
        """``run`` through ``session.io_binding()``: the input bound from numpy (copied to the device once),
        every output allocated by onnxruntime on the session's device and all of them copied back once.

        The outputs are bound without a shape, so onnxruntime allocates them at the size the run produces
        (Mask R-CNN's detection count depends on the image).
        """
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_NAME, np.ascontiguousarray(batch))
        for name in self._output_names:
            binding.bind_output(name, self._bound_device, self.gpu.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def decode(
        self,
        outputs: list[np.ndarray],
        index: int,
        *,
        image_size: tuple[int, int],
        orig_size: tuple[int, int],
        score_threshold: float,
        rle: bool = False,
    ) -> Instances:
        """``decode_outputs`` with this model's metadata."""
        return decode_outputs(outputs, index, self.info, image_size=image_size, orig_size=orig_size,
                              score_threshold=score_threshold, rle=rle)


def read_metadata(path: str | os.PathLike) -> ModelInfo:
    """The sp-ray metadata of an ``.onnx`` file, read by a CPU session that does no graph optimisation.

    Used before a TensorRT session is made, whose options depend on the metadata; onnxruntime reads
    ``metadata_props`` only through a session, and this package loads no other ONNX library.

    Raises:
        ValueError: the model carries no (or broken) sp-ray metadata.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])
    return ModelInfo.from_props(session.get_modelmeta().custom_metadata_map, where=os.fspath(path))


def input_size_for(height: int, width: int, info: ModelInfo) -> tuple[int, int]:
    """(H, W) an image is resized to: the training rule, shrunk to fit a fixed-size graph's input."""
    size = resize_for_inference(height, width, max_size=info.max_size, short_size=info.short_size)
    if info.input_size is not None:
        fitted = fit_within(*size, max_h=info.input_size[0], max_w=info.input_size[1])
        if fitted != size and info.input_size not in _FIT_WARNED:
            _FIT_WARNED.add(info.input_size)
            log.warning("the training resize of a %dx%d image is %s, larger than the fixed graph input %s: "
                        "shrunk to %s (export with --dynamic-size to keep the training resize)",
                        height, width, size, info.input_size, fitted)
        size = fitted
    return size


def prepare_batch(images: Sequence[np.ndarray], info: ModelInfo) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Resize and pad images into a graph input, as training's evaluation transform and collate do.

    Args:
        images: checked uint8 [H_i, W_i, 3] arrays (at most the fixed batch size, if the graph has one).
        info: the model's metadata.

    Returns:
        (uint8 [B, 3, Hp, Wp] batch zero-padded at the bottom/right, the valid (H, W) of each image).
        A fixed-batch graph gets blank images appended up to its batch size.
    """
    if info.batch_size is not None and len(images) > info.batch_size:
        raise ValueError(f"{len(images)} images for a graph with a fixed batch of {info.batch_size}")
    sizes = [input_size_for(image.shape[0], image.shape[1], info) for image in images]
    if info.input_size is not None:
        height, width = info.input_size
    else:
        height, width = padded_size(sizes, size_divisor=info.size_divisor)
    batch = np.zeros((max(len(images), info.batch_size or 0), 3, height, width), np.uint8)
    for b, (image, (h, w)) in enumerate(zip(images, sizes, strict=True)):
        batch[b, :, :h, :w] = resize_image(image, (h, w)).transpose(2, 0, 1)
    return batch, sizes


def decode_outputs(
    outputs: Sequence[np.ndarray],
    index: int,
    info: ModelInfo,
    *,
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
    score_threshold: float,
    rle: bool = False,
) -> Instances:
    """Instances of image ``index`` of a batch from the raw graph outputs.

    Args:
        outputs: graph outputs in the order of ``OUTPUT_NAMES[info.output_format]``.
        index: position of the image in the batch.
        info: the model's metadata.
        image_size: (H, W) valid region of the image in the input.
        orig_size: (H0, W0) of the original image.
        score_threshold: keep instances with score > this.
        rle: COCO RLEs instead of dense masks.

    Returns:
        ``Instances`` in original pixels.
    """
    decode = _decode_topk if info.output_format == TOPK_FORMAT else _decode_roi
    scores, labels, crops, boxes = decode(outputs, index, info, image_size, orig_size, score_threshold)
    # Each mask is written or encoded as soon as its box is computed: one box in memory at a time.
    mask_boxes, masks, rles = gather_masks(crops, count=len(scores), size=orig_size, rle=rle)
    cat_ids = np.asarray(info.cat_ids, np.int64)[labels]
    return Instances(boxes=mask_boxes if boxes is None else boxes, scores=scores, labels=labels,
                     category_ids=cat_ids, masks=masks, rles=rles)


def _decode_topk(outputs, index, info, image_size, orig_size, score_threshold):
    scores, labels, mask_logits = (o[index] for o in outputs)
    keep = scores > score_threshold
    crops = paste_mask_logits(mask_logits[keep], image_size=image_size, orig_size=orig_size,
                              mask_stride=info.mask_stride, threshold=_logit(info.mask_threshold))
    return scores[keep].astype(np.float32), labels[keep].astype(np.int64), crops, None  # boxes: the masks'


def _decode_roi(outputs, index, info, image_size, orig_size, score_threshold):
    boxes, scores, labels, mask_probs, batch_index = outputs
    keep = np.flatnonzero((batch_index == index) & (scores > score_threshold))[: info.topk]
    valid_h, valid_w = image_size
    out_h, out_w = orig_size
    limits = np.array([valid_w, valid_h, valid_w, valid_h], np.float32)
    ratios = np.array([out_w / valid_w, out_h / valid_h, out_w / valid_w, out_h / valid_h], np.float32)
    scaled = np.minimum(np.maximum(boxes[keep].astype(np.float32), 0), limits) * ratios
    crops = paste_roi_masks(mask_probs[keep], scaled, out_size=orig_size, threshold=info.mask_threshold,
                            padding=ROI_PASTE_PADDING)
    return scores[keep].astype(np.float32), labels[keep].astype(np.int64), crops, scaled
