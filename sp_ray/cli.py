"""The ``sp-ray`` command line: each subcommand parses its arguments and calls one library function.

    sp-ray data synthetic --out DIR [--num-images N] [--image-size S] [--seed K] [--aspect-ratios W/H ...]
    sp-ray data split --annotations A.json --fractions 0.01 0.05 0.1 --seed 0 --out DIR
    sp-ray data convert --format cityscapes|ctw1500 --split SPLIT --out A.json [--root DIR]
                        [--source auto|instance-ids|polygons] [--images DIR] [--labels DIR]
    sp-ray propose --images DIR_OR_JSON --out pseudo/ [--config FILE] [--image-root DIR] [--from-checkpoint CKPT]
                   [--proposer saliency|clip] [KEY=VALUE ...]
    sp-ray pretrain --config FILE [--work-dir DIR] [--resume | --resume-from CKPT] [--num-workers N] [--gpu]
                    [KEY=VALUE ...]
    sp-ray finetune --config FILE [--init CKPT] [--work-dir DIR] [--resume | --resume-from CKPT] [KEY=VALUE ...]
    sp-ray ssl --images DIR [--config FILE] [--work-dir DIR] [--resume | --resume-from CKPT] [KEY=VALUE ...]
    sp-ray analyze-kernels --checkpoint CKPT --images DIR_OR_JSON [--out kernels.png] [--num-images N]
    sp-ray evaluate --checkpoint CKPT --annotations A.json --images DIR [--out metrics.json]
                    [--write-predictions FILE] [KEY=VALUE ...]
    sp-ray evaluate --onnx model.onnx --annotations A.json --images DIR [--out metrics.json]
                    [--write-predictions FILE] [--gpu [--trt-cache DIR] [--trt-fp16]]
    sp-ray evaluate --results PREDICT_DIR --annotations A.json --images DIR [--out metrics.json]
    sp-ray evaluate --predictions RESULTS.json --annotations A.json --images DIR [--out metrics.json]
    sp-ray export --checkpoint CKPT --out model.onnx [--opset N] [--input-size HxW | --dynamic-size]
                  [--batch N | --dynamic-batch] [--fp16 | --int8 [--calibration-images DIR] [--calibration-count N]]
    sp-ray benchmark --checkpoint CKPT --annotations A.json --images DIR [--formats torch onnx onnx-fp16 onnx-int8]
                     [--threads T] [--batch B] [--rounds N] [--warmup N] [--parity-count N] [--calibration-count N]
                     [--out PREFIX]
    sp-ray predict --model M.onnx --source SRC --out DIR [--num-actors N] [--threads T] [--batch-size B]
                   [--shard-size S] [--score-threshold S] [--overlays] [--gpu [--trt-cache DIR] [--trt-fp16]]
                   [--resume] [--annotations A.json]
    sp-ray tune --config SWEEP.yaml [--resume] [KEY=VALUE ...]
    sp-ray run --annotations A.json --images DIR [--val-annotations V.json [--val-images DIR]] [--unlabeled DIR ...]
               [--fractions F ... | --all-labels] [--model knet|mask2former|queryinst] [--baseline maskrcnn]
               [--preset tiny|r50] [--backbone-weights FILE] [--num-workers N] [--gpu] [--out DIR]
               [--force | --redo STEP ...] [[STEP:]KEY=VALUE ...]
    sp-ray demo [--out runs/demo] [--force | --redo STEP ...] [--tiny]
    sp-ray serve --model M.onnx [--host 127.0.0.1] [--port 8000] [--replicas N] [--max-batch-size B]
                 [--batch-wait-timeout-s T] [--threads T] [--gpu [--trt-cache DIR] [--trt-fp16]] [--max-body-mb MB]
                 [--max-image-pixels N]

Every command takes --debug (or SP_RAY_DEBUG=1): a traceback instead of the one-line error message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sp_ray.benchmark import FORMATS as BENCHMARK_FORMATS
from sp_ray.config import Config, ConfigError, check_config_values, dump_config, load_config
from sp_ray.errors import UserError

if TYPE_CHECKING:
    from export.providers import GpuSettings
    from sp_ray.run.settings import RunSettings

log = logging.getLogger("sp_ray")

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The steps of `sp-ray run` and `sp-ray demo`, in order (sp_ray.run.pipeline.build_steps; listed here to keep the
# parser light). With --backbone-weights, ssl is absent.
PIPELINE_STEPS = ("data", "splits", "ssl", "propose", "pretrain", "finetune", "evaluate", "kernels", "export",
                  "onnx", "throughput", "report")
# The same names as sp_ray.run.settings (the parser does not import the pipeline).
RUN_FAMILIES = ("knet", "mask2former", "queryinst")
RUN_PRESETS = ("tiny", "r50")
OVERRIDE_SCOPES = ("ssl", "propose", "pretrain", "finetune", "baseline")


def _add_config_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config file (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.num_kernels=16")


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (train.num_workers)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (train.use_gpu=true)")


def _add_resume_args(p: argparse.ArgumentParser) -> None:
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the run from WORK_DIR/last")
    resume.add_argument("--resume-from", metavar="CKPT", default=None,
                        help="continue from this checkpoint directory (a WORK_DIR/last)")


def _add_trt_args(p: argparse.ArgumentParser) -> None:
    """--trt-cache and --trt-fp16: options of onnxruntime's TensorRT provider, for commands with --gpu."""
    p.add_argument("--trt-cache", metavar="DIR", default=None,
                   help="with --gpu: TensorRT engine cache folder (an engine is built once per model and GPU, "
                        "then loaded)")
    p.add_argument("--trt-fp16", action="store_true", help="with --gpu: let TensorRT compute in fp16")


