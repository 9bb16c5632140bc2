"""Export, evaluate and time every format of one checkpoint on one COCO set (``sp-ray benchmark``).

For each format of ``sp_ray.benchmark.FORMATS`` one `FormatResult`:

- **file**: ``model.pt`` for torch; for the ONNX formats ``PREFIX.<precision>.onnx``, written by
  ``export.exporter.onnx_export.export_checkpoint`` with a fixed batch of ``batch`` images and any input size;
  int8 is calibrated on ``calibration_count`` images of the set's folder (so its AP is that of a model
  calibrated on the images it is scored on: give a held-out set to measure what calibration transfers).
- **AP**: COCO segm / bbox AP on the set. torch through ``evaluate_checkpoint``, the ONNX formats through
  ``evaluate_onnx`` on the CPU provider with ``threads``: the functions ``sp-ray evaluate --checkpoint`` and
  ``sp-ray evaluate --onnx --threads T`` call, so the values are theirs.
- **parity** against PyTorch fp32: the ``export.exporter.parity.ParityReport`` the export computed on the first
  ``parity_count`` images of the set's folder (torch is the reference and has none).
- **speed**, after ``warmup`` untimed rounds, over ``rounds`` timed rounds. Each round runs every format
  once (its graph-only and end-to-end calls back to back), the formats in an order rotated by one per
  round, so a load that comes and goes on a shared machine hits every format alike; the two calls of a
  format swap places every round too, as the first call after another format meets caches that format
  filled. Round r runs batch r (modulo the batches read) of the set's first images, the same batch for
  every format.

  - graph-only: ``Segmenter.run`` on the batch already prepared (resized, padded uint8 [B, 3, H, W]);
    torch: the export adapter (``export.exporter.adapters.export_adapter(family).wrap``) in eager mode under
    ``torch.inference_mode`` on the same array.
  - end-to-end: ``Segmenter.predict_batch(images, rle=True)``: resize and pad, the graph, masks at image
    size as COCO RLE (what ``evaluate``, ``predict`` and ``serve`` compute). torch: the same numpy pre- and
    post-processing of ``export.runtime`` around the eager adapter, i.e. the deployed pipeline with
    PyTorch running the graph, so the difference between the rows is the graph's. The PyTorch evaluation
    path of ``evaluate --checkpoint`` (torch resize and mask pasting) is not timed: it would compare two
    post-processing implementations rather than the formats; it is where the torch row's AP comes from.

A format that fails (an export that raises, such as fp16 of Mask R-CNN; a model that does not load; an
evaluation or a timed call that raises) becomes a row with its error and the other formats go on. An
export outside its precision's parity bounds is measured all the same, from the ``.parity-failed.onnx``
the export leaves, and its row says so.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shlex
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.exporter.adapters import export_adapter
from export.exporter.onnx_export import (
    ParityError,
    check_parity,
    export_checkpoint,
    model_info,
    sample_images,
)
from export.exporter.parity import ParityReport
from export.metadata import ModelInfo
from export.runtime import Instances, Segmenter, decode_outputs, prepare_batch
from sp_ray import __version__
from sp_ray.benchmark import FORMATS
from sp_ray.checkpoint import MODEL_FILE, Checkpoint, is_checkpoint, load_checkpoint
from sp_ray.data.coco import CocoInstanceDataset
from sp_ray.data.images import UnusableImageError
from sp_ray.errors import UserError
from sp_ray.evaluation.coco_eval import evaluate_checkpoint, evaluate_onnx
from sp_ray.evaluation.timing import Timing
from sp_ray.machine import cpu_facts, describe_cpu
from sp_ray.models import build_model
from sp_ray.train.preflight import check_coco_data, check_output_file

log = logging.getLogger("sp_ray")

# The ONNX formats run on the CPU provider: the benchmark is about the CPU kernels each precision gets
# (int8 with or without VNNI), and a GPU provider would not run the same graphs.
PROVIDERS = ["CPUExecutionProvider"]


@dataclass
class BenchmarkOptions:
    """What ``sp-ray benchmark`` measures and where it writes.

    Attributes:
        checkpoint: a fine-tuned checkpoint directory (``WORK_DIR/final``).
        annotations: COCO json of the evaluation set.
        images: its image folder; also the parity images (first ``parity_count`` by name).
        out: output prefix (``PREFIX.md``, ``.json``, ``.png``, ``PREFIX.<precision>.onnx``); None:
            ``CHECKPOINT/benchmark/benchmark``, beside ``evaluate``'s ``CHECKPOINT/eval/``.
        formats: keys of ``FORMATS``, in table order.
        threads: CPU threads of onnxruntime (intra-op) and of PyTorch; None: each runtime's default.
        batch: images per graph run (the ONNX models are exported with this fixed batch).
        rounds: timed rounds (>= 1). warmup: untimed rounds before them (>= 0).
        parity_count: images of the export's parity check.
        calibration_count: onnx-int8: images of ``images`` its activation ranges are calibrated on
            (``export_checkpoint``'s ``calibration_count``; evenly spaced by name).
    """

    checkpoint: Path
    annotations: Path
    images: Path
    out: Path | None = None
    formats: tuple[str, ...] = tuple(FORMATS)
    threads: int | None = None
    batch: int = 1
    rounds: int = 10
    warmup: int = 1
    parity_count: int = 4
    calibration_count: int = 32

    def __post_init__(self) -> None:
        self.checkpoint, self.annotations, self.images = map(Path, (self.checkpoint, self.annotations, self.images))
        self.out = Path(self.out) if self.out is not None else None
        self.formats = tuple(dict.fromkeys(self.formats))  # in order, each once

    @property
    def prefix(self) -> Path:
        return self.out if self.out is not None else self.checkpoint / "benchmark" / "benchmark"

    def output(self, suffix: str) -> Path:
        """``PREFIX`` + ``suffix`` (not ``with_suffix``: a prefix may hold dots, as in ``runs/r1.5``)."""
        return self.prefix.with_name(self.prefix.name + suffix)

    def command(self) -> str:
        """The ``sp-ray benchmark`` command line that reproduces this run."""
        words = ["sp-ray", "benchmark", "--checkpoint", str(self.checkpoint), "--annotations",
                 str(self.annotations), "--images", str(self.images), "--formats", *self.formats,
                 "--batch", str(self.batch), "--rounds", str(self.rounds), "--warmup", str(self.warmup)]
        if self.threads is not None:
            words += ["--threads", str(self.threads)]
        if "onnx-int8" in self.formats:
            words += ["--calibration-count", str(self.calibration_count)]
        return shlex.join([*words, "--out", str(self.prefix)])


@dataclass
class FormatResult:
    """One row of the benchmark.

    Attributes:
        format: key of ``FORMATS``. precision: "fp32" (torch too), "fp16" or "int8".
        file: the model file measured. size_mb: its size in MiB.
        metrics: what ``evaluate_checkpoint`` / ``evaluate_onnx`` returned: {"segm": {"AP", "AP50", ...},
            "bbox": {...}, "skipped": {...}}.
        graph, e2e: ``Timing.summary()`` of the graph-only and end-to-end calls (images/s, p50 / p95 ms).
        parity: the export's parity (`parity_summary`); None for torch, the reference.
        providers: onnxruntime's execution providers of the timed session.
        error: "Type: message" of what failed; None when the format ran through.
        traceback: the failure's traceback, for the JSON.
        note: what else the row needs said (a parity failure).
    """

    format: str
    precision: str
    file: str | None = None
    size_mb: float | None = None
    metrics: dict[str, Any] | None = None
    graph: dict[str, float] | None = None
    e2e: dict[str, float] | None = None
    parity: dict[str, Any] | None = None
    providers: list[str] | None = None
    error: str | None = None
    traceback: str | None = None
    note: str | None = None

    @property
    def ran(self) -> bool:
        return self.error is None

    def ap(self, iou_type: str) -> float | None:
        return self.metrics[iou_type]["AP"] if self.metrics else None

    def fail(self, err: BaseException, stage: str) -> None:
        first = (str(err).strip().splitlines() or [""])[0]
        self.error = f"{stage}: {type(err).__name__}: {first}" if first else f"{stage}: {type(err).__name__}"
        self.traceback = "".join(traceback.format_exception(err))
        log.warning("benchmark %s: %s", self.format, self.error)


@dataclass
class BenchmarkReport:
    """Everything a run measured: ``rows`` in ``options.formats`` order, the machine and the settings."""

    options: BenchmarkOptions
    rows: list[FormatResult]
    environment: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ran(self) -> bool:
        """At least one format ran through (the command's exit status 0)."""
        return any(row.ran for row in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {"command": self.options.command(), "environment": self.environment, "settings": self.settings,
                "rows": [dataclasses.asdict(row) for row in self.rows]}


def check_options(options: BenchmarkOptions) -> tuple[Checkpoint, dict[str, Any]]:
    """Everything that can be wrong with the inputs, found before any export: returns the loaded
    checkpoint and the parsed COCO json.

    Raises:
        UserError: a bad setting, a missing or damaged checkpoint, a pre-training checkpoint, annotations
            or images that are missing or do not fit each other or the model, an unwritable ``--out``;
            the message names the option and the path.
    """
    for name, value, least in (("--batch", options.batch, 1), ("--rounds", options.rounds, 1),
                               ("--warmup", options.warmup, 0), ("--parity-count", options.parity_count, 1),
                               ("--calibration-count", options.calibration_count, 1),
                               ("--threads", options.threads, 1)):
        if value is not None and value < least:
            raise UserError(f"{name} {value}: it must be >= {least}")
    unknown = [name for name in options.formats if name not in FORMATS]
    if unknown or not options.formats:
        raise UserError(f"--formats {' '.join(options.formats) or '(none)'}: choose from {' '.join(FORMATS)}")
    path = options.checkpoint
    if not path.exists():
        raise UserError(f"--checkpoint {path} does not exist; give a checkpoint directory such as WORK_DIR/final")
    if not is_checkpoint(path):
        raise UserError(f"--checkpoint {path} is not a checkpoint directory (it needs model.pt, config.yaml and "
                        "meta.json); give the WORK_DIR/final of 'sp-ray finetune'")
    ckpt = load_checkpoint(path)  # a damaged file is a UserError naming it
    if ckpt.config.pretrain.enabled:
        raise UserError(f"--checkpoint {path} is a saliency-prompt pre-training checkpoint; fine-tune it "
                        "('sp-ray finetune --init') and benchmark the fine-tuned checkpoint")
    missing = [key for key in ("class_names", "cat_ids") if key not in ckpt.meta]
    if missing:
        raise UserError(f"--checkpoint {path}: meta.json has no {', '.join(missing)}; give a checkpoint written "
                        "by 'sp-ray finetune'")
    data = check_coco_data(options.annotations, options.images, what="--annotations / --images",
                           images_what="--images")
    defined = {category["id"] for category in data["categories"]}
    foreign = sorted(set(ckpt.meta["cat_ids"]) - defined)
    if foreign:
        raise UserError(f"--annotations {options.annotations} does not define the category ids {foreign} that "
                        f"{path} predicts; benchmark on annotations with the categories the model was trained on")
    check_output_file(options.output(".md"), what="--out")
    return ckpt, data


def _model(ckpt: Checkpoint) -> tuple[nn.Module, ModelInfo]:
    """The checkpoint's PyTorch model (eval mode) and the metadata of its export at any size, fixed batch."""
    cfg = ckpt.config
    # The checkpoint holds every weight; the backbone file its config names may not exist here (as in export).
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone_weights=None))
    model = build_model(cfg)
    model.load_state_dict(ckpt.model_state)
    return model.eval(), model_info(cfg, class_names=ckpt.meta["class_names"], cat_ids=ckpt.meta["cat_ids"],
                                    input_size=None, batch_size=None)


def read_batches(annotations: Path, images: Path, *, batch: int, count: int) -> list[list[np.ndarray]]:
    """Up to ``count`` batches of ``batch`` images of the set, in the json's order, decoded as ``evaluate``
    decodes them (``CocoInstanceDataset.read_image``), undecodable ones skipped.

    Returns:
        Lists of uint8 [H, W, 3] arrays, all of ``batch`` images; a single shorter one when the set has
        fewer usable images than ``batch``.

    Raises:
        UserError: no image of the set decodes.
    """
    dataset = CocoInstanceDataset(annotations, images)
    pixels: list[np.ndarray] = []
    for index in range(len(dataset)):
        if len(pixels) == batch * count:
            break
        try:
            pixels.append(dataset.read_image(index))
        except UnusableImageError:
            continue
    if not pixels:
        raise UserError(f"--images {images}: none of the images of {annotations} decodes")
    full = len(pixels) // batch * batch
    return [pixels[i : i + batch] for i in range(0, full, batch)] or [pixels]


def torch_predict_batch(wrapper: nn.Module, info: ModelInfo, images: Sequence[np.ndarray]) -> list[Instances]:
    """The runtime's ``predict_batch(images, rle=True)`` with the eager export adapter as the graph.

    Args:
        wrapper: ``export_adapter(info.family).wrap(model, info.topk)`` in eval mode.
        info: the model's metadata (resize rule, thresholds, category ids).
        images: uint8 [H_i, W_i, 3] RGB arrays, at most ``info.batch_size`` if it is set.

    Returns:
        One ``Instances`` per image at its size, with RLE masks.
    """
    batch, sizes = prepare_batch(images, info)
    with torch.inference_mode():
        outputs = [o.numpy() for o in wrapper(torch.from_numpy(batch))]
    return [decode_outputs(outputs, b, info, image_size=sizes[b], orig_size=image.shape[:2],
                           score_threshold=info.score_threshold, rle=True) for b, image in enumerate(images)]


# A contender: call kind ("graph", "e2e") -> a callable of the round index that runs one batch.
Calls = dict[str, Callable[[int], object]]


def torch_calls(model: nn.Module, info: ModelInfo, batches: Sequence[Sequence[np.ndarray]]) -> Calls:
    """Graph-only and end-to-end calls of the PyTorch model (see the module docstring)."""
    wrapper = export_adapter(info.family).wrap(model, info.topk).eval()
    prepared = [torch.from_numpy(prepare_batch(images, info)[0]) for images in batches]

    def graph(round_index: int) -> object:
        with torch.inference_mode():
            return wrapper(prepared[round_index % len(prepared)])

    def e2e(round_index: int) -> object:
        return torch_predict_batch(wrapper, info, batches[round_index % len(batches)])

    return {"graph": graph, "e2e": e2e}


def onnx_calls(segmenter: Segmenter, batches: Sequence[Sequence[np.ndarray]]) -> Calls:
    """Graph-only (``Segmenter.run`` on prepared arrays) and end-to-end (``predict_batch``, RLE) calls."""
    prepared = [segmenter.prepare_batch(images)[0] for images in batches]

    def graph(round_index: int) -> object:
        return segmenter.run(prepared[round_index % len(prepared)])

    def e2e(round_index: int) -> object:
        return segmenter.predict_batch(batches[round_index % len(batches)], rle=True)

    return {"graph": graph, "e2e": e2e}


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The order of round ``round_index``: ``names`` rotated left by that many places."""
    shift = round_index % len(names)
    return [*names[shift:], *names[:shift]]


def time_rounds(
    contenders: Mapping[str, Calls], *, rounds: int, warmup: int, items_per_call: int,
) -> tuple[dict[str, dict[str, Timing]], dict[str, BaseException]]:
    """Time every contender's calls in rounds: each round runs every contender once, the contenders in
    ``round_order`` and each one's calls in ``round_order`` too; the first ``warmup`` rounds are not timed.

    Args:
        contenders: name -> its calls (kind -> callable of the round index).
        rounds: timed rounds, >= 1. warmup: untimed rounds first, >= 0.
        items_per_call: images one call processes, for the rates.

    Returns:
        (name -> kind -> ``Timing`` of the contenders that never raised, name -> the error of those that
        did: a contender that raises is left out of the later rounds).
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    latencies = {name: {kind: [] for kind in calls} for name, calls in contenders.items()}
    failed: dict[str, BaseException] = {}
    names = list(contenders)
    for round_index in range(warmup + rounds):
        for name in round_order(names, round_index):
            if name in failed:
                continue
            calls = contenders[name]
            for kind in round_order(list(calls), round_index):
                call = calls[kind]
                start = time.perf_counter()
                try:
                    call(round_index)
                except Exception as err:  # this contender's failure, not the benchmark's: the others go on
                    failed[name] = err
                    break
                if round_index >= warmup:
                    latencies[name][kind].append(time.perf_counter() - start)
        log.info("benchmark: round %d of %d%s", round_index + 1, warmup + rounds,
                 " (warm-up)" if round_index < warmup else "")
    timings = {name: {kind: Timing(tuple(values), items_per_call) for kind, values in kinds.items()}
               for name, kinds in latencies.items() if name not in failed}
    return timings, failed


def parity_summary(report: ParityReport) -> dict[str, Any]:
    """The parity columns of a row: fraction matched, max |score diff|, mean and pooled mask IoU, pass."""
    return {"images": report.images, "detections": report.detections, "matched": report.matched,
            "matched_fraction": report.matched / report.detections if report.detections else 1.0,
            "max_score_diff": report.max_score_diff, "mean_iou": report.mean_iou, "pooled_iou": report.pooled_iou,
            "min_iou": report.min_iou, "passed": report.passed, "bounds": dataclasses.asdict(report.bounds),
            "summary": report.summary()}


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def export_format(options: BenchmarkOptions, precision: str, model: nn.Module, row: FormatResult) -> Path:
    """Export ``precision`` with ``export_checkpoint``; fills ``row.parity`` (and ``row.note``) and
    returns the model to measure: ``PREFIX.<precision>.onnx``, or its ``.parity-failed.onnx``."""
    path = options.output(f".{precision}.onnx")
    failed = path.with_name(path.stem + ".parity-failed.onnx")
    for stale in (path, failed):  # an earlier run's file must not pass for this run's
        stale.unlink(missing_ok=True)
    # int8 is calibrated on the set's own images: the activation ranges of the images it is scored on.
    calibration = {"calibration_images": options.images, "calibration_count": options.calibration_count}
    try:
        result = export_checkpoint(options.checkpoint, path, precision=precision, batch_size=options.batch,
                                   input_size=None, parity_images=options.images,
                                   parity_count=options.parity_count, **(calibration if precision == "int8" else {}))
    except ParityError:
        if not failed.is_file():
            raise
        # Outside the bounds, but a benchmark is where one wants to see by how much and what it buys.
        images = sample_images(options.images, count=options.parity_count)
        row.parity = parity_summary(check_parity(model, failed, images))
        row.note = f"parity outside the {precision} bounds; measured anyway from {failed.name}"
        return failed
    row.parity = parity_summary(result.parity)
    return path


def _environment() -> dict[str, Any]:
    return {**cpu_facts(), "cpu_line": describe_cpu(), "onnxruntime": ort.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "sp_ray": __version__}


def run_benchmark(options: BenchmarkOptions) -> BenchmarkReport:
    """Check the inputs, then export, evaluate and time every format of ``options`` (module docstring).

    Raises:
        UserError: bad inputs (``check_options``), before any work. A format's own failure is its row's.
    """
    ckpt, data = check_options(options)
    load_before = os.getloadavg()
    previous_threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        model, info = _model(ckpt)
        info = dataclasses.replace(info, batch_size=options.batch)  # the graphs' batch, as exported
        batches = read_batches(options.annotations, options.images, batch=options.batch, count=options.rounds)
        rows: dict[str, FormatResult] = {}
        contenders: dict[str, Calls] = {}
        for name in options.formats:
            precision = FORMATS[name]
            row = rows[name] = FormatResult(format=name, precision=precision or "fp32")
            calls = _prepare(options, name, model, info, batches, row)
            if calls is not None:
                contenders[name] = calls
        if contenders:
            timings, failed = time_rounds(contenders, rounds=options.rounds, warmup=options.warmup,
                                          items_per_call=len(batches[0]))
            for name, err in failed.items():
                rows[name].fail(err, "timing")
            for name, kinds in timings.items():
                rows[name].graph, rows[name].e2e = kinds["graph"].summary(), kinds["e2e"].summary()
        torch_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    providers = next((row.providers for row in rows.values() if row.providers), None)
    environment = {**_environment(), "threads": options.threads, "torch_threads": torch_threads,
                   "provider": providers[0] if providers else PROVIDERS[0],
                   "load_average_before": [round(v, 2) for v in load_before],
                   "load_average_after": [round(v, 2) for v in os.getloadavg()]}
    settings = {"checkpoint": str(options.checkpoint), "family": info.family, "classes": len(info.class_names),
                "annotations": str(options.annotations), "images": str(options.images),
                "images_in_set": len(data["images"]), "batch": options.batch, "rounds": options.rounds,
                "warmup": options.warmup, "timing_batches": len(batches), "images_per_call": len(batches[0]),
                "parity_count": options.parity_count, "calibration_count": options.calibration_count,
                "formats": list(options.formats)}
    return BenchmarkReport(options=options, rows=[rows[name] for name in options.formats],
                           environment=environment, settings=settings)


def _prepare(
    options: BenchmarkOptions, name: str, model: nn.Module, info: ModelInfo,
    batches: Sequence[Sequence[np.ndarray]], row: FormatResult,
) -> Calls | None:
    """Export (ONNX), evaluate and load one format into ``row``; its timed calls, or None if it failed."""
    precision = FORMATS[name]
    common = {"annotations": str(options.annotations), "images": str(options.images)}
    stage = "export"
    try:
        if precision is None:
            row.file = str(options.checkpoint / MODEL_FILE)
            row.size_mb = _size_mb(Path(row.file))
            stage = "evaluate"
            log.info("benchmark %s: evaluating %s", name, options.checkpoint)
            row.metrics, _ = evaluate_checkpoint(str(options.checkpoint), **common, use_gpu=False)
            return torch_calls(model, info, batches)
        log.info("benchmark %s: exporting %s", name, options.checkpoint)
        path = export_format(options, precision, model, row)
        row.file, row.size_mb = str(path), _size_mb(path)
        stage = "evaluate"
        log.info("benchmark %s: evaluating %s", name, path)
        row.metrics, _ = evaluate_onnx(str(path), **common, providers=PROVIDERS, threads=options.threads)
        stage = "load"
        segmenter = Segmenter(path, providers=PROVIDERS, threads=options.threads)
        row.providers = segmenter.providers
        return onnx_calls(segmenter, batches)
    except Exception as err:  # the format's failure becomes its row; the other formats go on
        row.fail(err, stage)
        return None
