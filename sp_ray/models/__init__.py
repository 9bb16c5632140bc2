"""Model families: one plain dict, ``FAMILIES``, maps ``model.name`` to what builds, post-processes and
pre-trains that family.

This is the only place that reads the model and loss sections of the config; every module below
takes plain keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from sp_ray.config import Config, ConfigError
from sp_ray.models.instance_unique import (
    KNET_MASK_HEAD,
    MASK2FORMER_MASK_HEAD,
    QueryMaskHead,
    build_instance_unique,
    instance_unique_enabled,
)
from sp_ray.models.knet import MASK_STRIDE as KNET_STRIDE
from sp_ray.models.knet import build_knet
from sp_ray.models.losses import KNetCriterion, ModelLosses
from sp_ray.models.mask2former import MASK_STRIDE as MASK2FORMER_STRIDE
from sp_ray.models.mask2former import build_mask2former
from sp_ray.models.mask2former_losses import Mask2FormerCriterion, Mask2FormerMatcher
from sp_ray.models.maskrcnn import build_maskrcnn, postprocess_maskrcnn
from sp_ray.models.matcher import HungarianMatcher
from sp_ray.models.postprocess import postprocess
from sp_ray.models.queryinst import MASK_STRIDE as QUERYINST_STRIDE
from sp_ray.models.queryinst import build_queryinst
from sp_ray.models.queryinst_losses import BoxHungarianMatcher, QueryInstCriterion
from sp_ray.pretrain.sp_model import build_sp_pretrainer


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
        init_dice_weight=loss.init_dice_weight, mask_loss=loss.mask_loss,
        projection_weight=loss.projection_weight, avg_projection_weight=loss.avg_projection_weight,
        pairwise_weight=loss.pairwise_weight, pairwise_color_threshold=loss.pairwise_color_threshold,
        pairwise_warmup_iters=loss.pairwise_warmup_iters,
    )
    return model, criterion


def build_mask2former_and_criterion(cfg: Config) -> tuple[nn.Module, nn.Module]:
    """Mask2Former: num_kernels queries, num_stages decoder layers; the loss section's cls/mask/dice weights
    and costs, no_object_weight and the point-sampling settings."""
    m, loss = cfg.model, cfg.loss
    if loss.mask_loss != "full":
        raise ConfigError(f"loss.mask_loss {loss.mask_loss!r} is K-Net only; Mask2Former uses 'full'")
    model = build_mask2former(
        num_classes=m.num_classes, depth=m.depth, backbone_weights=m.backbone_weights,
        frozen_stages=m.frozen_stages, norm_eval=m.norm_eval, num_queries=m.num_kernels,
        num_layers=m.num_stages, feat_channels=m.feat_channels, num_heads=m.num_heads,
        ffn_channels=m.ffn_channels, encoder_layers=m.encoder_layers,
        encoder_ffn_channels=m.encoder_ffn_channels, deform_points=m.deform_points,
    )
    matcher = Mask2FormerMatcher(
        cost_class=loss.cost_class, cost_mask=loss.cost_mask, cost_dice=loss.cost_dice, num_points=loss.num_points
    )
    criterion = Mask2FormerCriterion(
        num_classes=m.num_classes, matcher=matcher, cls_weight=loss.cls_weight, mask_weight=loss.mask_weight,
        dice_weight=loss.dice_weight, no_object_weight=loss.no_object_weight, num_points=loss.num_points,
        oversample_ratio=loss.oversample_ratio, importance_sample_ratio=loss.importance_sample_ratio,
    )
    return model, criterion


def build_queryinst_and_criterion(cfg: Config) -> tuple[nn.Module, nn.Module]:
    """QueryInst: num_kernels queries, num_stages dynamic stages; cls/L1/GIoU weights and costs, and the RoI
    masks' BCE (mask_weight) and dice (dice_weight)."""
    m, loss = cfg.model, cfg.loss
    if loss.mask_loss != "full":
        raise ConfigError(f"loss.mask_loss {loss.mask_loss!r} is K-Net only; QueryInst uses 'full'")
    model = build_queryinst(
        num_classes=m.num_classes, depth=m.depth, backbone_weights=m.backbone_weights,
        frozen_stages=m.frozen_stages, norm_eval=m.norm_eval, num_queries=m.num_kernels,
        num_stages=m.num_stages, feat_channels=m.feat_channels, dynamic_channels=m.dynamic_channels,
        ffn_channels=m.ffn_channels, num_heads=m.num_heads,
    )
    matcher = BoxHungarianMatcher(cost_class=loss.cost_class, cost_l1=loss.cost_l1, cost_giou=loss.cost_giou)
    criterion = QueryInstCriterion(
        num_classes=m.num_classes, matcher=matcher, cls_weight=loss.cls_weight, l1_weight=loss.l1_weight,
        giou_weight=loss.giou_weight, mask_weight=loss.mask_weight, dice_weight=loss.dice_weight,
    )
    return model, criterion


