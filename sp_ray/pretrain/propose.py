"""``sp-ray propose``: pseudo masks and their prompts for unlabeled images, from one of three proposers.

This module is the command: it checks the settings, lists the images (``sp_ray.data.listing``), picks the
proposer (`build_proposer`, ``sp_ray.pretrain.proposers``) and the identity of its results (`proposal_identity`),
and hands the shards to Ray Data (``sp_ray.pretrain.shards``: sharding, fingerprints, actors, the merge into
``OUT/annotations.json`` and ``OUT/prompts.npy``).

The proposers:

- saliency (the default, ``sp_ray.pretrain.saliency``): a frozen ResNet's saliency masks, SP's step (A).
- ``from_checkpoint`` (FreeSOLO self-training, ``sp_ray.pretrain.self_training``): a trained model takes the
  place of the frozen backbone: its confident predictions become the pseudo masks, in the same format. The
  checkpoint directory must then be visible to every node.
- ``propose.proposer: clip`` (language-vision prompts, UPLVP, ``sp_ray.pretrain.clip_proposals``): a CLIP model
  from a local weights file draws the pseudo masks from a vocabulary (``clip.mode: produce``) or keeps the
  saliency proposals that it recognises (``clip.mode: rescore``), in the same format; the prompts are then
  CLIP-space vectors of the ``clip.model``'s embedding width. The vocabulary is class-free object words
  (``clip.vocabulary: objects``, one category) or the target dataset's class names (``classes``: every mask
  with its class, the dataset's categories in annotations.json, for class-aware pre-training).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from export.geometry import MAX_IMAGE_PIXELS
from sp_ray.config import Config, ConfigError, ProposeConfig
from sp_ray.data.coco import DatasetSkipWarning
from sp_ray.data.listing import list_images
from sp_ray.pretrain.clip_proposals import ClipProposer, check_clip_setup, clip_identity
from sp_ray.pretrain.proposers import Proposer
from sp_ray.pretrain.saliency import SaliencyProposer, build_frozen_backbone, saliency_identity
from sp_ray.pretrain.self_training import CheckpointProposer, check_selftrain_config, checkpoint_identity
from sp_ray.pretrain.shards import fingerprint, merge_shards, run_shards, shard_done

log = logging.getLogger(__name__)


def build_proposer(cfg: Config, from_checkpoint: str | Path | None, device: torch.device) -> Proposer:
    """The proposer of a run, on ``device``: the trained model of ``from_checkpoint``, the CLIP proposer of
    ``propose.proposer: clip`` (rescoring the saliency proposals in ``clip.mode: rescore``), else the saliency
    proposer of the frozen ResNet. Every actor calls it (through `functools.partial`) to build its own."""
    if from_checkpoint is not None:
        return CheckpointProposer(from_checkpoint, cfg.selftrain, device=device)
    if cfg.propose.proposer == "clip":
        return build_clip_proposer(cfg, device=device)
    return SaliencyProposer.from_config(cfg, device=device)


def build_clip_proposer(cfg: Config, *, device: torch.device) -> ClipProposer:
    """The CLIP proposal source of ``propose.proposer: clip``; in ``clip.mode: rescore`` it rescores the
    saliency proposals of `build_frozen_backbone`'s ResNet (``propose.*``). A random CLIP init is drawn
    from ``train.seed``. Images are checked against the saliency resize (``propose.*``) in both modes."""
    saliency = None
    if cfg.clip.mode == "rescore":
        saliency = SaliencyProposer.from_config(cfg, device=device)
    return ClipProposer(cfg.clip, device=device, seed=cfg.train.seed, saliency=saliency, size_rule=cfg.propose)


def proposal_identity(cfg: Config, from_checkpoint: str | Path | None = None) -> dict[str, Any]:
    """What a shard's result depends on besides its images: the proposal settings and the backbone, or the
    self-training settings and the checkpoint's weights; the CLIP settings with ``propose.proposer: clip``."""
    if from_checkpoint is not None:
        identity = {"selftrain": dataclasses.asdict(cfg.selftrain), **checkpoint_identity(from_checkpoint)}
    else:
        identity = saliency_identity(cfg)
        if cfg.propose.proposer == "clip":
            identity["clip"] = clip_identity(cfg.clip, seed=cfg.train.seed)
    if cfg.data.max_image_pixels != MAX_IMAGE_PIXELS:  # shards of the default keep their fingerprints
        identity["max_image_pixels"] = cfg.data.max_image_pixels
    return identity


