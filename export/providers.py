"""Which onnxruntime execution providers a ``Segmenter`` asks for, and with which options (plain Python).

    from export.providers import GpuSettings
    Segmenter("knet.onnx", gpu=GpuSettings(trt_cache_dir="trt_cache", trt_fp16=True))

- ``default_providers()``: TensorRT and CUDA when this machine can run them, then CPU.
- ``GpuSettings``: the few GPU choices a deployment makes (device, TensorRT engine cache, fp16, the
  largest batch, IO binding), checked when made.
- ``provider_options(providers, info, settings)``: the option dict of each provider, in order, as
  ``onnxruntime.InferenceSession(providers=..., provider_options=...)`` takes them. TensorRT gets an
  optimisation profile computed from the model's metadata, so that it builds its engine once, for
  every input shape the runtime can give it, instead of rebuilding it whenever a larger input arrives.

onnxruntime is imported only by ``default_providers``: the drivers of ``sp-ray serve`` and ``sp-ray
predict`` check a ``GpuSettings`` before Ray starts and never load onnxruntime themselves.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from export.metadata import INPUT_NAME, ModelInfo

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Preferred execution providers, best first; CPU is always last.
PREFERRED_PROVIDERS = (TENSORRT, CUDA, CPU)
# The providers that compute on a CUDA device (and take a device_id).
GPU_PROVIDERS = (TENSORRT, CUDA)
# The libraries the GPU providers load: the CUDA driver, and TensorRT's runtime.
_CUDA_DRIVER = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
_TENSORRT = "nvinfer_10.dll" if sys.platform == "win32" else "libnvinfer.so.10"
# Requests per graph run that a dynamic-batch model's TensorRT profile covers unless told otherwise:
# the default batch limit of `sp-ray serve` (sp_ray.serve.settings.DEFAULT_MAX_BATCH_SIZE).
DEFAULT_TRT_MAX_BATCH = 8


def _cuda_devices() -> int:
    """Number of CUDA devices the driver reports (0 without a driver or a GPU), via the driver API."""
    try:
        driver = ctypes.CDLL(_CUDA_DRIVER)
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def _loadable(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def default_providers() -> list[str]:
    """TensorRT and CUDA when onnxruntime offers them and this machine can run them, then CPU.

    ``onnxruntime-gpu`` lists its GPU providers even on machines without a GPU; asking for them there
    makes every session print load errors before falling back. So CUDA is only proposed when the driver
    reports a device, TensorRT only when, in addition, its runtime library loads.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    gpu = _cuda_devices() > 0
    usable = {TENSORRT: gpu and _loadable(_TENSORRT), CUDA: gpu, CPU: True}
    return [p for p in PREFERRED_PROVIDERS if p in available and usable[p]]


