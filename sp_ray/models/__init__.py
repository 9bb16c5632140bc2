"""Model families: one plain dict maps ``model.name`` to the function that builds model and criterion.

This is the only place that reads the model and loss sections of the config; every module below
takes plain keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from sp_ray.config import Config
from sp_ray.models.knet import build_knet
from sp_ray.models.losses import KNetCriterion, ModelLosses
from sp_ray.models.maskrcnn import build_maskrcnn, postprocess_maskrcnn
from sp_ray.models.matcher import HungarianMatcher
from sp_ray.models.postprocess import postprocess
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
        init_dice_weight=loss.init_dice_weight,
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


MODEL_BUILDERS: dict[str, Callable[[Config], tuple[nn.Module, nn.Module]]] = {
    "knet": build_knet_and_criterion,
    "maskrcnn": build_maskrcnn_and_criterion,
}

# model.name -> post-processing of the model's evaluation output into per-image instances in original
# pixels: fn(outputs, *, image_sizes, orig_sizes, k, mask_threshold, score_threshold) -> list of dicts
# with scores [k'], labels [k'], masks bool [k', H0, W0], boxes [k', 4].
POSTPROCESSORS: dict[str, Callable[..., list[dict]]] = {
    "knet": postprocess,
    "maskrcnn": postprocess_maskrcnn,
}


# model.name -> fn(cfg, model, criterion) wrapping a built model for saliency-prompt pre-training
# (``pretrain.enabled``); the wrapper computes its own losses, its criterion is ``ModelLosses``.
PRETRAINERS: dict[str, Callable[[Config, nn.Module, nn.Module], tuple[nn.Module, nn.Module]]] = {
    "knet": build_sp_pretrainer,
}


def build_model(cfg: Config) -> tuple[nn.Module, nn.Module]:
    """Build ``(model, criterion)`` for ``cfg.model.name``; ``cfg.model.num_classes`` must be resolved (> 0).

    With ``pretrain.enabled`` the model is wrapped by ``PRETRAINERS[cfg.model.name]``.
    """
    if cfg.model.name not in MODEL_BUILDERS:
        raise ValueError(f"model.name {cfg.model.name!r} is not one of {sorted(MODEL_BUILDERS)}")
    if cfg.model.num_classes <= 0:
        raise ValueError("model.num_classes must be set (> 0) before building; finetune takes it from the data")
    model, criterion = MODEL_BUILDERS[cfg.model.name](cfg)
    if cfg.pretrain.enabled:
        if cfg.model.name not in PRETRAINERS:
            raise ValueError(
                f"saliency-prompt pre-training supports model.name {sorted(PRETRAINERS)}, "
                f"got {cfg.model.name!r}"
            )
        return PRETRAINERS[cfg.model.name](cfg, model, criterion)
    return model, criterion
