"""Aspect-ratio grouped batches: every batch holds images of one orientation, every image once per epoch.

Batches are padded to their largest image (``sp_ray.data.transforms.collate``), so a batch that mixes a
landscape and a portrait image pads both to a square and computes on the padding. detectron2
(``AspectRatioGroupedDataset``) and mmdet (``GroupSampler``) batch each orientation separately; so does
``AspectRatioBatchSampler``, with two groups read from the COCO json's width and height (no image is
decoded): 0 = width >= height (landscape and square), 1 = width < height (portrait).

The batches of an epoch are planned for all training processes at once, the same plan on every one, and
dealt out in turn (``plan_epoch``). Grouping the shard of each process separately, as a wrapper of
``DistributedSampler`` would, gives the processes different numbers of batches (their shards hold different
mixes of orientations), and DDP needs every process to run the same number of steps. The plan:

1. a permutation of all images drawn from ``seed + epoch`` (``set_epoch``, as ``DistributedSampler``);
2. each group's images in that order, cut into batches of ``batch_size``; a group's last batch may be
   smaller: it is kept, never dropped and never filled with images of the other group;
3. while the number of batches is not a multiple of the process count, the largest batch is split in two
   (each process then runs the same number of steps); only when that cannot be done (fewer images than
   processes x steps, i.e. batch size 1 with an image count that is not a multiple of the process count)
   are batches of the start of the plan repeated, as ``DistributedSampler`` repeats indices to even out
   the shards;
4. the batches in a random order (from the same generator); process ``rank`` takes batches
   ``rank, rank + W, rank + 2W, ...``.

So in every epoch each image is in exactly one batch of exactly one process (except the repeats of 3),
and the shards of the processes are disjoint. The number of batches per process is the same in every
epoch (it depends on the group sizes only), which the learning-rate schedule relies on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

LANDSCAPE = 0  # width >= height (square images included)
PORTRAIT = 1  # width < height


def orientation_groups(sizes: Sequence[tuple[int, int]]) -> list[int]:
    """The group of each image: ``LANDSCAPE`` (0) when width >= height, else ``PORTRAIT`` (1).

    Args:
        sizes: (height, width) per image, as in the COCO json.
    """
    return [LANDSCAPE if width >= height else PORTRAIT for height, width in sizes]


def coco_orientation_groups(dataset) -> list[int]:
    """``orientation_groups`` of the items of a ``CocoInstanceDataset`` (json height / width, nothing decoded).

    The dataset keeps only images whose displayed size (after EXIF orientation) equals the json's, so the
    json's orientation is the pixels'.
    """
    images = dataset.coco.imgs
    return orientation_groups([(images[i]["height"], images[i]["width"]) for i in dataset.image_ids])


def plan_epoch(groups: Sequence[int], batch_size: int, *, num_replicas: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch of all processes, in the order they are dealt out (module docstring).

    Args:
        groups: the group of each dataset index (``orientation_groups``); any hashable ints.
        batch_size: images per batch of one process.
        num_replicas: the number of training processes W.
        seed, epoch: the plan is a function of ``seed + epoch`` (and of the arguments above) alone.

    Returns:
        A list of batches (lists of dataset indices), its length a multiple of ``num_replicas``; batch ``k``
        goes to process ``k % num_replicas``.
    """
    if batch_size < 1 or num_replicas < 1:
        raise ValueError(f"batch_size and num_replicas must be >= 1, got {batch_size} and {num_replicas}")
    if len(groups) < num_replicas:
        raise ValueError(f"{len(groups)} images cannot be shared by {num_replicas} training processes")
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    order = torch.randperm(len(groups), generator=generator).tolist()
    by_group: dict[int, list[int]] = {}
    for index in order:
        by_group.setdefault(groups[index], []).append(index)
    batches = [members[start:start + batch_size]
               for _, members in sorted(by_group.items())
               for start in range(0, len(members), batch_size)]
    target = -(-len(batches) // num_replicas) * num_replicas
    while len(batches) < target and any(len(batch) > 1 for batch in batches):
        largest = max(range(len(batches)), key=lambda k: len(batches[k]))  # the first of the largest
        batch = batches[largest]
        half = (len(batch) + 1) // 2
        batches[largest:largest + 1] = [batch[:half], batch[half:]]
    batches += batches[:target - len(batches)]  # only with singleton batches left: DistributedSampler's padding
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[k] for k in shuffled]


class AspectRatioBatchSampler(Sampler[list[int]]):
    """The batches of one training process (a DataLoader ``batch_sampler``): its share of ``plan_epoch``.

    Every process builds it with the same ``groups``, ``batch_size``, ``num_replicas`` and ``seed`` and its
    own ``rank``, and calls ``set_epoch(epoch)`` before each epoch.
    """

    def __init__(
        self, groups: Sequence[int], batch_size: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.groups = list(groups)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self._length = len(plan_epoch(self.groups, batch_size, num_replicas=num_replicas, seed=seed, epoch=0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        plan = plan_epoch(self.groups, self.batch_size, num_replicas=self.num_replicas, seed=self.seed,
                          epoch=self.epoch)
        yield from plan[self.rank::self.num_replicas]

    def __len__(self) -> int:
        return self._length // self.num_replicas
