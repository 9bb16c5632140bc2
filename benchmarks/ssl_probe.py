"""Feature check of ``sp-ray ssl``: random-init ResNet vs the DenseCL backbone on the synthetic shapes.

Both backbones are frozen (``propose``'s ``build_frozen_backbone``) and read the same images at the same
input size. Two measures, side by side:

* proposal recall: the saliency proposals of ``sp-ray propose`` (Free Mask on C5, the thresholds of the
  ``propose`` config unless overridden) on every val image; an instance is recalled when some proposal
  has mask IoU >= 0.5 with it (`sp_ray.evaluation.proposal_quality`). The synthetic images are 160 px,
  where C5 would be a 5 x 5 grid, so the images are resized to ``--input-size`` (default 320: 10 x 10)
  before the backbone, as ``propose`` resizes to its input size; masks are scored at 160 px.
* linear probe: a logistic regression (1x1 conv, L-BFGS) of per-pixel foreground (the union of the
  instance masks) on the ``--probe-level`` features bilinearly upsampled to 160 px, fitted on
  ``--pixels-per-image`` random pixels of each train image and scored on every pixel of the val images.

The DenseCL backbone is trained here on the train images with ``train_densecl`` and the tiny config
(``--ssl-epochs``, ``--ssl-override``), or read from ``--weights``.

    OMP_NUM_THREADS=1 python benchmarks/ssl_probe.py --out runs/bench/ssl_probe.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor, nn

from sp_ray.config import ProposeConfig, load_config
from sp_ray.data.coco import link_images, read_coco_json
from sp_ray.data.images import load_image_rgb
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.densecl.train import BACKBONE_FILE, train_densecl
from sp_ray.evaluation.proposal_quality import (
    best_iou_per_instance,
    fit_linear_probe,
    foreground_scores,
    mask_iou_matrix,
    probe_predict,
    proposal_recall,
    sample_pixel_features,
)
from sp_ray.pretrain.saliency import build_frozen_backbone, input_size, prepare_image, saliency_proposals

ROOT = Path(__file__).resolve().parents[1]
SSL_CONFIG = ROOT / "configs" / "demo" / "densecl_tiny.yaml"
LEVELS = {"c3": 1, "c4": 2, "c5": 3}
THRESHOLD_FLAGS = ("mask_threshold", "min_area", "top_k", "min_center_y", "max_box_width", "min_maskness")


def load_split(annotations: Path, images: Path) -> list[tuple[np.ndarray, Tensor]]:
    """(uint8 [H, W, 3] pixels, bool [K, H, W] instance masks) of every image of a COCO json."""
    data = read_coco_json(annotations)
    by_image: dict[int, list[np.ndarray]] = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(mask_utils.decode(ann["segmentation"]).astype(bool))
    items = []
    for image in data["images"]:
        pixels = load_image_rgb(images / image["file_name"])
        masks = by_image[image["id"]]
        stacked = np.stack(masks) if masks else np.zeros((0, *pixels.shape[:2]), dtype=bool)
        items.append((pixels, torch.from_numpy(stacked)))
    return items


def backbone_features(
    backbone: nn.Module, items: list[tuple[np.ndarray, Tensor]], size: tuple[int, int], batch_size: int
) -> list[list[Tensor]]:
    """[C2..C5] of every image at the backbone input ``size``, forwarded in batches."""
    device = next(backbone.parameters()).device
    out: list[list[Tensor]] = []
    for start in range(0, len(items), batch_size):
        batch = torch.stack([prepare_image(p, size, device) for p, _ in items[start : start + batch_size]])
        with torch.inference_mode():
            levels = backbone(batch)
        out.extend([[level[row] for level in levels] for row in range(batch.shape[0])])
    return out


def evaluate_backbone(
    backbone: nn.Module,
    train: list[tuple[np.ndarray, Tensor]],
    val: list[tuple[np.ndarray, Tensor]],
    propose_cfg: ProposeConfig,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Proposal recall on val and the foreground probe fitted on train, scored on val."""
    start = time.perf_counter()
    height, width = val[0][0].shape[:2]
    size = input_size(height, width, propose_cfg)
    level = LEVELS[args.probe_level]

    best_ious, counts = [], []
    val_feats = []
    val_levels = backbone_features(backbone, val, size, args.batch_size)
    for (pixels, masks), feats in zip(val, val_levels, strict=True):
        proposals = saliency_proposals(
            feats[3], tuple(pixels.shape[:2]), scales=propose_cfg.scales,
            mask_threshold=propose_cfg.mask_threshold, min_area=propose_cfg.min_area,
            sigma=propose_cfg.nms_sigma, top_k=propose_cfg.top_k, min_center_y=propose_cfg.min_center_y,
            max_box_width=propose_cfg.max_box_width, min_maskness=propose_cfg.min_maskness,
        )
        best_ious.append(best_iou_per_instance(proposals.masks, masks))
        counts.append(proposals.masks.shape[0])
        val_feats.append(feats[level])
    recall = proposal_recall(best_ious, thresholds=(0.5,))

    generator = torch.Generator().manual_seed(args.seed)
    xs, ys = [], []
    train_levels = backbone_features(backbone, train, size, args.batch_size)
    for (_, masks), feats in zip(train, train_levels, strict=True):
        foreground = masks.any(0)[None]  # (1, H, W)
        x, y = sample_pixel_features(feats[level][None], foreground, per_image=args.pixels_per_image,
                                     generator=generator)
        xs.append(x)
        ys.append(y)
    probe = fit_linear_probe(torch.cat(xs), torch.cat(ys), steps=args.probe_steps)
    preds = [probe_predict(probe, f[None], tuple(m.shape[1:]))[0]
             for f, (_, m) in zip(val_feats, val, strict=True)]
    scores = foreground_scores(preds, [m.any(0) for _, m in val])
    return {
        "recall@0.5": recall.recall[0.5],
        "mean_best_iou": recall.mean_best_iou,
        "instances": recall.instances,
        "proposals_per_image": float(np.mean(counts)),
        "probe_fg_iou": scores.foreground_iou,
        "probe_accuracy": scores.accuracy,
        "val_foreground_fraction": scores.foreground_fraction,
        "seconds": time.perf_counter() - start,
    }


