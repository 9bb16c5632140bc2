"""The Ray Data side of ``sp-ray propose``: shards of images, their fingerprints, the actors, the merge.

The images are cut into shards of ``propose.shard_size``. Each shard is one row of a Ray Dataset; a
pool of `ShardActor` (one GPU each where the cluster has GPUs) holds a proposer (``sp_ray.pretrain.proposers``),
decodes the shard's images one batch ahead of it (`propose_images`) and writes the shard's part files
``OUT/shards/NNNNN.json`` (images, annotations, failures) and ``NNNNN.npy`` (the prompt vector of each
annotation). A shard whose part files exist with the same `fingerprint` (what the proposals depend on, and
the image list) is not recomputed, so a rerun after an interruption continues where it stopped. The parts
are then merged (`merge_shards`) into ``OUT/annotations.json`` (COCO, the proposer's categories: one,
"object", but for CLIP's class vocabulary; RLE masks, a ``score`` per annotation) and ``OUT/prompts.npy``
(float32 [n, C], row i the prompt of annotation id i + 1). The actors write the parts themselves, so on a
cluster of several nodes OUT must be storage that every node sees (e.g. NFS).

Nothing here knows which proposer runs: the actors build theirs with the factory they are given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from export.geometry import MAX_IMAGE_PIXELS
from sp_ray.config import ProposeConfig
from sp_ray.data.coco import SIZE_MISMATCH
from sp_ray.data.images import UNREADABLE, UnusableImageError, load_image_rgb
from sp_ray.pretrain.proposers import OBJECT_CATEGORY, Proposals, Proposer

log = logging.getLogger(__name__)

UNDECODABLE = UNREADABLE  # the reason every image reader counts (sp_ray.data.images); TOO_LARGE too
TOO_ELONGATED = "too elongated for the keep-ratio resize"
CATEGORY = OBJECT_CATEGORY  # the category of class-free proposals
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
        categories: the proposer's COCO categories, which the annotations' ``category_id`` refer to.
    """

    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    prompts: np.ndarray
    failed: list[dict[str, str]]
    categories: list[dict[str, Any]] = field(default_factory=lambda: [dict(CATEGORY)])


def propose_images(
    items: list[dict[str, Any]],
    proposer: Proposer,
    cfg: ProposeConfig,
    *,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> ShardResult:
    """The proposals of a list of images: decode, then the proposer on each batch.

    Images are decoded in a thread pool one batch (``propose.batch_size``) ahead of the proposer. Masks
    are at the original image size.

    Args:
        items: entries of `sp_ray.data.listing.list_images` (id, file_name, path, height, width).
        proposer: the proposal source (`sp_ray.pretrain.proposers.Proposer`).
        cfg: the ``propose`` config section (``batch_size``; ``cpus_per_actor`` decoding threads).
        max_image_pixels: larger images are skipped (``data.max_image_pixels``).

    Returns:
        The shard's images, annotations (the proposals' category, 1 when class-free; RLE, bbox of the mask,
        area, iscrowd 0, score),
        prompts and failures (missing or undecodable files and images above the pixel limit, by the
        rule of every reader, `sp_ray.data.images.UnusableImageError`; json height/width that differ
        from the file; images too elongated for the proposer's resize).
    """
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    prompts: list[np.ndarray] = []
    failed: list[dict[str, str]] = []
    batches = [items[start : start + cfg.batch_size] for start in range(0, len(items), cfg.batch_size)]
    workers = max(1, int(cfg.cpus_per_actor))
    check = proposer.check_size
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(_decode, item, check, max_image_pixels) for item in batches[0]] if batches else []
        for index in range(len(batches)):
            decoded = [future.result() for future in pending]
            following = batches[index + 1] if index + 1 < len(batches) else []
            pending = [pool.submit(_decode, item, check, max_image_pixels) for item in following]
            ready = []
            for item, pixels, problem in decoded:
                if problem is None:
                    ready.append((item, pixels))
                else:
                    failed.append(
                        {"file_name": item["file_name"], "reason": problem[0], "detail": problem[1]}
                    )
            found = proposer(ready)
            for (item, pixels), proposals in zip(ready, found, strict=True):
                height, width = pixels.shape[:2]
                images.append(
                    {"id": item["id"], "file_name": item["file_name"], "height": height, "width": width}
                )
                annotations.extend(_coco_annotations(item["id"], proposals))
                prompts.append(proposals.queries.cpu().numpy().astype(np.float32))
    channels = proposer.prompt_width
    stacked = np.concatenate(prompts) if prompts else np.zeros((0, channels), dtype=np.float32)
    categories = [dict(category) for category in proposer.categories]
    return ShardResult(images=images, annotations=annotations, prompts=stacked, failed=failed, categories=categories)


