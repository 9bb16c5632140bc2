"""The ``sp-ray`` command line: each subcommand parses its arguments and calls one library function.

    sp-ray data synthetic --out DIR [--num-images N] [--image-size S] [--seed K]
    sp-ray data split --annotations A.json --fractions 0.01 0.05 0.1 --seed 0 --out DIR
    sp-ray finetune --config FILE [--init CKPT] [--work-dir DIR] [--resume [CKPT]] [KEY=VALUE ...]
    sp-ray evaluate --checkpoint CKPT --annotations A.json --images DIR [--out metrics.json] [KEY=VALUE ...]
    sp-ray demo [--out runs/demo] [--force]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sp_ray.config import ConfigError, dump_config, load_config

log = logging.getLogger("sp_ray")

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _add_config_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config file (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.num_kernels=16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sp-ray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets: synthetic data, labeled-fraction splits")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    syn = data_sub.add_parser("synthetic", help="write the built-in synthetic COCO-format dataset")
    syn.add_argument("--out", required=True)
    syn.add_argument("--num-images", type=int, default=400)
    syn.add_argument("--image-size", type=int, default=160)
    syn.add_argument("--seed", type=int, default=0)
    split = data_sub.add_parser("split", help="nested labeled fractions of a COCO json")
    split.add_argument("--annotations", required=True)
    split.add_argument("--fractions", type=float, nargs="+", required=True)
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--out", required=True)

    ft = sub.add_parser("finetune", help="supervised training on a COCO-format set")
    _add_config_args(ft)
    ft.add_argument("--init", help="checkpoint directory to initialise from (e.g. a pre-training's final/)")
    ft.add_argument("--work-dir", help="output directory (default: work_dirs/<config name>)")
    ft.add_argument("--resume", nargs="?", const="", default=None,
                    help="continue from a checkpoint directory (default: WORK_DIR/last)")

    ev = sub.add_parser("evaluate", help="COCO segm and bbox AP of a checkpoint")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--annotations", required=True)
    ev.add_argument("--images", required=True)
    ev.add_argument("--out", default=None, help="metrics json (default: CHECKPOINT/eval/metrics.json)")
    ev.add_argument("--predictions", default=None, help="COCO results json (default: next to --out)")
    ev.add_argument("--gpu", action="store_true", help="run on CUDA")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. eval.score_threshold=0.05")

    demo = sub.add_parser("demo", help="synthetic data -> fine-tune K-Net on 10%% -> evaluate")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--config", default=None, help="default: configs/demo/knet_tiny_synthetic.yaml")
    demo.add_argument("--force", action="store_true", help="redo every step even if its output exists")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return parser


def cmd_data(args: argparse.Namespace) -> None:
    if args.data_command == "synthetic":
        from sp_ray.data.synthetic import write_synthetic_dataset

        paths = write_synthetic_dataset(
            args.out, num_images=args.num_images, image_size=args.image_size, seed=args.seed,
        )
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    else:
        from sp_ray.data.split import split_fractions

        paths = split_fractions(args.annotations, args.fractions, seed=args.seed, out_dir=args.out)
        for fraction, path in paths.items():
            print(f"{fraction:g}: {path}")


def cmd_finetune(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return
    from sp_ray.train.loop import fit

    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    resume = None
    if args.resume is not None:
        resume = Path(args.resume) if args.resume else work_dir / "last"
    for key in ("train_annotations", "train_images"):
        if not getattr(cfg.data, key):
            raise ConfigError(f"data.{key} is empty: set it in {args.config} or as data.{key}=PATH")
    final = fit(cfg, work_dir, init=args.init, resume=resume)
    print(f"final checkpoint: {final}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from sp_ray.evaluation.coco_eval import evaluate_checkpoint, format_metrics

    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval" / "metrics.json"
    predictions = Path(args.predictions) if args.predictions else out.with_name("predictions.json")
    metrics, results = evaluate_checkpoint(
        args.checkpoint, annotations=args.annotations, images=args.images,
        overrides=args.overrides, use_gpu=args.gpu,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    predictions.parent.mkdir(parents=True, exist_ok=True)
    predictions.write_text(json.dumps(results))
    print(format_metrics(metrics))
    print(f"metrics: {out}\npredictions: {predictions} ({len(results)} instances)")


def cmd_demo(args: argparse.Namespace) -> None:
    from sp_ray.demo import run_demo

    config = Path(args.config) if args.config else REPO_CONFIGS / "demo" / "knet_tiny_synthetic.yaml"
    run_demo(Path(args.out), config=config, overrides=args.overrides, force=args.force)


COMMANDS = {"data": cmd_data, "finetune": cmd_finetune, "evaluate": cmd_evaluate, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        # Bad input is reported as one line; SP_RAY_DEBUG=1 shows the traceback instead.
        if os.environ.get("SP_RAY_DEBUG"):
            raise
        print(f"sp-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
