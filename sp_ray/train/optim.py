"""AdamW with a backbone learning-rate multiplier and weight-decay factors, linear warmup, then step or cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from sp_ray.config import TrainConfig
from sp_ray.objectives import Trainable

NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
               nn.InstanceNorm2d)


def _decay_kind(module: nn.Module, name: str) -> str:
    """"norm", "embed" or "other": which weight-decay factor applies to ``module``'s own parameter ``name``."""
    if isinstance(module, NORM_LAYERS):
        return "norm"
    if isinstance(module, nn.Embedding) or name.endswith("_embed"):
        return "embed"
    return "other"


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, grouped by learning rate and weight decay.

    Parameters under ``backbone.`` get ``lr * backbone_lr_mult``; those of normalisation layers get
    ``weight_decay * norm_decay_mult``, learned embeddings ``weight_decay * embed_decay_mult``. Given a
    ``Trainable``, the names are those of its model (``model.backbone.``), and the objective's parameters (the
    SP prompt encoder and projection) follow the model's in each group. This is mmdet's
    ``paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=...), 'query_embed': dict(decay_mult=...), ...},
    norm_decay_mult=...)``.
    """
    model = model.module if hasattr(model, "module") else model
    backbone = "model.backbone." if isinstance(model, Trainable) else "backbone."
    decay_mult = {"norm": cfg.norm_decay_mult, "embed": cfg.embed_decay_mult, "other": 1.0}
    # (in the backbone, decay factor) -> parameters; the head group of full decay comes first, as the one whose
    # lr the logs show, and with every factor 1 the groups are those of earlier checkpoints (head, backbone).
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # a tied parameter is optimised once
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{name}" if module_name else name
            in_backbone = full_name.startswith(backbone)
            groups.setdefault((in_backbone, decay_mult[_decay_kind(module, name)]), []).append(param)
    ordered = sorted(groups.items(), key=lambda item: (item[0][0], -item[0][1]))
    return torch.optim.AdamW([
        {"params": params, "lr": cfg.lr * (cfg.backbone_lr_mult if in_backbone else 1.0),
         "weight_decay": cfg.weight_decay * decay}
        for (in_backbone, decay), params in ordered
    ], lr=cfg.lr, weight_decay=cfg.weight_decay)


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
