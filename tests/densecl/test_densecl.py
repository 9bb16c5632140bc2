from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from sp_ray.checkpoint import load_checkpoint
from sp_ray.config import load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.densecl.data import UnlabeledImageFolder, build_two_view_transform
from sp_ray.densecl.model import (
    DenseCL,
    dense_contrastive_loss,
    dense_correspondence,
    enqueue_,
    export_backbone_weights,
    info_nce_loss,
)
from sp_ray.densecl.train import check_batch_fits_queue, ssl_train_step, train_densecl
from sp_ray.models import build_model
from sp_ray.models.backbone import build_resnet, load_backbone_weights

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "densecl_tiny.yaml"


def tiny_model(*, queue_size: int = 64, momentum: float = 0.99) -> DenseCL:
    return DenseCL(depth=18, init_weights=None, hidden_dim=64, proj_dim=32, queue_size=queue_size,
                   momentum=momentum, temperature=0.2, loss_lambda=0.5)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_images=8, image_size=64)["images"]


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(TINY_CONFIG, [
        "ssl.epochs=1", "ssl.batch_size=4", "ssl.queue_size=8", "ssl.hidden_dim=32", "ssl.proj_dim=16",
        "ssl.base_batch_size=4", "ssl.lr=0.05", "ssl.image_size=64",
    ])


