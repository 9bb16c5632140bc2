"""What the driver checks before any Ray worker starts: config values, data, checkpoints, paths.

A bad input found here costs seconds and one message (a ``UserError``); found inside a worker it
would cost a worker group start-up, and before ``sp_ray.train.failures`` one per retry. The checks
mirror what the workers will do: the annotation json is parsed as the dataset parses it, the model
is built as ``fit`` builds it, ``--init`` weights are loaded into it and a ``--resume`` checkpoint
must fit it and its optimizer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from sp_ray.checkpoint import init_from_checkpoint, load_checkpoint
from sp_ray.config import Config, check_config_values
from sp_ray.errors import UserError
from sp_ray.train.tracking import check_tracking

log = logging.getLogger("sp_ray")


@dataclass
class TrainingPlan:
    """Where a checked run starts.

    Attributes:
        work_dir: the output directory (resolved).
        start_epoch: the epoch of the ``resume`` checkpoint, 0 for a new run.
        epochs: the epochs of the schedule (``train.epochs``, or ``ssl.epochs`` for DenseCL).
        finished: ``resume`` is already at ``epochs``: the run is complete and nothing is to be trained.
    """

    work_dir: Path
    start_epoch: int
    epochs: int
    finished: bool

    @property
    def final(self) -> Path:
        return self.work_dir / "final"


def check_output_dir(path: str | Path, *, what: str) -> Path:
    """Make sure ``path`` is a directory sp-ray can write in: created if missing, then probed with a file.

    Probing, rather than ``os.access``, also catches read-only mounts and holds when running as root.

    Raises:
        UserError: it is a file, or it cannot be created or written.
    """
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a directory; give a directory path (new or existing)")
    _probe_folder(path, what=what, shown=path)
    return path


def check_output_file(path: str | Path, *, what: str) -> Path:
    """Make sure the file ``path`` can be written: its folder is created if missing and probed.

    Raises:
        UserError: ``path`` is a directory, or its folder cannot be created or written.
    """
    path = Path(path).absolute()
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; give the path of a file to write")
    _probe_folder(path.parent, what=what, shown=path)
    return path


def _probe_folder(folder: Path, *, what: str, shown: Path) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {shown}: {existing} is a file, so no folder can be made under it; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sp-ray-write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        at = f" ({err.filename})" if err.filename and Path(err.filename) != shown else ""
        raise UserError(f"{what} {shown} cannot be written: {reason}{at}; choose a writable path") from None


def check_image_folder(path: str | Path, *, what: str) -> Path:
    """Check that ``path`` is an existing folder.

    Raises:
        UserError: it does not exist or is a file.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what}: the image folder {path} does not exist; give the folder that holds the images")
    if not path.is_dir():
        raise UserError(f"{what}: {path} is a file, not a folder; give the folder that holds the images")
    return path


