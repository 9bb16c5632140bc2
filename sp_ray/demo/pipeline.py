"""`run_demo`: `sp_ray.run.run_pipeline` with the demo's settings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sp_ray.demo.settings import DEMO
from sp_ray.run.pipeline import run_pipeline
from sp_ray.run.runner import StepRecord
from sp_ray.run.settings import RunSettings


def run_demo(
    out: str | Path = "runs/demo", settings: RunSettings | None = None, *, force: bool = False,
    redo: Sequence[str] = (),
) -> list[StepRecord]:
    """Run the demo under ``out`` and write ``out/report.html`` and ``out/report.md``.

    Args:
        out: output folder.
        settings: `DEMO` (the default, ``make demo``) or `TINY` (tests).
        force: redo every step.
        redo: redo these steps and every step after them.

    Returns:
        One `StepRecord` per step ("ran" or "skipped"), in pipeline order.
    """
    return run_pipeline(out, settings or DEMO, force=force, redo=redo)
