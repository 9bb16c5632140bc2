"""The ``sp-ray`` command line: each subcommand parses its arguments and calls one library function.

    sp-ray data synthetic --out DIR [--num-images N] [--image-size S] [--seed K]
    sp-ray data split --annotations A.json --fractions 0.01 0.05 0.1 --seed 0 --out DIR
    sp-ray propose --images DIR_OR_JSON --out pseudo/ [--config FILE] [--image-root DIR] [--from-checkpoint CKPT]
                   [--proposer saliency|clip] [KEY=VALUE ...]
    sp-ray pretrain --config FILE [--work-dir DIR] [--resume [CKPT]] [--num-workers N] [--gpu] [KEY=VALUE ...]
    sp-ray finetune --config FILE [--init CKPT] [--work-dir DIR] [--resume [CKPT]] [KEY=VALUE ...]
    sp-ray analyze-kernels --checkpoint CKPT --images DIR_OR_JSON [--out kernels.png] [--num-images N]
    sp-ray evaluate --checkpoint CKPT --annotations A.json --images DIR [--out metrics.json] [KEY=VALUE ...]
    sp-ray evaluate --onnx model.onnx --annotations A.json --images DIR [--out metrics.json]
    sp-ray export --checkpoint CKPT --out model.onnx [--opset N] [--input-size HxW | --dynamic-size]
                  [--batch N | --dynamic-batch] [--fp16 | --int8]
    sp-ray tune --config SWEEP.yaml [--resume] [KEY=VALUE ...]
    sp-ray demo [--out runs/demo] [--force | --redo STEP ...] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sp_ray.config import ConfigError, dump_config, load_config
from sp_ray.train.checkpoint import is_checkpoint

log = logging.getLogger("sp_ray")

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The steps of `sp-ray demo`, in order (sp_ray.demo.pipeline.build_steps; listed here to keep the parser light).
DEMO_STEPS = ("data", "splits", "ssl", "propose", "pretrain", "finetune", "evaluate", "kernels", "export", "onnx",
              "throughput", "report")


def _add_config_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config file (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.num_kernels=16")


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (train.num_workers)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (train.use_gpu=true)")


def _ray_overrides(args: argparse.Namespace) -> list[str]:
    extra = [f"train.num_workers={args.num_workers}"] if args.num_workers is not None else []
    return extra + (["train.use_gpu=true"] if args.gpu else [])


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

    pr = sub.add_parser("propose", help="saliency pseudo masks and prompts for unlabeled images (Ray Data)")
    pr.add_argument("--images", required=True, help="image folder, or a COCO json whose images are used")
    pr.add_argument("--out", required=True, help="output folder: annotations.json, prompts.npy, shards/")
    pr.add_argument("--image-root", default=None, help="folder of a json's file names (default: the json's)")
    pr.add_argument("--from-checkpoint", default=None, metavar="CKPT",
                    help="self-training: pseudo masks from this trained model's confident predictions (selftrain.*)")
    pr.add_argument("--proposer", choices=("saliency", "clip"), default=None,
                    help="sets propose.proposer; clip = language-vision prompts from a local CLIP model (clip.*)")
    _add_config_args(pr, required=False)

    ft = sub.add_parser("finetune", help="supervised training on a COCO-format set")
    _add_config_args(ft)
    ft.add_argument("--init", help="checkpoint directory to initialise from (e.g. a pre-training's final/)")
    ft.add_argument("--work-dir", help="output directory (default: work_dirs/<config name>)")
    ft.add_argument("--resume", nargs="?", const="", default=None,
                    help="continue from a checkpoint directory (default: WORK_DIR/last)")
    _add_ray_args(ft)

    pt = sub.add_parser("pretrain", help="saliency-prompt pre-training of a QEIS model on pseudo masks (Ray Train)")
    _add_config_args(pt)
    pt.add_argument("--init", help="checkpoint directory to initialise from (self-training: the last round's final/)")
    pt.add_argument("--work-dir", help="output directory (default: work_dirs/<config name>)")
    pt.add_argument("--resume", nargs="?", const="", default=None,
                    help="continue from a checkpoint directory (default: WORK_DIR/last)")
    _add_ray_args(pt)

    ak = sub.add_parser("analyze-kernels", help="average mask of every kernel (query) over images, as a grid PNG")
    ak.add_argument("--checkpoint", required=True, help="checkpoint directory (fine-tuning or pre-training)")
    ak.add_argument("--images", required=True, help="image folder, or a COCO json whose images are used")
    ak.add_argument("--image-root", default=None, help="folder of a json's file names (default: the json's)")
    ak.add_argument("--out", default=None, help="PNG to write (default: CHECKPOINT/kernels_<stage>.png)")
    ak.add_argument("--num-images", type=int, default=100, help="average over the first N images")
    ak.add_argument("--stage", choices=("init", "last"), default="init",
                    help="initial masks m^0 (default) or the last stage's masks")
    ak.add_argument("--gpu", action="store_true", help="run on CUDA")

    ssl = sub.add_parser("ssl", help="DenseCL self-supervised backbone pre-training on unlabeled images")
    ssl.add_argument("--images", required=True, help="folder of unlabeled images (searched recursively)")
    _add_config_args(ssl, required=False)
    ssl.add_argument("--work-dir", help="output directory (default: work_dirs/<config name>)")
    ssl.add_argument("--resume", nargs="?", const="", default=None,
                     help="continue from a checkpoint directory (default: WORK_DIR/last)")
    _add_ray_args(ssl)

    ev = sub.add_parser("evaluate", help="COCO segm and bbox AP of a checkpoint or of an exported ONNX model")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory (PyTorch)")
    source.add_argument("--onnx", help="model exported by 'sp-ray export' (onnxruntime, as deployed)")
    ev.add_argument("--annotations", required=True)
    ev.add_argument("--images", required=True)
    ev.add_argument("--out", default=None, help="metrics json (default: CHECKPOINT/eval/metrics.json)")
    ev.add_argument("--predictions", default=None, help="COCO results json (default: next to --out)")
    ev.add_argument("--gpu", action="store_true", help="run on CUDA (onnxruntime: CUDA/TensorRT providers)")
    ev.add_argument("--threads", type=int, default=None, help="onnxruntime CPU threads (--onnx only)")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. eval.score_threshold=0.05")

    ex = sub.add_parser("export", help="ONNX export with metadata and a parity check against PyTorch")
    ex.add_argument("--checkpoint", required=True, help="checkpoint directory")
    ex.add_argument("--out", required=True, help="the .onnx file to write")
    ex.add_argument("--opset", type=int, default=18)
    size = ex.add_mutually_exclusive_group()
    size.add_argument("--input-size", metavar="HxW", help="fixed input size, multiples of 32 (e.g. 512x512)")
    size.add_argument("--dynamic-size", action="store_true", help="any input size (the default)")
    batch = ex.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="fixed batch size (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="any batch size (not Mask R-CNN)")
    precision = ex.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="fp16 weights and compute (query-based models)")
    precision.add_argument("--int8", action="store_true", help="dynamic int8 quantization (MatMul/Gemm weights)")
    ex.add_argument("--parity-images", default=None,
                    help="folder of sample images (default: the config's data.val_images, else generated)")
    ex.add_argument("--parity-count", type=int, default=4, help="number of sample images")

    tn = sub.add_parser("tune", help="Ray Tune sweep of SP pre-training / fine-tuning settings across fractions")
    tn.add_argument("--config", required=True, help="sweep YAML (see configs/tune/)")
    tn.add_argument("--resume", action="store_true", help="continue the interrupted sweep (Tuner.restore)")
    tn.add_argument("--print-config", action="store_true", help="print the resolved sweep and exit")
    tn.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="sweep overrides, e.g. search.num_samples=8")

    demo = sub.add_parser("demo", help="the whole pipeline on synthetic data, on a local Ray, with a report")
    demo.add_argument("--out", default="runs/demo", help="output folder (report.html and report.md inside)")
    redo = demo.add_mutually_exclusive_group()
    redo.add_argument("--force", action="store_true", help="redo every step even if its output exists")
    redo.add_argument("--redo", nargs="+", default=[], metavar="STEP",
                      help=f"redo these steps and every later one; steps: {' '.join(DEMO_STEPS)}")
    demo.add_argument("--tiny", action="store_true", help="the test suite's tiny setting (about a minute)")
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


def cmd_propose(args: argparse.Namespace) -> None:
    proposer = [f"propose.proposer={args.proposer}"] if args.proposer else []
    cfg = load_config(args.config, [*args.overrides, *proposer])
    if args.print_config:
        print(dump_config(cfg), end="")
        return
    from sp_ray.pretrain.propose import propose

    summary = propose(args.images, args.out, cfg, image_root=args.image_root, from_checkpoint=args.from_checkpoint)
    print(json.dumps(summary, indent=2))


def _run_training_command(args: argparse.Namespace, *, pretrain: bool) -> None:
    """finetune and pretrain: the same `fit` loop in Ray workers; pretrain.enabled builds the SP wrapper."""
    extra = ["pretrain.enabled=true"] if pretrain else []
    cfg = load_config(args.config, [*args.overrides, *_ray_overrides(args), *extra])
    if args.print_config:
        print(dump_config(cfg), end="")
        return
    if not pretrain and cfg.pretrain.enabled:
        raise ConfigError(f"{args.config} is a pre-training config (pretrain.enabled): run it with 'sp-ray pretrain'")
    from sp_ray.train.ray_train import run_training

    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    what = "the pseudo masks of 'sp-ray propose'" if pretrain else "a COCO-format training set"
    for key in ("train_annotations", "train_images"):
        if not getattr(cfg.data, key):
            raise ConfigError(f"data.{key} is empty: set it ({what}) in {args.config} or as data.{key}=PATH")
    final = run_training(cfg, work_dir, init=args.init, resume=_resume_dir(args, work_dir))
    hint = f" (fine-tune it with: sp-ray finetune --config FILE --init {final})" if pretrain else ""
    print(f"final checkpoint: {final}{hint}")


def cmd_finetune(args: argparse.Namespace) -> None:
    _run_training_command(args, pretrain=False)


def _resume_dir(args: argparse.Namespace, work_dir: Path) -> Path | None:
    if args.resume is None:
        return None
    resume = Path(args.resume) if args.resume else work_dir / "last"
    if not is_checkpoint(resume):
        raise FileNotFoundError(f"--resume {resume} is not a checkpoint directory (no model.pt/config.yaml/meta.json)")
    return resume


def cmd_pretrain(args: argparse.Namespace) -> None:
    _run_training_command(args, pretrain=True)


def cmd_analyze_kernels(args: argparse.Namespace) -> None:
    from sp_ray.evaluation.kernel_analysis import analyze_kernels

    summary = analyze_kernels(
        args.checkpoint, args.images, args.out, image_root=args.image_root, num_images=args.num_images,
        stage=args.stage, use_gpu=args.gpu,
    )
    print(json.dumps(summary, indent=2))


def cmd_ssl(args: argparse.Namespace) -> None:
    config = args.config or str(REPO_CONFIGS / "densecl_r50.yaml")
    cfg = load_config(config, [*args.overrides, *_ray_overrides(args)])
    if args.print_config:
        print(dump_config(cfg), end="")
        return
    from sp_ray.train.ray_train import run_training

    work_dir = Path(args.work_dir or Path("work_dirs") / Path(config).stem)
    final = run_training(cfg, work_dir, resume=_resume_dir(args, work_dir), task="ssl", images=args.images)
    print(f"backbone weights: {final / 'backbone.pth'} (use as model.backbone_weights)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from sp_ray.evaluation.coco_eval import evaluate_checkpoint, evaluate_onnx, format_metrics

    if args.onnx:
        if args.overrides:
            raise ConfigError("KEY=VALUE overrides apply to --checkpoint; an ONNX model carries its thresholds")
        default_out = Path(args.onnx).with_name(Path(args.onnx).stem + "_eval") / "metrics.json"
    else:
        default_out = Path(args.checkpoint) / "eval" / "metrics.json"
    out = Path(args.out) if args.out else default_out
    predictions = Path(args.predictions) if args.predictions else out.with_name("predictions.json")
    if args.onnx:
        metrics, results = evaluate_onnx(
            args.onnx, annotations=args.annotations, images=args.images,
            providers=None if args.gpu else ["CPUExecutionProvider"], threads=args.threads,
        )
    else:
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


def _parse_size(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit():
        raise ValueError(f"--input-size must look like 512x512 (HxW), got {text!r}")
    return int(height), int(width)


def cmd_export(args: argparse.Namespace) -> None:
    from export.onnx_export import export_checkpoint

    precision = "fp16" if args.fp16 else "int8" if args.int8 else "fp32"
    result = export_checkpoint(
        args.checkpoint, args.out, opset=args.opset,
        input_size=_parse_size(args.input_size) if args.input_size else None,
        batch_size=None if args.dynamic_batch else args.batch, precision=precision,
        parity_images=args.parity_images, parity_count=args.parity_count,
    )
    info = result.info
    size = "x".join(map(str, info.input_size)) if info.input_size else "dynamic"
    print(result.parity.summary())
    print(f"wrote {result.path} ({info.family}, {info.precision}, input {size}, "
          f"batch {info.batch_size or 'dynamic'}, {len(info.class_names)} classes)")


def cmd_tune(args: argparse.Namespace) -> None:
    from sp_ray.tune.spec import dump_sweep, load_sweep

    sweep = load_sweep(args.config, args.overrides)
    if args.print_config:
        print(dump_sweep(sweep), end="")
        return
    from sp_ray.tune.sweep import run_sweep

    outcome = run_sweep(sweep, resume=args.resume)
    for name, path in outcome.files.items():
        if name.startswith("table_"):
            print(path.read_text())
    print(f"results: {outcome.experiment_dir / 'results'}")
    if not outcome.complete:
        print(f"the sweep was interrupted; continue it with: sp-ray tune --config {args.config} --resume")


def cmd_demo(args: argparse.Namespace) -> None:
    from sp_ray.demo import TINY, DemoSettings, run_demo

    run_demo(Path(args.out), TINY if args.tiny else DemoSettings(), force=args.force, redo=args.redo)


COMMANDS = {
    "data": cmd_data,
    "propose": cmd_propose,
    "finetune": cmd_finetune,
    "ssl": cmd_ssl,
    "pretrain": cmd_pretrain,
    "analyze-kernels": cmd_analyze_kernels,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "tune": cmd_tune,
    "demo": cmd_demo,
}


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
