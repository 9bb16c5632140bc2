"""Ray Train wiring: the epoch loop of ``sp_ray.train.loop.fit`` inside ``TorchTrainer`` workers.

The driver (``run_training``) first checks config, data and checkpoints (``sp_ray.train.preflight``),
then connects to a Ray cluster (``RAY_ADDRESS``, as set by ``ray job submit``) or starts a local one,
checks that the resources asked for exist, and builds the trainer.
Each worker runs ``fit`` (or the worker function of another task, such as DenseCL's
``sp_ray.densecl.train.ssl_worker``) with a ``RaySession``: DDP through Ray's ``prepare_model``, metrics and
rank-0 checkpoints through ``ray.train.report``, and the last reported checkpoint restored after a
worker failure. A ``UserError`` in a worker ends the run without a retry (``sp_ray.train.failures``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from sp_ray.config import Config, absolute_paths, config_from_dict, config_to_dict
from sp_ray.errors import UserError
from sp_ray.objectives import build_objective
from sp_ray.pretrain.sp_objective import build_sp_objective
from sp_ray.train.failures import StopOnUserError, raise_user_error
from sp_ray.train.loop import fit
from sp_ray.train.preflight import TrainingPlan, check_training
from sp_ray.train.session import all_reduce_sum

log = logging.getLogger("sp_ray")

FAILURE_MARKER = ".injected_failure_done"
# Under WORK_DIR: the snapshots of rank 0's checkpoints that an asynchronous upload copies (and then deletes).
UPLOAD_DIR = ".upload"


class InjectedFailure(RuntimeError):
    """Raised once by ``train.inject_failure_at_step`` to test recovery from a worker failure."""


class RaySession:
    """A Ray Train worker's view of the run (see ``sp_ray.train.session.LocalSession``)."""

    def __init__(self, cfg: Config, work_dir: Path) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.cfg = cfg
        self.work_dir = work_dir
        self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.train.use_gpu else torch.device("cpu")
        if self.rank == 0 and (work_dir / UPLOAD_DIR).is_dir():
            # Snapshots an earlier attempt's upload left behind when its worker failed (Ray restores from
            # storage, never from these).
            shutil.rmtree(work_dir / UPLOAD_DIR, ignore_errors=True)

    def wrap_model(self, model: nn.Module, *, sync_buffers: bool = True, find_unused_parameters: bool = False,
                   ) -> nn.Module:
        # prepare_model hands parallel_strategy_kwargs to DistributedDataParallel (one worker: no wrapper).
        return ray.train.torch.prepare_model(
            model, move_to_device=False,
            parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters,
                                      **({} if sync_buffers else {"forward_sync_buffers": False})},
        )

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self.device)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        """``ray.train.report`` of the epoch's metrics and rank 0's checkpoint (``train.checkpoint_upload``).

        "async": Ray copies the checkpoint to storage in a background thread while the next epoch trains, and
        deletes the reported directory once copied. ``WORK_DIR/last`` is replaced by the next epoch and must
        not be deleted, so a snapshot of it is reported instead (``snapshot_checkpoint``: hard links, no
        copy). Ray waits for the last upload before the worker ends; a failed upload fails the worker.
        """
        if checkpoint is None:
            ray.train.report(metrics)
            return
        name = f"checkpoint_epoch={metrics['epoch']:04d}"
        if self.cfg.train.checkpoint_upload == "sync":
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
                             checkpoint_dir_name=name)
            return
        snapshot = snapshot_checkpoint(checkpoint, self.work_dir / UPLOAD_DIR / name)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(str(snapshot)), checkpoint_dir_name=name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=True,
        )

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def on_step(self, step: int) -> None:
        target = self.cfg.train.inject_failure_at_step
        failing_rank = min(1, self.world_size - 1)
        marker = self.work_dir / FAILURE_MARKER
        if step == target and self.rank == failing_rank and not marker.exists():
            marker.touch()
            raise InjectedFailure(f"train.inject_failure_at_step: rank {self.rank} fails at step {step}")

    def finish(self, model: nn.Module) -> None:
        """Record node id, device, process-group backend and a parameter checksum per rank
        (``WORK_DIR/workers/rank<r>.json``)."""
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        record = {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(),
                  "hostname": os.uname().nodename, "device": str(self.device), "backend": backend,
                  "param_checksum": checksum}
        folder = self.work_dir / "workers"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{self.rank}.json").write_text(json.dumps(record))


