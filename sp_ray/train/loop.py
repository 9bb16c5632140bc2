"""The training step and epoch loop: plain PyTorch, the same in a test, a process or a Ray worker."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from sp_ray.checkpoint import (
    copy_as_final,
    init_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
    update_meta,
)
from sp_ray.config import Config
from sp_ray.data.coco import CocoInstanceDataset
from sp_ray.data.grouped_batching import AspectRatioBatchSampler, coco_orientation_groups
from sp_ray.data.transforms import build_transforms, collate
from sp_ray.device import select_device
from sp_ray.errors import EvaluationError, NonFiniteLossError, UserError
from sp_ray.evaluation.coco_eval import evaluate_model, format_metrics
from sp_ray.models import build_model
from sp_ray.objectives import Trainable, build_objective
from sp_ray.pretrain.sp_objective import load_saliency_queries
from sp_ray.train.ema import ModelEma
from sp_ray.train.optim import build_optimizer, build_scheduler
from sp_ray.train.session import LocalSession
from sp_ray.train.tracking import open_tracker
from sp_ray.types import Target

log = logging.getLogger("sp_ray")

# (cfg, model) -> the model's training objective (``sp_ray.objectives``).
ObjectiveBuilder = Callable[[Config, nn.Module], nn.Module]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def targets_to(targets: list[Target], device: torch.device) -> list[Target]:
    return [
        {**t, "labels": t["labels"].to(device), "masks": t["masks"].to(device), "boxes": t["boxes"].to(device)}
        for t in targets
    ]


def check_finite_images(images: torch.Tensor, targets: list[Target]) -> None:
    """Raise ``NonFiniteLossError`` naming the images of a float batch that hold NaN or inf, if any.

    Without it a NaN pixel reads as diverged training (BatchNorm in training spreads it to every output of the
    batch, and the matcher refuses the NaN predictions), or crashes the process (torchvision's ``roi_align``
    on NaN boxes, QueryInst). uint8 batches, those of the data loader, cannot hold NaN and are not read.
    """
    if not images.is_floating_point():
        return
    bad = torch.nonzero(~torch.isfinite(images.detach().flatten(1)).all(dim=1)).flatten().tolist()
    if not bad:
        return
    ids = [targets[i].get("image_id") for i in bad] if len(targets) == images.shape[0] else []
    which = ", ".join(f"image {i}" + (f" (image_id {ids[k]})" if ids else "") for k, i in enumerate(bad))
    raise NonFiniteLossError(
        f"the input images are not finite: NaN or inf in {which} of the batch of {images.shape[0]}; "
        "the loss cannot be computed: check the images given to training"
    )


def train_step(
    trainable: nn.Module,
    images: torch.Tensor,
    targets: list[Target],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    grad_clip: float = 0.0,
    amp: bool = False,
) -> dict[str, float]:
    """One optimisation step: loss dict of the ``Trainable``, weighted sum, backward, clip, step.

    Args:
        trainable: ``sp_ray.objectives.Trainable`` (or its DDP wrapper): ``trainable(images, targets)`` -> losses.
        images: uint8 or float [B, 3, H, W] on the model's device, values 0..255.
        targets: per-image targets on the same device.
        grad_clip: max total gradient norm over the trainable's parameters (0 = no clipping).
        amp: bf16 autocast for the forward pass (CUDA only; the objectives compute the losses in float32).

    Returns:
        The float value of every loss term and of their sum under ``loss``.

    Raises:
        NonFiniteLossError: a loss or an output is not finite (the step is not applied); a FloatingPointError.
            A float batch is checked first: a NaN or inf in the images is named (nothing is run).
    """
    check_finite_images(images, targets)
    trainable.train()
    use_amp = amp and images.device.type == "cuda"
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=use_amp):
        losses = trainable(images.float(), targets)
    total = sum(losses.values())
    values = {name: value.detach().item() for name, value in losses.items()}
    values["loss"] = total.detach().item()
    if not math.isfinite(values["loss"]):
        raise NonFiniteLossError(f"loss is not finite: {values}; lower train.lr or check the inputs")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return values


@dataclasses.dataclass
class EpochStats:
    losses: dict[str, float]  # mean over the epoch's iterations
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def train_one_epoch(
    trainable: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    device: torch.device,
    epoch: int,
    cfg: Config,
    on_step: Callable[[int], None] | None = None,
    track: Callable[[int, dict[str, float], float], None] | None = None,
) -> EpochStats:
    """Run one pass over ``loader``; logs a line every ``train.log_interval`` iterations.

    ``on_step(iteration)`` and ``track(iteration, loss values, lr)`` are called after every step (iterations
    count from 0 in the epoch)."""
    sums: dict[str, float] = defaultdict(float)
    seen = 0
    start = time.perf_counter()
    for it, (images, targets) in enumerate(loader):
        values = train_step(
            trainable, images.to(device, non_blocking=True), targets_to(targets, device),
            optimizer, scheduler, grad_clip=cfg.train.grad_clip, amp=cfg.train.amp,
        )
        for name, value in values.items():
            sums[name] += value
        seen += images.shape[0]
        if track is not None:
            track(it, values, optimizer.param_groups[0]["lr"])
        if on_step is not None:
            on_step(it)
        if cfg.train.log_interval and (it + 1) % cfg.train.log_interval == 0:
            elapsed = time.perf_counter() - start
            log.info(
                "epoch %d/%d iter %d/%d loss %.4f lr %.2e %.1f img/s",
                epoch + 1, cfg.train.epochs, it + 1, len(loader), values["loss"],
                optimizer.param_groups[0]["lr"], seen / max(elapsed, 1e-9),
            )
    iters = max(1, len(loader))
    return EpochStats({k: v / iters for k, v in sums.items()}, seen, time.perf_counter() - start)


def training_dataset(cfg: Config) -> CocoInstanceDataset:
    """``data.train_*`` with the training augmentation; in pre-training each pseudo mask also carries its
    saliency query (target ``queries``, for L_ker).

    Raises:
        UserError: no image of the json could be read from ``data.train_images``.
    """
    train_set = CocoInstanceDataset(
        cfg.data.train_annotations, cfg.data.train_images,
        transforms=build_transforms(
            train=True, max_size=cfg.data.max_size, short_size=cfg.data.short_size, flip_prob=cfg.data.flip_prob,
            scale_range=tuple(cfg.data.train_scale_range), rotate_level=cfg.data.rotate_level,
            rotate_prob=cfg.data.rotate_prob,
        ),
        extra_per_annotation=load_saliency_queries(cfg) if cfg.pretrain.enabled else None,
    )
    if len(train_set) == 0:
        raise UserError(
            f"no usable training image in {cfg.data.train_images} for {cfg.data.train_annotations} "
            f"(skipped: {dict(train_set.skipped)}); check that the folder holds the json's images"
        )
    return train_set


def resolve_num_classes(cfg: Config, dataset: CocoInstanceDataset) -> Config:
    """Return ``cfg`` with ``model.num_classes`` set from the dataset (an explicit value must agree)."""
    found = len(dataset.class_names)
    if cfg.model.num_classes not in (0, found):
        raise UserError(
            f"model.num_classes is {cfg.model.num_classes} but {cfg.data.train_annotations} has {found} "
            "categories; set model.num_classes=0 to take it from the data"
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=found))


def _warn_on_other_class_names(init: str | Path, trained: list[str] | None, data: list[str]) -> None:
    """A class head of the same size loads by shape; say so when it was trained on other class names (a class-aware
    pre-training on another vocabulary, or the same names in another order), since label i then means another class."""
    if trained is None or len(trained) != len(data) or list(trained) == list(data):
        return
    label = next(index for index, (old, new) in enumerate(zip(trained, data, strict=True)) if old != new)
    log.warning(
        "init from %s: its class head (%d classes) is loaded, but was trained on other class names: label %d was "
        "%r and is %r here; it is right only if both datasets number the same classes alike",
        init, len(data), label, trained[label], data[label],
    )


def build_train_loader(cfg: Config, dataset: CocoInstanceDataset, *, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Shuffled batches of ``train.batch_size``; with several processes each gets its own shard.

    With ``data.group_by_aspect_ratio`` (the default) every batch holds images of one orientation, every
    image is in one batch of one process per epoch and a group's last, smaller batch is kept
    (``sp_ray.data.grouped_batching``); the loader's ``batch_sampler`` then takes ``set_epoch``. Without it,
    a ``DistributedSampler`` per process (or a plain shuffle when alone) and full batches only.

    Raises:
        UserError: grouping, and fewer training images than ``train.num_workers``.
    """
    collate_fn = _Collate(cfg.data.size_divisor)
    if cfg.data.group_by_aspect_ratio:
        if len(dataset) < world_size:
            raise UserError(
                f"{cfg.data.train_annotations} has {len(dataset)} usable training images for {world_size} "
                "training processes (train.num_workers); use fewer workers or more images"
            )
        batches = AspectRatioBatchSampler(coco_orientation_groups(dataset), cfg.train.batch_size,
                                          num_replicas=world_size, rank=rank, seed=cfg.train.seed)
        return DataLoader(dataset, batch_sampler=batches, num_workers=cfg.data.num_workers, collate_fn=collate_fn)
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed)
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_fn,
        drop_last=len(dataset) > cfg.train.batch_size * world_size,
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler (``DistributedSampler``) or batch sampler (grouped batches) the epoch."""
    for sampler in (loader.sampler, loader.batch_sampler):
        if isinstance(sampler, (DistributedSampler, AspectRatioBatchSampler)):
            sampler.set_epoch(epoch)


class _Collate:
    """A picklable collate (DataLoader workers may be spawned)."""

    def __init__(self, size_divisor: int) -> None:
        self.size_divisor = size_divisor

    def __call__(self, batch):
        return collate(batch, size_divisor=self.size_divisor)


def scaled_lr(cfg: Config, world_size: int) -> Config:
    """Apply the linear scaling rule: ``lr x global batch / base_batch_size`` (no change when 0)."""
    if cfg.train.base_batch_size <= 0:
        return cfg
    global_batch = cfg.train.batch_size * world_size
    lr = cfg.train.lr * global_batch / cfg.train.base_batch_size
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=lr))


def keep_metrics_through(path: Path, epoch: int) -> None:
    """Rewrite ``metrics.jsonl`` with one row per epoch up to ``epoch`` (the last row of each wins).

    A run continued from the checkpoint of ``epoch`` (``--resume``, or Ray after a worker failure with
    ``train.checkpoint_interval`` > 1) trains the later epochs again, so their old rows go. Written
    beside the file and renamed into place.
    """
    if not path.is_file():
        return
    rows: dict[int, str] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] <= epoch:
            rows[row["epoch"]] = line
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(rows[e] + "\n" for e in sorted(rows)))
    tmp.replace(path)


def check_optimizer_groups(optimizer: torch.optim.Optimizer, saved: dict[str, Any], source: str | Path) -> None:
    """Raise a clear error, not torch's, when a resumed run's optimizer groups its parameters differently."""
    own = [len(group["params"]) for group in optimizer.param_groups]
    theirs = [len(group["params"]) for group in saved["param_groups"]]
    if own != theirs:
        raise UserError(
            f"{source}: its optimizer holds parameter groups of {theirs} tensors where this config makes {own}; "
            "train.norm_decay_mult / embed_decay_mult or model.frozen_stages differ from the run's. Resume with "
            "the run's own config.yaml, or start a new run with --init to keep only the weights"
        )


def fit(
    cfg: Config,
    work_dir: str | Path,
    *,
    init: str | Path | None = None,
    resume: str | Path | None = None,
    session: LocalSession | None = None,
    objective: ObjectiveBuilder = build_objective,
) -> Path:
    """Train ``cfg`` on ``data.train_*``; checkpoints to ``work_dir/last``, the final model to ``work_dir/final``.

    Every process of a distributed run calls this with its own ``session``; rank 0 alone writes
    files, evaluates and hands checkpoints to the session. In the last epoch ``final`` (and ``last``)
    are written before the validation run, whose AP is then added to their meta.json: an evaluation
    that fails cannot cost the trained model. A failed validation is logged with the checkpoint path
    and training goes on; if the last one failed, ``EvaluationError`` is raised once ``final`` exists.

    Args:
        cfg: the resolved config (``model.num_classes`` 0 is filled in from the data).
        work_dir: output directory; ``metrics.jsonl`` holds one line per epoch trained, each epoch once.
        init: a checkpoint directory whose matching tensors initialise the model (``--init``; in pre-training
            from a pre-training checkpoint, the objective too).
        resume: a checkpoint directory with training state to continue from (same run, same config).
            A checkpoint restored by the session (after a worker failure) takes precedence.
        session: rank, world size and reporting; ``LocalSession()`` by default.
        objective: ``(cfg, model) -> objective``, built after the model: ``build_objective`` (fine-tuning) or
            ``sp_ray.pretrain.sp_objective.build_sp_objective`` (``sp-ray pretrain``).

    Returns:
        The final checkpoint directory.

    Raises:
        UserError: bad data, a checkpoint that does not fit, a loss that is not finite.
        EvaluationError: the last validation run failed (the model is in ``final``, the message says so).
    """
    session = session or LocalSession()
    rank, world_size = session.rank, session.world_size
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(cfg.train.use_gpu)
    train_set = training_dataset(cfg)
    cfg = scaled_lr(resolve_num_classes(cfg, train_set), world_size)
    seed_everything(cfg.train.seed)
    # Model first, then its objective: the order of random-number use of every run before the split.
    model = build_model(cfg)
    trainable = Trainable(model, objective(cfg, model))
    if init is not None:
        # pretrain --init from a pre-training checkpoint also takes its objective's tensors (projection, prompts).
        init_ckpt = load_checkpoint(init)
        report = init_from_checkpoint(trainable.model, trainable.objective, init_ckpt,
                                      with_objective=cfg.pretrain.enabled and init_ckpt.config.pretrain.enabled)
        if rank == 0:
            log.info("init from %s: %s", init, report.summary())
            _warn_on_other_class_names(init, init_ckpt.meta.get("class_names"), train_set.class_names)
    if world_size > 1 and cfg.train.sync_bn:
        trainable = nn.SyncBatchNorm.convert_sync_batchnorm(trainable)
    trainable.to(device)
    loader = build_train_loader(cfg, train_set, rank=rank, world_size=world_size)
    optimizer = build_optimizer(trainable, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, iters_per_epoch=len(loader))
    start_epoch, step = 0, 0
    final = work_dir / "final"
    # Rank 0 alone evaluates and saves, so it alone keeps the average (DDP keeps every rank's weights equal).
    ema = ModelEma(trainable, cfg.train.ema_decay) if rank == 0 and cfg.train.ema_decay > 0 else None
    with session.restored_checkpoint() as restored:
        source = restored or resume
        if source is not None:
            ckpt = load_checkpoint(source, with_training_state=True)
            try:
                trainable.model.load_state_dict(ckpt.model_state)
                trainable.objective.load_state_dict(ckpt.objective_state)
            except RuntimeError as err:
                raise UserError(f"{source} does not fit the model of this config: {str(err).splitlines()[0]}") from None
            check_optimizer_groups(optimizer, ckpt.training_state["optimizer"], source)
            optimizer.load_state_dict(ckpt.training_state["optimizer"])
            scheduler.load_state_dict(ckpt.training_state["scheduler"])
            start_epoch, step = ckpt.training_state["epoch"], ckpt.training_state["step"]
            if ema is not None:
                ema = restore_ema(ema, trainable, ckpt.training_state.get("ema"), source)
            if rank == 0:
                log.info("resumed from %s at epoch %d, step %d", source, start_epoch, step)
                if start_epoch >= cfg.train.epochs and not final.exists():
                    # Stopped between writing `last` and `final`: the schedule is done, publish its model.
                    if ema is None:
                        copy_as_final(source, final)
                    else:
                        save_checkpoint(final, model=ema.module.model, objective=ema.module.objective, config=cfg,
                                        meta={**ckpt.meta, **ema_meta(ema)})
    if start_epoch > cfg.train.epochs:
        raise UserError(f"train.epochs={cfg.train.epochs} is below the epoch of {source} ({start_epoch})")
    if rank == 0:
        keep_metrics_through(work_dir / "metrics.jsonl", start_epoch)
    plain = trainable
    # DDP sees the Trainable: the objective's parameters are trained too.
    wrapped = session.wrap_model(trainable, find_unused_parameters=cfg.train.find_unused_parameters)

    meta_base = {"class_names": train_set.class_names, "cat_ids": train_set.cat_ids}
    failed_evaluation: str | None = None
    with open_tracker(cfg, work_dir, rank=rank, start_step=step, continued=source is not None,
                      evaluated=bool(cfg.data.val_annotations)) as tracker:
        for epoch in range(start_epoch, cfg.train.epochs):
            # Seeding per epoch (and rank) makes data order and augmentation a function of (seed, epoch,
            # rank), so a resumed run sees exactly the batches the uninterrupted run would have seen.
            seed_everything(cfg.train.seed * 1000 + epoch + 7919 * rank)
            set_loader_epoch(loader, epoch)

            def after_step(it: int, first: int = step) -> None:
                if ema is not None:
                    ema.update(plain)
                session.on_step(first + it + 1)

            stats = train_one_epoch(
                wrapped, loader, optimizer, scheduler, device=device, epoch=epoch, cfg=cfg, on_step=after_step,
                track=lambda it, values, lr, first=step: tracker.log_step(first + it + 1, values, lr),
            )
            step += len(loader)
            names = sorted(stats.losses)
            totals = session.all_reduce_sum([stats.images, stats.seconds, *(stats.losses[n] for n in names)])
            seconds = max(totals[1] / world_size, 1e-9)
            mean_losses = {n: v / world_size for n, v in zip(names, totals[2:], strict=True)}
            metrics: dict[str, Any] = {
                "epoch": epoch + 1, "step": step, **mean_losses, "images_per_second": totals[0] / seconds,
                "lr": optimizer.param_groups[0]["lr"], "images": int(totals[0]), "time": time.time(),
            }
            last = epoch + 1 == cfg.train.epochs
            checkpoint = None
            if rank == 0:
                written: list[Path] = []
                if last or (cfg.train.checkpoint_interval and (epoch + 1) % cfg.train.checkpoint_interval == 0):
                    checkpoint = save_checkpoint(
                        work_dir / "last", model=plain.model, objective=plain.objective, config=cfg,
                        meta={**meta_base, **metrics},
                        training_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                        "epoch": epoch + 1, "step": step,
                                        **({"ema": ema.state_dict()} if ema is not None else {})},
                    )
                    written.append(checkpoint)
                # What evaluation and `final` hold: the average when there is one.
                published = plain if ema is None else ema.module
                if last:
                    written.append(save_checkpoint(final, model=published.model, objective=published.objective,
                                                   config=cfg, meta={**meta_base, **metrics, **ema_meta(ema)}))
                ap: dict[str, float] = {}
                if cfg.data.val_annotations and (
                    last or (cfg.train.eval_interval and (epoch + 1) % cfg.train.eval_interval == 0)
                ):
                    ap, failed_evaluation, results = _validate(published.model, cfg, device, epoch=epoch + 1,
                                                               written=written)
                    metrics.update(ap)
                    tracker.log_predictions(step, results)
                    for path in written:
                        update_meta(path, ap)
                log.info("epoch %d/%d done: loss %.4f, %.1f img/s", epoch + 1, cfg.train.epochs,
                         metrics.get("loss", float("nan")), metrics["images_per_second"])
                with open(work_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                tracker.log_epoch(metrics, evaluated=tuple(ap))
            session.report(metrics, checkpoint)
        if rank == 0 and final.is_dir():
            tracker.log_final(final)
    session.finish(plain)
    if failed_evaluation is not None and start_epoch < cfg.train.epochs:
        raise EvaluationError(failed_evaluation)
    return final


def ema_meta(ema: ModelEma | None) -> dict[str, Any]:
    """The meta.json entry of a model saved from the average: ``{"ema": {"decay": d, "updates": n}}`` ({} without)."""
    return {} if ema is None else {"ema": {"decay": ema.decay, "updates": ema.updates}}


def restore_ema(ema: ModelEma, trainable: nn.Module, saved: dict[str, Any] | None, source: str | Path) -> ModelEma:
    """The average of a resumed run: the checkpoint's, or (a run started without ``train.ema_decay``) a new one
    from the resumed weights."""
    if saved is None:
        log.warning("%s holds no weight average (its run had train.ema_decay=0): the average starts from its "
                    "weights", source)
        return ModelEma(trainable, ema.decay)
    try:
        ema.load_state_dict(saved)
    except RuntimeError as err:
        raise UserError(f"{source}: its weight average does not fit the model of this config: "
                        f"{str(err).splitlines()[0]}") from None
    return ema


def _validate(
    model: nn.Module, cfg: Config, device: torch.device, *, epoch: int, written: list[Path]
) -> tuple[dict[str, float], str | None, list[dict[str, Any]]]:
    """COCO AP on ``data.val_*`` as flat metrics (``segm_AP``, ...), None and the COCO results (for the
    prediction overlays of ``sp_ray.train.tracking``); or ({}, the error, []) when evaluation fails.

    Any exception of the evaluation is caught: the model is already saved in ``written`` (or is still
    training), and retrying the training would not make the validation data evaluable.
    """
    try:
        ap, results = evaluate_model(
            model, cfg, annotations=cfg.data.val_annotations, images=cfg.data.val_images, device=device,
        )
    except Exception as err:  # whatever fails in evaluation must not fail the training
        saved = (f"the model is saved in {written[-1]}; evaluate it once the data are fixed with: sp-ray evaluate "
                 f"--checkpoint {written[-1]} --annotations {cfg.data.val_annotations} --images {cfg.data.val_images}"
                 if written else "no checkpoint was written this epoch; training goes on")
        message = (f"the evaluation of epoch {epoch} on {cfg.data.val_annotations} failed "
                   f"({type(err).__name__}: {err}); {saved}")
        log.error("%s", message, exc_info=True)
        return {}, message, []
    log.info("epoch %d validation\n%s", epoch, format_metrics(ap))
    return {f"{t}_{k}": v for t, values in ap.items() for k, v in values.items()}, None, results