def check_coco_data(
    annotations: str | Path, images: str | Path, *, what: str, images_what: str | None = None,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Check a COCO json and its image folder as the dataset will read them; returns the parsed json.

    The json must parse as COCO instance format (``sp_ray.data.coco.read_coco_json``: fields, unique
    ids), have at least one image and one category, and the folder must hold at least one of its
    images. Single missing or unreadable images are the dataset's counted skips, not an error here.

    Args:
        annotations: the json file.
        images: the folder of its ``file_name`` entries.
        what: the setting both came from, for the messages (e.g. "data.train_annotations").
        images_what: the setting of the folder, when it has its own (e.g. "data.train_images").
        max_pixels: the image size limit of the readers (``data.max_image_pixels``); None: their default.

    Raises:
        UserError: any of the above does not hold; the message names the file or folder.
    """
    from sp_ray.data.coco import read_coco_json

    annotations = Path(annotations)
    try:
        data = read_coco_json(annotations)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"{what}: {err}") from None
    if not data["categories"]:
        raise UserError(
            f"{what}: {annotations} has an empty 'categories' list; a COCO instance json names every class "
            "it annotates (id, name)"
        )
    if not data["images"]:
        raise UserError(f"{what}: {annotations} lists no images")
    folder = check_image_folder(images, what=f"{images_what or what} (the images of {annotations})")
    names = [image["file_name"] for image in data["images"]]
    flat = set(os.listdir(folder))  # one listing instead of a stat per image of a large folder
    present = sum(1 for name in names if (name in flat if "/" not in name else (folder / name).is_file()))
    if present == 0:
        raise UserError(
            f"{what}: the image folder {folder} holds none of the {len(names)} images of {annotations} "
            f"(e.g. {names[0]!r}); give the folder their file_name entries are relative to"
        )
    _check_some_images_readable(folder, names, max_pixels=max_pixels)
    return data


# Image headers read on the driver: enough to tell a folder of images from one of other files, few enough
# to take a fraction of a second on a network file system.
HEADER_SAMPLE = 32


def _check_some_images_readable(folder: Path, names: list[str], *, max_pixels: int | None) -> None:
    from sp_ray.data.images import displayed_size

    limit = {} if max_pixels is None else {"max_pixels": max_pixels}
    tried: list[str] = []
    first_error = ""
    for name in names:
        if len(tried) == HEADER_SAMPLE:
            break
        if not (folder / name).is_file():
            continue
        try:
            displayed_size(folder / name, **limit)
            return
        except OSError as err:
            tried.append(name)
            first_error = first_error or str(err)
    raise UserError(
        f"none of the {len(tried)} images of {folder} tried ({', '.join(tried[:3])}, ...) can be read "
        f"(first: {first_error}); give the folder of the json's images, or replace the damaged files"
    )


def _check_fit_data(cfg: Config) -> int:
    """The training and validation data of ``fit``; returns the number of training categories."""
    what = "the pseudo masks of 'sp-ray propose'" if cfg.pretrain.enabled else "a COCO-format training set"
    for key in ("train_annotations", "train_images"):
        if not getattr(cfg.data, key):
            raise UserError(f"data.{key} is empty: set it ({what}) in the config or as data.{key}=PATH")
    limit = cfg.data.max_image_pixels
    train = check_coco_data(cfg.data.train_annotations, cfg.data.train_images, what="data.train_annotations",
                            images_what="data.train_images", max_pixels=limit)
    if cfg.data.val_annotations:
        if not cfg.data.val_images:
            raise UserError("data.val_annotations is set but data.val_images is empty: set data.val_images=DIR")
        check_coco_data(cfg.data.val_annotations, cfg.data.val_images, what="data.val_annotations",
                        images_what="data.val_images", max_pixels=limit)
    if cfg.pretrain.enabled:
        from sp_ray.pretrain.sp_objective import load_saliency_queries, prompts_path

        try:
            queries = load_saliency_queries(cfg)
        except (FileNotFoundError, ValueError) as err:
            raise UserError(str(err)) from None
        largest = max((ann["id"] for ann in train["annotations"]), default=0)
        if len(queries) < largest:
            raise UserError(
                f"{prompts_path(cfg)} holds {len(queries)} saliency queries but {cfg.data.train_annotations} has "
                f"annotation id {largest} (row id - 1 is its query); use the prompts.npy written with that json"
            )
    return len(train["categories"])


def _build_fit_model(cfg: Config, num_categories: int, *, task: str) -> tuple[Config, nn.Module]:
    """The run's ``Trainable``: the model and the objective of ``task`` ("pretrain": the SP objective)."""
    from sp_ray.models import build_model
    from sp_ray.objectives import Trainable, build_objective

    if cfg.model.num_classes not in (0, num_categories):
        raise UserError(
            f"model.num_classes is {cfg.model.num_classes} but {cfg.data.train_annotations} has {num_categories} "
            "categories; set model.num_classes=0 to take it from the data"
        )
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_categories))
    if task == "pretrain":
        from sp_ray.pretrain.sp_objective import build_sp_objective as objective
    else:
        objective = build_objective
    try:
        model = build_model(cfg)
        trainable = Trainable(model, objective(cfg, model))
    except (ValueError, FileNotFoundError) as err:  # the builders' errors name the key or file at fault
        raise UserError(f"the model of this config cannot be built: {err}") from None
    return cfg, trainable


