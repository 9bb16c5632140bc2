"""COCO AP (segm and bbox) of a model's predictions with pycocotools COCOeval.

What is evaluated follows the dataset's rules (``CocoInstanceDataset``): images it skips (missing,
unreadable, truncated, larger than ``data.max_image_pixels``, a size that differs from the json) are
left out of the evaluated set, with their ground truth, instead of counting their objects as missed;
annotations it skips (a 2-point polygon, an empty mask, a box outside the image, ...) are not ground
truth. The metrics carry the counts (``metrics["skipped"]``) and a `DatasetSkipWarning` the reasons.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from export.coco_results import coco_result
from export.providers import GpuSettings
from sp_ray.checkpoint import load_checkpoint
from sp_ray.config import Config, apply_overrides
from sp_ray.data.coco import CocoInstanceDataset, DatasetSkipWarning
from sp_ray.data.images import UnusableImageError
from sp_ray.data.transforms import build_transforms, collate
from sp_ray.device import select_device
from sp_ray.evaluation.per_category import CategoryScores, category_scores
from sp_ray.models import build_model, model_family

log = logging.getLogger("sp_ray")

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("segm", "bbox")


def instances_to_coco(
    image_id: int,
    scores: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None,
    boxes: np.ndarray,
    cat_ids: Sequence[int],
    *,
    rles: Sequence[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One image's instances as COCO result dicts with compressed-RLE masks.

    Args:
        image_id: COCO image id.
        scores: float [k]. labels: int [k], contiguous. boxes: float [k, 4] xyxy.
        masks: bool [k, H0, W0], encoded one at a time; or None with ``rles``.
        cat_ids: contiguous label -> COCO category id.
        rles: k COCO RLEs ({"size", "counts"}) already encoded (the runtime's ``rle=True``).
    """
    if len(scores) == 0:
        return []
    if rles is None:
        if masks is None:
            raise ValueError("instances_to_coco needs masks or rles")
        # One mask at a time: a stacked Fortran-order uint8 copy would be another K x H0 x W0 bytes.
        rles = [mask_util.encode(np.asfortranarray(mask[:, :, None].astype(np.uint8)))[0] for mask in masks]
    return [{"image_id": int(image_id), **coco_result(cat_ids[int(label)], score, box, rle)}
            for score, label, rle, box in zip(scores, labels, rles, boxes, strict=True)]


