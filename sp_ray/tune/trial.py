"""One trial of a sweep: proposals -> SP pre-training -> fine-tuning on a labeled fraction, in Ray Train.

The trial is a Tune function trainable that drives Ray Train (the Tune + Train V2 pattern): it holds a sliver
of a CPU, and the training runs in ``TorchTrainer`` workers with the sweep's per-trial resources. Proposals
and pre-trainings are cached by the hash of what they depend on (``sp_ray.tune.cache``), so trials that differ
only in fine-tuning or data fraction share one pre-training. Fine-tuning evaluates on the val set after every
epoch; ``TuneReportCallback`` hands each epoch's metrics (rank 0's, where the evaluation runs) and the
reported checkpoint's path to Tune, so ASHA can stop a weak trial between epochs.

Files: ``EXPERIMENT/TRIAL_ID/`` holds ``trial.json`` (fraction, cache keys and hits, start times),
``finetune.yaml`` (the resolved fine-tuning config) and ``finetune/`` (the run's work dir).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.tune

from sp_ray.config import Config, absolute_tracking_uri, config_from_dict, config_to_dict, dump_config
from sp_ray.pretrain.propose import check_propose_config, proposal_identity, propose
from sp_ray.pretrain.sp_objective import check_pretrain_config
from sp_ray.train.ray_train import run_training
from sp_ray.tune.cache import cached_build, settings_key, write_json_atomic
from sp_ray.tune.space import apply_params
from sp_ray.tune.spec import ResourcesConfig, SweepDataConfig

log = logging.getLogger("sp_ray")

TRIAL_RECORD = "trial.json"
FINETUNE_CONFIG = "finetune.yaml"
# Settings that change how a stage runs, not what it computes; left out of the cache keys.
RUNTIME_KEYS = {
    "train": ("log_interval", "storage_path", "checkpoints_to_keep", "max_failures", "resources_per_worker",
              "placement_strategy", "checkpoint_interval", "eval_interval", "inject_failure_at_step",
              "tensorboard", "mlflow_tracking_uri", "mlflow_experiment", "wandb_project"),
    "data": ("num_workers",),
    "propose": ("batch_size", "shard_size", "num_actors", "cpus_per_actor"),
}
# Config keys holding paths, made absolute against the sweep's working directory (trials run elsewhere).
PATH_KEYS = ("model.backbone_weights", "data.train_annotations", "data.train_images", "data.val_annotations",
             "data.val_images", "pretrain.prompts", "train.storage_path")


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs beside its sampled parameters; built once by the sweep driver."""

    finetune_base: dict[str, Any]  # config_to_dict of the fine-tuning run config
    pretrain_base: dict[str, Any] | None  # of the pre-training run config; None = no pre-training
    splits: dict[float, str]  # fraction -> its labeled COCO json
    data: SweepDataConfig  # absolute paths
    images_fingerprint: str  # identity of the images `propose` runs on (names, sizes)
    cache_dir: str
    experiment_dir: str
    resources: ResourcesConfig
    metric: str
    cwd: str  # the driver's working directory: relative paths in the run configs are relative to it


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """The Tune trainable: pre-train (cached), then fine-tune on ``params["fraction"]``, reporting each epoch.

    Args:
        params: the trial's sample: ``fraction`` (float), ``pretrain`` and ``finetune`` ({dotted path: value}).
        context: see `TrialContext`.

    Raises:
        Whatever a stage raises (a bad value, a failed Ray Train run); Tune records it as the trial's error.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = Path(context.experiment_dir) / trial_id
    fraction = float(params["fraction"])
    record = _start_record(trial_dir / TRIAL_RECORD, trial_id=trial_id, fraction=fraction)
    init = None
    if context.pretrain_base is not None:
        init, stages = pretrained_checkpoint(context, context.pretrain_base, params.get("pretrain", {}))
        record.update(stages)
    cfg = finetune_config(context, params.get("finetune", {}), fraction)
    (trial_dir / FINETUNE_CONFIG).write_text(dump_config(cfg))
    record.update(init=str(init) if init else None, epochs=cfg.train.epochs, finetune_config=str(trial_dir /
                  FINETUNE_CONFIG))
    write_json_atomic(trial_dir / TRIAL_RECORD, record)
    finetune(cfg, trial_dir / "finetune", init=init, run_name=f"finetune-{trial_id}", metric=context.metric)


def pretrained_checkpoint(
    context: TrialContext, base: dict[str, Any], values: dict[str, Any]
) -> tuple[Path, dict[str, Any]]:
    """Proposals, then SP pre-training, each taken from the cache when its settings were run before.

    Args:
        context: the sweep's context.
        base: the pre-training run config (``config_to_dict``).
        values: the trial's ``pretrain`` sample, {dotted path: value} of the pre-training config.

    Returns:
        (the pre-training's final checkpoint directory, {"propose": {key, cached}, "pretrain": {key, cached}}).
    """
    cfg = with_paths(
        with_resources(apply_params(config_from_dict(base), values, source="space.pretrain"), context.resources),
        context.cwd,
    )
    # Pseudo masks have no validation set (the pre-training config may inherit a fine-tuning one's).
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_annotations="", val_images=""))
    # Bad values fail the trial here, before minutes of proposals.
    check_propose_config(cfg.propose)
    check_pretrain_config(cfg)
    cache = Path(context.cache_dir)
    source = context.data.unlabeled or context.data.train_annotations
    image_root = None if Path(source).is_dir() else context.data.train_images
    # What the proposals depend on is propose's own business (its shard fingerprints use the same identity).
    propose_settings = {"proposals": proposal_identity(cfg), "images": context.images_fingerprint}
    propose_key = settings_key(propose_settings)

    def build_proposals(directory: Path) -> dict[str, Any]:
        summary = propose(source, directory, cfg, image_root=image_root)
        return {key: summary[key] for key in ("annotations_path", "prompts_path", "images", "annotations",
                                              "seconds")}

    proposals, propose_hit = cached_build(cache / "propose", propose_key, build_proposals,
                                          settings=propose_settings)
    images = source if image_root is None else image_root
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, train_annotations=proposals["annotations_path"], train_images=images),
        pretrain=dataclasses.replace(cfg.pretrain, enabled=True, prompts=proposals["prompts_path"]),
    )
    settings = pretrain_settings(cfg, propose_key)
    pretrain_key = settings_key(settings)

    def build_pretraining(directory: Path) -> dict[str, Any]:
        start = time.perf_counter()
        (directory / "config.yaml").write_text(dump_config(cfg))
        final = run_training(cfg, directory, run_name=f"pretrain-{pretrain_key}", task="pretrain")
        return {"final": str(final), "seconds": round(time.perf_counter() - start, 1)}

    pretraining, pretrain_hit = cached_build(cache / "pretrain", pretrain_key, build_pretraining, settings=settings)
    log.info("trial: proposals %s (%s), pre-training %s (%s)", propose_key, "cached" if propose_hit else "computed",
             pretrain_key, "cached" if pretrain_hit else "computed")
    stages = {"propose": {"key": propose_key, "cached": propose_hit},
              "pretrain": {"key": pretrain_key, "cached": pretrain_hit}}
    return Path(pretraining["final"]), stages


def pretrain_settings(cfg: Config, propose_key: str) -> dict[str, Any]:
    """What a pre-training computes from: its config without ``RUNTIME_KEYS`` and ``eval``, the proposals' key.

    Args:
        cfg: the pre-training config, its data paths pointing at the proposals.
        propose_key: the proposals' cache key; it stands in for their paths, so a moved cache keeps its keys.

    Returns:
        A JSON-serialisable dict (hash it with ``settings_key``).
    """
    settings = _without_runtime(config_to_dict(cfg))
    settings["data"]["train_annotations"] = propose_key
    settings["pretrain"]["prompts"] = propose_key
    settings["backbone_stamp"] = _file_stamp(cfg.model.backbone_weights)  # a replaced weights file is a new key
    return settings


def finetune_config(context: TrialContext, values: dict[str, Any], fraction: float) -> Config:
    """The fine-tuning config of a trial: the sample, the fraction's split, the val set, evaluation every epoch."""
    cfg = apply_params(config_from_dict(context.finetune_base), values, source="space.finetune")
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, train_annotations=context.splits[fraction],
                                 train_images=context.data.train_images, val_annotations=context.data.val_annotations,
                                 val_images=context.data.val_images),
        # ASHA compares trials epoch by epoch, and the best epoch's checkpoint is the one to keep.
        train=dataclasses.replace(cfg.train, eval_interval=1, checkpoint_interval=1),
    )
    return with_paths(with_resources(cfg, context.resources), context.cwd)


