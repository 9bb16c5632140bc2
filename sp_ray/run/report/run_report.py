"""The report of a run (``sp-ray run``, ``sp-ray demo``): reads what the steps wrote under the output folder,
draws the figures, writes HTML + MD.

Every number in the report is read from the step outputs (metrics.json, metrics.jsonl, summary.json,
export.json, throughput.json, steps.json); every figure is drawn here except the kernel grids, which
``analyze-kernels`` rendered, and the precision-recall curves, which the evaluate step wrote as
``sp-ray evaluate`` does. Figure paths are relative to the report's folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sp_ray.config import load_config
from sp_ray.data.coco import segmentation_rle
from sp_ray.data.images import load_image_rgb
from sp_ray.drawing.charts import Bar, Line, Panel, plot_bars, plot_panels
from sp_ray.drawing.draw import draw_labels, instance_colors, overlay_masks, save_png, tile, upscale
from sp_ray.run.commands import pipeline_command
from sp_ray.run.report.document import Block, Commands, Figure, Paragraph, Report, Section, Table
from sp_ray.run.report.write import write_report
from sp_ray.run.settings import (
    FAMILY_TITLES,
    REPO,
    Layout,
    Run,
    RunSettings,
    SyntheticData,
    exported_runs,
    fine_tuning_runs,
    kernel_checkpoints,
    main_run,
    variant_title,
)

# The benchmark's K-Net result (benchmarks/low_data.py --results benchmarks/results/low_data_knet): the
# paired intervals the demo's one-seed gap is read against.
BENCHMARK_RESULT = REPO / "benchmarks" / "results" / "low_data_knet.json"
PANEL_SIDE = 320  # pixels of one image panel in the figures (small images are enlarged, nearest neighbour)
DRAWN_PREDICTIONS = 5  # highest-scoring predictions drawn per image


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _decode(rles: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """bool [K, H, W] from COCO RLEs (``counts`` a str or bytes)."""
    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    encoded = [{"size": rle["size"], "counts": rle["counts"].encode("ascii") if isinstance(rle["counts"], str)
                else rle["counts"]} for rle in rles]
    return mask_utils.decode(encoded).transpose(2, 0, 1).astype(bool)


def _panel(
    image: np.ndarray, masks: np.ndarray, labels: Sequence[str] = (), boxes: np.ndarray | None = None
) -> np.ndarray:
    """Masks over the image, enlarged to about ``PANEL_SIDE``, each label at its box's top-left corner."""
    factor = max(1, round(PANEL_SIDE / max(image.shape[:2])))
    colors = instance_colors(len(masks))
    drawn = upscale(overlay_masks(image, masks, colors=colors), factor)
    if labels and boxes is not None:
        drawn = draw_labels(drawn, [(b[0] * factor, b[1] * factor) for b in boxes], labels, colors)
    return drawn


def _mask_boxes(masks: np.ndarray) -> np.ndarray:
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(xs):
            boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


