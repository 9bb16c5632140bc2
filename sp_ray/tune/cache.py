"""A directory per settings hash, built once however many trials ask for it at the same time.

``ROOT/KEY/`` is built by the first caller while it holds ``ROOT/KEY.lock`` (an exclusive ``flock``; the
kernel drops it when the holder dies, so a crashed build is redone, not waited on forever). The build ends
with ``ROOT/KEY/done.json``, written to a temporary name and renamed, so a reader sees a finished entry
or none. On storage shared by several nodes the lock needs a file system with working ``flock`` (local
disks, NFSv4).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

DONE = "done.json"


def settings_key(settings: dict[str, Any]) -> str:
    """A 16-hex-digit hash of a JSON-serialisable settings dict (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_build(
    root: str | Path, key: str, build: Callable[[Path], dict[str, Any]], *, settings: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """Return the record of ``ROOT/KEY``, building it with ``build(directory)`` if no caller has.

    Args:
        root: the cache folder of one kind of entry (e.g. ``CACHE/pretrain``).
        key: the entry's settings hash (``settings_key``).
        build: makes the entry's files inside the directory it is given and returns a JSON-serialisable
            record of them (paths, timings); called at most once per key unless it raises.
        settings: what the key hashes, written to ``ROOT/KEY/settings.json`` for a reader of the cache.

    Returns:
        (the record, True when the entry existed or another caller built it while this one waited).
    """
    directory = Path(root) / key
    done = directory / DONE
    if done.is_file():
        return json.loads(done.read_text()), True
    directory.mkdir(parents=True, exist_ok=True)
    with open(Path(root) / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if done.is_file():
                return json.loads(done.read_text()), True
            write_json_atomic(directory / "settings.json", settings)
            record = build(directory)
            write_json_atomic(done, record)
            return record, False
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to a temporary name next to ``path`` and rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