@torch.no_grad()
def predict_coco(
    model: nn.Module,
    dataset: CocoInstanceDataset,
    cfg: Config,
    *,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Run ``model`` over ``dataset`` (built with eval transforms) and return COCO results for every image.

    An image that does not decode is skipped (``dataset.load`` records it in ``dataset.unreadable``);
    ``evaluation_ground_truth`` then leaves it out of the evaluated set.
    """
    model.eval()
    family = model_family(cfg.model.name)
    results: list[dict[str, Any]] = []
    batch: list[tuple[Any, Any]] = []
    for index in range(len(dataset)):
        try:
            batch.append(dataset.load(index))
        except UnusableImageError:
            pass
        if batch and (len(batch) == cfg.eval.batch_size or index == len(dataset) - 1):
            images, targets = collate(batch, size_divisor=cfg.data.size_divisor)
            batch = []
            outputs = model(images.to(device).float())
            instances = family.postprocess(
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


def evaluation_ground_truth(dataset: CocoInstanceDataset) -> tuple[COCO, list[int], dict[str, int]]:
    """What COCOeval scores against once the predictions are made, and what was left out.

    The evaluated images are the dataset's kept images minus those that failed to decode while
    predicting; their ground truth is ``dataset.coco_ground_truth`` (the dataset's rules). Images the
    dataset skipped are not evaluated at all, so their objects are not counted as missed: AP is that
    of the images the model saw. The counts go into the metrics and the reasons into one
    `DatasetSkipWarning`.

    Args:
        dataset: the dataset the predictions were made on, after ``predict_coco`` (or the runtime loop).

    Returns:
        (ground truth ``COCO``, evaluated image ids, {"images": images left out, "annotations":
        annotations left out, those of left-out images included}).
    """
    image_ids = [i for i in dataset.image_ids if i not in dataset.unreadable]
    skipped = {"images": sum(dataset.skipped_images.values()),
               "annotations": sum(dataset.skipped_annotations.values())}
    if skipped["images"] or skipped["annotations"]:
        reasons = "; ".join(f"{reason}: {count}" for reason, count in
                            (dataset.skipped_images + dataset.skipped_annotations).most_common())
        warnings.warn(
            f"evaluation on {dataset.annotations_path.name}: {len(image_ids)} images evaluated; left out "
            f"{skipped['images']} images (with their ground truth) and {skipped['annotations']} annotations "
            f"({reasons})",
            DatasetSkipWarning,
            stacklevel=2,
        )
    return dataset.coco_ground_truth(image_ids), image_ids, skipped


def score_results(
    coco_gt: COCO, results: Mapping[str, Sequence[dict[str, Any]]], image_ids: Sequence[int] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, CategoryScores]]:
    """COCOeval of each IoU type on its own results: the summary numbers and the per-category scores.

    Args:
        coco_gt: ground truth (crowd regions are handled by COCOeval as ignore regions).
        results: IoU type ("segm", "bbox") -> its COCO result dicts (``segmentation`` RLE for segm,
            ``bbox`` xywh for bbox); one list may serve both types (it is loaded once).
        image_ids: restrict the evaluation to these images (default: all images of ``coco_gt``).

    Returns:
        ({iou type: {"AP": ..., "AP50": ...}} in percent, -1 for a metric without ground truth (e.g. no
        small objects); {iou type: ``CategoryScores``}). A type with no results scores 0 (COCOeval cannot
        load an empty result list).
    """
    ids = list(coco_gt.getImgIds()) if image_ids is None else list(image_ids)
    metrics: dict[str, dict[str, float]] = {}
    scores: dict[str, CategoryScores] = {}
    loaded: dict[int, COCO] = {}
    for iou_type, typed in results.items():
        if not typed:
            log.warning("no %s predictions to evaluate: every %s AP is 0", iou_type, iou_type)
            metrics[iou_type] = {name: 0.0 for name in METRIC_NAMES}
            scores[iou_type] = category_scores(iou_type, coco_gt, typed, ids, None)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            if id(typed) not in loaded:
                loaded[id(typed)] = coco_gt.loadRes(list(typed))
            evaluator = COCOeval(coco_gt, loaded[id(typed)], iouType=iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        # COCOeval marks metrics without any ground truth (e.g. no small objects) with -1.
        metrics[iou_type] = {
            name: float(value) * 100.0 if value >= 0 else -1.0
            for name, value in zip(METRIC_NAMES, evaluator.stats[:6], strict=True)
        }
        scores[iou_type] = category_scores(iou_type, coco_gt, typed, ids, evaluator)
    return metrics, scores


def coco_metrics(
    coco_gt: COCO, results: list[dict[str, Any]], iou_types: Iterable[str] = IOU_TYPES,
    image_ids: Sequence[int] | None = None, *, per_category: bool = False,
) -> dict[str, Any]:
    """COCOeval summary numbers, in percent: ``{"segm": {"AP": ..., "AP50": ...}, "bbox": {...}}``.

    Args:
        coco_gt: ground truth (crowd regions are handled by COCOeval as ignore regions).
        results: COCO result dicts (``segmentation`` RLE for segm, ``bbox`` xywh for bbox).
        iou_types: which evaluations to run.
        image_ids: restrict the evaluation to these images (default: all images of ``coco_gt``).
        per_category: add ``"per_category"``: {iou type: ``CategoryScores``} (``score_results``).

    An empty ``results`` gives 0 for every metric (COCOeval cannot load an empty result list).
    """
    metrics, scores = score_results(coco_gt, {iou_type: results for iou_type in iou_types}, image_ids)
    return {**metrics, "per_category": scores} if per_category else dict(metrics)


def evaluate_model(
    model: nn.Module,
    cfg: Config,
    *,
    annotations: str,
    images: str,
    device: torch.device,
    per_category: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Predict on a COCO-format set and score it: returns ``(metrics, coco_results)``.

    ``metrics`` holds ``segm`` and ``bbox`` (``coco_metrics``) and ``skipped`` ({"images": n,
    "annotations": m}, what the dataset's rules left out of the evaluation; ``evaluation_ground_truth``);
    with ``per_category``, also ``per_category`` ({iou type: ``CategoryScores``}).
    """
    dataset = CocoInstanceDataset(
        annotations, images,
        transforms=build_transforms(train=False, max_size=cfg.data.max_size, short_size=cfg.data.short_size),
        max_image_pixels=cfg.data.max_image_pixels,
    )
    results = predict_coco(model, dataset, cfg, device=device)
    ground_truth, image_ids, skipped = evaluation_ground_truth(dataset)
    metrics = coco_metrics(ground_truth, results, image_ids=image_ids, per_category=per_category)
    return {**metrics, "skipped": skipped}, results


def format_metrics(metrics: dict[str, Any]) -> str:
    """A fixed-width table: one row per IoU type evaluated, one column per metric; then what was left out."""
    header = f"{'':6}" + "".join(f"{name:>8}" for name in METRIC_NAMES)
    rows = [header]
    for iou_type in IOU_TYPES:
        if iou_type in metrics:
            rows.append(f"{iou_type:6}" + "".join(f"{metrics[iou_type][name]:8.2f}" for name in METRIC_NAMES))
    skipped = metrics.get("skipped", {})
    if skipped.get("images") or skipped.get("annotations"):
        rows.append(f"not evaluated (bad data, skipped as in training): {skipped['images']} images with their "
                    f"ground truth, {skipped['annotations']} annotations")
    if skipped.get("predictions"):
        rows.append(f"predictions not evaluated (not on an evaluated image): {skipped['predictions']}")
    return "\n".join(rows)


def evaluate_checkpoint(
    checkpoint: str,
    *,
    annotations: str,
    images: str,
    overrides: Sequence[str] = (),
    use_gpu: bool = False,
    per_category: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load a checkpoint directory with its own config (plus ``overrides``) and evaluate it (``evaluate_model``)."""
    ckpt = load_checkpoint(checkpoint)
    cfg = apply_overrides(ckpt.config, list(overrides))
    device = select_device(use_gpu)
    model = build_model(cfg)
    model.load_state_dict(ckpt.model_state)
    model.to(device)
    return evaluate_model(model, cfg, annotations=annotations, images=images, device=device,
                          per_category=per_category)


def evaluate_onnx(
    onnx_path: str,
    *,
    annotations: str,
    images: str,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    max_image_pixels: int | None = None,
    gpu: GpuSettings | None = None,
    per_category: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """COCO AP of an exported model through the onnxruntime runtime (``export.runtime.Segmenter``).

    Images are decoded as for training (``CocoInstanceDataset.read_image``, EXIF orientation applied)
    and given to the runtime at their original size; resizing, padding, thresholds and category ids
    come from the model's metadata, so this measures exactly what a deployment computes. Masks come
    back as RLE, encoded box by box. Images and annotations the dataset skips are left out as in
    ``evaluate_model``.

    Args:
        onnx_path: the .onnx file written by ``sp-ray export``.
        annotations: COCO json whose categories include the model's category ids.
        images: image folder.
        providers: onnxruntime execution providers (None: CUDA when present, else CPU).
        threads: CPU intra-op threads (None: onnxruntime's default).
        max_image_pixels: larger images are skipped (None: ``export.geometry.MAX_IMAGE_PIXELS``).
        gpu: settings of the GPU providers (``export.runtime.Segmenter``); a dynamic-batch model runs
            one image per graph run here, so give ``trt_max_batch=1``.
        per_category: add ``metrics["per_category"]`` as ``evaluate_model``.

    Returns:
        ``(metrics, coco_results)`` as ``evaluate_checkpoint``.
    """
    from export.geometry import MAX_IMAGE_PIXELS
    from export.runtime import Segmenter

    limit = MAX_IMAGE_PIXELS if max_image_pixels is None else max_image_pixels
    segmenter = Segmenter(onnx_path, providers=providers, threads=threads, max_image_pixels=limit, gpu=gpu)
    dataset = CocoInstanceDataset(annotations, images, max_image_pixels=limit)
    unknown = sorted(set(segmenter.info.cat_ids) - set(dataset.cat_ids))
    if unknown:
        raise ValueError(f"{onnx_path} predicts category ids {unknown} that {annotations} does not define; "
                         "evaluate on annotations with the categories the model was trained on")
    batch = segmenter.info.batch_size or 1
    results: list[dict[str, Any]] = []
    indices = list(range(len(dataset)))
    for start in range(0, len(indices), batch):
        ids, pixels = [], []
        for index in indices[start : start + batch]:
            try:
                pixels.append(dataset.read_image(index))
            except UnusableImageError:
                continue  # recorded in dataset.unreadable, left out by evaluation_ground_truth
            ids.append(dataset.image_ids[index])
        if not pixels:
            continue
        for image_id, found in zip(ids, segmenter.predict_batch(pixels, rle=True), strict=True):
            results.extend(instances_to_coco(
                image_id, found.scores, found.labels, None, found.boxes, segmenter.info.cat_ids, rles=found.rles,
            ))
    ground_truth, image_ids, skipped = evaluation_ground_truth(dataset)
    metrics = coco_metrics(ground_truth, results, image_ids=image_ids, per_category=per_category)
    return {**metrics, "skipped": skipped}, results
