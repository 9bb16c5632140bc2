"""The run's steps, in order, and `run_pipeline`; see `sp_ray.run` for what each step does."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sp_ray.config import Config, load_config
from sp_ray.machine import cpu_name
from sp_ray.run.commands import config_texts, export_size, reproduce_commands, run_init
from sp_ray.run.runner import Step, StepRecord, count_lines, progress, run_steps, write_json
from sp_ray.run.settings import (
    Layout,
    Run,
    RunSettings,
    SyntheticData,
    exported_runs,
    fine_tuning_runs,
    kernel_checkpoints,
    main_run,
)

log = logging.getLogger("sp_ray")


class LocalRay:
    """Starts the local Ray (or joins ``RAY_ADDRESS``) at the first step that needs it; stops what it started."""

    def __init__(self) -> None:
        self.started = False

    def ensure(self) -> None:
        import ray

        from sp_ray.train.ray_train import init_ray

        if not ray.is_initialized():
            init_ray()
            self.started = True

    def stop(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


def _in_ray_tasks(
    fn: Callable[..., Any], jobs: Sequence[dict[str, Any]], bar: tqdm | None = None, *, num_gpus: float = 0
) -> list[Any]:
    """``fn(**job)`` for every job as Ray tasks of one CPU (and ``num_gpus``) each, as many at once as Ray
    has room for, in order. With ``bar``, it advances by one per finished job.
    """
    import ray

    remote = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=0)(fn)
    refs = [remote.remote(**job) for job in jobs]
    pending = list(refs)
    while pending:
        finished, pending = ray.wait(pending, timeout=1.0)
        ray.get(finished)  # raises a failed task's error now, not after the others
        if bar is not None and finished:
            bar.update(len(finished))
    return ray.get(refs)


def _finetune_job(cfg: Config, work_dir: str, init: str | None) -> str:
    import torch

    from sp_ray.train.loop import fit

    torch.set_num_threads(1)
    # fit appends to metrics.jsonl: a run that was interrupted starts over in an empty folder.
    shutil.rmtree(work_dir, ignore_errors=True)
    return str(fit(cfg, work_dir, init=init))


def _evaluate_job(checkpoint: str, annotations: str, images: str, out: str, use_gpu: bool) -> None:
    import torch

    from sp_ray.evaluation.coco_eval import evaluate_checkpoint
    from sp_ray.evaluation.per_category import write_category_report

    torch.set_num_threads(1)
    metrics, results = evaluate_checkpoint(checkpoint, annotations=annotations, images=images, use_gpu=use_gpu,
                                           per_category=True)
    # As `sp-ray evaluate` writes them: the per-category table and precision-recall PNGs next to metrics.json.
    metrics["per_category"] = write_category_report(metrics.pop("per_category"), out,
                                                    source=f"{checkpoint} on {annotations}")
    write_json(Path(out).with_name("predictions.json"), results)
    write_json(Path(out), metrics)


def _export_job(checkpoint: str, out: str, size: int) -> dict[str, Any]:
    import torch

    from export.exporter.onnx_export import export_checkpoint

    torch.set_num_threads(1)
    start = time.perf_counter()
    result = export_checkpoint(checkpoint, out, input_size=(size, size), batch_size=1)
    return {"path": str(result.path), "family": result.info.family, "seconds": round(time.perf_counter() - start, 1),
            "parity": {**dataclasses.asdict(result.parity), "passed": result.parity.passed,
                       "summary": result.parity.summary()}}


def build_steps(layout: Layout, settings: RunSettings, ray_session: LocalRay) -> list[Step]:
    """The pipeline: every step's outputs, what a forced run removes, and what it runs.

    The steps read their configs from ``OUT/configs`` (`write_configs` writes them first).
    """
    runs = fine_tuning_runs(settings)
    gpus = 1 if settings.use_gpu else 0

    def data() -> None:
        from sp_ray.run.data import prepare_synthetic_data, prepare_user_data

        if isinstance(settings.data, SyntheticData):
            prepare_synthetic_data(settings.data.num_images, settings.data.image_size, layout)
        else:
            prepare_user_data(settings.data, layout)

    def splits() -> None:
        from sp_ray.data.split import split_fractions

        split_fractions(layout.train_json, sorted(settings.fractions), seed=settings.split_seed,
                        out_dir=layout.splits)

    def ssl() -> None:
        from sp_ray.densecl.train import train_densecl

        shutil.rmtree(layout.ssl, ignore_errors=True)  # an interrupted run starts over
        cfg = load_config(layout.config("ssl"))
        # DenseCL is the one step that runs alone (before Ray starts, nothing else is busy), so it takes
        # every core; the steps after it run one-thread jobs side by side.
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            with progress("DenseCL epochs", cfg.ssl.epochs, lambda: count_lines(layout.ssl / "metrics.jsonl")):
                train_densecl(cfg, layout.unlabeled, layout.ssl)
        finally:
            torch.set_num_threads(1)

    def propose() -> None:
        from sp_ray.evaluation.proposal_quality import pseudo_mask_recall
        from sp_ray.pretrain.propose import propose as propose_masks

        ray_session.ensure()
        cfg = load_config(layout.config("propose"))
        pool = _read(layout.data_summary)["unlabeled"]
        shards = math.ceil(pool["images"] / cfg.propose.shard_size)
        with progress("proposal shards", shards, lambda: len(list((layout.pseudo / "shards").glob("[0-9]*.json")))):
            summary = propose_masks(layout.unlabeled, layout.pseudo, cfg)
        if not pool["folders"]:  # the pool is the labeled train images: their ground truth measures the masks
            recall = pseudo_mask_recall(summary["annotations_path"], layout.train_json, thresholds=(0.5, 0.75))
            summary["recall"] = {"instances": recall.instances, "mean_best_iou": recall.mean_best_iou,
                                 **{f"{t:g}": value for t, value in recall.recall.items()}}
        write_json(layout.pseudo_summary, summary)

    def pretrain() -> None:
        from sp_ray.train.ray_train import run_training

        ray_session.ensure()
        shutil.rmtree(layout.pretrain, ignore_errors=True)
        cfg = load_config(layout.config("pretrain"))
        epochs_logged = lambda: count_lines(layout.pretrain / "metrics.jsonl")  # noqa: E731
        with progress("SP pre-training epochs", cfg.train.epochs, epochs_logged):
            run_training(cfg, layout.pretrain, run_name="sp-pretrain", task="pretrain")

    def finetune() -> None:
        ray_session.ensure()
        to_run = [run for run in runs if not (layout.run(run) / "final" / "meta.json").is_file()]
        configs = {run: load_config(layout.run_config(run)) for run in to_run}
        # Longest first (Mask R-CNN, then the larger fractions), so the CPUs finish together.
        to_run.sort(key=lambda run: (run.variant != "maskrcnn", -run.fraction))
        total = sum(cfg.train.epochs for cfg in configs.values())
        with progress(f"fine-tuning epochs ({len(to_run)} runs)", total,
                      lambda: sum(count_lines(layout.run(run) / "metrics.jsonl") for run in to_run)):
            init = {run: run_init(layout, run) for run in to_run}
            if settings.use_gpu:
                _finetune_on_gpus(layout, settings, to_run, configs, init)
            else:
                _in_ray_tasks(_finetune_job, [{"cfg": configs[run], "work_dir": str(layout.run(run)),
                                               "init": str(init[run]) if init[run] else None} for run in to_run])

    def evaluate() -> None:
        ray_session.ensure()
        to_run = [run for run in runs if not layout.metrics(run).is_file()]
        to_run.sort(key=lambda run: run.variant != "maskrcnn")
        with progress("evaluated checkpoints", len(to_run), unit="model") as bar:
            _in_ray_tasks(_evaluate_job, [{
                "checkpoint": str(layout.run(run) / "final"), "annotations": str(layout.val_json),
                "images": str(layout.val_images), "out": str(layout.metrics(run)), "use_gpu": settings.use_gpu,
            } for run in to_run], bar, num_gpus=gpus)

    def kernels() -> None:
        from sp_ray.evaluation.kernel_analysis import analyze_kernels

        checkpoints = kernel_checkpoints(layout, settings)
        with progress("kernel grids", len(checkpoints), unit="model") as bar:
            for name, checkpoint in checkpoints.items():
                analyze_kernels(checkpoint, layout.val_json, layout.kernels / f"{name}.png",
                                image_root=layout.val_images, num_images=settings.kernel_images)
                bar.update()

    def export() -> None:
        ray_session.ensure()
        exported = exported_runs(settings)
        size = export_size(layout, settings)
        with progress("ONNX exports (with parity)", len(exported), unit="model") as bar:
            results = _in_ray_tasks(_export_job, [
                {"checkpoint": str(layout.run(run) / "final"), "out": str(layout.onnx(run)), "size": size}
                for run in exported], bar)
        summary = {run.name: result for run, result in zip(exported, results, strict=True)}
        write_json(layout.export / "export.json", summary)

    def onnx() -> None:
        onnx_predictions(layout, settings)

    def throughput() -> None:
        measure_throughput(layout, settings)

    def report() -> None:
        from sp_ray.run.report.run_report import write_run_report

        write_run_report(layout, settings, reproduce_commands(layout, settings))

    main = main_run(settings)
    baseline = ", with the baseline" if settings.baseline else ""
    data_summary = ("synthetic shapes dataset" if isinstance(settings.data, SyntheticData) else
                    "the labeled set checked, val held out or checked, the unlabeled pool linked")
    steps = [
        Step("data", data_summary, (layout.data_summary,), (layout.data,), data),
        Step("splits", "labeled fractions of train", tuple(layout.split(f, settings.split_seed)
                                                           for f in settings.fractions), (layout.splits,), splits),
    ]
    if settings.runs_ssl:
        steps.append(Step("ssl", "DenseCL self-supervised backbone on the unlabeled pool", (layout.backbone,),
                          (layout.ssl,), ssl))
    steps += [
        Step("propose", "saliency pseudo masks of the unlabeled pool (Ray Data)", (layout.pseudo_summary,),
             (layout.pseudo,), propose),
        Step("pretrain", f"SP pre-training ({settings.pretrain_workers} Ray Train workers)",
             (layout.pretrain / "final" / "meta.json",), (layout.pretrain,), pretrain),
        Step("finetune", f"{len(runs)} fine-tuning runs" + (" (Ray Train)" if settings.use_gpu else " as Ray tasks"),
             tuple(layout.run(run) / "final" / "meta.json" for run in runs), (layout.finetune,), finetune),
        Step("evaluate", "COCO AP on val of every run, per category too",
             tuple(layout.metrics(run) for run in runs), (layout.eval,), evaluate),
        Step("kernels", "kernel analysis grids",
             tuple(layout.kernels / f"{name}.png" for name in kernel_checkpoints(layout, settings)),
             (layout.kernels,), kernels),
        Step("export", "ONNX export with parity", (layout.export / "export.json",), (layout.export,), export),
        Step("onnx", "onnxruntime: AP on val, predictions on sample val images",
             (layout.onnx_eval / main.name / "metrics.json", layout.onnx_eval / "samples.json"),
             (layout.onnx_eval,), onnx),
        Step("throughput", f"onnxruntime images/s{baseline}", (layout.throughput,), (layout.throughput,),
             throughput),
        Step("report", "report.html and report.md", (layout.root / "report.html", layout.root / "report.md"),
             (layout.figures, layout.root / "report.html", layout.root / "report.md"), report),
    ]
    return steps


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def _finetune_on_gpus(
    layout: Layout, settings: RunSettings, runs: Sequence[Run], configs: dict[Run, Config],
    init: dict[Run, Path | None],
) -> None:
    """One run after the other, each in ``pretrain_workers`` Ray Train workers of one GPU each."""
    from sp_ray.train.ray_train import run_training

    for run in runs:
        shutil.rmtree(layout.run(run), ignore_errors=True)
        cfg = dataclasses.replace(configs[run], train=dataclasses.replace(
            configs[run].train, num_workers=settings.pretrain_workers, use_gpu=True))
        run_training(cfg, layout.run(run), init=str(init[run]) if init[run] else None, run_name=run.name,
                     task="finetune")


def sample_val_images(layout: Layout, settings: RunSettings) -> list[dict[str, Any]]:
    """The first ``sample_images`` val image entries (id, file_name, height, width)."""
    from sp_ray.data.coco import read_coco_json

    return read_coco_json(layout.val_json)["images"][: settings.sample_images]


def onnx_predictions(layout: Layout, settings: RunSettings) -> None:
    """The main model's val AP through onnxruntime, and every exported model's instances on sample val images."""
    from export.runtime import Segmenter
    from sp_ray.data.images import load_image_rgb
    from sp_ray.evaluation.coco_eval import evaluate_onnx

    providers = ["CPUExecutionProvider"]
    exported = exported_runs(settings)
    main = exported[0]
    samples = sample_val_images(layout, settings)
    with progress("onnxruntime", 1 + len(exported), unit="task") as bar:
        metrics, results = evaluate_onnx(str(layout.onnx(main)), annotations=str(layout.val_json),
                                         images=str(layout.val_images), providers=providers,
                                         threads=settings.onnx_threads)
        write_json(layout.onnx_eval / main.name / "predictions.json", results)
        write_json(layout.onnx_eval / main.name / "metrics.json", metrics)
        bar.update()
        drawn: dict[str, Any] = {}
        for run in exported:
            segmenter = Segmenter(layout.onnx(run), providers=providers, threads=settings.onnx_threads)
            drawn[run.name] = []
            for image in samples:
                found = segmenter.predict(load_image_rgb(layout.val_images / image["file_name"]), rle=True)
                drawn[run.name].append({
                    "file_name": image["file_name"], "scores": found.scores.tolist(),
                    "category_ids": found.category_ids.tolist(), "boxes": found.boxes.tolist(), "rles": found.rles,
                })
            bar.update()
    write_json(layout.onnx_eval / "samples.json", drawn)


def measure_throughput(layout: Layout, settings: RunSettings) -> None:
    """onnxruntime images/s of the exported models, one image per call, calls interleaved; see `time_interleaved`."""
    import onnxruntime

    from export.runtime import Segmenter
    from sp_ray.data.images import load_image_rgb
    from sp_ray.evaluation.timing import time_interleaved

    images = [load_image_rgb(layout.val_images / image["file_name"]) for image in sample_val_images(layout, settings)]
    calls = {}
    for run in exported_runs(settings):
        segmenter = Segmenter(layout.onnx(run), providers=["CPUExecutionProvider"], threads=settings.onnx_threads)
        cycle = iter(range(10**9))
        calls[run.name] = (lambda s=segmenter, c=cycle: s.predict(images[next(c) % len(images)]))
    rounds = settings.throughput_warmup + settings.throughput_repeats
    load_before = os.getloadavg()
    with progress("throughput rounds", rounds, unit="round") as bar:
        timings = time_interleaved(calls, repeats=settings.throughput_repeats, warmup=settings.throughput_warmup,
                                   on_repeat=lambda _: bar.update())
    write_json(layout.throughput, {
        "what": "Segmenter.predict end to end (resize, graph, masks at image size), one image per call",
        "image_size": export_size(layout, settings), "threads": settings.onnx_threads,
        "warmup": settings.throughput_warmup, "repeats": settings.throughput_repeats,
        "onnxruntime": onnxruntime.__version__, "cpu": cpu_name(), "cores": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "models": {name: timing.summary() for name, timing in timings.items()},
    })


def check_inputs(settings: RunSettings) -> None:
    """What fails before any step: the user's data, the given backbone file.

    Raises:
        UserError: naming the input and what to do.
    """
    from sp_ray.errors import UserError
    from sp_ray.run.data import check_user_data

    if settings.backbone_weights is not None and not settings.backbone_weights.is_file():
        raise UserError(f"--backbone-weights {settings.backbone_weights} is not a file; give a ResNet state dict "
                        "(e.g. the backbone.pth of 'sp-ray ssl')")
    if not isinstance(settings.data, SyntheticData):
        check_user_data(settings.data)


def write_configs(layout: Layout, settings: RunSettings) -> list[str]:
    """Write every step's resolved config to ``OUT/configs``; returns the steps whose config changed since the
    last run (they are redone: their outputs were computed with other settings)."""
    changed = []
    for path, text in config_texts(layout, settings).items():
        if path.is_file() and path.read_text() != text:
            step = "finetune" if path.stem.startswith("finetune_") else path.stem
            log.info("%s changed since the last run: the %s step is redone", path, step)
            changed.append(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return changed


def run_pipeline(
    out: str | Path, settings: RunSettings, *, force: bool = False, redo: Sequence[str] = (),
) -> list[StepRecord]:
    """Run the pipeline of ``settings`` under ``out`` and write ``out/report.html`` and ``out/report.md``.

    Args:
        out: output folder.
        settings: the data, preset, variants and schedules.
        force: redo every step.
        redo: redo these steps and every step after them.

    Returns:
        One `StepRecord` per step ("ran" or "skipped"), in pipeline order.

    Raises:
        UserError: the data is unusable (before any step runs).
        sp_ray.config.ConfigError: an override names no key of a config.
    """
    check_inputs(settings)
    layout = Layout.of(out, settings)
    layout.root.mkdir(parents=True, exist_ok=True)
    ray_session = LocalRay()
    start = time.perf_counter()
    changed = write_configs(layout, settings)
    # One torch thread in this process too (kernel analysis; DenseCL, which runs alone, sets its own), as in
    # every Ray task and worker: the cores are used by one job each, and several threads per job on
    # shared cores spin against each other (DenseCL ran 20x slower with two threads next to two other busy
    # processes).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = build_steps(layout, settings, ray_session)
        redo = [*redo, *(name for name in changed if name not in redo)]
        records = run_steps(steps, force=force, redo=redo, record=layout.steps)
    finally:
        torch.set_num_threads(threads)
        ray_session.stop()
    ran = [r for r in records if r.status == "ran"]
    log.info("%d steps ran, %d skipped, %.0f s; report: %s", len(ran), len(records) - len(ran),
             time.perf_counter() - start, layout.root / "report.html")
    return records