def _decode(
    item: dict[str, Any], check_size: Callable[[int, int], None], max_image_pixels: int
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
        check_size(pixels.shape[0], pixels.shape[1])
    except ValueError as err:
        return item, None, (TOO_ELONGATED, f"{item['path']} ({found}): {err}")
    return item, pixels, None


def _coco_annotations(image_id: int, proposals: Proposals) -> list[dict[str, Any]]:
    if proposals.masks.shape[0] == 0:
        return []
    masks = proposals.masks.cpu().numpy()  # (L, H, W)
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    areas = mask_utils.area(rles)
    boxes = mask_utils.toBbox(rles)  # (L, 4) xywh, the tight box of each mask
    if proposals.category_ids is None:
        category_ids = [CATEGORY["id"]] * len(rles)
    else:
        category_ids = [int(v) for v in proposals.category_ids.tolist()]
    return [
        {
            "image_id": image_id,
            "category_id": category_id,
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(area),
            "bbox": [float(v) for v in box],
            "iscrowd": 0,
            "score": float(score),
        }
        for rle, area, box, score, category_id in zip(
            rles, areas, boxes, proposals.scores.tolist(), category_ids, strict=True
        )
    ]


class ShardActor:
    """Ray Data callable class: holds the proposer that ``make_proposer`` builds on the actor's device,
    proposes on whole shards and writes their parts.

    Args:
        make_proposer: device -> `sp_ray.pretrain.proposers.Proposer`, picklable (it travels to the actor).
        shard_dir: where the part files go.
        use_gpu: the actor reserved one GPU (Ray made it the only visible one).
        cfg: the ``propose`` section (batching and decoding threads).
        max_image_pixels: larger images are skipped (``data.max_image_pixels``).
    """

    def __init__(
        self,
        make_proposer: Callable[[torch.device], Proposer],
        shard_dir: str,
        use_gpu: bool,
        cfg: ProposeConfig,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.cfg = cfg
        self.proposer = make_proposer(self.device)
        self.shard_dir = Path(shard_dir)
        self.max_image_pixels = max_image_pixels

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
                json.loads(str(items)), self.proposer, self.cfg, max_image_pixels=self.max_image_pixels
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
        "categories": result.categories,
    }
    _write_json(shard_dir / f"{index:05d}.json", record)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def shard_done(shard_dir: Path, index: int, fingerprint: str) -> bool:
    record = shard_dir / f"{index:05d}.json"
    if not record.is_file() or not (shard_dir / f"{index:05d}.npy").is_file():
        return False
    try:
        return json.loads(record.read_text()).get("fingerprint") == fingerprint
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def fingerprint(run: dict[str, Any], items: list[dict[str, Any]]) -> str:
    """The fingerprint of a shard: a hash of what its proposals depend on (``run``, e.g.
    ``sp_ray.pretrain.propose.proposal_identity``) and of its image list."""
    blob = json.dumps({"run": run, "items": items}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def run_shards(
    pending: list[tuple[int, list[dict[str, Any]], str]],
    shard_dir: Path,
    make_proposer: Callable[[torch.device], Proposer],
    cfg: ProposeConfig,
    *,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> int:
    """Compute the shards ``pending`` ((index, items, fingerprint) each) as Ray Data ``map_batches`` with a pool
    of `ShardActor` (``propose.num_actors``; one GPU per actor where the cluster has GPUs, else
    ``propose.cpus_per_actor`` CPUs each); returns the number of images proposed on. When Ray is not
    initialised, ``ray.init()`` connects to ``RAY_ADDRESS`` or a cluster started on this machine, else starts a
    local instance."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = min(cfg.num_actors or max(1, gpus), len(pending))
    rows = [{"shard": index, "items": json.dumps(items), "fingerprint": fp} for index, items, fp in pending]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardActor,
        fn_constructor_kwargs={
            "make_proposer": make_proposer, "shard_dir": str(shard_dir), "use_gpu": gpus > 0, "cfg": cfg,
            "max_image_pixels": max_image_pixels,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
        num_cpus=cfg.cpus_per_actor,
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
    prompts of a large set never sit in memory at once. The categories are the shards' (all shards of a run
    have the same proposer); parts written before shards recorded them are class-free ("object").

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
    categories: list[dict[str, Any]] | None = None
    for index, fingerprint in enumerate(fingerprints):
        if not shard_done(shard_dir, index, fingerprint):
            raise ValueError(f"{shard_dir}: shard {index:05d} is missing or stale; rerun sp-ray propose")
        record = json.loads((shard_dir / f"{index:05d}.json").read_text())
        own = record.get("categories", [CATEGORY])
        if categories is None:
            categories = own
        elif own != categories:
            raise ValueError(
                f"{shard_dir}: shard {index:05d} has other categories than shard 00000 ({len(own)} against "
                f"{len(categories)}); delete {shard_dir} and rerun sp-ray propose"
            )
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
            "categories": categories if categories is not None else [CATEGORY],
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
