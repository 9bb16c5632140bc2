"""One ``POST /predict`` request -> a decoded image and its score threshold, or a ``BadRequest`` (a 4xx).

Accepted bodies: the image file's bytes (any content type but multipart, e.g. ``curl --data-binary
@photo.jpg``), or ``multipart/form-data`` with one file part ``image`` and optionally a field
``score_threshold``. ``score_threshold`` may instead be a query parameter, not both. Every check runs
before the image reaches the batch, so a bad request costs its own answer only and the replica keeps
serving:

- a body over ``max_body_bytes``: 413, from ``Content-Length`` before reading, or while reading a chunked body;
- an empty body or image part, an unknown query parameter or form field, a malformed multipart body, a
  ``score_threshold`` that is not a number in [0, 1]: 400;
- an image of more than ``max_image_pixels`` (read from its header, before decoding; PIL's
  decompression-bomb guard agrees, ``export.geometry.MAX_IMAGE_PIXELS``): 413;
- bytes that are not an image PIL reads, or an image that does not decode (truncated): 400.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from export.geometry import check_pixel_count
from sp_ray.data.images import to_rgb_uint8

QUERY_PARAMETERS = ("score_threshold",)
FORM_FIELDS = ("image", "score_threshold")
MAX_PARTS = 16
IMAGE_FORMATS = "JPEG, PNG, BMP, TIFF, WebP or another format PIL reads"
USAGE = ("POST the image file's bytes as the body (curl --data-binary @photo.jpg URL) or as multipart "
         "(curl -F image=@photo.jpg URL)")


class BadRequest(Exception):
    """A request the service refuses; ``message`` says what was expected.

    Attributes:
        status: the HTTP status (4xx).
        message: one line for the client.
        headers: extra answer headers (``Allow`` of a 405).
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class PredictRequest:
    """A checked ``POST /predict``.

    Attributes:
        image: uint8 [H, W, 3] RGB in display orientation (EXIF applied).
        score_threshold: keep instances with score > this; None: the model's default.
    """

    image: np.ndarray
    score_threshold: float | None


async def read_predict_request(request: Request, *, max_body_bytes: int, max_image_pixels: int) -> PredictRequest:
    """Validate and decode one ``POST /predict``.

    Args:
        request: the Starlette request Serve hands the replica.
        max_body_bytes: the largest body read.
        max_image_pixels: the largest image (H x W) decoded.

    Raises:
        BadRequest: anything the module docstring lists.
    """
    threshold = _query_threshold(request)
    body = await read_body(request, max_bytes=max_body_bytes)
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() == "multipart/form-data":
        data, form_threshold = await _read_multipart(request, body)
        if form_threshold is not None:
            if threshold is not None:
                raise BadRequest(400, "score_threshold is given both as a query parameter and as a form field; "
                                      "give it once")
            threshold = form_threshold
    else:
        data = body
    if not data:
        raise BadRequest(400, f"the image is empty (0 bytes); expected the bytes of an image file ({IMAGE_FORMATS}). "
                              + USAGE)
    return PredictRequest(image=decode_image(data, max_pixels=max_image_pixels), score_threshold=threshold)


def _query_threshold(request: Request) -> float | None:
    items = request.query_params.multi_items()
    unknown = sorted({key for key, _ in items} - set(QUERY_PARAMETERS))
    if unknown:
        raise BadRequest(400, f"unknown query parameter(s) {unknown}; POST /predict takes only "
                              f"{list(QUERY_PARAMETERS)}")
    values = [value for key, value in items if key == "score_threshold"]
    if len(values) > 1:
        raise BadRequest(400, f"score_threshold is given {len(values)} times; give it once")
    return parse_score_threshold(values[0], where="query parameter") if values else None