@dataclass(frozen=True)
class GpuSettings:
    """What a ``Segmenter`` asks of the CUDA and TensorRT providers; ignored by the CPU provider.

    Attributes:
        device_id: the CUDA device (an index among the devices this process sees; Ray's GPU actors and
            replicas see only theirs, as device 0).
        trt_cache_dir: folder of TensorRT's engine cache (created if missing): the first session of a
            model builds its engine (seconds to minutes) and writes it here, later sessions load it. An
            engine is tied to the model, the GPU, onnxruntime's and TensorRT's versions and the profile:
            delete the folder's files when one of them changes. None: no cache, a build per session.
        trt_fp16: let TensorRT compute in fp16 where it is faster (outputs stay fp32; expect the
            differences of an fp16 export, see the README's parity bounds).
        trt_max_batch: the largest batch of a dynamic-batch model that TensorRT's profile covers: set it
            to the batch the deployment runs (``sp-ray serve`` sets its batch limit, ``sp-ray predict``
            its ``--batch-size``). Fixed-batch models ignore it.
        io_binding: run through ``session.io_binding()``: the input bound from numpy, the outputs
            allocated by onnxruntime on the device and copied back once. None: on when the session
            runs on a GPU provider, off on the CPU.

    Raises:
        ValueError: a value of the wrong type or range; the message names the option.
    """

    device_id: int = 0
    trt_cache_dir: str | None = None
    trt_fp16: bool = False
    trt_max_batch: int = DEFAULT_TRT_MAX_BATCH
    io_binding: bool | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.device_id) or self.device_id < 0:
            raise ValueError(f"GpuSettings.device_id must be a CUDA device index (an integer >= 0), "
                             f"got {self.device_id!r}")
        if self.trt_cache_dir is not None:
            if not isinstance(self.trt_cache_dir, (str, os.PathLike)) or not os.fspath(self.trt_cache_dir):
                raise ValueError(f"GpuSettings.trt_cache_dir (--trt-cache) must be a folder path, "
                                 f"got {self.trt_cache_dir!r}")
            path = os.fspath(self.trt_cache_dir)
            if os.path.exists(path) and not os.path.isdir(path):
                raise ValueError(f"GpuSettings.trt_cache_dir (--trt-cache) {path} is a file; give a folder for "
                                 "TensorRT's engine cache (it is created if missing)")
            object.__setattr__(self, "trt_cache_dir", path)  # str, so the options and the repr are plain
        if not isinstance(self.trt_fp16, bool):
            raise ValueError(f"GpuSettings.trt_fp16 (--trt-fp16) must be true or false, got {self.trt_fp16!r}")
        if not _is_int(self.trt_max_batch) or self.trt_max_batch < 1:
            raise ValueError(f"GpuSettings.trt_max_batch must be an integer >= 1, got {self.trt_max_batch!r}")
        if self.io_binding is not None and not isinstance(self.io_binding, bool):
            raise ValueError(f"GpuSettings.io_binding must be true, false or None (on for GPU providers), "
                             f"got {self.io_binding!r}")

    def uses_io_binding(self, active_provider: str) -> bool:
        """Whether a session whose first provider is ``active_provider`` runs through IO binding."""
        return active_provider in GPU_PROVIDERS if self.io_binding is None else self.io_binding


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def input_shape_range(info: ModelInfo, max_batch: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The (min, opt, max) [B, 3, H, W] graph inputs that ``export.runtime.prepare_batch`` can produce.

    - A fixed-size graph always gets its input size; with a fixed batch too, min = opt = max, one shape.
    - A dynamic-size graph gets sides from ``size_divisor`` (an image whose resize is 1 pixel, padded)
      to ``max_size`` rounded up to ``size_divisor`` (the resize caps the long side at ``max_size``, and a
      batch of a portrait and a landscape image pads both sides to it); opt is a square image's resize.
    - A dynamic batch ranges from 1 to ``max_batch``, optimised for ``max_batch`` (a server fills its
      batches under load; a deployment that runs single images sets ``max_batch`` 1).

    An input outside this range is not covered by the engine built for it: a user who runs the graph
    on other shapes (a batch above ``max_batch``, or a graph run outside ``Segmenter``) should raise
    ``GpuSettings.trt_max_batch``, or export a fixed-size, fixed-batch model (``sp-ray export
    --input-size HxW --batch N``) whose single shape needs no range at all.
    """
    if info.batch_size is not None:
        batches = (info.batch_size,) * 3
    else:
        batches = (1, max_batch, max_batch)
    divisor = info.size_divisor
    if info.input_size is not None:
        sides = (info.input_size,) * 3
    else:
        def rounded(side: int) -> int:
            return math.ceil(side / divisor) * divisor

        typical = rounded(min(info.short_size, info.max_size))
        largest = rounded(info.max_size)
        sides = ((divisor, divisor), (typical, typical), (largest, largest))
    low, opt, high = ((b, 3, h, w) for b, (h, w) in zip(batches, sides, strict=True))
    return low, opt, high


def _shape_text(shape: Sequence[int]) -> str:
    """A profile entry in TensorRT's provider-option format, e.g. ``images:1x3x512x512``."""
    return f"{INPUT_NAME}:" + "x".join(str(d) for d in shape)


def provider_options(
    providers: Sequence[str], info: ModelInfo | None, settings: GpuSettings
) -> list[tuple[str, dict[str, str]]]:
    """Each provider of ``providers`` with its options, in order (string values, as onnxruntime keeps them).

    Args:
        providers: execution provider names, best first.
        info: the model's metadata; needed when TensorRT is among ``providers`` (its profile).
        settings: the GPU settings.

    Returns:
        [(name, options)]: TensorRT gets ``device_id``, ``trt_fp16_enable``, the engine cache
        (``trt_engine_cache_enable`` / ``trt_engine_cache_path``) and the optimisation profile
        (``trt_profile_min_shapes`` / ``_opt_`` / ``_max_``, see ``input_shape_range``); CUDA gets
        ``device_id``; other providers get no options.

    Raises:
        ValueError: TensorRT is asked for without the model's metadata.
    """
    chosen: list[tuple[str, dict[str, str]]] = []
    for name in providers:
        if name == TENSORRT:
            if info is None:
                raise ValueError("the TensorRT provider's optimisation profile needs the model's metadata (info)")
            low, opt, high = input_shape_range(info, settings.trt_max_batch)
            options = {
                "device_id": str(settings.device_id),
                "trt_fp16_enable": str(settings.trt_fp16),
                "trt_engine_cache_enable": str(settings.trt_cache_dir is not None),
                # onnxruntime compares these with the profile saved next to a cached engine and rebuilds
                # the engine when they differ, so they are given with or without a cache.
                "trt_profile_min_shapes": _shape_text(low),
                "trt_profile_opt_shapes": _shape_text(opt),
                "trt_profile_max_shapes": _shape_text(high),
            }
            if settings.trt_cache_dir is not None:
                options["trt_engine_cache_path"] = settings.trt_cache_dir
            chosen.append((name, options))
        elif name == CUDA:
            chosen.append((name, {"device_id": str(settings.device_id)}))
        else:
            chosen.append((name, {}))
    return chosen
