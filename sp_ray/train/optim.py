"""AdamW with a backbone learning-rate multiplier, linear warmup, then step or cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from sp_ray.config import TrainConfig
from sp_ray.train.checkpoint import WRAPPED_MODEL_PREFIX


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; parameters under ``backbone.`` get ``lr * backbone_lr_mult``.

    A pre-training wrapper's detector (under ``WRAPPED_MODEL_PREFIX``) is grouped the same way.

    The two groups follow mmdet's ``paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=...)})``.
    """
    model = model.module if hasattr(model, "module") else model
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            in_backbone = name.removeprefix(WRAPPED_MODEL_PREFIX).startswith("backbone.")
            (backbone if in_backbone else rest).append(param)
    groups = [{"params": rest, "lr": cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, iters_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at a given iteration (0-based).

    Warmup is mmdet's linear warmup: the factor rises from ``warmup_ratio`` to 1 over ``warmup_iters``
    iterations and multiplies the decay schedule, which is counted in epochs for "step" (``lr_steps``)
    and in iterations for "cosine" (to 0 at the last iteration).
    """
    if cfg.lr_schedule not in ("step", "cosine"):
        raise ValueError(f"train.lr_schedule must be 'step' or 'cosine', got {cfg.lr_schedule!r}")
    total = max(1, cfg.epochs * iters_per_epoch)

    def factor(it: int) -> float:
        if cfg.lr_schedule == "step":
            epoch = it // max(1, iters_per_epoch)
            decay = cfg.lr_gamma ** sum(epoch >= s for s in cfg.lr_steps)
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * min(it, total) / total))
        if it < cfg.warmup_iters:
            decay *= cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * it / cfg.warmup_iters
        return decay

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, iters_per_epoch: int):
    """A per-iteration LambdaLR implementing ``lr_factor``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, iters_per_epoch))
