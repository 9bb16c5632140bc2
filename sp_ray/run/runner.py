"""Steps that skip themselves when their outputs exist, and progress bars for the long ones."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("sp_ray")


@dataclass(frozen=True)
class Step:
    """One step: done when every path of ``outputs`` exists; a forced run first removes ``clean``."""

    name: str
    summary: str
    outputs: tuple[Path, ...]
    clean: tuple[Path, ...]
    run: Callable[[], None]

    def done(self) -> bool:
        return all(path.exists() for path in self.outputs)


@dataclass(frozen=True)
class StepRecord:
    """What happened to a step in this invocation: "ran" or "skipped", and its seconds when it last ran."""

    name: str
    status: str
    seconds: float | None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def run_steps(
    steps: Sequence[Step], *, force: bool = False, redo: Sequence[str] = (), record: Path | None = None
) -> list[StepRecord]:
    """Run the steps in order, skipping each whose outputs exist unless forced.

    Args:
        steps: the pipeline.
        force: redo every step (its ``clean`` paths are removed first).
        redo: step names; the first of them in pipeline order and every step after it are redone.
        record: json file of {step: {"seconds", "finished", "load_average"}} (the 1-minute load average when
            the step finished) for the steps that ran, kept across runs.

    Returns:
        One `StepRecord` per step, in order.

    Raises:
        ValueError: an unknown name in ``redo``.
        RuntimeError: a step returned without writing all its outputs.
    """
    names = [step.name for step in steps]
    unknown = sorted(set(redo) - set(names))
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; the steps are {', '.join(names)}")
    first_redo = min((names.index(name) for name in redo), default=len(steps))
    history: dict[str, Any] = json.loads(record.read_text()) if record is not None and record.is_file() else {}
    records = []
    for index, step in enumerate(steps):
        again = force or index >= first_redo
        if not again and step.done():
            log.info("[%s] done before, skipped (--force or --redo %s to redo it)", step.name, step.name)
            records.append(StepRecord(step.name, "skipped", history.get(step.name, {}).get("seconds")))
            continue
        if again:
            for path in step.clean:
                _remove(path)
        log.info("[%s] %s", step.name, step.summary)
        start = time.perf_counter()
        step.run()
        seconds = round(time.perf_counter() - start, 1)
        missing = [str(path) for path in step.outputs if not path.exists()]
        if missing:
            raise RuntimeError(f"step {step.name!r} finished without writing {', '.join(missing)}")
        log.info("[%s] done in %.1f s", step.name, seconds)
        records.append(StepRecord(step.name, "ran", seconds))
        if record is not None:
            # The load average says how much of the machine the step had (other processes slow it down).
            history[step.name] = {"seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "load_average": round(os.getloadavg()[0], 2)}
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(history, indent=2))
    return records


@contextlib.contextmanager
def progress(desc: str, total: int, count: Callable[[], int] | None = None, *, unit: str = "it") -> Iterator[tqdm]:
    """A tqdm bar; with ``count``, a thread sets it to ``count()`` every second (files other processes write)."""
    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=None)  # None: off when not a TTY
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(1.0):
            bar.n = min(total, count())
            bar.refresh()

    watcher = threading.Thread(target=poll, daemon=True) if count is not None else None
    if watcher is not None:
        watcher.start()
    try:
        yield bar
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
            bar.n = min(total, count())
            bar.refresh()
        bar.close()


def count_lines(path: Path) -> int:
    """Lines of a text file (0 when it does not exist yet), e.g. the epochs logged in a metrics.jsonl."""
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented json beside ``path``, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
