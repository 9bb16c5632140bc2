"""GPU provider options (``export.providers``) and the runtime's IO-binding path, checked without a GPU.

onnxruntime-gpu lists TensorRT and CUDA as available on this machine but cannot start them, so the
options a ``Segmenter`` gives onnxruntime are captured by a stand-in ``InferenceSession`` that records
its arguments and runs a real CPU session. The expected profile strings are written out by hand.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import providers
from export.geometry import padded_size
from export.metadata import KNET_FORMAT, ModelInfo
from export.onnx_export import export_model, model_info, sample_images
from export.providers import GpuSettings, input_shape_range, provider_options
from export.runtime import Segmenter, input_size_for, prepare_batch
from sp_ray.config import load_config
from sp_ray.models import build_model
from sp_ray.models.maskrcnn import build_maskrcnn

from .conftest import IMAGE_SIZE, REPO

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
KNET_TINY = REPO / "configs" / "demo" / "knet_tiny_synthetic.yaml"


def _info(*, input_size=None, batch_size=None, max_size=1333, short_size=800, size_divisor=32) -> ModelInfo:
    return ModelInfo(
        family="knet", output_format=KNET_FORMAT, class_names=["a"], cat_ids=[1], max_size=max_size,
        short_size=short_size, size_divisor=size_divisor, input_size=input_size, batch_size=batch_size,
        mask_stride=8, topk=10, score_threshold=0.0, mask_threshold=0.5, mean=[0.0] * 3, std=[1.0] * 3,
        precision="fp32", config_hash="x",
    )  # fmt: skip


def _profile(options: dict[str, str]) -> tuple[str, str, str]:
    return options["trt_profile_min_shapes"], options["trt_profile_opt_shapes"], options["trt_profile_max_shapes"]


def test_a_fixed_size_fixed_batch_model_gets_one_shape_and_every_option(tmp_path) -> None:
    info = _info(input_size=(512, 512), batch_size=1)
    settings = GpuSettings(device_id=1, trt_cache_dir=tmp_path / "engines", trt_fp16=True)
    assert provider_options([TRT, CUDA, CPU], info, settings) == [
        (TRT, {"device_id": "1", "trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
               "trt_engine_cache_path": str(tmp_path / "engines"),
               "trt_profile_min_shapes": "images:1x3x512x512", "trt_profile_opt_shapes": "images:1x3x512x512",
               "trt_profile_max_shapes": "images:1x3x512x512"}),
        (CUDA, {"device_id": "1"}),
        (CPU, {}),
    ]  # fmt: skip


def test_a_fixed_size_dynamic_batch_model_spans_one_to_the_batch_limit() -> None:
    info = _info(input_size=(480, 640), batch_size=None)
    (name, options), = provider_options([TRT], info, GpuSettings(trt_max_batch=4))
    assert name == TRT
    assert _profile(options) == ("images:1x3x480x640", "images:4x3x480x640", "images:4x3x480x640")
    # Without a cache folder the cache is off and no path is given.
    assert options["trt_engine_cache_enable"] == "False" and "trt_engine_cache_path" not in options
    assert options["trt_fp16_enable"] == "False" and options["device_id"] == "0"


def test_a_dynamic_size_model_spans_the_sizes_the_resize_can_produce() -> None:
    # COCO's resize: short side 800, long side at most 1333, padded to multiples of 32. The smallest input
    # is one 32 x 32 cell; the largest has both sides at 1333 rounded up: 42 x 32 = 1344.
    (_, fixed_batch), = provider_options([TRT], _info(batch_size=1), GpuSettings())
    assert _profile(fixed_batch) == ("images:1x3x32x32", "images:1x3x800x800", "images:1x3x1344x1344")
    (_, dynamic), = provider_options([TRT], _info(), GpuSettings(trt_max_batch=2))
    assert _profile(dynamic) == ("images:1x3x32x32", "images:2x3x800x800", "images:2x3x1344x1344")
    # A long-side cap below the short-side target binds everything: 100 rounds up to 128 (divisor 64).
    (_, capped), = provider_options([TRT], _info(batch_size=1, max_size=100, short_size=160, size_divisor=64),
                                    GpuSettings())
    assert _profile(capped) == ("images:1x3x64x64", "images:1x3x128x128", "images:1x3x128x128")


@pytest.mark.parametrize("max_size,short_size", [(1333, 800), (160, 160), (100, 160), (1000, 32)])
def test_every_batch_the_runtime_prepares_is_inside_the_profile(max_size, short_size) -> None:
    info = _info(max_size=max_size, short_size=short_size)
    low, _, high = input_shape_range(info, max_batch=2)
    sizes = [(1, 1), (1, 13), (7, 3000), (3000, 7), (480, 640), (640, 480), (5000, 5000), (799, 1333), (1, 1)]
    shapes = []
    for h, w in sizes:
        try:
            shapes.append(input_size_for(h, w, info))
        except ValueError:  # too elongated for this resize: the runtime refuses it before any graph run
            continue
    for a in shapes:
        for b in shapes:  # every pair: a batch pads to the larger of both sides
            height, width = padded_size([a, b], size_divisor=info.size_divisor)
            assert low[2] <= height <= high[2] and low[3] <= width <= high[3], (a, b, low, high)
    assert max(padded_size([s], size_divisor=info.size_divisor)[0] for s in shapes) == high[2]


def test_tensorrt_needs_the_metadata_and_other_providers_get_no_options() -> None:
    with pytest.raises(ValueError, match="metadata"):
        provider_options([TRT, CPU], None, GpuSettings())
    assert provider_options(["OpenVINOExecutionProvider", CPU], None, GpuSettings()) == [
        ("OpenVINOExecutionProvider", {}), (CPU, {})]


@pytest.mark.parametrize("values,match", [
    ({"device_id": -1}, r"GpuSettings\.device_id must be a CUDA device index \(an integer >= 0\), got -1"),
    ({"device_id": True}, "device_id"),
    ({"trt_max_batch": 0}, r"trt_max_batch must be an integer >= 1, got 0"),
    ({"trt_fp16": "yes"}, r"trt_fp16 \(--trt-fp16\) must be true or false"),
    ({"io_binding": 1}, "io_binding must be true, false or None"),
    ({"trt_cache_dir": ""}, r"trt_cache_dir \(--trt-cache\) must be a folder path"),
])  # fmt: skip
def test_bad_settings_are_value_errors_naming_the_option(values, match) -> None:
    with pytest.raises(ValueError, match=match):
        GpuSettings(**values)


def test_a_cache_dir_that_is_a_file_is_refused(tmp_path) -> None:
    path = tmp_path / "engines"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match=rf"trt_cache_dir \(--trt-cache\) {path} is a file; give a folder"):
        GpuSettings(trt_cache_dir=path)


def test_io_binding_defaults_to_the_gpu_providers() -> None:
    assert GpuSettings().uses_io_binding(CUDA) and GpuSettings().uses_io_binding(TRT)
    assert not GpuSettings().uses_io_binding(CPU)
    assert GpuSettings(io_binding=True).uses_io_binding(CPU)
    assert not GpuSettings(io_binding=False).uses_io_binding(TRT)


def test_gpu_providers_are_only_proposed_when_a_gpu_is_usable(monkeypatch) -> None:
    offered = [TRT, CUDA, CPU]
    monkeypatch.setattr(ort, "get_available_providers", lambda: offered)
    monkeypatch.setattr(providers, "_cuda_devices", lambda: 0)
    assert providers.default_providers() == [CPU]
    monkeypatch.setattr(providers, "_cuda_devices", lambda: 1)
    monkeypatch.setattr(providers, "_loadable", lambda library: False)
    assert providers.default_providers() == [CUDA, CPU]
    monkeypatch.setattr(providers, "_loadable", lambda library: True)
    assert providers.default_providers() == [TRT, CUDA, CPU]


@pytest.fixture(scope="module")
def knet_onnx(tmp_path_factory):
    """A random tiny K-Net exported with a dynamic batch and size (64 px resize, divisor 32)."""
    cfg = load_config(KNET_TINY, [
        "model.num_classes=3", "model.num_kernels=8", "model.feat_channels=32", "model.ffn_channels=64",
        "model.num_heads=2", "model.num_stages=1", f"data.max_size={IMAGE_SIZE}", f"data.short_size={IMAGE_SIZE}",
        "eval.topk=6",
    ])  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(cfg)
        info = model_info(cfg, class_names=list("abc"), cat_ids=[1, 2, 3], input_size=None, batch_size=None)
        sample = np.random.default_rng(0).integers(0, 256, (2, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        return export_model(model.eval(), info, tmp_path_factory.mktemp("providers") / "knet.onnx", sample=sample)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def maskrcnn_onnx(tmp_path_factory):
    """A random tiny Mask R-CNN (fixed 64 x 64 input, batch 1): outputs whose length depends on the image."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_maskrcnn(num_classes=4, depth=18, frozen_stages=-1, detections_per_image=10,
                               test_proposals=40).eval()
        cfg = load_config(None, ["model.name=maskrcnn", "model.num_classes=4", f"data.max_size={IMAGE_SIZE}",
                                 f"data.short_size={IMAGE_SIZE}", "eval.topk=10"])
        info = model_info(cfg, class_names=list("abcd"), cat_ids=[1, 2, 3, 7], input_size=(64, 64), batch_size=1)
        sample, _ = prepare_batch(sample_images(None, count=1), info)
        return export_model(model, info, tmp_path_factory.mktemp("providers") / "maskrcnn.onnx", sample=sample)
    finally:
        torch.set_num_threads(threads)


