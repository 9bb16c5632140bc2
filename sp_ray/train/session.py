"""What a training process needs to know about its peers: rank, world size, how to report.

``LocalSession`` is a single process, ``ProcessGroupSession`` one process of a torch.distributed group that
its launcher initialised (torchrun), ``sp_ray.train.ray_train.RaySession`` a Ray Train worker. The epoch loops
(``sp_ray.train.loop.fit``, ``sp_ray.densecl.train.train_densecl``) talk only to this interface, so they run
unchanged in each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class LocalSession:
    """One process, no peers: every collective is the identity, reports go nowhere."""

    rank = 0
    world_size = 1

    def wrap_model(self, model: nn.Module, *, sync_buffers: bool = True, find_unused_parameters: bool = False,
                   ) -> nn.Module:
        """The module the step runs (fit's ``Trainable``, DenseCL): DDP over the workers when there are several,
        else ``model`` itself.

        ``sync_buffers`` false: DDP does not broadcast rank 0's buffers at every forward (DenseCL, whose
        queues receive the same gathered keys on every worker anyway). ``find_unused_parameters``: DDP's
        option of that name (``train.find_unused_parameters``), for a step that leaves a trained parameter
        without a gradient."""
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


class ProcessGroupSession(LocalSession):
    """One process of a torch.distributed group that its launcher initialised (torchrun): rank and world size
    from the group, DDP over it, sums over it; reports and checkpoints go nowhere (no restarts)."""

    def __init__(self, device: torch.device) -> None:
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.device = device

    def wrap_model(self, model: nn.Module, *, sync_buffers: bool = True, find_unused_parameters: bool = False,
                   ) -> nn.Module:
        if self.world_size == 1:
            return model
        return DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
            **({} if sync_buffers else {"forward_sync_buffers": False}),
        )

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self.device)


def current_session(device: torch.device) -> LocalSession:
    """The session of a process that was given none: a ``ProcessGroupSession`` when torch.distributed is
    initialised (torchrun), else a ``LocalSession``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return ProcessGroupSession(device)
    return LocalSession()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over the torch.distributed group (identity when it is not initialised)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()