def c5_ceiling(items: list[tuple[np.ndarray, Tensor]], grid: int) -> float:
    """Recall@0.5 of the instances by their own masks area-pooled to the C5 grid and upsampled back.

    Proposals are thresholded C5-resolution maps, so this is roughly the best recall any backbone can
    reach at this input size; it puts the table's recall in scale.
    """
    best = []
    for _, masks in items:
        if masks.shape[0] == 0:
            continue
        pooled = F.interpolate(masks[None].float(), size=(grid, grid), mode="area")  # (1, K, g, g)
        coarse = F.interpolate(pooled, size=tuple(masks.shape[1:]), mode="bilinear")[0] >= 0.5
        best.append(torch.diagonal(mask_iou_matrix(coarse, masks)))
    return proposal_recall(best).recall[0.5]


def train_ssl_backbone(data: dict[str, Path], work: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    """Run DenseCL on the train images only; return the backbone file and a summary of the run."""
    images = link_images(data["train"], data["images"], work / "ssl_images")
    cfg = load_config(args.ssl_config, [f"model.depth={args.depth}", f"train.seed={args.seed}",
                                        f"ssl.epochs={args.ssl_epochs}", *args.ssl_override])
    final = train_densecl(cfg, images, work / "ssl")
    epochs = [json.loads(line) for line in (work / "ssl" / "metrics.jsonl").read_text().splitlines()]
    speeds = [m["images_per_second"] for m in epochs[1:] or epochs]  # epoch 1 is warm-up
    return final / BACKBONE_FILE, {"images_per_second_median": statistics.median(speeds),
                                   "per_epoch": epochs, "config": dataclasses.asdict(cfg.ssl)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=400, help="synthetic images, 20%% of them val")
    parser.add_argument("--image-size", type=int, default=160, help="side of the synthetic images")
    parser.add_argument("--input-size", type=int, default=320, help="backbone input side (multiple of 32)")
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0, help="data, random init, SSL and probe pixels")
    parser.add_argument("--weights", help="a trained backbone file; skips the DenseCL run")
    parser.add_argument("--ssl-config", default=str(SSL_CONFIG))
    parser.add_argument("--ssl-epochs", type=int, default=20)
    parser.add_argument("--ssl-override", nargs="*", default=[], help="dotted overrides, e.g. ssl.lr=0.06")
    parser.add_argument("--probe-level", choices=sorted(LEVELS), default="c5")
    parser.add_argument("--pixels-per-image", type=int, default=256, help="probe training pixels per image")
    parser.add_argument("--probe-steps", type=int, default=100, help="L-BFGS iterations of the probe")
    parser.add_argument("--batch-size", type=int, default=16, help="images per backbone forward")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    for flag in THRESHOLD_FLAGS:
        kind = int if flag in ("min_area", "top_k") else float
        parser.add_argument(f"--{flag.replace('_', '-')}", type=kind, help="propose config value if omitted")
    parser.add_argument("--out", default="runs/bench/ssl_probe.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    propose_cfg = load_config(None, []).propose
    changes = {flag: getattr(args, flag) for flag in THRESHOLD_FLAGS if getattr(args, flag) is not None}
    propose_cfg = dataclasses.replace(propose_cfg, keep_ratio=False, short_size=args.input_size,
                                      max_size=args.input_size, **changes)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_synthetic_dataset(work / "data", num_images=args.num_images, image_size=args.image_size,
                                       seed=args.seed)
        train, val = load_split(data["train"], data["images"]), load_split(data["val"], data["images"])
        ssl_info: dict[str, Any] = {"weights": args.weights}
        weights = args.weights
        if weights is None:
            start = time.perf_counter()
            path, metrics = train_ssl_backbone(data, work, args)
            weights = str(path)
            ssl_info = {"trained_here": True, "seconds": time.perf_counter() - start, **metrics}
        for name, file in (("random init", None), ("sp-ray ssl", weights)):
            cfg = load_config(None, [f"model.depth={args.depth}", f"train.seed={args.seed}"])
            cfg.model.backbone_weights = file
            rows[name] = evaluate_backbone(build_frozen_backbone(cfg), train, val, propose_cfg, args)

    print(f"ResNet-{args.depth}, {len(train)} train / {len(val)} val synthetic images, {args.image_size} px; "
          f"backbone input {args.input_size} px (C5 {args.input_size // 32}x{args.input_size // 32}); "
          f"probe on {args.probe_level.upper()}\n")
    print("| backbone | recall@0.5 | mean best IoU | proposals/image | probe fg IoU | probe accuracy |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['recall@0.5']:.3f} | {row['mean_best_iou']:.3f} | "
              f"{row['proposals_per_image']:.1f} | {row['probe_fg_iou']:.3f} | {row['probe_accuracy']:.3f} |")
    fraction = rows["random init"]["val_foreground_fraction"]
    ceiling = c5_ceiling(val, args.input_size // 32)
    print(f"\n{rows['random init']['instances']} val instances; recall@0.5 of the instances' own masks at C5 "
          f"resolution (ceiling): {ceiling:.3f}; val foreground {fraction:.1%} of the pixels (all-background "
          f"accuracy {1 - fraction:.3f})")
    if ssl_info.get("trained_here"):
        print(f"DenseCL: {args.ssl_epochs} epochs in {ssl_info['seconds']:.0f} s, "
              f"{ssl_info['images_per_second_median']:.1f} images/s (median over epochs 2..)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "propose": dataclasses.asdict(propose_cfg), "ssl": ssl_info, "rows": rows,
              "c5_ceiling_recall@0.5": ceiling}
    out.write_text(json.dumps(report, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