def parse_score_threshold(text: str, *, where: str) -> float:
    """A ``score_threshold`` value: a finite number in [0, 1] (instances with score > it are kept).

    Raises:
        BadRequest: 400 naming the value and what was expected.
    """
    expected = "expected a number in [0, 1], e.g. score_threshold=0.5 (instances with a higher score are kept)"
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(400, f"score_threshold ({where}) {text!r} is not a number; {expected}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise BadRequest(400, f"score_threshold ({where}) {text!r} is out of range; {expected}")
    return value


async def read_body(request: Request, *, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``max_bytes``.

    ``Content-Length`` is trusted to refuse early, never to accept: a chunked body (or one that
    lies about its length) is counted while it streams.
    """
    too_large = (f"the request body is larger than the limit of {max_bytes:,} bytes; send a smaller image "
                 "(downscale or recompress it), or start the service with a larger --max-body-mb")
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise BadRequest(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BadRequest(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_multipart(request: Request, body: bytes) -> tuple[bytes, float | None]:
    """The ``image`` file part and the optional ``score_threshold`` field of a multipart body."""

    async def replay() -> AsyncIterator[bytes]:
        yield body
        yield b""

    # Generous part counts (the body is bounded already), so that an unknown part is refused by its name.
    parser = MultiPartParser(request.headers, replay(), max_files=MAX_PARTS, max_fields=MAX_PARTS)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise BadRequest(400, f"malformed multipart body ({err.message}); expected one file part 'image' and "
                              "optionally a field 'score_threshold', e.g. curl -F image=@photo.jpg "
                              "-F score_threshold=0.5 URL") from None
    try:
        items = form.multi_items()
        names = [name for name, _ in items]
        unknown = sorted(set(names) - set(FORM_FIELDS))
        if unknown:
            raise BadRequest(400, f"unknown form field(s) {unknown}; POST /predict takes a file part 'image' and "
                                  "optionally a field 'score_threshold'")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise BadRequest(400, f"form field(s) {repeated} given more than once; send one image per request")
        fields = dict(items)
        if "image" not in fields:
            raise BadRequest(400, "the multipart body has no 'image' part; " + USAGE)
        image = fields["image"]
        if not isinstance(image, UploadFile):
            raise BadRequest(400, "the 'image' part is a text field, not a file; send the file itself "
                                  "(curl -F image=@photo.jpg URL, the @ makes it a file)")
        data = await image.read()
        threshold = fields.get("score_threshold")
        if threshold is not None and not isinstance(threshold, str):
            raise BadRequest(400, "score_threshold is a file part; send it as a plain field (-F score_threshold=0.5)")
        return data, None if threshold is None else parse_score_threshold(threshold, where="form field")
    finally:
        await form.close()


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode image bytes to uint8 [H, W, 3] RGB as every sp-ray reader does (EXIF orientation applied).

    The pixel limit is checked on the header, before any pixel is decoded.

    Raises:
        BadRequest: 413 above ``max_pixels``; 400 for bytes PIL does not recognise or cannot decode.
    """
    try:
        # Only this thread (the replica's event loop) swaps the warning filters; the limit below decides.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise _bomb(err, max_pixels) from None
    except (OSError, ValueError, SyntaxError):
        raise BadRequest(400, f"the body ({len(data):,} bytes) is not an image file: expected {IMAGE_FORMATS}. "
                              + USAGE) from None
    width, height = image.size
    try:
        check_pixel_count(height, width, limit=max_pixels, what="the image", setting="--max-image-pixels")
    except ValueError as err:
        image.close()
        raise BadRequest(413, str(err)) from None
    try:
        with image:
            return to_rgb_uint8(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as err:  # a few formats check again while decoding frames
        raise _bomb(err, max_pixels) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise BadRequest(400, f"the {image.format or ''} image of {height}x{width} (HxW) does not decode ({err}); "
                              "expected a complete image file: is it truncated?") from None


def _bomb(err: Exception, max_pixels: int) -> BadRequest:
    # PIL refuses more than twice its own limit at open; ours (at most PIL's by default) is then exceeded too.
    return BadRequest(413, f"the image has more than the limit of {max_pixels:,} pixels (PIL refused it as a "
                           f"possible decompression bomb: {err}); downscale it")
