"""Training cost of the neighbouring papers' options: seconds per optimisation step of the tiny K-Net with each
option against the plain loss, interleaved step by step in one process.

Two groups, each against its own reference row:

* fine-tuning (``configs/demo/knet_tiny_synthetic.yaml`` on the synthetic train images): the plain set loss,
  IUQ's inter-scene loss alone, its equivariance losses alone (a second forward and backward on the flipped
  image) in both forms, and all three terms (weights 0.3, what ``benchmarks/low_data.py``'s ``sp_iuq`` trains);
* SP pre-training (``configs/demo/knet_tiny_sp_pretrain.yaml``): the default mask losses and FreeSOLO's weak
  ones (``loss.mask_loss=weak``). Its pseudo masks are the synthetic ground-truth masks made class-agnostic and
  its saliency queries random vectors: a step's cost depends on how many masks an image has and on their
  sizes, not on where they came from, and this keeps the benchmark free of a proposal run.

Every contender is built from its config as ``sp-ray finetune`` / ``pretrain`` builds it (dataset,
augmentation, model, objective, AdamW, schedule) and takes one ``train_step`` in turn on the same batch, the
order rotated by one each round, so load from other processes falls on every contender alike. ``--warmup``
untimed rounds first. Reported per contender: the median and p95 step time, images/s from the median, and the
cost relative to the group's reference (its median step time over the contender's: 0.5x = half the images/s).
One torch thread unless ``--threads``.

FreeSOLO's self-training has no per-step cost: it is one more ``sp-ray propose --from-checkpoint`` and one more
pre-training on the new masks.

    python benchmarks/option_cost.py --results benchmarks/results/option_cost
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from results_files import commit, uncommitted_changes, write_results

from sp_ray.config import load_config
from sp_ray.data.coco import read_coco_json
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.machine import cpu_facts
from sp_ray.models import build_model
from sp_ray.objectives import Trainable, build_objective
from sp_ray.pretrain.sp_objective import build_sp_objective
from sp_ray.train.loop import (
    build_train_loader,
    resolve_num_classes,
    seed_everything,
    targets_to,
    train_step,
    training_dataset,
)
from sp_ray.train.optim import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[1]
FINETUNE_CONFIG = ROOT / "configs" / "demo" / "knet_tiny_synthetic.yaml"
PRETRAIN_CONFIG = ROOT / "configs" / "demo" / "knet_tiny_sp_pretrain.yaml"
EQUIVARIANCE = ("iuq.equivariance_mask_weight=0.3", "iuq.equivariance_feature_weight=0.3")
# (group, name, config, overrides); the first row of a group is its reference.
CONTENDERS: tuple[tuple[str, str, Path, tuple[str, ...]], ...] = (
    ("fine-tuning", "plain set loss", FINETUNE_CONFIG, ()),
    ("fine-tuning", "IUQ inter-scene", FINETUNE_CONFIG, ("iuq.inter_scene_weight=0.3",)),
    ("fine-tuning", "IUQ equivariance, ground-truth form", FINETUNE_CONFIG,
     (*EQUIVARIANCE, "iuq.equivariance_target=ground_truth")),
    ("fine-tuning", "IUQ equivariance, consistency form", FINETUNE_CONFIG,
     (*EQUIVARIANCE, "iuq.equivariance_target=consistency")),
    ("fine-tuning", "IUQ, all three terms", FINETUNE_CONFIG, ("iuq.inter_scene_weight=0.3", *EQUIVARIANCE)),
    ("pre-training", "SP, default mask losses", PRETRAIN_CONFIG, ()),
    ("pre-training", "SP, weak mask losses", PRETRAIN_CONFIG, ("loss.mask_loss=weak",)),
)
QUERY_CHANNELS = 512  # C5 of the tiny ResNet-18, what `sp-ray propose` stores per pseudo mask


@dataclass
class Contender:
    group: str
    name: str
    overrides: tuple[str, ...]
    step: Any  # () -> None: one optimisation step on the current batch
    seconds: list[float]


def write_pseudo_masks(train_json: Path, out: Path, seed: int) -> Path:
    """The train json with one class-agnostic category, and a random ``prompts.npy`` beside it (row id - 1)."""
    coco = read_coco_json(train_json)
    out.mkdir(parents=True, exist_ok=True)
    annotations = [{**a, "id": i, "category_id": 1} for i, a in enumerate(coco["annotations"], start=1)]
    path = out / "annotations.json"
    path.write_text(json.dumps({"images": coco["images"], "annotations": annotations,
                                "categories": [{"id": 1, "name": "object"}]}))
    rng = np.random.default_rng(seed)
    np.save(out / "prompts.npy", rng.standard_normal((len(annotations), QUERY_CHANNELS)).astype(np.float32))
    return path


def build_contender(group: str, name: str, config: Path, overrides: tuple[str, ...], data: list[str],
                    batches: list[tuple[torch.Tensor, list[dict[str, torch.Tensor]]]], seed: int) -> Contender:
    cfg = load_config(config, [*data, *overrides])
    dataset = training_dataset(cfg)
    cfg = resolve_num_classes(cfg, dataset)
    seed_everything(seed)
    model = build_model(cfg)
    trainable = Trainable(model, (build_sp_objective if cfg.pretrain.enabled else build_objective)(cfg, model))
    optimizer = build_optimizer(trainable, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, iters_per_epoch=len(build_train_loader(cfg, dataset)))
    position = {"i": 0}
    if not batches:  # the group's reference fills the batches every contender of the group uses
        loader = build_train_loader(cfg, dataset)
        batches.extend((images, targets_to(targets, torch.device("cpu"))) for images, targets in loader)

    def step() -> None:
        images, targets = batches[position["i"] % len(batches)]
        position["i"] += 1
        train_step(trainable, images, targets, optimizer, scheduler, grad_clip=cfg.train.grad_clip)

    return Contender(group, name, overrides, step, [])


def summarise(contenders: list[Contender], batch_size: int) -> list[dict[str, Any]]:
    rows, reference = [], {}
    for c in contenders:
        median = statistics.median(c.seconds)
        reference.setdefault(c.group, median)
        rows.append({"group": c.group, "option": c.name, "overrides": list(c.overrides),
                     "step_s_median": median, "step_s_p95": float(np.percentile(c.seconds, 95)),
                     "images_per_second": batch_size / median, "cost": reference[c.group] / median,
                     "steps_timed": len(c.seconds)})
    return rows


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = [f"Tiny K-Net, {header['image_size']} px, batch {header['batch_size']}, {header['threads']} torch "
             f"thread(s), {header['rounds']} interleaved rounds after {header['warmup']} warm-up; "
             f"{header['machine']['cpu']} ({header['machine']['cores']} cores; {' '.join(header['machine']['isa'])}), "
             f"torch {header['torch']}, Python {header['python']}, commit {header['commit']}.", "",
             "| group | option | step median (s) | step p95 (s) | images/s | relative to the group's first row |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['group']} | {r['option']} | {r['step_s_median']:.3f} | {r['step_s_p95']:.3f} | "
              f"{r['images_per_second']:.1f} | {r['cost']:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds, one step of every contender each")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--num-images", type=int, default=60, help="synthetic images (80%% of them train)")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/option_cost", help="writes OUT.json and OUT.md")
    parser.add_argument("--results", default=None, help="also copy them to this stem (benchmarks/results/...)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_synthetic_dataset(Path(tmp) / "data", num_images=args.num_images,
                                        image_size=args.image_size, seed=args.seed)
        pseudo = write_pseudo_masks(Path(paths["train"]), Path(tmp) / "pseudo", args.seed)
        size = [f"data.max_size={args.image_size}", f"data.short_size={args.image_size}"]
        data = {"fine-tuning": [f"data.train_annotations={paths['train']}", f"data.train_images={paths['images']}"],
                "pre-training": [f"data.train_annotations={pseudo}", f"data.train_images={paths['images']}"]}
        batches: dict[str, list] = {"fine-tuning": [], "pre-training": []}
        contenders = [build_contender(group, name, config, overrides, [*data[group], *size], batches[group],
                                      args.seed) for group, name, config, overrides in CONTENDERS]
        batch_size = load_config(FINETUNE_CONFIG).train.batch_size
        for round_index in range(args.warmup + args.rounds):
            shift = round_index % len(contenders)
            for c in contenders[shift:] + contenders[:shift]:
                start = time.perf_counter()
                c.step()
                if round_index >= args.warmup:
                    c.seconds.append(time.perf_counter() - start)

    rows = summarise(contenders, batch_size)
    header = {"image_size": args.image_size, "batch_size": batch_size, "threads": args.threads,
              "rounds": args.rounds, "warmup": args.warmup, "machine": cpu_facts(), "torch": torch.__version__,
              "python": platform.python_version(), "commit": commit(),
              "uncommitted_changes": uncommitted_changes(),
              "load_average": list(os.getloadavg())}
    table = markdown(rows, header)
    print(table, end="")
    result = {**header, "args": vars(args), "rows": rows,
              "per_step_s": {c.name: c.seconds for c in contenders}}
    write_results([args.out, args.results], result, table)


if __name__ == "__main__":
    main()
