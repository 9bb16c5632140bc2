"""The sweep file of ``sp-ray tune``: which configs, which data, which fractions, which search, where.

A sweep YAML is its own schema (``SweepConfig``), checked as strictly as the run configs: an unknown key
is an error naming the dotted key with a did-you-mean. It points at two run configs: the fine-tuning one
(``finetune_config``) and, for SP pre-training, the pre-training one (``pretrain_config``, whose
``propose`` section also drives the saliency proposals). Their paths are relative to the sweep file;
data and storage paths are relative to the working directory, as in the run configs. The search space
(``space``) is described in ``sp_ray.tune.space``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sp_ray.config import ConfigError, absolute_tracking_uri, load_yaml_dataclass
from sp_ray.errors import UserError
from sp_ray.train.tracking import require_package

SEARCHERS = ("basic",)
SCHEDULERS = ("asha", "fifo")


@dataclass
class SweepDataConfig:
    train_annotations: str = ""  # the labeled COCO train json that is split into the fractions
    train_images: str = ""  # the folder of its file names
    val_annotations: str = ""  # each epoch's val AP on this set is a trial's metric
    val_images: str = ""
    # What `propose` runs on for pre-training: an image folder, or a COCO json whose file names are relative
    # to train_images; "" = every image of train_annotations, labels unused (SP pre-trains on all of train2017).
    unlabeled: str = ""
    split_seed: int = 0  # seed of the nested fraction split (sp_ray.data.split.split_fractions)


@dataclass
class SpaceConfig:
    # Dotted config path -> a sampler ({choice|grid: [...]}, {uniform|loguniform|randint: [lo, hi]}) or a
    # constant. `pretrain` paths apply to pretrain_config (incl. propose.*), `finetune` ones to finetune_config.
    pretrain: dict[str, object] = field(default_factory=dict)
    finetune: dict[str, object] = field(default_factory=dict)


@dataclass
class SearchConfig:
    searcher: str = "basic"  # Tune's BasicVariantGenerator: random draws, every draw on every fraction
    num_samples: int = 1  # random draws of the space (times the grid values of the space)
    seed: int = 0  # seed of the draws, so a sweep file names one set of trials
    metric: str = "segm_AP"  # reported by every fine-tuning epoch (COCOeval on data.val_annotations), maximised


@dataclass
class SchedulerConfig:
    name: str = "asha"  # "asha": async successive halving within each fraction; "fifo": every trial runs to the end
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: float = 3.0  # ASHA keeps the best 1/reduction_factor at each rung
    max_epochs: int = 0  # ASHA's max_t in epochs; 0 = the fine-tuning config's train.epochs


@dataclass
class ResourcesConfig:
    num_workers: int = 1  # Ray Train workers of a trial's pre-training and fine-tuning runs
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # > 0 trains on GPUs; a fraction (e.g. 0.5) packs several trials on one GPU
    driver_cpus: float = 0.1  # the trial process only drives Ray Train / Ray Data, so a sliver of a CPU
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's CPUs and GPUs hold


@dataclass
class TrackingConfig:
    # Every trial an MLflow run (Tune's MLflowLoggerCallback, on the driver): its sample as params, each epoch's
    # metrics. file:DIR, sqlite:///FILE.db or a server; "" = none. A trial's work dir has its TensorBoard files.
    mlflow_tracking_uri: str = ""
    mlflow_experiment: str = ""  # "" = the sweep's name
    wandb_project: str = ""  # every trial a W&B run (Tune's WandbLoggerCallback; needs wandb); "" = none


@dataclass
class SweepConfig:
    name: str = ""  # the Tune experiment: STORAGE/NAME holds trials, splits and results
    storage_path: str = ""  # local dir or shared mount every node sees; "" = work_dirs/tune
    cache_dir: str = ""  # proposals and pre-trainings keyed by their settings; "" = STORAGE/cache (shared by sweeps)
    finetune_config: str = ""  # run config of the fine-tuning, relative to this file
    pretrain_config: str = ""  # run config of SP pre-training, relative to this file; "" = no pre-training
    fractions: list[float] = field(default_factory=list)  # labeled fractions: a grid axis, same search on each
    data: SweepDataConfig = field(default_factory=SweepDataConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def experiment_dir(self) -> Path:
        """STORAGE/NAME: Tune's experiment folder, with the trials, splits and results."""
        return Path(self.storage_path) / self.name

    @property
    def cache_root(self) -> Path:
        """Where proposals and pre-trainings are cached (``cache_dir`` or STORAGE/cache)."""
        return Path(self.cache_dir) if self.cache_dir else Path(self.storage_path) / "cache"


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read a sweep file, apply ``dotted.key=value`` overrides, check it and make every path absolute.

    Args:
        path: the sweep YAML.
        overrides: e.g. ``data.train_annotations=PATH`` or ``search.num_samples=8`` (values parsed as YAML).

    Returns:
        The SweepConfig; config paths resolved against the file's folder, the others against the working
        directory (trials run elsewhere).

    Raises:
        ConfigError: an unknown key, a wrong type or an out-of-range setting, naming the dotted key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    sweep = load_yaml_dataclass(SweepConfig, path, overrides)
    check_sweep(sweep, source=str(path))
    here = path.resolve().parent
    storage = Path(sweep.storage_path or "work_dirs/tune").resolve()
    data_paths = {
        key: str(Path(value).resolve()) if value else ""
        for key, value in dataclasses.asdict(sweep.data).items() if isinstance(value, str)
    }
    return dataclasses.replace(
        sweep,
        storage_path=str(storage),
        cache_dir=str(Path(sweep.cache_dir).resolve()) if sweep.cache_dir else "",
        finetune_config=str((here / sweep.finetune_config).resolve()),
        pretrain_config=str((here / sweep.pretrain_config).resolve()) if sweep.pretrain_config else "",
        data=dataclasses.replace(sweep.data, **data_paths),
        tracking=dataclasses.replace(
            sweep.tracking, mlflow_tracking_uri=absolute_tracking_uri(sweep.tracking.mlflow_tracking_uri)
        ),
    )


