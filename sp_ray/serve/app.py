"""The Ray Serve application of ``sp-ray serve``: one ``export.runtime.Segmenter`` per replica, requests
batched by ``@serve.batch`` into the graph's batch dimension.

Routes (anything else is 404, a known path with another method 405):

    POST /predict    an image (raw bytes or multipart ``image``), optional ``score_threshold``  -> instances
    GET  /healthz    {"status": "ok", ...}: the replica is up and its session loaded
    GET  /metadata   the model's metadata (classes, input size, precision, exporter), runtime and limits

A request is validated and decoded on the replica's event loop (``sp_ray.serve.request``); only a
decoded image joins a batch. The batch runs in a worker thread (onnxruntime releases the GIL), so the
next batch fills while one runs. Within a batch, images are grouped by their padded graph input
size and each group is one graph run: an image gets the input tensor it would get alone, so a
batched answer equals a single one, whatever else was in flight. Bad requests get a 4xx with the
message; any other failure a 500 with the request id (Serve's ``X-Request-ID``), which the replica log
repeats with the traceback.

``build_app`` is the application builder of a ``serve deploy`` config (``configs/serve/``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from export.geometry import padded_size
from export.runtime import Instances, Segmenter, check_image, input_size_for
from sp_ray.errors import UserError
from sp_ray.onnx_model import read_model_info
from sp_ray.serve.request import BadRequest, read_predict_request
from sp_ray.serve.response import prediction_json
from sp_ray.serve.settings import ServeSettings, batch_limit

# Serve routes the ``ray.serve`` logger of a replica to its log file, each line with the request id.
log = logging.getLogger("ray.serve")

ROUTES = {"/predict": "POST", "/healthz": "GET", "/metadata": "GET"}
APP_NAME = "sp-ray"
# How often Serve's controller checks a replica (its default is 10 s): a replica whose process died is
# noticed, and a new one started, within this period.
HEALTH_CHECK_PERIOD_S = 2.0


@dataclass
class _Item:
    """One decoded request waiting for its batch; ``key`` is its padded graph input (H, W)."""

    image: np.ndarray
    score_threshold: float
    key: tuple[int, int]


@dataclass
class _Outcome:
    """What the batch gives back for one item: its instances, or the error of its graph run."""

    found: Instances | BaseException
    batch_size: int


async def respond(request: Request, route: Callable[[Request], Awaitable[Response]]) -> Response:
    """The error boundary of every request: ``route``'s answer, a ``BadRequest`` as its 4xx, anything else 500.

    Error bodies are ``{"error": message, "request_id": id}``; the id is Serve's ``X-Request-ID`` (also in
    the answer's headers), and a 500 logs it with the traceback.
    """
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    try:
        return await route(request)
    except BadRequest as err:
        log.info("request %s refused: %d %s", request_id, err.status, err.message)
        return JSONResponse({"error": err.message, "request_id": request_id}, status_code=err.status,
                            headers=err.headers)
    except Exception:
        log.exception("request %s failed with a server error", request_id)
        return JSONResponse(
            {"error": "internal server error; the replica log has the traceback under this request id",
             "request_id": request_id},
            status_code=500,
        )


@serve.deployment(name="Segmenter")
class SegmenterDeployment:
    """A Serve replica holding one onnxruntime session of the exported model.

    Args:
        settings: the service's settings (checked on the driver by ``build_application``).
    """

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        providers = None if settings.gpu else ["CPUExecutionProvider"]
        self.segmenter = Segmenter(settings.model, providers=providers, threads=settings.threads,
                                   max_image_pixels=settings.max_image_pixels, gpu=settings.gpu_settings())
        self.info = self.segmenter.info
        self.max_batch_size = batch_limit(settings, self.info)
        self._predict_batch.set_max_batch_size(self.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        if settings.gpu and self.segmenter.providers[0] == "CPUExecutionProvider":
            log.error("--gpu: onnxruntime runs %s on the CPU (no CUDA provider could start); check the CUDA "
                      "libraries of this node", settings.model)
        log.info("serving %r, batches of up to %d (%s)", self.segmenter, self.max_batch_size,
                 "fixed batch, padded" if self.info.batch_size else "dynamic batch")

    async def __call__(self, request: Request) -> Response:
        return await respond(request, self._route)

    async def _route(self, request: Request) -> Response:
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        method = ROUTES.get(path)
        if method is None:
            known = ", ".join(f"{m} {p}" for p, m in ROUTES.items())
            raise BadRequest(404, f"no route {path}; the service has {known}")
        if request.method != method:
            raise BadRequest(405, f"{path} takes {method}, not {request.method}", headers={"Allow": method})
        if path == "/healthz":
            return JSONResponse({"status": "ok", "model": os.path.basename(self.settings.model),
                                 "provider": self.segmenter.providers[0]})
        if path == "/metadata":
            return JSONResponse(self.metadata())
        return await self.predict(request)

    async def predict(self, request: Request) -> Response:
        """``POST /predict``: the instances of one image, batched with the requests in flight."""
        checked = await read_predict_request(request, max_body_bytes=self.settings.max_body_bytes,
                                             max_image_pixels=self.settings.max_image_pixels)
        image = checked.image
        try:
            check_image(image, max_pixels=self.settings.max_image_pixels)
            size = input_size_for(image.shape[0], image.shape[1], self.info)
        except ValueError as err:  # e.g. an image too elongated for the keep-ratio resize
            raise BadRequest(400, str(err)) from None
        key = self.info.input_size or padded_size([size], size_divisor=self.info.size_divisor)
        threshold = self.info.score_threshold if checked.score_threshold is None else checked.score_threshold
        outcome = await self._predict_batch(_Item(image=image, score_threshold=threshold, key=key))
        if isinstance(outcome.found, BaseException):
            raise outcome.found
        body = prediction_json(outcome.found, height=image.shape[0], width=image.shape[1],
                               class_names=self.segmenter.class_names)
        return JSONResponse(body, headers={"X-Batch-Size": str(outcome.batch_size)})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # both set from the settings in __init__
    async def _predict_batch(self, items: list[_Item]) -> list[_Outcome]:
        return await asyncio.to_thread(self.run_batch, items)

    def run_batch(self, items: list[_Item]) -> list[_Outcome]:
        """Run a batch of decoded requests: one graph run per padded input size (and fixed batch).

        Returns:
            One ``_Outcome`` per item, in order; an error stays with the items of its graph run.
        """
        outcomes: list[_Outcome | None] = [None] * len(items)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.key, []).append(i)
        for indices in groups.values():
            step = self.info.batch_size or len(indices)
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                try:
                    batch, sizes = self.segmenter.prepare_batch([items[i].image for i in chunk])
                    outputs = self.segmenter.run(batch)  # [B, ...] each; B >= len(chunk) for a fixed batch
                except Exception as err:
                    for i in chunk:
                        outcomes[i] = _Outcome(err, len(chunk))
                    continue
                for b, i in enumerate(chunk):
                    try:
                        found: Instances | BaseException = self.segmenter.decode(
                            outputs, b, image_size=sizes[b], orig_size=items[i].image.shape[:2],
                            score_threshold=items[i].score_threshold, rle=True)
                    except Exception as err:
                        found = err
                    outcomes[i] = _Outcome(found, len(chunk))
        return outcomes  # type: ignore[return-value]  # every index was filled above

    def metadata(self) -> dict[str, object]:
        """``GET /metadata``: what ``export.metadata.ModelInfo`` holds, the runtime, and the service's limits."""
        meta = self.segmenter.session.get_modelmeta()
        return {
            "model": os.path.basename(self.settings.model),
            **dataclasses.asdict(self.info),
            "exporter": {"producer": meta.producer_name, "source": self.info.source},
            "runtime": {"onnxruntime": ort.__version__, "providers": self.segmenter.providers,
                        "threads": self.settings.threads, "io_binding": self.segmenter.io_binding},
            "serving": {"max_batch_size": self.max_batch_size,
                        "batch_wait_timeout_s": self.settings.batch_wait_timeout_s,
                        "max_body_bytes": self.settings.max_body_bytes,
                        "max_image_pixels": self.settings.max_image_pixels},
        }


