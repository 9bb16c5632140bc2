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

from sp_ray.config import Config
from sp_ray.data.coco import CocoInstanceDataset
from sp_ray.data.transforms import build_transforms, collate
from sp_ray.evaluation.coco_eval import evaluate_model, format_metrics
from sp_ray.models import build_model
from sp_ray.models.losses import ModelLosses
from sp_ray.pretrain.sp_model import load_saliency_queries
from sp_ray.train.checkpoint import load_checkpoint, load_init_weights, save_checkpoint
from sp_ray.train.device import select_device
from sp_ray.train.optim import build_optimizer, build_scheduler
from sp_ray.train.session import LocalSession
from sp_ray.types import Target

log = logging.getLogger("sp_ray")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def targets_to(targets: list[Target], device: torch.device) -> list[Target]:
    return [
        {**t, "labels": t["labels"].to(device), "masks": t["masks"].to(device), "boxes": t["boxes"].to(device)}
        for t in targets
    ]


def _to_float32(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.float() if tree.is_floating_point() else tree
    if isinstance(tree, dict):
        return {k: _to_float32(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_float32(v) for v in tree]
    return tree


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    images: torch.Tensor,
    targets: list[Target],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    grad_clip: float = 0.0,
    amp: bool = False,
) -> dict[str, float]:
    """One optimisation step: outputs, loss dict, weighted sum, backward, clip, step.

    Args:
        images: uint8 or float [B, 3, H, W] on the model's device, values 0..255.
        targets: per-image targets on the same device.
        grad_clip: max total gradient norm (0 = no clipping).
        amp: bf16 autocast for the forward pass (CUDA only; the losses are computed in float32).

    Returns:
        The float value of every loss term and of their sum under ``loss``.

    Raises:
        FloatingPointError: a loss is not finite (the step is not applied).
    """
    model.train()
    use_amp = amp and images.device.type == "cuda"
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=use_amp):
        # Models that compute their own losses (torchvision Mask R-CNN) take the targets in forward.
        own_losses = isinstance(criterion, ModelLosses)
        outputs = model(images.float(), targets) if own_losses else model(images.float())
    losses = criterion(_to_float32(outputs), targets)
    total = sum(losses.values())
    values = {name: value.detach().item() for name, value in losses.items()}
    values["loss"] = total.detach().item()
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(f"loss is not finite: {values}; lower train.lr or check the inputs")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
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
    model: nn.Module,
    criterion: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    device: torch.device,
    epoch: int,
    cfg: Config,
    on_step: Callable[[int], None] | None = None,
) -> EpochStats:
    """Run one pass over ``loader``; logs a line every ``train.log_interval`` iterations."""
    sums: dict[str, float] = defaultdict(float)
    seen = 0
    start = time.perf_counter()
    for it, (images, targets) in enumerate(loader):
        values = train_step(
            model, criterion, images.to(device, non_blocking=True), targets_to(targets, device),
            optimizer, scheduler, grad_clip=cfg.train.grad_clip, amp=cfg.train.amp,
        )
        for name, value in values.items():
            sums[name] += value
        seen += images.shape[0]
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


def resolve_num_classes(cfg: Config, dataset: CocoInstanceDataset) -> Config:
    """Return ``cfg`` with ``model.num_classes`` set from the dataset (an explicit value must agree)."""
    found = len(dataset.class_names)
    if cfg.model.num_classes not in (0, found):
        raise ValueError(
            f"model.num_classes is {cfg.model.num_classes} but {cfg.data.train_annotations} has {found} "
            "categories; set model.num_classes=0 to take it from the data"
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=found))