class RecordingSession:
    """Stands in for ``onnxruntime.InferenceSession``: records what it was asked for, runs a real CPU session."""

    real = ort.InferenceSession
    calls: list[dict] = []

    def __init__(self, path, sess_options=None, providers=None, provider_options=None) -> None:
        RecordingSession.calls.append({"providers": providers, "provider_options": provider_options})
        self._session = RecordingSession.real(path, sess_options=sess_options, providers=[CPU])

    def __getattr__(self, name):
        return getattr(self._session, name)


def test_the_segmenter_gives_onnxruntime_the_options_as_built(knet_onnx, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    RecordingSession.calls = []
    cache = tmp_path / "cache" / "engines"
    settings = GpuSettings(device_id=0, trt_cache_dir=cache, trt_fp16=True, trt_max_batch=2)
    segmenter = Segmenter(knet_onnx, providers=[TRT, CUDA, CPU], threads=1, gpu=settings)
    # The first session only reads the metadata (CPU, no options); the second is the model's.
    assert RecordingSession.calls[0] == {"providers": [CPU], "provider_options": None}
    assert RecordingSession.calls[1] == {
        "providers": [TRT, CUDA, CPU],
        "provider_options": [
            {"device_id": "0", "trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
             "trt_engine_cache_path": str(cache),
             # 64 px resize, divisor 32: sides 32..64; batch 1..2.
             "trt_profile_min_shapes": "images:1x3x32x32", "trt_profile_opt_shapes": "images:2x3x64x64",
             "trt_profile_max_shapes": "images:2x3x64x64"},
            {"device_id": "0"},
            {},
        ],
    }  # fmt: skip
    assert len(RecordingSession.calls) == 2 and cache.is_dir()
    # The stand-in ran on the CPU: the fallback is logged and IO binding (on for GPU providers) is off.
    assert segmenter.providers == [CPU] and not segmenter.io_binding
    assert "could not start TensorrtExecutionProvider" in caplog.text

    RecordingSession.calls = []
    Segmenter(knet_onnx, providers=[CUDA, CPU], gpu=GpuSettings(device_id=3))
    assert RecordingSession.calls == [{"providers": [CUDA, CPU], "provider_options": [{"device_id": "3"}, {}]}]


def test_a_real_cpu_session_holds_the_options_it_was_given(knet_onnx) -> None:
    segmenter = Segmenter(knet_onnx, providers=[CPU], threads=1)
    assert segmenter.session.get_providers() == [CPU]
    assert provider_options([CPU], segmenter.info, segmenter.gpu) == [(CPU, {})]
    # onnxruntime reports the CPU provider's own settings; none of them was changed by the (empty) options.
    reported = segmenter.session.get_provider_options()
    assert list(reported) == [CPU]
    plain = ort.InferenceSession(str(knet_onnx), providers=[CPU]).get_provider_options()
    assert reported == plain


@pytest.mark.parametrize("model", ["knet_onnx", "maskrcnn_onnx"])
def test_the_io_binding_path_gives_the_plain_outputs(model, request, monkeypatch) -> None:
    path = request.getfixturevalue(model)
    plain = Segmenter(path, providers=[CPU], threads=1)
    bound = Segmenter(path, providers=[CPU], threads=1, gpu=GpuSettings(io_binding=True))
    assert not plain.io_binding and bound.io_binding

    def not_this_path(*args, **kwargs):
        raise AssertionError("session.run was called although IO binding is on")

    monkeypatch.setattr(bound.session, "run", not_this_path)
    images = sample_images(None, count=4)
    step = plain.info.batch_size or len(images)
    compared = 0
    for start in range(0, len(images), step):
        batch, _ = plain.prepare_batch(images[start : start + step])
        expected, got = plain.run(batch), bound.run(batch)
        assert [(o.dtype, o.shape) for o in got] == [(o.dtype, o.shape) for o in expected]
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_array_equal(g, e)
        compared += sum(o.size for o in got)
    assert compared > 0  # real detections were compared, not empty outputs
    for e, g in zip(plain.predict_batch(images), bound.predict_batch(images), strict=True):
        np.testing.assert_array_equal(g.scores, e.scores)
        np.testing.assert_array_equal(g.masks, e.masks)
