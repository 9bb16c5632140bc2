"""Fixtures of the predict tests: synthetic data and the tiny over-fitted K-Net of tests/export, exported.

The same recipe as ``tests/export/conftest.py`` (whose fixtures are not visible from this folder), so AP
comparisons are made on real, non-empty predictions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sp_ray.config import load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.train.loop import fit

REPO = Path(__file__).resolve().parents[2]
KNET_TINY = REPO / "configs" / "demo" / "knet_tiny_synthetic.yaml"
IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory) -> dict[str, Path]:
    """10 synthetic 64 x 64 images: ``images`` folder, ``train`` json (7 images), ``val`` json (3)."""
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"), num_images=10, image_size=IMAGE_SIZE, seed=0, val_fraction=0.25
    )


@pytest.fixture(scope="session")
def knet_onnx(tmp_path_factory, synthetic_set) -> Path:
    """A tiny K-Net trained 40 epochs on the train images, exported fp32 with dynamic size and batch."""
    from export.onnx_export import export_checkpoint

    cfg = load_config(KNET_TINY, [
        f"data.train_annotations={synthetic_set['train']}", f"data.train_images={synthetic_set['images']}",
        f"data.val_images={synthetic_set['images']}",
        f"data.max_size={IMAGE_SIZE}", f"data.short_size={IMAGE_SIZE}",
        "data.flip_prob=0.0", "model.frozen_stages=4", "model.num_kernels=8", "model.feat_channels=32",
        "model.ffn_channels=64", "train.epochs=40", "train.lr_steps=[40]", "train.warmup_iters=5",
        "train.lr=1e-3", "train.grad_clip=0", "eval.topk=20",
    ])  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        checkpoint = fit(cfg, tmp_path_factory.mktemp("knet_run"))
        result = export_checkpoint(
            checkpoint, tmp_path_factory.mktemp("onnx") / "knet.onnx", input_size=None, batch_size=None,
            parity_images=synthetic_set["images"], parity_count=2,
        )
    finally:
        torch.set_num_threads(threads)
    return Path(result.path)