@pytest.fixture(scope="module")
def trained(tiny_cfg, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of the real training function; returns its work dir."""
    work = tmp_path_factory.mktemp("ssl")
    train_densecl(tiny_cfg, images, work)
    return work


# ---------------------------------------------------------------- dense correspondence and losses


def test_dense_correspondence_finds_permuted_locations() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 16, 12)
    perm = torch.stack([torch.randperm(12), torch.randperm(12)])
    # Key location j holds the query location perm[j], rescaled and slightly perturbed: cosine
    # similarity must still single it out.
    k = torch.gather(q, 2, perm[:, None, :].expand(-1, 16, -1)) * torch.rand(2, 1, 12).add(0.5)
    k = k + 0.01 * torch.randn_like(k)
    match = dense_correspondence(q, k)
    assert match.shape == (2, 12) and match.dtype == torch.long
    assert torch.equal(match, perm.argsort(dim=1))


def test_dense_correspondence_handles_larger_key_map() -> None:
    torch.manual_seed(1)
    q = torch.randn(1, 8, 4)
    k = torch.cat([torch.randn(1, 8, 5), q.flip(2)], dim=2)  # 5 distractors, then the queries reversed
    assert dense_correspondence(q, k).tolist() == [[8, 7, 6, 5]]


def test_info_nce_value() -> None:
    pos = torch.tensor([1.0, 0.5])
    neg = torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, 0.2]])
    t = 0.2
    expected = [-(p / t - math.log(math.exp(p / t) + sum(math.exp(n / t) for n in row)))
                for p, row in zip(pos.tolist(), neg.tolist(), strict=True)]
    assert info_nce_loss(pos, neg, t).item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_dense_loss_uses_the_matched_key_location() -> None:
    # Query locations are the unit vectors e0, e1; the key map holds them swapped; the queue lives in
    # the orthogonal dims, so every negative logit is 0 and a correct match gives pos = 1.
    q = torch.eye(4)[:, :2][None]  # (1, 4, 2): location 0 = e0, location 1 = e1
    k = q.flip(2)
    queue = torch.eye(4)[2:]  # (2, 4)
    t = 0.2
    matched = dense_contrastive_loss(q, k, dense_correspondence(q, k), queue, t)
    assert matched.item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-5)
    wrong = dense_contrastive_loss(q, k, torch.tensor([[0, 1]]), queue, t)  # identity: pos = 0
    assert wrong.item() == pytest.approx(math.log(3), rel=1e-5)


# ---------------------------------------------------------------- queues


def test_enqueue_is_fifo_and_wraps() -> None:
    queue = torch.zeros(6, 2)
    ptr = torch.zeros((), dtype=torch.long)
    for batch in range(4):  # 4 batches of 2 into 6 rows: the 4th overwrites the oldest (batch 0)
        enqueue_(queue, ptr, torch.full((2, 2), float(batch + 1)))
    assert queue[:, 0].tolist() == [4, 4, 2, 2, 3, 3]
    assert int(ptr) == 2
    assert queue.shape == (6, 2)


def test_enqueue_rejects_batch_that_does_not_divide_queue() -> None:
    with pytest.raises(ValueError, match="multiple of the global batch 4"):
        enqueue_(torch.zeros(6, 2), torch.zeros((), dtype=torch.long), torch.ones(4, 2))


def test_config_check_names_global_batch(tiny_cfg) -> None:
    check_batch_fits_queue(tiny_cfg.ssl, world_size=2)  # 8 % (4 x 2) == 0
    with pytest.raises(ValueError, match=r"4 x 3 = 12"):
        check_batch_fits_queue(tiny_cfg.ssl, world_size=3)


def test_forward_fills_queues_with_normalised_keys() -> None:
    torch.manual_seed(0)
    model = tiny_model(queue_size=8).train()
    views = torch.randint(0, 256, (4, 2, 3, 64, 64), dtype=torch.uint8)
    before = model.queue.clone()
    model(views[:, 0], views[:, 1])
    keys = model.encode_key(views[:, 1])
    assert model.queue.shape == (8, 32) and model.dense_queue.shape == (8, 32)
    assert int(model.queue_ptr) == 4 and int(model.dense_queue_ptr) == 4
    assert torch.allclose(model.queue[:4], keys.global_, atol=1e-5)
    assert torch.allclose(model.dense_queue[:4], keys.dense_mean, atol=1e-5)
    assert torch.allclose(model.dense_queue.norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.equal(model.queue[4:], before[4:])
    model.eval()
    model(views[:, 0], views[:, 1])  # evaluation changes neither queue nor key encoder
    assert int(model.queue_ptr) == 4


def test_momentum_update_moves_key_encoder_towards_query() -> None:
    model = tiny_model(momentum=0.9)
    q = next(model.encoder_q.parameters())
    k = next(model.encoder_k.parameters())
    with torch.no_grad():
        q.add_(1.0)
    before = k.clone()
    model.momentum_update_()
    assert torch.allclose(k, 0.9 * before + 0.1 * q)
    assert not k.requires_grad


# ---------------------------------------------------------------- training


def test_loss_falls_on_a_fixed_batch(images: Path, tiny_cfg) -> None:
    torch.manual_seed(0)
    dataset = UnlabeledImageFolder(images, transform=build_two_view_transform(tiny_cfg.ssl))
    views = torch.stack([dataset[i] for i in range(8)])  # (8, 2, 3, 64, 64), fixed for every step
    assert views.shape == (8, 2, 3, 64, 64) and views.dtype == torch.uint8
    model = tiny_model(queue_size=64)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    # Fill both queues with real keys first: against the random initial queue the loss starts
    # artificially low and rises while the queue fills.
    with torch.no_grad():
        for _ in range(64 // 8):
            model(views[:, 0], views[:, 1])
    losses = [ssl_train_step(model, views, optimizer, scheduler)["loss"] for _ in range(20)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.75 * losses[0], losses


def test_saved_backbone_loads_and_equals_trained_encoder(trained: Path) -> None:
    final = trained / "final"
    state = load_checkpoint(final).model_state
    resnet = build_resnet(18, weights=None, frozen_stages=-1, norm_eval=False)
    report = load_backbone_weights(resnet, str(final / "backbone.pth"))
    assert report.layout == "torchvision"
    # Every tensor equals the trained query ResNet (num_batches_tracked is a counter the loader leaves).
    loaded = {k: v for k, v in resnet.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert report.loaded == len(loaded) == 100  # ResNet-18: 20 conv weights + 20 BatchNorms x 4
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[f"encoder_q.0.{name}"]), name
    # The full checkpoint is in the official DenseCL layout and loads too (heads, key encoder, queues
    # skipped).
    report = load_backbone_weights(build_resnet(18, weights=None, frozen_stages=-1, norm_eval=False),
                                   str(final / "model.pt"))
    assert report.layout == "densecl"
    assert "queue" in report.skipped and "encoder_k.0.conv1.weight" in report.skipped
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1] and lines[0]["images_per_second"] > 0


def test_saved_backbone_initialises_knet(trained: Path) -> None:
    cfg = load_config(TINY_CONFIG.parent / "knet_tiny_synthetic.yaml", [
        f"model.backbone_weights={trained / 'final' / 'backbone.pth'}", "model.num_classes=4",
    ])
    model = build_model(cfg)
    exported = torch.load(trained / "final" / "backbone.pth", weights_only=True)
    assert torch.equal(model.backbone.conv1.weight, exported["conv1.weight"])
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, exported["layer4.1.bn2.running_var"])


def test_export_matches_encoder_and_unwraps() -> None:
    model = tiny_model()
    exported = export_backbone_weights(model)
    assert "conv1.weight" in exported and not any(k.startswith(("fc.", "0.", "1.")) for k in exported)
    assert torch.equal(exported["layer1.0.conv1.weight"], model.encoder_q.backbone.layer1[0].conv1.weight)
    with pytest.raises(TypeError, match="DenseCL"):
        export_backbone_weights(torch.nn.Linear(2, 2))


def test_resume_restores_queues_and_key_encoder(trained: Path, tiny_cfg, images: Path, tmp_path) -> None:
    ckpt = load_checkpoint(trained / "last", with_training_state=True)
    assert ckpt.training_state["epoch"] == 1 and ckpt.training_state["step"] == 2

    def build() -> DenseCL:
        return DenseCL(depth=18, init_weights=None, hidden_dim=32, proj_dim=16, queue_size=8,
                       momentum=0.99, temperature=0.2, loss_lambda=0.5)

    torch.manual_seed(tiny_cfg.train.seed)  # what train_densecl started from
    fresh = build()
    restored = build()
    restored.load_state_dict(ckpt.model_state)
    for name in ("queue", "queue_ptr", "dense_queue", "dense_queue_ptr"):
        assert torch.equal(getattr(restored, name), ckpt.model_state[name])
    # Two steps of 4 keys filled the queue of 8 with real keys and wrapped the pointer.
    assert int(restored.queue_ptr) == 0
    assert not torch.equal(restored.queue, fresh.queue)
    assert not torch.equal(restored.dense_queue, fresh.dense_queue)
    for name, tensor in restored.encoder_k.state_dict().items():
        assert torch.equal(tensor, ckpt.model_state[f"encoder_k.{name}"])
    # The EMA key encoder is its own state, not a copy of the query encoder.
    assert not torch.equal(restored.encoder_k[0].conv1.weight, restored.encoder_q[0].conv1.weight)
    assert not torch.equal(restored.encoder_k[0].conv1.weight, fresh.encoder_k[0].conv1.weight)

    # The training function continues from the checkpoint at epoch 2.
    cfg = dataclasses.replace(tiny_cfg, ssl=dataclasses.replace(tiny_cfg.ssl, epochs=2))
    train_densecl(cfg, images, tmp_path, resume=trained / "last")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["step"]) for m in lines] == [(2, 4)]
    resumed = load_checkpoint(tmp_path / "last", with_training_state=True)
    assert resumed.training_state["epoch"] == 2
    assert not torch.equal(resumed.model_state["queue"], ckpt.model_state["queue"])


def test_resume_with_other_queue_size_is_an_error(trained: Path, tiny_cfg, images: Path, tmp_path) -> None:
    cfg = dataclasses.replace(tiny_cfg, ssl=dataclasses.replace(tiny_cfg.ssl, queue_size=16, epochs=2))
    with pytest.raises(ValueError, match="ssl.queue_size"):
        train_densecl(cfg, images, tmp_path, resume=trained / "last")


def test_too_few_images_is_a_clear_error(tiny_cfg, images: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(tiny_cfg, ssl=dataclasses.replace(tiny_cfg.ssl, batch_size=16, queue_size=16))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train_densecl(cfg, images, tmp_path)


# ---------------------------------------------------------------- two workers


def _two_worker_step(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same initial model on both workers
        model = DenseCL(depth=18, init_weights=None, hidden_dim=16, proj_dim=8, queue_size=8,
                        momentum=0.99, temperature=0.2, loss_lambda=0.5)
        ddp = DistributedDataParallel(model, forward_sync_buffers=False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
        torch.manual_seed(100 + rank)  # different images on each worker
        views = torch.randint(0, 256, (2, 2, 3, 32, 32), dtype=torch.uint8)
        ssl_train_step(ddp, views, optimizer, scheduler)
        keys = model.encode_key(views[:, 1])
        torch.save({"queue": model.queue, "dense_queue": model.dense_queue, "ptr": model.queue_ptr,
                    "keys": keys.global_, "dense_keys": keys.dense_mean,
                    "conv1": model.encoder_q[0].conv1.weight.detach()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_workers_gather_keys_from_both(tmp_path: Path) -> None:
    mp.spawn(_two_worker_step, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for r in (r0, r1):
        assert int(r["ptr"]) == 4
        assert torch.allclose(r["queue"][:2], r0["keys"], atol=1e-5)  # rank order: worker 0, then 1
        assert torch.allclose(r["queue"][2:4], r1["keys"], atol=1e-5)
        assert torch.allclose(r["dense_queue"][:2], r0["dense_keys"], atol=1e-5)
        assert torch.allclose(r["dense_queue"][2:4], r1["dense_keys"], atol=1e-5)
    assert not torch.allclose(r0["keys"], r1["keys"])
    assert torch.equal(r0["queue"], r1["queue"])
    assert torch.equal(r0["conv1"], r1["conv1"])  # DDP averaged the gradients: same update on both


def test_images_are_normalised_inside_the_model() -> None:
    model = tiny_model().eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    a = model.encode_query(x)
    b = model.encode_query(x.float())
    assert torch.allclose(a.global_, b.global_)
    assert torch.allclose(a.global_.norm(dim=1), torch.ones(2), atol=1e-5)
    assert a.feats.shape == (2, 512, 4) and a.dense.shape == (2, 32, 4)


# ---------------------------------------------------------------- data


def test_two_view_transform_gives_two_different_uint8_views(images: Path, tiny_cfg) -> None:
    torch.manual_seed(0)
    dataset = UnlabeledImageFolder(images, transform=build_two_view_transform(tiny_cfg.ssl))
    assert len(dataset) == 8
    views = dataset[0]
    assert views.shape == (2, 3, 64, 64) and views.dtype == torch.uint8
    assert not torch.equal(views[0], views[1])


def test_image_folder_skips_unreadable_files_and_rejects_empty(images: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a_broken.png").write_bytes(b"not an image")
    (folder / "sub" / "b.png").write_bytes((images / "000001.png").read_bytes())
    (folder / "notes.txt").write_text("ignored")
    (folder / ".hidden.png").write_bytes(b"ignored too")
    dataset = UnlabeledImageFolder(folder, transform=lambda image: image.size)
    assert [p.name for p in dataset.files] == ["a_broken.png", "b.png"]
    assert dataset[0] == (64, 64) and dataset.skipped == 1  # the broken file is replaced by the next one
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        UnlabeledImageFolder(empty, transform=lambda image: image)
    with pytest.raises(FileNotFoundError, match="--images"):
        UnlabeledImageFolder(tmp_path / "missing", transform=lambda image: image)
