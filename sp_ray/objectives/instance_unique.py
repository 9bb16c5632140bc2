"""Instance-unique querying (IUQ; Wang, Liang & Liu, NeurIPS 2022): two fine-tuning losses for QEIS models.

- **Inter-scene loss** (dataset-level uniqueness): a query of the current image must not fire on any pixel
  of other images. A FIFO memory keeps the detached mask features of recently seen images; the current
  final queries make masks on them with the model's own mask head, and those cross-image masks are all
  background: sigmoid focal loss against zeros, each memory image's pixels weighted so that each of its
  instances and its background count equally (``iuq.inter_scene_balance``, below).
- **Transformation-equivariance loss** (IUQ's L_equi): the model is run on T(image), T a horizontal flip and/or
  a rescale. Its mask term (``iuq.equivariance_target``) is by default the paper's: the masks of T(image)
  are supervised with T(ground-truth masks) by the family's own mask losses, under the assignment of the
  original view ("same matching"); the ``consistency`` option instead compares them with T(masks of image),
  query n with query n. Its feature term compares F(T(image)) with T(F(image)).

`IUQObjective` is the objective (``sp_ray.objectives.Trainable``) of any model with the K-Net protocol
(``forward_features`` returning a tuple with ``fpn``, ``forward_from_features`` returning ``ModelOutputs``):
``objective(model, images, targets)`` returns the family criterion's losses plus the IUQ ones. The model
stays pure, so it evaluates and exports unchanged. The inter-scene loss also needs the family's
`QueryMaskHead` (``sp_ray.models.instance_unique``; K-Net and Mask2Former have one; QueryInst's RoI mask
head has no per-pixel mask features, so it gets the equivariance loss only).

The paper's full text was not available to us (METHODS.md section 4) and its released code is partial, so
what follows is this module's reading, stated exactly:

- the memory holds images, not batches: each entry is one image's mask features average-pooled to
  ``memory_resolution`` x ``memory_resolution``, with a pixel-weight map of the same size;
- an image is never its own negative (its id is skipped, which matters when a small labeled set fits in the
  memory); every query of the current image is a positive of the inter-scene loss (the released SOLOv2
  code used the matched ones only), and every other memory image is a negative of each of them;
- **instance-balanced** (``inter_scene_balance="instance"``, the default): the paper samples the memory
  instance-balanced, with a recipe we could not read; here each memory image's G regions (its K ground-truth
  instances and, when not empty, its background, on the pooled grid) get 1/G of its weight, spread over the
  region's pixels in proportion to their coverage. A small object
  then counts as much as a large one and as the whole background, where a plain pixel mean is dominated
  by background, which every query already leaves dark. It is a weighting of all memory pixels, not a
  random draw, so the loss has no sampling noise; an image without instances weighs its pixels uniformly.
  ``"pixel"`` is the plain pixel mean (every pixel of a memory image weighs 1/r^2);
- the equivariance mask term reuses the original view's matching rather than matching T(image) afresh:
  with a matcher of its own the term would be plain supervision of an augmented view, which says nothing
  about whether query n still segments the same instance after T; the fixed assignment is what makes it
  an equivariance constraint on the queries (METHODS.md: "(same matching)"; IUQ's SOLOv2 code also takes
  the flipped view's kernels at the original view's positive positions). Only the mask terms are taken:
  that code also puts a focal loss on the flipped view's categories, which this term leaves out;
  ``loss_equi_mask`` is the sum over every supervised stage, as the main term is.
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
from sp_ray.objectives.matcher import Matches
from sp_ray.objectives.set_criterion import SetCriterion
from sp_ray.objectives.trainable import to_float32
from sp_ray.types import ModelOutputs, Target

TRANSFORMS = ("flip", "rescale", "flip_rescale")
EQUIVARIANCE_TARGETS = ("ground_truth", "consistency")
INTER_SCENE_BALANCES = ("instance", "pixel")


class MemoryEntries(NamedTuple):
    """What ``FeatureMemory.read`` gives: M entries, oldest first.

    Attributes:
        features: float32 [M, D, r, r] pooled mask features.
        image_ids: the M image ids.
        pixel_weights: float32 [M, r, r], each map summing to 1: how the entry's pixels weigh in the loss.
    """

    features: Tensor
    image_ids: list[int]
    pixel_weights: Tensor


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
        self._entries: deque[tuple[int, Tensor, Tensor]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, features: Tensor, image_ids: Sequence[int], pixel_weights: Tensor | None = None) -> None:
        """Store the images of a batch, oldest first out.

        Args:
            features: float [B, D, h, w] mask features of the batch.
            image_ids: B image ids (an image is never a negative of itself).
            pixel_weights: float [B, r, r], each map summing to 1 (``instance_balanced_weights``); None weighs
                every pixel 1/r^2.
        """
        if features.shape[0] != len(image_ids):
            raise ValueError(f"FeatureMemory.push: {features.shape[0]} feature maps for {len(image_ids)} image ids")
        r = self.resolution
        if pixel_weights is None:
            pixel_weights = features.new_full((features.shape[0], r, r), 1.0 / (r * r))
        if tuple(pixel_weights.shape) != (features.shape[0], r, r):
            raise ValueError(
                f"FeatureMemory.push: pixel_weights {tuple(pixel_weights.shape)} must be [B, r, r] = "
                f"{[features.shape[0], r, r]}"
            )
        pooled = F.adaptive_avg_pool2d(features.detach().float(), r)  # (B, D, r, r)
        weights = pixel_weights.detach().float()
        for image_id, feats, weight in zip(image_ids, pooled, weights, strict=True):
            self._entries.append((int(image_id), feats.clone(), weight.clone()))

    def read(self, *, device: torch.device) -> MemoryEntries:
        """All entries, oldest first, on ``device``; M = 0 gives empty [0, 0, r, r] features and [0, r, r] weights."""
        r = self.resolution
        if not self._entries:
            return MemoryEntries(torch.zeros((0, 0, r, r), device=device), [], torch.zeros((0, r, r), device=device))
        return MemoryEntries(
            torch.stack([feats for _, feats, _ in self._entries]).to(device),
            [image_id for image_id, _, _ in self._entries],
            torch.stack([weight for _, _, weight in self._entries]).to(device),
        )


def instance_balanced_weights(masks: Tensor, feature_size: Sequence[int], resolution: int) -> Tensor:
    """The pixel weights of one memory image under instance balancing: each region weighs the same.

    The regions are the image's K instances and its background, on the memory's r x r grid: a cell's share
    of instance k is the fraction of its pixels that k covers (the masks are area-pooled to the feature map's
    size, then to r x r, the path the features take), its background share 1 - the sum of those, at least 0.
    With G the regions of non-zero area, w = 1/G sum_g a_g / sum(a_g), so sum(w) = 1, every region's
    weights sum to 1/G, and an image without instances has w = 1/r^2 everywhere.

    Args:
        masks: bool or float [K, H, W] ground-truth masks at the padded input size (K may be 0).
        feature_size: (h, w) of the mask features the memory pools.
        resolution: r.

    Returns:
        float32 [r, r], summing to 1.
    """
    r = resolution
    if masks.shape[0] == 0:
        return torch.full((r, r), 1.0 / (r * r), device=masks.device)
    cover = F.adaptive_avg_pool2d(masks.float(), tuple(feature_size))
    cover = F.adaptive_avg_pool2d(cover, r)  # (K, r, r), each cell's covered fraction
    background = (1.0 - cover.sum(0)).clamp(min=0.0)
    regions = torch.cat([cover, background[None]])  # (K + 1, r, r)
    area = regions.sum((1, 2))
    keep = area > 0
    return (regions[keep] / area[keep, None, None]).mean(0)


def inter_scene_loss(
    cross_logits: Tensor,
    negatives: Tensor,
    pixel_weights: Tensor | None = None,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """IUQ's inter-scene loss: every query's mask on another image is background.

    L = 1 / (|P| N) sum over the negative pairs (b, m) in P, the N queries n and the h x w pixels p of
    w_m(p) FL(x_bnm(p), 0), with FL the sigmoid focal loss (Lin et al. 2017, eq. 5) against an all-zero
    target, FL(x, 0) = -(1 - alpha) p^gamma log(1 - p), and w_m entry m's pixel weights (summing to 1).
    Uniform weights w = 1/(h w) make it the plain mean over pairs, queries and pixels.

    Args:
        cross_logits: float [B, N, M, h, w], mask logits of image b's queries on memory entry m.
        negatives: bool [B, M], which (image, entry) pairs are other images.
        pixel_weights: float [M, h, w], each map summing to 1; None: uniform.
        alpha: focal alpha.
        gamma: focal gamma.

    Returns:
        float scalar; 0 (attached to the graph) when there is no negative pair.
    """
    batch_idx, entry_idx = negatives.nonzero(as_tuple=True)
    if batch_idx.numel() == 0:
        return cross_logits.sum() * 0
    pairs = cross_logits[batch_idx, :, entry_idx]  # (P, N, h, w)
    if pixel_weights is None:
        weights = pairs.new_full((1, 1, *pairs.shape[-2:]), 1.0 / pairs[0, 0].numel())
    else:
        weights = pixel_weights.to(pairs.dtype)[entry_idx][:, None]  # (P, 1, h, w)
    focal = sigmoid_focal_loss(pairs, torch.zeros_like(pairs), alpha=alpha, gamma=gamma, reduction="none")
    return (focal * weights).sum() / (pairs.shape[0] * pairs.shape[1])


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


def mask_consistency_loss(transformed: Tensor, original: Tensor, transform: Transform) -> Tensor:
    """The ``consistency`` mask term: the masks of T(I) equal T(masks of I), query n to query n.

    Per image b and query n, with a = sigmoid(M_n(T(I))) and c = T(sigmoid(M_n(I))):
    d = sum (a - c)^2 / (sum a^2 + sum c^2 + 1), i.e. a dice loss with +1 smoothing between the two soft
    masks: 0 exactly when they are equal (two empty masks included, which is why it is not the default),
    below 1 otherwise; averaged over b, n. Both sides carry gradients.

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


