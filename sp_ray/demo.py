"""The main job on the built-in synthetic dataset: data -> 10% split -> fine-tune K-Net -> COCO AP.

Every step skips itself when its output already exists, so a rerun is fast; ``force`` redoes all.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from sp_ray.config import load_config
from sp_ray.data.split import split_fractions
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.evaluation.coco_eval import evaluate_checkpoint, format_metrics
from sp_ray.train.checkpoint import is_checkpoint
from sp_ray.train.loop import fit

log = logging.getLogger("sp_ray")

DEMO_FRACTION = 0.1


def run_demo(
    out: Path,
    *,
    config: Path,
    overrides: list[str] | tuple[str, ...] = (),
    force: bool = False,
    num_images: int = 400,
    image_size: int = 160,
) -> dict[str, dict[str, float]]:
    """Run the demo pipeline under ``out``; returns the val metrics and writes ``out/metrics.json``."""
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def step(name: str, done: bool, fn) -> None:
        if done:
            log.info("[%s] output exists, skipped (use --force to redo)", name)
            return
        log.info("[%s] running", name)
        start = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - start
        log.info("[%s] done in %.1f s", name, timings[name])

    data = out / "data"
    step("synthetic data", (data / "val.json").is_file(),
         lambda: write_synthetic_dataset(data, num_images=num_images, image_size=image_size, seed=0))
    splits = out / "splits"
    labeled = splits / f"train_{DEMO_FRACTION * 100:g}pct_seed0.json"
    step("10% split", labeled.is_file(),
         lambda: split_fractions(data / "train.json", [DEMO_FRACTION], seed=0, out_dir=splits))

    # No val set inside fit: the evaluate step below scores the final checkpoint once.
    cfg = load_config(config, [
        f"data.train_annotations={labeled}", f"data.train_images={data / 'images'}", *overrides,
    ])
    work_dir = out / "knet_10pct"
    step("fine-tune K-Net on 10%", is_checkpoint(work_dir / "final"), lambda: fit(cfg, work_dir))

    metrics_path = out / "metrics.json"

    def evaluate() -> None:
        metrics, _ = evaluate_checkpoint(
            str(work_dir / "final"), annotations=str(data / "val.json"), images=str(data / "images"),
        )
        metrics_path.write_text(json.dumps(metrics, indent=2))

    step("evaluate on val", metrics_path.is_file(), evaluate)
    metrics = json.loads(metrics_path.read_text())
    print(f"\nK-Net (tiny) fine-tuned on {DEMO_FRACTION:.0%} of the synthetic train set, COCO AP on val:")
    print(format_metrics(metrics))
    if timings:
        print("\nstep times: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in timings.items()))
    return metrics
