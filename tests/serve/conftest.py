"""Shared fixtures of the serve tests: a tiny random K-Net exported with a dynamic batch and size, test images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from export.exporter.onnx_export import export_model, model_info
from sp_ray.config import load_config
from sp_ray.models import build_model

REPO = Path(__file__).resolve().parents[2]
KNET_TINY = REPO / "configs" / "demo" / "knet_tiny_synthetic.yaml"
CLASS_NAMES = ["circle", "square", "triangle"]
CAT_IDS = [1, 3, 7]  # not contiguous: the answer must map labels to COCO ids
TOPK = 6


@pytest.fixture(scope="session")
def served_model(session_dir) -> Path:
    """A random tiny K-Net (ResNet-18, 8 kernels, 64 px resize), exported with a dynamic batch and size.

    ``eval.score_threshold`` 0 keeps all ``TOPK`` detections by default, so every answer has instances.
    """
    cfg = load_config(KNET_TINY, [
        "model.num_classes=3", "model.num_kernels=8", "model.feat_channels=32", "model.ffn_channels=64",
        "model.num_heads=2", "model.num_stages=1", "data.max_size=64", "data.short_size=64",
        f"eval.topk={TOPK}", "eval.score_threshold=0.0",
    ])  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(cfg)
        info = model_info(cfg, class_names=CLASS_NAMES, cat_ids=CAT_IDS, input_size=None, batch_size=None,
                          source="tests/serve random K-Net")
        sample = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), np.uint8)
        return export_model(model.eval(), info, session_dir("serve_model") / "knet.onnx", sample=sample)
    finally:
        torch.set_num_threads(threads)


def shapes_image(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: a noisy background with a bright disc and a dark square."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 120, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    cy, cx, r = height * 0.4, width * 0.35, min(height, width) * 0.22
    image[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.integers(180, 255, 3, dtype=np.uint8)
    image[int(height * 0.55) : int(height * 0.9), int(width * 0.55) : int(width * 0.9)] = 20
    return image


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def test_images() -> list[np.ndarray]:
    """Five images of five sizes, two padded graph inputs after the 64 px resize: 64 x 64 and 32 x 64."""
    sizes = [(64, 64), (28, 64), (60, 60), (30, 90), (50, 40)]
    return [shapes_image(h, w, seed) for seed, (h, w) in enumerate(sizes)]
