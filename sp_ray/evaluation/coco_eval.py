"""COCO AP (segm and bbox) of a model's predictions with pycocotools COCOeval."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader

from sp_ray.config import Config, apply_overrides
from sp_ray.data.coco import CocoInstanceDataset
from sp_ray.data.transforms import build_transforms, collate
from sp_ray.models import build_model, model_family
from sp_ray.train.checkpoint import load_checkpoint
from sp_ray.train.device import select_device

log = logging.getLogger("sp_ray")

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def instances_to_coco(
    image_id: int,
    scores: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray,
    cat_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """One image's instances as COCO result dicts with compressed-RLE masks.

    Args:
        image_id: COCO image id.
        scores: float [k]. labels: int [k], contiguous. masks: bool [k, H0, W0]. boxes: float [k, 4] xyxy.
        cat_ids: contiguous label -> COCO category id.
    """
    if len(scores) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    results = []
    for score, label, rle, box in zip(scores, labels, rles, boxes, strict=True):
        rle["counts"] = rle["counts"].decode("ascii")
        x0, y0, x1, y1 = (float(v) for v in box)
        results.append({
            "image_id": int(image_id),
            "category_id": int(cat_ids[int(label)]),
            "segmentation": rle,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": float(score),
        })
    return results


@torch.no_grad()
def predict_coco(
    model: nn.Module,
    dataset: CocoInstanceDataset,
    cfg: Config,
    *,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Run ``model`` over ``dataset`` (built with eval transforms) and return COCO results for every image."""
    model.eval()
    loader = DataLoader(
        dataset, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=0,
        collate_fn=lambda batch: collate(batch, size_divisor=cfg.data.size_divisor),
    )
    results: list[dict[str, Any]] = []
    for images, targets in loader:
        outputs = model(images.to(device).float())
        instances = model_family(cfg.model.name).postprocess(
            outputs,
            image_sizes=[t["image_size"] for t in targets],
            orig_sizes=[t["orig_size"] for t in targets],
            k=cfg.eval.topk,
            mask_threshold=cfg.eval.mask_threshold,
            score_threshold=cfg.eval.score_threshold,
        )
        for target, inst in zip(targets, instances, strict=True):
            results.extend(instances_to_coco(
                target["image_id"],
                inst["scores"].float().cpu().numpy(),
                inst["labels"].cpu().numpy(),
                inst["masks"].cpu().numpy(),
                inst["boxes"].float().cpu().numpy(),
                dataset.cat_ids,
            ))
    return results


def coco_metrics(
    coco_gt: COCO, results: list[dict[str, Any]], iou_types: Iterable[str] = ("segm", "bbox"),
    image_ids: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """COCOeval summary numbers, in percent: ``{"segm": {"AP": ..., "AP50": ...}, "bbox": {...}}``.

    Args:
        coco_gt: ground truth (crowd regions are handled by COCOeval as ignore regions).
        results: COCO result dicts (``segmentation`` RLE for segm, ``bbox`` xywh for bbox).
        iou_types: which evaluations to run.
        image_ids: restrict the evaluation to these images (default: all images of ``coco_gt``).

    An empty ``results`` gives 0 for every metric (COCOeval cannot load an empty result list).
    """
    metrics: dict[str, dict[str, float]] = {}
    if not results:
        log.warning("no predictions to evaluate: every AP is 0")
        return {t: {name: 0.0 for name in METRIC_NAMES} for t in iou_types}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        for iou_type in iou_types:
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            # COCOeval marks metrics without any ground truth (e.g. no small objects) with -1.
            metrics[iou_type] = {
                name: float(value) * 100.0 if value >= 0 else -1.0
                for name, value in zip(METRIC_NAMES, evaluator.stats[:6], strict=True)
            }
    return metrics


def evaluate_model(
    model: nn.Module,
    cfg: Config,
    *,
    annotations: str,
    images: str,
    device: torch.device,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Predict on a COCO-format set and score it: returns ``(metrics, coco_results)``."""
    dataset = CocoInstanceDataset(
        annotations, images,
        transforms=build_transforms(train=False, max_size=cfg.data.max_size, short_size=cfg.data.short_size),
    )
    results = predict_coco(model, dataset, cfg, device=device)
    return coco_metrics(dataset.coco, results, image_ids=dataset.image_ids), results


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """A fixed-width table: one row per IoU type, one column per metric."""
    header = f"{'':6}" + "".join(f"{name:>8}" for name in METRIC_NAMES)
    rows = [header]
    for iou_type, values in metrics.items():
        rows.append(f"{iou_type:6}" + "".join(f"{values[name]:8.2f}" for name in METRIC_NAMES))
    return "\n".join(rows)


def evaluate_checkpoint(
    checkpoint: str,
    *,
    annotations: str,
    images: str,
    overrides: Sequence[str] = (),
    use_gpu: bool = False,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Load a checkpoint directory with its own config (plus ``overrides``) and evaluate it."""
    ckpt = load_checkpoint(checkpoint)
    cfg = apply_overrides(ckpt.config, list(overrides))
    device = select_device(use_gpu)
    model, _ = build_model(cfg)
    model.load_state_dict(ckpt.model_state)
    model.to(device)
    return evaluate_model(model, cfg, annotations=annotations, images=images, device=device)


def evaluate_onnx(
    onnx_path: str,
    *,
    annotations: str,
    images: str,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """COCO AP of an exported model through the onnxruntime runtime (``export.runtime.Segmenter``).

    Images are decoded as for training (``load_image_rgb``, EXIF orientation applied) and given to the
    runtime at their original size; resizing, padding, thresholds and category ids come from the
    model's metadata, so this measures exactly what a deployment computes.

    Args:
        onnx_path: the .onnx file written by ``sp-ray export``.
        annotations: COCO json whose categories include the model's category ids.
        images: image folder.
        providers: onnxruntime execution providers (None: CUDA when present, else CPU).
        threads: CPU intra-op threads (None: onnxruntime's default).

    Returns:
        ``(metrics, coco_results)`` as ``evaluate_checkpoint``.
    """
    from export.runtime import Segmenter
    from sp_ray.data.images import load_image_rgb

    segmenter = Segmenter(onnx_path, providers=providers, threads=threads)
    dataset = CocoInstanceDataset(annotations, images)
    unknown = sorted(set(segmenter.info.cat_ids) - set(dataset.cat_ids))
    if unknown:
        raise ValueError(f"{onnx_path} predicts category ids {unknown} that {annotations} does not define; "
                         "evaluate on annotations with the categories the model was trained on")
    batch = segmenter.info.batch_size or 1
    results: list[dict[str, Any]] = []
    for start in range(0, len(dataset.image_ids), batch):
        ids = dataset.image_ids[start : start + batch]
        pixels = [load_image_rgb(dataset.image_dir / dataset.coco.imgs[i]["file_name"]) for i in ids]
        for image_id, found in zip(ids, segmenter.predict_batch(pixels), strict=True):
            results.extend(instances_to_coco(
                image_id, found.scores, found.labels, found.masks, found.boxes, segmenter.info.cat_ids,
            ))
    return coco_metrics(dataset.coco, results, image_ids=dataset.image_ids), results