def _check_resume_fits(trainable: nn.Module, ckpt: Any, source: Path, *, what: str) -> None:
    try:
        if hasattr(trainable, "objective"):
            trainable.model.load_state_dict(ckpt.model_state)
            trainable.objective.load_state_dict(ckpt.objective_state)
        else:
            trainable.load_state_dict(ckpt.model_state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise UserError(
            f"--resume {source} does not fit the model of this config ({first}); resume with the run's own "
            f"config ({source / 'config.yaml'}) or start a new run with --init to keep the matching {what}"
        ) from None


def check_training(
    cfg: Config,
    work_dir: str | Path,
    *,
    task: str = "finetune",
    init: str | Path | None = None,
    resume: str | Path | None = None,
    images: str | Path | None = None,
    model_check: Callable[[Config, str | Path | None], tuple[nn.Module, int]] | None = None,
) -> TrainingPlan:
    """Check everything a training run reads, on the driver, before Ray starts.

    Args:
        cfg: the resolved config.
        work_dir: the output directory.
        task: "finetune" (``fit`` with ``build_objective``), "pretrain" (``fit`` with the SP objective; a
            ``pretrain.enabled`` config) or "ssl" (DenseCL).
        init: checkpoint directory whose weights initialise the model (``--init``).
        resume: checkpoint directory with training state to continue (``--resume`` / ``--resume-from``).
        images: the unlabeled image folder of "ssl".
        model_check: the checks of a task that is not ``fit``'s ("ssl"): (cfg, images) -> (its model, its
            epochs), raising a ``UserError``; ``sp_ray.densecl.train.check_ssl`` for "ssl".

    Returns:
        The plan: where the run starts, and whether a resumed run is already complete.

    Raises:
        UserError: the first problem found (a ``ConfigError`` for a config value), naming what to fix.
        FileNotFoundError: ``init`` or ``resume`` is not a checkpoint directory.
    """
    if task not in ("finetune", "pretrain", "ssl"):
        raise ValueError(f"task must be 'finetune', 'pretrain' or 'ssl', got {task!r}")
    check_config_values(cfg, task=task)
    check_tracking(cfg)  # a tracking key whose package is missing fails here, not in the worker after minutes
    if task != "ssl":
        from sp_ray.models import model_family

        model_family(cfg.model.name)  # an unknown name fails before the data are read
    work_dir = Path(work_dir)
    if work_dir.exists() and not work_dir.is_dir():  # the cheap half now, the write probe once all else passed
        check_output_dir(work_dir, what="--work-dir")
    if task == "ssl":
        if model_check is None:
            raise ValueError("task 'ssl' is checked by its model_check (sp_ray.densecl.train.check_ssl)")
        model, epochs = model_check(cfg, images)
    else:
        cfg, model = _build_fit_model(cfg, _check_fit_data(cfg), task=task)
        epochs = cfg.train.epochs
        if init is not None:
            init_ckpt = load_checkpoint(init)
            report = init_from_checkpoint(model.model, model.objective, init_ckpt,
                                          with_objective=cfg.pretrain.enabled and init_ckpt.config.pretrain.enabled)
            if not report.loaded:
                raise UserError(
                    f"--init {init}: none of its tensors fits this model ({report.summary()}); "
                    "initialise from a checkpoint of the same model.name and depth"
                )
    start_epoch = 0
    if resume is not None:
        ckpt = load_checkpoint(resume, with_training_state=True)
        if "scheduler" not in ckpt.training_state:
            raise UserError(f"--resume {resume}: its optimizer.pt has no scheduler state; resume from a WORK_DIR/last "
                            "written by sp-ray")
        _check_resume_fits(model, ckpt, Path(resume), what="weights")
        if task != "ssl":
            from sp_ray.train.loop import check_optimizer_groups
            from sp_ray.train.optim import build_optimizer

            check_optimizer_groups(build_optimizer(model, cfg.train), ckpt.training_state["optimizer"], resume)
        start_epoch = int(ckpt.training_state["epoch"])
        key = "ssl.epochs" if task == "ssl" else "train.epochs"
        if start_epoch > epochs:
            raise UserError(
                f"{key}={epochs} is below the epoch of --resume {resume} ({start_epoch}): to train longer, set "
                f"{key} above {start_epoch}; the model of epoch {start_epoch} is in {resume}"
            )
    finished = resume is not None and start_epoch == epochs
    # The write probe touches the folder: not for a finished run, which is left exactly as it is.
    work_dir = work_dir.absolute() if finished else check_output_dir(work_dir, what="--work-dir")
    return TrainingPlan(work_dir=work_dir, start_epoch=start_epoch, epochs=epochs, finished=finished)
