"""``sp-ray tune``: a Ray Tune sweep of SP pre-training and fine-tuning settings across labeled fractions.

The driver splits the labeled set into the nested fractions, builds the Tune ``param_space`` (the fraction
as a grid axis, the sampled settings drawn once per sample and run on every fraction), and runs the trials
of ``sp_ray.tune.trial`` under a per-fraction ASHA with Tune's own searcher. A failed trial is recorded and
the others go on. ``resume=True`` restores the experiment (``Tuner.restore``): finished and failed trials
keep their results, unfinished ones run (their fine-tuning continues from its last checkpoint). The
results (``sp_ray.tune.results``) are written after every run, interrupted or not.

Layout under ``STORAGE/NAME``: Tune's experiment state, ``sweep.yaml`` (the resolved sweep), ``splits/``,
one folder per trial id, ``results/``. Proposals and pre-trainings live in the cache (``STORAGE/cache``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sp_ray.config import ConfigError, config_to_dict, load_config
from sp_ray.data.images import list_image_files
from sp_ray.data.split import fraction_tag, split_fractions
from sp_ray.train.ray_train import init_ray
from sp_ray.train.tracking import allow_file_store
from sp_ray.tune.cache import settings_key
from sp_ray.tune.results import UNFINISHED, TrialRecord, collect_trials, write_results
from sp_ray.tune.scheduler import FractionASHA
from sp_ray.tune.space import FRACTION, Param, check_space, param_space, parse_space
from sp_ray.tune.spec import ResourcesConfig, SweepConfig, dump_sweep
from sp_ray.tune.trial import TrialContext, run_trial

log = logging.getLogger("sp_ray")


@dataclass
class SweepOutcome:
    """What ``run_sweep`` returns."""

    experiment_dir: Path
    records: list[TrialRecord]
    files: dict[str, Path]  # see sp_ray.tune.results.write_results
    complete: bool  # False when trials are left unfinished (the sweep was interrupted): resume it


def run_sweep(sweep: SweepConfig, *, resume: bool = False) -> SweepOutcome:
    """Run (or resume) a sweep and write its results.

    Args:
        sweep: from ``sp_ray.tune.spec.load_sweep`` (absolute paths).
        resume: continue the experiment ``STORAGE/NAME`` (``Tuner.restore``): unfinished trials run, finished
            and failed ones are kept as they are.

    Returns:
        The experiment folder, one record per trial, the files written and whether every trial ended.

    Raises:
        ConfigError: a bad space or run config, a missing data path, an experiment that already exists
            (without ``resume``) or none to resume.
    """
    from ray import tune

    params = parse_space({"pretrain": sweep.space.pretrain, "finetune": sweep.space.finetune})
    finetune_base, pretrain_base = _run_configs(sweep)
    check_space(params, {"finetune": finetune_base, "pretrain": pretrain_base})
    experiment = sweep.experiment_dir
    init_ray()
    exists = tune.Tuner.can_restore(str(experiment))
    if exists and not resume:
        raise ConfigError(f"sweep {experiment} exists: continue it with --resume, or give the sweep another name")
    if resume and not exists:
        raise ConfigError(f"no sweep to resume at {experiment}: run it without --resume first")
    _record_sweep(sweep, experiment / "sweep.yaml", resume=resume)
    splits = split_fractions(sweep.data.train_annotations, sweep.fractions, seed=sweep.data.split_seed,
                             out_dir=experiment / "splits")
    context = TrialContext(
        finetune_base=finetune_base, pretrain_base=pretrain_base, splits={f: str(p) for f, p in splits.items()},
        data=sweep.data, images_fingerprint=images_fingerprint(sweep), cache_dir=str(sweep.cache_root),
        experiment_dir=str(experiment), resources=sweep.resources, metric=sweep.search.metric, cwd=str(Path.cwd()),
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    {"CPU": sweep.resources.driver_cpus})
    if resume:
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(params, sweep.fractions),
                           tune_config=_tune_config(sweep, params, finetune_base),
                           run_config=tune.RunConfig(name=sweep.name, storage_path=sweep.storage_path,
                                                     failure_config=tune.FailureConfig(max_failures=0),
                                                     callbacks=tracking_callbacks(sweep)))
    tuner.fit()
    records = collect_trials(experiment, params, sweep.search.metric)
    files = write_results(records, experiment / "results", params=params, metric=sweep.search.metric,
                          sweep_name=sweep.name)
    return SweepOutcome(experiment, records, files, complete=all(r.status != UNFINISHED for r in records))


def tracking_callbacks(sweep: SweepConfig) -> list[Any]:
    """Ray's logger callbacks of the sweep's ``tracking`` section: one MLflow / W&B run per trial, with the trial's
    sample as params and every reported epoch as metrics (step: Tune's training iteration, the epoch)."""
    callbacks: list[Any] = []
    t = sweep.tracking
    if t.mlflow_tracking_uri:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        allow_file_store(t.mlflow_tracking_uri)
        callbacks.append(MLflowLoggerCallback(tracking_uri=t.mlflow_tracking_uri,
                                              experiment_name=t.mlflow_experiment or sweep.name))
    if t.wandb_project:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=t.wandb_project, group=sweep.name))
    return callbacks


