"""Where a process computes: CPU unless a GPU is asked for."""

from __future__ import annotations

import torch


def select_device(use_gpu: bool) -> torch.device:
    """CUDA when asked for and present; asking for it where there is none is an error, not a silent CPU run."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("train.use_gpu is set but torch sees no CUDA device; drop --gpu or run on a GPU node")
    return torch.device("cuda", torch.cuda.current_device())
