"""A real Ray Serve app on 127.0.0.1 (a free port), queried over HTTP with ``requests``.

One Ray (the ``local_ray`` fixture: started here, stopped here) and one service for the module; Serve is
shut down at the end. Expected answers come from the runtime in this process (``Segmenter.predict``) and
from pycocotools, never from the service's own code.
"""

from __future__ import annotations

import io
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pycocotools.mask as mask_util
import pytest
import requests
from PIL import Image

from export.client import decode_prediction, post_image
from export.runtime import Segmenter
from sp_ray.serve.settings import ServeSettings

from .conftest import CAT_IDS, CLASS_NAMES, TOPK, encode, shapes_image

pytestmark = pytest.mark.slow

MAX_BODY_MB = 0.25  # 262,144 bytes: small, so that the test can exceed it cheaply
MAX_PIXELS = 100_000
TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def service(local_ray, served_model):
    """The service of ``served_model``: 1 replica, batches of up to 4, 0.2 s for a batch to fill."""
    from ray import serve

    from sp_ray.serve.run import start_service

    settings = ServeSettings(model=str(served_model), port=free_port(), replicas=1, max_batch_size=4,
                             batch_wait_timeout_s=0.2, threads=1, max_body_mb=MAX_BODY_MB,
                             max_image_pixels=MAX_PIXELS)
    url = start_service(settings)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def segmenter(served_model) -> Segmenter:
    return Segmenter(served_model, providers=["CPUExecutionProvider"], threads=1)


def post(url: str, data=None, **kwargs) -> requests.Response:
    return requests.post(f"{url}/predict", data=data, timeout=TIMEOUT, **kwargs)


