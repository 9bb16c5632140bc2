"""Training throughput of the tiny K-Net: the plain loop, Ray Train with 1 worker, Ray Train with 2 workers.

All three run the same config on the same synthetic data in one invocation, interleaved: ``--rounds`` rounds,
each training every contender for ``--epochs`` epochs in an order rotated by one per round, so that load
from other processes on a shared machine falls on all three alike. Throughput is the wall-clock images/s of
each epoch after the first of its training (warm-up), including checkpointing and Ray's reporting;
start-up (Ray, worker processes) is excluded. The table gives the median over all measured epochs and the
slowest-5% figure (images/s at the 95th percentile of epoch time). The Ray overhead per step is the
difference of the median step times of Ray (1 worker) and the plain loop, at equal CPU threads.

    python benchmarks/train_scaling.py --results benchmarks/results/train_scaling
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import torch
from results_files import commit, uncommitted_changes, write_results

from sp_ray.config import load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.machine import cpu_facts
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
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each training (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="trainings of every contender, interleaved")
    parser.add_argument("--num-images", type=int, default=80, help="synthetic images (80%% of them train)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="images per worker per step")
    parser.add_argument("--cpus", type=int, default=2, help="CPU threads of the plain loop and of 1 Ray worker")
    parser.add_argument("--out", default="runs/bench/train_scaling", help="writes OUT.json and OUT.md")
    parser.add_argument("--results", default=None, help="also copy them to this stem (benchmarks/results/...)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch of every training is warm-up")
    logging.basicConfig(level=logging.WARNING)

    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_synthetic_dataset(tmp / "data", num_images=args.num_images, image_size=args.image_size)
        base = [f"data.train_annotations={data['train']}", f"data.train_images={data['images']}",
                f"data.max_size={args.image_size}", f"data.short_size={args.image_size}",
                f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}"]
        torch.set_num_threads(args.cpus)
        half = max(1, args.cpus // 2)

        def ray_train(workers: int, cpus: int) -> Callable[[Path], object]:
            return lambda work: run_training(load_config(CONFIG, [
                *base, f"train.num_workers={workers}", f"train.resources_per_worker={{CPU: {cpus}}}"]), work)

        contenders: dict[str, Callable[[Path], object]] = {
            "plain loop, 1 process": lambda work: fit(load_config(CONFIG, base), work),
            f"Ray Train, 1 worker ({args.cpus} CPUs)": ray_train(1, args.cpus),
            f"Ray Train, 2 workers ({half} CPU each)": ray_train(2, half),
        }
        names = list(contenders)
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(address="local", num_cpus=max(2, args.cpus), include_dashboard=False, log_to_driver=False)
        try:
            for round_index in range(args.rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    work = tmp / f"{names.index(name)}_round{round_index}"
                    contenders[name](work)
                    runs.setdefault(name, []).extend(epoch_throughput(work))
        finally:
            if started_ray:
                ray.shutdown()

    plain = statistics.median(runs[names[0]])
    rows = []
    for name, values in runs.items():
        median = statistics.median(values)
        rows.append({"run": name, "images_per_second_median": median,
                     "images_per_second_p95_slowest": float(np.percentile(values, 5)),
                     "ratio_to_plain": median / plain, "epochs_measured": len(values)})
    ray1 = rows[1]["images_per_second_median"]
    overhead_ms = (args.batch_size / ray1 - args.batch_size / plain) * 1000.0
    at = commit()
    machine = cpu_facts()
    lines = [f"Tiny K-Net, {args.image_size} px, batch {args.batch_size} per worker, {args.cpus} CPU threads in all; "
             f"{args.rounds} interleaved rounds of {args.epochs}-epoch trainings, each training's first epoch "
             f"dropped; {machine['cpu']} ({machine['cores']} cores; {' '.join(machine['isa'])}), torch "
             f"{torch.__version__}, Ray {ray.__version__}, Python {platform.python_version()}, commit {at}.", "",
             "| run | images/s (median) | images/s (slowest 5% of epochs) | x plain |", "|---|---:|---:|---:|"]
    lines += [f"| {row['run']} | {row['images_per_second_median']:.1f} | {row['images_per_second_p95_slowest']:.1f} "
              f"| {row['ratio_to_plain']:.2f} |" for row in rows]
    lines += ["", f"Ray Train overhead per step (1 worker vs plain): {overhead_ms:+.1f} ms"]
    table = "\n".join(lines) + "\n"
    print(table, end="")
    result = {"args": vars(args), "machine": machine, "torch": torch.__version__, "ray": ray.__version__,
              "commit": at, "uncommitted_changes": uncommitted_changes(), "load_average": list(os.getloadavg()),
              "rows": rows, "ray_overhead_ms_per_step": overhead_ms, "per_epoch": runs}
    write_results([args.out, args.results], result, table)


if __name__ == "__main__":
    main()
