"""Shared fixtures of the export tests: synthetic data and a tiny K-Net over-fitted on it (a few seconds)."""

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
def synthetic(tmp_path_factory) -> dict[str, Path]:
    """10 synthetic 64 x 64 images: ``images`` folder, ``train`` json (7 images), ``val`` json (3)."""
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"), num_images=10, image_size=IMAGE_SIZE, seed=0, val_fraction=0.25
    )


@pytest.fixture(scope="session")
def trained_knet(tmp_path_factory, synthetic) -> Path:
    """Final checkpoint of a tiny K-Net trained 40 epochs on the train images (evaluated on them too).

    Over-fitting a handful of images gives segm / bbox AP of about 20 / 25 on them, so AP comparisons
    between PyTorch and onnxruntime are made on real, non-empty predictions.
    """
    cfg = load_config(KNET_TINY, [
        f"data.train_annotations={synthetic['train']}", f"data.train_images={synthetic['images']}",
        f"data.val_images={synthetic['images']}",
        f"data.max_size={IMAGE_SIZE}", f"data.short_size={IMAGE_SIZE}",
        "data.flip_prob=0.0", "model.frozen_stages=4", "model.num_kernels=8", "model.feat_channels=32",
        "model.ffn_channels=64", "train.epochs=40", "train.lr_steps=[40]", "train.warmup_iters=5",
        "train.lr=1e-3", "train.grad_clip=0", "eval.topk=20",
    ])  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(cfg, tmp_path_factory.mktemp("knet_run"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def knet_export(tmp_path_factory, trained_knet, synthetic):
    """``export_checkpoint`` of the trained K-Net: fp32, dynamic size and batch, parity on the val images."""
    from export.onnx_export import export_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return export_checkpoint(
            trained_knet, tmp_path_factory.mktemp("onnx") / "knet.onnx", input_size=None, batch_size=None,
            parity_images=synthetic["images"], parity_count=4,
        )
    finally:
        torch.set_num_threads(threads)