def _record_sweep(sweep: SweepConfig, path: Path, *, resume: bool) -> None:
    """Write the resolved sweep next to the experiment; a resumed sweep must be the one that was started."""
    current = dataclasses.asdict(sweep)
    if resume and path.is_file():
        started = yaml.safe_load(path.read_text())
        changed = sorted(key for key in current if current[key] != started.get(key))
        if changed:
            raise ConfigError(
                f"the sweep changed since {path} was started (keys: {', '.join(changed)}); resume it with the "
                "same sweep file and overrides, or start a new sweep under another name"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_sweep(sweep))


def _run_configs(sweep: SweepConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The fine-tuning and pre-training run configs as dicts, checked before any trial starts."""
    for key in ("train_annotations", "train_images", "val_annotations", "val_images", "unlabeled"):
        value = getattr(sweep.data, key)
        if value and not Path(value).exists():
            raise ConfigError(f"sweep data.{key}: {value} does not exist")
    finetune = load_config(sweep.finetune_config)
    if finetune.pretrain.enabled:
        raise ConfigError(f"finetune_config {sweep.finetune_config} is a pre-training config (pretrain.enabled)")
    pretrain = load_config(sweep.pretrain_config, ["pretrain.enabled=true"]) if sweep.pretrain_config else None
    return config_to_dict(finetune), None if pretrain is None else config_to_dict(pretrain)


def _tune_config(sweep: SweepConfig, params: list[Param], finetune_base: dict[str, Any]) -> Any:
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    if sweep.scheduler.name == "asha":
        scheduler = FractionASHA(time_attr="epoch", max_t=max_epochs(sweep, params, finetune_base),
                                 grace_period=sweep.scheduler.grace_period,
                                 reduction_factor=sweep.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.TuneConfig(
        metric=sweep.search.metric, mode="max", scheduler=scheduler,
        # constant_grid_search: each random draw is made once and run on every grid value (every fraction).
        # (Tune ignores TuneConfig.max_concurrent_trials next to a BasicVariantGenerator, so it is set here.)
        search_alg=BasicVariantGenerator(constant_grid_search=True, random_state=sweep.search.seed,
                                         max_concurrent=max_concurrent_trials(sweep.resources)),
        num_samples=sweep.search.num_samples,
        trial_name_creator=trial_name, trial_dirname_creator=trial_dirname,
    )


def max_epochs(sweep: SweepConfig, params: list[Param], finetune_base: dict[str, Any]) -> int:
    """ASHA's last rung: ``scheduler.max_epochs``, else the most fine-tuning epochs a trial can get."""
    if sweep.scheduler.max_epochs:
        return sweep.scheduler.max_epochs
    for p in params:
        if p.stage == "finetune" and p.path == "train.epochs":
            return max(p.args) - 1 if p.kind == "randint" else max(p.args)
    return int(finetune_base["train"]["epochs"])


def max_concurrent_trials(resources: ResourcesConfig) -> int:
    """``resources.max_concurrent_trials``, else the trials whose workers the cluster holds at once."""
    import ray

    if resources.max_concurrent_trials:
        return resources.max_concurrent_trials
    cluster = ray.cluster_resources()
    fits = [cluster.get("CPU", 0.0) // (resources.num_workers * resources.cpus_per_worker + resources.driver_cpus)]
    if resources.gpus_per_worker > 0:
        fits.append(cluster.get("GPU", 0.0) // (resources.num_workers * resources.gpus_per_worker))
    return max(1, int(min(fits)))


def images_fingerprint(sweep: SweepConfig) -> str:
    """Identity of the images `propose` runs on: a json's size and time stamp, or a folder's names and sizes."""
    source = Path(sweep.data.unlabeled or sweep.data.train_annotations)
    if source.is_dir():
        entries = [(str(p.relative_to(source)), p.stat().st_size) for p in list_image_files(source)]
        return settings_key({"folder": str(source), "files": entries})
    stat = source.stat()
    return settings_key({"json": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                         "root": sweep.data.train_images})


def trial_name(trial: Any) -> str:
    """``<pct>pct_<trial id>``: the fraction is the first thing to know about a trial in Tune's tables."""
    return f"{fraction_tag(trial.config[FRACTION])}pct_{trial.trial_id}"


def trial_dirname(trial: Any) -> str:
    """The trial id: ``sp_ray.tune.trial`` writes its files to ``EXPERIMENT/<trial id>``."""
    return trial.trial_id
