"""The Ray Data callable class of ``sp-ray predict``: one ``Segmenter`` per actor, one shard per call.

Torch-free on purpose (export.runtime, numpy, PIL, av): an actor's process loads onnxruntime and the
model, nothing of training. It returns what it computed instead of writing it, so the driver alone
writes DIR and a shard is written once, whatever actor restarts and task retries happened.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from export.coco_results import coco_result
from export.providers import GpuSettings
from export.runtime import Instances, Segmenter, input_size_for
from sp_ray.data.images import UnusableImageError, load_image_rgb
from sp_ray.predict.overlays import draw_instances, png_bytes
from sp_ray.predict.video import SegmentEncoder, read_frames

# Skip reasons besides the image readers' (sp_ray.data.images.UNREADABLE / TOO_LARGE).
UNPREDICTABLE = "image the model cannot take"
PREDICTION_FAILED = "prediction failed"
FRAME_UNDECODABLE = "video frame did not decode"


def coco_results(image_id: int, found: Instances) -> list[dict[str, Any]]:
    """One image's instances (the runtime's output with ``rles``, ``rle=True``) as COCO result dicts."""
    return [{"image_id": int(image_id), **coco_result(category, score, box, rle)}
            for score, category, rle, box in zip(found.scores, found.category_ids, found.rles or [], found.boxes,
                                                 strict=True)]


def _skip(item: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    """A skipped.json entry: id, file_name, path (and frame_index of a video frame), reason, detail."""
    frame = {"frame_index": item["frame_index"]} if "frame_index" in item else {}
    return {"id": item["id"], "file_name": item["file_name"], "path": item["path"], **frame, "reason": reason,
            "detail": detail}


class PredictActor:
    """Holds one onnxruntime session; ``__call__`` predicts whole shards.

    Args:
        model: path of the .onnx file (visible from every node).
        threads: intra-op threads of the CPU provider.
        gpu: the settings of the GPU providers, with which the runtime picks CUDA / TensorRT (the actor
            reserved a GPU); None: the CPU provider.
        score_threshold: keep instances above it (None: the model's).
        batch_size: images per graph run.
        overlays: return a PNG of each image with its instances drawn.
    """

    def __init__(self, model: str, threads: int, gpu: GpuSettings | None, score_threshold: float | None,
                 batch_size: int, overlays: bool) -> None:
        self.segmenter = Segmenter(model, providers=None if gpu else ["CPUExecutionProvider"], threads=threads,
                                   gpu=gpu)
        self.score_threshold = score_threshold
        self.batch_size = batch_size
        self.overlays = overlays

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows {"shard", "task" (json)} in; rows {"shard", "record" (json), "payload" (bytes)} out.

        ``record`` holds the shard's images, predictions, skipped inputs and ``blob_sizes``: the lengths
        of the blobs (overlay PNGs, or the video segment) concatenated in ``payload``.
        """
        shards, records, payloads = [], [], []
        for shard, task in zip(batch["shard"], batch["task"], strict=True):
            task = json.loads(str(task))
            wall, cpu = time.perf_counter(), time.process_time()
            record, blobs = self.predict_video(task) if task["kind"] == "video" else self.predict_images(task)
            record["blob_sizes"] = [len(blob) for blob in blobs]
            record["actor_pid"] = os.getpid()  # which process computed the shard, kept in its shard file
            # Wall and CPU seconds of the shard in the actor: their ratio is the share of a core the actor got.
            record["seconds"] = round(time.perf_counter() - wall, 4)
            record["cpu_seconds"] = round(time.process_time() - cpu, 4)
            shards.append(int(shard))
            records.append(json.dumps(record))
            payloads.append(b"".join(blobs))
        return {"shard": np.asarray(shards, np.int64), "record": np.asarray(records, dtype=object),
                "payload": np.asarray(payloads, dtype=object)}

    def predict_images(self, task: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
        """Decode, predict and (with overlays) draw the shard's images; undecodable ones are skipped."""
        images, predictions, skipped, names, blobs = [], [], [], [], []
        decoded = []
        for item in task["inputs"]:
            try:
                pixels = load_image_rgb(item["path"], max_pixels=self.segmenter.max_image_pixels)
                input_size_for(pixels.shape[0], pixels.shape[1], self.segmenter.info)
            except UnusableImageError as err:
                skipped.append(_skip(item, err.reason, str(err)))
            except ValueError as err:  # e.g. too elongated for the model's resize
                skipped.append(_skip(item, UNPREDICTABLE, f"{item['path']}: {err}"))
            else:
                decoded.append((item, pixels))
        for start in range(0, len(decoded), self.batch_size):
            chunk = decoded[start : start + self.batch_size]
            for (item, pixels), found in zip(chunk, self._predict(chunk, skipped), strict=True):
                if found is None:
                    continue
                images.append({"id": item["id"], "file_name": item["file_name"], "path": item["path"],
                               "height": int(pixels.shape[0]), "width": int(pixels.shape[1])})
                predictions.extend(coco_results(item["id"], found))
                if self.overlays:
                    names.append(item["overlay"])
                    blobs.append(png_bytes(draw_instances(pixels, found, self.segmenter.class_names)))
        skipped.sort(key=lambda entry: entry["id"])
        return {"images": images, "predictions": predictions, "skipped": skipped, "overlays": names}, blobs

    def predict_video(self, task: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
        """Predict the shard's frames and encode them, annotated, into one MP4 segment."""
        inputs = [{**item, "file_name": task["file_name"], "path": task["video"]} for item in task["inputs"]]
        by_pts = {item["pts"]: item for item in inputs}
        encoder = SegmentEncoder(Fraction(task["fps"]))
        images, predictions, done = [], [], set()
        pending: list[tuple[dict[str, Any], np.ndarray]] = []

        def flush() -> None:
            for (item, pixels), found in zip(pending, self._predict(pending, skipped), strict=True):
                done.add(item["id"])
                if found is None:
                    encoder.add(pixels)  # the frame stays in the video, unannotated; it is listed in skipped
                    continue
                images.append({"id": item["id"], "file_name": task["file_name"], "path": task["video"],
                               "frame_index": item["frame_index"], "height": int(pixels.shape[0]),
                               "width": int(pixels.shape[1])})
                for result in coco_results(item["id"], found):
                    predictions.append({**result, "frame_index": item["frame_index"]})
                encoder.add(draw_instances(pixels, found, self.segmenter.class_names))
            pending.clear()

        skipped: list[dict[str, Any]] = []
        try:
            for pts, pixels in read_frames(task["video"], [item["pts"] for item in inputs]):
                pending.append((by_pts[pts], pixels))
                if len(pending) == self.batch_size:
                    flush()
            flush()
        except (OSError, ValueError) as err:  # FFmpeg's errors are OSErrors; the frames after it are lost
            detail = f"{task['video']}: {type(err).__name__}: {err}"
            skipped.extend(_skip(item, FRAME_UNDECODABLE, detail) for item in inputs if item["id"] not in done)
            done.update(item["id"] for item in inputs)
        for item in inputs:
            if item["id"] not in done:
                skipped.append(_skip(item, FRAME_UNDECODABLE, f"{task['video']}: no frame with pts {item['pts']}"))
        skipped.sort(key=lambda entry: entry["id"])
        segment = encoder.finish()
        return {"images": images, "predictions": predictions, "skipped": skipped, "overlays": [],
                "frames": encoder.frames}, [segment] if segment else []

    def _predict(self, chunk: Sequence[tuple[dict[str, Any], np.ndarray]],
                 skipped: list[dict[str, Any]]) -> list[Instances | None]:
        """Instances of each image of a chunk; an image the runtime fails on is skipped (None), not the chunk."""
        if not chunk:
            return []
        pixels = [p for _, p in chunk]
        try:
            return self.segmenter.predict_batch(pixels, score_threshold=self.score_threshold, rle=True,
                                                batch_size=len(pixels))
        except Exception:  # noqa: BLE001 - find the image that fails, one at a time below
            pass
        found: list[Instances | None] = []
        for item, image in chunk:
            try:
                found.append(self.segmenter.predict(image, score_threshold=self.score_threshold, rle=True))
            except Exception as err:  # noqa: BLE001 - an input the runtime cannot take is skipped and listed
                skipped.append(_skip(item, PREDICTION_FAILED, f"{item['path']}: {type(err).__name__}: {err}"))
                found.append(None)
        return found