class _Coco:
    """The ground truth of one COCO json, by file name."""

    def __init__(self, path: Path) -> None:
        data = _read_json(path)
        self.names = {c["id"]: c["name"] for c in data["categories"]}
        self.images = {image["file_name"]: image for image in data["images"]}
        self.anns: dict[int, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            self.anns.setdefault(ann["image_id"], []).append(ann)

    def instances(self, file_name: str) -> tuple[np.ndarray, list[str], np.ndarray]:
        image = self.images[file_name]
        anns, rles = [], []
        for ann in self.anns.get(image["id"], []):
            try:  # RLE or polygons, as COCO allows; one the dataset skips as malformed is not drawn either
                rles.append(segmentation_rle(ann["segmentation"], image["height"], image["width"]))
            except ValueError:
                continue
            anns.append(ann)
        masks = _decode(rles, image["height"], image["width"])
        return masks, [self.names.get(a["category_id"], "?") for a in anns], _mask_boxes(masks)


def draw_pseudo_masks(layout: Layout, count: int, path: Path) -> Path:
    """Rows of sample unlabeled images: the image, its ground truth (where it is a labeled train image) and its
    pseudo masks (by score)."""
    gt = _Coco(layout.train_json)
    pseudo = _read_json(layout.pseudo / "annotations.json")
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in pseudo["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    rows = []
    for entry in pseudo["images"][:count]:
        image = load_image_rgb(layout.unlabeled / entry["file_name"])
        if entry["file_name"] in gt.images:
            masks, names, boxes = gt.instances(entry["file_name"])
        else:  # an image of an --unlabeled folder: no ground truth
            masks, names, boxes = np.zeros((0, *image.shape[:2]), bool), [], np.zeros((0, 4), np.float32)
        anns = sorted(by_image.get(entry["id"], []), key=lambda a: -a.get("score", 0.0))
        proposals = _decode([a["segmentation"] for a in anns], *image.shape[:2])
        scores = [f"{a.get('score', 0.0):.2f}" for a in anns]
        rows.append([_panel(image, np.zeros((0, *image.shape[:2]), bool)), _panel(image, masks, names, boxes),
                     _panel(image, proposals, scores, _mask_boxes(proposals))])
    return save_png(tile(rows, column_titles=["image", "ground truth", "pseudo masks (maskness)"]), path)


def draw_predictions(layout: Layout, runs: Sequence[Run], path: Path, family: str) -> Path:
    """Rows of sample val images: image, ground truth, then each exported model's best predictions."""
    gt = _Coco(layout.val_json)
    samples = _read_json(layout.onnx_eval / "samples.json")
    rows = []
    for index, file_name in enumerate(item["file_name"] for item in samples[runs[0].name]):
        image = load_image_rgb(layout.val_images / file_name)
        masks, names, boxes = gt.instances(file_name)
        row = [_panel(image, np.zeros((0, *image.shape[:2]), bool)), _panel(image, masks, names, boxes)]
        for run in runs:
            found = samples[run.name][index]
            keep = list(np.argsort(found["scores"])[::-1][:DRAWN_PREDICTIONS])
            pred = _decode([found["rles"][k] for k in keep], *image.shape[:2])
            labels = [f"{gt.names[found['category_ids'][k]]} {found['scores'][k]:.2f}" for k in keep]
            row.append(_panel(image, pred, labels, np.array([found["boxes"][k] for k in keep]).reshape(-1, 4)))
        rows.append(row)
    titles = ["image", "ground truth", *(f"{variant_title(run.variant, family)} (onnxruntime)" for run in runs)]
    return save_png(tile(rows, column_titles=titles), path)


def sp_gap_sentences(
    gaps: dict[float, float], benchmark: dict[str, Any] | None, *, low: str = "scratch", family: str = "knet",
    synthetic: bool = True,
) -> list[str]:
    """What the SP - ``low`` gaps (one seed per run) say, next to the benchmark's paired intervals.

    The benchmark runs the same comparison under other settings (its pool, epochs and seeds), so its intervals
    are the spread of its own runs: they are named as such and never offered as error bars of the run's rows.

    Args:
        gaps: labeled fraction -> this run's model from SP minus the ``low`` variant, val segm AP.
        benchmark: the JSON that ``benchmarks/low_data.py`` writes (its ``comparisons``, ``sizes`` and
            ``args``), or None.
        low: the variant SP is compared with ("scratch" or "ssl").
        family: the model family, for the titles.
        synthetic: the run is on the synthetic set, the benchmark's data.

    Returns:
        Sentences, each computed from the numbers it names.
    """
    high_title, low_title = variant_title("sp", family), variant_title(low, family)

    def gap_phrase(fraction: float, gap: float) -> str:
        if gap == 0:
            return f"at {fraction:.0%} {high_title} is level with {low_title}"
        side = "above" if gap > 0 else "below"
        return f"at {fraction:.0%} {high_title} is {abs(gap):.2f} AP {side} {low_title}"

    lines = ["One seed per run: " + "; ".join(gap_phrase(f, g) for f, g in sorted(gaps.items())) + "."]
    found = {c["fraction"]: c["AP"] for c in (benchmark or {}).get("comparisons", [])
             if (c["high"], c["low"]) == ("sp", low)}
    if not found:
        where = ("(`benchmarks/low_data.py` writes one)" if synthetic else
                 "(`benchmarks/low_data.py` measures the spread over seeds on the synthetic set)")
        return [*lines, f"No benchmark result to read it against {where}: a one-seed gap alone decides nothing, "
                        "as another seed or CPU moves it by several AP."]
    read = []
    for fraction, gap in sorted(gaps.items()):
        d = found.get(fraction)
        if d is None:
            continue
        if d["verdict"] == "includes 0":
            reading = "it establishes neither sign"
        else:
            same = (gap > 0) == (d["verdict"] == "above 0") and gap != 0
            reading = "this run's gap has the same sign" if same else "this run's gap does not have that sign"
        read.append(f"at {fraction:.0%} SP - {low} is {d['mean']:+.2f} AP [{d['ci_low']:+.2f}, "
                    f"{d['ci_high']:+.2f}] over {d['n']} paired runs (interval {d['verdict']}): {reading}")
    if read:
        args, sizes = benchmark.get("args", {}), benchmark.get("sizes", {})
        settings = ""
        if {"ssl_epochs", "pretrain_epochs", "epochs"} <= set(args) and "unlabeled_pool" in sizes:
            settings = (f" (an unlabeled pool of {sizes['unlabeled_pool']} images, DenseCL {args['ssl_epochs']} and "
                        f"SP {args['pretrain_epochs']} epochs over it, {args['epochs']} fine-tuning epochs)")
        lines.append(f"The benchmark (`benchmarks/results/low_data_knet.json`) measures the same comparison under "
                     f"other settings{settings}: " + "; ".join(read) + ". Its intervals are the spread of its own "
                     "runs, not of this table's rows, whose settings differ.")
    return lines


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _curve(rows: list[dict[str, Any]], key: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    points = [(row["epoch"], row[key]) for row in rows if key in row]
    return tuple(p[0] for p in points), tuple(p[1] for p in points)


def _data_paragraphs(layout: Layout, settings: RunSettings) -> list[str]:
    """What the data step kept, held out and skipped (``data/summary.json``)."""
    summary = _read_json(layout.data_summary)
    names = ", ".join(c["name"] for c in summary["categories"])
    if isinstance(settings.data, SyntheticData):
        size = settings.data.image_size
        return [f"Data: {settings.data.num_images} synthetic {size}x{size} images of {len(summary['categories'])} "
                f"shape classes ({names}): {summary['train_images']} train, {summary['val_images']} val."]
    skipped = summary["skipped"]
    left_out = (" Left out: " + ", ".join(f"{n} {reason}" for reason, n in skipped.items()) + " (e.g. "
                + ", ".join(f"`{name}`" for names_ in summary["skipped_examples"].values() for name in names_[:1])
                + ").") if skipped else ""
    lines = [f"Data: `{summary['annotations']}` lists {summary['listed_images']} images of "
             f"{len(summary['categories'])} categories ({names}); {summary['usable_images']} are usable.{left_out}"]
    val = summary["val"]
    if val.get("held_out"):
        lines.append(f"No val set was given: {summary['val_images']} of them ({val['fraction']:.0%}, seed "
                     f"{val['seed']}) are held out as val ({summary['val_annotations']} instances), the other "
                     f"{summary['train_images']} are the train set ({summary['train_annotations']} instances).")
    else:
        val_skipped = "".join(f", {n} {reason} left out" for reason, n in val["skipped"].items())
        lines.append(f"Val: `{val['source']}`, {summary['val_images']} usable images{val_skipped} "
                     f"({summary['val_annotations']} instances); train: {summary['train_images']} images "
                     f"({summary['train_annotations']} instances).")
    pool = summary["unlabeled"]
    if pool["folders"]:
        unreadable = sum(pool["skipped"].values())
        lines.append(f"Unlabeled pool: {pool['images']} images of " + ", ".join(f"`{f}`" for f in pool["folders"])
                     + (f" ({unreadable} unreadable files left out)" if unreadable else "") + ".")
    else:
        lines.append(f"Unlabeled pool (DenseCL, proposals, SP pre-training): the {pool['images']} train images "
                     "without their labels.")
    return lines


def _category_blocks(layout: Layout, settings: RunSettings, metrics: dict[str, Any], rel: Any,
                     command: str) -> tuple[Block, ...]:
    """The main model's per-category AP table and precision-recall curves (the evaluate step's files)."""
    main = main_run(settings)
    per = metrics.get("per_category")
    if not per or not per.get("segm") and not per.get("bbox"):
        return (Paragraph("No per-category scores: the evaluate step ran before they were written (rerun it with "
                          "`--redo evaluate`)."),)
    segm = {row["id"]: row for row in per.get("segm") or []}
    bbox = {row["id"]: row for row in per.get("bbox") or []}
    cell = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731 (None: no ground truth)
    rows = []
    for cid in sorted(set(segm) | set(bbox)):
        s, b = segm.get(cid, {}), bbox.get(cid, {})
        first = s or b
        rows.append((f"{first['name']} ({cid})", cell(s.get("AP")), cell(s.get("AP50")), cell(b.get("AP")),
                     str(first["gt"]), str(s.get("pred", b.get("pred", 0)))))
    blocks: list[Block] = [Table(
        ("category (id)", "segm AP", "segm AP50", "bbox AP", "GT instances", "predicted"), tuple(rows),
        caption=f"{variant_title(main.variant, settings.family)} ({main.fraction:.0%} labels) per category on val "
                "(- : no ground truth of the category)", numeric=(1, 2, 3, 4, 5))]
    for name, path in per["files"].items():
        if name.startswith("pr_iou"):
            iou = int(name.removeprefix("pr_iou")) / 100
            blocks.append(Figure(rel(Path(path)), f"Precision-recall per category at IoU {iou:.2f} (segm and bbox), "
                                 f"{variant_title(main.variant, settings.family)}", (command,)))
    return tuple(blocks)


def write_run_report(layout: Layout, settings: RunSettings, commands: dict[str, list[str]]) -> dict[str, Path]:
    """Draw the figures into ``layout.figures`` and write ``report.html`` and ``report.md`` in ``layout.root``.

    Args:
        layout: the run's paths (every step before ``report`` has run).
        settings: the run's settings.
        commands: step name -> the ``sp-ray`` commands that reproduce it (`sp_ray.run.commands.reproduce_commands`).

    Returns:
        {"html": path, "md": path}.
    """
    runs = fine_tuning_runs(settings)
    variants = list(dict.fromkeys(run.variant for run in runs))
    family = settings.family
    title = lambda variant: variant_title(variant, family)  # noqa: E731
    fractions = sorted(settings.fractions)
    figures = layout.figures
    figures.mkdir(parents=True, exist_ok=True)
    rel = lambda path: path.relative_to(layout.root).as_posix()  # noqa: E731
    curves = {run: _read_jsonl(layout.run(run) / "metrics.jsonl") for run in runs}
    metrics = {run: _read_json(layout.metrics(run)) for run in runs}
    split_sizes = {f: len(_read_json(layout.split(f, settings.split_seed))["images"]) for f in fractions}
    val_size = len(_read_json(layout.val_json)["images"])
    steps = _read_json(layout.steps) if layout.steps.is_file() else {}
    synthetic = isinstance(settings.data, SyntheticData)

    # Results table.
    rows = []
    for run in runs:
        segm, bbox = metrics[run]["segm"], metrics[run]["bbox"]
        rows.append((f"{run.fraction:.0%} ({_count(split_sizes[run.fraction], 'image')})", title(run.variant),
                     str(curves[run][-1]["epoch"]), f"{segm['AP']:.2f}", f"{segm['AP50']:.2f}",
                     f"{segm['AP75']:.2f}", f"{bbox['AP']:.2f}"))
    ap_table = Table(("labeled", "model", "epochs", "segm AP", "AP50", "AP75", "bbox AP"), tuple(rows),
                     caption=f"COCO AP (percent) on the {val_size} val images", numeric=(2, 3, 4, 5, 6))
    segm_ap = {run: metrics[run]["segm"]["AP"] for run in runs}
    low = settings.reference
    gap_lines: list[str] = []
    if low is not None:
        gaps = {f: segm_ap[Run("sp", f)] - segm_ap[Run(low, f)] for f in fractions}
        benchmark = _read_json(BENCHMARK_RESULT) if BENCHMARK_RESULT.is_file() and synthetic and family == "knet" \
            else None
        gap_lines = sp_gap_sentences(gaps, benchmark, low=low, family=family, synthetic=synthetic)

    # Curves.
    loss_panels, ap_panels = [], []
    for fraction in fractions:
        loss_lines, ap_lines = [], []
        for variant in variants:
            run = Run(variant, fraction)
            loss_lines.append(Line(title(variant), *_curve(curves[run], "loss"), dashed=variant == "maskrcnn"))
            x, y = _curve(curves[run], "segm_AP")
            if variant == "maskrcnn" or not x:  # evaluated once, after training (evaluate step)
                x, y = (curves[run][-1]["epoch"],), (metrics[run]["segm"]["AP"],)
            ap_lines.append(Line(title(variant), x, y, dashed=variant == "maskrcnn"))
        panel_title = f"{fraction:.0%} labels ({_count(split_sizes[fraction], 'image')})"
        loss_panels.append(Panel(panel_title, tuple(loss_lines), "training loss (each model's own sum)", log_y=True))
        ap_panels.append(Panel(panel_title, tuple(ap_lines), "val segm AP"))
    rates = {variant: float(np.median([row["images_per_second"] for run in runs if run.variant == variant
                                       for row in curves[run]])) for variant in variants}
    loss_png = plot_panels(loss_panels, figures / "loss_curves.png", title="Fine-tuning loss per epoch")
    ap_png = plot_panels(ap_panels, figures / "ap_curves.png", title="Val segm AP during fine-tuning")
    sp_rows = _read_jsonl(layout.pretrain / "metrics.jsonl")
    ker_keys = sorted(k for k in sp_rows[-1] if k.startswith("loss_ker"))
    sp_ker = [{"epoch": r["epoch"], "ker": sum(r[k] for k in ker_keys)} for r in sp_rows]
    pretrain_panels = []
    if settings.runs_ssl:
        ssl_rows = _read_jsonl(layout.ssl / "metrics.jsonl")
        pretrain_panels.append(Panel("DenseCL (unlabeled pool)", (
            Line("loss", *_curve(ssl_rows, "loss")), Line("global", *_curve(ssl_rows, "loss_global"), dashed=True),
            Line("dense", *_curve(ssl_rows, "loss_dense"), dashed=True)), "InfoNCE loss"))
    sp_lines = [Line("total", *_curve(sp_rows, "loss"))]
    if ker_keys:
        sp_lines.append(Line("L_ker (all stages)", *_curve(sp_ker, "ker"), dashed=True))
    pretrain_panels.append(Panel(f"SP pre-training ({settings.pretrain_workers} Ray Train workers)", tuple(sp_lines),
                                 "loss"))
    pretrain_png = plot_panels(pretrain_panels, figures / "pretrain_losses.png", title="Pre-training losses per epoch")

    # Pseudo masks, kernels, predictions.
    pseudo = _read_json(layout.pseudo_summary)
    pseudo_png = draw_pseudo_masks(layout, settings.sample_images, figures / "pseudo_masks.png")
    exported = exported_runs(settings)
    predictions_png = draw_predictions(layout, exported, figures / "predictions.png", family)
    kernel_titles = {}
    for name in kernel_checkpoints(layout, settings):
        variant, _, tag = name.partition("_")
        kernel_titles[name] = ("after SP pre-training, before any label" if name == "sp_pretrain" else
                               f"{title(variant)}, fine-tuned on {tag.replace('pct', '%')}")
    propose_cfg = load_config(layout.config("propose")).propose
    proposed_at = (f"{propose_cfg.max_size}x{propose_cfg.short_size}" if not propose_cfg.keep_ratio else
                   f"short side {propose_cfg.short_size}, long side at most {propose_cfg.max_size}")
    pseudo_text = (f"{pseudo['annotations']} pseudo masks on {pseudo['images']} unlabeled images "
                   f"({pseudo['images_without_proposals']} without any, {pseudo.get('failed', 0)} skipped), from the "
                   f"{'DenseCL' if settings.runs_ssl else 'given'} backbone at {proposed_at}.")
    if "recall" in pseudo:
        recall = pseudo["recall"]
        pseudo_text += (f" Recall of the {recall['instances']} ground-truth train instances: {recall['0.5']:.1%} at "
                        f"IoU 0.5, {recall['0.75']:.1%} at IoU 0.75; mean best IoU {recall['mean_best_iou']:.3f}.")

    # Export and throughput.
    export = _read_json(layout.export / "export.json")
    main = exported[0]
    onnx_ap = _read_json(layout.onnx_eval / main.name / "metrics.json")
    export_rows = []
    for run in exported:
        parity = export[run.name]["parity"]
        export_rows.append((title(run.variant), rel(layout.onnx(run)),
                            f"{parity['matched']}/{parity['detections']}", f"{parity['max_score_diff']:.1e}",
                            f"{parity['pooled_iou']:.4f}", "PASS" if parity["passed"] else "FAIL"))
    throughput = _read_json(layout.throughput)
    bars, speed_rows = [], []
    for run in exported:
        t = throughput["models"][run.name]
        bars.append(Bar(title(run.variant), t["items_per_second"], t["items_per_second_p95"]))
        speed_rows.append((title(run.variant), f"{t['items_per_second']:.1f}",
                           f"{t['items_per_second_p95']:.1f}", f"{t['median_ms']:.1f}", f"{t['p95_ms']:.1f}"))
    speed = {run.variant: throughput["models"][run.name]["items_per_second"] for run in exported}
    size = throughput["image_size"]
    throughput_png = plot_bars(
        bars, figures / "throughput.png", xlabel="images / s (bar: median latency; whisker: p95 latency)",
        title=f"onnxruntime, {size}x{size}, {throughput['threads']} thread(s), {throughput['cpu']}")

    total = sum(entry["seconds"] for name, entry in steps.items() if name != "report")
    step_rows = tuple((name, f"{entry['seconds']:.0f}", entry["finished"], f"{entry['load_average']:.1f}")
                      for name, entry in steps.items())
    finetune_cmds = tuple(commands["finetune"])
    configs = settings.configs
    shown = lambda path: path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)  # noqa: E731
    models = (f"Preset `{settings.preset}`: {FAMILY_TITLES[family]} of `{shown(configs.finetune)}`"
              + (f" and Mask R-CNN of `{shown(configs.baseline)}`" if settings.baseline else "")
              + f", DenseCL of `{shown(configs.ssl)}`" * settings.runs_ssl
              + f"; the resolved config of every step is in `{rel(layout.configs)}/`. No label is used before "
              "fine-tuning.")
    if settings.detections_per_image is not None:
        models += f" Every model keeps its {settings.detections_per_image} best detections per image."
    intro_lines = [
        f"Written {time.strftime('%Y-%m-%d %H:%M')} by `{pipeline_command(layout, settings)}`.",
        *_data_paragraphs(layout, settings),
        "Labeled fractions: " + ", ".join(f"{f:.0%} = {_count(split_sizes[f], 'image')}" for f in fractions)
        + f" (nested, seed {settings.split_seed}). " + models,
        f"Steps' wall time when they last ran: {total / 60:.1f} min in all, on {throughput['cpu']} "
        f"({throughput['cores']} cores); see the table at the end.",
    ]
    results: list[Block] = [ap_table, *(Paragraph(line) for line in gap_lines)]
    if settings.baseline:
        main_variant = "sp"
        baseline_epochs = curves[Run("maskrcnn", fractions[-1])][-1]["epoch"]
        main_epochs = curves[Run(main_variant, fractions[-1])][-1]["epoch"]
        text = (f"Mask R-CNN trained {_count(baseline_epochs, 'epoch')} and {FAMILY_TITLES[family]} {main_epochs}, at "
                f"{rates['maskrcnn']:.2f} against {rates[main_variant]:.1f} images/s here (median over the epochs and "
                "runs; Mask R-CNN's RoI heads sample 512 RoIs per image and run a 4-conv mask head on every "
                "positive).")
        if baseline_epochs < main_epochs:
            text += " Its rows are a compute-bounded baseline, not an equal-schedule one."
        results.append(Paragraph(text))
    results.append(Commands(tuple(commands["evaluate"]), "Reproduce (after the fine-tuning runs below):"))
    pseudo_commands = tuple(commands.get("ssl", []) + commands["propose"] + commands["report"])
    throughput_text = (f"{throughput['repeats']} interleaved rounds after {throughput['warmup']} warm-up rounds, "
                       f"onnxruntime {throughput['onnxruntime']}; load average before / after: "
                       f"{throughput['load_average_before'][0]:.2f} / {throughput['load_average_after'][0]:.2f} "
                       "(a busy machine lowers the rates).")
    if settings.baseline:
        throughput_text = (f"{FAMILY_TITLES[family]} / Mask R-CNN: {speed['sp'] / speed['maskrcnn']:.1f}x. "
                           + throughput_text)
    report = Report(
        title=("sp-ray demo: saliency-prompt pre-training in the low-data regime, on synthetic shapes" if synthetic
               else f"sp-ray run: saliency-prompt pre-training of {FAMILY_TITLES[family]} on "
                    f"{settings.data.annotations.name}"),
        intro=tuple(Paragraph(line) for line in intro_lines),
        sections=(
            Section("COCO AP after fine-tuning", tuple(results)),
            Section("Per-category AP", _category_blocks(layout, settings, metrics[main_run(settings)], rel,
                                                        commands["evaluate"][runs.index(main_run(settings))])),
            Section("Training curves", (
                Figure(rel(loss_png), "Training loss per epoch of every fine-tuning run (log scale; the models' "
                       "losses are different sums, compare their shapes)", finetune_cmds),
                Figure(rel(ap_png), "Val segm AP during fine-tuning"
                       + (f", every {settings.eval_interval} epochs" if settings.eval_interval else "")
                       + ("; Mask R-CNN evaluated once, after training" if settings.baseline else ""), finetune_cmds),
                Figure(rel(pretrain_png), "Losses of the pre-training stages, before any label is used",
                       tuple(commands.get("ssl", []) + commands["pretrain"])),
            )),
            Section("Saliency pseudo masks", (
                Paragraph(pseudo_text),
                Figure(rel(pseudo_png), "Sample unlabeled images: ground truth (never used before fine-tuning; "
                       "none for images of --unlabeled folders) and the pseudo masks SP pre-training learns from, "
                       "with their maskness scores", pseudo_commands),
            )),
            Section("Kernel analysis", tuple(
                Figure(rel(layout.kernels / f"{name}.png"), f"Mean initial mask of every kernel over "
                       f"{settings.kernel_images} val images or fewer: {kernel_title}", (command,))
                for (name, kernel_title), command in zip(kernel_titles.items(), commands["kernels"], strict=True)
            )),
            Section("ONNX export and onnxruntime", (
                Table(("model", "file", "detections matched", "max score diff", "pooled mask IoU", "parity"),
                      tuple(export_rows), caption="Parity of the exported graphs against PyTorch (fp32)"),
                Paragraph(f"{title(main.variant)} ({main.fraction:.0%}) on val, segm AP: PyTorch "
                          f"{metrics[main]['segm']['AP']:.2f}, onnxruntime {onnx_ap['segm']['AP']:.2f} (bbox AP "
                          f"{metrics[main]['bbox']['AP']:.2f} and {onnx_ap['bbox']['AP']:.2f})."),
                Figure(rel(predictions_png), f"Sample val images: ground truth and the {DRAWN_PREDICTIONS} "
                       "highest-scoring instances of each exported model, run by `export.runtime.Segmenter` "
                       "(numpy + onnxruntime)", tuple(commands["export"] + commands["onnx"] + commands["report"])),
            )),
            Section("Throughput", (
                Figure(rel(throughput_png), "onnxruntime images/s of the exported models, end to end "
                       "(`Segmenter.predict`: resize, graph, masks at image size), one image per call",
                       tuple(commands["throughput"])),
                Table(("model", "images/s (median)", "images/s (p95)", "latency median (ms)", "latency p95 (ms)"),
                      tuple(speed_rows), numeric=(1, 2, 3, 4)),
                Paragraph(throughput_text),
            )),
            Section("Pipeline", (
                Table(("step", "wall time (s)", "finished", "load average"), step_rows, numeric=(1, 3),
                      caption="Wall time of each step when it last ran (a rerun skips finished steps), and the "
                      f"1-minute load average when it finished ({throughput['cores']} cores: a load above that "
                      "means other processes shared them)"),
                Commands(tuple(line for name in commands for line in commands[name]),
                         f"The whole pipeline as sp-ray commands (what `{pipeline_command(layout, settings)}` "
                         f"computes), from the resolved configs in `{rel(layout.configs)}/`:"),
            )),
        ),
    )
    return write_report(report, layout.root)
