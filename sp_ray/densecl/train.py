"""DenseCL pre-training loop (``sp-ray ssl``): plain PyTorch on the session interface of ``fit``.

``train_densecl`` talks to a session (``sp_ray.train.session``) as ``sp_ray.train.loop.fit`` does: rank and
world size come from it, the model is wrapped by it (DDP over the workers), every epoch's metrics and
rank 0's checkpoint are reported to it, and a checkpoint it restores (Ray Train after a worker failure)
is where the run continues. With several workers the data are sharded, keys are gathered into the
queues and rank 0 alone writes files. Without a session it is an ordinary single-process loop, or one
process of a torch.distributed group that its launcher initialised (torchrun).

``run_ssl`` runs it in Ray Train workers (``ssl_worker``, a ``RaySession`` each), after the driver's checks
(``check_ssl``), like fine-tuning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from sp_ray.checkpoint import copy_as_final, load_checkpoint, save_checkpoint
from sp_ray.config import Config, SSLConfig
from sp_ray.densecl.data import UnlabeledImageFolder, build_two_view_transform
from sp_ray.densecl.model import DenseCL, export_backbone_weights
from sp_ray.device import select_device
from sp_ray.errors import NonFiniteLossError, UserError
from sp_ray.train.loop import keep_metrics_through, seed_everything
from sp_ray.train.session import LocalSession, current_session
from sp_ray.train.tracking import open_tracker

if TYPE_CHECKING:
    from sp_ray.train.preflight import TrainingPlan

log = logging.getLogger("sp_ray")

BACKBONE_FILE = "backbone.pth"


def build_densecl(cfg: Config) -> DenseCL:
    """The DenseCL model of ``cfg``: ResNet from ``model.depth`` / ``backbone_weights``, heads: ``ssl``."""
    s = cfg.ssl
    return DenseCL(
        depth=cfg.model.depth, init_weights=cfg.model.backbone_weights, hidden_dim=s.hidden_dim,
        proj_dim=s.proj_dim, queue_size=s.queue_size, momentum=s.momentum, temperature=s.temperature,
        loss_lambda=s.loss_lambda,
    )


def check_batch_fits_queue(cfg: SSLConfig, world_size: int) -> None:
    """Raise a UserError unless ``queue_size`` is a multiple of the global batch (batch_size x workers)."""
    global_batch = cfg.batch_size * world_size
    if cfg.batch_size < 1 or cfg.queue_size % global_batch != 0:
        raise UserError(
            f"ssl.queue_size ({cfg.queue_size}) must be a multiple of the global batch "
            f"ssl.batch_size x workers = {cfg.batch_size} x {world_size} = {global_batch}; "
            "change ssl.queue_size, ssl.batch_size or the number of workers"
        )


def build_ssl_loader(cfg: Config, images: str | Path, *, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Batches of view pairs, uint8 [B, 2, 3, S, S], from the images under ``images``.

    Every worker gets its own shard and exactly ``ssl.batch_size`` images per batch (the last partial
    batch is dropped), as the key gathering needs equal batches.
    """
    dataset = UnlabeledImageFolder(images, transform=build_two_view_transform(cfg.ssl))
    global_batch = cfg.ssl.batch_size * world_size
    if len(dataset) < global_batch:
        raise UserError(
            f"{images} holds {len(dataset)} images, fewer than one global batch "
            f"(ssl.batch_size x workers = {global_batch}); lower ssl.batch_size or add images"
        )
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed, drop_last=True
        )
    return DataLoader(
        dataset, batch_size=cfg.ssl.batch_size, shuffle=sampler is None, sampler=sampler,
        num_workers=cfg.data.num_workers, drop_last=True, pin_memory=cfg.train.use_gpu,
    )


def scaled_ssl_lr(cfg: SSLConfig, world_size: int) -> float:
    """Linear scaling rule: ``ssl.lr x global batch / ssl.base_batch_size``."""
    if cfg.base_batch_size < 1:
        raise UserError(f"ssl.base_batch_size must be positive, got {cfg.base_batch_size}")
    return cfg.lr * cfg.batch_size * world_size / cfg.base_batch_size


