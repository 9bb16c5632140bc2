from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from sp_ray.data.transforms import build_transforms, collate, mask_boxes, resize_for_inference
from sp_ray.types import Target


def _item(height: int, width: int, seed: int = 0, num_instances: int = 3) -> tuple[tv_tensors.Image, Target]:
    """An image with ``num_instances`` random rectangles/discs as instances."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    ys = torch.arange(height)[:, None]
    xs = torch.arange(width)[None, :]
    masks = []
    for index in range(num_instances):
        cy = int(torch.randint(2, height - 2, (1,), generator=generator))
        cx = int(torch.randint(2, width - 2, (1,), generator=generator))
        radius = int(torch.randint(3, max(4, min(height, width) // 3), (1,), generator=generator))
        if index % 2:
            masks.append((ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2)
        else:
            masks.append(((ys - cy).abs() <= radius) & ((xs - cx).abs() <= radius // 2))
    masks_tensor = torch.stack(masks) if masks else torch.zeros((0, height, width), dtype=torch.bool)
    target = Target(
        labels=torch.arange(num_instances, dtype=torch.int64),
        masks=tv_tensors.Mask(masks_tensor),
        boxes=tv_tensors.BoundingBoxes(mask_boxes(masks_tensor), format="XYXY", canvas_size=(height, width)),
        image_id=7,
        orig_size=(height, width),
        image_size=(height, width),
    )
    return tv_tensors.Image(image), target


def test_mask_boxes_are_pixel_boundary_extents() -> None:
    masks = torch.zeros((3, 6, 8), dtype=torch.bool)
    masks[0, 1:4, 2:7] = True
    masks[1, 5, 0] = True
    boxes = mask_boxes(masks)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[2, 1, 7, 4], [0, 5, 1, 6], [0, 0, 0, 0]]


@pytest.mark.parametrize(("height", "width"), [(60, 90), (91, 47), (64, 64)])
def test_resize_and_flip_keep_masks_and_boxes_aligned(height: int, width: int) -> None:
    image, target = _item(height, width)
    resized_image, resized = build_transforms(train=False, max_size=100, short_size=40)(image, target)
    image, target = _item(height, width)
    flip = build_transforms(train=True, max_size=100, short_size=40, flip_prob=1.0)
    flipped_image, flipped = flip(image, target)

    expected_size = resize_for_inference(height, width, max_size=100, short_size=40)
    for out_image, out in ((resized_image, resized), (flipped_image, flipped)):
        assert tuple(out_image.shape[-2:]) == expected_size
        assert out["image_size"] == expected_size
        assert out["orig_size"] == (height, width)
        assert out["masks"].dtype == torch.bool and out["masks"].shape == (3, *expected_size)
        assert out["masks"].flatten(1).any(dim=1).all()
        assert isinstance(out["boxes"], tv_tensors.BoundingBoxes)
        assert tuple(out["boxes"].canvas_size) == expected_size
        assert torch.equal(out["boxes"], mask_boxes(out["masks"]))
        assert out["labels"].tolist() == [0, 1, 2]
    assert torch.equal(flipped_image, resized_image.flip(-1))
    assert torch.equal(flipped["masks"], resized["masks"].flip(-1))
    new_width = expected_size[1]
    mirrored = torch.stack(
        [
            new_width - resized["boxes"][:, 2],
            resized["boxes"][:, 1],
            new_width - resized["boxes"][:, 0],
            resized["boxes"][:, 3],
        ],
        dim=1,
    )
    assert torch.equal(flipped["boxes"], mirrored)
    # The boxes are the original ones scaled, up to nearest-neighbour sampling of the masks.
    scale = torch.tensor([expected_size[1] / width, expected_size[0] / height] * 2)
    assert ((resized["boxes"] - target["boxes"] * scale).abs() <= 2.0).all()


def test_eval_transforms_never_flip() -> None:
    transforms = build_transforms(train=False, max_size=64, short_size=32, flip_prob=1.0)
    assert not any(isinstance(step, v2.RandomHorizontalFlip) for step in transforms.transforms)
    image, target = _item(32, 48)
    out_image, out = transforms(image, target)
    assert torch.equal(out_image, image) and torch.equal(out["masks"], target["masks"])


@pytest.mark.parametrize(("max_size", "short_size"), [(1333, 800), (100, 40), (128, 128), (64, 96)])
@pytest.mark.parametrize(
    ("height", "width"), [(480, 640), (640, 480), (333, 1000), (37, 41), (800, 1333), (9, 400), (400, 9)]
)
def test_resize_for_inference_agrees_with_v2_resize(
    height: int, width: int, max_size: int, short_size: int
) -> None:
    image = tv_tensors.Image(torch.zeros((3, height, width), dtype=torch.uint8))
    target = Target(
        labels=torch.zeros(0, dtype=torch.int64),
        masks=tv_tensors.Mask(torch.zeros((0, height, width), dtype=torch.bool)),
        boxes=tv_tensors.BoundingBoxes(torch.zeros((0, 4)), format="XYXY", canvas_size=(height, width)),
        image_id=0,
        orig_size=(height, width),
        image_size=(height, width),
    )
    out_image, _ = build_transforms(train=False, max_size=max_size, short_size=short_size)(image, target)
    expected = resize_for_inference(height, width, max_size=max_size, short_size=short_size)
    assert tuple(out_image.shape[-2:]) == expected
    assert all(type(side) is int for side in expected)
    if max_size > short_size:
        reference = v2.Resize(size=short_size, max_size=max_size)(image)
        assert tuple(reference.shape[-2:]) == expected
    assert max(expected) <= max_size
    assert min(expected) == short_size or max(expected) == max_size


def test_resize_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="positive"):
        resize_for_inference(10, 10, max_size=0, short_size=5)
    with pytest.raises(ValueError, match="image size"):
        resize_for_inference(0, 10, max_size=20, short_size=5)
    with pytest.raises(ValueError, match="too elongated"):
        resize_for_inference(5, 400, max_size=64, short_size=96)
    with pytest.raises(ValueError, match="flip_prob"):
        build_transforms(train=True, max_size=20, short_size=10, flip_prob=1.5)


def test_collate_pads_to_multiple_and_keeps_contents() -> None:
    batch = [
        _item(50, 70, seed=1),
        _item(64, 33, seed=2, num_instances=0),
        _item(20, 20, seed=3, num_instances=1),
    ]
    images, targets = collate(batch, size_divisor=32)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 64, 96)
    assert type(images) is Tensor
    for (image, target), padded, out in zip(batch, images, targets, strict=True):
        h, w = image.shape[-2:]
        assert torch.equal(padded[:, :h, :w], image.as_subclass(Tensor))
        assert not padded[:, h:, :].any() and not padded[:, :, w:].any()
        assert set(out) == {"labels", "masks", "boxes", "image_id", "orig_size", "image_size", "image"}
        assert out["image"].data_ptr() == padded.data_ptr()  # a view of the batch, not a copy
        assert all(type(out[key]) is Tensor for key in ("labels", "masks", "boxes"))
        assert out["masks"].dtype == torch.bool and out["masks"].shape == (len(target["labels"]), 64, 96)
        assert torch.equal(out["masks"][:, :h, :w], target["masks"].as_subclass(Tensor))
        assert not out["masks"][:, h:, :].any() and not out["masks"][:, :, w:].any()
        assert torch.equal(out["boxes"], target["boxes"].as_subclass(Tensor))
        assert out["image_size"] == (h, w)


def test_collate_exact_multiple_is_not_padded_and_single_equals_batched() -> None:
    item = _item(64, 32, seed=4)
    images, targets = collate([item], size_divisor=32)
    assert images.shape == (1, 3, 64, 32)
    batched_images, batched_targets = collate([item, _item(40, 40, seed=5)], size_divisor=32)
    assert torch.equal(batched_images[0, :, :64, :32], images[0])
    assert torch.equal(batched_targets[0]["masks"][:, :64, :32], targets[0]["masks"])


def test_collate_works_as_dataloader_collate_fn() -> None:
    items = [_item(30, 40, seed=i) for i in range(4)]
    loader = DataLoader(items, batch_size=2, collate_fn=functools.partial(collate, size_divisor=16))
    shapes = [(images.shape, len(targets)) for images, targets in loader]
    assert shapes == [((2, 3, 32, 48), 2), ((2, 3, 32, 48), 2)]


def test_collate_rejects_empty_batch_and_bad_divisor() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    with pytest.raises(ValueError, match="size_divisor"):
        collate([_item(8, 8)], size_divisor=0)


def test_random_scale_resize_varies_size_and_keeps_masks_aligned():
    import torch
    from torchvision import tv_tensors

    from sp_ray.data.transforms import build_transforms, mask_boxes

    masks = torch.zeros(1, 100, 160, dtype=torch.bool)
    masks[0, 20:60, 30:90] = True
    image = tv_tensors.Image(torch.zeros(3, 100, 160, dtype=torch.uint8))
    target = {"labels": torch.tensor([0]), "masks": tv_tensors.Mask(masks),
              "boxes": tv_tensors.BoundingBoxes([[30, 20, 90, 60]], format="XYXY", canvas_size=(100, 160)),
              "image_id": 1, "orig_size": (100, 160), "image_size": (100, 160)}
    transform = build_transforms(train=True, max_size=160, short_size=100, flip_prob=0.0, scale_range=(0.5, 1.5))
    torch.manual_seed(0)
    sizes = set()
    for _ in range(8):
        out_image, out = transform(image, target)
        sizes.add(tuple(out_image.shape[-2:]))
        assert out["image_size"] == tuple(out_image.shape[-2:])
        assert torch.equal(out["boxes"].as_subclass(torch.Tensor), mask_boxes(out["masks"].as_subclass(torch.Tensor)))
        h, w = out_image.shape[-2:]
        assert abs(w / h - 1.6) < 0.05
    assert len(sizes) > 4
    fixed = build_transforms(train=False, max_size=160, short_size=100, scale_range=(0.5, 1.5))
    assert tuple(fixed(image, target)[0].shape[-2:]) == (100, 160)


# --- rotation (mmdet's Rotate, the reference's K-Net COCO fine-tuning augmentation) ------------------------


def _square_item(size: int = 100, side: int = 40, value: int = 7) -> tuple[tv_tensors.Image, Target]:
    """A uniform ``value`` image with one centred square instance of ``side`` pixels."""
    start = (size - side) // 2
    masks = torch.zeros(1, size, size, dtype=torch.bool)
    masks[0, start : start + side, start : start + side] = True
    target = Target(
        labels=torch.tensor([0]),
        masks=tv_tensors.Mask(masks),
        boxes=tv_tensors.BoundingBoxes(mask_boxes(masks), format="XYXY", canvas_size=(size, size)),
        image_id=1,
        orig_size=(size, size),
        image_size=(size, size),
    )
    return tv_tensors.Image(torch.full((3, size, size), value, dtype=torch.uint8)), target


def test_a_centred_square_rotated_45_degrees_is_a_diamond_with_the_grey_fill_in_the_corners() -> None:
    from sp_ray.data.transforms import RandomRotate

    image, target = _square_item()
    rotate = RandomRotate(level=10, prob=1.0, max_angle=45.0)
    torch.manual_seed(0)
    rotated_image, rotated = rotate(image, target)
    mask = rotated["masks"].as_subclass(Tensor)[0]
    # By hand: a 40-pixel square rotated 45 degrees about the image centre (50, 50) is a diamond of
    # diagonal 40 * sqrt(2) = 56.6 px and the same area, 1600 px; pixel centres inside it span columns
    # and rows 22..77, so the tight box is [22, 22, 78, 78].
    assert rotated["boxes"].as_subclass(Tensor).tolist() == [[22.0, 22.0, 78.0, 78.0]]
    assert abs(int(mask.sum()) - 1600) <= 40
    assert not mask[30, 30] and mask[50, 22] and mask[22, 50]  # the square's corner is cut, the diamond's tips are in
    assert rotated["masks"].dtype == torch.bool and isinstance(rotated["masks"], tv_tensors.Mask)
    # The area the rotation brings in is mmdet's img_fill_val 128; the middle keeps the image's value.
    assert rotated_image.dtype == torch.uint8 and rotated_image[:, 0, 0].tolist() == [128, 128, 128]
    assert rotated_image[:, 50, 50].tolist() == [7, 7, 7] and rotated_image.shape == image.shape


def test_rotate_level_gives_the_mmdet_angle_with_a_random_sign_and_prob_decides() -> None:
    from sp_ray.data.transforms import RandomRotate

    torch.manual_seed(0)
    always = [RandomRotate(level=3, prob=1.0).draw_angle() for _ in range(40)]
    assert set(always) == {9.0, -9.0}  # level 3 of 10 x 30 degrees, both signs
    assert 10 <= sum(angle > 0 for angle in always) <= 30
    assert {RandomRotate(level=3, prob=0.0).draw_angle() for _ in range(40)} == {None}
    half = [RandomRotate(level=3, prob=0.5).draw_angle() for _ in range(200)]
    assert 70 <= sum(angle is not None for angle in half) <= 130
    image, target = _square_item()
    never = build_transforms(train=True, max_size=100, short_size=100, flip_prob=0.0, rotate_level=3, rotate_prob=0.0)
    out_image, out = never(image, target)
    assert torch.equal(out_image, image) and torch.equal(out["masks"], target["masks"])
    for level, prob in ((11, 0.5), (-1, 0.5), (3, 1.5)):
        with pytest.raises(ValueError, match="rotate"):
            RandomRotate(level=level, prob=prob)


def test_rotation_is_train_only_and_follows_the_seed() -> None:
    image, target = _square_item()
    evaluation = build_transforms(train=False, max_size=100, short_size=100, rotate_level=10, rotate_prob=1.0)
    assert torch.equal(evaluation(image, target)[0], image)
    train = build_transforms(train=True, max_size=100, short_size=100, flip_prob=0.0, rotate_level=10, rotate_prob=0.5)

    def run(seed: int, workers: int) -> list[Tensor]:
        torch.manual_seed(seed)  # what fit's seed_everything does before each epoch
        items = [_square_item(value=v) for v in range(16)]
        batches = functools.partial(collate, size_divisor=4)
        loader = DataLoader(_Mapped(items, train), batch_size=1, num_workers=workers, collate_fn=batches)
        return [targets[0]["masks"] for _, targets in loader]

    first = run(3, workers=0)
    assert all(torch.equal(a, b) for a, b in zip(first, run(3, workers=0), strict=True))
    with_workers = run(3, workers=2)
    assert all(torch.equal(a, b) for a, b in zip(with_workers, run(3, workers=2), strict=True))
    rotated = {bool(not torch.equal(m, _square_item()[1]["masks"].as_subclass(Tensor))) for m in first + with_workers}
    assert rotated == {True, False}  # prob 0.5: some items turn, some do not
    assert not all(torch.equal(a, b) for a, b in zip(first, run(4, workers=0), strict=True))


class _Mapped(torch.utils.data.Dataset):
    def __init__(self, items, transform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.transform(*self.items[index])
