"""Model families: one plain dict, ``FAMILIES``, maps ``model.name`` to what builds and post-processes
that family's model.

Models are pure: ``model(images)`` -> outputs, no targets and no losses (those are the objectives of
``sp_ray.objectives``). This is the only place that reads the model section of the config; every module
below takes plain keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from sp_ray.config import Config, ConfigError
from sp_ray.models.instance_unique import KNET_MASK_HEAD, MASK2FORMER_MASK_HEAD, QueryMaskHead
from sp_ray.models.knet import MASK_STRIDE as KNET_STRIDE
from sp_ray.models.knet import build_knet
from sp_ray.models.mask2former import MASK_STRIDE as MASK2FORMER_STRIDE
from sp_ray.models.mask2former import build_mask2former
from sp_ray.models.maskrcnn import build_maskrcnn, postprocess_maskrcnn
from sp_ray.models.postprocess import postprocess
from sp_ray.models.queryinst import MASK_STRIDE as QUERYINST_STRIDE
from sp_ray.models.queryinst import build_queryinst


def build_knet_model(cfg: Config) -> nn.Module:
    m = cfg.model
    return build_knet(
        num_classes=m.num_classes, depth=m.depth, backbone_weights=m.backbone_weights,
        frozen_stages=m.frozen_stages, norm_eval=m.norm_eval, num_kernels=m.num_kernels,
        num_stages=m.num_stages, feat_channels=m.feat_channels, ffn_channels=m.ffn_channels,
        num_heads=m.num_heads,
    )


def build_mask2former_model(cfg: Config) -> nn.Module:
    """Mask2Former: num_kernels queries, num_stages decoder layers."""
    m = cfg.model
    return build_mask2former(
        num_classes=m.num_classes, depth=m.depth, backbone_weights=m.backbone_weights,
        frozen_stages=m.frozen_stages, norm_eval=m.norm_eval, num_queries=m.num_kernels,
        num_layers=m.num_stages, feat_channels=m.feat_channels, num_heads=m.num_heads,
        ffn_channels=m.ffn_channels, encoder_layers=m.encoder_layers,
        encoder_ffn_channels=m.encoder_ffn_channels, deform_points=m.deform_points,
    )


def build_queryinst_model(cfg: Config) -> nn.Module:
    """QueryInst: num_kernels queries, num_stages dynamic stages."""
    m = cfg.model
    return build_queryinst(
        num_classes=m.num_classes, depth=m.depth, backbone_weights=m.backbone_weights,
        frozen_stages=m.frozen_stages, norm_eval=m.norm_eval, num_queries=m.num_kernels,
        num_stages=m.num_stages, feat_channels=m.feat_channels, dynamic_channels=m.dynamic_channels,
        ffn_channels=m.ffn_channels, num_heads=m.num_heads,
    )


def build_maskrcnn_model(cfg: Config) -> nn.Module:
    """torchvision's Mask R-CNN; its losses are ``sp_ray.objectives.maskrcnn.MaskRCNNObjective``."""
    m = cfg.model
    return build_maskrcnn(
        num_classes=m.num_classes, depth=m.depth, backbone_weights=m.backbone_weights,
        frozen_stages=m.frozen_stages, norm_eval=m.norm_eval, detections_per_image=cfg.eval.topk,
    )


@dataclass(frozen=True)
class ModelFamily:
    """What the rest of sp-ray needs to know about one model family.

    Attributes:
        build: cfg -> the model, pure: ``model(images)`` -> its outputs (its training losses are an objective
            of ``sp_ray.objectives``, built by ``sp_ray.objectives.build_objective``).
        postprocess: the model's evaluation output -> per-image instances in original pixels:
            fn(outputs, *, image_sizes, orig_sizes, k, mask_threshold, score_threshold) -> list of dicts with
            scores [k'], labels [k'], masks bool [k', H0, W0], boxes [k', 4].
        mask_stride: stride of ``pred_masks`` relative to the input; None for per-RoI masks (Mask R-CNN).
        promptable: whether the model implements the prompt protocol of saliency-prompt pre-training
            (``sp_ray.pretrain.sp_objective.PromptableModel``); False where it has no queries to prompt.
        query_mask_head: how its final queries make masks from per-pixel features, for the inter-scene loss
            of instance-unique querying; None where masks come from RoI features (QueryInst: equivariance
            losses only) or there are no queries.
    """

    build: Callable[[Config], nn.Module]
    postprocess: Callable[..., list[dict]]
    mask_stride: int | None
    promptable: bool = False
    query_mask_head: QueryMaskHead | None = None


FAMILIES: dict[str, ModelFamily] = {
    "knet": ModelFamily(build_knet_model, partial(postprocess, mask_stride=KNET_STRIDE), KNET_STRIDE,
                        True, KNET_MASK_HEAD),
    "mask2former": ModelFamily(build_mask2former_model, partial(postprocess, mask_stride=MASK2FORMER_STRIDE),
                               MASK2FORMER_STRIDE, True, MASK2FORMER_MASK_HEAD),
    "queryinst": ModelFamily(build_queryinst_model, partial(postprocess, mask_stride=QUERYINST_STRIDE),
                             QUERYINST_STRIDE, True),
    "maskrcnn": ModelFamily(build_maskrcnn_model, postprocess_maskrcnn, None),
}


def model_family(name: str) -> ModelFamily:
    """``FAMILIES[name]``, or an error listing the known names."""
    if name not in FAMILIES:
        raise ConfigError(f"model.name {name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def build_model(cfg: Config) -> nn.Module:
    """Build the model of ``cfg.model.name``; ``cfg.model.num_classes`` must be resolved (> 0).

    The model is pure, the same for fine-tuning, pre-training, evaluation and export:
    ``model(images)`` -> ``ModelOutputs`` (Mask R-CNN: its detections). What training adds (criterion,
    SP prompts and projection, IUQ memory) is the objective, ``sp_ray.objectives.build_objective`` or
    ``sp_ray.pretrain.sp_objective.build_sp_objective``, built after the model.
    """
    family = model_family(cfg.model.name)
    if cfg.model.num_classes <= 0:
        raise ValueError("model.num_classes must be set (> 0) before building; finetune takes it from the data")
    return family.build(cfg)