def transform_targets(targets: Sequence[Target], transform: Transform) -> list[Target]:
    """T applied to the ground truth of a batch, in the coordinates of T(padded input).

    Masks are resized like the image (``apply_transform``) and thresholded at 0.5, so they stay boolean
    [K, *T.size] like any target (a flip alone is exact); boxes are scaled and mirrored (x -> W' - x);
    ``image_size`` is scaled, or under a flip the whole T(input), as the valid region then sits at the right
    (it only bounds the colour affinity of the weak losses, whose pairs count inside target boxes only);
    ``image`` (when present) is transformed and rounded back to uint8. Labels and ids are kept.

    Args:
        targets: B ``Target`` dicts at the padded input size (H, W).
        transform: T.

    Returns:
        B new ``Target`` dicts; the inputs are not modified.
    """
    new_h, new_w = transform.size
    out = []
    for target in targets:
        masks = target["masks"]
        height, width = masks.shape[-2:]
        moved = dict(target)
        if masks.shape[0]:
            moved["masks"] = apply_transform(masks[None].float(), transform)[0] >= 0.5
        else:
            moved["masks"] = torch.zeros((0, new_h, new_w), dtype=torch.bool, device=masks.device)
        scale_x, scale_y = new_w / width, new_h / height
        if "boxes" in target:
            boxes = target["boxes"].float() * boxes_scale(scale_x, scale_y, target["boxes"].device)
            if transform.flip:
                boxes = torch.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], dim=1)
            moved["boxes"] = boxes
        if "image_size" in target:
            valid_h, valid_w = target["image_size"]
            moved["image_size"] = (
                (new_h, new_w) if transform.flip else (round(valid_h * scale_y), round(valid_w * scale_x))
            )
        if "image" in target:
            image = apply_transform(target["image"][None].float(), transform)[0]
            moved["image"] = image.round().clamp(0, 255).to(torch.uint8)
        out.append(moved)
    return out


