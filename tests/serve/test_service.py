"""The parts of ``sp-ray serve`` that run without a Serve app: the error boundary, the settings and their
command-line errors, the ``serve deploy`` config, the batch limit of fixed-batch models, torch-free imports."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from starlette.requests import Request
from starlette.responses import JSONResponse

from export.providers import GpuSettings
from sp_ray.cli import main
from sp_ray.errors import UserError
from sp_ray.onnx_model import read_model_info
from sp_ray.serve.request import BadRequest
from sp_ray.serve.settings import DEFAULT_MAX_BATCH_SIZE, ServeSettings, batch_limit

from .conftest import REPO

CONFIG = REPO / "configs" / "serve" / "knet.yaml"


def http_request(request_id: str) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/predict", "root_path": "", "query_string": b"",
             "headers": [(b"x-request-id", request_id.encode()), (b"content-type", b"image/png")]}

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    return Request(scope, receive)


def test_a_server_error_is_a_500_whose_request_id_is_in_the_log(caplog) -> None:
    from sp_ray.serve.app import respond

    async def failing_route(request: Request) -> JSONResponse:
        raise RuntimeError("onnxruntime failed")

    logger = logging.getLogger("ray.serve")  # Ray stops it propagating to the root logger caplog listens on
    logger.addHandler(caplog.handler)
    try:
        response = asyncio.run(respond(http_request("req-1234"), failing_route))
    finally:
        logger.removeHandler(caplog.handler)
    assert response.status_code == 500
    body = json.loads(response.body)
    assert body["request_id"] == "req-1234" and "internal server error" in body["error"]
    record = next(r for r in caplog.records if "req-1234" in r.getMessage())
    assert record.levelno == logging.ERROR and "onnxruntime failed" in caplog.text  # the traceback is logged


def test_a_bad_request_keeps_its_status_and_message() -> None:
    from sp_ray.serve.app import respond

    async def refusing_route(request: Request) -> JSONResponse:
        raise BadRequest(413, "too big")

    response = asyncio.run(respond(http_request("req-5"), refusing_route))
    assert response.status_code == 413
    assert json.loads(response.body) == {"error": "too big", "request_id": "req-5"}


def test_batch_limit_follows_a_fixed_batch_and_refuses_more(served_model) -> None:
    info = read_model_info(str(served_model))
    assert info.batch_size is None
    assert batch_limit(ServeSettings(model="m.onnx"), info) == DEFAULT_MAX_BATCH_SIZE
    assert batch_limit(ServeSettings(model="m.onnx", max_batch_size=3), info) == 3
    fixed = dataclasses.replace(info, batch_size=4)
    assert batch_limit(ServeSettings(model="m.onnx"), fixed) == 4
    assert batch_limit(ServeSettings(model="m.onnx", max_batch_size=2), fixed) == 2  # padded to 4
    with pytest.raises(UserError, match=r"fixed batch of 4; use --max-batch-size 4 or less"):
        batch_limit(ServeSettings(model="m.onnx", max_batch_size=8), fixed)


@pytest.mark.parametrize("values, message", [
    ({"replicas": 0}, r"replicas \(--replicas\) must be an integer >= 1, got 0"),
    ({"port": 70000}, r"port \(--port\) must be an integer in \[1, 65535\]"),
    ({"threads": 1.5}, r"threads \(--threads\) must be an integer >= 1"),
    ({"batch_wait_timeout_s": -1.0}, r"batch_wait_timeout_s \(--batch-wait-timeout-s\) must be a number"),
    ({"max_body_mb": 0}, r"max_body_mb \(--max-body-mb\) must be a number of megabytes > 0"),
    ({"max_batch_size": 0}, r"max_batch_size \(--max-batch-size\) must be an integer >= 1"),
])  # fmt: skip
def test_bad_settings_name_the_flag(values, message) -> None:
    with pytest.raises(UserError, match=message):
        ServeSettings(model="m.onnx", **values)


def test_tensorrt_settings_go_to_the_replicas_with_the_batch_limit(tmp_path) -> None:
    assert ServeSettings(model="m.onnx").gpu_settings() is None
    settings = ServeSettings(model="m.onnx", gpu=True, trt_cache=str(tmp_path / "engines"), trt_fp16=True,
                             max_batch_size=4)
    assert settings.gpu_settings() == GpuSettings(trt_cache_dir=str(tmp_path / "engines"), trt_fp16=True,
                                                  trt_max_batch=4)
    assert ServeSettings(model="m.onnx", gpu=True).gpu_settings().trt_max_batch == DEFAULT_MAX_BATCH_SIZE
    with pytest.raises(UserError, match=r"trt_cache \(--trt-cache\) and trt_fp16 \(--trt-fp16\) apply to .* "
                                        r"give them with gpu \(--gpu\)"):
        ServeSettings(model="m.onnx", trt_fp16=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"trt_cache_dir \(--trt-cache\) .*file is a file"):
        ServeSettings(model="m.onnx", gpu=True, trt_cache=str(tmp_path / "file"))


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_command_line_errors_are_one_line_before_ray_starts(served_model, tmp_path, capsys) -> None:
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("not a model")
    cases = [
        (["--model", str(tmp_path / "missing.onnx")], "does not exist; export a model with 'sp-ray export'"),
        (["--model", str(not_onnx)], "is not an ONNX model"),
        (["--model", str(served_model), "--replicas", "0"], "replicas (--replicas) must be an integer >= 1"),
        (["--model", str(served_model), "--max-body-mb", "-1"], "max_body_mb (--max-body-mb) must be"),
    ]
    for args, message in cases:
        code, err = run_cli(["serve", *args], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_port_in_use_is_refused_before_ray_starts(served_model) -> None:
    # A fresh process: in this one an earlier test may have left a Ray running, which the command would join.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "sp_ray.cli", "serve", "--model", str(served_model),
                               "--port", str(port)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 2, done.stderr
    assert f"--port {port} cannot be bound" in done.stderr and "Started a local Ray" not in done.stderr


def test_the_serve_deploy_config_is_valid_and_its_args_build_the_app(served_model) -> None:
    from ray.serve.schema import ServeDeploySchema

    from sp_ray.serve.app import build_app

    config = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "sp_ray.serve.app:build_app" and config["http_options"]["host"] == "127.0.0.1"
    args = {**app.args, "model": str(served_model)}
    application = build_app(args)
    assert type(application).__name__ == "Application"
    with pytest.raises(UserError, match=r"unknown settings \['replica'\]"):
        build_app({**args, "replica": 2})
    with pytest.raises(UserError, match=r"\['port'\] belong to the config's http_options"):
        build_app({**args, "port": 9000})
    with pytest.raises(UserError, match="does not exist"):
        build_app({**args, "model": "/nonexistent/knet.onnx"})


def test_the_replica_and_the_client_import_no_torch() -> None:
    code = ("import sys, json; import {module}; "
            "print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & "
            "{{'torch', 'torchvision', 'onnxruntime', 'ray', 'scipy', 'pycocotools'}})))")
    loaded = {}
    for module in ("sp_ray.serve.app", "sp_ray.serve.settings", "export.client"):
        out = subprocess.run([sys.executable, "-c", code.format(module=module)], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[2])
        loaded[module] = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["sp_ray.serve.app"] == ["onnxruntime", "ray"]
    assert loaded["export.client"] == []
    assert loaded["sp_ray.serve.settings"] == []  # the driver checks GpuSettings without loading onnxruntime


def test_the_client_names_what_an_answer_lacks() -> None:
    from export.client import decode_prediction

    with pytest.raises(ValueError, match=r"lacks \['instances'\]"):
        decode_prediction({"height": 2, "width": 2})
    instance = {"category_id": 1, "category_name": "a", "score": 0.5, "bbox": [0, 0, 1, 1],
                "segmentation": {"size": [3, 2], "counts": "6"}}  # 6 zeros
    with pytest.raises(ValueError, match=r"instance 0: its mask is \[3, 2\], the image \[2, 2\]"):
        decode_prediction({"height": 2, "width": 2, "instances": [instance]})
    found = decode_prediction(json.dumps({"height": 3, "width": 2, "instances": [instance]}))
    assert found.masks.shape == (1, 3, 2) and not found.masks.any() and found.category_names == ["a"]
