"""Aspect-ratio grouped batches against mixed ones: padded pixels per batch and training images/s.

A synthetic set of landscape and portrait images (``sp-ray data synthetic --aspect-ratios 1.333 0.75``: 4:3
and 3:4, long side ``--image-size``) trains the tiny K-Net (``configs/demo/knet_tiny_synthetic.yaml``) with
``data.group_by_aspect_ratio`` true and false. Each contender has its own model, optimizer and loader, built
as ``sp-ray finetune`` builds them; a round is one epoch of each, the order alternating round by round so that
load from other processes falls on both alike; ``--warmup`` untimed rounds first. An epoch is timed end to end
(loading, collation and steps: ``data.num_workers=0``, in this process), and every step on its own.

Reported per contender: padding (the share of a batch's pixels that are padding, ``1 - sum(h x w) / (B x Hp x
Wp)``, its median over batches and the share over all batches), the median and p95 of the per-epoch images/s
and of the step time, and the speed-up of grouping (the ratio of the median images/s). One torch thread
unless ``--threads``.

    nice -n 5 python benchmarks/grouped_batching.py --results benchmarks/results/grouped_batching
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from results_files import commit, uncommitted_changes, write_results

from sp_ray.config import load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.machine import cpu_facts
from sp_ray.models import build_model
from sp_ray.objectives import Trainable, build_objective
from sp_ray.train.loop import (
    build_train_loader,
    resolve_num_classes,
    seed_everything,
    set_loader_epoch,
    targets_to,
    train_step,
    training_dataset,
)
from sp_ray.train.optim import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "knet_tiny_synthetic.yaml"
ASPECT_RATIOS = (4 / 3, 3 / 4)


@dataclass
class Contender:
    name: str
    grouped: bool
    run_epoch: Any  # (epoch) -> (images, seconds, step seconds, padding per batch, padded pixels, pixels)
    epoch_images_per_second: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    batch_padding: list[float] = field(default_factory=list)
    padded_pixels: int = 0
    pixels: int = 0


def build_contender(name: str, grouped: bool, overrides: list[str], seed: int) -> Contender:
    cfg = load_config(CONFIG, [*overrides, f"data.group_by_aspect_ratio={str(grouped).lower()}"])
    dataset = training_dataset(cfg)
    cfg = resolve_num_classes(cfg, dataset)
    seed_everything(seed)
    model = build_model(cfg)
    trainable = Trainable(model, build_objective(cfg, model))
    loader = build_train_loader(cfg, dataset)
    optimizer = build_optimizer(trainable, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, iters_per_epoch=len(loader))
    device = torch.device("cpu")

    def run_epoch(epoch: int) -> tuple[int, float, list[float], list[float], int, int]:
        seed_everything(seed * 1000 + epoch)  # as fit: data order and augmentation a function of the epoch
        set_loader_epoch(loader, epoch)
        steps, padding, padded, pixels, images_seen = [], [], 0, 0, 0
        start = time.perf_counter()
        for images, targets in loader:
            valid = sum(int(t["image_size"][0]) * int(t["image_size"][1]) for t in targets)
            total = images.shape[0] * images.shape[-2] * images.shape[-1]
            padding.append(1 - valid / total)
            padded, pixels = padded + total - valid, pixels + total
            step_start = time.perf_counter()
            train_step(trainable, images, targets_to(targets, device), optimizer, scheduler,
                       grad_clip=cfg.train.grad_clip, amp=False)
            steps.append(time.perf_counter() - step_start)
            images_seen += images.shape[0]
        return images_seen, time.perf_counter() - start, steps, padding, padded, pixels

    return Contender(name, grouped, run_epoch)


def summarise(contenders: list[Contender], reference: Contender) -> list[dict[str, Any]]:
    base = statistics.median(reference.epoch_images_per_second)
    rows = []
    for c in contenders:
        rate = statistics.median(c.epoch_images_per_second)
        rows.append({
            "contender": c.name, "group_by_aspect_ratio": c.grouped,
            "padding_median": statistics.median(c.batch_padding), "padding_overall": c.padded_pixels / c.pixels,
            "images_per_second_median": rate,
            # p95 of the slow side: the 5th percentile of the rate
            "images_per_second_p5": float(np.percentile(c.epoch_images_per_second, 5)),
            "step_s_median": statistics.median(c.step_seconds), "step_s_p95": float(np.percentile(c.step_seconds, 95)),
            "speedup": rate / base, "epochs_timed": len(c.epoch_images_per_second), "steps_timed": len(c.step_seconds),
        })  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    machine = header["machine"]
    lines = [f"Tiny K-Net, {header['num_train']} synthetic train images of 4:3 and 3:4 (long side "
             f"{header['image_size']} px), batch {header['batch_size']}, {header['threads']} torch thread(s), "
             f"{header['rounds']} interleaved epochs per contender after {header['warmup']} warm-up; "
             f"{machine['cpu']} ({machine['cores']} cores; {' '.join(machine['isa'])}), torch {header['torch']}, "
             f"Python {header['python']}, commit {header['commit']}.", "",
             "| batches | padding per batch (median) | padding, all batches | images/s (median epoch) | "
             "images/s (p95 slowest epoch) | step median (s) | step p95 (s) | x mixed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['contender']} | {100 * r['padding_median']:.1f}% | {100 * r['padding_overall']:.1f}% | "
              f"{r['images_per_second_median']:.1f} | {r['images_per_second_p5']:.1f} | {r['step_s_median']:.3f} | "
              f"{r['step_s_p95']:.3f} | {r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds, one epoch of every contender each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--num-images", type=int, default=60, help="synthetic images (80%% of them train)")
    parser.add_argument("--image-size", type=int, default=128, help="long side; the short side is 3/4 of it")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/grouped_batching", help="writes OUT.json and OUT.md")
    parser.add_argument("--results", default=None, help="also copy them to this stem (benchmarks/results/...)")
    args = parser.parse_args()
    short = round(args.image_size * 3 / 4)
    if args.image_size % 32 or short % 32:
        # Batches are padded to multiples of data.size_divisor (32): other sides pad every batch, grouped or not.
        parser.error(f"--image-size {args.image_size}: both sides ({args.image_size} and {short}) must be multiples "
                     "of 32 (data.size_divisor), e.g. 128 or 256")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_synthetic_dataset(Path(tmp) / "data", num_images=args.num_images, image_size=args.image_size,
                                        seed=args.seed, aspect_ratios=ASPECT_RATIOS)
        overrides = [f"data.train_annotations={paths['train']}", f"data.train_images={paths['images']}",
                     f"data.max_size={args.image_size}", f"data.short_size={short}", "data.num_workers=0",
                     f"train.batch_size={args.batch_size}"]
        grouped = build_contender("grouped by aspect ratio", True, overrides, args.seed)
        mixed = build_contender("mixed (no grouping)", False, overrides, args.seed)
        contenders = [grouped, mixed]
        num_train = len(training_dataset(load_config(CONFIG, overrides)))
        for round_index in range(args.warmup + args.rounds):
            order = contenders if round_index % 2 == 0 else contenders[::-1]
            for c in order:
                images, seconds, steps, padding, padded, pixels = c.run_epoch(round_index)
                if round_index < args.warmup:
                    continue
                c.epoch_images_per_second.append(images / seconds)
                c.step_seconds += steps
                c.batch_padding += padding
                c.padded_pixels += padded
                c.pixels += pixels
            print(f"round {round_index + 1}/{args.warmup + args.rounds} done", flush=True)

    rows = summarise(contenders, reference=mixed)
    header = {"image_size": args.image_size, "num_train": num_train, "batch_size": args.batch_size,
              "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup, "machine": cpu_facts(),
              "torch": torch.__version__, "python": platform.python_version(), "commit": commit(),
              "uncommitted_changes": uncommitted_changes(), "load_average": list(os.getloadavg())}
    table = markdown(rows, header)
    print(table, end="")
    result = {**header, "args": vars(args), "rows": rows,
              "per_epoch_images_per_second": {c.name: c.epoch_images_per_second for c in contenders},
              "per_step_s": {c.name: c.step_seconds for c in contenders}}
    write_results([args.out, args.results], result, table)


if __name__ == "__main__":
    main()
