"""The SP pre-training objective: what exists only in pre-training (prompts, the L_ker projection) beside a
pure QEIS detector.

``SPObjective(model, images, targets)`` runs the detector once: its features give the prompts (P5 pooled in
each pseudo mask's box, or the image prompt), the prompts are matched to K^0 and added to it, the same
stages run on the prompted kernels, and the criterion's Hungarian matches of every stage pair the kernels
with the saliency queries for L_ker. It returns the loss dict; training runs it as
``Trainable(model, objective)``. ``sp-ray pretrain`` chooses it (``build_sp_objective``), ``sp-ray finetune``
the family's objective (``sp_ray.objectives.build_objective``).

Any detector that implements the ``PromptableModel`` protocol can be pre-trained (K-Net, Mask2Former,
QueryInst):

- ``forward_features(images)`` -> an object with ``fpn`` (a list whose last entry, float [B, D, H/32, W/32],
  gives the feature prompts) and ``init_kernels`` K^0, float [B, N, D];
- ``forward_from_features(features, kernel_offsets)`` -> ``ModelOutputs``, with the offsets [B, N, D] added to
  K^0 before the first stage; ``pred_kernels`` of ``aux_outputs`` and of the top level are K^1 .. K^S;
- ``feat_channels`` (D), ``backbone`` (C2..C5 of a normalised image, ``out_channels``), ``pixel_mean`` and
  ``pixel_std`` (the normalisation of RGB 0..255 inputs);

and its criterion takes ``criterion(outputs, targets, return_matches=True)`` and returns ``(losses, matches)``
with the matches of [stage 0 (initial prediction), stage 1, .., stage S], each B pairs (pred_idx, tgt_idx).

A pre-training checkpoint holds the plain detector in ``model.pt`` and the objective's tensors
(``projection.*``, ``prompt_encoder.*``) in ``objective.pt``: ``finetune --init`` reads the model only.
Nothing of the prompts is in the fine-tuned or exported model.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from sp_ray.config import Config, ConfigError, PretrainConfig
from sp_ray.models import FAMILIES, model_family
from sp_ray.models.knet import SIZE_DIVISOR
from sp_ray.objectives import build_criterion
from sp_ray.objectives.instance_unique import instance_unique_enabled
from sp_ray.pretrain.kernel_loss import SaliencyProjection, angle_preservation_loss, kernel_supervision_loss
from sp_ray.pretrain.prompts import (
    PROMPT_RULES,
    ImagePromptEncoder,
    feature_prompts,
    match_prompts_to_kernels,
)
from sp_ray.types import ModelOutputs, Target

PROMPT_SOURCES = ("feature", "image")
KERNEL_PROJECTIONS = ("fixed", "learned")


class PromptableModel(Protocol):
    """What SP pre-training needs of a detector (see the module docstring)."""

    backbone: nn.Module
    feat_channels: int
    pixel_mean: Tensor
    pixel_std: Tensor

    def forward_features(self, images: Tensor) -> Any: ...

    def forward_from_features(self, features: Any, kernel_offsets: Tensor | None = None) -> ModelOutputs: ...


_PROTOCOL_ATTRIBUTES = ("forward_features", "forward_from_features", "feat_channels", "backbone", "pixel_mean",
                        "pixel_std")


def check_promptable(model: nn.Module, criterion: nn.Module, name: str) -> None:
    """Raise ``ConfigError`` unless ``model`` implements ``PromptableModel`` and ``criterion`` returns matches.

    Args:
        model: the built detector.
        criterion: its criterion.
        name: ``model.name``, for the message.
    """
    missing = [attr for attr in _PROTOCOL_ATTRIBUTES if not hasattr(model, attr)]
    if "return_matches" not in inspect.signature(criterion.forward).parameters:
        missing.append("criterion(..., return_matches=True)")
    if missing:
        raise ConfigError(
            f"SP pre-training needs a detector with the prompt protocol of sp_ray.pretrain.sp_objective; "
            f"model.name {name!r} lacks {missing}"
        )


class SPObjective(nn.Module):
    """A detector's objective on pseudo masks with saliency prompts and kernel supervision (SP, METHODS.md 1.2-1.4).

    Args:
        criterion: the detector's set criterion (Hungarian matching, objectness, mask losses), with
            ``return_matches``.
        projection: Linear(S_l) of L_ker, from the query width C to the kernel width D.
        prompt_encoder: the image-prompt encoder, or None for feature prompts (P5 pooled in the box).
        prompt_rule: "cosine" or "fixed" (``match_prompts_to_kernels``).
        prompt_drop: probability that a kernel gets no prompt.
        num_prompts: tiling length of the fixed rule and cap on prompts per image.
        kernel_loss_weight: weight of every stage's L_ker.
        angle_weight: weight of ``angle_preservation_loss`` (used with a learned projection only).
    """

    def __init__(
        self,
        *,
        criterion: nn.Module,
        projection: SaliencyProjection,
        prompt_encoder: ImagePromptEncoder | None = None,
        prompt_rule: str = "cosine",
        prompt_drop: float = 0.1,
        num_prompts: int = 20,
        kernel_loss_weight: float = 1.0,
        angle_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if prompt_rule not in PROMPT_RULES:
            raise ValueError(f"prompt_rule must be one of {PROMPT_RULES}, got {prompt_rule!r}")
        # Registered in this order (optimizer groups, gradient clipping, state-dict keys of old checkpoints).
        self.criterion = criterion
        self.projection = projection
        self.prompt_encoder = prompt_encoder
        self.prompt_rule = prompt_rule
        self.prompt_drop = prompt_drop
        self.num_prompts = num_prompts
        self.kernel_loss_weight = kernel_loss_weight
        self.angle_weight = angle_weight

    def prompts(self, model: PromptableModel, images: Tensor, p5: Tensor, boxes: list[Tensor]) -> list[Tensor]:
        """The prompts P_l of every image: B tensors float [L_b, D] for the targets' boxes."""
        if self.prompt_encoder is None:
            return feature_prompts(p5, boxes, stride=SIZE_DIVISOR)

        def c5(crops: Tensor) -> Tensor:
            return model.backbone((crops - model.pixel_mean) / model.pixel_std)[-1]

        return self.prompt_encoder(images, boxes, c5)

    def forward(self, model: PromptableModel, images: Tensor, targets: list[Target]) -> dict[str, Tensor]:
        """Prompted detector forward and every pre-training loss.

        Args:
            model: the ``PromptableModel`` (class-agnostic: one class, "object"), its kernels of width
                ``projection``'s output.
            images: float [B, 3, H, W], RGB 0..255, padded to multiples of 32.
            targets: B ``Target`` dicts of pseudo masks (labels all 0) with ``queries`` float [K_b, C],
                the saliency query S_l of each pseudo mask.

        Returns:
            The criterion's losses (K-Net: ``loss_mask_s0``, ``loss_dice_s0``, ``loss_cls_s{i}``,
            ``loss_mask_s{i}``, ``loss_dice_s{i}``; Mask2Former also ``loss_cls_s0``) plus ``loss_ker_s{i}``
            for i = 1..S and, with a learned projection, ``loss_ker_angle``; float32 scalars, weighted.
        """
        missing = [b for b, t in enumerate(targets) if "queries" not in t]
        if missing:
            raise ValueError(
                f"pre-training targets of images {missing} have no 'queries' (the saliency query of each "
                "pseudo mask); build the dataset with extra_per_annotation = the prompts.npy of "
                "'sp-ray propose'"
            )
        if self.projection.weight.shape[0] != model.feat_channels:
            raise ValueError(
                f"the L_ker projection maps to {self.projection.weight.shape[0]} channels but the kernels have "
                f"{model.feat_channels}"
            )
        features = model.forward_features(images)
        prompts = self.prompts(model, images, features.fpn[-1], [t["boxes"] for t in targets])
        offsets = match_prompts_to_kernels(
            features.init_kernels,
            prompts,
            rule=self.prompt_rule,
            drop_prob=self.prompt_drop,
            num_prompts=self.num_prompts,
        )
        outputs = model.forward_from_features(features, offsets)
        # Losses in float32 outside autocast: bf16 sums over many pixels would blur them.
        with torch.autocast(device_type=images.device.type, enabled=False):
            outputs = _float32(outputs)
            losses, matches = self.criterion(outputs, targets, return_matches=True)
            stage_kernels = [stage["pred_kernels"] for stage in outputs["aux_outputs"]] + [
                outputs["pred_kernels"]
            ]
            queries = [t["queries"].to(images.device) for t in targets]
            losses.update(
                kernel_supervision_loss(
                    stage_kernels, queries, matches[1:], self.projection, weight=self.kernel_loss_weight
                )
            )
            if self.projection.learned and self.angle_weight > 0:
                all_queries = torch.cat(queries)
                losses["loss_ker_angle"] = self.angle_weight * angle_preservation_loss(
                    all_queries, self.projection(all_queries)
                )
        return losses


