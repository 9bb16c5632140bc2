"""``sp-ray propose``: saliency pseudo masks for unlabeled images, as Ray Data ``map_batches`` over shards.

The images are cut into shards of ``propose.shard_size``. Each shard is one row of a Ray Dataset; a
pool of actors (one GPU each where the cluster has GPUs) holds the frozen ResNet, runs
`saliency_proposals` on every image and writes the shard's part files ``OUT/shards/NNNNN.json`` (images,
annotations, failures) and ``NNNNN.npy`` (the query vector of each annotation). A shard whose part
files exist with the same fingerprint (config, backbone weights, image list) is not recomputed, so a
rerun after an interruption continues where it stopped. The parts are then merged into
``OUT/annotations.json`` (COCO, one category "object", RLE masks, a ``score`` per annotation) and
``OUT/prompts.npy`` (float32 [n, C], row i the prompt of annotation id i + 1). The actors write the parts
themselves, so on a cluster of several nodes OUT must be storage that every node sees (e.g. NFS).

With ``from_checkpoint`` (FreeSOLO self-training, ``sp_ray.pretrain.self_training``) a trained model takes the
place of the frozen backbone: its confident predictions become the pseudo masks, in the same format. The
checkpoint directory must then be visible to every node too.

With ``propose.proposer: clip`` (language-vision prompts, UPLVP, ``sp_ray.pretrain.clip_proposals``) a CLIP
model from a local weights file draws the pseudo masks from class-free object words (``clip.mode: produce``) or
keeps the saliency proposals that it recognises as objects (``clip.mode: rescore``), in the same format; the
prompts are then CLIP-space vectors of the ``clip.model``'s embedding width.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor, nn

from export.geometry import MAX_IMAGE_PIXELS
from sp_ray.config import Config, ConfigError, ProposeConfig
from sp_ray.data.coco import SIZE_MISMATCH, DatasetSkipWarning
from sp_ray.data.images import UNREADABLE, UnusableImageError, list_image_files, load_image_rgb
from sp_ray.data.transforms import resize_for_inference
from sp_ray.models.backbone import build_resnet
from sp_ray.models.common import IMAGENET_MEAN, IMAGENET_STD, SIZE_DIVISOR
from sp_ray.pretrain.clip_proposals import ClipProposer, check_clip_setup, clip_identity
from sp_ray.pretrain.saliency import Proposals, saliency_proposals
from sp_ray.pretrain.self_training import CheckpointProposer, check_selftrain_config, checkpoint_identity

log = logging.getLogger(__name__)

UNDECODABLE = UNREADABLE  # the reason every image reader counts (sp_ray.data.images); TOO_LARGE too
TOO_ELONGATED = "too elongated for the keep-ratio resize"
CATEGORY = {"id": 1, "name": "object"}
_MAX_EXAMPLES = 3


@dataclass
class ShardResult:
    """The proposals of one shard, before annotation ids are assigned.

    Attributes:
        images: COCO image entries (id, file_name, height, width) of the decoded images, in input order;
            an image without proposals is listed with no annotation.
        annotations: COCO annotations without ``id``, grouped by image in ``images`` order, best first.
        prompts: float32 [n, C], row i the query vector S_l of ``annotations[i]``.
        failed: {"file_name", "reason", "detail"} of each image that was skipped.
    """

    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    prompts: np.ndarray
    failed: list[dict[str, str]]


def list_images(images: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """The images to propose on: a folder (searched recursively) or the ``images`` of a COCO json.

    Args:
        images: a folder of image files (as ``sp_ray.data.images.list_image_files`` finds them), or a
            COCO json whose ``images`` entries (id, file_name, optionally height and width) are used and
            whose annotations, if any, are ignored.
        image_root: folder the json's file names are relative to; default the json's folder. Not used
            for a folder input.

    Returns:
        [{"id", "file_name", "path", "height", "width"}], in folder order (sorted relative paths, ids
        1..n) or json order (the json's ids); height/width are the json's values or None.

    Raises:
        FileNotFoundError: ``images`` does not exist.
        ValueError: no images found, or the json is not a COCO-style image list.
    """
    source = Path(images)
    if source.is_dir():
        files = sorted(path.relative_to(source).as_posix() for path in list_image_files(source))
        return [
            {"id": index + 1, "file_name": name, "path": str(source / name), "height": None, "width": None}
            for index, name in enumerate(files)
        ]
    if not source.is_file():
        raise FileNotFoundError(f"--images {source} does not exist; pass an image folder or a COCO json")
    root = Path(image_root) if image_root is not None else source.parent
    return _read_image_list(source, root)


def _read_image_list(path: Path, root: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is neither an image folder nor a valid JSON file ({err})") from err
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a COCO json with a non-empty 'images' list")
    items, seen = [], set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or "id" not in entry:
            raise ValueError(f"{path}: images[{index}] needs an 'id' and a string 'file_name'")
        if not isinstance(entry["id"], int) or isinstance(entry["id"], bool) or entry["id"] in seen:
            raise ValueError(f"{path}: images[{index}].id = {entry['id']!r} is not a unique integer")
        seen.add(entry["id"])
        height, width = entry.get("height"), entry.get("width")
        sizes = (height, width)
        if any(size is not None for size in sizes) and not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(
                f"{path}: images[{index}] has height={height!r}, width={width!r}; expected positive ints"
            )
        file_name = entry["file_name"]
        items.append(
            {
                "id": entry["id"],
                "file_name": file_name,
                "path": str(root / file_name),
                "height": height,
                "width": width,
            }
        )
    return items


def input_size(height: int, width: int, cfg: ProposeConfig) -> tuple[int, int]:
    """(H, W) of the backbone input for an image of height x width.

    keep_ratio false: (short_size, max_size), SP's fixed 1333x800 resize. keep_ratio true: the keep-ratio
    resize of `resize_for_inference`. Each side is then rounded to the nearest multiple of 32 (at least
    32) so that the C5 grid covers the input exactly.
    """
    if cfg.keep_ratio:
        height, width = resize_for_inference(height, width, max_size=cfg.max_size, short_size=cfg.short_size)
    else:
        height, width = cfg.short_size, cfg.max_size
    return (
        max(SIZE_DIVISOR, round(height / SIZE_DIVISOR) * SIZE_DIVISOR),
        max(SIZE_DIVISOR, round(width / SIZE_DIVISOR) * SIZE_DIVISOR),
    )


def prepare_image(pixels: np.ndarray, size: tuple[int, int], device: torch.device) -> Tensor:
    """Resize (bilinear, antialiased) and normalise with the ImageNet mean/std of 0..255 input, as K-Net.

    Args:
        pixels: uint8 [H0, W0, 3] RGB.
        size: (H, W) of the backbone input.
        device: where the result lives.

    Returns:
        float [3, H, W].
    """
    image = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(2, 0, 1).float()  # (3, H0, W0)
    image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0].clamp(0, 255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return (image - mean) / std


def build_frozen_backbone(cfg: Config) -> nn.Module:
    """The proposal backbone: ResNet ``model.depth`` with ``model.backbone_weights``, all stages frozen.

    A random init (no weights file; meant for tests) is drawn from ``train.seed``, so every actor and
    every rerun holds the same network and a recomputed shard equals the first computation.
    """
    if cfg.model.backbone_weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            return build_resnet(cfg.model.depth, weights=None, frozen_stages=4, norm_eval=True).eval()
    backbone = build_resnet(
        cfg.model.depth, weights=cfg.model.backbone_weights, frozen_stages=4, norm_eval=True
    )
    return backbone.eval()


def build_clip_proposer(cfg: Config, *, device: torch.device) -> ClipProposer:
    """The CLIP proposal source of ``propose.proposer: clip``; in ``clip.mode: rescore`` it rescores the
    saliency proposals of `build_frozen_backbone`'s ResNet (``propose.*``). A random CLIP init is drawn
    from ``train.seed``."""
    saliency = None
    if cfg.clip.mode == "rescore":
        backbone = build_frozen_backbone(cfg).to(device)
        saliency = functools.partial(_propose_batch, backbone=backbone, cfg=cfg.propose, device=device)
    return ClipProposer(cfg.clip, device=device, seed=cfg.train.seed, saliency=saliency)


def propose_images(
    items: list[dict[str, Any]],
    backbone: nn.Module,
    cfg: ProposeConfig,
    *,
    device: torch.device,
    propose_batch: Callable[[list[tuple[dict[str, Any], np.ndarray]]], list[Proposals]] | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> ShardResult:
    """Saliency proposals of a list of images: decode, resize, C5 of the frozen backbone, Free Mask.

    Images are decoded in a thread pool one batch ahead of the backbone; a batch is forwarded in groups
    of equal input size (one group when keep_ratio is false). Masks are at the original image size.

    Args:
        items: entries of `list_images` (id, file_name, path, height, width).
        backbone: a module whose forward returns a list whose last element is C5 [B, C, h, w].
        cfg: the ``propose`` config section.
        device: where the backbone lives.
        propose_batch: replaces the saliency proposals of a batch of decoded (item, pixels) pairs, e.g. a
            ``CheckpointProposer``; ``backbone`` then only gives the prompt width.
        max_image_pixels: larger images are skipped (``data.max_image_pixels``).

    Returns:
        The shard's images, annotations (category 1, RLE, bbox of the mask, area, iscrowd 0, score),
        prompts and failures (missing or undecodable files and images above the pixel limit, by the
        rule of every reader, `sp_ray.data.images.UnusableImageError`; json height/width that differ
        from the file; images too elongated for the keep-ratio resize).
    """
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    prompts: list[np.ndarray] = []
    failed: list[dict[str, str]] = []
    batches = [items[start : start + cfg.batch_size] for start in range(0, len(items), cfg.batch_size)]
    workers = max(1, int(cfg.cpus_per_actor))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(_decode, item, cfg, max_image_pixels) for item in batches[0]] if batches else []
        for index in range(len(batches)):
            decoded = [future.result() for future in pending]
            following = batches[index + 1] if index + 1 < len(batches) else []
            pending = [pool.submit(_decode, item, cfg, max_image_pixels) for item in following]
            ready = []
            for item, pixels, problem in decoded:
                if problem is None:
                    ready.append((item, pixels))
                else:
                    failed.append(
                        {"file_name": item["file_name"], "reason": problem[0], "detail": problem[1]}
                    )
            found = propose_batch(ready) if propose_batch else _propose_batch(ready, backbone, cfg, device)
            for (item, pixels), proposals in zip(ready, found, strict=True):
                height, width = pixels.shape[:2]
                images.append(
                    {"id": item["id"], "file_name": item["file_name"], "height": height, "width": width}
                )
                annotations.extend(_coco_annotations(item["id"], proposals))
                prompts.append(proposals.queries.cpu().numpy().astype(np.float32))
    channels = _c5_channels(backbone)
    stacked = np.concatenate(prompts) if prompts else np.zeros((0, channels), dtype=np.float32)
    return ShardResult(images=images, annotations=annotations, prompts=stacked, failed=failed)


def _decode(
    item: dict[str, Any], cfg: ProposeConfig, max_image_pixels: int
) -> tuple[dict[str, Any], np.ndarray | None, tuple[str, str] | None]:
    try:
        pixels = load_image_rgb(item["path"], max_pixels=max_image_pixels)
    except UnusableImageError as err:
        return item, None, (err.reason, str(err))
    expected = (item.get("height"), item.get("width"))
    found = f"{pixels.shape[0]}x{pixels.shape[1]}"
    if expected[0] is not None and expected != pixels.shape[:2]:
        detail = f"{item['path']} is {found} (HxW), the json says {expected[0]}x{expected[1]}"
        return item, None, (SIZE_MISMATCH, detail)
    try:
        input_size(pixels.shape[0], pixels.shape[1], cfg)
    except ValueError as err:
        return item, None, (TOO_ELONGATED, f"{item['path']} ({found}): {err}")
    return item, pixels, None


def _propose_batch(
    ready: list[tuple[dict[str, Any], np.ndarray]],
    backbone: nn.Module,
    cfg: ProposeConfig,
    device: torch.device,
) -> list[Proposals]:
    groups: dict[tuple[int, int], list[int]] = {}
    for position, (_, pixels) in enumerate(ready):
        groups.setdefault(input_size(pixels.shape[0], pixels.shape[1], cfg), []).append(position)
    results: list[Proposals | None] = [None] * len(ready)
    for size, positions in groups.items():
        batch = torch.stack([prepare_image(ready[p][1], size, device) for p in positions])  # (B, 3, H, W)
        with torch.inference_mode():
            c5 = backbone(batch)[-1]  # (B, C, H/32, W/32)
            for row, position in enumerate(positions):
                pixels = ready[position][1]
                results[position] = saliency_proposals(
                    c5[row],
                    (pixels.shape[0], pixels.shape[1]),
                    scales=cfg.scales,
                    mask_threshold=cfg.mask_threshold,
                    min_area=cfg.min_area,
                    sigma=cfg.nms_sigma,
                    top_k=cfg.top_k,
                    min_center_y=cfg.min_center_y,
                    max_box_width=cfg.max_box_width,
                    min_maskness=cfg.min_maskness,
                )
    return [result for result in results if result is not None]


def _coco_annotations(image_id: int, proposals: Proposals) -> list[dict[str, Any]]:
    if proposals.masks.shape[0] == 0:
        return []
    masks = proposals.masks.cpu().numpy()  # (L, H, W)
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    areas = mask_utils.area(rles)
    boxes = mask_utils.toBbox(rles)  # (L, 4) xywh, the tight box of each mask
    return [
        {
            "image_id": image_id,
            "category_id": CATEGORY["id"],
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(area),
            "bbox": [float(v) for v in box],
            "iscrowd": 0,
            "score": float(score),
        }
        for rle, area, box, score in zip(rles, areas, boxes, proposals.scores.tolist(), strict=True)
    ]


def _c5_channels(backbone: nn.Module) -> int:
    channels = getattr(backbone, "out_channels", None)
    if not channels:
        raise ValueError("the proposal backbone must expose out_channels (the channels of C2..C5)")
    return int(channels[-1])


class _ShardActor:
    """Ray Data callable class: holds the frozen backbone (or the trained model of ``from_checkpoint``),
    proposes on whole shards and writes their parts."""

    def __init__(self, cfg: Config, shard_dir: str, use_gpu: bool, from_checkpoint: str | None = None) -> None:
        # With use_gpu the actor reserved one GPU, and Ray made it the only visible one.
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.cfg = cfg.propose
        self.propose_batch = None
        if from_checkpoint is None and cfg.propose.proposer == "clip":
            self.propose_batch = build_clip_proposer(cfg, device=self.device)
            self.backbone = self.propose_batch.backbone
        elif from_checkpoint is None:
            self.backbone = build_frozen_backbone(cfg).to(self.device)
        else:
            self.propose_batch = CheckpointProposer(from_checkpoint, cfg.selftrain, device=self.device)
            self.backbone = self.propose_batch.backbone
            # Decoding checks the image against the resize that the model's evaluation applies.
            data = self.propose_batch.model_config.data
            self.cfg = dataclasses.replace(
                self.cfg, keep_ratio=True, max_size=data.max_size, short_size=data.short_size
            )
        self.shard_dir = Path(shard_dir)
        self.max_image_pixels = cfg.data.max_image_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list[Any]] = {
            "shard": [],
            "images": [],
            "failed": [],
            "annotations": [],
            "seconds": [],
        }
        for shard, items, fingerprint in zip(
            batch["shard"], batch["items"], batch["fingerprint"], strict=True
        ):
            start = time.perf_counter()
            result = propose_images(
                json.loads(str(items)), self.backbone, self.cfg, device=self.device, propose_batch=self.propose_batch,
                max_image_pixels=self.max_image_pixels,
            )
            write_shard(self.shard_dir, int(shard), result, fingerprint=str(fingerprint))
            rows["shard"].append(int(shard))
            rows["images"].append(len(result.images))
            rows["failed"].append(len(result.failed))
            rows["annotations"].append(len(result.annotations))
            rows["seconds"].append(time.perf_counter() - start)
        return {key: np.asarray(values) for key, values in rows.items()}


def write_shard(shard_dir: Path, index: int, result: ShardResult, *, fingerprint: str) -> None:
    """Write a shard's ``NNNNN.npy`` then ``NNNNN.json``, each by rename; the json marks the shard done."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    npy = shard_dir / f"{index:05d}.npy"
    tmp_npy = shard_dir / f".{index:05d}.{os.getpid()}.npy"
    np.save(tmp_npy, result.prompts)
    os.replace(tmp_npy, npy)
    record = {
        "fingerprint": fingerprint,
        "channels": int(result.prompts.shape[1]),
        "images": result.images,
        "annotations": result.annotations,
        "failed": result.failed,
    }
    _write_json(shard_dir / f"{index:05d}.json", record)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _shard_done(shard_dir: Path, index: int, fingerprint: str) -> bool:
    record = shard_dir / f"{index:05d}.json"
    if not record.is_file() or not (shard_dir / f"{index:05d}.npy").is_file():
        return False
    try:
        return json.loads(record.read_text()).get("fingerprint") == fingerprint
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _fingerprint(run: dict[str, Any], items: list[dict[str, Any]]) -> str:
    blob = json.dumps({"run": run, "items": items}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def proposal_identity(cfg: Config, from_checkpoint: str | Path | None = None) -> dict[str, Any]:
    """What a shard's result depends on besides its images: the proposal settings and the backbone, or the
    self-training settings and the checkpoint's weights."""
    if from_checkpoint is not None:
        identity = {"selftrain": dataclasses.asdict(cfg.selftrain), **checkpoint_identity(from_checkpoint)}
        if cfg.data.max_image_pixels != MAX_IMAGE_PIXELS:
            identity["max_image_pixels"] = cfg.data.max_image_pixels
        return identity
    propose = dataclasses.asdict(cfg.propose)
    for unrelated in ("batch_size", "shard_size", "num_actors", "cpus_per_actor"):
        propose.pop(unrelated)
    proposer = propose.pop("proposer")  # saliency shards keep the fingerprints they had before CLIP existed
    weights = cfg.model.backbone_weights
    stamp = None
    if weights is not None and Path(weights).is_file():
        stat = Path(weights).stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
    seed = cfg.train.seed if weights is None else None  # the random init depends on it
    identity = {
        "propose": propose,
        "depth": cfg.model.depth,
        "weights": weights,
        "weights_stamp": stamp,
        "seed": seed,
    }
    if proposer == "clip":
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

    Runs as Ray Data ``map_batches`` over shards with a pool of `_ShardActor` (``propose.num_actors``;
    one GPU per actor where the cluster has GPUs, else ``propose.cpus_per_actor`` CPUs each). When Ray
    is not initialised, ``ray.init()`` connects to ``RAY_ADDRESS`` or a cluster started with ``ray start``
    on this machine, else starts a local instance (left running for later calls). Skipped images
    (missing, undecodable or above ``data.max_image_pixels``, the rule of every reader; a size that
    differs from the json) are counted in the summary and listed in one `DatasetSkipWarning`; an
    image without proposals is kept in annotations.json with no annotation.

    Args:
        images: an image folder or a COCO json (only its ``images`` are used), see `list_images`.
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
    fingerprints = [_fingerprint(run, shard) for shard in shards]
    pending = [index for index in range(len(shards)) if not _shard_done(shard_dir, index, fingerprints[index])]
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
        computed_images = _run_shards(
            cfg,
            shard_dir,
            [(index, shards[index], fingerprints[index]) for index in pending],
            from_checkpoint=None if from_checkpoint is None else str(Path(from_checkpoint).resolve()),
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


def _run_shards(
    cfg: Config,
    shard_dir: Path,
    pending: list[tuple[int, list[dict[str, Any]], str]],
    *,
    from_checkpoint: str | None = None,
) -> int:
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = min(cfg.propose.num_actors or max(1, gpus), len(pending))
    rows = [{"shard": index, "items": json.dumps(items), "fingerprint": fp} for index, items, fp in pending]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        _ShardActor,
        fn_constructor_kwargs={
            "cfg": cfg, "shard_dir": str(shard_dir), "use_gpu": gpus > 0, "from_checkpoint": from_checkpoint
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
        num_cpus=cfg.propose.cpus_per_actor,
    )
    total = 0
    for row in dataset.iter_rows():
        total += int(row["images"])
        log.info(
            "propose: shard %d: %d images, %d annotations, %d failed, %.2f images/s",
            row["shard"],
            row["images"],
            row["annotations"],
            row["failed"],
            row["images"] / max(float(row["seconds"]), 1e-9),
        )
    return total


def merge_shards(out: Path, fingerprints: list[str]) -> dict[str, Any]:
    """Merge the part files of shards 0..len(fingerprints)-1 into annotations.json and prompts.npy.

    Annotation ids are 1..n in shard order; ``prompts.npy`` is written through a memory map, so the
    prompts of a large set never sit in memory at once.

    Args:
        out: the propose output folder.
        fingerprints: the expected fingerprint of each shard.

    Returns:
        images, annotations, images_without_proposals, failed (count), failed_reasons (reason ->
        count), failed_examples (reason -> up to 3 file names), annotations_path, prompts_path.

    Raises:
        ValueError: a shard part is missing, stale or inconsistent (the message says to rerun).
    """
    shard_dir = out / "shards"
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    counts: list[int] = []
    channels = 0
    for index, fingerprint in enumerate(fingerprints):
        if not _shard_done(shard_dir, index, fingerprint):
            raise ValueError(f"{shard_dir}: shard {index:05d} is missing or stale; rerun sp-ray propose")
        record = json.loads((shard_dir / f"{index:05d}.json").read_text())
        images.extend(record["images"])
        annotations.extend(record["annotations"])
        failed.extend(record["failed"])
        counts.append(len(record["annotations"]))
        channels = int(record["channels"])
    for ann_id, ann in enumerate(annotations, start=1):
        ann["id"] = ann_id

    prompts_path = out / "prompts.npy"
    tmp = out / f".prompts.{os.getpid()}.npy"
    prompts = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(annotations), channels))
    row = 0
    for index, count in enumerate(counts):
        part = np.load(shard_dir / f"{index:05d}.npy")
        if part.shape != (count, channels):
            raise ValueError(
                f"{shard_dir}/{index:05d}.npy has shape {part.shape}, expected ({count}, {channels}); "
                "delete this shard's files and rerun sp-ray propose"
            )
        prompts[row : row + count] = part
        row += count
    prompts.flush()
    del prompts
    os.replace(tmp, prompts_path)

    annotations_path = out / "annotations.json"
    _write_json(
        annotations_path,
        {
            "info": {"description": "sp-ray saliency mask proposals (SP / FreeSOLO Free Mask)"},
            "images": images,
            "annotations": annotations,
            "categories": [CATEGORY],
        },
    )
    with_proposals = {ann["image_id"] for ann in annotations}
    reasons = Counter(entry["reason"] for entry in failed)
    examples = {
        reason: [entry["file_name"] for entry in failed if entry["reason"] == reason][:_MAX_EXAMPLES]
        for reason in reasons
    }
    return {
        "images": len(images),
        "annotations": len(annotations),
        "images_without_proposals": sum(image["id"] not in with_proposals for image in images),
        "failed": len(failed),
        "failed_reasons": dict(reasons),
        "failed_examples": examples,
        "annotations_path": str(annotations_path),
        "prompts_path": str(prompts_path),
    }
