"""Training throughput of the tiny K-Net: the plain loop, Ray Train with 1 worker, Ray Train with 2 workers.

All three run the same config on the same synthetic data in one invocation. Throughput is the
wall-clock images/s of each epoch after the first (warm-up), including checkpointing and Ray's
reporting; start-up (Ray, worker processes) is excluded. The table gives the median and the
slowest-5% (p95 of epoch time) figures. The Ray overhead per step is the difference of the
median step times of Ray (1 worker) and the plain loop, at equal CPU threads.

    python benchmarks/train_scaling.py --epochs 6 --out runs/bench/train_scaling.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from sp_ray.config import load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.train.loop import fit
from sp_ray.train.ray_train import run_training

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "knet_tiny_synthetic.yaml"


def epoch_throughput(work_dir: Path) -> list[float]:
    """Images/s of every epoch after the first, wall clock from one epoch's log line to the next.

    The interval covers everything a run does per epoch: the steps, the metric all-reduce, the
    checkpoint and, under Ray, ``ray.train.report`` with its checkpoint upload.
    """
    lines = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    return [b["images"] / (b["time"] - a["time"]) for a, b in zip(lines, lines[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--num-images", type=int, default=80, help="synthetic images (80% of them train)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="images per worker per step")
    parser.add_argument("--cpus", type=int, default=2, help="CPU threads of the plain loop and of 1 Ray worker")
    parser.add_argument("--out", default="runs/bench/train_scaling.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_synthetic_dataset(tmp / "data", num_images=args.num_images, image_size=args.image_size)
        base = [f"data.train_annotations={data['train']}", f"data.train_images={data['images']}",
                f"data.max_size={args.image_size}", f"data.short_size={args.image_size}",
                f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}"]
        runs: dict[str, list[float]] = {}

        torch.set_num_threads(args.cpus)
        fit(load_config(CONFIG, base), tmp / "plain")
        runs["plain loop, 1 process"] = epoch_throughput(tmp / "plain")

        import ray

        ray.init(address="local", num_cpus=max(2, args.cpus), include_dashboard=False, log_to_driver=False)
        run_training(load_config(CONFIG, [*base, "train.num_workers=1",
                                          f"train.resources_per_worker={{CPU: {args.cpus}}}"]), tmp / "ray1")
        runs["Ray Train, 1 worker"] = epoch_throughput(tmp / "ray1")
        run_training(load_config(CONFIG, [*base, "train.num_workers=2",
                                          f"train.resources_per_worker={{CPU: {max(1, args.cpus // 2)}}}"]),
                     tmp / "ray2")
        runs["Ray Train, 2 workers"] = epoch_throughput(tmp / "ray2")
        ray.shutdown()

    plain = statistics.median(runs["plain loop, 1 process"])
    rows = []
    for name, values in runs.items():
        median = statistics.median(values)
        rows.append({"run": name, "images_per_second_median": median,
                     "images_per_second_p95_slowest": float(np.percentile(values, 5)),
                     "ratio_to_plain": median / plain, "epochs_measured": len(values)})
    ray1 = rows[1]["images_per_second_median"]
    overhead_ms = (args.batch_size / ray1 - args.batch_size / plain) * 1000.0
    print(f"tiny K-Net, {args.image_size}px, batch {args.batch_size} per worker, {args.cpus} CPU threads in all\n")
    print("| run | images/s (median) | images/s (slowest 5% epochs) | x plain |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | {row['images_per_second_median']:.1f} | "
              f"{row['images_per_second_p95_slowest']:.1f} | {row['ratio_to_plain']:.2f} |")
    print(f"\nRay Train overhead per step (1 worker vs plain): {overhead_ms:+.1f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "ray_overhead_ms_per_step": overhead_ms,
                               "per_epoch": runs}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