def _gpu_settings(args: argparse.Namespace, *, max_batch: int) -> GpuSettings | None:
    """The ``GpuSettings`` of --gpu, --trt-cache and --trt-fp16 (None without --gpu)."""
    from export.providers import GpuSettings

    if not args.gpu:
        if args.trt_cache is not None or args.trt_fp16:
            raise UserError("--trt-cache and --trt-fp16 are options of onnxruntime's TensorRT provider: "
                            "give them with --gpu")
        return None
    cache = os.path.abspath(args.trt_cache) if args.trt_cache is not None else None
    return GpuSettings(trt_cache_dir=cache, trt_fp16=args.trt_fp16, trt_max_batch=max_batch)


def _ray_overrides(args: argparse.Namespace) -> list[str]:
    if args.num_workers is not None and args.num_workers < 1:
        raise ConfigError(f"--num-workers {args.num_workers}: it must be >= 1 (the Ray Train workers, "
                          "train.num_workers)")
    extra = [f"train.num_workers={args.num_workers}"] if args.num_workers is not None else []
    return extra + (["train.use_gpu=true"] if args.gpu else [])


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before and after the command; SUPPRESS keeps a subcommand's default from
    # overwriting a --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (also: SP_RAY_DEBUG=1)")
    parser = argparse.ArgumentParser(prog="sp-ray", description=__doc__.split("\n")[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(subparsers: argparse._SubParsersAction, name: str, **kwargs: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, parents=[common], **kwargs)

    data = command(sub, "data", help="datasets: synthetic data, labeled-fraction splits, Cityscapes / CTW1500 "
                                     "conversion")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    syn = command(data_sub, "synthetic", help="write the built-in synthetic COCO-format dataset")
    syn.add_argument("--out", required=True)
    syn.add_argument("--num-images", type=int, default=400)
    syn.add_argument("--image-size", type=int, default=160)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--aspect-ratios", type=float, nargs="+", default=[], metavar="W/H",
                     help="width / height of the images, each drawn from these (e.g. 1.333 0.75: landscape and "
                          "portrait; long side --image-size); default: square")
    split = command(data_sub, "split", help="nested labeled fractions of a COCO json")
    split.add_argument("--annotations", required=True)
    split.add_argument("--fractions", type=float, nargs="+", required=True)
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--out", required=True)
    convert = command(
        data_sub, "convert", help="a public dataset's annotations -> COCO instance json (Cityscapes, CTW1500)",
        description="Convert a dataset in its official layout to a COCO instance json for training and evaluation; "
                    "OUT.summary.json (next to --out) gets the counts per class, the images without instances and "
                    "every skipped file or object (missing pairs, malformed files, bad polygons) under its reason.",
        epilog="cityscapes: ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png with ROOT/gtFine/<split>/<city>/"
               "*_gtFine_instanceIds.png or *_gtFine_polygons.json; --split train|val; the 8 instance classes; "
               "file names relative to ROOT/leftImg8bit/<split>. "
               "ctw1500: ROOT/train_images + ROOT/ctw1500_train_labels (*.xml), ROOT/test_images + "
               "ROOT/ctw1500_test_labels (*.txt); --split train|test; one class, text, as polygons; file names "
               "relative to the images folder.",
    )
    convert.add_argument("--format", required=True, choices=("cityscapes", "ctw1500"), help="the dataset")
    convert.add_argument("--root", default=None, help="the dataset folder, with its official sub-folders")
    convert.add_argument("--split", required=True, help="cityscapes: train or val; ctw1500: train or test")
    convert.add_argument("--out", required=True, help="the COCO json to write (OUT.summary.json next to it)")
    convert.add_argument("--source", choices=("auto", "instance-ids", "polygons"), default="auto",
                         help="cityscapes: read *_gtFine_instanceIds.png (instance-ids), *_gtFine_polygons.json "
                              "(polygons), or the PNG where an image has one and its polygons otherwise (auto, "
                              "the default: the PNGs are what the official evaluation reads)")
    convert.add_argument("--images", default=None,
                         help="ctw1500: the images folder, instead of ROOT/<split>_images")
    convert.add_argument("--labels", default=None,
                         help="ctw1500: the label folder (*.xml or *.txt), instead of ROOT/ctw1500_<split>_labels "
                              "(or ROOT/<split>_labels)")

    pr = command(sub, "propose", help="saliency pseudo masks and prompts for unlabeled images (Ray Data)")
    pr.add_argument("--images", required=True, help="image folder, or a COCO json whose images are used")
    pr.add_argument("--out", required=True, help="output folder: annotations.json, prompts.npy, shards/")
    pr.add_argument("--image-root", default=None, help="folder of a json's file names (default: the json's)")
    pr.add_argument("--from-checkpoint", default=None, metavar="CKPT",
                    help="self-training: pseudo masks from this trained model's confident predictions (selftrain.*)")
    pr.add_argument("--proposer", choices=("saliency", "clip"), default=None,
                    help="sets propose.proposer; clip = language-vision prompts from a local CLIP model (clip.*)")
    _add_config_args(pr, required=False)

    ft = command(sub, "finetune", help="supervised training on a COCO-format set")
    _add_config_args(ft)
    ft.add_argument("--init", help="checkpoint directory to initialise from (e.g. a pre-training's final/)")
    ft.add_argument("--work-dir", help="output directory (default: work_dirs/<config name>)")
    _add_resume_args(ft)
    _add_ray_args(ft)

    pt = command(sub, "pretrain", help="saliency-prompt pre-training of a QEIS model on pseudo masks (Ray Train)")
    _add_config_args(pt)
    pt.add_argument("--init", help="checkpoint directory to initialise from (self-training: the last round's final/)")
    pt.add_argument("--work-dir", help="output directory (default: work_dirs/<config name>)")
    _add_resume_args(pt)
    _add_ray_args(pt)

    ak = command(sub, "analyze-kernels", help="average mask of every kernel (query) over images, as a grid PNG")
    ak.add_argument("--checkpoint", required=True, help="checkpoint directory (fine-tuning or pre-training)")
    ak.add_argument("--images", required=True, help="image folder, or a COCO json whose images are used")
    ak.add_argument("--image-root", default=None, help="folder of a json's file names (default: the json's)")
    ak.add_argument("--out", default=None, help="PNG to write (default: CHECKPOINT/kernels_<stage>.png)")
    ak.add_argument("--num-images", type=int, default=100, help="average over the first N images")
    ak.add_argument("--stage", choices=("init", "last"), default="init",
                    help="initial masks m^0 (default) or the last stage's masks")
    ak.add_argument("--gpu", action="store_true", help="run on CUDA")

    ssl = command(sub, "ssl", help="DenseCL self-supervised backbone pre-training on unlabeled images")
    ssl.add_argument("--images", required=True, help="folder of unlabeled images (searched recursively)")
    _add_config_args(ssl, required=False)
    ssl.add_argument("--work-dir", help="output directory (default: work_dirs/<config name>)")
    _add_resume_args(ssl)
    _add_ray_args(ssl)

    ev = command(sub, "evaluate", help="COCO segm and bbox AP, overall and per category, of a checkpoint, an "
                 "exported ONNX model, or predictions already made")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory (PyTorch)")
    source.add_argument("--onnx", help="model exported by 'sp-ray export' (onnxruntime, as deployed)")
    source.add_argument("--results", metavar="PREDICT_DIR",
                        help="score the output of 'sp-ray predict' (its --out) instead of running a model")
    source.add_argument("--predictions", metavar="FILE",
                        help="score a COCO results json of another tool (detectron2, mmdet): a list of {image_id, "
                             "category_id, score, segmentation (RLE or polygons) and/or bbox}. A malformed file "
                             "(not a list, empty, an entry missing a key or of a wrong type, a category id the "
                             "annotations lack, a mask of another size) is an error; entries on images the "
                             "annotations do not list or the dataset leaves out are skipped and counted. "
                             "bbox-only entries count for bbox AP only; without any segmentation segm is absent")
    ev.add_argument("--annotations", required=True)
    ev.add_argument("--images", required=True)
    ev.add_argument("--out", default=None,
                    help="metrics json (default: CHECKPOINT/eval/, M_eval/ for --onnx M.onnx, PREDICT_DIR/, "
                         "F_eval/ for --predictions F.json; metrics.json there); the per-category table "
                         "(NAME_per_category.md) and precision-recall PNGs (NAME_pr_iou50.png, NAME_pr_iou75.png) "
                         "go next to it")
    ev.add_argument("--write-predictions", metavar="FILE", default=None,
                    help="where --checkpoint / --onnx write the model's COCO results json (default: "
                         "predictions.json next to --out)")
    ev.add_argument("--gpu", action="store_true", help="run on CUDA (onnxruntime: CUDA/TensorRT providers)")
    ev.add_argument("--threads", type=int, default=None, help="onnxruntime CPU threads (--onnx only)")
    _add_trt_args(ev)
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. eval.score_threshold=0.05")

    ex = command(sub, "export", help="ONNX export with metadata and a parity check against PyTorch")
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
    precision.add_argument("--int8", action="store_true",
                           help="static int8 (QDQ): int8 weights, activation ranges calibrated on real images")
    ex.add_argument("--calibration-images", default=None, metavar="DIR",
                    help="--int8: folder of images like the ones the model will see (default: the config's "
                         "data.val_images)")
    ex.add_argument("--calibration-count", type=int, default=32, metavar="N",
                    help="--int8: number of calibration images (default 32, evenly spaced by name)")
    ex.add_argument("--parity-images", default=None,
                    help="folder of sample images (default: the config's data.val_images, else generated)")
    ex.add_argument("--parity-count", type=int, default=4, help="number of sample images")

    bm = command(sub, "benchmark", help="every format of a checkpoint side by side: size, COCO AP, images/s, parity")
    bm.add_argument("--checkpoint", required=True, help="checkpoint directory (a fine-tuning's WORK_DIR/final)")
    bm.add_argument("--annotations", required=True, help="COCO json of the evaluation set")
    bm.add_argument("--images", required=True,
                    help="its image folder; its first images are also the parity check's and the timed batches")
    bm.add_argument("--formats", nargs="+", choices=list(BENCHMARK_FORMATS), default=list(BENCHMARK_FORMATS),
                    metavar="FORMAT", help=f"one table row each: {' '.join(BENCHMARK_FORMATS)} (default: all; "
                    "the onnx ones are exported as 'sp-ray export' exports)")
    bm.add_argument("--threads", type=int, default=None,
                    help="CPU threads of onnxruntime (intra-op) and PyTorch (default: each runtime's own)")
    bm.add_argument("--batch", type=int, default=1,
                    help="images per graph run; the ONNX models are exported with this fixed batch (default 1)")
    bm.add_argument("--rounds", type=int, default=10,
                    help="timed rounds, each running every format once, the order rotated (default 10)")
    bm.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    bm.add_argument("--parity-count", type=int, default=4, help="images of each export's parity check (default 4)")
    bm.add_argument("--calibration-count", type=int, default=32, metavar="N",
                    help="onnx-int8: images of --images its activation ranges are calibrated on (default 32, "
                         "evenly spaced by name)")
    bm.add_argument("--out", default=None, metavar="PREFIX",
                    help="writes PREFIX.md, PREFIX.json, PREFIX.png and the models PREFIX.<fp32|fp16|int8>.onnx "
                    "(default: CHECKPOINT/benchmark/benchmark)")

    pd = command(sub, "predict", help="batch inference of an exported model over images or a video (Ray Data)")
    pd.add_argument("--model", required=True, help="the .onnx file written by 'sp-ray export'")
    pd.add_argument("--source", required=True,
                    help="an image, a folder (recursive), a glob (quoted), a text file of paths, or a video file")
    pd.add_argument("--out", required=True,
                    help="output folder: predictions.json, images.json, skipped.json, shards/ (and overlays/)")
    pd.add_argument("--num-actors", type=int, default=1, help="Ray Data actors, one onnxruntime session each")
    pd.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (and CPUs) per actor")
    pd.add_argument("--batch-size", type=int, default=1, help="images per graph run")
    pd.add_argument("--shard-size", type=int, default=64, help="inputs (frames) per shard: the unit of --resume")
    pd.add_argument("--score-threshold", type=float, default=None, help="default: the model's own")
    pd.add_argument("--overlays", action="store_true", help="also write each image with its instances drawn")
    pd.add_argument("--gpu", action="store_true", help="one GPU per actor (onnxruntime CUDA / TensorRT)")
    _add_trt_args(pd)
    pd.add_argument("--resume", action="store_true", help="keep the finished shards of an interrupted run in --out")
    pd.add_argument("--annotations", default=None,
                    help="COCO json of the same files (names relative to --source): COCO AP into DIR/metrics.json")

    tn = command(sub, "tune", help="Ray Tune sweep of SP pre-training / fine-tuning settings across fractions")
    tn.add_argument("--config", required=True, help="sweep YAML (see configs/tune/)")
    tn.add_argument("--resume", action="store_true", help="continue the interrupted sweep (Tuner.restore)")
    tn.add_argument("--print-config", action="store_true", help="print the resolved sweep and exit")
    tn.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="sweep overrides, e.g. search.num_samples=8")

    sv = command(sub, "serve", help="HTTP service of an exported ONNX model on Ray Serve, with dynamic batching")
    sv.add_argument("--model", required=True, help="the .onnx file written by 'sp-ray export' (--dynamic-batch "
                    "to batch requests)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="interface to bind (default 127.0.0.1; Serve has no auth, see the README before widening)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--replicas", type=int, default=1, help="Serve replicas, one onnxruntime session each")
    sv.add_argument("--max-batch-size", type=int, default=None,
                    help="most requests per graph run (default: the model's fixed batch, else 8)")
    sv.add_argument("--batch-wait-timeout-s", type=float, default=0.01,
                    help="how long a batch's first request waits for more (default 0.01)")
    sv.add_argument("--threads", type=int, default=1,
                    help="onnxruntime threads per replica; each replica reserves as many Ray CPUs (default 1)")
    sv.add_argument("--gpu", action="store_true", help="one GPU per replica (onnxruntime CUDA / TensorRT)")
    _add_trt_args(sv)
    sv.add_argument("--max-body-mb", type=float, default=None, help="larger request bodies get 413 (default 64)")
    sv.add_argument("--max-image-pixels", type=int, default=None,
                    help="images of more pixels (H x W) get 413 before decoding (default: PIL's bomb limit, 89.5M)")

    rn = command(
        sub, "run", help="the whole pipeline on your COCO-format data, on a local Ray or RAY_ADDRESS, with a report",
        description="DenseCL on the unlabeled images, saliency proposals, SP pre-training, fine-tuning on labeled "
                    "fractions from SP and from the same backbone without SP (and Mask R-CNN), evaluation, ONNX "
                    "export with parity, onnxruntime, and OUT/report.html. Every step skips itself when done; the "
                    "resolved config of every step is written to OUT/configs/.",
        epilog="Overrides: KEY=VALUE applies to every step's config that has the key (model.encoder_layers: "
               "Mask2Former's, not Mask R-CNN's); STEP:KEY=VALUE to one, STEP one of "
               f"{', '.join(OVERRIDE_SCOPES)} (baseline: Mask R-CNN), e.g. finetune:train.epochs=12.",
    )
    rn.add_argument("--annotations", required=True, help="COCO instance json of the labeled images")
    rn.add_argument("--images", required=True, help="the folder its file_name entries are relative to")
    rn.add_argument("--val-annotations", default=None,
                    help="COCO json of a val set (default: a seeded 20%% of the labeled images is held out)")
    rn.add_argument("--val-images", default=None, help="the val images' folder (default: --images)")
    rn.add_argument("--unlabeled", nargs="+", default=[], metavar="DIR",
                    help="folders of unlabeled images (default: the labeled train images without their labels)")
    labels = rn.add_mutually_exclusive_group()
    labels.add_argument("--fractions", type=float, nargs="+", default=None,
                        help="labeled fractions of train to fine-tune on (default 0.05 0.1)")
    labels.add_argument("--all-labels", action="store_true", help="fine-tune on every labeled train image")
    rn.add_argument("--model", choices=RUN_FAMILIES, default="knet", help="the query-based model family")
    rn.add_argument("--baseline", choices=("maskrcnn",), default=None, help="also fine-tune Mask R-CNN")
    rn.add_argument("--preset", choices=RUN_PRESETS, default="tiny",
                    help="tiny: the CPU-sized configs of configs/demo/; r50: the paper's ResNet-50 configs "
                         "(for GPUs)")
    rn.add_argument("--backbone-weights", default=None, metavar="FILE",
                    help="a local ResNet state dict of the preset's depth: DenseCL does not run")
    rn.add_argument("--num-workers", type=int, default=None,
                    help="Ray Train workers of SP pre-training (and of fine-tuning with --gpu); default 2, 1 with "
                         "--gpu")
    rn.add_argument("--gpu", action="store_true", help="train and evaluate on GPUs (one per Ray worker / task)")
    rn.add_argument("--out", default="runs/run", help="output folder (report.html and report.md inside)")
    rn.add_argument("overrides", nargs="*", metavar="[STEP:]KEY=VALUE", help="config overrides (see below)")

    demo = command(sub, "demo", help="the whole pipeline on synthetic data (sp-ray run's, tiny preset), on a local "
                                     "Ray, with a report")
    demo.add_argument("--out", default="runs/demo", help="output folder (report.html and report.md inside)")
    demo.add_argument("--tiny", action="store_true", help="the test suite's tiny setting (about a minute)")
    for pipeline in (rn, demo):
        redo = pipeline.add_mutually_exclusive_group()
        redo.add_argument("--force", action="store_true", help="redo every step even if its output exists")
        redo.add_argument("--redo", nargs="+", default=[], metavar="STEP",
                          help=f"redo these steps and every later one; steps: {' '.join(PIPELINE_STEPS)}")
    return parser


def cmd_data(args: argparse.Namespace) -> None:
    if args.data_command == "synthetic":
        from sp_ray.data.synthetic import write_synthetic_dataset

        paths = write_synthetic_dataset(
            args.out, num_images=args.num_images, image_size=args.image_size, seed=args.seed,
            aspect_ratios=args.aspect_ratios,
        )
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    elif args.data_command == "convert":
        print(_convert_dataset(args))
    else:
        from sp_ray.data.split import split_fractions

        paths = split_fractions(args.annotations, args.fractions, seed=args.seed, out_dir=args.out)
        for fraction, path in paths.items():
            print(f"{fraction:g}: {path}")


def _convert_dataset(args: argparse.Namespace) -> str:
    """``sp-ray data convert``: runs the converter of --format and returns its printed summary."""
    from sp_ray.data.conversion import format_summary

    if args.format == "cityscapes":
        from sp_ray.data.cityscapes import convert_cityscapes

        if args.images is not None or args.labels is not None:
            raise UserError("--images and --labels are options of --format ctw1500; Cityscapes is read from --root "
                            "(leftImg8bit/ and gtFine/)")
        if args.root is None:
            raise UserError("--format cityscapes needs --root, the folder holding leftImg8bit/ and gtFine/")
        summary = convert_cityscapes(args.root, args.split, args.out, source=args.source)
    else:
        from sp_ray.data.ctw1500 import convert_ctw1500

        if args.source != "auto":
            raise UserError("--source is an option of --format cityscapes")
        summary = convert_ctw1500(args.out, root=args.root, split=args.split, images=args.images, labels=args.labels)
    return format_summary(summary)


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
    """finetune and pretrain: the same `fit` loop in Ray workers; pretrain trains the SP objective
    (``sp_ray.pretrain.sp_objective.build_sp_objective``), finetune the family's (``build_objective``)."""
    extra = ["pretrain.enabled=true"] if pretrain else []
    cfg = load_config(args.config, [*args.overrides, *_ray_overrides(args), *extra])
    if args.print_config:
        print(dump_config(cfg), end="")
        return
    if not pretrain and cfg.pretrain.enabled:
        raise ConfigError(f"{args.config} is a pre-training config (pretrain.enabled): run it with 'sp-ray pretrain'")
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    final = _train(args, cfg, work_dir, task="pretrain" if pretrain else "finetune", init=args.init)
    if final is not None:
        hint = f" (fine-tune it with: sp-ray finetune --config FILE --init {final})" if pretrain else ""
        print(f"final checkpoint: {final}{hint}")


def _train(
    args: argparse.Namespace, cfg: Config, work_dir: Path, *, task: str, init: str | None = None,
    images: str | None = None,
) -> Path | None:
    """Check everything on the driver, then train in Ray workers; None when a resumed run was already complete."""
    check_config_values(cfg, task=task)  # before importing torch: a bad value fails in a second
    from sp_ray.train.preflight import check_training

    worker = model_check = None
    if task == "ssl":
        from sp_ray.densecl.train import check_ssl as model_check
        from sp_ray.densecl.train import ssl_worker as worker
    resume = _resume_dir(args, work_dir)
    plan = check_training(cfg, work_dir, task=task, init=init, resume=resume, images=images, model_check=model_check)
    if plan.finished and plan.final.exists():
        key = "ssl.epochs" if task == "ssl" else "train.epochs"
        print(f"{resume} is at epoch {plan.start_epoch} of {plan.epochs}: the run is complete and its model is "
              f"{plan.final}; nothing was changed (set {key} above {plan.start_epoch} to train longer)")
        return None
    from sp_ray.train.ray_train import run_training  # Ray is imported (seconds) only once the checks pass

    return run_training(cfg, work_dir, init=init, resume=resume, task=task, images=images, checked=plan,
                        worker=worker, model_check=model_check)


def cmd_finetune(args: argparse.Namespace) -> None:
    _run_training_command(args, pretrain=False)


def _resume_dir(args: argparse.Namespace, work_dir: Path) -> Path | None:
    from sp_ray.checkpoint import is_checkpoint

    if args.resume_from:
        resume, flag = Path(args.resume_from), f"--resume-from {args.resume_from}"
    elif args.resume:
        resume, flag = work_dir / "last", f"--resume (reads {work_dir / 'last'})"
    else:
        return None
    if not is_checkpoint(resume):
        raise UserError(
            f"{flag}: {resume} is not a checkpoint directory (no model.pt/config.yaml/meta.json); "
            "give the WORK_DIR/last of a run (--work-dir names the run's directory), or start without --resume"
        )
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
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(config).stem)
    final = _train(args, cfg, work_dir, task="ssl", images=args.images)
    if final is not None:
        print(f"backbone weights: {final / 'backbone.pth'} (use as model.backbone_weights)")