def with_resources(cfg: Config, resources: ResourcesConfig) -> Config:
    """Set the Ray Train workers of a run from the sweep's per-trial resources."""
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker > 0:
        per_worker["GPU"] = resources.gpus_per_worker
    train = dataclasses.replace(cfg.train, num_workers=resources.num_workers,
                                use_gpu=resources.gpus_per_worker > 0, resources_per_worker=per_worker)
    return dataclasses.replace(cfg, train=train)


def with_paths(cfg: Config, cwd: str | Path) -> Config:
    """Make the relative paths of ``PATH_KEYS`` absolute against ``cwd``."""
    data = config_to_dict(cfg)
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = data[section][key]
        if value and not Path(value).is_absolute():
            data[section][key] = str(Path(cwd) / value)
    data["train"]["mlflow_tracking_uri"] = absolute_tracking_uri(data["train"]["mlflow_tracking_uri"], cwd)
    return config_from_dict(data, source="trial paths")


def finetune(cfg: Config, work_dir: Path, *, init: Path | None, run_name: str, metric: str) -> None:
    """Fine-tune in Ray Train workers (``run_training``), each epoch reported to the trial.

    The Train run's name is the trial's, so a trial restarted by ``--resume`` continues the run from its last
    reported checkpoint instead of starting over. Ray keeps ``train.checkpoints_to_keep`` checkpoints, the
    best by ``metric``.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    metrics_file = work_dir / "metrics.jsonl"
    before = len(metrics_file.read_text().splitlines()) if metrics_file.is_file() else 0
    run_training(cfg, work_dir, init=init, run_name=run_name, metric=metric, callbacks=[TuneReportCallback()])
    lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
    if lines and len(lines) == before:
        # Resumed after its last epoch (stopped between the run's end and Tune's bookkeeping): the run
        # reported nothing, so the trial reports the last epoch again rather than end without its metric.
        ray.tune.report(json.loads(lines[-1]))


def read_trial_record(trial_dir: Path) -> dict[str, Any]:
    """``trial.json`` of a trial directory, or {} when the trial never started."""
    path = trial_dir / TRIAL_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def _start_record(path: Path, *, trial_id: str, fraction: float) -> dict[str, Any]:
    record = read_trial_record(path.parent) or {"trial_id": trial_id, "fraction": fraction, "starts": []}
    record["starts"].append(time.time())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return record


def _without_runtime(data: dict[str, Any]) -> dict[str, Any]:
    data = {section: dict(values) for section, values in data.items() if section != "eval"}
    for section, keys in RUNTIME_KEYS.items():
        for key in keys:
            data[section].pop(key, None)
    return data


def _file_stamp(path: str | None) -> list[int] | None:
    if not path or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns]
