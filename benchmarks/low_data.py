"""Low-data evidence on the synthetic dataset: a query-based model fine-tuned from scratch, from the `sp-ray ssl`
backbone, and from that backbone plus saliency-prompt pre-training (a small reproduction of SP's main table),
compared on paired runs with bootstrap intervals.

The regime follows the paper's: the unlabeled pool that DenseCL, the saliency proposals and SP pre-training
see (the 320 labeled-train images without their labels plus ``--pool-images`` more synthetic images) is much
larger than the labeled fractions (5% and 10% of the 320 train images). No label is used before fine-tuning.
Then every variant is fine-tuned on the same labeled fractions with the same config, epochs and evaluation
schedule; only the initialisation differs:

* ``scratch``: random init;
* ``ssl``: the DenseCL backbone (the paper's DenseCL row);
* ``sp``: ``ssl`` plus ``--init`` from the SP pre-training checkpoint (neck, kernels, heads).

Every variant fine-tunes the whole network with BatchNorm in train mode, the tiny config as it is.

**Protocol.** One seeded run is deterministic on one machine only: another CPU's floating-point order moves
its final AP by several points. So each (fraction, variant) cell runs the crossed design of
``--split-seeds`` (the labeled subset) x ``--train-seeds`` (initialisation, data order, augmentation), and half
of those runs (alternating, ``(split + train) % 2 == 1``) under ``--perturbation``, other arithmetic: by default
``isa_avx2``, the AVX2 kernels of ATen, oneDNN and MKL instead of AVX-512, which is what an AVX2 machine
computes. Runs are paired across variants by (split seed, training seed, arithmetic); the report gives the
mean +- std of each cell, the per-pair differences between initialisations and a bootstrap 95% interval of
their mean (`sp_ray.evaluation.paired_stats`), for the final AP and for the area under the AP curve (mean
val AP over the evaluated epochs). A gap is "above 0" only when its whole interval is.

``--numeric-spread`` first measures what arithmetic alone does to one seeded run (split 0, training seed 0,
largest fraction, ``scratch`` and ``sp``): 2 intra-op threads, ``torch.use_deterministic_algorithms``,
2 data-loader workers, and the AVX2 kernels, each against the 1-thread default.

Variants of the neighbouring papers (``--variants``, each compared with plain ``sp``):

* ``sp_weak``: SP pre-training with FreeSOLO's weak mask losses (``loss.mask_loss=weak``);
* ``sp_selftrain``: one FreeSOLO self-training round: the SP model re-labels the pool
  (``propose --from-checkpoint``) and pre-training continues from it on those masks for another
  ``--pretrain-epochs``, so it has pre-trained twice as long as ``sp``;
* ``sp_continued``: the control of ``sp_selftrain``: SP pre-training continued from the ``sp`` checkpoint for
  the same ``--pretrain-epochs`` (same schedule, same init) on the original saliency pseudo masks; the pair
  ``sp_selftrain - sp_continued`` is what the re-labelling itself buys, ``sp_continued - sp`` what the extra
  pre-training epochs buy;
* ``sp_iuq``: ``sp`` fine-tuned with the instance-unique querying losses (weights 0.3, IUQ's code; the
  equivariance mask term in its ground-truth form, ``iuq.equivariance_target=ground_truth``, the default);
* ``sp_iuq_consistency``: the same with the consistency form of that term (``iuq.equivariance_target=
  consistency``: T(image)'s masks against T(masks of image)); the pair ``sp_iuq - sp_iuq_consistency`` compares
  the two forms;
* ``uplvp``: SP pre-training on CLIP pseudo masks (``propose.proposer=clip``); needs ``--clip-weights``, a
  local open_clip ViT file, as nothing is downloaded.

``--model`` picks the family (tiny configs ``configs/demo/<model>_tiny_*.yaml``); the data, the DenseCL
backbone and the pseudo masks under ``--out`` are shared by every family, the other outputs are prefixed
with the family's name (K-Net's are not).

With several ``--propose-sizes``, proposals are first read from the labeled-train images at each backbone
input size and the size with the best recall@0.5 of their (never trained on) instances proposes on the pool.
Every step skips itself when its output exists, so an interrupted run continues; ``--jobs`` fine-tuning runs
go at once, each in a fresh process (so that its arithmetic settings apply before torch starts).

    python benchmarks/low_data.py --out runs/bench/low_data --numeric-spread
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TITLES = {"knet": "K-Net", "mask2former": "Mask2Former", "queryinst": "QueryInst", "maskrcnn": "Mask R-CNN"}
SSL_CONFIG = ROOT / "configs" / "demo" / "densecl_tiny.yaml"
VARIANTS = ("scratch", "ssl", "sp")
EXTRA_VARIANTS = ("sp_weak", "sp_selftrain", "sp_continued", "sp_iuq", "sp_iuq_consistency", "uplvp")
# variant -> the pre-training its fine-tuning starts from (None: the backbone alone or random init)
PRETRAINING_OF = {"scratch": None, "ssl": None, "sp": "sp", "sp_weak": "sp_weak", "sp_selftrain": "sp_selftrain",
                  "sp_continued": "sp_continued", "sp_iuq": "sp", "sp_iuq_consistency": "sp", "uplvp": "uplvp"}
IUQ_OVERRIDES = ("iuq.inter_scene_weight=0.3", "iuq.equivariance_mask_weight=0.3",
                 "iuq.equivariance_feature_weight=0.3")
# IUQ variant -> its equivariance mask term (iuq.equivariance_target)
IUQ_TARGET_OF = {"sp_iuq": "ground_truth", "sp_iuq_consistency": "consistency"}
TABLE_METRICS = ("AP", "AP50", "AP75", "AUC")
# The comparisons the benchmark makes: (lower, higher) initialisation. Every extra variant is also compared
# with plain sp.
BASE_PAIRS = (("scratch", "ssl"), ("ssl", "sp"), ("scratch", "sp"))
# the self-training round against its control (same pre-training epochs, original pseudo masks); the IUQ forms
EXTRA_PAIRS = (("sp_continued", "sp_selftrain"), ("sp_iuq_consistency", "sp_iuq"))
_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@dataclass(frozen=True)
class Arithmetic:
    """How a fine-tuning process computes: torch threads, environment read at start, determinism, loader."""

    threads: int = 1
    env: tuple[tuple[str, str], ...] = ()
    deterministic: bool = False
    overrides: tuple[str, ...] = ()


ARITHMETIC = {
    "base": Arithmetic(),
    "isa_avx2": Arithmetic(env=tuple(_AVX2.items())),
    "threads2": Arithmetic(threads=2),
    "deterministic": Arithmetic(deterministic=True),
    "loader2": Arithmetic(overrides=("data.num_workers=2",)),
}
NUMERIC_SETTINGS = ("threads2", "deterministic", "loader2", "isa_avx2")


@dataclass(frozen=True)
class RunKey:
    """One fine-tuning run of a cell; runs with the same key but another variant are its pairs."""

    split_seed: int
    train_seed: int
    arithmetic: str

    @property
    def tag(self) -> str:
        suffix = "" if self.arithmetic == "base" else f"_{self.arithmetic}"
        return f"split{self.split_seed}_seed{self.train_seed}{suffix}"


def protocol_runs(split_seeds: list[int], train_seeds: list[int], perturbation: str) -> list[RunKey]:
    """The crossed design: every split seed with every training seed, half of them under ``perturbation``."""
    return [RunKey(s, t, perturbation if (s + t) % 2 else "base") for s in split_seeds for t in train_seeds]


log = logging.getLogger("sp_ray")


def timed(name: str, done: bool, fn, timings: dict[str, float]) -> None:
    if done:
        log.info("[%s] output exists, skipped", name)
        return
    log.info("[%s] running", name)
    start = time.perf_counter()
    fn()
    timings[name] = round(time.perf_counter() - start, 1)
    log.info("[%s] done in %.0f s", name, timings[name])


def write_unlabeled_pool(out: Path, data: Path, pool: Path | None) -> tuple[Path, Path]:
    """A folder of links to every unlabeled image (``labeled_train/`` and ``pool/``) and its ground truth.

    The ground-truth json (file names relative to the folder) only measures the pseudo masks' recall;
    nothing trains on it.
    """
    from sp_ray.data.coco import link_images, read_coco_json

    folder, gt_path = out / "unlabeled", out / "unlabeled_gt.json"
    sources = [("labeled_train", data, ["train.json"])] + ([("pool", pool, ["train.json", "val.json"])] if pool else [])
    merged: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    for prefix, root, jsons in sources:
        for name in jsons:
            link_images(root / name, root / "images", folder / prefix)
            coco = read_coco_json(root / name)
            merged["categories"] = coco["categories"]
            offset = {"image": len(merged["images"]), "ann": len(merged["annotations"])}
            new_ids = {image["id"]: offset["image"] + i + 1 for i, image in enumerate(coco["images"])}
            merged["images"] += [{**image, "id": new_ids[image["id"]], "file_name": f"{prefix}/{image['file_name']}"}
                                 for image in coco["images"]]
            merged["annotations"] += [{**ann, "id": offset["ann"] + i + 1, "image_id": new_ids[ann["image_id"]]}
                                      for i, ann in enumerate(coco["annotations"])]
    gt_path.write_text(json.dumps(merged))
    return folder, gt_path


def prepare(args: argparse.Namespace, out: Path, timings: dict[str, float]) -> dict[str, Any]:
    """Data, splits, unlabeled pool, DenseCL backbone, pseudo masks and SP pre-training; returns their paths."""
    from sp_ray.checkpoint import is_checkpoint
    from sp_ray.config import load_config
    from sp_ray.data.split import split_fractions
    from sp_ray.data.synthetic import write_synthetic_dataset
    from sp_ray.densecl.train import BACKBONE_FILE, train_densecl
    from sp_ray.evaluation.proposal_quality import pseudo_mask_recall
    from sp_ray.pretrain.propose import propose
    from sp_ray.run.commands import scaled_lr_steps
    from sp_ray.train.ray_train import run_training

    data = out / "data"
    timed("synthetic data", (data / "val.json").is_file(), lambda: write_synthetic_dataset(
        data, num_images=args.num_images, image_size=args.image_size, seed=0), timings)
    pool = out / "pool_data" if args.pool_images else None
    if pool is not None:
        # Another seed: other images of the same distribution, like COCO's unlabeled train images.
        timed("unlabeled pool", (pool / "val.json").is_file(), lambda: write_synthetic_dataset(
            pool, num_images=args.pool_images, image_size=args.image_size, seed=1, val_fraction=0.01), timings)
    unlabeled, unlabeled_gt = write_unlabeled_pool(out, data, pool)
    splits = {}
    for seed in args.split_seeds:
        split_dir = out / "splits"
        paths = {f: split_dir / f"train_{f * 100:g}pct_seed{seed}.json" for f in args.fractions}
        timed(f"splits seed {seed}", all(p.is_file() for p in paths.values()),
              lambda seed=seed, split_dir=split_dir: split_fractions(
                  data / "train.json", args.fractions, seed=seed, out_dir=split_dir), timings)
        splits[seed] = paths

    ssl_dir = out / "ssl"
    backbone = ssl_dir / "final" / BACKBONE_FILE
    ssl_cfg = load_config(SSL_CONFIG, [f"ssl.epochs={args.ssl_epochs}", *args.ssl_override])
    timed("DenseCL on the unlabeled pool", backbone.is_file(),
          lambda: train_densecl(ssl_cfg, unlabeled, ssl_dir), timings)

    def propose_overrides(size: int) -> list[str]:
        return ["model.depth=18", f"model.backbone_weights={backbone}", "propose.keep_ratio=false",
                f"propose.max_size={size}", f"propose.short_size={size}", "propose.num_actors=1",
                *args.propose_override]

    def proposals(name: str, images: Path, pseudo_dir: Path, gt: Path, extra: list[str],
                  image_root: Path | None = None, from_checkpoint: Path | None = None) -> dict:
        summary = pseudo_dir / "summary.json"
        cfg = load_config(None, extra)
        timed(f"{name} pseudo masks", summary.is_file(), lambda: summary.write_text(json.dumps(propose(
            images, pseudo_dir, cfg, image_root=image_root, from_checkpoint=from_checkpoint), indent=2)), timings)
        done = json.loads(summary.read_text())
        recall = pseudo_mask_recall(pseudo_dir / "annotations.json", gt, thresholds=(0.5, 0.75))
        return {"pseudo_masks": done["annotations"], "images": done["images"], "images_per_s": done["images_per_s"],
                "instances": recall.instances, "mean_best_iou": recall.mean_best_iou,
                **{f"recall@{t:g}": v for t, v in recall.recall.items()}}

    quality: dict[str, dict] = {}
    propose_size = args.propose_sizes[0]
    if len(args.propose_sizes) > 1:
        for size in args.propose_sizes:
            quality[f"labeled train at {size} px"] = proposals(
                f"{size} px probe", data / "train.json", out / f"propose_probe_{size}", data / "train.json",
                propose_overrides(size), image_root=data / "images")
        propose_size = max(args.propose_sizes, key=lambda s: (quality[f"labeled train at {s} px"]["recall@0.5"],
                                                          quality[f"labeled train at {s} px"]["mean_best_iou"]))
        log.info("proposing on the pool at %d px (best recall@0.5 of the probe)", propose_size)
    quality["saliency"] = proposals("saliency", unlabeled, out / "pseudo", unlabeled_gt,
                                    propose_overrides(propose_size))

    def pretrain(name: str, pseudo_dir: Path, extra: list[str], init: Path | None = None) -> Path:
        work = out / f"{family_prefix(args)}{name}_pretrain"
        config = config_path(args.model, "sp_pretrain")
        cfg = load_config(config, [
            f"data.train_annotations={pseudo_dir / 'annotations.json'}", f"data.train_images={unlabeled}",
            f"model.backbone_weights={backbone}", f"train.epochs={args.pretrain_epochs}",
            scaled_lr_steps(config, args.pretrain_epochs), f"train.num_workers={args.pretrain_workers}",
            *extra, *args.pretrain_override,
        ])
        timed(f"{name} pre-training", is_checkpoint(work / "final"),
              lambda: run_training(cfg, work, init=init, run_name=f"{work.name}-{int(time.time())}",
                                   task="pretrain"), timings)
        return work / "final"

    wanted = {PRETRAINING_OF[v] for v in args.variants} - {None}
    checkpoints: dict[str, Path] = {}
    if wanted & {"sp", "sp_selftrain", "sp_continued"}:
        checkpoints["sp"] = pretrain("sp", out / "pseudo", [])
    if "sp_weak" in wanted:
        checkpoints["sp_weak"] = pretrain("sp_weak", out / "pseudo", ["loss.mask_loss=weak"])
    if "sp_selftrain" in wanted:
        quality["self-training round 1"] = proposals(
            "selftrain", unlabeled, out / f"{family_prefix(args)}pseudo_selftrain", unlabeled_gt,
            propose_overrides(propose_size), from_checkpoint=checkpoints["sp"])
        checkpoints["sp_selftrain"] = pretrain(
            "sp_selftrain", out / f"{family_prefix(args)}pseudo_selftrain", [], init=checkpoints["sp"])
    if "sp_continued" in wanted:
        # The control of the self-training round: as many more epochs from the same checkpoint, the old masks.
        checkpoints["sp_continued"] = pretrain("sp_continued", out / "pseudo", [], init=checkpoints["sp"])
    if "uplvp" in wanted:
        if not args.clip_weights:
            raise SystemExit("the uplvp variant needs --clip-weights: a local open_clip ViT state dict")
        quality["clip"] = proposals("clip", unlabeled, out / "pseudo_clip", unlabeled_gt, [
            *propose_overrides(propose_size), "propose.proposer=clip", f"clip.model={args.clip_model}",
            f"clip.weights={args.clip_weights}"])
        checkpoints["uplvp"] = pretrain("uplvp", out / "pseudo_clip", [])
    pool_sizes = {"labeled_train": len(json.loads((data / "train.json").read_text())["images"]),
                  "unlabeled_pool": len(json.loads(unlabeled_gt.read_text())["images"])}
    return {"data": data, "splits": splits, "backbone": backbone, "checkpoints": checkpoints,
            "proposal_quality": quality, "propose_size": propose_size, "sizes": pool_sizes}


def finetune_overrides(args: argparse.Namespace, variant: str, labeled: Path, data: Path, seed: int,
                       backbone: Path) -> list[str]:
    overrides = [
        f"data.train_annotations={labeled}", f"data.train_images={data / 'images'}",
        f"data.val_annotations={data / 'val.json'}", f"data.val_images={data / 'images'}",
        f"train.epochs={args.epochs}", f"train.eval_interval={args.eval_every}", f"train.seed={seed}",
        "train.checkpoint_interval=0", *args.finetune_override,
    ]
    if variant != "scratch":
        overrides.append(f"model.backbone_weights={backbone}")
    if variant in IUQ_TARGET_OF:
        overrides += [*IUQ_OVERRIDES, f"iuq.equivariance_target={IUQ_TARGET_OF[variant]}"]
    return overrides


def config_path(model: str, kind: str) -> Path:
    """The tiny demo config of a family: kind "synthetic" (fine-tuning) or "sp_pretrain"."""
    return ROOT / "configs" / "demo" / f"{model}_tiny_{kind}.yaml"


def family_prefix(args: argparse.Namespace) -> str:
    return "" if args.model == "knet" else f"{args.model}_"


def run_finetune(job: dict[str, Any]) -> str:
    """One fine-tuning run in a fresh process, under the arithmetic ``job["arithmetic"]`` names.

    The environment (thread counts, kernel ISA) is set before torch is imported, as the libraries read it
    once at start.
    """
    arithmetic = ARITHMETIC[job["arithmetic"]]
    threads = str(arithmetic.threads)
    os.environ.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **dict(arithmetic.env)})
    import torch

    from sp_ray.checkpoint import is_checkpoint
    from sp_ray.config import load_config
    from sp_ray.train.loop import fit

    torch.set_num_threads(arithmetic.threads)
    torch.use_deterministic_algorithms(arithmetic.deterministic)
    logging.basicConfig(level=logging.WARNING)
    work_dir = Path(job["work_dir"])
    if not is_checkpoint(work_dir / "final"):
        (work_dir / "metrics.jsonl").unlink(missing_ok=True)  # an interrupted run starts over
        cfg = load_config(config_path(job["model"], "synthetic"), [*job["overrides"], *arithmetic.overrides])
        fit(cfg, work_dir, init=job["init"])
        (work_dir / "arithmetic.json").write_text(json.dumps({
            "name": job["arithmetic"], "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "deterministic": arithmetic.deterministic,
            "env": dict(arithmetic.env), "overrides": list(arithmetic.overrides)}))
    return str(work_dir)


def read_curve(work_dir: Path) -> list[dict[str, float]]:
    """(epoch, segm AP, AP50, AP75) of every evaluated epoch of a run."""
    lines = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"epoch": m["epoch"], **{k: m[f"segm_{k}"] for k in TABLE_METRICS if k != "AUC"}}
            for m in lines if "segm_AP" in m]


def curve_area(curve: list[dict[str, float]]) -> float:
    """Mean val AP over the fine-tuning epochs: the trapezoid area under the AP curve / its epoch span."""
    if len(curve) == 1:
        return curve[0]["AP"]
    area = sum((b["epoch"] - a["epoch"]) * (a["AP"] + b["AP"]) / 2 for a, b in zip(curve, curve[1:], strict=False))
    return area / (curve[-1]["epoch"] - curve[0]["epoch"])


def final_values(curve: list[dict[str, float]]) -> dict[str, float]:
    return {**{k: curve[-1][k] for k in TABLE_METRICS if k != "AUC"}, "AUC": curve_area(curve)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: dict[tuple[str, float, RunKey], list[dict[str, float]]], keys: list[RunKey],
              args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for fraction in args.fractions:
        for variant in args.variants:
            finals = [final_values(runs[(variant, fraction, key)]) for key in keys]
            row: dict[str, Any] = {"fraction": fraction, "variant": variant, "runs": [key.tag for key in keys]}
            for metric in TABLE_METRICS:
                row[metric], row[f"{metric}_std"] = mean_std([f[metric] for f in finals])
                row[f"{metric}_per_run"] = [f[metric] for f in finals]
            for arithmetic in sorted({key.arithmetic for key in keys}):
                row[f"AP_mean_{arithmetic}"] = statistics.fmean(
                    f["AP"] for f, key in zip(finals, keys, strict=True) if key.arithmetic == arithmetic)
            table[f"{variant}@{fraction:g}"] = row
    return table


def comparisons(table: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Paired differences (final AP and curve area) of every compared pair of initialisations."""
    from sp_ray.evaluation.paired_stats import paired_difference

    pairs = list(BASE_PAIRS) + [("sp", v) for v in args.variants if v in EXTRA_VARIANTS] + list(EXTRA_PAIRS)
    found = []
    for fraction in args.fractions:
        for low_name, high_name in pairs:
            if low_name not in args.variants or high_name not in args.variants:
                continue
            low, high = table[f"{low_name}@{fraction:g}"], table[f"{high_name}@{fraction:g}"]
            found.append({"fraction": fraction, "high": high_name, "low": low_name, **{
                metric: paired_difference(high[f"{metric}_per_run"], low[f"{metric}_per_run"]).as_dict()
                for metric in ("AP", "AUC")}})
    return found