def decoded(data: bytes) -> np.ndarray:
    """The test's own decoding of image bytes: PIL to RGB."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def assert_answer_is_the_runtimes(answer: dict, image: np.ndarray, segmenter: Segmenter,
                                  score_threshold: float | None = None) -> None:
    expected = segmenter.predict(image, score_threshold=score_threshold)
    assert (answer["height"], answer["width"]) == image.shape[:2]
    instances = answer["instances"]
    assert len(instances) == len(expected)
    for got, box, score, label, mask in zip(instances, expected.boxes, expected.scores, expected.labels,
                                            expected.masks, strict=True):
        assert got["category_id"] == CAT_IDS[int(label)]
        assert got["category_name"] == CLASS_NAMES[int(label)]
        assert got["score"] == pytest.approx(float(score), abs=1e-6)
        x0, y0, x1, y1 = (float(v) for v in box)
        assert got["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-4)
        rle = {"size": got["segmentation"]["size"], "counts": got["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_util.decode(rle).astype(bool), mask)


def test_healthz_and_metadata(service, served_model) -> None:
    health = requests.get(f"{service}/healthz", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    meta = requests.get(f"{service}/metadata", timeout=TIMEOUT).json()
    props = {p.key: p.value for p in onnx.load(served_model).metadata_props}
    assert meta["class_names"] == CLASS_NAMES and meta["cat_ids"] == CAT_IDS
    assert meta["input_size"] is None and meta["batch_size"] is None and meta["precision"] == "fp32"
    assert meta["topk"] == TOPK and meta["config_hash"] == props["config_hash"].strip('"')
    assert meta["exporter"] == {"producer": "sp-ray", "source": "tests/serve random K-Net"}
    assert meta["serving"]["max_batch_size"] == 4 and meta["serving"]["max_image_pixels"] == MAX_PIXELS


def test_a_valid_image_gets_the_runtimes_instances_as_coco_json(service, segmenter, test_images) -> None:
    data = encode(test_images[0])
    response = post(service, data, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["instances"]) == TOPK  # the model's default threshold, 0, keeps its whole top-k
    assert_answer_is_the_runtimes(answer, decoded(data), segmenter)
    # The client helper gives the same boolean masks.
    served = decode_prediction(response.content)
    assert np.array_equal(served.masks, segmenter.predict(decoded(data)).masks)
    assert served.category_names == [i["category_name"] for i in answer["instances"]]


def test_multipart_and_score_threshold(service, segmenter, test_images) -> None:
    data = encode(test_images[1], "JPEG")
    scores = segmenter.predict(decoded(data)).scores
    threshold = float(np.median(scores))
    by_form = post(service, files={"image": ("photo.jpg", data, "image/jpeg")},
                   data={"score_threshold": str(threshold)})
    by_query = post(service, data, params={"score_threshold": threshold})
    for response in (by_form, by_query):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert 0 < len(answer["instances"]) == int((scores > threshold).sum()) < TOPK
        assert_answer_is_the_runtimes(answer, decoded(data), segmenter, score_threshold=threshold)


def png_claiming(height: int, width: int) -> bytes:
    """A 1 x 1 PNG whose header claims height x width (a decompression bomb's header)."""
    data = bytearray(encode(np.zeros((1, 1, 3), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    return data[: len(data) // 2]


def chunks(total: int):
    for _ in range(total // 65536):
        yield b"\0" * 65536


IMAGE = encode(shapes_image(40, 40, seed=9))
# (case, request keyword arguments, status, a part of the message)
BAD_INPUTS = [
    ("not an image", {"data": b"hello, this is a text file"}, 400, "is not an image file"),
    ("truncated image", {"data": truncated_jpeg()}, 400, "does not decode"),
    ("image over the pixel limit", {"data": encode(np.zeros((400, 300, 3), np.uint8))}, 413,
     "more than the limit of 100,000"),
    ("decompression bomb header", {"data": png_claiming(20_000, 20_000)}, 413, "more than the limit"),
    ("zero-size body", {"data": b""}, 400, "the image is empty"),
    ("body over the size limit", {"data": b"\0" * 300_000}, 413, "larger than the limit of 262,144 bytes"),
    ("chunked body over the size limit", {"data": chunks(400_000)}, 413, "larger than the limit"),
    ("unknown query parameter", {"data": IMAGE, "params": {"threshold": "0.5"}}, 400,
     "unknown query parameter(s) ['threshold']"),
    ("unknown form field", {"files": {"image": ("a.png", IMAGE)}, "data": {"model": "x"}}, 400,
     "unknown form field(s) ['model']"),
    ("multipart without an image", {"files": {"score_threshold": (None, "0.5")}}, 400, "has no 'image' part"),
    ("image part as a text field", {"files": {"image": (None, "not a file")}}, 400, "is a text field, not a file"),
    ("empty image part", {"files": {"image": ("a.png", b"")}}, 400, "the image is empty"),
    ("score_threshold not a number", {"data": IMAGE, "params": {"score_threshold": "high"}}, 400,
     "'high' is not a number; expected a number in [0, 1]"),
    ("score_threshold out of range", {"data": IMAGE, "params": {"score_threshold": "1.5"}}, 400,
     "'1.5' is out of range"),
    ("score_threshold NaN", {"data": IMAGE, "params": {"score_threshold": "nan"}}, 400, "out of range"),
    ("score_threshold twice", {"files": {"image": ("a.png", IMAGE)}, "data": {"score_threshold": "0.1"},
                               "params": {"score_threshold": "0.2"}}, 400, "both as a query parameter"),
    ("too elongated image", {"data": encode(np.zeros((1, 2000, 3), np.uint8))}, 400, "too elongated"),
]


@pytest.mark.parametrize("case, kwargs, status, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_its_4xx_and_the_service_stays_up(service, case, kwargs, status, message) -> None:
    response = post(service, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert message in body["error"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    after = post(service, IMAGE)
    assert after.status_code == 200 and len(after.json()["instances"]) == TOPK


def test_unknown_routes_and_methods(service) -> None:
    missing = requests.get(f"{service}/segment", timeout=TIMEOUT)
    assert missing.status_code == 404 and "POST /predict" in missing.json()["error"]
    wrong = requests.get(f"{service}/predict", timeout=TIMEOUT)
    assert wrong.status_code == 405 and "takes POST" in wrong.json()["error"] and wrong.headers["Allow"] == "POST"


def test_concurrent_requests_are_batched_and_equal_single_ones(service, test_images) -> None:
    payloads = [encode(image) for image in test_images] * 2
    singles = [post(service, data).json() for data in payloads[: len(test_images)]]
    with ThreadPoolExecutor(len(payloads)) as pool:
        responses = list(pool.map(lambda data: post(service, data), payloads))
    assert all(r.status_code == 200 for r in responses)
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1  # some graph runs served several
    for i, response in enumerate(responses):
        single = singles[i % len(test_images)]
        batched = response.json()
        assert (batched["height"], batched["width"]) == (single["height"], single["width"])
        assert [x["category_id"] for x in batched["instances"]] == [x["category_id"] for x in single["instances"]]
        for got, want in zip(batched["instances"], single["instances"], strict=True):
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
            assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-3)
            a = mask_util.decode({**got["segmentation"], "counts": got["segmentation"]["counts"].encode()})
            b = mask_util.decode({**want["segmentation"], "counts": want["segmentation"]["counts"].encode()})
            assert (a != b).mean() < 1e-3  # float rounding of a batched run may flip a pixel at the threshold


def test_the_python_client_posts_and_reports_errors(service, segmenter, test_images) -> None:
    data = encode(test_images[2])
    answer = post_image(service, data, score_threshold=0.0)
    assert np.array_equal(decode_prediction(answer).masks, segmenter.predict(decoded(data)).masks)
    with pytest.raises(RuntimeError, match=r"answered 400: the body \(5 bytes\) is not an image file"):
        post_image(service, b"hello")