def snapshot_checkpoint(checkpoint: Path, destination: Path) -> Path:
    """A copy of the checkpoint directory made of hard links (a byte copy where links are refused), replacing
    any earlier ``destination``.

    Links suffice: a checkpoint's files are never written in place (``save_checkpoint`` writes a new
    directory and renames it over the old one, ``update_meta`` replaces meta.json), so the snapshot keeps
    the files of this epoch while ``checkpoint`` moves on.
    """
    if destination.exists():
        shutil.rmtree(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(checkpoint, destination, copy_function=link)
    return destination


def setup_worker(loop_config: dict[str, Any]) -> tuple[Config, Path]:
    """A worker's logging and torch threads (its CPUs), then its config and work dir from ``train_loop_config``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    return config_from_dict(loop_config["config"], source="train_loop_config"), Path(loop_config["work_dir"])


def _finetune_worker(loop_config: dict[str, Any]) -> None:
    cfg, work_dir = setup_worker(loop_config)
    fit(cfg, work_dir, init=loop_config["init"], resume=loop_config["resume"], session=RaySession(cfg, work_dir),
        objective=build_objective)


def _pretrain_worker(loop_config: dict[str, Any]) -> None:
    """SP pre-training: ``fit`` with the saliency-prompt objective (prompts, L_ker) instead of fine-tuning's."""
    cfg, work_dir = setup_worker(loop_config)
    fit(cfg, work_dir, init=loop_config["init"], resume=loop_config["resume"], session=RaySession(cfg, work_dir),
        objective=build_sp_objective)


# What a worker runs, by task; every entry is a plain training function run with a session. A task of a
# package above this one passes its own (``sp_ray.densecl.train.ssl_worker`` for "ssl") as ``worker``.
WORKERS = {"finetune": _finetune_worker, "pretrain": _pretrain_worker}


class _InterruptibleTrainer(ray.train.torch.TorchTrainer):
    """A TorchTrainer that remembers a Ctrl-C: Ray's own SIGINT handler aborts the run gracefully and then
    exits through ``sys.exit(0)`` or a dead-controller error, neither of which says that it was an interrupt."""

    interrupted = False

    def _register_sigint_handler(self, controller: Any) -> None:
        super()._register_sigint_handler(controller)
        ray_handler = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:
            self.interrupted = True
            if callable(ray_handler):
                ray_handler(signum, frame)

        signal.signal(signal.SIGINT, on_sigint)


def init_ray() -> None:
    """Connect to the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it) or start a local Ray."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or None, log_to_driver=True)
    log.info("Ray %s: %s", "cluster" if address else "local", ray.cluster_resources())


def check_resources(cfg: Config) -> dict[str, float]:
    """The per-worker resources, checked against the cluster so that an impossible request fails, not hangs."""
    resources = dict(cfg.train.resources_per_worker)
    if cfg.train.use_gpu:
        resources.setdefault("GPU", 1.0)
    resources.setdefault("CPU", 1.0)
    available = ray.cluster_resources()
    for name, amount in resources.items():
        needed = amount * cfg.train.num_workers
        if available.get(name, 0.0) < needed:
            raise UserError(
                f"{cfg.train.num_workers} workers x {name}={amount:g} need {needed:g} {name}, but the Ray cluster "
                f"has {available.get(name, 0.0):g}; lower train.num_workers / train.resources_per_worker"
                + (" or drop --gpu" if name == "GPU" else "")
            )
    return resources


def run_training(
    cfg: Config,
    work_dir: str | Path,
    *,
    init: str | Path | None = None,
    resume: str | Path | None = None,
    run_name: str | None = None,
    task: str = "finetune",
    images: str | Path | None = None,
    metric: str = "segm_AP",
    callbacks: Sequence[Any] = (),
    checked: TrainingPlan | None = None,
    worker: Callable[[dict[str, Any]], None] | None = None,
    model_check: Callable[[Config, str | Path | None], tuple[nn.Module, int]] | None = None,
) -> Path:
    """Run a training task (``WORKERS``) in ``train.num_workers`` Ray Train workers; returns ``work_dir/final``.

    Args:
        cfg: resolved config; ``train.num_workers``, ``train.use_gpu``, ``train.resources_per_worker``,
            ``train.storage_path``, ``train.checkpoints_to_keep`` and ``train.max_failures`` shape the run.
        work_dir: output directory, on storage every node can reach when the cluster has several nodes.
        init: checkpoint directory to initialise from (``finetune --init``).
        resume: checkpoint directory to continue from (``--resume``).
        run_name: the Ray run name (default: the work dir's name and a timestamp).
        task: "finetune" (``fit`` with ``build_objective``), "pretrain" (``fit`` with the SP objective,
            ``build_sp_objective``; a ``pretrain.enabled`` config) or "ssl" (DenseCL on ``images``; run it with
            ``sp_ray.densecl.train.run_ssl``, which passes ``worker`` and ``model_check``).
        images: the unlabeled image folder of the "ssl" task.
        metric: the reported value that ranks the kept checkpoints when every checkpoint is evaluated.
        callbacks: Ray ``RunConfig`` callbacks (a Tune trial passes ``TuneReportCallback``).
        checked: the plan of ``sp_ray.train.preflight.check_training`` when the caller ran it already;
            otherwise it runs here, before Ray starts.
        worker: the training function of each worker (``train_loop_config`` in, a session inside); default
            ``WORKERS[task]``.
        model_check: the task's own checks for ``check_training`` (a task that is not ``fit``'s).

    Returns:
        ``work_dir/final``. A resumed run already at its last epoch (``checked.finished``) returns it
        without starting Ray or writing anything.

    Raises:
        UserError: bad config, data or checkpoint, found on the driver or in a worker (never retried);
            ``EvaluationError`` when the final validation failed (the model is in ``final``).
        RuntimeError: the run failed for another reason (more worker failures than ``train.max_failures``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    if worker is None:
        if task not in WORKERS:
            raise ValueError(f"task {task!r} has no worker here: pass worker= ('ssl': sp_ray.densecl.train.run_ssl)")
        worker = WORKERS[task]
    plan = checked or check_training(cfg, work_dir, task=task, init=init, resume=resume, images=images,
                                     model_check=model_check)
    if plan.finished and plan.final.exists():
        log.info("%s is at epoch %d of %d: the run is complete, nothing to train", resume, plan.start_epoch,
                 plan.epochs)
        return plan.final
    # A finished run without `final` (stopped between writing `last` and `final`) goes on: the workers
    # train no epoch and publish the final model of `last`.
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    cfg = absolute_paths(cfg)  # the workers' directory is not the driver's: the paths the checks read, absolute
    init_ray()
    resources = check_resources(cfg)
    scored = bool(cfg.data.val_annotations) and cfg.train.eval_interval == cfg.train.checkpoint_interval
    storage = cfg.train.storage_path or str(work_dir / "ray")
    trainer = _InterruptibleTrainer(
        worker,
        train_loop_config={
            "config": config_to_dict(cfg), "work_dir": str(work_dir),
            "init": str(Path(init).resolve()) if init else None,
            "resume": str(Path(resume).resolve()) if resume else None,
            "images": str(Path(images).resolve()) if images else None,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources,
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name or f"{work_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute=metric if scored else None,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[StopOnUserError(), *callbacks],
        ),
    )
    try:
        result = trainer.fit()
    except BaseException as err:  # Ray Train raises TrainingFailedError; a user error inside is the message
        if trainer.interrupted:
            raise KeyboardInterrupt(f"training in {work_dir} was interrupted") from None
        if not isinstance(err, Exception):
            raise
        raise_user_error(err)
        raise RuntimeError(f"training failed: {err}") from err
    if trainer.interrupted:
        raise KeyboardInterrupt(f"training in {work_dir} was interrupted")
    if result.error is not None:
        raise_user_error(result.error)
        raise RuntimeError(f"training failed: {result.error}") from result.error
    return work_dir / "final"