def comparison_line(c: dict[str, Any]) -> str:
    parts = [f"{c['fraction']:.0%}: {c['high']} - {c['low']}:"]
    for metric, name in (("AP", "final AP"), ("AUC", "AP-curve area")):
        d = c[metric]
        parts.append(f"{name} {d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] "
                     f"({d['pairs_won']}/{d['n']} pairs won, interval {d['verdict']});")
    return " ".join(parts).rstrip(";")


def numeric_spread(runs: dict[tuple[str, float, RunKey], list[dict[str, float]]], variants: list[str],
                   fraction: float) -> dict[str, Any]:
    """Final AP and curve area of one seeded run under each arithmetic, and their spread per variant."""
    result: dict[str, Any] = {"fraction": fraction, "run": "split0_seed0", "variants": {}}
    for variant in variants:
        settings = {name: final_values(runs[(variant, fraction, RunKey(0, 0, name))])
                    for name in ("base", *NUMERIC_SETTINGS)}
        aps = [v["AP"] for v in settings.values()]
        result["variants"][variant] = {"settings": settings, "AP_std": statistics.stdev(aps),
                                       "AP_range": max(aps) - min(aps)}
    return result


def plot_curves(runs: dict[tuple[str, float, RunKey], list[dict[str, float]]], keys: list[RunKey],
                args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(args.fractions), figsize=(5 * len(args.fractions), 3.8), squeeze=False)
    for ax, fraction in zip(axes[0], args.fractions, strict=True):
        for variant in args.variants:
            curves = [runs[(variant, fraction, key)] for key in keys]
            epochs = [point["epoch"] for point in curves[0]]
            values = np.array([[point["AP"] for point in curve] for curve in curves])
            mean, std = values.mean(0), values.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(epochs))
            ax.plot(epochs, mean, marker="o", label=variant)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        ax.set_title(f"{fraction:.0%} labels ({len(keys)} runs, mean +- std)")
        ax.set_xlabel("fine-tuning epoch")
        ax.set_ylabel("val segm AP")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict[str, Any]:
    import torch

    from sp_ray.machine import cpu_name, isa_flags

    return {"cpu": cpu_name(), "isa": isa_flags(), "cores": os.cpu_count(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def report_lines(args: argparse.Namespace, prep: dict[str, Any], table: dict[str, dict[str, Any]],
                 compared: list[dict[str, Any]], spread: dict[str, Any] | None, keys: list[RunKey],
                 timings: dict[str, float], host: dict[str, Any]) -> list[str]:
    sizes = prep["sizes"]
    lines = [
        f"{TITLES[args.model]} (tiny) on the synthetic dataset ({args.image_size} px): {sizes['labeled_train']} "
        f"labeled-train images, an unlabeled pool of {sizes['unlabeled_pool']} for DenseCL "
        f"({args.ssl_epochs} epochs), proposals ({prep['propose_size']} px) and SP pre-training "
        f"({args.pretrain_epochs} epochs); val segm AP after {args.epochs} fine-tuning epochs and the AP-curve "
        f"area (mean AP over the evaluated epochs); mean +- std over {len(keys)} runs "
        f"({', '.join(key.tag for key in keys)})",
        f"machine: {host['cpu']} ({host['cores']} cores, torch {host['torch']}, {host['cpu_capability']}; "
        f"ISA {' '.join(host['isa'])})", "",
        "| labels | init | AP | AP50 | AP75 | AP-curve area | AP per run |", "|---|---|---|---|---|---|---|",
    ]
    for row in table.values():
        cells = " | ".join(f"{row[m]:.2f} +- {row[f'{m}_std']:.2f}" for m in TABLE_METRICS)
        lines.append(f"| {row['fraction']:.0%} | {row['variant']} | {cells} | "
                     f"{', '.join(f'{ap:.2f}' for ap in row['AP_per_run'])} |")
    lines += ["", "Paired differences (mean [bootstrap 95% interval]):", *(comparison_line(c) for c in compared)]
    if spread is not None:
        lines += ["", f"Numeric spread: one seeded run ({spread['run']}, {spread['fraction']:.0%} labels) under "
                  "other arithmetic, final segm AP (curve area)", "",
                  "| init | " + " | ".join(("base", *NUMERIC_SETTINGS)) + " | std | range |",
                  "|---|" + "---|" * (len(NUMERIC_SETTINGS) + 3)]
        for variant, found in spread["variants"].items():
            cells = " | ".join(f"{v['AP']:.2f} ({v['AUC']:.2f})" for v in found["settings"].values())
            lines.append(f"| {variant} | {cells} | {found['AP_std']:.2f} | {found['AP_range']:.2f} |")
    lines += ["", "| pseudo masks | images | masks | recall@0.5 | recall@0.75 | mean best IoU | images/s |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {q['images']} | {q['pseudo_masks']} | {q['recall@0.5']:.3f} | {q['recall@0.75']:.3f} | "
              f"{q['mean_best_iou']:.3f} | {q['images_per_s'] or 0:.1f} |"
              for name, q in prep["proposal_quality"].items()]
    lines += ["", "recall of the ground-truth instances (never used for training) by the pseudo masks",
              "step times (s): " + ", ".join(f"{name} {sec:.0f}" for name, sec in timings.items())]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench/low_data")
    parser.add_argument("--num-images", type=int, default=400, help="labeled synthetic images, 20%% of them val")
    parser.add_argument("--pool-images", type=int, default=2000,
                        help="extra unlabeled synthetic images (another seed) added to the labeled-train images")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2], help="labeled-subset seeds")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1], help="training seeds, crossed")
    parser.add_argument("--perturbation", choices=sorted(set(ARITHMETIC) - {"base"}), default="isa_avx2",
                        help="the other arithmetic of half the runs")
    parser.add_argument("--numeric-spread", action="store_true",
                        help="also run split 0 / seed 0 under each arithmetic setting (scratch and sp)")
    parser.add_argument("--epochs", type=int, default=40, help="fine-tuning epochs of every run")
    parser.add_argument("--eval-every", type=int, default=5, help="epochs between val evaluations")
    parser.add_argument("--ssl-epochs", type=int, default=4, help="DenseCL epochs over the unlabeled pool")
    parser.add_argument("--pretrain-epochs", type=int, default=3, help="SP pre-training epochs over the pool")
    parser.add_argument("--pretrain-workers", type=int, default=2, help="Ray Train workers of SP pre-training")
    parser.add_argument("--propose-sizes", type=int, nargs="+", default=[320, 512],
                        help="backbone input sides of propose; several: the best recall@0.5 on labeled train wins")
    parser.add_argument("--jobs", type=int, default=2, help="fine-tuning runs at once (one thread each)")
    parser.add_argument("--model", choices=sorted(TITLES), default="knet", help="model family (its tiny demo configs)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + EXTRA_VARIANTS)
    parser.add_argument("--clip-weights", help="local open_clip weights of --clip-model (uplvp variant)")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip ViT config name (uplvp variant)")
    for step in ("ssl", "propose", "pretrain", "finetune"):
        parser.add_argument(f"--{step}-override", nargs="*", default=[], help=f"dotted overrides of the {step} config")
    parser.add_argument("--results", help="also copy the .md/.json/.png to this stem (e.g. benchmarks/results/x)")
    args = parser.parse_args()
    if args.model == "maskrcnn" and any(PRETRAINING_OF[v] for v in args.variants):
        parser.error("Mask R-CNN has no queries to prompt: use --variants scratch ssl")
    if args.numeric_spread and not {"scratch", "sp"} <= set(args.variants):
        parser.error("--numeric-spread measures the scratch and sp runs: include both in --variants")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    prep = prepare(args, out, timings)

    keys = protocol_runs(args.split_seeds, args.train_seeds, args.perturbation)
    wanted = [(variant, fraction, key) for fraction in args.fractions for key in keys for variant in args.variants]
    if args.numeric_spread:
        wanted += [(variant, max(args.fractions), RunKey(0, 0, name)) for name in ("base", *NUMERIC_SETTINGS)
                   for variant in ("scratch", "sp")]
    jobs: dict[tuple[str, float, RunKey], dict[str, Any]] = {}
    for variant, fraction, key in wanted:
        pretraining = PRETRAINING_OF[variant]
        jobs[(variant, fraction, key)] = {
            "work_dir": str(out / "finetune" / f"{family_prefix(args)}{variant}_{fraction * 100:g}pct_{key.tag}"),
            "model": args.model, "arithmetic": key.arithmetic,
            "overrides": finetune_overrides(args, variant, prep["splits"][key.split_seed][fraction], prep["data"],
                                            key.train_seed, prep["backbone"]),
            "init": str(prep["checkpoints"][pretraining]) if pretraining else None,
        }
    finetune_start = time.perf_counter()
    # spawn and one task per process: each run's arithmetic (env, threads) applies before torch loads
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        for done in pool.map(run_finetune, jobs.values()):
            log.info("fine-tuned %s", done)
    timings["fine-tuning runs"] = round(time.perf_counter() - finetune_start, 1)
    runs = {key: read_curve(Path(job["work_dir"])) for key, job in jobs.items()}

    table = summarise(runs, keys, args)
    compared = comparisons(table, args)
    spread = numeric_spread(runs, ["scratch", "sp"], max(args.fractions)) if args.numeric_spread else None
    host = machine()
    report = "\n".join(report_lines(args, prep, table, compared, spread, keys, timings, host))
    print("\n" + report)
    stem = out / f"low_data{'' if args.model == 'knet' else '_' + args.model}"
    plot_curves(runs, keys, args, stem.with_suffix(".png"))
    stem.with_suffix(".md").write_text(report + "\n")
    stem.with_suffix(".json").write_text(json.dumps({
        "args": vars(args), "machine": host, "sizes": prep["sizes"], "propose_size": prep["propose_size"],
        "runs": [key.__dict__ | {"tag": key.tag} for key in keys], "table": table, "comparisons": compared,
        "numeric_spread": spread, "proposal_quality": prep["proposal_quality"],
        "curves": {f"{v}@{f:g}/{k.tag}": curve for (v, f, k), curve in runs.items()},
        "timings_s": timings, "wall_s": round(time.perf_counter() - start, 1),
    }, indent=2))
    written = [stem.with_suffix(s) for s in (".md", ".json", ".png")]
    if args.results:
        results = Path(args.results)
        results.parent.mkdir(parents=True, exist_ok=True)
        for path in list(written):
            results.with_suffix(path.suffix).write_bytes(path.read_bytes())
            written.append(results.with_suffix(path.suffix))
    print(f"written: {', '.join(str(p) for p in written)}")


if __name__ == "__main__":
    main()
