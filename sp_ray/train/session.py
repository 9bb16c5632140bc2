"""What a training process needs to know about its peers: rank, world size, how to report.

``LocalSession`` is a single process. ``sp_ray.train.ray_train.RaySession`` is a Ray Train worker;
the epoch loop talks only to this interface, so it runs unchanged in both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


class LocalSession:
    """One process, no peers: every collective is the identity, reports go nowhere."""

    rank = 0
    world_size = 1

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the step runs: the ``Trainable`` itself here, its DDP wrapper in a Ray worker."""
        return model

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return values

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        """Called by every rank once per epoch; ``checkpoint`` is set on rank 0 when one was written."""

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        """The checkpoint to continue from after a restart (None for a fresh run)."""
        yield None

    def on_step(self, step: int) -> None:
        """Called after every optimisation step with the global step count."""

    def finish(self, model: nn.Module) -> None:
        """Called by every rank with its trained ``Trainable`` (model and objective) after the last epoch."""


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over the torch.distributed group (identity when it is not initialised)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()
