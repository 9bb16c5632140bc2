"""Ray Train options: train.find_unused_parameters reaches DDP, train.checkpoint_upload=async resumes."""

import json
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
from torch import nn

from sp_ray.checkpoint import is_checkpoint, load_checkpoint
from sp_ray.config import load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.objectives import build_objective
from sp_ray.train.loop import fit
from sp_ray.train.ray_train import FAILURE_MARKER, UPLOAD_DIR, RaySession, run_training, setup_worker

pytestmark = pytest.mark.slow

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "knet_tiny_synthetic.yaml"
TINY = ["data.max_size=64", "data.short_size=64", "model.num_kernels=8", "model.feat_channels=32",
        "model.ffn_channels=64", "model.num_heads=2", "model.num_stages=1", "train.batch_size=2",
        "train.warmup_iters=2", "train.max_failures=0"]

# The workers import this module's functions by value: the test folder is not on their path.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_images=10, image_size=64, seed=5)


def tiny_config(data, *extra):
    return load_config(DEMO_CONFIG, [f"data.train_annotations={data['train']}",
                                     f"data.train_images={data['images']}", *TINY, *extra])


def with_unused_branch(cfg, model):
    """The fine-tuning objective plus a trained layer that no forward pass calls."""
    objective = build_objective(cfg, model)
    objective.unused_branch = nn.Linear(4, 4)
    return objective


def unused_branch_worker(loop_config):
    cfg, work_dir = setup_worker(loop_config)
    fit(cfg, work_dir, session=RaySession(cfg, work_dir), objective=with_unused_branch)


def test_find_unused_parameters_lets_ddp_train_an_unused_branch(local_ray, tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, "train.epochs=1", "train.num_workers=2")
    # DDP's own error (it names the option; Ray cuts the middle of the message out)
    with pytest.raises(RuntimeError, match="Parameter indices which did not receive grad"):
        run_training(cfg, tmp_path / "off", worker=unused_branch_worker)
    on = tiny_config(tiny_data, "train.epochs=1", "train.num_workers=2", "train.find_unused_parameters=true")
    final = run_training(on, tmp_path / "on", worker=unused_branch_worker)
    assert load_checkpoint(final).meta["step"] == 2  # 8 images, 2 workers x 2 per step
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "on" / "workers").glob("rank*.json"))]
    assert records[0]["param_checksum"] == pytest.approx(records[1]["param_checksum"], rel=1e-6)


def test_async_upload_resumes_from_the_uploaded_checkpoint(local_ray, tiny_data, tmp_path):
    # One worker, 8 images, batch 2: 4 steps per epoch; the worker fails once in epoch 3 (step 10) and the
    # restarted one continues from the last checkpoint Ray uploaded in the background.
    cfg = tiny_config(tiny_data, "train.epochs=3", "train.checkpoint_upload=async", "train.inject_failure_at_step=10",
                      "train.max_failures=1", f"train.storage_path={tmp_path / 'storage'}")
    final = run_training(cfg, tmp_path / "work", run_name="async")
    work = tmp_path / "work"
    failed_at = (work / FAILURE_MARKER).stat().st_mtime
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["step"] == 12
    # Epoch 1's row was written before the failure and kept: the restart did not start over from scratch.
    assert rows[0]["time"] < failed_at
    assert load_checkpoint(final).meta["step"] == 12
    # The snapshots were uploaded, then deleted; WORK_DIR/last is the run's own and stays.
    uploaded = sorted(p.name for p in (tmp_path / "storage" / "async").glob("checkpoint_epoch=*") if is_checkpoint(p))
    assert uploaded[-1] == "checkpoint_epoch=0003"
    assert not any((work / UPLOAD_DIR).iterdir())
    assert is_checkpoint(work / "last")
