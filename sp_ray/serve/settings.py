"""The options of ``sp-ray serve``, also the ``args`` of a ``serve deploy`` config: one dataclass, checked on
the driver before Ray starts, so that a bad value fails in a second with its flag named.

Imports nothing heavy (no Ray, no onnxruntime; ``export.providers`` loads onnxruntime only to pick providers);
the model's metadata is read on the driver by ``sp_ray.onnx_model.read_model_info``, never in a replica.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from export.geometry import MAX_IMAGE_PIXELS
from export.metadata import ModelInfo
from export.providers import GpuSettings
from sp_ray.errors import UserError

# A 50-megapixel JPEG is 10-25 MB and a 4K PNG about 25 MB; 64 MB leaves room for those and refuses what
# would only make a replica hold hundreds of MB per request before decoding fails anyway.
DEFAULT_MAX_BODY_MB = 64.0
# Requests per graph run for a dynamic-batch model unless told otherwise.
DEFAULT_MAX_BATCH_SIZE = 8


@dataclass(frozen=True)
class ServeSettings:
    """What the service runs and accepts.

    Attributes:
        model: the ``.onnx`` file written by ``sp-ray export``; on a cluster, a path every node can read.
        host: the interface the HTTP proxy binds; 127.0.0.1 keeps the service local (Serve has no auth).
        port: its TCP port.
        replicas: Serve replicas, each one onnxruntime session.
        max_batch_size: most requests per graph run (``@serve.batch``); None: the model's fixed batch,
            else ``DEFAULT_MAX_BATCH_SIZE``.
        batch_wait_timeout_s: how long the first request of a batch waits for others.
        threads: onnxruntime intra-op threads per replica; each replica reserves this many Ray CPUs.
        gpu: one GPU per replica (onnxruntime's CUDA / TensorRT providers).
        trt_cache: with ``gpu``: folder of TensorRT's engine cache (``GpuSettings.trt_cache_dir``); on a
            cluster a path of each node (engines are per GPU model), or shared storage.
        trt_fp16: with ``gpu``: TensorRT may compute in fp16 (``GpuSettings.trt_fp16``).
        max_body_mb: larger request bodies get 413 before they are read.
        max_image_pixels: images of more pixels (H x W, read from the header) get 413 before decoding.
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_batch_size: int | None = None
    batch_wait_timeout_s: float = 0.01
    threads: int = 1
    gpu: bool = False
    trt_cache: str | None = None
    trt_fp16: bool = False
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        def bad(field: str, expected: str) -> UserError:
            flag = "--" + field.replace("_", "-")
            return UserError(f"{field} ({flag}) must be {expected}, got {getattr(self, field)!r}")

        if not isinstance(self.model, str) or not self.model:
            raise bad("model", "the path of an .onnx file written by 'sp-ray export'")
        if not isinstance(self.host, str) or not self.host:
            raise bad("host", "an interface address such as 127.0.0.1")
        for field, low, high in (("port", 1, 65535), ("replicas", 1, None), ("threads", 1, None),
                                 ("max_image_pixels", 1, None)):
            value = getattr(self, field)
            if not _is_int(value) or value < low or (high is not None and value > high):
                raise bad(field, f"an integer in [{low}, {high}]" if high else f"an integer >= {low}")
        if self.max_batch_size is not None and (not _is_int(self.max_batch_size) or self.max_batch_size < 1):
            raise bad("max_batch_size", "an integer >= 1 (or left out: the model's fixed batch, else 8)")
        if not _is_number(self.batch_wait_timeout_s) or self.batch_wait_timeout_s < 0:
            raise bad("batch_wait_timeout_s", "a number of seconds >= 0")
        if not _is_number(self.max_body_mb) or self.max_body_mb <= 0:
            raise bad("max_body_mb", "a number of megabytes > 0")
        if not isinstance(self.gpu, bool):
            raise bad("gpu", "true or false")
        if (self.trt_cache is not None or self.trt_fp16 is not False) and not self.gpu:
            raise UserError("trt_cache (--trt-cache) and trt_fp16 (--trt-fp16) apply to onnxruntime's TensorRT "
                            "provider: give them with gpu (--gpu)")
        try:
            self.gpu_settings()
        except ValueError as err:
            raise UserError(str(err)) from None

    def gpu_settings(self) -> GpuSettings | None:
        """The replicas' ``GpuSettings`` (None without ``gpu``); TensorRT's profile covers the batch limit.

        The batch limit of a dynamic-batch model is ``max_batch_size`` or ``DEFAULT_MAX_BATCH_SIZE``
        (``batch_limit``); a fixed-batch model's profile is its own batch whatever this says.
        """
        if not self.gpu:
            return None
        return GpuSettings(trt_cache_dir=self.trt_cache, trt_fp16=self.trt_fp16,
                           trt_max_batch=self.max_batch_size or DEFAULT_MAX_BATCH_SIZE)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @classmethod
    def from_args(cls, args: Mapping[str, object], *, where: str = "args") -> ServeSettings:
        """Settings from a ``serve deploy`` config's ``args`` mapping (the same names as the fields).

        Raises:
            UserError: not a mapping, an unknown or missing key, or a bad value; the message names it.
        """
        if not isinstance(args, Mapping):
            raise UserError(f"{where} must be a mapping of settings, got {type(args).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(args) - set(names))
        if unknown:
            raise UserError(f"{where}: unknown settings {unknown}; known: {names}")
        if "model" not in args:
            raise UserError(f"{where}: 'model' (the .onnx file written by 'sp-ray export') is required")
        return cls(**args)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def batch_limit(settings: ServeSettings, info: ModelInfo) -> int:
    """Most requests one graph run serves: ``max_batch_size``, within a fixed-batch graph's batch.

    A fixed-batch graph always runs its whole batch; fewer requests are padded with blank images
    (``export.runtime.prepare_batch``), so a batch limit above it could never be met.

    Raises:
        UserError: ``max_batch_size`` exceeds the model's fixed batch.
    """
    fixed = info.batch_size
    if settings.max_batch_size is None:
        return fixed or DEFAULT_MAX_BATCH_SIZE
    if fixed is not None and settings.max_batch_size > fixed:
        raise UserError(
            f"--max-batch-size {settings.max_batch_size}: {settings.model} was exported with a fixed batch of "
            f"{fixed}; use --max-batch-size {fixed} or less (a smaller batch is padded with blank images), or "
            "re-export it with 'sp-ray export --dynamic-batch' (query-based families)"
        )
    return settings.max_batch_size