def build_train_loader(cfg: Config, dataset: CocoInstanceDataset, *, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Shuffled batches of ``train.batch_size``; with several processes each gets its own shard."""
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed)
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=_Collate(cfg.data.size_divisor),
        drop_last=len(dataset) > cfg.train.batch_size * world_size,
    )


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



def check_optimizer_groups(optimizer: torch.optim.Optimizer, saved: dict[str, Any], source: str | Path) -> None:
    """Raise a clear error, not torch's, when a resumed run's optimizer groups its parameters differently."""
    own = [len(group["params"]) for group in optimizer.param_groups]
    theirs = [len(group["params"]) for group in saved["param_groups"]]
    if own != theirs:
        raise ValueError(
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
) -> Path:
    """Train ``cfg`` on ``data.train_*``; checkpoints to ``work_dir/last``, the final model to ``work_dir/final``.

    Every process of a distributed run calls this with its own ``session``; rank 0 alone writes
    files, evaluates and hands checkpoints to the session.

    Args:
        cfg: the resolved config (``model.num_classes`` 0 is filled in from the data).
        work_dir: output directory; ``metrics.jsonl`` gets one line per epoch.
        init: a checkpoint directory whose matching tensors initialise the model (``finetune --init``).
        resume: a checkpoint directory with training state to continue from (same run, same config).
            A checkpoint restored by the session (after a worker failure) takes precedence.
        session: rank, world size and reporting; ``LocalSession()`` by default.

    Returns:
        The final checkpoint directory.
    """
    session = session or LocalSession()
    rank, world_size = session.rank, session.world_size
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(cfg.train.use_gpu)
    train_set = CocoInstanceDataset(
        cfg.data.train_annotations, cfg.data.train_images,
        transforms=build_transforms(
            train=True, max_size=cfg.data.max_size, short_size=cfg.data.short_size, flip_prob=cfg.data.flip_prob,
            scale_range=tuple(cfg.data.train_scale_range),
        ),
        # Pre-training: each pseudo mask carries its saliency query (target "queries") for L_ker.
        extra_per_annotation=load_saliency_queries(cfg) if cfg.pretrain.enabled else None,
    )
    cfg = scaled_lr(resolve_num_classes(cfg, train_set), world_size)
    seed_everything(cfg.train.seed)
    model, criterion = build_model(cfg)
    if init is not None:
        report = load_init_weights(model, load_checkpoint(init).model_state)
        if rank == 0:
            log.info("init from %s: %s", init, report.summary())
    if world_size > 1 and cfg.train.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    criterion.to(device)
    loader = build_train_loader(cfg, train_set, rank=rank, world_size=world_size)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, iters_per_epoch=len(loader))
    start_epoch, step = 0, 0
    with session.restored_checkpoint() as restored:
        source = restored or resume
        if source is not None:
            ckpt = load_checkpoint(source, with_training_state=True)
            model.load_state_dict(ckpt.model_state)
            check_optimizer_groups(optimizer, ckpt.training_state["optimizer"], source)
            optimizer.load_state_dict(ckpt.training_state["optimizer"])
            scheduler.load_state_dict(ckpt.training_state["scheduler"])
            start_epoch, step = ckpt.training_state["epoch"], ckpt.training_state["step"]
            if rank == 0:
                log.info("resumed from %s at epoch %d, step %d", source, start_epoch, step)
    plain_model = model
    model = session.wrap_model(model)

    meta_base = {"class_names": train_set.class_names, "cat_ids": train_set.cat_ids}
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        # Seeding per epoch (and rank) makes data order and augmentation a function of (seed, epoch,
        # rank), so a resumed run sees exactly the batches the uninterrupted run would have seen.
        seed_everything(cfg.train.seed * 1000 + epoch + 7919 * rank)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(
            model, criterion, loader, optimizer, scheduler, device=device, epoch=epoch, cfg=cfg,
            on_step=lambda it, first=step: session.on_step(first + it + 1),
        )
        step += len(loader)
        names = sorted(stats.losses)
        totals = session.all_reduce_sum([stats.images, stats.seconds, *(stats.losses[n] for n in names)])
        seconds = max(totals[1] / world_size, 1e-9)
        mean_losses = {n: v / world_size for n, v in zip(names, totals[2:], strict=True)}
        metrics = {"epoch": epoch + 1, "step": step, **mean_losses,
                   "images_per_second": totals[0] / seconds, "lr": optimizer.param_groups[0]["lr"],
                   "images": int(totals[0]), "time": time.time()}
        last = epoch + 1 == cfg.train.epochs
        checkpoint = None
        if rank == 0:
            if cfg.data.val_annotations and (
                last or (cfg.train.eval_interval and (epoch + 1) % cfg.train.eval_interval == 0)
            ):
                ap, _ = evaluate_model(
                    plain_model, cfg, annotations=cfg.data.val_annotations, images=cfg.data.val_images,
                    device=device,
                )
                metrics.update({f"{t}_{k}": v for t, values in ap.items() for k, v in values.items()})
                log.info("epoch %d validation\n%s", epoch + 1, format_metrics(ap))
            log.info("epoch %d/%d done: loss %.4f, %.1f img/s", epoch + 1, cfg.train.epochs,
                     metrics.get("loss", float("nan")), metrics["images_per_second"])
            with open(work_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if last or (cfg.train.checkpoint_interval and (epoch + 1) % cfg.train.checkpoint_interval == 0):
                checkpoint = save_checkpoint(
                    work_dir / "last", model=plain_model, config=cfg, meta={**meta_base, **metrics},
                    training_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    "epoch": epoch + 1, "step": step},
                )
        session.report(metrics, checkpoint)
    session.finish(plain_model)
    final = work_dir / "final"
    if rank == 0:
        save_checkpoint(final, model=plain_model, config=cfg, meta={**meta_base, **metrics})
    return final
