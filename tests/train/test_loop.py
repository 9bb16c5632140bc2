"""The training loop end to end on tiny synthetic data: it learns, it checkpoints, it resumes exactly."""

import json
from pathlib import Path

import pytest
import torch

from sp_ray.config import load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.evaluation.coco_eval import evaluate_checkpoint
from sp_ray.train.checkpoint import load_checkpoint
from sp_ray.train.loop import fit

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "knet_tiny_synthetic.yaml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(out, num_images=10, image_size=96, seed=3)


def tiny_config(data, *extra):
    return load_config(DEMO_CONFIG, [
        f"data.train_annotations={data['train']}", f"data.train_images={data['images']}",
        "data.max_size=96", "data.short_size=96", "data.flip_prob=0.0",
        "model.num_kernels=12", "model.feat_channels=32", "model.ffn_channels=64", "model.num_heads=2",
        "train.batch_size=4", "train.warmup_iters=5", *extra,
    ])


def test_tiny_knet_overfits_a_handful_of_images(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, "train.epochs=60", "train.lr=1e-3", "train.lr_steps=[50]")
    final = fit(cfg, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 60
    assert lines[-1]["loss"] < lines[0]["loss"] / 4, (lines[0]["loss"], lines[-1]["loss"])
    metrics, results = evaluate_checkpoint(
        str(final), annotations=str(tiny_data["train"]), images=str(tiny_data["images"]),
    )
    assert results
    assert metrics["segm"]["AP50"] > 30.0, metrics


def test_resume_continues_the_same_run(tiny_data, tmp_path):
    straight = tiny_config(tiny_data, "train.epochs=2", "model.num_stages=1")
    fit(straight, tmp_path / "straight")
    first_half = tiny_config(tiny_data, "train.epochs=1", "model.num_stages=1")
    fit(first_half, tmp_path / "stopped")
    # The stopped run is continued with the full schedule, as `finetune --resume` does.
    fit(straight, tmp_path / "stopped", resume=tmp_path / "stopped" / "last")
    a = load_checkpoint(tmp_path / "straight" / "final").model_state
    b = load_checkpoint(tmp_path / "stopped" / "final").model_state
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    ts = load_checkpoint(tmp_path / "stopped" / "last", with_training_state=True).training_state
    assert ts["epoch"] == 2
    # A config that groups the parameters otherwise cannot continue that optimizer state.
    regrouped = tiny_config(tiny_data, "train.epochs=3", "model.num_stages=1", "train.norm_decay_mult=0")
    with pytest.raises(ValueError, match=r"optimizer holds parameter groups of \[\d+, \d+\] tensors where"):
        fit(regrouped, tmp_path / "stopped", resume=tmp_path / "stopped" / "last")


def test_num_classes_must_match_the_data(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        fit(tiny_config(tiny_data, "model.num_classes=3", "train.epochs=1"), tmp_path)