def boxes_scale(scale_x: float, scale_y: float, device: torch.device) -> Tensor:
    """float32 [4], the factors of xyxy boxes under a rescale."""
    return torch.tensor([scale_x, scale_y, scale_x, scale_y], dtype=torch.float32, device=device)


def mask_terms_sum(criterion: SetCriterion, losses: dict[str, Tensor]) -> Tensor:
    """The sum of the criterion's weighted mask terms (``criterion.mask_terms``) over every stage.

    Args:
        criterion: the family's set criterion.
        losses: its output, ``loss_<name>_s<i>`` -> float scalar.

    Returns:
        float scalar.
    """
    terms = [value for key, value in losses.items() if key[len("loss_") :].rsplit("_s", 1)[0] in criterion.mask_terms]
    if not terms:
        raise ValueError(f"no mask term {criterion.mask_terms} among the criterion's losses {sorted(losses)}")
    return torch.stack(terms).sum()


def ground_truth_equivariance_loss(
    criterion: SetCriterion,
    transformed_outputs: ModelOutputs,
    transformed_targets: list[Target],
    matches: list[Matches],
) -> Tensor:
    """The ``ground_truth`` mask term, IUQ's L_equi on masks: the masks of T(I) are supervised with T(Y).

    L = sum over the supervised stages i of the family's weighted mask terms (K-Net and QueryInst: BCE + dice,
    Mask2Former: point-sampled BCE + dice, K-Net's weak option: its projection and pairwise terms) between
    M_n^i(T(I)) and T(Y_k), for the pairs (n, k) of ``matches``, the original view's assignment, normalised
    as the main term. The targets are fixed and the assignment is indices, so the gradient reaches the model
    through the run on T(I) only; it is 0 when that run predicts T(Y) exactly and large when it predicts empty
    masks for instances.

    Args:
        criterion: the family's set criterion (``criterion(..., matches=...)``).
        transformed_outputs: the model's outputs on T(I) (float32), masks [B, N, h', w'] at its stride.
        transformed_targets: ``transform_targets(targets, T)``: K_b instances at T(I)'s padded size.
        matches: the original view's matches, a list over [stage 0, .., stage S] of B (pred_idx, tgt_idx).

    Returns:
        float scalar.
    """
    calls = getattr(criterion, "calls", None)
    losses = criterion(transformed_outputs, transformed_targets, matches=matches)
    if calls is not None:
        criterion.calls = calls  # a second view of the same step: a warmup clock counts steps, not views
    return mask_terms_sum(criterion, losses)