def build_maskrcnn_and_criterion(cfg: Config) -> tuple[nn.Module, nn.Module]:
    """torchvision Mask R-CNN computes its own losses: the criterion passes the model's loss dict through."""
    m = cfg.model
    model = build_maskrcnn(
        num_classes=m.num_classes, depth=m.depth, backbone_weights=m.backbone_weights,
        frozen_stages=m.frozen_stages, norm_eval=m.norm_eval, detections_per_image=cfg.eval.topk,
    )
    return model, ModelLosses()


@dataclass(frozen=True)
class ModelFamily:
    """What the rest of sp-ray needs to know about one model family.

    Attributes:
        build: cfg -> (model, criterion).
        postprocess: the model's evaluation output -> per-image instances in original pixels:
            fn(outputs, *, image_sizes, orig_sizes, k, mask_threshold, score_threshold) -> list of dicts with
            scores [k'], labels [k'], masks bool [k', H0, W0], boxes [k', 4].
        mask_stride: stride of ``pred_masks`` relative to the input; None for per-RoI masks (Mask R-CNN).
        sp_pretrainer: fn(cfg, model, criterion) wrapping the built model for saliency-prompt pre-training
            (``pretrain.enabled``; the wrapper computes its losses, its criterion is ``ModelLosses``), or
            None where the family has no queries to prompt.
        query_mask_head: how its final queries make masks from per-pixel features, for the inter-scene loss
            of instance-unique querying; None where masks come from RoI features (QueryInst: equivariance
            losses only) or there are no queries.
    """

    build: Callable[[Config], tuple[nn.Module, nn.Module]]
    postprocess: Callable[..., list[dict]]
    mask_stride: int | None
    sp_pretrainer: Callable[[Config, nn.Module, nn.Module], tuple[nn.Module, nn.Module]] | None = None
    query_mask_head: QueryMaskHead | None = None


FAMILIES: dict[str, ModelFamily] = {
    "knet": ModelFamily(build_knet_and_criterion, partial(postprocess, mask_stride=KNET_STRIDE), KNET_STRIDE,
                        build_sp_pretrainer, KNET_MASK_HEAD),
    "mask2former": ModelFamily(build_mask2former_and_criterion, partial(postprocess, mask_stride=MASK2FORMER_STRIDE),
                               MASK2FORMER_STRIDE, build_sp_pretrainer, MASK2FORMER_MASK_HEAD),
    "queryinst": ModelFamily(build_queryinst_and_criterion, partial(postprocess, mask_stride=QUERYINST_STRIDE),
                             QUERYINST_STRIDE, build_sp_pretrainer),
    "maskrcnn": ModelFamily(build_maskrcnn_and_criterion, postprocess_maskrcnn, None),
}


def model_family(name: str) -> ModelFamily:
    """``FAMILIES[name]``, or an error listing the known names."""
    if name not in FAMILIES:
        raise ConfigError(f"model.name {name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def build_model(cfg: Config) -> tuple[nn.Module, nn.Module]:
    """Build ``(model, criterion)`` for ``cfg.model.name``; ``cfg.model.num_classes`` must be resolved (> 0).

    With ``pretrain.enabled`` the model is wrapped by its family's ``sp_pretrainer``; with an ``iuq`` weight
    > 0, by ``InstanceUniqueTrainer`` (``sp_ray.models.instance_unique``).
    """
    family = model_family(cfg.model.name)
    if cfg.model.num_classes <= 0:
        raise ValueError("model.num_classes must be set (> 0) before building; finetune takes it from the data")
    model, criterion = family.build(cfg)
    if instance_unique_enabled(cfg.iuq):
        return build_instance_unique(cfg, model, criterion, family.query_mask_head)
    if cfg.pretrain.enabled:
        if family.sp_pretrainer is None:
            supported = sorted(name for name, f in FAMILIES.items() if f.sp_pretrainer is not None)
            raise ConfigError(
                f"saliency-prompt pre-training supports model.name {supported}, got {cfg.model.name!r}"
            )
        return family.sp_pretrainer(cfg, model, criterion)
    return model, criterion