def dump_sweep(sweep: SweepConfig) -> str:
    """The sweep as YAML (``--print-config``, and the record kept next to the experiment)."""
    return yaml.safe_dump(dataclasses.asdict(sweep), sort_keys=False)


def check_sweep(sweep: SweepConfig, *, source: str) -> None:
    """Raise ConfigError naming the key of every setting a sweep cannot run with (paths are checked later)."""
    problems = []
    if not sweep.name or "/" in sweep.name:
        problems.append(f"name must be a non-empty folder name, got {sweep.name!r}")
    if not sweep.finetune_config:
        problems.append("finetune_config is empty: name the fine-tuning run config (relative to the sweep file)")
    if not sweep.fractions:
        problems.append("fractions is empty: list the labeled fractions, e.g. [0.01, 0.05, 0.1]")
    for key in ("train_annotations", "train_images", "val_annotations", "val_images"):
        if not getattr(sweep.data, key):
            problems.append(f"data.{key} is empty: set it in the sweep file or as data.{key}=PATH")
    if sweep.space.pretrain and not sweep.pretrain_config:
        problems.append("space.pretrain is set but pretrain_config is empty: there is no pre-training to vary")
    if sweep.search.searcher == "optuna":
        problems.append(
            "search.searcher 'optuna' is not available: it needs the optuna package (optuna==5.0.0, not a "
            "dependency of sp-ray) and Optuna cannot sample the fraction grid; use 'basic'"
        )
    elif sweep.search.searcher not in SEARCHERS:
        problems.append(f"search.searcher must be one of {SEARCHERS}, got {sweep.search.searcher!r}")
    if sweep.search.num_samples < 1:
        problems.append(f"search.num_samples must be >= 1, got {sweep.search.num_samples}")
    s = sweep.scheduler
    if s.name not in SCHEDULERS:
        problems.append(f"scheduler.name must be one of {SCHEDULERS}, got {s.name!r}")
    if s.grace_period < 1:
        problems.append(f"scheduler.grace_period must be >= 1 epoch, got {s.grace_period}")
    if s.reduction_factor <= 1:
        problems.append(f"scheduler.reduction_factor must be > 1, got {s.reduction_factor}")
    if s.max_epochs < 0:
        problems.append(f"scheduler.max_epochs must be >= 0 (0 = the fine-tuning train.epochs), got {s.max_epochs}")
    r = sweep.resources
    if r.num_workers < 1:
        problems.append(f"resources.num_workers must be >= 1, got {r.num_workers}")
    if r.cpus_per_worker <= 0 or r.driver_cpus <= 0:
        problems.append("resources.cpus_per_worker and resources.driver_cpus must be > 0 (Ray needs a CPU share)")
    if r.gpus_per_worker < 0:
        problems.append(f"resources.gpus_per_worker must be >= 0, got {r.gpus_per_worker}")
    if r.max_concurrent_trials < 0:
        problems.append(f"resources.max_concurrent_trials must be >= 0 (0 = what fits), got {r.max_concurrent_trials}")
    for package, key in (("mlflow", "mlflow_tracking_uri"), ("wandb", "wandb_project")):
        try:
            require_package(package, f"tracking.{key}", getattr(sweep.tracking, key))
        except UserError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