class IUQObjective(nn.Module):
    """The family criterion plus the IUQ losses: ``objective(model, images, targets)`` returns the loss dict.

    Its state is the criterion's (the memory is not state: a restarted run starts with an empty one); the
    model is not held but passed to every call, so checkpoints keep the plain model's keys.

    Args:
        criterion: the family's set criterion, ``criterion(outputs, targets)`` -> loss dict (a
            ``SetCriterion`` for the ``ground_truth`` mask term, which needs its matches).
        mask_head: how the final queries make masks (needed when ``inter_scene_weight`` > 0).
        inter_scene_weight: weight of ``loss_inter_scene``.
        memory_size: images in the memory.
        memory_resolution: side of the memory's pooled maps.
        inter_scene_balance: "instance" (each memory image's instances and background weigh equally) or
            "pixel" (a plain pixel mean).
        equivariance_mask_weight: weight of ``loss_equi_mask``.
        equivariance_target: "ground_truth" (T(image)'s masks vs T(GT) under the original matching,
            ``ground_truth_equivariance_loss``) or "consistency" (vs T(masks of image),
            ``mask_consistency_loss``).
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
        inter_scene_balance: str = "instance",
        equivariance_mask_weight: float = 0.0,
        equivariance_target: str = "ground_truth",
        equivariance_feature_weight: float = 0.0,
        transform: str = "flip",
        rescale_range: Sequence[float] = (0.5, 1.0),
    ) -> None:
        super().__init__()
        if inter_scene_weight > 0 and mask_head is None:
            raise ValueError("the inter-scene loss needs the model family's QueryMaskHead")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        if equivariance_target not in EQUIVARIANCE_TARGETS:
            raise ValueError(f"equivariance_target must be one of {EQUIVARIANCE_TARGETS}, got {equivariance_target!r}")
        if inter_scene_balance not in INTER_SCENE_BALANCES:
            raise ValueError(f"inter_scene_balance must be one of {INTER_SCENE_BALANCES}, got {inter_scene_balance!r}")
        if (
            equivariance_mask_weight > 0
            and equivariance_target == "ground_truth"
            and not isinstance(criterion, SetCriterion)
        ):
            raise ValueError(
                "the ground_truth equivariance mask term needs a SetCriterion (its matches and mask terms), got "
                f"{type(criterion).__name__}; use equivariance_target='consistency'"
            )
        if len(rescale_range) != 2 or not 0 < rescale_range[0] <= rescale_range[1]:
            raise ValueError(f"rescale_range must be [low, high] with 0 < low <= high, got {list(rescale_range)}")
        self.criterion = criterion
        self.mask_head = mask_head
        self.inter_scene_weight = inter_scene_weight
        self.inter_scene_balance = inter_scene_balance
        self.memory = FeatureMemory(capacity=memory_size, resolution=memory_resolution)
        self.equivariance_mask_weight = equivariance_mask_weight
        self.equivariance_target = equivariance_target
        self.equivariance_feature_weight = equivariance_feature_weight
        self.transform = transform
        self.rescale_range = tuple(rescale_range)

    def forward(self, model: nn.Module, images: Tensor, targets: list[Target]) -> dict[str, Tensor]:
        """Every training loss of ``model`` on a batch.

        Args:
            model: a model with ``forward_features`` / ``forward_from_features`` (the K-Net protocol).
            images: float [B, 3, H, W], RGB 0..255, H and W multiples of 32.
            targets: B ``Target`` dicts (``masks`` bool [K, H, W]; K may be 0).

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
        ground_truth_form = self.equivariance_mask_weight > 0 and self.equivariance_target == "ground_truth"
        # Losses in float32 outside autocast, as the plain training step computes them.
        with torch.autocast(device_type=images.device.type, enabled=False):
            if ground_truth_form:
                losses, matches = self.criterion(to_float32(outputs), targets, return_matches=True)
            else:
                losses = self.criterion(to_float32(outputs), targets)
            if self.inter_scene_weight > 0:
                losses["loss_inter_scene"] = self.inter_scene_weight * self._inter_scene(
                    model, features, outputs, targets
                )
            if transformed is not None:
                transform, transformed_features, transformed_outputs = transformed
                if ground_truth_form:
                    losses["loss_equi_mask"] = self.equivariance_mask_weight * ground_truth_equivariance_loss(
                        self.criterion,
                        to_float32(transformed_outputs),
                        transform_targets(targets, transform),
                        matches,
                    )
                elif self.equivariance_mask_weight > 0:
                    losses["loss_equi_mask"] = self.equivariance_mask_weight * mask_consistency_loss(
                        transformed_outputs["pred_masks"], outputs["pred_masks"], transform
                    )
                if self.equivariance_feature_weight > 0:
                    losses["loss_equi_feat"] = self.equivariance_feature_weight * feature_equivariance_loss(
                        transformed_features.fpn, features.fpn, transform
                    )
        return losses

    def _inter_scene(self, model: nn.Module, features: Any, outputs: ModelOutputs, targets: list[Target]) -> Tensor:
        kernels = outputs["pred_kernels"].float()
        image_ids = [t["image_id"] for t in targets]
        memory = self.memory.read(device=kernels.device)
        if memory.image_ids:
            cross = self.mask_head.masks(model, kernels, memory.features)  # (B, N, M, r, r)
            negatives = torch.tensor(
                [[image_id != other for other in memory.image_ids] for image_id in image_ids], device=kernels.device
            )
            loss = inter_scene_loss(cross, negatives, memory.pixel_weights)
        else:
            loss = kernels.sum() * 0
        # The batch enters the memory after its own loss: it is a negative for later steps only.
        mask_features = self.mask_head.features(features)
        weights = None
        if self.inter_scene_balance == "instance":
            weights = torch.stack([
                instance_balanced_weights(t["masks"].to(mask_features.device), mask_features.shape[-2:],
                                          self.memory.resolution)
                for t in targets
            ])  # fmt: skip
        self.memory.push(mask_features, image_ids, weights)
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
    if iuq.equivariance_target not in EQUIVARIANCE_TARGETS:
        raise ConfigError(
            f"iuq.equivariance_target must be one of {EQUIVARIANCE_TARGETS}, got {iuq.equivariance_target!r}"
        )
    if iuq.inter_scene_balance not in INTER_SCENE_BALANCES:
        raise ConfigError(
            f"iuq.inter_scene_balance must be one of {INTER_SCENE_BALANCES}, got {iuq.inter_scene_balance!r}"
        )
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
        inter_scene_balance=iuq.inter_scene_balance,
        equivariance_mask_weight=iuq.equivariance_mask_weight,
        equivariance_target=iuq.equivariance_target,
        equivariance_feature_weight=iuq.equivariance_feature_weight,
        transform=iuq.equivariance_transform,
        rescale_range=iuq.rescale_range,
    )
