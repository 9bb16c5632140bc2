"""Checkpoint directories: model.pt, objective.pt, optimizer.pt, config.yaml, meta.json, written atomically.

``model.pt`` holds the pure model's state dict under its own keys (what evaluation, export and
``--init`` read), ``objective.pt`` the training objective's (``sp_ray.objectives``; the SP prompt encoder and
projection, often empty), ``optimizer.pt`` the optimizer and scheduler of a resumable checkpoint.
Checkpoints written before the split (one ``model.pt`` for both) load through ``split_legacy_state``.

The directory is assembled under a temporary name next to its destination and renamed into place,
so a crash leaves either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import re
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
from sp_ray.config import Config, checkpoint_config_from_dict, config_hash, dump_config
from sp_ray.errors import UserError

MODEL_FILE = "model.pt"
OBJECTIVE_FILE = "objective.pt"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
# The attribute under which the SP pre-training wrapper of earlier checkpoints held its detector: the key prefix of
# the detector's tensors in the model.pt of those checkpoints (``split_legacy_state``).
LEGACY_MODEL_PREFIX = "model."


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, loaded."""

    path: Path
    model_state: dict[str, torch.Tensor]  # the pure model's keys
    config: Config
    meta: dict[str, Any]
    training_state: dict[str, Any] | None = None  # optimizer, scheduler, epoch, step (absent for final models)
    # The objective's state dict (objective.pt, or the objective part of an old model.pt; {} when it has none).
    objective_state: dict[str, torch.Tensor] = field(default_factory=dict)


def split_legacy_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The one mapping of an old checkpoint's ``model.pt`` (written before ``objective.pt`` existed) onto
    ``(model_state, objective_state)``.

    - SP pre-training checkpoints held the wrapper's state: the detector under ``model.`` (the prefix is
      removed: model state) and the pre-training-only tensors under their own names, ``projection.*``,
      ``prompt_encoder.*`` (and ``criterion.*``, none of which is persistent), which are the keys of
      ``SPObjective``'s state dict: objective state.
    - Every other old checkpoint (fine-tuning, Mask R-CNN, IUQ, whose wrapper wrote the plain model's
      state dict, DenseCL) holds plain model keys: all model state, objective state empty.

    A state dict is of the first kind when any key starts with ``model.`` (no model of sp-ray has a
    top-level module of that name).
    """
    if not any(name.startswith(LEGACY_MODEL_PREFIX) for name in state):
        return dict(state), {}
    model_state = {name.removeprefix(LEGACY_MODEL_PREFIX): tensor for name, tensor in state.items()
                   if name.startswith(LEGACY_MODEL_PREFIX)}
    objective_state = {name: tensor for name, tensor in state.items() if not name.startswith(LEGACY_MODEL_PREFIX)}
    return model_state, objective_state


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
    objective: nn.Module | None = None,
) -> Path:
    """Write a checkpoint directory atomically, replacing any previous one at ``path``.

    Args:
        path: destination directory.
        model: the pure model, saved as model.pt (a DDP wrapper is unwrapped).
        objective: its training objective, saved as objective.pt; None (DenseCL) writes none.
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
        if objective is not None:
            torch.save(objective.state_dict(), tmp / OBJECTIVE_FILE)
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


def load_tensor_file(path: str | Path, *, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one clear error for a file it cannot read.

    Args:
        path: a file written by ``torch.save``.
        what: what the file is for, for the message (e.g. "the model of checkpoint X").

    Raises:
        UserError: the file is truncated, corrupt, not a torch file, or holds objects other than
            tensors and plain containers (which are never unpickled: no code in a file is run).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own text suggests weights_only=False, i.e. running the file's code: name the object instead.
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        detail = f"it references {found.group(1)}" if found else "it holds objects other than tensors"
        raise UserError(
            f"{path} ({what}) cannot be loaded safely: {detail}. sp-ray reads tensors only and never runs code "
            "from a file; use a file written by sp-ray or torch.save of a state dict"
        ) from None
    except Exception as err:  # torch raises RuntimeError, KeyError, EOFError, ... for a damaged file
        # The first sentence only: torch's damaged-zip text runs on for several lines.
        first_line = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0][:160]
        raise UserError(
            f"{path} ({what}) is truncated or not a PyTorch file ({type(err).__name__}: {first_line}); "
            "use an intact copy, or the checkpoint of an earlier epoch"
        ) from None


