"""Low-data evidence on the synthetic dataset: K-Net fine-tuned from scratch, from the `sp-ray ssl` backbone,
and from that backbone plus saliency-prompt pre-training (a small reproduction of SP's main table).

No label is used before fine-tuning: DenseCL trains on the train images, ``propose`` reads pseudo masks
from them with the DenseCL backbone, and SP pre-training learns from those pseudo masks. Then every
variant is fine-tuned on the same labeled fractions (nested splits, one per seed) with the same config,
epochs and evaluation schedule; only the initialisation differs:

* ``scratch``: random init;
* ``ssl``: the DenseCL backbone (the paper's DenseCL row);
* ``sp``: ``ssl`` plus ``--init`` from the SP pre-training checkpoint (neck, kernels, heads).

Every variant fine-tunes the whole network with BatchNorm in train mode, the tiny config as it is: DenseCL's
own detection transfer fine-tunes with trained (synchronised) BatchNorm, and freezing the stem, layer1 and
the BatchNorm statistics of a backbone that saw 400 steps of DenseCL on 320 images held the ssl row back
(by 4 AP at 10% labels) without helping sp.

Variants of the neighbouring papers (``--variants``, each beside plain ``sp``):

* ``sp_weak``: SP pre-training with FreeSOLO's weak mask losses (``loss.mask_loss=weak``);
* ``sp_selftrain``: one FreeSOLO self-training round: the SP model re-labels the train images
  (``propose --from-checkpoint``) and pre-training continues from it on those masks;
* ``sp_iuq``: ``sp`` fine-tuned with the instance-unique querying losses (weights 0.3, IUQ's code);
* ``uplvp``: SP pre-training on CLIP pseudo masks (``propose.proposer=clip``); needs ``--clip-weights``, a
  local open_clip ViT file, as nothing is downloaded.

``--model`` picks the family (tiny configs ``configs/demo/<model>_tiny_*.yaml``); the data, the DenseCL
backbone and the pseudo masks under ``--out`` are shared by every family, the other outputs are prefixed
with the family's name (K-Net's are not).

Each fine-tuning run evaluates val segm AP every ``--eval-every`` epochs (the curves of the PNG) and
after the last epoch (the table). Every step skips itself when its output exists, so an interrupted
run continues; ``--jobs 2`` runs two fine-tunings at once with one torch thread each.

    python benchmarks/low_data.py --out runs/bench/low_data
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TITLES = {"knet": "K-Net", "mask2former": "Mask2Former", "queryinst": "QueryInst", "maskrcnn": "Mask R-CNN"}
SSL_CONFIG = ROOT / "configs" / "demo" / "densecl_tiny.yaml"
VARIANTS = ("scratch", "ssl", "sp")
EXTRA_VARIANTS = ("sp_weak", "sp_selftrain", "sp_iuq", "uplvp")
# variant -> the pre-training its fine-tuning starts from (None: the backbone alone or random init)
PRETRAINING_OF = {"scratch": None, "ssl": None, "sp": "sp", "sp_weak": "sp_weak", "sp_selftrain": "sp_selftrain",
                  "sp_iuq": "sp", "uplvp": "uplvp"}
IUQ_OVERRIDES = ("iuq.inter_scene_weight=0.3", "iuq.equivariance_mask_weight=0.3",
                 "iuq.equivariance_feature_weight=0.3")
TABLE_METRICS = ("AP", "AP50", "AP75")

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


def prepare(args: argparse.Namespace, out: Path, timings: dict[str, float]) -> dict[str, Any]:
    """Data, splits, DenseCL backbone, pseudo masks and SP pre-training; returns their paths."""
    from sp_ray.config import load_config
    from sp_ray.data.images import link_images
    from sp_ray.data.split import split_fractions
    from sp_ray.data.synthetic import write_synthetic_dataset
    from sp_ray.evaluation.proposal_quality import pseudo_mask_recall
    from sp_ray.pretrain.propose import propose
    from sp_ray.pretrain.ssl_train import BACKBONE_FILE, train_densecl
    from sp_ray.train.checkpoint import is_checkpoint
    from sp_ray.train.loop import fit

    data = out / "data"
    timed("synthetic data", (data / "val.json").is_file(), lambda: write_synthetic_dataset(
        data, num_images=args.num_images, image_size=args.image_size, seed=0), timings)
    splits = {}
    for seed in args.seeds:
        split_dir = out / "splits"
        paths = {f: split_dir / f"train_{f * 100:g}pct_seed{seed}.json" for f in args.fractions}
        timed(f"splits seed {seed}", all(p.is_file() for p in paths.values()),
              lambda seed=seed, split_dir=split_dir: split_fractions(
                  data / "train.json", args.fractions, seed=seed, out_dir=split_dir), timings)
        splits[seed] = paths

    ssl_dir = out / "ssl"
    backbone = ssl_dir / "final" / BACKBONE_FILE
    ssl_cfg = load_config(SSL_CONFIG, [f"ssl.epochs={args.ssl_epochs}", *args.ssl_override])
    train_images = link_images(data / "train.json", data / "images", out / "train_images")
    timed("DenseCL on the train images", backbone.is_file(),
          lambda: train_densecl(ssl_cfg, train_images, ssl_dir), timings)

    propose_overrides = [
        "model.depth=18", f"model.backbone_weights={backbone}", "propose.keep_ratio=false",
        f"propose.max_size={args.propose_size}", f"propose.short_size={args.propose_size}",
        "propose.num_actors=1", *args.propose_override,
    ]

    def pretrain(name: str, pseudo_dir: Path, extra: list[str], init: Path | None = None) -> Path:
        work = out / f"{family_prefix(args)}{name}_pretrain"
        cfg = load_config(config_path(args.model, "sp_pretrain"), [
            f"data.train_annotations={pseudo_dir / 'annotations.json'}", f"data.train_images={data / 'images'}",
            f"model.backbone_weights={backbone}", f"train.epochs={args.pretrain_epochs}", *extra,
            *args.pretrain_override,
        ])
        timed(f"{name} pre-training", is_checkpoint(work / "final"), lambda: fit(cfg, work, init=init), timings)
        return work / "final"

    def proposals(name: str, pseudo_dir: Path, extra: list[str], from_checkpoint: Path | None = None) -> dict:
        summary = pseudo_dir / "summary.json"
        cfg = load_config(None, [*propose_overrides, *extra])
        timed(f"{name} pseudo masks", summary.is_file(), lambda: summary.write_text(json.dumps(propose(
            data / "train.json", pseudo_dir, cfg, image_root=data / "images", from_checkpoint=from_checkpoint),
            indent=2)), timings)
        recall = pseudo_mask_recall(pseudo_dir / "annotations.json", data / "train.json", thresholds=(0.5, 0.75))
        return {"pseudo_masks": json.loads(summary.read_text())["annotations"], "instances": recall.instances,
                "mean_best_iou": recall.mean_best_iou, **{f"recall@{t:g}": v for t, v in recall.recall.items()}}

    wanted = {PRETRAINING_OF[v] for v in args.variants} - {None}
    checkpoints: dict[str, Path] = {}
    quality = {"saliency": proposals("saliency", out / "pseudo", [])}
    if wanted & {"sp", "sp_iuq", "sp_selftrain"}:
        checkpoints["sp"] = pretrain("sp", out / "pseudo", [])
    if "sp_weak" in wanted:
        checkpoints["sp_weak"] = pretrain("sp_weak", out / "pseudo", ["loss.mask_loss=weak"])
    if "sp_selftrain" in wanted:
        quality["self-training round 1"] = proposals("selftrain", out / "pseudo_selftrain", [],
                                                      from_checkpoint=checkpoints["sp"])
        checkpoints["sp_selftrain"] = pretrain("sp_selftrain", out / "pseudo_selftrain", [], init=checkpoints["sp"])
    if "uplvp" in wanted:
        if not args.clip_weights:
            raise SystemExit("the uplvp variant needs --clip-weights: a local open_clip ViT state dict")
        quality["clip"] = proposals("clip", out / "pseudo_clip", [
            "propose.proposer=clip", f"clip.model={args.clip_model}", f"clip.weights={args.clip_weights}"])
        checkpoints["uplvp"] = pretrain("uplvp", out / "pseudo_clip", [])
    return {"data": data, "splits": splits, "backbone": backbone, "checkpoints": checkpoints,
            "proposal_quality": quality}


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
    if variant == "sp_iuq":
        overrides += list(IUQ_OVERRIDES)
    return overrides


def config_path(model: str, kind: str) -> Path:
    """The tiny demo config of a family: kind "synthetic" (fine-tuning) or "sp_pretrain"."""
    return ROOT / "configs" / "demo" / f"{model}_tiny_{kind}.yaml"


def family_prefix(args: argparse.Namespace) -> str:
    return "" if args.model == "knet" else f"{args.model}_"


def run_finetune(job: dict[str, Any]) -> str:
    """One fine-tuning run in its own process (``--jobs``), with ``job["threads"]`` torch threads."""
    import torch

    from sp_ray.config import load_config
    from sp_ray.train.checkpoint import is_checkpoint
    from sp_ray.train.loop import fit

    torch.set_num_threads(job["threads"])
    logging.basicConfig(level=logging.WARNING)
    work_dir = Path(job["work_dir"])
    if not is_checkpoint(work_dir / "final"):
        (work_dir / "metrics.jsonl").unlink(missing_ok=True)  # an interrupted run starts over
        cfg = load_config(config_path(job["model"], "synthetic"), job["overrides"])
        fit(cfg, work_dir, init=job["init"])
    return str(work_dir)


def read_curve(work_dir: Path) -> list[dict[str, float]]:
    """(epoch, segm AP, AP50, AP75) of every evaluated epoch of a run."""
    lines = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"epoch": m["epoch"], **{k: m[f"segm_{k}"] for k in TABLE_METRICS}} for m in lines if "segm_AP" in m]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: dict[tuple[str, float, int], list[dict[str, float]]], args: argparse.Namespace) -> dict:
    table: dict[str, dict[str, Any]] = {}
    for fraction in args.fractions:
        for variant in args.variants:
            finals = [runs[(variant, fraction, seed)][-1] for seed in args.seeds]
            row = {"fraction": fraction, "variant": variant, "seeds": list(args.seeds)}
            for metric in TABLE_METRICS:
                row[metric], row[f"{metric}_std"] = mean_std([f[metric] for f in finals])
            row["AP_per_seed"] = [f["AP"] for f in finals]
            table[f"{variant}@{fraction:g}"] = row
    return table


def target_check(table: dict[str, dict[str, Any]], fractions: list[float], variants: list[str]) -> list[str]:
    """The issue's target: sp > ssl > scratch at every fraction, each gap above the larger seed std; every
    other variant is compared with sp."""
    pairs = [("scratch", "ssl"), ("ssl", "sp")] + [("sp", v) for v in variants if v in EXTRA_VARIANTS]
    lines = []
    for fraction in fractions:
        for low_name, high_name in pairs:
            if low_name not in variants or high_name not in variants:
                continue
            low, high = table[f"{low_name}@{fraction:g}"], table[f"{high_name}@{fraction:g}"]
            gap = high["AP"] - low["AP"]
            spread = max(low["AP_std"], high["AP_std"])
            verdict = "above by more than the spread" if gap > spread else "NOT above by more than the spread"
            lines.append(f"{fraction:.0%}: {high['variant']} - {low['variant']} = {gap:+.2f} AP "
                         f"(seed std {spread:.2f}): {verdict}")
    return lines


def plot_curves(runs: dict[tuple[str, float, int], list[dict[str, float]]], args: argparse.Namespace,
                path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(args.fractions), figsize=(5 * len(args.fractions), 3.8), squeeze=False)
    for ax, fraction in zip(axes[0], args.fractions, strict=True):
        for variant in args.variants:
            curves = [runs[(variant, fraction, seed)] for seed in args.seeds]
            epochs = [point["epoch"] for point in curves[0]]
            values = np.array([[point["AP"] for point in curve] for curve in curves])
            mean, std = values.mean(0), values.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(epochs))
            ax.plot(epochs, mean, marker="o", label=variant)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        ax.set_title(f"{fraction:.0%} labels ({len(args.seeds)} seeds, mean +- std)")
        ax.set_xlabel("fine-tuning epoch")
        ax.set_ylabel("val segm AP")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench/low_data")
    parser.add_argument("--num-images", type=int, default=400, help="synthetic images, 20%% of them val")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split and training seeds")
    parser.add_argument("--epochs", type=int, default=40, help="fine-tuning epochs of every run")
    parser.add_argument("--eval-every", type=int, default=5, help="epochs between val evaluations")
    parser.add_argument("--ssl-epochs", type=int, default=20)
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    parser.add_argument("--propose-size", type=int, default=512, help="backbone input side of propose (C5 16x16)")
    parser.add_argument("--jobs", type=int, default=2, help="fine-tuning runs at once (one thread each)")
    parser.add_argument("--model", choices=sorted(TITLES), default="knet", help="model family (its tiny demo configs)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + EXTRA_VARIANTS)
    parser.add_argument("--clip-weights", help="local open_clip weights of --clip-model (uplvp variant)")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip ViT config name (uplvp variant)")
    for step in ("ssl", "propose", "pretrain", "finetune"):
        parser.add_argument(f"--{step}-override", nargs="*", default=[], help=f"dotted overrides of the {step} config")
    args = parser.parse_args()
    if args.model == "maskrcnn" and any(PRETRAINING_OF[v] for v in args.variants):
        parser.error("Mask R-CNN has no queries to prompt: use --variants scratch ssl")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    prep = prepare(args, out, timings)

    jobs, keys = [], []
    for fraction in args.fractions:
        for seed in args.seeds:
            for variant in args.variants:
                labeled = prep["splits"][seed][fraction]
                pretraining = PRETRAINING_OF[variant]
                jobs.append({
                    "work_dir": str(out / "finetune" / (
                        f"{family_prefix(args)}{variant}_{fraction * 100:g}pct_seed{seed}")),
                    "model": args.model,
                    "overrides": finetune_overrides(args, variant, labeled, prep["data"], seed, prep["backbone"]),
                    "init": str(prep["checkpoints"][pretraining]) if pretraining else None,
                    # One job: OMP_NUM_THREADS if set, else every core; several jobs: one thread each.
                    "threads": 1 if args.jobs > 1 else int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
                })
                keys.append((variant, fraction, seed))
    finetune_start = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for done in pool.map(run_finetune, jobs):
                log.info("fine-tuned %s", done)
    else:
        for job in jobs:
            run_finetune(job)
    timings["fine-tuning runs"] = round(time.perf_counter() - finetune_start, 1)
    runs = {key: read_curve(Path(job["work_dir"])) for key, job in zip(keys, jobs, strict=True)}

    table = summarise(runs, args)
    lines = [
        f"{TITLES[args.model]} (tiny) on the synthetic dataset ({args.num_images} images, {args.image_size} px), "
        f"val segm AP after {args.epochs} fine-tuning epochs; mean +- std over seeds {args.seeds}", "",
        "| labels | init | AP | AP50 | AP75 | AP per seed |", "|---|---|---|---|---|---|",
    ]
    for row in table.values():
        cells = " | ".join(f"{row[m]:.2f} +- {row[f'{m}_std']:.2f}" for m in TABLE_METRICS)
        lines.append(f"| {row['fraction']:.0%} | {row['variant']} | {cells} | "
                     f"{', '.join(f'{ap:.2f}' for ap in row['AP_per_seed'])} |")
    lines += ["", *target_check(table, args.fractions, args.variants), "",
              "| pseudo masks | masks | recall@0.5 | recall@0.75 | mean best IoU |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {q['pseudo_masks']} | {q['recall@0.5']:.3f} | {q['recall@0.75']:.3f} | "
              f"{q['mean_best_iou']:.3f} |" for name, q in prep["proposal_quality"].items()]
    lines += ["", "recall of the ground-truth train instances (never used for training) by the pseudo masks",
              "step times (s): " + ", ".join(f"{name} {sec:.0f}" for name, sec in timings.items())]
    report = "\n".join(lines)
    print("\n" + report)
    stem = out / f"low_data{'' if args.model == 'knet' else '_' + args.model}"
    plot_curves(runs, args, stem.with_suffix(".png"))
    stem.with_suffix(".md").write_text(report + "\n")
    stem.with_suffix(".json").write_text(json.dumps({
        "args": vars(args), "table": table, "proposal_quality": prep["proposal_quality"],
        "curves": {f"{v}@{f:g}/seed{s}": curve for (v, f, s), curve in runs.items()},
        "timings_s": timings, "wall_s": round(time.perf_counter() - start, 1),
    }, indent=2))
    print(f"written: {', '.join(str(stem.with_suffix(s)) for s in ('.md', '.json', '.png'))}")


if __name__ == "__main__":
    main()
