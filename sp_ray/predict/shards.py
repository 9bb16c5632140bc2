"""The shard files of ``sp-ray predict`` and their merge into DIR's results (plain Python, no Ray).

``DIR/shards/NNNNN.json`` holds one shard's images, predictions and skipped inputs with the
shard's fingerprint; it is written last (by rename), after the shard's overlays and video segment,
so its presence with the expected fingerprint means the shard is complete. The merge reads the
shards in order, so the results depend on the inputs and settings only, not on which shards a run
computed and which it found done.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

SHARDS = "shards"
OVERLAYS = "overlays"


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the model: a shard computed with another model is stale)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(settings: dict[str, Any], task: dict[str, Any]) -> str:
    """What a shard's results depend on: the settings (model digest, threshold, batch size, overlays)
    and the shard's inputs."""
    text = json.dumps({"settings": settings, "task": task}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def shard_path(out: Path, index: int, suffix: str = ".json") -> Path:
    return out / SHARDS / f"{index:05d}{suffix}"


def write_bytes(path: Path, data: bytes) -> None:
    """Write beside ``path``, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON, written as ``write_bytes`` writes."""
    write_bytes(path, json.dumps(data).encode())


def write_shard(out: Path, index: int, record: dict[str, Any], payload: bytes, *, fingerprint: str) -> None:
    """Write a shard's blobs (overlay PNGs under DIR/overlays, or its video segment), then its json.

    Args:
        out: the output folder DIR.
        index: the shard's index.
        record: the actor's record: images, predictions, skipped, overlays (names), blob_sizes, and
            ``frames`` for a video shard.
        payload: the blobs, concatenated, of the sizes in ``record["blob_sizes"]``.
        fingerprint: the shard's fingerprint.
    """
    sizes = record.pop("blob_sizes")
    if sum(sizes) != len(payload):
        raise ValueError(f"shard {index}: payload of {len(payload)} bytes, the record says {sum(sizes)}")
    blobs, start = [], 0
    for size in sizes:
        blobs.append(payload[start : start + size])
        start += size
    if "frames" in record:
        record["segment"] = shard_path(out, index, ".mp4").name if blobs else None
        if blobs:
            write_bytes(shard_path(out, index, ".mp4"), blobs[0])
    else:
        for name, blob in zip(record["overlays"], blobs, strict=True):
            write_bytes(out / OVERLAYS / name, blob)
    write_json(shard_path(out, index), {"fingerprint": fingerprint, **record})


def read_shard(out: Path, index: int, fingerprint: str) -> dict[str, Any] | None:
    """The shard's record when it is complete with this fingerprint (its overlays and segment present), else None."""
    path = shard_path(out, index)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    if record.get("segment") and not shard_path(out, index, ".mp4").is_file():
        return None
    if any(not (out / OVERLAYS / name).is_file() for name in record.get("overlays", [])):
        return None
    return record


class _JsonListWriter:
    """Writes a JSON list item by item, to a temporary file renamed on ``close``: the bytes of
    ``json.dumps(items)``, without holding the items in memory."""

    def __init__(self, path: Path, prefix: str = "", suffix: str = "") -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.file = open(self.tmp, "w")  # noqa: SIM115 - closed in close()
        self.file.write(prefix + "[")
        self.suffix = suffix
        self.count = 0

    def extend(self, items: list[Any]) -> None:
        for item in items:
            self.file.write((", " if self.count else "") + json.dumps(item))
            self.count += 1

    def close(self) -> None:
        self.file.write("]" + self.suffix)
        self.file.close()
        os.replace(self.tmp, self.path)


def merge_shards(out: Path, fingerprints: list[str], header: dict[str, Any]) -> dict[str, Any]:
    """Merge shards 0..n-1 into DIR/images.json, DIR/predictions.json and DIR/skipped.json.

    The shards are read one at a time and the lists written as they go, so the merge holds one shard
    in memory, not the whole run's predictions.

    Args:
        out: the output folder.
        fingerprints: the expected fingerprint of each shard.
        header: the keys written before ``images`` in images.json (source, root, model, categories).

    Returns:
        {"images", "instances", "skipped", "skipped_reasons", "segments"}: counts, reason -> count, and
        for each shard whether it has a video segment (for the video join).

    Raises:
        ValueError: a shard is missing or stale (a bug: the run computes every pending shard).
    """
    images_prefix = json.dumps(header)[:-1] + (', ' if header else '') + '"images": '
    images = _JsonListWriter(out / "images.json", prefix=images_prefix, suffix="}")
    predictions = _JsonListWriter(out / "predictions.json")
    skipped: list[dict[str, Any]] = []
    segments = []
    for index, expected in enumerate(fingerprints):
        record = read_shard(out, index, expected)
        if record is None:
            raise ValueError(f"{shard_path(out, index)} is missing or stale; rerun sp-ray predict with --resume")
        images.extend(record["images"])
        predictions.extend(record["predictions"])
        skipped.extend(record["skipped"])
        segments.append(bool(record.get("segment")))
    images.close()
    predictions.close()
    reasons = Counter(entry["reason"] for entry in skipped)
    write_json(out / "skipped.json", {"count": len(skipped), "reasons": dict(reasons), "skipped": skipped})
    return {"images": images.count, "instances": predictions.count, "skipped": len(skipped),
            "skipped_reasons": dict(reasons), "segments": segments}