def check_propose_config(cfg: ProposeConfig) -> None:
    """Raise ConfigError naming the ``propose.*`` key of an out-of-range setting."""
    problems = []
    if cfg.proposer not in ("saliency", "clip"):
        problems.append(f"propose.proposer must be 'saliency' or 'clip', got {cfg.proposer!r}")
    if not cfg.scales or any(scale <= 0 for scale in cfg.scales):
        problems.append(f"propose.scales must be a non-empty list of factors > 0, got {cfg.scales}")
    if not 0 < cfg.mask_threshold < 1:
        problems.append(f"propose.mask_threshold must be in (0, 1), got {cfg.mask_threshold}")
    for key in ("min_area", "top_k", "batch_size", "shard_size", "max_size", "short_size"):
        if getattr(cfg, key) < 1:
            problems.append(f"propose.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.nms_sigma <= 0:
        problems.append(f"propose.nms_sigma must be > 0, got {cfg.nms_sigma}")
    if cfg.num_actors < 0:
        problems.append(f"propose.num_actors must be >= 0 (0 = one per GPU), got {cfg.num_actors}")
    if cfg.cpus_per_actor <= 0:
        problems.append(f"propose.cpus_per_actor must be > 0, got {cfg.cpus_per_actor}")
    if problems:
        raise ConfigError("; ".join(problems))


def propose(
    images: str | Path,
    out: str | Path,
    cfg: Config,
    *,
    image_root: str | Path | None = None,
    from_checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Write saliency pseudo masks and their prompts for unlabeled images (METHODS.md 1.1).

    With ``from_checkpoint``, the pseudo masks are a trained model's confident predictions instead
    (FreeSOLO self-training, ``sp_ray.pretrain.self_training``, settings ``selftrain.*``). With
    ``propose.proposer: clip`` a CLIP model makes or rescores them (UPLVP, settings ``clip.*``, see
    ``sp_ray.pretrain.clip_proposals``).

    Runs as Ray Data ``map_batches`` over shards with a pool of `sp_ray.pretrain.shards.ShardActor`
    (``propose.num_actors``; one GPU per actor where the cluster has GPUs, else ``propose.cpus_per_actor`` CPUs
    each), every actor with its own proposer of `build_proposer`. When Ray
    is not initialised, ``ray.init()`` connects to ``RAY_ADDRESS`` or a cluster started with ``ray start``
    on this machine, else starts a local instance (left running for later calls). Skipped images
    (missing, undecodable or above ``data.max_image_pixels``, the rule of every reader; a size that
    differs from the json) are counted in the summary and listed in one `DatasetSkipWarning`; an
    image without proposals is kept in annotations.json with no annotation.

    Args:
        images: an image folder or a COCO json (only its ``images`` are used), see
            `sp_ray.data.listing.list_images`.
        out: output folder: ``shards/`` (part files, reused by a rerun), ``annotations.json``,
            ``prompts.npy``.
        cfg: the config; ``propose`` and ``model.depth`` / ``model.backbone_weights`` are used, or
            ``selftrain`` and ``propose``'s batching and sharding with ``from_checkpoint``; ``clip`` too with
            ``propose.proposer: clip``.
        image_root: folder of the json's file names (default the json's folder).
        from_checkpoint: a fine-tuning or pre-training checkpoint directory of a query-based model.

    Returns:
        Summary: images_listed, images (in annotations.json), annotations, images_without_proposals,
        failed (count), failed_reasons (reason -> count), failed_examples (reason -> up to 3 file
        names), shards, shards_computed, shards_reused, seconds (of the Ray stage, actor start-up
        included) and images_per_s over it (None when every shard was reused), annotations_path,
        prompts_path.

    Raises:
        ConfigError: an out-of-range ``propose``, ``selftrain`` or ``clip`` setting, or proposer clip
            together with ``from_checkpoint``.
        FileNotFoundError / ValueError: no images, a backbone weights file that fits no layout, or a
            checkpoint that is not a query-based model's.
    """
    check_propose_config(cfg.propose)
    if cfg.data.max_image_pixels < 1:
        raise ConfigError(f"data.max_image_pixels must be >= 1, got {cfg.data.max_image_pixels}")
    clip = cfg.propose.proposer == "clip"
    saliency_used = from_checkpoint is None and (not clip or cfg.clip.mode == "rescore")
    if clip and from_checkpoint is not None:
        raise ConfigError("propose.proposer=clip and --from-checkpoint both choose the pseudo masks: use one of them")
    if clip:
        # Settings, model config and weights file are checked here; the weights are read in the actors only,
        # since a CLIP ViT-L is 1.7 GB, more than a head node should load for a check.
        check_clip_setup(cfg.clip)
    items = list_images(images, image_root)
    if from_checkpoint is not None:
        check_selftrain_config(cfg.selftrain)
        # Fail here, not in every actor, on a checkpoint that does not load.
        CheckpointProposer(from_checkpoint, cfg.selftrain, device=torch.device("cpu"))
    elif saliency_used:
        build_frozen_backbone(cfg)  # fail here, not in every actor, on a weights file that does not load
    if clip and cfg.clip.weights is None:
        log.warning(
            "propose: clip.weights is null (clip.allow_random), so the masks come from a RANDOM-INIT CLIP: fine for "
            "tests, meaningless otherwise; set clip.weights to a local open_clip weights file of clip.model"
        )
    if saliency_used and cfg.model.backbone_weights is None:
        log.warning(
            "propose: model.backbone_weights is null, so the masks come from a random-init ResNet (fine for "
            "tests, meaningless otherwise); set it to a local DenseCL / MoCo-v2 / torchvision ResNet file"
        )
    out = Path(out)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    size = cfg.propose.shard_size
    shards = [items[start : start + size] for start in range(0, len(items), size)]
    run = proposal_identity(cfg, from_checkpoint)
    fingerprints = [fingerprint(run, shard) for shard in shards]
    pending = [index for index in range(len(shards)) if not shard_done(shard_dir, index, fingerprints[index])]
    log.info(
        "propose: %d images in %d shards, %d done before, %d to compute",
        len(items),
        len(shards),
        len(shards) - len(pending),
        len(pending),
    )
    computed_images, seconds = 0, 0.0
    if pending:
        start = time.perf_counter()
        checkpoint = None if from_checkpoint is None else str(Path(from_checkpoint).resolve())
        computed_images = run_shards(
            [(index, shards[index], fingerprints[index]) for index in pending],
            shard_dir,
            functools.partial(build_proposer, cfg, checkpoint),
            cfg.propose,
            max_image_pixels=cfg.data.max_image_pixels,
        )
        seconds = time.perf_counter() - start
        log.info(
            "propose: %d images in %.1f s, %.2f images/s", computed_images, seconds, computed_images / seconds
        )
    summary = merge_shards(out, fingerprints)
    if summary["failed"]:
        details = "; ".join(
            f"{reason}: {count}, e.g. {', '.join(summary['failed_examples'][reason])}"
            for reason, count in summary["failed_reasons"].items()
        )
        warnings.warn(
            f"propose: skipped {summary['failed']} of {len(items)} images ({details})",
            DatasetSkipWarning,
            stacklevel=2,
        )
    summary.update(
        images_listed=len(items),
        shards=len(shards),
        shards_computed=len(pending),
        shards_reused=len(shards) - len(pending),
        seconds=round(seconds, 3),
        images_per_s=round(computed_images / seconds, 3) if pending else None,
    )
    return summary


