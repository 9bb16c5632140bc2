"""An exponential moving average of a module's weights (``train.ema_decay``), for fine-tuning.

detectron2's ``model_ema`` and mmdet's ``EMAHook`` keep such an average of every parameter and buffer and
evaluate it instead of the last weights: the average of the last ~1 / (1 - decay) steps is a smoother
model than the end point of a noisy schedule. Here the decay is constant (no warm-up ramp).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEma:
    """A copy of ``module`` whose floating-point tensors (parameters and buffers) follow

        ema <- decay * ema + (1 - decay) * current

    after every ``update``; other tensors (integer buffers such as BatchNorm's ``num_batches_tracked``) are
    copied. The copy starts as ``module`` is at construction, sits on the same device, is never trained and
    stays in eval mode.

    Attributes:
        module: the averaged copy (evaluate or save it like the original).
        decay: in [0, 1).
        updates: the number of ``update`` calls so far (restored by ``load_state_dict``).
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(module).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Average in the current tensors of ``module`` (the trained original, same structure as ``self.module``)."""
        current = module.state_dict()
        averaged, latest = [], []
        seen: set[int] = set()
        for name, tensor in self.module.state_dict().items():
            if tensor.data_ptr() in seen:
                continue  # a tensor shared under two names (tied weights) is averaged once
            seen.add(tensor.data_ptr())
            source = current[name].detach()
            if tensor.is_floating_point():
                averaged.append(tensor)
                latest.append(source.to(tensor.dtype))
            else:
                tensor.copy_(source)
        if averaged:
            # lerp: ema + (1 - decay) (w - ema); a tensor that does not change (frozen stages) stays exact.
            torch._foreach_lerp_(averaged, latest, 1.0 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """What a resumable checkpoint keeps: the averaged tensors, the decay and the update count."""
        return {"state": self.module.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.module.load_state_dict(saved["state"])
        self.updates = int(saved["updates"])