def build_ssl_optimizer(model: nn.Module, cfg: SSLConfig, *, lr: float) -> torch.optim.SGD:
    """SGD with momentum and weight decay over the query encoder (the key encoder has no gradient)."""
    model = model.module if hasattr(model, "module") else model
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)


def build_ssl_scheduler(
    optimizer: torch.optim.Optimizer, *, total_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration cosine decay from the base rate to 0 at ``total_iters`` (no warmup, like DenseCL)."""
    total = max(1, total_iters)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: 0.5 * (1.0 + math.cos(math.pi * min(it, total) / total))
    )


def ssl_train_step(
    model: nn.Module,
    views: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    amp: bool = False,
) -> dict[str, float]:
    """One DenseCL step: both losses, their sum, backward, SGD step, schedule step.

    Args:
        model: a ``DenseCL`` or a DDP wrapper of one.
        views: uint8 [B, 2, 3, S, S] on the model's device (query view, key view).
        amp: bf16 autocast for the encoders (CUDA only; losses are computed in float32).

    Returns:
        The float value of ``loss_global``, ``loss_dense`` and their sum ``loss``.

    Raises:
        NonFiniteLossError: the loss is not finite (the step is not applied); a FloatingPointError.
    """
    model.train()
    use_amp = amp and views.device.type == "cuda"
    with torch.autocast(device_type=views.device.type, dtype=torch.bfloat16, enabled=use_amp):
        losses = model(views[:, 0], views[:, 1])
    total = losses["loss_global"] + losses["loss_dense"]
    values = {name: value.detach().item() for name, value in losses.items()}
    values["loss"] = total.detach().item()
    if not math.isfinite(values["loss"]):
        raise NonFiniteLossError(f"DenseCL loss is not finite: {values}; lower ssl.lr or check the images")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    scheduler.step()
    return values


def _write_backbone(model: nn.Module, path: Path) -> None:
    # Written beside its destination and renamed, like checkpoints: never a half-written file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(export_backbone_weights(model), tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def train_densecl(
    cfg: Config,
    images: str | Path,
    work_dir: str | Path,
    *,
    resume: str | Path | None = None,
    session: LocalSession | None = None,
) -> Path:
    """DenseCL pre-training on the images under ``images``.

    Writes ``work_dir/last`` every ``train.checkpoint_interval`` epochs and in the last one (model with
    queues and key encoder, optimizer, scheduler, epoch, step), ``work_dir/metrics.jsonl`` (one line per
    epoch, each epoch once) and at the end ``work_dir/final`` (a checkpoint) with ``final/backbone.pth``:
    the query ResNet in torchvision layout, for ``model.backbone_weights`` of ``propose`` / ``pretrain`` /
    ``finetune``. Logs loss, learning rate and images/s (all workers) per epoch. Every epoch's metrics go
    to ``session.report`` on every rank, with ``last`` on rank 0 when it was written.

    Args:
        cfg: resolved config (sections ``model``, ``ssl``, ``train``, ``data.num_workers``).
        images: folder of unlabeled images (searched recursively).
        work_dir: output directory.
        resume: a checkpoint directory (``work_dir/last``) to continue from, queues included. A
            checkpoint restored by the session (after a worker failure) takes precedence.
        session: rank, world size, DDP and reporting (``sp_ray.train.session``); default
            ``current_session``: a ``LocalSession``, or the torch.distributed group a launcher initialised.

    Returns:
        The final checkpoint directory ``work_dir/final``.
    """
    work_dir = Path(work_dir)
    device = select_device(cfg.train.use_gpu)
    session = session or current_session(device)
    rank, world_size = session.rank, session.world_size
    check_batch_fits_queue(cfg.ssl, world_size)
    if rank == 0:
        work_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    model = build_densecl(cfg).to(device)
    loader = build_ssl_loader(cfg, images, rank=rank, world_size=world_size)
    lr = scaled_ssl_lr(cfg.ssl, world_size)
    optimizer = build_ssl_optimizer(model, cfg.ssl, lr=lr)
    scheduler = build_ssl_scheduler(optimizer, total_iters=cfg.ssl.epochs * len(loader))
    start_epoch, step = 0, 0
    final = work_dir / "final"
    with session.restored_checkpoint() as restored:
        source = restored or resume
        if source is not None:
            ckpt = load_checkpoint(source, with_training_state=True)
            try:
                model.load_state_dict(ckpt.model_state)
            except RuntimeError as err:
                raise UserError(
                    f"{source} does not fit this DenseCL model (model.depth, ssl.queue_size, ssl.proj_dim and "
                    f"ssl.hidden_dim must match the run that wrote it): {err}"
                ) from err
            optimizer.load_state_dict(ckpt.training_state["optimizer"])
            scheduler.load_state_dict(ckpt.training_state["scheduler"])
            start_epoch, step = ckpt.training_state["epoch"], ckpt.training_state["step"]
            log.info("resumed from %s at epoch %d, step %d", source, start_epoch, step)
        if start_epoch > cfg.ssl.epochs:
            raise UserError(f"ssl.epochs={cfg.ssl.epochs} is below the epoch of {source} ({start_epoch})")
        if rank == 0:
            # Epochs after the resumed one are trained again: their old rows go, so each epoch is logged once.
            keep_metrics_through(work_dir / "metrics.jsonl", start_epoch)
            if source is not None and start_epoch == cfg.ssl.epochs and not final.exists():
                copy_as_final(source, final)  # stopped between writing `last` and `final`
                _write_backbone(model, final / BACKBONE_FILE)
    # Buffers are synced once at construction, not at every forward: the queues receive the same
    # gathered keys on every worker, and broadcasting them would move 2 x queue_size x proj_dim
    # floats per step. BatchNorm statistics stay per worker, as in the official DenseCL runs.
    train_model = session.wrap_model(model, sync_buffers=False,
                                     find_unused_parameters=cfg.train.find_unused_parameters)
    log.info("DenseCL: %d images, %d workers x %d images per batch, %d iterations per epoch, lr %.4g",
             len(loader.dataset), world_size, cfg.ssl.batch_size, len(loader), lr)

    metrics: dict[str, Any] = {}
    with open_tracker(cfg, work_dir, rank=rank, start_step=step, continued=source is not None) as tracker:
        for epoch in range(start_epoch, cfg.ssl.epochs):
            # Augmentations are a function of (seed, epoch, rank), so a resumed run repeats the views
            # the uninterrupted one would have drawn, and workers do not share crops.
            seed_everything((cfg.train.seed * 1000 + epoch) * 1000 + rank)
            if isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(epoch)
            sums = {"loss": 0.0, "loss_global": 0.0, "loss_dense": 0.0}
            start = time.perf_counter()
            for it, views in enumerate(loader):
                values = ssl_train_step(
                    train_model, views.to(device, non_blocking=True), optimizer, scheduler, amp=cfg.train.amp
                )
                for name in sums:
                    sums[name] += values[name]
                step += 1
                tracker.log_step(step, values, optimizer.param_groups[0]["lr"])
                session.on_step(step)
                if rank == 0 and cfg.train.log_interval and (it + 1) % cfg.train.log_interval == 0:
                    log.info("ssl epoch %d/%d iter %d/%d loss %.4f (global %.4f, dense %.4f) lr %.3e",
                             epoch + 1, cfg.ssl.epochs, it + 1, len(loader), values["loss"],
                             values["loss_global"], values["loss_dense"], optimizer.param_groups[0]["lr"])
            seconds = time.perf_counter() - start
            images_seen = len(loader) * cfg.ssl.batch_size * world_size
            metrics = {"epoch": epoch + 1, "step": step, **{k: v / max(1, len(loader)) for k, v in sums.items()},
                       "images_per_second": images_seen / max(seconds, 1e-9),
                       "lr": optimizer.param_groups[0]["lr"]}
            checkpoint = None
            if rank == 0:
                log.info("ssl epoch %d/%d done: loss %.4f (global %.4f, dense %.4f), %.1f images/s",
                         epoch + 1, cfg.ssl.epochs, metrics["loss"], metrics["loss_global"], metrics["loss_dense"],
                         metrics["images_per_second"])
                with open(work_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                tracker.log_epoch(metrics)
                last = epoch + 1 == cfg.ssl.epochs
                if last or (cfg.train.checkpoint_interval and (epoch + 1) % cfg.train.checkpoint_interval == 0):
                    checkpoint = save_checkpoint(
                        work_dir / "last", model=model, config=cfg, meta={"kind": "densecl", **metrics},
                        training_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                        "epoch": epoch + 1, "step": step},
                    )
            session.report(metrics, checkpoint)

        if rank == 0 and start_epoch < cfg.ssl.epochs:
            save_checkpoint(final, model=model, config=cfg, meta={"kind": "densecl", **metrics})
            _write_backbone(model, final / BACKBONE_FILE)
            log.info("DenseCL backbone written to %s (use it as model.backbone_weights)", final / BACKBONE_FILE)
        if rank == 0 and final.is_dir():
            tracker.log_final(final)
    session.finish(model)
    if world_size > 1:
        dist.barrier()
    return final


# ---------------------------------------------------------------- in Ray Train workers: `sp-ray ssl`


def check_ssl(cfg: Config, images: str | Path | None) -> tuple[nn.Module, int]:
    """The driver's checks of ``sp-ray ssl`` (``sp_ray.train.preflight.check_training``'s ``model_check``):
    the image folder holds a global batch, the queue fits it, the model builds; returns (model, ssl.epochs).

    Raises:
        UserError: the first problem found, naming what to fix.
    """
    from sp_ray.data.images import list_image_files
    from sp_ray.train.preflight import check_image_folder

    if images is None:
        raise UserError("sp-ray ssl needs --images DIR, the folder of unlabeled images")
    folder = check_image_folder(images, what="--images")
    try:
        check_batch_fits_queue(cfg.ssl, cfg.train.num_workers)
    except ValueError as err:
        raise UserError(str(err)) from None
    count = len(list_image_files(folder))
    global_batch = cfg.ssl.batch_size * cfg.train.num_workers
    if count < global_batch:
        raise UserError(
            f"--images {folder} holds {count} images, fewer than one global batch "
            f"(ssl.batch_size x workers = {global_batch}); lower ssl.batch_size or add images"
        )
    try:
        model = build_densecl(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(f"the DenseCL model of this config cannot be built: {err}") from None
    return model, cfg.ssl.epochs


def ssl_worker(loop_config: dict[str, Any]) -> None:
    """The training function of a Ray Train worker of ``sp-ray ssl``: `train_densecl` with a ``RaySession``."""
    from sp_ray.train.ray_train import RaySession, setup_worker

    cfg, work_dir = setup_worker(loop_config)
    train_densecl(cfg, loop_config["images"], work_dir, resume=loop_config["resume"],
                  session=RaySession(cfg, work_dir))


def run_ssl(
    cfg: Config,
    work_dir: str | Path,
    images: str | Path,
    *,
    resume: str | Path | None = None,
    run_name: str | None = None,
    checked: TrainingPlan | None = None,
) -> Path:
    """``sp-ray ssl``: DenseCL in ``train.num_workers`` Ray Train workers (``sp_ray.train.ray_train.run_training``
    with `ssl_worker` and `check_ssl`), checkpoints reported to Ray and the run continued from the last one
    after a worker failure (``train.max_failures``). ``checked``: the plan of ``check_training`` when the caller
    ran it already. Returns ``work_dir/final``."""
    from sp_ray.train.ray_train import run_training

    return run_training(cfg, work_dir, resume=resume, run_name=run_name, task="ssl", images=images,
                        worker=ssl_worker, model_check=check_ssl, checked=checked)
