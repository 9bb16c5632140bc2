"""Model families: one plain dict maps ``model.name`` to the function that builds model and criterion.

This is the only place that reads the model and loss sections of the config; every module below
takes plain keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from sp_ray.config import Config
from sp_ray.models.knet import build_knet
from sp_ray.models.losses import KNetCriterion
from sp_ray.models.matcher import HungarianMatcher


def build_knet_and_criterion(cfg: Config) -> tuple[nn.Module, nn.Module]:
    m, loss = cfg.model, cfg.loss
    model = build_knet(
        num_classes=m.num_classes, depth=m.depth, backbone_weights=m.backbone_weights,
        frozen_stages=m.frozen_stages, norm_eval=m.norm_eval, num_kernels=m.num_kernels,
        num_stages=m.num_stages, feat_channels=m.feat_channels, ffn_channels=m.ffn_channels,
        num_heads=m.num_heads,
    )
    matcher = HungarianMatcher(cost_class=loss.cost_class, cost_dice=loss.cost_dice, cost_mask=loss.cost_mask)
    criterion = KNetCriterion(
        num_classes=m.num_classes, matcher=matcher, cls_weight=loss.cls_weight, mask_weight=loss.mask_weight,
        dice_weight=loss.dice_weight, init_mask_weight=loss.init_mask_weight,
        init_dice_weight=loss.init_dice_weight,
    )
    return model, criterion


MODEL_BUILDERS: dict[str, Callable[[Config], tuple[nn.Module, nn.Module]]] = {
    "knet": build_knet_and_criterion,
}


def build_model(cfg: Config) -> tuple[nn.Module, nn.Module]:
    """Build ``(model, criterion)`` for ``cfg.model.name``; ``cfg.model.num_classes`` must be resolved (> 0)."""
    if cfg.model.name not in MODEL_BUILDERS:
        raise ValueError(f"model.name {cfg.model.name!r} is not one of {sorted(MODEL_BUILDERS)}")
    if cfg.model.num_classes <= 0:
        raise ValueError("model.num_classes must be set (> 0) before building; finetune takes it from the data")
    return MODEL_BUILDERS[cfg.model.name](cfg)
