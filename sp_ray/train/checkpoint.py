"""Checkpoint directories: model.pt, optimizer.pt, config.yaml, meta.json, written atomically.

The directory is assembled under a temporary name next to its destination and renamed into place,
so a crash leaves either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from sp_ray import __version__
from sp_ray.config import Config, config_from_dict, config_hash, dump_config

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
# A pre-training wrapper (``sp_ray.pretrain.sp_model``) holds the detector under this attribute, so its
# checkpoint has the detector's keys with this prefix next to pre-training-only modules.
WRAPPED_MODEL_PREFIX = "model."


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, loaded."""

    path: Path
    model_state: dict[str, torch.Tensor]
    config: Config
    meta: dict[str, Any]
    training_state: dict[str, Any] | None = None  # optimizer, scheduler, epoch, step (absent for final models)


@dataclass
class InitReport:
    """Which tensors ``load_init_weights`` took from a checkpoint and which it left alone."""

    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # present in both, shapes differ
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    skipped: list[str] = field(default_factory=list)  # in the checkpoint, not in the model

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        for name, keys in (("re-initialised (shape differs)", self.reinitialised),
                           ("kept at init (not in checkpoint)", self.missing),
                           ("skipped (not in model)", self.skipped)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{name}: {shown}")
        return "; ".join(parts)


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    config: Config,
    meta: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically, replacing any previous one at ``path``.

    Args:
        path: destination directory.
        model: the model (a DDP wrapper is unwrapped).
        config: the resolved config, saved as config.yaml.
        meta: json-serialisable facts (epoch, step, metrics, class names); versions are added.
        training_state: optimizer/scheduler state dicts and counters, saved as optimizer.pt.

    Returns:
        The checkpoint directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.module if hasattr(model, "module") else model
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        torch.save(model.state_dict(), tmp / MODEL_FILE)
        if training_state is not None:
            torch.save(training_state, tmp / OPTIMIZER_FILE)
        (tmp / CONFIG_FILE).write_text(dump_config(config))
        full_meta = {
            **meta,
            "config_hash": config_hash(config),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"sp_ray": __version__, "torch": torch.__version__, "python": platform.python_version()},
        }
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2))
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return all((path / name).is_file() for name in (MODEL_FILE, CONFIG_FILE, META_FILE))


def load_checkpoint(path: str | Path, *, with_training_state: bool = False) -> Checkpoint:
    """Read a checkpoint directory written by ``save_checkpoint``.

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint directory (names the missing files).
    """
    path = Path(path)
    missing = [name for name in (MODEL_FILE, CONFIG_FILE, META_FILE) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not an sp-ray checkpoint directory (missing {', '.join(missing)}); "
            "pass a directory written by 'sp-ray finetune' or 'sp-ray pretrain', e.g. WORK_DIR/final"
        )
    model_state = torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True)
    config = config_from_dict(yaml.safe_load((path / CONFIG_FILE).read_text()), source=str(path / CONFIG_FILE))
    meta = json.loads((path / META_FILE).read_text())
    training_state = None
    if with_training_state:
        if not (path / OPTIMIZER_FILE).is_file():
            raise FileNotFoundError(f"{path} has no {OPTIMIZER_FILE}: it is a final model, not a resumable run")
        training_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return Checkpoint(path=path, model_state=model_state, config=config, meta=meta, training_state=training_state)


def load_init_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> InitReport:
    """Copy every tensor of ``state`` whose name and shape match into ``model``; report the rest.

    Used by ``finetune --init``: backbone, neck, kernel heads and initial kernels load, while a
    class head made for a different number of categories keeps its fresh initialisation. A
    pre-training checkpoint (keys under ``WRAPPED_MODEL_PREFIX``) gives its detector's tensors; its
    pre-training-only tensors (the saliency projection, the image-prompt Linear) are reported skipped.
    ``pretrain --init`` goes the other way: a plain or pre-training checkpoint into the pre-training wrapper.
    """
    own = model.state_dict()
    wrapped = any(name.startswith(WRAPPED_MODEL_PREFIX) for name in state)
    wrapping = any(name.startswith(WRAPPED_MODEL_PREFIX) for name in own)
    if wrapped and not wrapping:
        state = {name.removeprefix(WRAPPED_MODEL_PREFIX): tensor for name, tensor in state.items()}
    elif wrapping and not wrapped:  # a plain model's checkpoint into a pre-training wrapper
        state = {WRAPPED_MODEL_PREFIX + name: tensor for name, tensor in state.items()}
    report = InitReport()
    to_load = {}
    for name, tensor in state.items():
        if name not in own:
            report.skipped.append(name)
        elif own[name].shape != tensor.shape:
            report.reinitialised.append(name)
        else:
            to_load[name] = tensor
            report.loaded.append(name)
    report.missing = [name for name in own if name not in state]
    model.load_state_dict(to_load, strict=False)
    return report
