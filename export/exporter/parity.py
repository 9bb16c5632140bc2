"""Export-time parity: instances decoded from the ONNX graph against those decoded from PyTorch (numpy).

Detections are compared after the runtime's decoding (original-size masks), so a pass means the
deployed model gives the user the same instances. Top-k order among near-equal scores is not
meaningful (ties, e.g. many detections of score 0, come out in any order), so each reference
detection is matched to an unmatched candidate with the same label, a score within the bound and a
mask IoU of at least 0.5 (the same object), the one with the highest IoU; a reference detection
without such a candidate counts as a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.runtime import Instances


@dataclass(frozen=True)
class ParityBounds:
    """What an export must reach against PyTorch fp32.

    Attributes:
        score: largest allowed |score difference| of a matched pair.
        matched: smallest allowed fraction of reference detections matched (same label, score within bound).
        iou: smallest allowed pooled mask IoU (sum of intersections / sum of unions over matched pairs).
    """

    score: float
    matched: float
    iou: float


# fp32: scores within 1e-3, every detection matched, mask IoU >= 0.99. fp16 / int8 are lossy by
# design; their bounds are stated, not derived.
BOUNDS = {
    "fp32": ParityBounds(score=1e-3, matched=1.0, iou=0.99),
    "fp16": ParityBounds(score=1e-2, matched=0.95, iou=0.95),
    "int8": ParityBounds(score=5e-2, matched=0.80, iou=0.85),
}
# Models with NMS (Mask R-CNN): whether a box survives NMS with an overlap next to the threshold
# turns on differences of 1e-5 in its coordinates, so an fp32 graph may lose or gain a few low-score
# detections against PyTorch (seen: 3 of 200 on a trained model); 2% may go unmatched.
NMS_FP32_BOUNDS = ParityBounds(score=1e-3, matched=0.98, iou=0.99)
# int8 moves Mask R-CNN's boxes by a pixel or so, and each box carries its pasted 28 x 28 mask with it and
# decides which overlapping boxes survive NMS: on the test suite's random tiny Mask R-CNN (masks of ~0.5
# probability, the worst case), static int8 matched 25 of 30 detections at a pooled mask IoU of 0.80.
NMS_INT8_BOUNDS = ParityBounds(score=5e-2, matched=0.75, iou=0.75)
# A candidate is the same detection only if its mask overlaps the reference's this much.
SAME_OBJECT_IOU = 0.5


def bounds_for(precision: str, *, nms: bool = False) -> ParityBounds:
    """The parity bounds of an export of this precision (``nms``: the model has an NMS step)."""
    if precision not in BOUNDS:
        raise ValueError(f"precision must be one of {sorted(BOUNDS)}, got {precision!r}")
    if nms and precision == "fp32":
        return NMS_FP32_BOUNDS
    if nms and precision == "int8":
        return NMS_INT8_BOUNDS
    return BOUNDS[precision]


@dataclass
class ParityReport:
    """Parity of one export.

    Attributes:
        precision: "fp32", "fp16" or "int8".
        images: number of sample images.
        detections: reference detections compared (score > ``min_score``).
        matched: of those, matched with the same label and a score within the bound.
        max_score_diff: largest |score difference| over matched pairs.
        pooled_iou: sum of mask intersections / sum of unions over matched pairs (1.0 if all empty).
        min_iou: smallest mask IoU of a matched pair with a non-empty union (1.0 if none).
        bounds: the bounds checked.
        mean_iou: mean mask IoU over matched pairs, each pair weighted alike (1.0 if none): unlike
            ``pooled_iou``, a small object segmented badly moves it as much as a large one.
    """

    precision: str
    images: int
    detections: int
    matched: int
    max_score_diff: float
    pooled_iou: float
    min_iou: float
    bounds: ParityBounds
    mean_iou: float = 1.0

    @property
    def passed(self) -> bool:
        matched_fraction = self.matched / self.detections if self.detections else 1.0
        return (
            matched_fraction >= self.bounds.matched
            and self.max_score_diff <= self.bounds.score
            and self.pooled_iou >= self.bounds.iou
        )

    def summary(self) -> str:
        b = self.bounds
        return (
            f"parity {self.precision} on {self.images} images: "
            f"detections matched {self.matched}/{self.detections} (need >= {b.matched:.0%}), "
            f"max |score diff| {self.max_score_diff:.2e} (<= {b.score:g}), "
            f"mask IoU pooled {self.pooled_iou:.4f} (>= {b.iou}) min {self.min_iou:.4f}: "
            + ("PASS" if self.passed else "FAIL")
        )


def _masks(instances: Instances) -> np.ndarray:
    if instances.masks is None:
        raise ValueError("parity needs dense masks: decode with rle=False")
    k, height, width = instances.masks.shape
    return instances.masks.reshape(k, height * width)


def compare_instances(
    reference: list[Instances],
    candidate: list[Instances],
    *,
    precision: str,
    nms: bool = False,
    min_score: float = 1e-4,
) -> ParityReport:
    """Match candidate detections to reference detections image by image and summarise.

    Args:
        reference: PyTorch fp32 instances per image (decoded by the runtime's decoder).
        candidate: ONNX instances of the same images.
        precision: key of ``BOUNDS``.
        nms: the model has an NMS step (``bounds_for``).
        min_score: reference detections with a score <= this are not compared (order among them is arbitrary).

    Returns:
        The ``ParityReport``.
    """
    bounds = bounds_for(precision, nms=nms)
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference images but {len(candidate)} candidate images")
    detections = matched = 0
    max_diff = 0.0
    inter_total = union_total = 0
    min_iou = 1.0
    iou_sum = 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        ref_masks, cand_masks = _masks(ref), _masks(cand)
        free = np.ones(len(cand), bool)
        for i in np.flatnonzero(ref.scores > min_score):
            detections += 1
            diffs = np.abs(cand.scores - ref.scores[i])
            options = np.flatnonzero(free & (cand.labels == ref.labels[i]) & (diffs <= bounds.score))
            if len(options) == 0:
                continue
            inter = (cand_masks[options] & ref_masks[i]).sum(axis=1)
            union = (cand_masks[options] | ref_masks[i]).sum(axis=1)
            iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
            best = int(np.argmax(iou))
            if iou[best] < SAME_OBJECT_IOU:
                continue
            j = options[best]
            free[j] = False
            matched += 1
            max_diff = max(max_diff, float(diffs[j]))
            inter_total += int(inter[best])
            union_total += int(union[best])
            iou_sum += float(iou[best])
            if union[best] > 0:
                min_iou = min(min_iou, float(iou[best]))
    pooled = inter_total / union_total if union_total else 1.0
    return ParityReport(
        precision=precision, images=len(reference), detections=detections, matched=matched,
        max_score_diff=max_diff, pooled_iou=pooled, min_iou=min_iou, bounds=bounds,
        mean_iou=iou_sum / matched if matched else 1.0,
    )
