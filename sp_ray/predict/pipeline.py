"""``sp-ray predict``: an exported model over images, a folder, a glob, a list of paths or a video, as a
Ray Data job (``map_batches`` over shards with a pool of `PredictActor`s, one onnxruntime session each).

The driver resolves the source (`resolve_source`), cuts the inputs into shards of ``shard_size``
(frames, for a video), runs the shards that are not done on the actor pool, and writes each shard as
it comes back (`write_shard`); finally it merges all shards into DIR:

- ``images.json``: {"source", "root", "model", "categories", "images": [{"id", "file_name", "path",
  "height", "width"} (+ "frame_index" for a video)]}, the ids the predictions use; a COCO json without
  annotations, so ``COCO("images.json").loadRes("predictions.json")`` loads the results;
- ``predictions.json``: COCO results (image_id, category_id, segmentation as compressed RLE, bbox
  xywh, score; + frame_index for a video);
- ``skipped.json``: {"count", "reasons": {reason: count}, "skipped": [{"id", "file_name", "path",
  "reason", "detail"}]}: inputs that did not decode or that the model could not take;
- ``overlays/<file_name with a .png suffix>`` with ``overlays`` (see `resolve_source`);
  ``<video stem>.annotated.mp4`` for a video.

Actors are restarted by Ray when their process dies and the shard they held is run again (Ray
Data's actor pools set ``max_restarts=-1`` and ``max_task_retries=-1``), so a killed actor costs
time, not results; the driver writes each shard once. The actors
read the inputs by path, so on a cluster the source must be on storage every node sees; DIR is
written by the driver only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from export.providers import GpuSettings
from sp_ray.errors import UserError
from sp_ray.onnx_model import read_model_info
from sp_ray.predict.shards import (
    SHARDS,
    file_digest,
    fingerprint,
    merge_shards,
    read_shard,
    shard_path,
    write_json,
    write_shard,
)
from sp_ray.predict.sources import Source, resolve_source

log = logging.getLogger("sp_ray.predict")

VIDEO_UNREADABLE = "missing or unreadable video file"


@dataclass(frozen=True)
class PredictOptions:
    """The settings of one ``sp-ray predict`` run (the command's options).

    Attributes:
        model: the .onnx file of ``sp-ray export``.
        source: see `resolve_source`.
        out: the output folder DIR.
        num_actors: actors in the pool (each one onnxruntime session).
        threads: intra-op threads per actor (and the CPUs each actor reserves).
        batch_size: images per graph run inside an actor (results can differ in the last digits between
            batch sizes, since images of a batch are padded to a common size).
        shard_size: inputs per shard: the unit of work of an actor, of writing and of ``resume``.
        score_threshold: keep instances with a score above it (None: the model's own).
        overlays: write one image per input with its instances drawn.
        gpu: one GPU per actor, onnxruntime on CUDA / TensorRT.
        resume: keep the finished shards of an earlier run into ``out`` with the same settings.
        trt_cache: with ``gpu``: folder of TensorRT's engine cache (``export.providers.GpuSettings``),
            where every actor of a node finds the engine the first one built.
        trt_fp16: with ``gpu``: TensorRT may compute in fp16.
    """

    model: str
    source: str
    out: str
    num_actors: int = 1
    threads: int = 1
    batch_size: int = 1
    shard_size: int = 64
    score_threshold: float | None = None
    overlays: bool = False
    gpu: bool = False
    resume: bool = False
    trt_cache: str | None = None
    trt_fp16: bool = False

    def gpu_settings(self) -> GpuSettings | None:
        """The actors' ``GpuSettings`` (None without ``gpu``): TensorRT's profile covers ``batch_size``.

        Raises:
            UserError: TensorRT options without ``gpu``, or a bad value (the message names the option).
        """
        if not self.gpu:
            if self.trt_cache is not None or self.trt_fp16:
                raise UserError("--trt-cache and --trt-fp16 are options of onnxruntime's TensorRT provider: "
                                "give them with --gpu")
            return None
        try:
            return GpuSettings(trt_cache_dir=self.trt_cache, trt_fp16=self.trt_fp16,
                               trt_max_batch=max(1, self.batch_size))
        except ValueError as err:
            raise UserError(str(err)) from None


def check_options(options: PredictOptions) -> None:
    """Check the counts, the threshold and the output folder before anything is read.

    Raises:
        UserError: a count below 1, a score threshold outside [0, 1], an output path that is a file, an
            output folder that holds another run while ``resume`` is off, or bad TensorRT options.
    """
    for flag, value in (("--num-actors", options.num_actors), ("--threads", options.threads),
                        ("--batch-size", options.batch_size), ("--shard-size", options.shard_size)):
        if value < 1:
            raise UserError(f"{flag} {value}: it must be >= 1")
    options.gpu_settings()
    threshold = options.score_threshold
    if threshold is not None and not (0 <= threshold <= 1 and math.isfinite(threshold)):
        raise UserError(f"--score-threshold {threshold}: scores are probabilities, give a value in [0, 1]")
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder (it is created if missing)")
    shards = out / SHARDS
    if not options.resume and shards.is_dir() and any(shards.iterdir()):
        raise UserError(f"--out {out} holds the shards of an earlier run; continue it with --resume or choose "
                        "another --out")


def build_tasks(source: Source, shard_size: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Cut the inputs into shard tasks.

    Returns:
        (tasks, unreadable): one task per shard ({"kind": "images", "inputs": [...]} or {"kind": "video",
        "video", "file_name", "fps", "inputs": [{"id", "frame_index", "pts"}]}), and the skipped.json
        entry of a video that does not open (then there are no tasks).
    """
    if source.kind == "images":
        items = source.images
        return [{"kind": "images", "inputs": items[i : i + shard_size]} for i in range(0, len(items), shard_size)], []
    from sp_ray.predict.video import probe_video  # av, for videos only

    video = source.video
    file_name = video.name
    try:
        info = probe_video(video)
    except (OSError, ValueError) as err:  # FFmpeg's errors are OSErrors
        return [], [{"id": 1, "file_name": file_name, "path": str(video), "reason": VIDEO_UNREADABLE,
                     "detail": f"{video}: {type(err).__name__}: {err}"}]
    frames = [{"id": i + 1, "frame_index": i, "pts": pts} for i, pts in enumerate(info.frame_pts)]
    fps = f"{info.fps.numerator}/{info.fps.denominator}"
    return [{"kind": "video", "video": str(video), "file_name": file_name, "fps": fps,
             "inputs": frames[i : i + shard_size]} for i in range(0, len(frames), shard_size)], []


def predict(options: PredictOptions) -> dict[str, Any]:
    """Run ``sp-ray predict``; see the module docstring for what DIR holds.

    Returns:
        Summary: inputs, images (predicted), instances, skipped, skipped_reasons, shards,
        shards_computed, shards_reused, seconds and images_per_s of the Ray stage (Ray's start when
        this call starts it and the actors' start-up included; None when every shard was done), and
        the paths written.

    Raises:
        UserError: see `check_options`, `resolve_source` and `read_model_info`; more actors than the
            cluster can hold.
    """
    check_options(options)
    source = resolve_source(options.source)
    info = read_model_info(options.model)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks, unreadable = build_tasks(source, options.shard_size)
    settings = {"model_sha256": file_digest(options.model), "score_threshold": options.score_threshold,
                "batch_size": options.batch_size, "overlays": options.overlays}
    if options.gpu and options.trt_fp16:
        settings["trt_fp16"] = True  # fp16 results differ; added only when set, so other runs keep their fingerprint
    fingerprints = [fingerprint(settings, task) for task in tasks]
    pending = [i for i in range(len(tasks)) if not (options.resume and read_shard(out, i, fingerprints[i]))]
    inputs = sum(len(task["inputs"]) for task in tasks)
    log.info("predict: %d inputs in %d shards, %d done before, %d to compute", inputs, len(tasks),
             len(tasks) - len(pending), len(pending))
    seconds = 0.0
    if pending:
        start = time.perf_counter()
        _run(options, out, {i: tasks[i] for i in pending}, fingerprints,
             done=inputs - sum(len(tasks[i]["inputs"]) for i in pending), total=inputs)
        seconds = time.perf_counter() - start
    header = {"source": options.source, "root": str(source.root), "model": os.path.abspath(options.model),
              "categories": [{"id": c, "name": n} for c, n in zip(info.cat_ids, info.class_names, strict=True)]}
    merged = merge_shards(out, fingerprints, header)
    if unreadable:
        merged["skipped"] += len(unreadable)
        merged["skipped_reasons"] = {VIDEO_UNREADABLE: len(unreadable)}
        write_json(out / "skipped.json", {"count": len(unreadable), "reasons": merged["skipped_reasons"],
                                          "skipped": unreadable})
    segments = merged.pop("segments")
    paths = {f"{name}_json": str(out / f"{name}.json") for name in ("images", "predictions", "skipped")}
    if source.kind == "video" and any(segments):
        from sp_ray.predict.video import join_segments  # av, for videos only

        video_out = out / f"{source.video.stem}.annotated.mp4"
        parts = [shard_path(out, i, ".mp4") for i, has_segment in enumerate(segments) if has_segment]
        merged["annotated_frames"] = join_segments(parts, video_out, Fraction(tasks[0]["fps"]))
        paths["annotated_video"] = str(video_out)
    if options.overlays and source.kind == "images":
        paths["overlays"] = str(out / "overlays")
    if merged["skipped"]:
        log.warning("predict: skipped %d of %d inputs (%s); they are listed in %s", merged["skipped"],
                    max(inputs, len(unreadable)),
                    "; ".join(f"{r}: {c}" for r, c in merged["skipped_reasons"].items()), paths["skipped_json"])
    computed = sum(len(tasks[i]["inputs"]) for i in pending)
    return {"inputs": max(inputs, len(unreadable)), **merged, "shards": len(tasks), "shards_computed": len(pending),
            "shards_reused": len(tasks) - len(pending), "seconds": round(seconds, 3),
            "images_per_s": round(computed / seconds, 3) if pending and seconds > 0 else None, **paths}


def _run(options: PredictOptions, out: Path, pending: dict[int, dict[str, Any]], fingerprints: list[str], *,
         done: int, total: int) -> None:
    """Run the pending shards on the actor pool and write each one as it arrives."""
    import ray
    import ray.data
    from tqdm import tqdm

    from sp_ray.predict.actor import PredictActor

    if not ray.is_initialized():
        ray.init(include_dashboard=False)  # joins RAY_ADDRESS (ray job submit sets it), else a local Ray
    actors = min(options.num_actors, len(pending))
    _check_resources(ray.cluster_resources(), actors, options)
    rows = [{"shard": index, "task": json.dumps(task)} for index, task in pending.items()]
    context = ray.data.DataContext.get_current()
    previous = context.enable_progress_bars
    context.enable_progress_bars = False  # ours counts images; Ray's counts blocks
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        PredictActor,
        fn_constructor_kwargs={"model": os.path.abspath(options.model), "threads": options.threads,
                               "gpu": options.gpu_settings(), "score_threshold": options.score_threshold,
                               "batch_size": options.batch_size, "overlays": options.overlays},
        batch_size=1,
        # One shard at a time per actor: a shard is seconds of work, so a queue per actor would only leave one
        # actor idle at the end while another still holds queued shards.
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        num_cpus=options.threads,
        num_gpus=1 if options.gpu else 0,
        # No max_restarts / max_task_retries here: Ray Data's actor pools default to restarting a dead actor
        # and retrying its tasks without limit (-1, -1), and passing them (ray_remote_args) is deprecated.
    )
    written: set[int] = set()
    try:
        with tqdm(total=total, initial=done, unit=" images", desc="predict", dynamic_ncols=True) as bar:
            for row in dataset.iter_rows():
                index = int(row["shard"])
                if index in written:  # cannot happen with Ray's retries, which re-run failed tasks only
                    continue
                record = json.loads(str(row["record"]))
                write_shard(out, index, record, bytes(row["payload"]), fingerprint=fingerprints[index])
                written.add(index)
                bar.update(len(pending[index]["inputs"]))
    finally:
        context.enable_progress_bars = previous
    missing = sorted(set(pending) - written)
    if missing:
        raise RuntimeError(f"the Ray job returned without shards {missing[:5]}; rerun with --resume")


def _check_resources(resources: dict[str, float], actors: int, options: PredictOptions) -> None:
    """Refuse a pool the cluster cannot hold: Ray would wait for the missing actors forever."""
    cpus = resources.get("CPU", 0)
    if actors * options.threads > cpus:
        raise UserError(f"--num-actors {actors} x --threads {options.threads} needs {actors * options.threads} "
                        f"CPUs, the Ray cluster has {cpus:g}; lower one of them")
    gpus = resources.get("GPU", 0)
    if options.gpu and actors > gpus:
        raise UserError(f"--gpu with {actors} actors needs {actors} GPUs, the Ray cluster has {gpus:g}; lower "
                        "--num-actors or drop --gpu")

