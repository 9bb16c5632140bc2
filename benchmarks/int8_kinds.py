"""Which kinds of node static int8 may quantize: AP, parity and graph time of a trained checkpoint per choice.

For one checkpoint, export fp32 once, then quantize it with each ``--variants`` entry (comma-separated
kinds of ``export.exporter.quantize.KINDS``: conv, roi_conv, linear, dynamic), calibrated on ``--calibration-count``
images of ``--images``, and report for each: COCO segm / bbox AP through the runtime (as ``sp-ray evaluate
--onnx``), parity against PyTorch fp32 on ``--parity-count`` images, and the graph's median time on one
prepared image (the graphs interleaved round by round). This is how ``export.exporter.quantize.INT8_KINDS`` was chosen:

    python benchmarks/int8_kinds.py --checkpoint runs/demo/finetune/sp_10pct/final \\
        --annotations runs/demo/data/val.json --images runs/demo/data/images \\
        --variants conv conv,linear conv,linear,dynamic --out benchmarks/results/int8_kinds_knet

writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.exporter.onnx_export import (
    check_parity,
    convert_precision,
    export_checkpoint,
    load_calibration_images,
    sample_images,
)
from export.runtime import Segmenter
from sp_ray.checkpoint import load_checkpoint
from sp_ray.evaluation.coco_eval import evaluate_onnx
from sp_ray.machine import describe_cpu
from sp_ray.models import build_model

CPU = ["CPUExecutionProvider"]


def load_model(checkpoint: str):
    ckpt = load_checkpoint(checkpoint)
    cfg = dataclasses.replace(ckpt.config, model=dataclasses.replace(ckpt.config.model, backbone_weights=None))
    model = build_model(cfg)
    model.load_state_dict(ckpt.model_state)
    return model.eval()


def graph_times(paths: dict[str, Path], image: np.ndarray, *, threads: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per run of each graph on one prepared image, interleaved round by round after one warm-up."""
    sessions = {name: Segmenter(path, providers=CPU, threads=threads) for name, path in paths.items()}
    batches = {name: s.prepare_batch([image])[0] for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for round_index in range(rounds + 1):
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            start = time.perf_counter()
            sessions[name].run(batches[name])
            if round_index:
                times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--variants", nargs="+", required=True, help="comma-separated kinds, e.g. conv conv,linear")
    p.add_argument("--calibration-count", type=int, default=32)
    p.add_argument("--parity-count", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    model = load_model(args.checkpoint)
    calibration = load_calibration_images(args.images, count=args.calibration_count)
    parity_images = sample_images(args.images, count=args.parity_count)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": export_checkpoint(args.checkpoint, Path(tmp) / "fp32.onnx", parity_images=args.images).path}
        info = Segmenter(paths["fp32"], providers=CPU).info
        for variant in args.variants:
            path = Path(tmp) / f"int8_{variant.replace(',', '_')}.onnx"
            shutil.copy(paths["fp32"], path)
            convert_precision(path, "int8", info, calibration=calibration, int8_kinds=variant.split(","))
            paths[variant] = path
            rows[variant] = {"parity": dataclasses.asdict(check_parity(model, path, parity_images))}
        rows["fp32"] = {"parity": None}
        for name, path in paths.items():
            metrics, _ = evaluate_onnx(str(path), annotations=args.annotations, images=args.images, providers=CPU)
            rows[name].update(segm_ap=metrics["segm"]["AP"], bbox_ap=metrics["bbox"]["AP"])
        for name, seconds in graph_times(paths, calibration[0], threads=args.threads, rounds=args.rounds).items():
            rows[name].update(median_ms=float(np.median(seconds) * 1000),
                              p95_ms=float(np.percentile(seconds, 95) * 1000))
    lines = [f"Static int8 by kind of node: {args.checkpoint}, {describe_cpu()}, {args.threads} threads, "
             f"onnxruntime {ort.__version__}, load average {os.getloadavg()[0]:.1f} at the end", "",
             "| graph | segm AP | bbox AP | matched | pooled mask IoU | max score diff | median ms | x fp32 speed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ["fp32", *args.variants]:
        row, parity = rows[name], rows[name]["parity"]
        matched = f"{parity['matched']}/{parity['detections']}" if parity else "-"
        iou = f"{parity['pooled_iou']:.3f}" if parity else "-"
        diff = f"{parity['max_score_diff']:.3f}" if parity else "-"
        lines.append(f"| {name} | {row['segm_ap']:.2f} | {row['bbox_ap']:.2f} | {matched} | {iou} | {diff} | "
                     f"{row['median_ms']:.1f} | {rows['fp32']['median_ms'] / row['median_ms']:.2f} |")
    command = "python benchmarks/int8_kinds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join(lines) + f"\n\n`{command}`\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "cpu": describe_cpu(), "rows": rows},
                                                   indent=2, default=str))
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