def _check_onnx_file(path: str) -> None:
    """A clear error for a file that is not an ONNX model, before onnxruntime's own."""
    import onnx

    if not Path(path).is_file():
        raise UserError(f"--onnx {path} does not exist; export a model with 'sp-ray export'")
    try:
        onnx.load_model(path, load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends: the bytes are not an ONNX model
        first = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise UserError(
            f"--onnx {path} is not an ONNX model ({first}); pass the .onnx file written by 'sp-ray export'"
        ) from None


def cmd_evaluate(args: argparse.Namespace) -> None:
    from sp_ray.evaluation.coco_eval import evaluate_checkpoint, evaluate_onnx
    from sp_ray.train.preflight import check_coco_data, check_output_file

    if args.write_predictions is not None and not (args.checkpoint or args.onnx):
        raise UserError("--write-predictions applies to --checkpoint / --onnx (a model's predictions); "
                        "--results and --predictions score predictions already written")
    if args.results or args.predictions:
        _score_existing_predictions(args)
        return
    if (args.trt_cache is not None or args.trt_fp16) and not args.onnx:
        raise UserError("--trt-cache and --trt-fp16 apply to --onnx (onnxruntime's TensorRT provider)")
    gpu = _gpu_settings(args, max_batch=1) if args.onnx else None  # evaluate_onnx runs one image per graph run
    if args.onnx:
        if args.overrides:
            raise ConfigError("KEY=VALUE overrides apply to --checkpoint; an ONNX model carries its thresholds")
        default_out = Path(args.onnx).with_name(Path(args.onnx).stem + "_eval") / "metrics.json"
    else:
        default_out = Path(args.checkpoint) / "eval" / "metrics.json"
    out = Path(args.out) if args.out else default_out
    predictions = Path(args.write_predictions) if args.write_predictions else out.with_name("predictions.json")
    # Everything that can fail on the input fails now, not after the evaluation.
    _check_evaluation_outputs(out)
    check_output_file(predictions, what="--write-predictions")
    check_coco_data(args.annotations, args.images, what="--annotations / --images", images_what="--images")
    if args.onnx:
        _check_onnx_file(args.onnx)
        metrics, results = evaluate_onnx(
            args.onnx, annotations=args.annotations, images=args.images,
            providers=None if args.gpu else ["CPUExecutionProvider"], threads=args.threads,
            gpu=gpu, per_category=True,
        )
    else:
        metrics, results = evaluate_checkpoint(
            args.checkpoint, annotations=args.annotations, images=args.images,
            overrides=args.overrides, use_gpu=args.gpu, per_category=True,
        )
    predictions.parent.mkdir(parents=True, exist_ok=True)
    predictions.write_text(json.dumps(results))
    _write_evaluation(metrics, out, source=f"{args.onnx or args.checkpoint} on {args.annotations}")
    print(f"predictions: {predictions} ({len(results)} instances)")


def _check_evaluation_outputs(out: Path) -> None:
    from sp_ray.evaluation.per_category import report_paths
    from sp_ray.train.preflight import check_output_file

    check_output_file(out, what="--out")
    for path in report_paths(out).values():
        check_output_file(path, what="--out (its per-category files)")


def _write_evaluation(metrics: dict, out: Path, *, source: str) -> None:
    """Write the metrics json with its per-category table and precision-recall PNGs, and print them."""
    from sp_ray.evaluation.coco_eval import format_metrics
    from sp_ray.evaluation.per_category import format_category_tables, write_category_report

    scores = metrics.pop("per_category")
    metrics["per_category"] = write_category_report(scores, out, source=source)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    print(format_metrics(metrics))
    print()
    print(format_category_tables(scores))
    print()
    print(f"metrics: {out}")
    for name, path in metrics["per_category"]["files"].items():
        print(f"{name}: {path}")


def _score_existing_predictions(args: argparse.Namespace) -> None:
    """``evaluate --results DIR`` (predict's DIR/predictions.json) or ``--predictions FILE`` (another tool's
    COCO results json): COCO AP against --annotations without running a model."""
    from sp_ray.train.preflight import check_coco_data

    given = "--results" if args.results else "--predictions"
    if args.overrides:
        raise ConfigError(f"KEY=VALUE overrides apply to --checkpoint; {given} scores predictions already made")
    if args.gpu or args.threads is not None or args.trt_cache is not None or args.trt_fp16:
        raise UserError(f"--gpu, --threads, --trt-cache and --trt-fp16 run a model; {given} scores predictions "
                        "already made")
    if args.results:
        out = Path(args.out) if args.out else Path(args.results) / "metrics.json"
    else:
        source = Path(args.predictions)
        out = Path(args.out) if args.out else source.with_name(source.stem + "_eval") / "metrics.json"
    _check_evaluation_outputs(out)
    check_coco_data(args.annotations, args.images, what="--annotations / --images", images_what="--images")
    if args.results:
        from sp_ray.predict.score import score_predictions

        metrics = score_predictions(args.results, args.annotations, images_root=args.images, per_category=True)
    else:
        from sp_ray.evaluation.results_file import evaluate_results_file

        metrics, _ = evaluate_results_file(args.predictions, annotations=args.annotations, images=args.images,
                                           per_category=True)
    _write_evaluation(metrics, out, source=f"{args.results or args.predictions} on {args.annotations}")


def _parse_size(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit():
        raise ValueError(f"--input-size must look like 512x512 (HxW), got {text!r}")
    return int(height), int(width)


def cmd_export(args: argparse.Namespace) -> None:
    from export.exporter.onnx_export import export_checkpoint
    from sp_ray.train.preflight import check_output_file

    check_output_file(args.out, what="--out")

    precision = "fp16" if args.fp16 else "int8" if args.int8 else "fp32"
    result = export_checkpoint(
        args.checkpoint, args.out, opset=args.opset,
        input_size=_parse_size(args.input_size) if args.input_size else None,
        batch_size=None if args.dynamic_batch else args.batch, precision=precision,
        parity_images=args.parity_images, parity_count=args.parity_count,
        calibration_images=args.calibration_images, calibration_count=args.calibration_count,
    )
    info = result.info
    size = "x".join(map(str, info.input_size)) if info.input_size else "dynamic"
    print(result.parity.summary())
    print(f"wrote {result.path} ({info.family}, {info.precision}, input {size}, "
          f"batch {info.batch_size or 'dynamic'}, {len(info.class_names)} classes)")


def cmd_benchmark(args: argparse.Namespace) -> int:
    from sp_ray.benchmark.report import markdown_table, write_report
    from sp_ray.benchmark.run import BenchmarkOptions, run_benchmark

    report = run_benchmark(BenchmarkOptions(
        checkpoint=args.checkpoint, annotations=args.annotations, images=args.images, out=args.out,
        formats=tuple(args.formats), threads=args.threads, batch=args.batch, rounds=args.rounds,
        warmup=args.warmup, parity_count=args.parity_count, calibration_count=args.calibration_count,
    ))
    files = write_report(report)
    print(markdown_table(report))
    print("wrote " + ", ".join(str(path) for path in files.values()))
    if not report.ran:
        print("sp-ray benchmark: error: no format ran; each row's error is above, tracebacks in "
              f"{files['json']}", file=sys.stderr)
        return 1
    return 0


def cmd_predict(args: argparse.Namespace) -> None:
    from sp_ray.predict.pipeline import PredictOptions, predict

    if args.annotations is not None and not Path(args.annotations).is_file():
        raise UserError(f"--annotations {args.annotations} does not exist; pass the COCO json of the source images")
    summary = predict(PredictOptions(
        model=args.model, source=args.source, out=args.out, num_actors=args.num_actors, threads=args.threads,
        batch_size=args.batch_size, shard_size=args.shard_size, score_threshold=args.score_threshold,
        overlays=args.overlays, gpu=args.gpu, resume=args.resume,
        trt_cache=os.path.abspath(args.trt_cache) if args.trt_cache is not None else None, trt_fp16=args.trt_fp16,
    ))
    print(json.dumps(summary, indent=2))
    if args.annotations is not None:
        from sp_ray.evaluation.coco_eval import format_metrics
        from sp_ray.predict.score import score_predictions

        metrics = score_predictions(args.out, args.annotations)
        (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(format_metrics(metrics))
        print(f"metrics: {Path(args.out) / 'metrics.json'}")


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
    from sp_ray.demo import DEMO, TINY, run_demo

    run_demo(Path(args.out), TINY if args.tiny else DEMO, force=args.force, redo=args.redo)


def _run_invocation(args: argparse.Namespace) -> tuple[str, ...]:
    """The ``sp-ray run`` arguments of ``args`` without --out / --force / --redo (the report's commands)."""
    parts = ["run", "--annotations", args.annotations, "--images", args.images]
    for flag, value in (("--val-annotations", args.val_annotations), ("--val-images", args.val_images),
                        ("--backbone-weights", args.backbone_weights)):
        if value is not None:
            parts += [flag, value]
    if args.unlabeled:
        parts += ["--unlabeled", *args.unlabeled]
    if args.all_labels:
        parts.append("--all-labels")
    elif args.fractions:
        parts += ["--fractions", *(f"{f:g}" for f in args.fractions)]
    parts += ["--model", args.model, "--preset", args.preset]
    if args.baseline:
        parts += ["--baseline", args.baseline]
    if args.num_workers is not None:
        parts += ["--num-workers", str(args.num_workers)]
    if args.gpu:
        parts.append("--gpu")
    return (*parts, *args.overrides)


def run_settings_of(args: argparse.Namespace) -> RunSettings:
    """The `RunSettings` of parsed ``sp-ray run`` arguments."""
    from sp_ray.run.options import run_settings

    if args.num_workers is not None and args.num_workers < 1:
        raise UserError(f"--num-workers {args.num_workers}: it must be >= 1 (Ray Train workers)")
    return run_settings(
        annotations=args.annotations, images=args.images, val_annotations=args.val_annotations,
        val_images=args.val_images, unlabeled=args.unlabeled,
        fractions=(1.0,) if args.all_labels else tuple(args.fractions or (0.05, 0.1)), family=args.model,
        baseline=args.baseline, preset=args.preset, backbone_weights=args.backbone_weights,
        num_workers=args.num_workers, gpu=args.gpu, overrides=args.overrides, invocation=_run_invocation(args),
    )


def cmd_run(args: argparse.Namespace) -> None:
    settings = run_settings_of(args)
    from sp_ray.run import run_pipeline

    run_pipeline(Path(args.out), settings, force=args.force, redo=args.redo)
    print(f"report: {Path(args.out) / 'report.html'} (and report.md)")


def cmd_serve(args: argparse.Namespace) -> None:
    from sp_ray.serve.run import serve_forever
    from sp_ray.serve.settings import ServeSettings

    limits = {name: value for name, value in (("max_body_mb", args.max_body_mb),
                                               ("max_image_pixels", args.max_image_pixels)) if value is not None}
    serve_forever(ServeSettings(
        model=args.model, host=args.host, port=args.port, replicas=args.replicas,
        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s, threads=args.threads,
        gpu=args.gpu, trt_cache=os.path.abspath(args.trt_cache) if args.trt_cache is not None else None,
        trt_fp16=args.trt_fp16, **limits,
    ))


COMMANDS = {
    "data": cmd_data,
    "propose": cmd_propose,
    "finetune": cmd_finetune,
    "ssl": cmd_ssl,
    "pretrain": cmd_pretrain,
    "analyze-kernels": cmd_analyze_kernels,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "benchmark": cmd_benchmark,
    "predict": cmd_predict,
    "tune": cmd_tune,
    "run": cmd_run,
    "demo": cmd_demo,
    "serve": cmd_serve,
}


# Commands whose interruption can be continued with --resume.
RESUMABLE = ("finetune", "pretrain", "ssl", "tune", "predict")


def _resume_hint(argv: list[str], args: argparse.Namespace) -> str:
    """What to run to continue an interrupted command: the same command line with --resume."""
    from sp_ray.checkpoint import is_checkpoint

    if args.command in ("run", "demo"):
        return f"continue it with the same command ({shlex.join(['sp-ray', *argv])}): finished steps are skipped"
    if args.command not in RESUMABLE:
        return "nothing is resumable; run the command again"
    kept: list[str] = []
    skip_next = False
    for token in argv:
        if skip_next:
            skip_next = False
        elif token == "--resume-from":
            skip_next = True
        elif token != "--resume" and not token.startswith("--resume-from="):
            kept.append(token)
    command = shlex.join(["sp-ray", *kept, "--resume"])
    if args.command in ("tune", "predict"):
        return f"continue it with: {command}"
    config = getattr(args, "config", None) or str(REPO_CONFIGS / "densecl_r50.yaml")
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(config).stem)
    if not is_checkpoint(work_dir / "last"):
        return f"no checkpoint was written in {work_dir} yet; run the same command again to start over"
    return f"continue it from {work_dir / 'last'} with: {command}"


def _one_line(err: BaseException) -> str:
    """The message of a known error type, with the path of an OSError."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}; check the path and its permissions"
    return str(err)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; KEY=VALUE overrides may also follow options (``--resume model.x=1``).

    argparse reads one run of positionals per subcommand, so overrides after an option would be
    "unrecognized"; they are appended to ``overrides`` in their order instead.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    late = [token for token in unknown if "=" in token and not token.startswith("-")]
    rest = [token for token in unknown if token not in late]
    if rest or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest or late)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one ``sp-ray`` command; the return value is the exit status.

    The one error boundary: a known error type (``UserError`` and ``ConfigError``, ``ValueError``,
    ``FileNotFoundError`` and the other ``OSError`` of a path) is printed as one line naming the thing
    and what to do, exit 2; ``--debug`` or ``SP_RAY_DEBUG=1`` shows the traceback instead. Ctrl-C
    (SIGINT) prints the command that continues the run and exits 130.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("SP_RAY_DEBUG", "") not in ("", "0")
    interrupted = False

    def on_sigint(signum: int, frame: object) -> None:
        # Ray may turn the KeyboardInterrupt into an error of its own; the flag says what happened.
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    try:
        # A command returns nothing, or its exit status when it finished without an exception but not
        # fully (benchmark: no format ran).
        status = COMMANDS[args.command](args)
    except BaseException as err:
        if interrupted or isinstance(err, KeyboardInterrupt):
            print(f"sp-ray {args.command}: interrupted; {_resume_hint(argv, args)}", file=sys.stderr)
            return 130
        if debug or not isinstance(err, (UserError, ValueError, OSError)):
            raise
        print(f"sp-ray {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return status or 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
