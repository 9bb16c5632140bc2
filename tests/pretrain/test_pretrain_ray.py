"""`sp-ray pretrain` through Ray Train: two DDP workers train the model and its SP objective in step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sp_ray.checkpoint import load_checkpoint
from sp_ray.cli import main
from sp_ray.data.synthetic import write_synthetic_dataset

from .test_sp_objective import write_pseudo_masks

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "knet_tiny_sp_pretrain.yaml"


def test_cli_pretrain_with_two_workers(local_ray, tmp_path):
    data = write_synthetic_dataset(tmp_path / "synthetic", num_images=10, image_size=64, seed=5)
    pseudo = write_pseudo_masks(data, tmp_path / "pseudo")
    work = tmp_path / "work"
    code = main([
        "pretrain", "--config", str(CONFIG), "--work-dir", str(work), "--num-workers", "2",
        f"data.train_annotations={pseudo['annotations']}", f"data.train_images={pseudo['images']}",
        "data.max_size=64", "data.short_size=64", "model.num_kernels=8", "model.feat_channels=32",
        "model.ffn_channels=64", "model.num_heads=2", "model.num_stages=1", "train.batch_size=2",
        "train.epochs=1", "train.warmup_iters=2", "model.frozen_stages=-1",
    ])
    assert code == 0
    records = [json.loads(p.read_text()) for p in sorted((work / "workers").glob("rank*.json"))]
    assert [r["rank"] for r in records] == [0, 1]
    assert records[0]["param_checksum"] == pytest.approx(records[1]["param_checksum"], rel=1e-6)
    ckpt = load_checkpoint(work / "final")
    assert ckpt.config.pretrain.enabled
    assert not any(k.startswith(("model.", "projection.")) for k in ckpt.model_state)  # the plain K-Net's keys
    assert list(ckpt.objective_state) == ["projection.weight"]
    metrics = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_ker_s1" in metrics