def _float32(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.float()
    if isinstance(tree, dict):
        return {k: _float32(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_float32(v) for v in tree]
    return tree


def check_pretrain_config(cfg: Config) -> None:
    """Raise ``ConfigError`` naming the key when the pre-training settings cannot work."""
    p: PretrainConfig = cfg.pretrain
    choices = (
        ("prompt_rule", PROMPT_RULES),
        ("prompt_source", PROMPT_SOURCES),
        ("kernel_projection", KERNEL_PROJECTIONS),
    )
    for key, allowed in choices:
        if getattr(p, key) not in allowed:
            raise ConfigError(f"pretrain.{key} must be one of {allowed}, got {getattr(p, key)!r}")
    if not 0.0 <= p.prompt_drop < 1.0:
        raise ConfigError(f"pretrain.prompt_drop must be in [0, 1), got {p.prompt_drop}")
    if p.num_prompts < 1:
        raise ConfigError(f"pretrain.num_prompts must be >= 1, got {p.num_prompts}")
    if p.image_prompt_size < SIZE_DIVISOR:
        raise ConfigError(f"pretrain.image_prompt_size must be >= {SIZE_DIVISOR}, got {p.image_prompt_size}")
    if cfg.data.val_annotations:
        raise ConfigError(
            "data.val_annotations must be empty in pre-training: pseudo masks have no validation set; "
            "evaluate the fine-tuned model instead"
        )


def prompts_path(cfg: Config) -> Path:
    """``pretrain.prompts``, or ``prompts.npy`` next to ``data.train_annotations`` (propose's layout)."""
    if cfg.pretrain.prompts:
        return Path(cfg.pretrain.prompts)
    return Path(cfg.data.train_annotations).with_name("prompts.npy")


def load_saliency_queries(cfg: Config) -> np.ndarray:
    """The saliency queries of the pseudo masks, memory-mapped (COCO-scale files do not fit in memory).

    Returns:
        float32 [n, C]; row id - 1 is the query S of annotation ``id`` of ``data.train_annotations``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is not a 2-D float32 array.
    """
    path = prompts_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(
            f"saliency queries {path} do not exist: set pretrain.prompts to the prompts.npy that "
            "'sp-ray propose' wrote next to its annotations.json"
        )
    queries = np.load(path, mmap_mode="r")
    if queries.ndim != 2 or queries.dtype != np.float32:
        raise ValueError(f"{path} must hold a float32 [n, C] array, got {queries.dtype} {queries.shape}")
    return queries


def build_sp_objective(cfg: Config, model: nn.Module) -> SPObjective:
    """The SP pre-training objective of a built detector (build the model first): criterion, prompt encoder,
    projection, constructed in that order.

    Args:
        cfg: resolved config with the ``pretrain`` section; ``pretrain.prompts`` (or its default) must exist,
            its width is the query width C of the L_ker projection.
        model: the detector of ``cfg.model``, a ``PromptableModel`` (K-Net, Mask2Former, QueryInst).

    Returns:
        The ``SPObjective``.

    Raises:
        ConfigError: a bad ``pretrain`` setting, ``iuq`` weights, or a family without the prompt protocol.
    """
    if not cfg.pretrain.enabled:
        raise ConfigError("the saliency-prompt objective is for pre-training configs: set pretrain.enabled=true "
                          "('sp-ray pretrain' does)")
    if instance_unique_enabled(cfg.iuq):
        raise ConfigError(
            "the iuq.* losses are fine-tuning options: set their weights to 0 for saliency-prompt pre-training"
        )
    if not model_family(cfg.model.name).promptable:
        supported = sorted(name for name, f in FAMILIES.items() if f.promptable)
        raise ConfigError(f"saliency-prompt pre-training supports model.name {supported}, got {cfg.model.name!r}")
    criterion = build_criterion(cfg)
    check_pretrain_config(cfg)
    check_promptable(model, criterion, cfg.model.name)
    p = cfg.pretrain
    query_channels = int(load_saliency_queries(cfg).shape[1])
    encoder = None
    if p.prompt_source == "image":
        encoder = ImagePromptEncoder(
            in_channels=model.backbone.out_channels[-1],
            out_channels=model.feat_channels,
            crop_size=p.image_prompt_size,
        )
    return SPObjective(
        criterion=criterion,
        projection=SaliencyProjection(
            in_channels=query_channels,
            out_channels=model.feat_channels,
            learned=p.kernel_projection == "learned",
        ),
        prompt_encoder=encoder,
        prompt_rule=p.prompt_rule,
        prompt_drop=p.prompt_drop,
        num_prompts=p.num_prompts,
        kernel_loss_weight=p.kernel_loss_weight,
        angle_weight=p.angle_weight,
    )
