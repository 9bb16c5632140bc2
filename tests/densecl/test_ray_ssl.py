"""`sp-ray ssl` in Ray Train workers: DDP over two workers, checkpoints reported to Ray, a worker failure survived."""

import json
from pathlib import Path

import pytest
import torch

from sp_ray.checkpoint import load_checkpoint
from sp_ray.config import load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.densecl.train import run_ssl
from sp_ray.models.backbone import build_resnet, load_backbone_weights

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "densecl_tiny.yaml"
TINY = ["ssl.batch_size=2", "ssl.base_batch_size=2", "ssl.queue_size=16", "ssl.hidden_dim=32", "ssl.image_size=64",
        "train.num_workers=2"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_images=10, image_size=64, seed=5)["images"]


def tiny_config(*extra):
    return load_config(CONFIG, [*TINY, *extra])


def worker_records(work_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((work_dir / "workers").glob("rank*.json"))]


def test_ssl_runs_in_two_ray_workers(local_ray, images, tmp_path):
    final = run_ssl(tiny_config("ssl.epochs=1"), tmp_path, images)
    state = load_checkpoint(final).model_state
    # 10 images, 2 per worker per step, 2 workers: 2 steps, each enqueueing the 4 keys gathered from both.
    assert int(state["queue_ptr"]) == 8
    assert int(state["dense_queue_ptr"]) == 8
    resnet = build_resnet(18, weights=None, frozen_stages=-1, norm_eval=False)
    report = load_backbone_weights(resnet, str(final / "backbone.pth"))
    assert report.loaded and torch.isfinite(next(resnet.parameters())).all()
    records = worker_records(tmp_path)
    assert [(r["rank"], r["backend"]) for r in records] == [(0, "gloo"), (1, "gloo")]
    # DDP keeps the query encoders identical: both ranks end with the same parameters.
    assert records[0]["param_checksum"] == pytest.approx(records[1]["param_checksum"], rel=1e-6)


def test_worker_failure_resumes_from_the_reported_checkpoint(local_ray, images, tmp_path):
    cfg = tiny_config("ssl.epochs=4", "train.inject_failure_at_step=7", "train.max_failures=1",
                      "train.checkpoint_interval=2")
    final = run_ssl(cfg, tmp_path, images)
    assert (tmp_path / ".injected_failure_done").exists()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # 2 steps per epoch. Epoch 2 was the last checkpoint reported before rank 1 died at step 7 (in epoch 4) and
    # epoch 3 was logged; the restarted workers continue from epoch 2's checkpoint, which Ray restores, and log
    # epoch 3 again in place of the old row: each epoch once, none lost.
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    assert [m["step"] for m in lines] == [2, 4, 6, 8]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    meta = load_checkpoint(final).meta
    assert (meta["epoch"], meta["step"]) == (4, 8)
    assert int(load_checkpoint(final).model_state["queue_ptr"]) == (8 * 4) % 16  # 4 keys a step, 8 steps
    # Every checkpoint went to Ray: the runs' storage holds the reported epochs 2 and 4.
    reported = {p.name for p in (tmp_path / "ray").glob("*/checkpoint_epoch=*")}
    assert {"checkpoint_epoch=0002", "checkpoint_epoch=0004"} <= reported
    assert (final / "backbone.pth").is_file()