def build_application(settings: ServeSettings) -> Application:
    """The Serve application of ``settings``, checked on the driver (model metadata, batch limit).

    Each replica reserves ``threads`` CPUs (and one GPU with ``gpu``) and takes up to two batches of
    requests at once: the one running and the one filling; Serve checks it every ``HEALTH_CHECK_PERIOD_S``.

    Raises:
        UserError: the model is not an sp-ray ONNX file, or ``max_batch_size`` exceeds its fixed batch.
    """
    info = read_model_info(settings.model)
    limit = batch_limit(settings, info)
    actor = {"num_cpus": settings.threads, "num_gpus": 1 if settings.gpu else 0}
    return SegmenterDeployment.options(
        num_replicas=settings.replicas, ray_actor_options=actor, max_ongoing_requests=2 * limit + 2,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
    ).bind(settings)


def build_app(args: Mapping[str, object]) -> Application:
    """Application builder of ``serve deploy`` (``import_path: sp_ray.serve.app:build_app``).

    Args:
        args: the config's ``args``: ``ServeSettings`` fields except ``host`` and ``port``, which belong to
            the config's ``http_options``.
    """
    if isinstance(args, Mapping):
        misplaced = sorted({"host", "port"} & set(args))
        if misplaced:
            raise UserError(f"args: {misplaced} belong to the config's http_options (host, port), not to the "
                            "application's args")
    return build_application(ServeSettings.from_args(args))
