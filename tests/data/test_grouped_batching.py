"""Aspect-ratio grouped batches: one orientation per batch, every image once per epoch across the processes."""

from collections import Counter

import pytest

from sp_ray.config import load_config
from sp_ray.data.coco import CocoInstanceDataset
from sp_ray.data.grouped_batching import AspectRatioBatchSampler, coco_orientation_groups, orientation_groups
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.train.loop import build_train_loader, set_loader_epoch

# 23 images (odd), 15 landscape or square and 8 portrait, in no particular order.
SIZES = [(60, 80), (80, 60), (64, 64), (50, 90), (90, 50), (70, 70), (80, 60), (60, 80), (40, 100), (100, 40),
         (60, 80), (60, 80), (80, 60), (64, 64), (80, 60), (60, 80), (60, 80), (80, 60), (60, 81), (81, 60),
         (60, 80), (60, 80), (61, 80)]  # fmt: skip


def test_orientation_groups_come_from_width_and_height():
    assert orientation_groups([(60, 80), (80, 60), (64, 64)]) == [0, 1, 0]  # (height, width): 0 = w >= h


def epoch_batches(groups, batch_size, num_replicas, *, seed=0, epoch=0):
    """The batches of every rank for one epoch, by rank."""
    out = []
    for rank in range(num_replicas):
        sampler = AspectRatioBatchSampler(groups, batch_size, num_replicas=num_replicas, rank=rank, seed=seed)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
        assert len(out[-1]) == len(sampler)
    return out


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [2, 3, 4])
def test_batches_never_mix_orientations_and_hold_every_image_once(num_replicas, batch_size):
    groups = orientation_groups(SIZES)
    assert Counter(groups) == {0: 15, 1: 8}
    for epoch in range(3):
        by_rank = epoch_batches(groups, batch_size, num_replicas, epoch=epoch)
        for batches in by_rank:
            for batch in batches:
                assert 1 <= len(batch) <= batch_size
                assert len({groups[i] for i in batch}) == 1, (batch, [SIZES[i] for i in batch])
        # Every process runs the same number of steps (DDP), and each image is in one batch of one process.
        assert len({len(batches) for batches in by_rank}) == 1
        seen = [i for batches in by_rank for batch in batches for i in batch]
        assert sorted(seen) == list(range(len(SIZES)))
        # Within a process too: no image twice.
        for batches in by_rank:
            flat = [i for batch in batches for i in batch]
            assert len(flat) == len(set(flat))


def test_the_number_of_steps_is_the_same_every_epoch():
    groups = orientation_groups(SIZES)
    lengths = {len(epoch_batches(groups, 3, 3, epoch=epoch)[0]) for epoch in range(5)}
    # ceil(15 / 3) + ceil(8 / 3) = 8 batches, one of them split in two: 3 steps for each of 3 processes.
    assert lengths == {3}
    sizes = sorted(len(batch) for batches in epoch_batches(groups, 3, 3) for batch in batches)
    assert sizes == [1, 2, 2, 3, 3, 3, 3, 3, 3]  # portrait: 3 + 3 + 2; landscape: 5 x 3, one split into 2 + 1


def test_batch_size_one_repeats_as_distributed_sampler_pads():
    # 23 single-image batches cannot be shared equally by 2 processes: one is repeated, as DistributedSampler
    # repeats an index to even out the shards; nothing else is repeated and nothing is lost.
    groups = orientation_groups(SIZES)
    by_rank = epoch_batches(groups, 1, 2)
    assert [len(batches) for batches in by_rank] == [12, 12]
    counts = Counter(i for batches in by_rank for batch in batches for i in batch)
    assert set(counts) == set(range(23))
    assert sorted(counts.values()) == [1] * 22 + [2]


def test_the_order_is_a_function_of_seed_and_epoch():
    groups = orientation_groups(SIZES)
    first = epoch_batches(groups, 3, 2, seed=7, epoch=4)
    assert epoch_batches(groups, 3, 2, seed=7, epoch=4) == first  # a resumed run sees the same batches
    assert epoch_batches(groups, 3, 2, seed=7, epoch=5) != first  # set_epoch reshuffles
    assert epoch_batches(groups, 3, 2, seed=8, epoch=4) != first


def test_fewer_images_than_processes_is_refused():
    with pytest.raises(ValueError, match="2 images cannot be shared by 3"):
        AspectRatioBatchSampler([0, 1], 2, num_replicas=3, rank=0)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """13 train images of 4:3 and 3:4, long side 48."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("mixed"), num_images=16, image_size=48, seed=2,
                                   val_fraction=0.2, aspect_ratios=(4 / 3, 3 / 4))


def test_groups_are_read_from_the_json(mixed):
    dataset = CocoInstanceDataset(mixed["train"], mixed["images"])
    images = dataset.coco.imgs
    expected = [0 if images[i]["width"] >= images[i]["height"] else 1 for i in dataset.image_ids]
    assert coco_orientation_groups(dataset) == expected
    assert set(expected) == {0, 1}


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_training_loader_batches_one_orientation(mixed, world_size):
    cfg = load_config(None, [f"data.train_annotations={mixed['train']}", f"data.train_images={mixed['images']}",
                             "data.max_size=48", "data.short_size=36", "data.num_workers=0", "train.batch_size=3"])
    assert cfg.data.group_by_aspect_ratio  # on by default
    dataset = CocoInstanceDataset(mixed["train"], mixed["images"])
    loaders = [build_train_loader(cfg, dataset, rank=rank, world_size=world_size) for rank in range(world_size)]
    for epoch in range(2):
        ids = []
        for loader in loaders:
            set_loader_epoch(loader, epoch)
            for _images, targets in loader:
                shapes = {(h >= w) for h, w in (t["image_size"] for t in targets)}
                assert len(shapes) == 1, [t["image_size"] for t in targets]
                ids += [t["image_id"] for t in targets]
        assert sorted(ids) == sorted(dataset.image_ids)