def load_checkpoint(path: str | Path, *, with_training_state: bool = False) -> Checkpoint:
    """Read a checkpoint directory written by ``save_checkpoint``.

    Args:
        path: the checkpoint directory.
        with_training_state: also read ``optimizer.pt`` (optimizer, scheduler, epoch, step): a resumable
            checkpoint (``WORK_DIR/last``), not a final model.

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint directory (names the missing files).
        UserError: a file of it is damaged or not what sp-ray writes, or ``with_training_state`` and it
            has no training state (a final model).
    """
    path = Path(path)
    missing = [name for name in (MODEL_FILE, CONFIG_FILE, META_FILE) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not an sp-ray checkpoint directory (missing {', '.join(missing)}); "
            "pass a directory written by 'sp-ray finetune' or 'sp-ray pretrain', e.g. WORK_DIR/final"
        )
    if with_training_state and not (path / OPTIMIZER_FILE).is_file():
        raise UserError(
            f"{path} has no {OPTIMIZER_FILE}: it is a final model, not a resumable run. Resume from the run's "
            "WORK_DIR/last (sp-ray ... --resume), or start a new run from its weights with --init " + str(path)
        )
    model_state = _load_state(path / MODEL_FILE, what=f"the model of checkpoint {path}")
    if (path / OBJECTIVE_FILE).is_file():
        objective_state = _load_state(path / OBJECTIVE_FILE, what=f"the training objective of checkpoint {path}")
    else:  # written before objective.pt existed
        model_state, objective_state = split_legacy_state(model_state)
    try:
        raw_config = yaml.safe_load((path / CONFIG_FILE).read_text())
        meta = json.loads((path / META_FILE).read_text())
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as err:
        first_line = str(err).splitlines()[0][:160]
        raise UserError(f"{path}: {CONFIG_FILE} or {META_FILE} is damaged ({first_line}); use an intact copy") from None
    if not isinstance(raw_config, dict) or not isinstance(meta, dict):
        raise UserError(f"{path}: {CONFIG_FILE} and {META_FILE} must each hold a mapping; use an intact copy")
    config = checkpoint_config_from_dict(raw_config, source=str(path / CONFIG_FILE))  # old loss keys: see there
    training_state = None
    if with_training_state:
        training_state = load_tensor_file(path / OPTIMIZER_FILE, what=f"the training state of checkpoint {path}")
        needed = ("optimizer", "epoch", "step")
        if not isinstance(training_state, dict) or any(key not in training_state for key in needed):
            raise UserError(
                f"{path / OPTIMIZER_FILE} lacks the training state ({', '.join(needed)}); "
                "resume from a WORK_DIR/last written by sp-ray"
            )
    return Checkpoint(path=path, model_state=model_state, config=config, meta=meta, training_state=training_state,
                      objective_state=objective_state)


def _load_state(path: Path, *, what: str) -> dict[str, torch.Tensor]:
    state = load_tensor_file(path, what=what)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict (a dict of tensors); it was not written by sp-ray")
    return state


def update_meta(path: str | Path, extra: dict[str, Any]) -> None:
    """Add ``extra`` to a checkpoint's meta.json, atomically (a crash leaves the old or the new file)."""
    meta_path = Path(path) / META_FILE
    meta = {**json.loads(meta_path.read_text()), **extra}
    tmp = meta_path.with_name(f".{META_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)


def copy_as_final(source: str | Path, destination: str | Path) -> Path:
    """Publish the model of a resumable checkpoint as a final model (no optimizer.pt), atomically."""
    source, destination = Path(source), Path(destination)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        for name in (MODEL_FILE, OBJECTIVE_FILE, CONFIG_FILE, META_FILE):
            if name == OBJECTIVE_FILE and not (source / name).is_file():
                continue  # an old checkpoint: its model.pt holds the objective's tensors too
            shutil.copy2(source / name, tmp / name)
        os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination


def load_init_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> InitReport:
    """Copy every tensor of ``state`` whose name and shape match into ``model``; report the rest.

    Used by ``--init`` (``init_from_checkpoint``): backbone, neck, kernel heads and initial kernels load,
    while a class head made for a different number of categories keeps its fresh initialisation.
    """
    own = model.state_dict()
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


def init_from_checkpoint(
    model: nn.Module, objective: nn.Module | None, ckpt: Checkpoint, *, with_objective: bool = False
) -> InitReport:
    """``--init``: the checkpoint's model tensors that fit into ``model``, and with ``with_objective`` its
    objective tensors that fit into ``objective`` (``pretrain --init`` from an SP pre-training checkpoint).

    Returns:
        One report; the objective's tensors are named ``objective.<key>``, and those not loaded (a
        fine-tuning run from a pre-training checkpoint: its projection and prompt encoder) are skipped.
    """
    report = load_init_weights(model, ckpt.model_state)
    if with_objective and objective is not None:
        part = load_init_weights(objective, ckpt.objective_state)
        for name in ("loaded", "reinitialised", "missing", "skipped"):
            getattr(report, name).extend(f"objective.{key}" for key in getattr(part, name))
    else:
        report.skipped.extend(f"objective.{key}" for key in ckpt.objective_state)
    return report
