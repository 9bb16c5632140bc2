"""The pseudo-mask sources of ``sp-ray propose``: what every proposer gives, and the ``Proposer`` protocol.

A proposer turns decoded images into one ``Proposals`` per image (masks at image size, scores, boxes and
the prompt vector of each mask). ``sp_ray.pretrain.shards`` runs one inside every Ray Data actor over the
images of a shard and writes the result in the one pseudo-mask format; ``sp_ray.pretrain.propose`` picks
which proposer a run uses. The implementations:

- ``sp_ray.pretrain.saliency.SaliencyProposer``: SP's saliency masks of a frozen ResNet (FreeSOLO's Free
  Mask), the default (``propose.proposer: saliency``);
- ``sp_ray.pretrain.clip_proposals.ClipProposer``: masks drawn or rescored by a CLIP model from class-free
  object words or from the target dataset's class names, then with a class per mask (UPLVP,
  ``propose.proposer: clip``);
- ``sp_ray.pretrain.self_training.CheckpointProposer``: a trained model's confident predictions (FreeSOLO
  self-training, ``propose --from-checkpoint``).

A new proposer implements the protocol in a module of its own, adds its settings' identity to
``sp_ray.pretrain.propose.proposal_identity`` (so that a changed setting recomputes the shards) and its
choice to ``sp_ray.pretrain.propose.build_proposer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from torch import Tensor, nn

# The one category of class-free pseudo masks (SP's objectness; every proposer but CLIP's class vocabulary).
OBJECT_CATEGORY = {"id": 1, "name": "object"}

# Decoded images as a proposer receives them: (item of `sp_ray.data.listing.list_images`, uint8 [H0, W0, 3] RGB).
Ready = list[tuple[dict[str, Any], np.ndarray]]


@dataclass
class Proposals:
    """The proposals of one image, best first.

    Attributes:
        masks: bool [L, H, W] at image size.
        scores: float [L], the maskness after Matrix NMS decay.
        boxes: float [L, 4], xyxy in image pixels, from the mask's x/y projections (step 10).
        queries: float [L, C], the L2-normalised query vectors S_l that produced the masks.
        category_ids: int64 [L], the COCO category id of each mask among the proposer's ``categories``;
            None: class-free masks, all ``OBJECT_CATEGORY``.
    """

    masks: Tensor
    scores: Tensor
    boxes: Tensor
    queries: Tensor
    category_ids: Tensor | None = None


class Proposer(Protocol):
    """A pseudo-mask source: decoded images in, one ``Proposals`` per image out.

    Attributes:
        prompt_width: C, the width of the prompt vectors (the columns of ``prompts.npy``), also of a shard
            in which no image gets a proposal.
        categories: the COCO categories ({"id", "name"}) of ``annotations.json``, which the proposals'
            ``category_ids`` refer to; ``[OBJECT_CATEGORY]`` for class-free proposers.
    """

    @property
    def prompt_width(self) -> int: ...

    @property
    def categories(self) -> list[dict[str, Any]]: ...

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError when an image of height x width is too elongated for the proposer's resize; the
        decoder then skips it (``TOO_ELONGATED``) instead of failing the shard."""

    def __call__(self, ready: Ready) -> list[Proposals]:
        """The proposals of decoded (item, pixels) pairs, one per pair in order, on the CPU or the device."""


def c5_channels(backbone: nn.Module) -> int:
    """The prompt width of a backbone whose forward returns a list of feature maps: its last ``out_channels``."""
    channels = getattr(backbone, "out_channels", None)
    if not channels:
        raise ValueError("the proposal backbone must expose out_channels (the channels of C2..C5)")
    return int(channels[-1])
