"""Training objectives beside the pure models: what turns ``model(images)`` into a loss dict.

```python
model = build_model(cfg)                      # sp_ray.models, pure
objective = build_objective(cfg, model)       # built after the model (the order of random-number use)
trainable = Trainable(model, objective)       # the one module DDP sees
losses = trainable(images, targets)           # objective(model, images, targets)
```

``build_objective`` gives the fine-tuning objective of ``cfg.model.name``: the family's set criterion
(``SetObjective``), with an ``iuq`` weight > 0 the ``IUQObjective`` around it, for Mask R-CNN torchvision's
losses (``MaskRCNNObjective``). Saliency-prompt pre-training has its own objective,
``sp_ray.pretrain.sp_objective.build_sp_objective``, which ``sp-ray pretrain`` chooses.
``CRITERIA`` maps each family with a set criterion to its builder, ``cfg -> criterion``; this is the place that
reads the loss section of the config.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from sp_ray.config import Config, ConfigError
from sp_ray.models import model_family
from sp_ray.objectives.instance_unique import IUQObjective, build_iuq_objective, instance_unique_enabled
from sp_ray.objectives.knet_criterion import KNetCriterion
from sp_ray.objectives.mask2former_criterion import Mask2FormerCriterion, Mask2FormerMatcher
from sp_ray.objectives.maskrcnn import MaskRCNNObjective
from sp_ray.objectives.matcher import HungarianMatcher
from sp_ray.objectives.queryinst_criterion import BoxHungarianMatcher, QueryInstCriterion
from sp_ray.objectives.trainable import SetObjective, Trainable

__all__ = ["CRITERIA", "IUQObjective", "MaskRCNNObjective", "SetObjective", "Trainable", "build_criterion",
           "build_objective"]


def build_knet_criterion(cfg: Config) -> nn.Module:
    m, loss = cfg.model, cfg.loss
    matcher = HungarianMatcher(cost_class=loss.cost_class, cost_dice=loss.cost_dice, cost_mask=loss.cost_mask)
    return KNetCriterion(
        num_classes=m.num_classes, matcher=matcher, cls_weight=loss.cls_weight, mask_weight=loss.mask_weight,
        dice_weight=loss.dice_weight, init_mask_weight=loss.init_mask_weight,
        init_dice_weight=loss.init_dice_weight, mask_loss=loss.mask_loss,
        projection_weight=loss.projection_weight, avg_projection_weight=loss.avg_projection_weight,
        pairwise_weight=loss.pairwise_weight, pairwise_color_threshold=loss.pairwise_color_threshold,
        pairwise_warmup_iters=loss.pairwise_warmup_iters,
    )


def build_mask2former_criterion(cfg: Config) -> nn.Module:
    """The loss section's cls/mask/dice weights and costs, no_object_weight and the point-sampling settings."""
    m, loss = cfg.model, cfg.loss
    matcher = Mask2FormerMatcher(
        cost_class=loss.cost_class, cost_mask=loss.cost_mask, cost_dice=loss.cost_dice, num_points=loss.num_points
    )
    return Mask2FormerCriterion(
        num_classes=m.num_classes, matcher=matcher, cls_weight=loss.cls_weight, mask_weight=loss.mask_weight,
        dice_weight=loss.dice_weight, no_object_weight=loss.no_object_weight, num_points=loss.num_points,
        oversample_ratio=loss.oversample_ratio, importance_sample_ratio=loss.importance_sample_ratio,
    )


def build_queryinst_criterion(cfg: Config) -> nn.Module:
    """cls/L1/GIoU weights and costs, and the RoI masks' BCE (mask_weight) and dice (dice_weight)."""
    m, loss = cfg.model, cfg.loss
    matcher = BoxHungarianMatcher(cost_class=loss.cost_class, cost_l1=loss.cost_l1, cost_giou=loss.cost_giou)
    return QueryInstCriterion(
        num_classes=m.num_classes, matcher=matcher, cls_weight=loss.cls_weight, l1_weight=loss.l1_weight,
        giou_weight=loss.giou_weight, mask_weight=loss.mask_weight, dice_weight=loss.dice_weight,
    )


# model.name -> cfg -> its set criterion; Mask R-CNN has none (torchvision computes its losses).
CRITERIA: dict[str, Callable[[Config], nn.Module]] = {
    "knet": build_knet_criterion,
    "mask2former": build_mask2former_criterion,
    "queryinst": build_queryinst_criterion,
}


def build_criterion(cfg: Config) -> nn.Module:
    """The set criterion of ``cfg.model.name`` (``ConfigError`` for a family without one)."""
    model_family(cfg.model.name)  # an unknown name: the error listing the known ones
    if cfg.model.name not in CRITERIA:
        raise ConfigError(f"model.name {cfg.model.name!r} has no set criterion; families with one: {sorted(CRITERIA)}")
    return CRITERIA[cfg.model.name](cfg)


def build_objective(cfg: Config, model: nn.Module) -> nn.Module:
    """The fine-tuning objective of ``cfg`` for its built ``model`` (build the model first).

    Args:
        cfg: resolved config (``model.num_classes`` > 0).
        model: ``build_model(cfg)``.

    Returns:
        ``MaskRCNNObjective`` (Mask R-CNN), ``IUQObjective`` (an ``iuq`` weight > 0) or ``SetObjective``.

    Raises:
        ConfigError: a pre-training config (its objective is ``build_sp_objective``), a bad ``iuq`` setting,
            or a loss setting the family cannot use.
    """
    family = model_family(cfg.model.name)
    if cfg.pretrain.enabled and not instance_unique_enabled(cfg.iuq):
        raise ConfigError(
            "pretrain.enabled: the saliency-prompt objective is sp_ray.pretrain.sp_objective.build_sp_objective "
            "('sp-ray pretrain'); fine-tuning objectives need pretrain.enabled=false"
        )
    if cfg.model.name not in CRITERIA:
        if instance_unique_enabled(cfg.iuq):
            return build_iuq_objective(cfg, model, None, family.query_mask_head)  # raises: not a query model
        return MaskRCNNObjective()
    criterion = build_criterion(cfg)
    if instance_unique_enabled(cfg.iuq):
        return build_iuq_objective(cfg, model, criterion, family.query_mask_head)
    return SetObjective(criterion)
