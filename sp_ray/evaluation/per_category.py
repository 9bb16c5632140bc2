"""Per-category COCO AP, instance counts and precision-recall curves, read from an accumulated COCOeval.

COCOeval's ``eval["precision"]`` is an array [T, R, K, A, M]: IoU thresholds (0.50:0.05:0.95), recall
points (0:0.01:1), categories (``params.catIds``), area ranges (all, small, medium, large) and max
detections per image (1, 10, 100); -1 where a category has no (non-crowd) ground truth. The summary AP is
the mean of its entries > -1 at area "all" and 100 detections; a category's AP is the same mean over its
own slice, so the mean of the per-category APs of the categories with ground truth is the summary AP.
A category without ground truth has no AP (None, printed "-"), not 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sp_ray.drawing.charts import Line, Panel, plot_panels

# The IoU thresholds that get a precision-recall figure (the AP50 and AP75 curves).
CURVE_IOUS = (0.5, 0.75)
# More categories than this are drawn as thin unlabelled lines: a legend of 80 names hides the curves.
MAX_LABELLED = 10
_RECALL_POINTS = 101


@dataclass(frozen=True)
class CategoryRow:
    """One category of one IoU type; AP values in percent, None where the category has no ground truth.

    Attributes:
        id, name: COCO category id and name.
        AP, AP50, AP75: mean precision over IoU 0.50:0.95 / at 0.50 / at 0.75 (area all, 100 detections).
        gt: non-crowd ground-truth instances on the evaluated images. crowd: crowd (ignore) regions.
        pred: predicted instances of the category on the evaluated images.
    """

    id: int
    name: str
    AP: float | None  # noqa: N815 (the COCO metric names)
    AP50: float | None  # noqa: N815
    AP75: float | None  # noqa: N815
    gt: int
    crowd: int
    pred: int


@dataclass(frozen=True)
class CategoryScores:
    """Per-category AP of one IoU type and the precision at each recall point for the curves.

    Attributes:
        iou_type: "segm" or "bbox".
        rows: one row per category of the ground truth, by id.
        recall: the R recall points (0, 0.01, ..., 1).
        precision: IoU threshold (``CURVE_IOUS``) -> category id -> precision at each recall point, for
            the categories with ground truth (COCOeval's interpolated precision, 0 beyond the last recall
            reached).
    """

    iou_type: str
    rows: tuple[CategoryRow, ...]
    recall: tuple[float, ...]
    precision: Mapping[float, Mapping[int, tuple[float, ...]]]

    def mean_precision(self, iou: float) -> tuple[float, ...]:
        """Precision at each recall point averaged over the categories with ground truth (the AP curve)."""
        curves = list(self.precision[iou].values())
        if not curves:
            return tuple(0.0 for _ in self.recall)
        return tuple(float(v) for v in np.mean(np.array(curves), axis=0))


def _percent(values: np.ndarray) -> float | None:
    kept = values[values > -1]
    return float(np.mean(kept)) * 100.0 if kept.size else None


def _ground_truth_counts(coco_gt: COCO, image_ids: Sequence[int]) -> tuple[Counter[int], Counter[int]]:
    wanted = set(image_ids)
    instances: Counter[int] = Counter()
    crowd: Counter[int] = Counter()
    for ann in coco_gt.dataset["annotations"]:
        if ann["image_id"] in wanted:
            (crowd if ann.get("iscrowd", 0) else instances)[ann["category_id"]] += 1
    return instances, crowd


def category_scores(
    iou_type: str,
    coco_gt: COCO,
    results: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    evaluator: COCOeval | None,
) -> CategoryScores:
    """Per-category AP, AP50, AP75, counts and curves of one IoU type.

    Args:
        iou_type: "segm" or "bbox".
        coco_gt: the ground truth that was evaluated.
        results: the COCO results that were evaluated (counted per category on ``image_ids``).
        image_ids: the evaluated images.
        evaluator: ``COCOeval`` after ``accumulate()``; None when there were no results (COCOeval cannot
            load none): every category with ground truth then has AP 0 and a zero curve.
    """
    gt, crowd = _ground_truth_counts(coco_gt, image_ids)
    wanted = set(image_ids)
    pred = Counter(int(r["category_id"]) for r in results if r["image_id"] in wanted)
    cat_ids = sorted(coco_gt.getCatIds())
    recall = tuple(float(r) for r in np.linspace(0.0, 1.0, _RECALL_POINTS))
    rows: list[CategoryRow] = []
    precision: dict[float, dict[int, tuple[float, ...]]] = {iou: {} for iou in CURVE_IOUS}
    if evaluator is None:
        for cat_id in cat_ids:
            ap = 0.0 if gt[cat_id] else None
            rows.append(CategoryRow(cat_id, str(coco_gt.cats[cat_id]["name"]), ap, ap, ap, gt[cat_id], crowd[cat_id],
                                    pred[cat_id]))
            if gt[cat_id]:
                for iou in CURVE_IOUS:
                    precision[iou][cat_id] = tuple(0.0 for _ in recall)
        return CategoryScores(iou_type, tuple(rows), recall, precision)

    params = evaluator.params
    table = evaluator.eval["precision"]  # [T, R, K, A, M]
    area = params.areaRngLbl.index("all")
    dets = params.maxDets.index(100)
    iou_index = {iou: int(np.argmin(np.abs(params.iouThrs - iou))) for iou in (0.5, 0.75)}
    recall = tuple(float(r) for r in params.recThrs)
    for k, cat_id in enumerate(int(c) for c in params.catIds):  # COCOeval.evaluate makes them numpy ints
        values = table[:, :, k, area, dets]
        rows.append(CategoryRow(
            cat_id, str(coco_gt.cats[cat_id]["name"]), _percent(values), _percent(values[iou_index[0.5]]),
            _percent(values[iou_index[0.75]]), gt[cat_id], crowd[cat_id], pred[cat_id],
        ))
        if (values > -1).any():
            for iou in CURVE_IOUS:
                precision[iou][cat_id] = tuple(float(v) for v in values[iou_index[iou]])
    return CategoryScores(iou_type, tuple(rows), recall, precision)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


_COLUMNS = ("AP", "AP50", "AP75", "gt", "crowd", "pred")
_SHAPE = {"segm": "segmentation", "bbox": "bbox"}


def format_category_table(scores: CategoryScores) -> str:
    """A fixed-width table of one IoU type: one row per category; "-" where a category has no ground truth."""
    title = f"{scores.iou_type} category"
    width = max([len(row.name) for row in scores.rows] + [len(title)])
    lines = [f"{'id':>4}  {title:<{width}}" + "".join(f"{c:>8}" for c in _COLUMNS)]
    for row in scores.rows:
        aps = "".join(f"{_cell(v):>8}" for v in (row.AP, row.AP50, row.AP75))
        counts = "".join(f"{v:>8}" for v in (row.gt, row.crowd, row.pred))
        lines.append(f"{row.id:>4}  {row.name:<{width}}{aps}{counts}")
    return "\n".join(lines)


def format_category_tables(scores: Mapping[str, CategoryScores | None]) -> str:
    """``format_category_table`` of each IoU type, a line for a type that was not evaluated."""
    parts = [f"{iou_type} per category: absent (no prediction has a {_SHAPE[iou_type]})" if table is None
             else format_category_table(table) for iou_type, table in scores.items()]
    return "\n\n".join(parts)


def markdown_category_table(scores: Mapping[str, CategoryScores | None], source: str) -> str:
    """Markdown: one table per IoU type (AP in percent), with a line for an IoU type that was not evaluated."""
    parts = [f"# Per-category AP\n\n{source}\n"]
    for iou_type, table in scores.items():
        if table is None:
            parts.append(f"## {iou_type}\n\nabsent: no prediction has a {_SHAPE[iou_type]}\n")
            continue
        lines = [f"## {iou_type}\n", "| id | category | " + " | ".join(_COLUMNS) + " |",
                 "|---:|---|" + "---:|" * len(_COLUMNS)]
        for row in table.rows:
            lines.append(f"| {row.id} | {row.name} | " + " | ".join(_cell(v) for v in (row.AP, row.AP50, row.AP75))
                         + f" | {row.gt} | {row.crowd} | {row.pred} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def plot_precision_recall(scores: Mapping[str, CategoryScores], iou: float, path: str | Path) -> Path:
    """One PNG at IoU ``iou``: a panel per IoU type, a line per category with ground truth and their mean,
    each labelled with its AP at this IoU (the mean precision over the recall points).

    With more than ``MAX_LABELLED`` categories the category lines are thin and unlabelled; the mean is
    always labelled (its area under the curve is the AP at this IoU).
    """
    names = {row.id: row.name for table in scores.values() for row in table.rows}
    panels = []
    for iou_type, table in scores.items():
        curves = table.precision[iou]
        labelled = len(curves) <= MAX_LABELLED
        # The legend gives each curve's mean precision: its AP at this IoU.
        lines = [Line(f"{names[cat_id]}: {np.mean(curve) * 100:.1f}" if labelled else "", table.recall, curve,
                      marker=False, width=1.2 if labelled else 0.6) for cat_id, curve in curves.items()]
        mean = table.mean_precision(iou)
        lines.append(Line(f"mean over categories: {np.mean(mean) * 100:.1f}", table.recall, mean, dashed=True,
                          marker=False, width=2.0, color="black"))
        panels.append(Panel(f"{iou_type}, IoU {iou:.2f}", tuple(lines), ylabel="precision", xlabel="recall",
                            limits=((0.0, 1.0), (0.0, 1.05))))
    return plot_panels(panels, path, title=f"precision-recall at IoU {iou:.2f}")


def report_paths(metrics_path: str | Path) -> dict[str, Path]:
    """The files written next to a metrics json ``D/NAME.json``: D/NAME_per_category.md, D/NAME_pr_iou50.png, ..."""
    path = Path(metrics_path)
    files = {"table": path.with_name(f"{path.stem}_per_category.md")}
    for iou in CURVE_IOUS:
        files[f"pr_iou{round(iou * 100)}"] = path.with_name(f"{path.stem}_pr_iou{round(iou * 100)}.png")
    return files


def write_category_report(
    scores: Mapping[str, CategoryScores | None], metrics_path: str | Path, *, source: str
) -> dict[str, Any]:
    """Write the markdown table and the precision-recall PNGs next to ``metrics_path``.

    Args:
        scores: IoU type -> its scores, None for a type that was not evaluated (e.g. segm of bbox-only
            predictions).
        metrics_path: the metrics json the files go beside (``report_paths``).
        source: one line on what was evaluated, the markdown's first line.

    Returns:
        What goes into the metrics json: {"segm": [row dicts] or None, "bbox": [...], "files": {name: path}}.
    """
    files = report_paths(metrics_path)
    files["table"].parent.mkdir(parents=True, exist_ok=True)
    files["table"].write_text(markdown_category_table(scores, source))
    evaluated = {iou_type: table for iou_type, table in scores.items() if table is not None}
    written = {"table": str(files["table"])}
    if evaluated:
        for iou in CURVE_IOUS:
            name = f"pr_iou{round(iou * 100)}"
            written[name] = str(plot_precision_recall(evaluated, iou, files[name]))
    return {**{iou_type: None if table is None else [asdict(row) for row in table.rows]
               for iou_type, table in scores.items()}, "files": written}

