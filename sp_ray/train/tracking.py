"""Experiment tracking of a training run: TensorBoard event files, an MLflow run and a W&B run, from rank 0.

Every training loop (``sp_ray.train.loop.fit``, ``sp_ray.densecl.train.train_densecl``) opens a `Tracker` with
`open_tracker` on every rank; only rank 0's writes anything, the others' methods do nothing. What is logged:

- TensorBoard (``train.tensorboard``, on by default), under ``WORK_DIR/tensorboard``, every scalar on the
  global-step axis: ``train/<loss term>`` and ``train/lr`` after every step (rank 0's own batch), and at the end
  of every epoch ``epoch/<loss term>``, ``epoch/lr``, ``epoch/images_per_second`` (means over all workers), and
  at every evaluation ``val/<segm|bbox>_<AP|AP50|...>`` and ``val/prediction_<i>``: the first `OVERLAY_IMAGES`
  val images with the predicted masks drawn.
- MLflow (``train.mlflow_tracking_uri``) through Ray's ``setup_mlflow``: the resolved config as parameters
  (flattened, ``train.lr``), each epoch's metrics with the epoch as step, and ``final/`` as the artifact
  folder ``final``. W&B (``train.wandb_project``) through ``setup_wandb`` the same way, when ``wandb`` is
  installed.

A run that continues (``--resume``, or Ray Train restarting the workers from the last reported checkpoint)
hides the TensorBoard events from the step it continues at on (``purge_step``), and logs to the same MLflow /
W&B run (its id is kept in ``WORK_DIR``). A fresh run in the same work dir starts the event files over, as it
does ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

from sp_ray.config import Config, config_to_dict
from sp_ray.data.images import UnusableImageError, load_image_rgb
from sp_ray.drawing.draw import draw_labels, instance_colors, overlay_masks
from sp_ray.errors import UserError

log = logging.getLogger("sp_ray")

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = ".mlflow_run_id"
WANDB_RUN_FILE = ".wandb_run_id"
MLFLOW_DEFAULT_EXPERIMENT = "sp-ray"
OVERLAY_IMAGES = 4  # val images drawn with their predictions at every evaluation
OVERLAY_MAX_INSTANCES = 20  # the highest-scoring predictions drawn per image
OVERLAY_MIN_SCORE = 0.3  # predictions below are not drawn (an untrained model would cover the image)
# Keys of the epoch metrics that are bookkeeping, not measurements.
NOT_METRICS = ("epoch", "step", "time")


def check_tracking(cfg: Config) -> None:
    """Raise a ``UserError`` when a tracking key of ``cfg`` asks for a package that is not installed.

    Raises:
        UserError: ``train.mlflow_tracking_uri`` without ``mlflow``, or ``train.wandb_project`` without ``wandb``.
    """
    require_package("mlflow", "train.mlflow_tracking_uri", cfg.train.mlflow_tracking_uri)
    require_package("wandb", "train.wandb_project", cfg.train.wandb_project)


INSTALL = {"mlflow": "pip install 'sp-ray[tracking]'", "wandb": "pip install wandb (not a dependency of sp-ray)"}


def require_package(package: str, key: str, value: str) -> None:
    """Raise a ``UserError`` naming ``key`` and how to install ``package`` when ``value`` is set and
    ``package`` does not import."""
    if not value:
        return
    try:
        importlib.import_module(package)
    except ImportError:
        raise UserError(f"{key} is set ({value}) but the {package} package is not installed: {INSTALL[package]}; "
                        f"or unset {key}") from None


def allow_file_store(uri: str) -> None:
    """Let MLflow (3.x) open a ``file:`` store: it refuses one unless ``MLFLOW_ALLOW_FILE_STORE`` is set, but
    such a URI is the user's explicit choice, and the one store the ``tracking`` extra (mlflow-skinny) can write
    without a database or a server."""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def flat_params(cfg: Config) -> dict[str, Any]:
    """The resolved config as ``{"section.key": value}`` (lists and dicts as their JSON text)."""
    return {f"{section}.{key}": json.dumps(value) if isinstance(value, list | dict) else value
            for section, values in config_to_dict(cfg).items() for key, value in values.items()}


def epoch_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of an epoch's metrics, without the bookkeeping keys (`NOT_METRICS`)."""
    return {k: float(v) for k, v in metrics.items()
            if k not in NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


@dataclass(frozen=True)
class OverlayImage:
    image_id: int
    path: Path


class PredictionOverlays:
    """The first `OVERLAY_IMAGES` images of a val json, drawn with the predictions made on them.

    The json is read once (at the first evaluation): its first images and the category names.
    """

    def __init__(self, annotations: str | Path, images: str | Path, *, count: int = OVERLAY_IMAGES) -> None:
        self.annotations, self.images, self.count = Path(annotations), Path(images), count
        self._chosen: list[OverlayImage] | None = None
        self._names: dict[int, str] = {}

    def _read(self) -> list[OverlayImage]:
        if self._chosen is None:
            data = json.loads(self.annotations.read_text())
            self._names = {int(c["id"]): str(c.get("name", c["id"])) for c in data.get("categories", [])}
            self._chosen = [OverlayImage(int(i["id"]), self.images / i["file_name"])
                            for i in data.get("images", [])[: self.count]]
        return self._chosen

    def draw(self, results: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        """One uint8 [H, W, 3] panel per chosen image that decodes: its predictions with score >=
        `OVERLAY_MIN_SCORE` (the `OVERLAY_MAX_INSTANCES` best) as masks, named and scored.

        Args:
            results: COCO result dicts (``image_id``, ``category_id``, ``score``, ``bbox`` xywh,
                ``segmentation`` RLE at the image's size), as ``sp_ray.evaluation.coco_eval.evaluate_model`` returns.
        """
        chosen = self._read()
        by_image: dict[int, list[Mapping[str, Any]]] = {item.image_id: [] for item in chosen}
        for result in results:
            if result["image_id"] in by_image and result["score"] >= OVERLAY_MIN_SCORE:
                by_image[result["image_id"]].append(result)
        panels = []
        for item in chosen:
            try:
                image = load_image_rgb(item.path)
            except UnusableImageError:
                continue  # left out of the evaluation too
            found = sorted(by_image[item.image_id], key=lambda r: -r["score"])[:OVERLAY_MAX_INSTANCES]
            masks = [mask_util.decode(r["segmentation"]).astype(bool) for r in found]
            masks = [m for m in masks if m.shape == image.shape[:2]]  # (H, W) each
            if len(masks) != len(found):
                found = found[: len(masks)] if masks else []
            colors = instance_colors(len(found))
            panel = overlay_masks(image, np.stack(masks), colors=colors) if found else image
            texts = [f"{self._names.get(int(r['category_id']), r['category_id'])} {r['score']:.2f}" for r in found]
            anchors = [(float(r["bbox"][0]), float(r["bbox"][1])) for r in found]
            panels.append(draw_labels(panel, anchors, texts, colors) if found else panel)
        return panels


class Tracker:
    """What a training loop logs to; every method is a no-op where nothing was opened (ranks > 0)."""

    def __init__(self, *, writer: Any = None, mlflow: Any = None, wandb: Any = None,
                 overlays: PredictionOverlays | None = None) -> None:
        self.writer, self.mlflow, self.wandb, self.overlays = writer, mlflow, wandb, overlays

    def log_step(self, step: int, losses: Mapping[str, float], lr: float) -> None:
        """After every optimisation step (the hot path: TensorBoard scalar writes only, queued to its thread)."""
        if self.writer is None:
            return
        for name, value in losses.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.add_scalar("train/lr", lr, step)

    def log_epoch(self, metrics: Mapping[str, Any], *, evaluated: Sequence[str] = ()) -> None:
        """At the end of an epoch: ``metrics`` as reported (``epoch``, ``step``, losses, ``lr``,
        ``images_per_second`` and the val AP keys ``evaluated`` when the epoch was evaluated)."""
        scalars = epoch_scalars(metrics)
        if self.writer is not None:
            for name, value in scalars.items():
                if name != "images":
                    self.writer.add_scalar(f"{'val' if name in evaluated else 'epoch'}/{name}", value, metrics["step"])
            self.writer.flush()  # an epoch's events are on disk when its metrics.jsonl line is
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, step=int(metrics["epoch"]))
        if self.wandb is not None:
            self.wandb.log({**scalars, "epoch": int(metrics["epoch"])})

    def log_predictions(self, step: int, results: Sequence[Mapping[str, Any]]) -> None:
        """After an evaluation: the overlays of `PredictionOverlays` as ``val/prediction_<i>`` images.

        Drawing is part of tracking, not of training: a failure is logged and training goes on."""
        if self.writer is None or self.overlays is None:
            return
        try:
            panels = self.overlays.draw(results)
        except Exception as err:  # a drawing must never cost the training
            log.warning("the prediction overlays of step %d were not drawn: %s: %s", step, type(err).__name__, err)
            return
        for index, panel in enumerate(panels):
            self.writer.add_image(f"val/prediction_{index}", panel, step, dataformats="HWC")

    def log_final(self, final: Path) -> None:
        """The final checkpoint folder as the run's ``final`` artifact (MLflow, W&B)."""
        if self.mlflow is not None:
            self.mlflow.log_artifacts(str(final), artifact_path="final")
        if self.wandb is not None:
            import wandb

            artifact = wandb.Artifact(f"{self.wandb.id}-final", type="model")
            artifact.add_dir(str(final))
            self.wandb.log_artifact(artifact)

    def close(self, *, failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)


@contextlib.contextmanager
def open_tracker(
    cfg: Config, work_dir: Path, *, rank: int, start_step: int, continued: bool, evaluated: bool = False,
) -> Iterator[Tracker]:
    """The run's `Tracker`: on rank 0 the writers the config asks for, elsewhere one that does nothing.

    Args:
        cfg: the resolved config (``train.tensorboard``, ``train.mlflow_*``, ``train.wandb_project``).
        work_dir: the run's output directory (``tensorboard/`` and the kept run ids go there).
        rank: this process's rank.
        start_step: the global step the run starts at (0, or the checkpoint's).
        continued: the run continues a checkpoint of this work dir: events from ``start_step`` on are hidden,
            and the MLflow / W&B run of the work dir goes on.
        evaluated: the run has a val set (``data.val_annotations``): prediction overlays are drawn from it.

    The tracker is closed on leaving, its MLflow / W&B run marked failed when an exception leaves.
    """
    if rank != 0:
        yield Tracker()
        return
    check_tracking(cfg)
    tracker = Tracker(
        writer=_tensorboard_writer(work_dir, start_step, continued) if cfg.train.tensorboard else None,
        overlays=PredictionOverlays(cfg.data.val_annotations, cfg.data.val_images) if evaluated else None,
    )
    try:
        if cfg.train.mlflow_tracking_uri:
            tracker.mlflow = _mlflow_run(cfg, work_dir, continued)
        if cfg.train.wandb_project:
            tracker.wandb = _wandb_run(cfg, work_dir, continued)
    except BaseException:
        tracker.close(failed=True)
        raise
    failed = True
    try:
        yield tracker
        failed = False
    finally:
        tracker.close(failed=failed)


def _tensorboard_writer(work_dir: Path, start_step: int, continued: bool) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    folder = work_dir / TENSORBOARD_DIR
    if not continued and folder.is_dir():
        for old in folder.glob("events.out.tfevents.*"):
            old.unlink()  # a fresh run in the same work dir starts its curves over
    # purge_step: TensorBoard hides the earlier files' events from the first step a continued run redoes on.
    return SummaryWriter(str(folder), purge_step=start_step + 1 if continued else None, flush_secs=30)


def _kept_id(path: Path, continued: bool) -> str | None:
    if not (continued and path.is_file()):
        return None
    return path.read_text().strip() or None


def _mlflow_run(cfg: Config, work_dir: Path, continued: bool) -> Any:
    """Ray's ``setup_mlflow`` on this process (already rank 0): the experiment, a run, the params."""
    from ray.air.integrations.mlflow import setup_mlflow

    id_file = work_dir / MLFLOW_RUN_FILE
    run_id = _kept_id(id_file, continued)
    # setup_mlflow starts its run with mlflow.start_run, which continues the run named by MLFLOW_RUN_ID.
    previous = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id:
        os.environ["MLFLOW_RUN_ID"] = run_id
    allow_file_store(cfg.train.mlflow_tracking_uri)
    try:
        mlflow = setup_mlflow(
            # A continued run has its params already (a changed value would be refused by MLflow).
            None if run_id else flat_params(cfg),
            tracking_uri=cfg.train.mlflow_tracking_uri,
            experiment_name=cfg.train.mlflow_experiment or MLFLOW_DEFAULT_EXPERIMENT,
            run_name=work_dir.name, create_experiment_if_not_exists=True,
            rank_zero_only=False,  # the caller is rank 0 (of Ray Train, torchrun or a single process)
        )
    finally:
        os.environ.pop("MLFLOW_RUN_ID", None)
        if previous is not None:
            os.environ["MLFLOW_RUN_ID"] = previous
    id_file.write_text(mlflow.active_run().info.run_id)
    log.info("MLflow run %s in %s", mlflow.active_run().info.run_id, cfg.train.mlflow_tracking_uri)
    return mlflow


def _wandb_run(cfg: Config, work_dir: Path, continued: bool) -> Any:
    """Ray's ``setup_wandb`` on this process (already rank 0): a run of ``train.wandb_project`` with the config.

    Returns the ``wandb`` run (``log``, ``log_artifact``, ``finish``)."""
    from ray.air.integrations.wandb import setup_wandb

    id_file = work_dir / WANDB_RUN_FILE
    run_id = _kept_id(id_file, continued) or uuid.uuid4().hex[:12]
    run = setup_wandb(flat_params(cfg), project=cfg.train.wandb_project, rank_zero_only=False,
                      name=work_dir.name, id=run_id, resume="allow")
    id_file.write_text(run.id)
    return run
