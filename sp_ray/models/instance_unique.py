"""How a query model's final queries make masks from per-pixel features: the model side of the inter-scene
loss of instance-unique querying (IUQ; the objective is ``sp_ray.objectives.instance_unique``).

Each family with per-pixel mask features names its ``QueryMaskHead`` in ``sp_ray.models.FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class QueryMaskHead:
    """How a model family's final queries make mask logits from per-pixel features.

    Attributes:
        features: ``forward_features`` output -> the per-pixel mask features float [B, D, h, w] that the
            final queries act on (what the memory stores).
        masks: (model, kernels float [B, N, D] = ``pred_kernels`` of the last stage, features float
            [M, D, h, w]) -> mask logits float [B, N, M, h, w] of every query on every feature map. Linear
            in the features, so masks on average-pooled features are the average-pooled masks.
    """

    features: Callable[[Any], Tensor]
    masks: Callable[[nn.Module, Tensor, Tensor], Tensor]


def _knet_features(features: Any) -> Tensor:
    return features.x_feats


def _knet_masks(model: nn.Module, kernels: Tensor, features: Tensor) -> Tensor:
    # The last kernel-update stage: M = fc_mask(mask_fcs(K^S)) * feat_transform(X), a 1x1 dynamic conv.
    stage = model.stages[-1]
    x = stage.feat_transform(features)  # (M, D, h, w)
    mask_kernels = stage.fc_mask(stage.mask_fcs(kernels))  # (B, N, D)
    return torch.einsum("bnd,mdhw->bnmhw", mask_kernels, x)


def _mask2former_features(features: Any) -> Tensor:
    return features.mask_features


def _mask2former_masks(model: nn.Module, kernels: Tensor, features: Tensor) -> Tensor:
    # Mask2Former's prediction head: M = mask_embed(LN(q)) . mask_features.
    return torch.einsum("bnd,mdhw->bnmhw", model.mask_embed(model.decoder_norm(kernels)), features)


KNET_MASK_HEAD = QueryMaskHead(features=_knet_features, masks=_knet_masks)
MASK2FORMER_MASK_HEAD = QueryMaskHead(features=_mask2former_features, masks=_mask2former_masks)
