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
from torch.utils.data import DataLoader

from sp_ray.config import Config
from sp_ray.data.coco import CocoInstanceDataset
from sp_ray.data.transforms import build_transforms, collate
from sp_ray.evaluation.coco_eval import evaluate_model, format_metrics
from sp_ray.models import build_model
from sp_ray.train.checkpoint import load_checkpoint, load_init_weights, save_checkpoint
from sp_ray.train.device import select_device
from sp_ray.train.optim import build_optimizer, build_scheduler
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
        outputs = model(images.float())
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


def build_train_loader(cfg: Config, dataset: CocoInstanceDataset) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        num_workers=cfg.data.num_workers,
        persistent_workers=False,
        collate_fn=_Collate(cfg.data.size_divisor),
        drop_last=len(dataset) > cfg.train.batch_size,
    )


class _Collate:
    """A picklable collate (DataLoader workers may be spawned)."""

    def __init__(self, size_divisor: int) -> None:
        self.size_divisor = size_divisor

    def __call__(self, batch):
        return collate(batch, size_divisor=self.size_divisor)


def fit(
    cfg: Config,
    work_dir: str | Path,
    *,
    init: str | Path | None = None,
    resume: str | Path | None = None,
) -> Path:
    """Train ``cfg`` on ``data.train_*``; checkpoints to ``work_dir/last``, the final model to ``work_dir/final``.

    Args:
        cfg: the resolved config (``model.num_classes`` 0 is filled in from the data).
        work_dir: output directory; ``metrics.jsonl`` gets one line per epoch.
        init: a checkpoint directory whose matching tensors initialise the model (``finetune --init``).
        resume: a checkpoint directory with training state to continue from (same run, same config).

    Returns:
        The final checkpoint directory.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(cfg.train.use_gpu)
    train_set = CocoInstanceDataset(
        cfg.data.train_annotations, cfg.data.train_images,
        transforms=build_transforms(
            train=True, max_size=cfg.data.max_size, short_size=cfg.data.short_size, flip_prob=cfg.data.flip_prob,
        ),
    )
    cfg = resolve_num_classes(cfg, train_set)
    seed_everything(cfg.train.seed)
    model, criterion = build_model(cfg)
    if init is not None:
        report = load_init_weights(model, load_checkpoint(init).model_state)
        log.info("init from %s: %s", init, report.summary())
    model.to(device)
    criterion.to(device)
    loader = build_train_loader(cfg, train_set)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, iters_per_epoch=len(loader))
    start_epoch, step = 0, 0
    if resume is not None:
        ckpt = load_checkpoint(resume, with_training_state=True)
        model.load_state_dict(ckpt.model_state)
        optimizer.load_state_dict(ckpt.training_state["optimizer"])
        scheduler.load_state_dict(ckpt.training_state["scheduler"])
        start_epoch, step = ckpt.training_state["epoch"], ckpt.training_state["step"]
        log.info("resumed from %s at epoch %d, step %d", resume, start_epoch, step)

    meta_base = {"class_names": train_set.class_names, "cat_ids": train_set.cat_ids}
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        # Seeding per epoch makes data order and augmentation a function of (seed, epoch), so a
        # resumed run sees exactly the batches the uninterrupted run would have seen.
        seed_everything(cfg.train.seed * 1000 + epoch)
        stats = train_one_epoch(
            model, criterion, loader, optimizer, scheduler, device=device, epoch=epoch, cfg=cfg,
        )
        step += len(loader)
        metrics = {"epoch": epoch + 1, "step": step, **stats.losses,
                   "images_per_second": stats.images_per_second, "lr": optimizer.param_groups[0]["lr"]}
        last = epoch + 1 == cfg.train.epochs
        if cfg.data.val_annotations and (
            last or (cfg.train.eval_interval and (epoch + 1) % cfg.train.eval_interval == 0)
        ):
            ap, _ = evaluate_model(
                model, cfg, annotations=cfg.data.val_annotations, images=cfg.data.val_images, device=device,
            )
            metrics.update({f"{t}_{k}": v for t, values in ap.items() for k, v in values.items()})
            log.info("epoch %d validation\n%s", epoch + 1, format_metrics(ap))
        log.info("epoch %d/%d done: loss %.4f, %.1f img/s", epoch + 1, cfg.train.epochs,
                 stats.losses.get("loss", float("nan")), stats.images_per_second)
        with open(work_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if last or (cfg.train.checkpoint_interval and (epoch + 1) % cfg.train.checkpoint_interval == 0):
            save_checkpoint(
                work_dir / "last", model=model, config=cfg, meta={**meta_base, **metrics},
                training_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                "epoch": epoch + 1, "step": step},
            )
    return save_checkpoint(work_dir / "final", model=model, config=cfg, meta={**meta_base, **metrics})
