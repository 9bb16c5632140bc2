"""Instance-unique querying (IUQ; Wang, Liang & Liu, NeurIPS 2022): two fine-tuning losses for QEIS models.

- **Inter-scene loss** (dataset-level uniqueness): a query of the current image must not fire on any pixel
  of other images. A FIFO memory keeps the detached mask features of recently seen images; the current
  final queries make masks on them with the model's own mask head, and those cross-image masks are all
  background: sigmoid focal loss against zeros.
- **Transformation-equivariance loss**: the model run on T(image), T a horizontal flip and/or a rescale,
  must give T(features) and T(masks) of the original run. Query n of one run corresponds to query n of
  the other: QEIS kernels/queries are learned per index, so index correspondence needs no matching.

`IUQObjective` is the objective (``sp_ray.objectives.Trainable``) of any model with the K-Net protocol
(``forward_features`` returning a tuple with ``fpn``, ``forward_from_features`` returning ``ModelOutputs``):
``objective(model, images, targets)`` returns the family criterion's losses plus the IUQ ones. The model
stays pure, so it evaluates and exports unchanged. The inter-scene loss also needs the family's
`QueryMaskHead` (``sp_ray.models.instance_unique``; K-Net and Mask2Former have one; QueryInst's RoI mask
head has no per-pixel mask features, so it gets the equivariance loss only).

What the paper leaves open (METHODS.md section 4; its released code is partial) is chosen here as follows:
the memory holds images, not batches, pooled to ``memory_resolution``; an image is never its own negative
(its id is skipped, which matters when a small labeled set fits in the memory); every query of the
image is a positive of the inter-scene loss (the released SOLOv2 code used the matched ones only).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sp_ray.config import Config, ConfigError, InstanceUniqueConfig
from sp_ray.models.common import SIZE_DIVISOR
from sp_ray.models.instance_unique import QueryMaskHead
from sp_ray.objectives.losses import sigmoid_focal_loss
from sp_ray.objectives.trainable import to_float32
from sp_ray.types import ModelOutputs, Target

TRANSFORMS = ("flip", "rescale", "flip_rescale")



class FeatureMemory:
    """The external memory of the inter-scene loss: a FIFO of recent images' pooled, detached feature maps.

    Holds at most ``capacity`` images; pushing more drops the oldest. Entries are detached copies, so no
    graph of an earlier step is kept alive or reached by a later backward. Not part of any state dict:
    a restarted run starts empty. Each training process keeps its own memory of the images it saw (no
    communication between workers; every worker's memory already holds other images).

    Args:
        capacity: images kept (>= 1).
        resolution: side r of the stored maps (adaptive average pooling, >= 1).
    """

    def __init__(self, *, capacity: int, resolution: int) -> None:
        if capacity < 1 or resolution < 1:
            raise ValueError(f"FeatureMemory: capacity and resolution must be >= 1, got {capacity}, {resolution}")
        self.capacity = capacity
        self.resolution = resolution
        self._entries: deque[tuple[int, Tensor]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, features: Tensor, image_ids: Sequence[int]) -> None:
        """Store the images of a batch, oldest first out.

        Args:
            features: float [B, D, h, w] mask features of the batch.
            image_ids: B image ids (an image is never a negative of itself).
        """
        if features.shape[0] != len(image_ids):
            raise ValueError(f"FeatureMemory.push: {features.shape[0]} feature maps for {len(image_ids)} image ids")
        pooled = F.adaptive_avg_pool2d(features.detach().float(), self.resolution)  # (B, D, r, r)
        for image_id, feats in zip(image_ids, pooled, strict=True):
            self._entries.append((int(image_id), feats.clone()))

    def read(self, *, device: torch.device) -> tuple[Tensor, list[int]]:
        """All entries, oldest first.

        Returns:
            (float32 [M, D, r, r] on ``device``, the M image ids); M = 0 gives an empty [0, 0, r, r].
        """
        if not self._entries:
            return torch.zeros((0, 0, self.resolution, self.resolution), device=device), []
        ids = [image_id for image_id, _ in self._entries]
        return torch.stack([feats for _, feats in self._entries]).to(device), ids


def inter_scene_loss(cross_logits: Tensor, negatives: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """IUQ's inter-scene loss: every query's mask on another image is background.

    L = mean over the negative pairs (b, m), the N queries and the h x w pixels of FL(x, 0), the sigmoid
    focal loss (Lin et al. 2017, eq. 5) with an all-zero target, FL(x, 0) = -(1 - alpha) p^gamma log(1 - p).

    Args:
        cross_logits: float [B, N, M, h, w], mask logits of image b's queries on memory entry m.
        negatives: bool [B, M], which (image, entry) pairs are other images.

    Returns:
        float scalar; 0 (attached to the graph) when there is no negative pair.
    """
    pairs = cross_logits.transpose(1, 2)[negatives]  # (P, N, h, w)
    if pairs.numel() == 0:
        return cross_logits.sum() * 0
    return sigmoid_focal_loss(pairs, torch.zeros_like(pairs), alpha=alpha, gamma=gamma) / pairs.numel()


class Transform(NamedTuple):
    """A geometric transform T of the equivariance loss: resize the image to ``size``, then flip if ``flip``."""

    flip: bool
    size: tuple[int, int]


def sample_transform(kind: str, image_size: tuple[int, int], rescale_range: Sequence[float]) -> Transform:
    """Draw T for a batch of padded size (H, W), from torch's global RNG.

    Args:
        kind: "flip", "rescale" or "flip_rescale".
        image_size: (H, W), multiples of 32.
        rescale_range: [low, high]; the factor is uniform in it, each side rounded to a multiple of 32
            (at least 32) so that T(image) is a valid input.

    Returns:
        The ``Transform``.
    """
    if kind not in TRANSFORMS:
        raise ValueError(f"equivariance transform must be one of {TRANSFORMS}, got {kind!r}")
    size = tuple(image_size)
    if kind in ("rescale", "flip_rescale"):
        low, high = rescale_range
        factor = low + (high - low) * float(torch.rand(()))
        size = tuple(max(SIZE_DIVISOR, round(side * factor / SIZE_DIVISOR) * SIZE_DIVISOR) for side in image_size)
    return Transform(flip=kind in ("flip", "flip_rescale"), size=size)


def apply_transform(maps: Tensor, transform: Transform, size: tuple[int, int] | None = None) -> Tensor:
    """T applied to images or to per-pixel maps.

    Args:
        maps: float [B, C, H, W].
        transform: the ``Transform``.
        size: the output size; default ``transform.size`` (images). Maps of a strided output pass the size
            of the same output on T(image).

    Returns:
        float [B, C, *size]: bilinearly resized (antialiased when shrinking), then flipped along W.
    """
    size = tuple(size or transform.size)
    if tuple(maps.shape[-2:]) != size:
        shrink = size[0] < maps.shape[-2] or size[1] < maps.shape[-1]
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return maps.flip(-1) if transform.flip else maps


def feature_equivariance_loss(
    transformed: Sequence[Tensor], original: Sequence[Tensor], transform: Transform
) -> Tensor:
    """Feature term of the equivariance loss: F(T(I)) = T(F(I)) per pixel, up to scale.

    L = mean over levels l and pixels of 1 - cos(F_l(T(I)), T(F_l(I))) over the channels; 0 for an
    equivariant model. The cosine keeps the loss from being lowered by shrinking the features.

    Args:
        transformed: L maps float [B, D, h'_l, w'_l] of the model run on T(I).
        original: the L maps float [B, D, h_l, w_l] of the run on I.
        transform: T.

    Returns:
        float scalar.
    """
    terms = []
    for ft, f in zip(transformed, original, strict=True):
        target = apply_transform(f.float(), transform, tuple(ft.shape[-2:]))
        terms.append((1 - F.cosine_similarity(ft.float(), target, dim=1)).mean())
    return torch.stack(terms).mean()


def mask_equivariance_loss(transformed: Tensor, original: Tensor, transform: Transform) -> Tensor:
    """Mask term of the equivariance loss: the masks of T(I) equal T(masks of I), query n to query n.

    Per image b and query n, with a = sigmoid(M_n(T(I))) and c = T(sigmoid(M_n(I))):
    d = sum (a - c)^2 / (sum a^2 + sum c^2 + 1), i.e. a dice loss with +1 smoothing between the two soft
    masks: 0 exactly when they are equal (two empty masks included), below 1 otherwise; averaged over b, n.

    Args:
        transformed: float [B, N, h', w'] mask logits of the run on T(I).
        original: float [B, N, h, w] mask logits of the run on I.
        transform: T.

    Returns:
        float scalar.
    """
    a = transformed.float().sigmoid().flatten(2)
    c = apply_transform(original.float().sigmoid(), transform, tuple(transformed.shape[-2:])).flatten(2)
    return ((a - c).square().sum(-1) / (a.square().sum(-1) + c.square().sum(-1) + 1.0)).mean()


class IUQObjective(nn.Module):
    """The family criterion plus the IUQ losses: ``objective(model, images, targets)`` returns the loss dict.

    Its state is the criterion's (the memory is not state: a restarted run starts with an empty one); the
    model is not held but passed to every call, so checkpoints keep the plain model's keys.

    Args:
        criterion: the family's set criterion, ``criterion(outputs, targets)`` -> loss dict.
        mask_head: how the final queries make masks (needed when ``inter_scene_weight`` > 0).
        inter_scene_weight: weight of ``loss_inter_scene``.
        memory_size: images in the memory.
        memory_resolution: side of the memory's pooled maps.
        equivariance_mask_weight: weight of ``loss_equi_mask``.
        equivariance_feature_weight: weight of ``loss_equi_feat``.
        transform: "flip", "rescale" or "flip_rescale".
        rescale_range: [low, high] of the rescale factor.
    """

    def __init__(
        self,
        *,
        criterion: nn.Module,
        mask_head: QueryMaskHead | None = None,
        inter_scene_weight: float = 0.0,
        memory_size: int = 16,
        memory_resolution: int = 16,
        equivariance_mask_weight: float = 0.0,
        equivariance_feature_weight: float = 0.0,
        transform: str = "flip",
        rescale_range: Sequence[float] = (0.5, 1.0),
    ) -> None:
        super().__init__()
        if inter_scene_weight > 0 and mask_head is None:
            raise ValueError("the inter-scene loss needs the model family's QueryMaskHead")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        if len(rescale_range) != 2 or not 0 < rescale_range[0] <= rescale_range[1]:
            raise ValueError(f"rescale_range must be [low, high] with 0 < low <= high, got {list(rescale_range)}")
        self.criterion = criterion
        self.mask_head = mask_head
        self.inter_scene_weight = inter_scene_weight
        self.memory = FeatureMemory(capacity=memory_size, resolution=memory_resolution)
        self.equivariance_mask_weight = equivariance_mask_weight
        self.equivariance_feature_weight = equivariance_feature_weight
        self.transform = transform
        self.rescale_range = tuple(rescale_range)

    def forward(self, model: nn.Module, images: Tensor, targets: list[Target]) -> dict[str, Tensor]:
        """Every training loss of ``model`` on a batch.

        Args:
            model: a model with ``forward_features`` / ``forward_from_features`` (the K-Net protocol).
            images: float [B, 3, H, W], RGB 0..255, H and W multiples of 32.
            targets: B ``Target`` dicts.

        Returns:
            The criterion's losses plus, for each weight > 0, ``loss_inter_scene``, ``loss_equi_mask`` and
            ``loss_equi_feat``; float32 scalars, weighted.
        """
        check_query_model(model)
        features = model.forward_features(images)
        outputs = model.forward_from_features(features)
        transformed = None
        if self.equivariance_mask_weight > 0 or self.equivariance_feature_weight > 0:
            transform = sample_transform(self.transform, tuple(images.shape[-2:]), self.rescale_range)
            transformed_features = model.forward_features(apply_transform(images, transform))
            transformed = (transform, transformed_features, model.forward_from_features(transformed_features))
        # Losses in float32 outside autocast, as the plain training step computes them.
        with torch.autocast(device_type=images.device.type, enabled=False):
            losses = self.criterion(to_float32(outputs), targets)
            if self.inter_scene_weight > 0:
                losses["loss_inter_scene"] = self.inter_scene_weight * self._inter_scene(
                    model, features, outputs, [t["image_id"] for t in targets]
                )
            if transformed is not None:
                transform, transformed_features, transformed_outputs = transformed
                if self.equivariance_mask_weight > 0:
                    losses["loss_equi_mask"] = self.equivariance_mask_weight * mask_equivariance_loss(
                        transformed_outputs["pred_masks"], outputs["pred_masks"], transform
                    )
                if self.equivariance_feature_weight > 0:
                    losses["loss_equi_feat"] = self.equivariance_feature_weight * feature_equivariance_loss(
                        transformed_features.fpn, features.fpn, transform
                    )
        return losses

    def _inter_scene(self, model: nn.Module, features: Any, outputs: ModelOutputs, image_ids: list[int]) -> Tensor:
        kernels = outputs["pred_kernels"].float()
        memory, memory_ids = self.memory.read(device=kernels.device)
        if memory_ids:
            cross = self.mask_head.masks(model, kernels, memory)  # (B, N, M, r, r)
            negatives = torch.tensor(
                [[image_id != other for other in memory_ids] for image_id in image_ids], device=kernels.device
            )
            loss = inter_scene_loss(cross, negatives)
        else:
            loss = kernels.sum() * 0
        # The batch enters the memory after its own loss: it is a negative for later steps only.
        self.memory.push(self.mask_head.features(features), image_ids)
        return loss


def check_query_model(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` has the K-Net protocol the IUQ losses need."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_from_features")):
        raise ValueError(
            f"IUQObjective needs a query-based model with forward_features / forward_from_features, "
            f"got {type(model).__name__}"
        )


def instance_unique_enabled(cfg: InstanceUniqueConfig) -> bool:
    """Whether any IUQ weight is set (non-zero: a negative one is then reported by the config check)."""
    return any(w != 0 for w in (cfg.inter_scene_weight, cfg.equivariance_mask_weight, cfg.equivariance_feature_weight))


def check_instance_unique_config(cfg: Config) -> None:
    """Raise ``ConfigError`` naming the ``iuq.*`` key of a setting that cannot work."""
    iuq = cfg.iuq
    for key in ("inter_scene_weight", "equivariance_mask_weight", "equivariance_feature_weight"):
        value = getattr(iuq, key)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"iuq.{key} must be a finite number >= 0, got {value}")
    for key in ("memory_size", "memory_resolution"):
        if getattr(iuq, key) < 1:
            raise ConfigError(f"iuq.{key} must be >= 1, got {getattr(iuq, key)}")
    if iuq.equivariance_transform not in TRANSFORMS:
        raise ConfigError(f"iuq.equivariance_transform must be one of {TRANSFORMS}, got {iuq.equivariance_transform!r}")
    if len(iuq.rescale_range) != 2 or not 0 < iuq.rescale_range[0] <= iuq.rescale_range[1]:
        raise ConfigError(f"iuq.rescale_range must be [low, high] with 0 < low <= high, got {iuq.rescale_range}")
    if cfg.pretrain.enabled:
        raise ConfigError(
            "the iuq.* losses are fine-tuning options: set their weights to 0 for saliency-prompt pre-training"
        )


def build_iuq_objective(
    cfg: Config, model: nn.Module, criterion: nn.Module, mask_head: QueryMaskHead | None
) -> IUQObjective:
    """The IUQ objective of ``cfg.iuq`` around a built model's criterion.

    Args:
        cfg: resolved config; ``iuq`` has a weight > 0.
        model: the model of ``cfg.model`` (K-Net protocol), built before the criterion.
        criterion: its criterion.
        mask_head: the family's ``QueryMaskHead``, or None when it has none (inter-scene loss unavailable).

    Returns:
        The ``IUQObjective``.

    Raises:
        ConfigError: a bad ``iuq`` setting, a model without the K-Net protocol, or an inter-scene weight for
            a family without a mask head.
    """
    check_instance_unique_config(cfg)
    iuq = cfg.iuq
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_from_features")):
        raise ConfigError(
            f"the iuq.* losses need a query-based model (forward_features / forward_from_features); "
            f"model.name {cfg.model.name!r} has none: set the iuq weights to 0"
        )
    if iuq.inter_scene_weight > 0 and mask_head is None:
        raise ConfigError(
            f"iuq.inter_scene_weight needs per-pixel mask features, which model.name {cfg.model.name!r} does not "
            "have; use the equivariance weights only, or a K-Net / Mask2Former model"
        )
    return IUQObjective(
        criterion=criterion,
        mask_head=mask_head,
        inter_scene_weight=iuq.inter_scene_weight,
        memory_size=iuq.memory_size,
        memory_resolution=iuq.memory_resolution,
        equivariance_mask_weight=iuq.equivariance_mask_weight,
        equivariance_feature_weight=iuq.equivariance_feature_weight,
        transform=iuq.equivariance_transform,
        rescale_range=iuq.rescale_range,
    )
