"""The module training sees: a pure model and its objective, ``Trainable(model, objective)``.

An objective is an ``nn.Module`` called as ``objective(model, images, targets)`` -> loss dict; it owns every
training-only parameter and buffer (criterion, prompt encoder, projection, memory) and never holds the model,
so ``Trainable.state_dict()`` is ``model.*`` then ``objective.*`` and the model's own keys stay plain.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sp_ray.errors import NonFiniteLossError
from sp_ray.types import Target


class Trainable(nn.Module):
    """The one module DDP wraps: ``trainable(images, targets)`` = ``objective(model, images, targets)``.

    Args:
        model: the pure model (``model(images)`` -> outputs).
        objective: its objective.
    """

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        # Registered in this order: the model's parameters come first (optimizer groups, gradient clipping).
        self.model = model
        self.objective = objective

    def forward(self, images: Tensor, targets: list[Target]) -> dict[str, Tensor]:
        """The loss dict of the batch: float32 scalars, weighted, in the objective's order."""
        return self.objective(self.model, images, targets)


def to_float32(tree: Any) -> Any:
    """Floating-point tensors of a nest of dicts and lists as float32 (others unchanged)."""
    if isinstance(tree, Tensor):
        return tree.float() if tree.is_floating_point() else tree
    if isinstance(tree, dict):
        return {k: to_float32(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_float32(v) for v in tree]
    return tree


def all_finite(tree: Any) -> bool:
    """Whether every floating-point tensor of a nest of dicts, lists and tuples is finite."""
    if isinstance(tree, Tensor):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(all_finite(v) for v in tree)
    return True


class SetObjective(nn.Module):
    """The objective of a set-prediction model: ``criterion(model(images), targets)`` (DETR's split).

    The outputs go to the criterion in float32 and outside autocast.

    Args:
        criterion: the family's set criterion (``KNetCriterion``, ``Mask2FormerCriterion``,
            ``QueryInstCriterion``).
    """

    def __init__(self, criterion: nn.Module) -> None:
        super().__init__()
        self.criterion = criterion

    def forward(self, model: nn.Module, images: Tensor, targets: list[Target]) -> dict[str, Tensor]:
        """The criterion's losses of ``model`` on the batch.

        Raises:
            NonFiniteLossError: the model's outputs are not finite (the matcher refuses them).
        """
        outputs = model(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            try:
                return self.criterion(to_float32(outputs), targets)
            except ValueError as err:
                # The matcher refuses NaN/inf predictions; diverged weights give them again on every retry.
                if not all_finite(outputs):
                    raise NonFiniteLossError(
                        f"the model's outputs are not finite ({err}); training diverged: lower train.lr "
                        "(or set train.grad_clip) and start again"
                    ) from err
                raise
