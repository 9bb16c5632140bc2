from __future__ import annotations

import torch

from sp_ray.models.knet import build_knet
from sp_ray.models.postprocess import postprocess
from sp_ray.objectives.knet_criterion import KNetCriterion
from sp_ray.objectives.matcher import HungarianMatcher

H, W = 64, 96
COLORS = {0: (220.0, 40.0, 40.0), 1: (40.0, 40.0, 220.0)}


def _rect(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _scene() -> tuple[torch.Tensor, list[dict]]:
    """Two images of coloured rectangles on black: red = class 0, blue = class 1."""
    layouts = [
        ([_rect(8, 40, 8, 40), _rect(24, 56, 56, 88)], [0, 1]),
        ([_rect(16, 48, 40, 80)], [1]),
    ]
    images = torch.zeros(len(layouts), 3, H, W)
    targets = []
    for i, (masks, labels) in enumerate(layouts):
        for mask, label in zip(masks, labels, strict=True):
            images[i][:, mask] = torch.tensor(COLORS[label])[:, None]
        targets.append(
            {
                "labels": torch.tensor(labels),
                "masks": torch.stack(masks),
                "boxes": torch.zeros(len(labels), 4),
                "image_id": i,
                "orig_size": (H, W),
                "image_size": (H, W),
            }
        )
    return images, targets


def test_tiny_knet_fits_two_images(one_thread) -> None:
    torch.manual_seed(0)
    model = build_knet(
        num_classes=2, depth=18, frozen_stages=4, num_kernels=8, num_stages=2, feat_channels=32,
        ffn_channels=64, num_heads=4,
    )  # fmt: skip
    criterion = KNetCriterion(num_classes=2, matcher=HungarianMatcher())
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05
    )
    images, targets = _scene()
    model.train()
    history = []
    for _ in range(80):
        loss = sum(criterion(model(images), targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < history[0] / 20

    model.eval()
    with torch.no_grad():
        results = postprocess(model(images), image_sizes=[(H, W)] * 2, orig_sizes=[(H, W)] * 2, k=4)
    # The best detection of image 1 is its blue rectangle, segmented almost exactly.
    best_mask = results[1]["masks"][0]
    target = targets[1]["masks"][0]
    iou = (best_mask & target).sum() / (best_mask | target).sum()
    assert results[1]["labels"][0].item() == 1
    assert iou > 0.8
