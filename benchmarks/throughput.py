"""Inference throughput: the query-based families against Mask R-CNN and the bare backbone, PyTorch eager and
onnxruntime, fp32 and int8, in one interleaved run.

The models get the same ResNet depth, input size and number of classes, random weights (speed does
not depend on them, with one exception handled below), and the same measurement. The rows:

- "torch" / "onnxruntime": the exported graph's computation, uint8 batch [B, 3, S, S] in, fixed-size
  detections out (K-Net, Mask2Former, QueryInst: backbone, heads and top-k; Mask R-CNN: backbone, RPN, box head,
  NMS, mask head), in PyTorch eager (the export adapter, ``torch.inference_mode``) and in onnxruntime (the
  query-based families: one dynamic-batch graph; Mask R-CNN: one fixed-batch graph per batch size, as its
  exporter requires).
- "onnxruntime-e2e": ``Segmenter.predict_batch`` on S x S uint8 images, i.e. what a deployment pays:
  resize/pad, the graph, and decoding to boolean masks at the image size.
- family "floor": the bare ResNet + FPN that every R50 segmenter pays (K-Net's own backbone and FPN modules):
  uint8 [B, 3, S, S] -> float -> ImageNet normalisation -> ResNet -> FPN -> P2..P5 out, nothing after. Its
  graph is exported like K-Net's (dynamo, dynamic batch, fixed size) and run in a plain onnxruntime session
  with the options of ``Segmenter`` (``export.runtime.session_options``); "torch" and "onnxruntime" rows only,
  as it has nothing to decode.
- precision "int8" (onnxruntime rows): the fp32 graph after calibrated static QDQ quantization
  (``export.quantize``: ``quantize_int8`` for the models, ``quantize_static_int8`` on ready batches for the
  floor), calibrated on ``CALIBRATION_IMAGES`` synthetic images of S x S. PyTorch rows are fp32 only.
- "x floor": a row's time per image over that of the fp32 floor of the same runtime and batch (the
  onnxruntime floor for "onnxruntime-e2e" rows): 1.00 is the backbone alone, 1.50 a model whose heads and
  decoding add half the backbone's cost. Under the table, each query-based family's images/s over Mask
  R-CNN's, per runtime, precision and batch.

Mask R-CNN's box score threshold is 0 (the sp-ray default), so every image carries the full
100 detections through the mask head, as in COCO evaluation; a random model with torchvision's
0.05 threshold would detect nothing and skip the mask head. K-Net always selects its top 100.

Measurement: every configuration (family, runtime, precision, batch) gets one persistent worker process
(``benchmarks/throughput_worker.py``), loaded once, that the driver talks to over stdin / stdout JSON lines.
The driver then runs ``--warmup`` untimed rounds and ``--iterations`` timed rounds; in each round every
worker runs one step in turn, the order rotated by one each round, so that load from other jobs on a shared
machine falls on every contender alike. Per configuration: images/s = B x iterations / total timed seconds,
latency p50 / p95 per batch, and the peak resident memory: the worker process's high-water mark (VmHWM),
i.e. that configuration's alone; onnxruntime workers import numpy and onnxruntime only (no torch), so
theirs is what a deployment of ``export.runtime`` holds. All workers stay resident for the whole run, so
the machine needs the sum of their memories (printed under the table; run ``--batches 1`` and
``--batches 8`` separately where that does not fit). ``--in-process`` loads every configuration in this
process instead (for tests; still interleaved by round; the peak is then the one process's). The JSON
records every step (round, configuration, start and end on the system-wide monotonic clock). With
``--device cuda`` (the default when a GPU is present) PyTorch runs on the GPU and onnxruntime must run on
its CUDA execution provider: the run stops if onnxruntime falls back to the CPU.

    python benchmarks/throughput.py --depth 50 --size 512 --batches 1 8 --threads 1 \\
        --out benchmarks/results/cpu_r50_512               # K-Net, Mask R-CNN, floor; fp32 and int8
    python benchmarks/throughput.py --families knet mask2former queryinst maskrcnn floor ...  # all families
    python benchmarks/throughput.py --precisions fp32 --runtimes onnxruntime ...              # fewer rows
    python benchmarks/throughput.py --depth 18 --size 128 --batches 1 --iterations 2 --warmup 1 \\
        --families knet maskrcnn floor --out /tmp/tp_check                                    # a quick check

writes OUT.json, OUT.md (the table printed at the end) and OUT.png (bar chart of images/s).

``--image-sides 512 2000 4000`` measures something else: what one image of each side costs through
``Segmenter.predict`` (batch 1) with the graph's work held fixed (every image is resized to ``--size``
on its long side, as the training resize with ``data.max_size = data.short_size = --size`` does), i.e.
the pre- and post-processing that grow with the image: resize, mask pasting, RLE with ``--rle``. Each
side runs in a fresh process that imports numpy and onnxruntime only, after one warm-up image of 512 px;
the peak is that process's high-water mark (VmHWM). The image is a synthetic one (shapes on textures)
resized to each side. ``--runtime-from CHECKOUT`` runs the same model through another checkout's runtime
(before / after a change). It writes OUT.json and OUT.md (no chart):

    python benchmarks/throughput.py --image-sides 512 1000 2000 4000 --size 800 --families knet \\
        --iterations 1 --warmup 0 --threads 1 --out benchmarks/results/cpu_r50_image_sides
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from export.metadata import INPUT_NAME, ModelInfo
from export.onnx_export import DEFAULT_OPSET, FAMILIES, _quiet_converters, export_model, model_info
from export.quantize import INT8_KINDS, quantize_int8, quantize_static_int8
from sp_ray.config import Config, load_config
from sp_ray.machine import cpu_facts, describe_cpu
from sp_ray.models import build_model
from sp_ray.models.knet import IMAGENET_MEAN, IMAGENET_STD
from sp_ray.models.maskrcnn import build_maskrcnn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package: its worker module
from throughput_worker import FLOOR, Contender, final_facts, load_contender, random_batch, timed_step  # noqa: E402

WORKER = Path(__file__).resolve().with_name("throughput_worker.py")
TITLES = {"knet": "K-Net", "mask2former": "Mask2Former", "queryinst": "QueryInst", "maskrcnn": "Mask R-CNN",
          FLOOR: "floor (ResNet + FPN)"}
# Settings of a family that differ from the dataclass defaults (Mask2Former: the paper's 9 decoder layers;
# QueryInst: its 6 dynamic stages).
FAMILY_OVERRIDES = {"mask2former": ["model.num_stages=9"], "queryinst": ["model.num_stages=6"]}
RUNTIMES = ("torch", "onnxruntime", "onnxruntime-e2e")
PRECISIONS = ("fp32", "int8")
# The floor row each runtime's rows are compared with: the floor has no decoding, so no e2e row of its own.
FLOOR_RUNTIME = {"torch": "torch", "onnxruntime": "onnxruntime", "onnxruntime-e2e": "onnxruntime"}
FLOOR_OUTPUTS = ("p2", "p3", "p4", "p5")
CALIBRATION_IMAGES = 8


def bench_config(job: dict) -> Config:
    """The config of a benchmarked model: the defaults of each family (K-Net: 100 kernels, 3 stages;
    Mask2Former: 100 queries, 9 decoder layers, 6 pixel-decoder layers). The floor's is K-Net's."""
    size, family = job["size"], "knet" if job["family"] == FLOOR else job["family"]
    return load_config(None, [
        f"model.name={family}", f"model.depth={job['depth']}", f"model.num_classes={job['num_classes']}",
        f"data.max_size={size}", f"data.short_size={size}", f"eval.topk={job['topk']}",
        *FAMILY_OVERRIDES.get(family, []),
    ])  # fmt: skip


def build_random_model(job: dict, seed: int = 0) -> torch.nn.Module:
    """The randomly initialised model of ``job``; Mask R-CNN with ``job["proposals"]`` RPN proposals."""
    torch.manual_seed(seed)
    cfg = bench_config(job)
    if job["family"] == "maskrcnn":
        m = cfg.model
        return build_maskrcnn(
            num_classes=m.num_classes, depth=m.depth, frozen_stages=m.frozen_stages, norm_eval=m.norm_eval,
            detections_per_image=job["topk"], test_proposals=job["proposals"],
        ).eval()
    model = build_model(cfg)
    return model.eval()


class Floor(nn.Module):
    """The bare backbone of a segmenter: normalisation, ResNet, FPN, and nothing after.

    Args:
        backbone: float [B, 3, H, W] normalised image -> [C2..C5] (``sp_ray.models.backbone.ResNetBackbone``).
        fpn: [C2..C5] -> [P2..P5] (``sp_ray.models.backbone.FPN``).
    """

    def __init__(self, backbone: nn.Module, fpn: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        # The normalisation of the models' forward (K-Net's buffers), so the floor pays it too.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """Args: images uint8 [B, 3, H, W] (RGB 0..255, H and W multiples of 32).

        Returns:
            (P2, P3, P4, P5), float [B, D, H / 2^(i+2), W / 2^(i+2)], D the FPN channels.
        """
        x = (images.float() - self.pixel_mean) / self.pixel_std
        return tuple(self.fpn(self.backbone(x)))


def build_floor(job: dict, seed: int = 0) -> Floor:
    """The floor of ``job``: the backbone and FPN modules of the benchmark's random K-Net (same depth, FPN
    channels, frozen BatchNorm), so the floor is exactly the part of K-Net that every R50 segmenter has."""
    knet = build_random_model({**job, "family": "knet"}, seed)
    return Floor(knet.backbone, knet.fpn).eval()


def export_floor(job: dict, out: Path) -> Path:
    """Export the floor of ``job`` to ``out``: uint8 [B, 3, S, S] ``images`` in (dynamic B, as K-Net's graph),
    float P2..P5 out; the dynamo exporter, as for K-Net (``export.onnx_export._export_dynamo``)."""
    import onnx
    from torch.export import Dim

    size = job["size"]
    # torch.export specialises a dimension of size 1: trace a batch of 2 for the dynamic batch.
    example = torch.from_numpy(random_batch(2, size))
    with warnings.catch_warnings(), torch.no_grad(), _quiet_converters():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            build_floor(job), (example,), dynamo=True, opset_version=DEFAULT_OPSET, input_names=[INPUT_NAME],
            output_names=list(FLOOR_OUTPUTS), dynamic_shapes={"images": {0: Dim("batch", min=1, max=1024)}},
            verbose=False,
        )
        program.optimize()
        program.save(str(out))
    onnx.checker.check_model(str(out), full_check=True)
    return out


def torch_module(job: dict) -> nn.Module:
    """The eval-mode PyTorch module of a "torch" job, uint8 [B, 3, S, S] in: the floor, or the family's export
    adapter around the random model (what the ONNX graph was exported from)."""
    if job["family"] == FLOOR:
        return build_floor(job)
    return FAMILIES[job["family"]].wrap(build_random_model(job), job["topk"]).eval()


# ---------------------------------------------------------------------------------------------------------
# The driver: one worker per configuration, interleaved round by round.


class Worker(Protocol):
    name: str

    def step(self) -> dict[str, float]: ...

    def stop(self) -> dict: ...

    def kill(self) -> None: ...


class LocalWorker:
    """A configuration loaded in this process (``--in-process``)."""

    def __init__(self, name: str, job: dict) -> None:
        self.name = name
        self.contender: Contender = load_contender(job, torch_module)

    def step(self) -> dict[str, float]:
        return timed_step(self.contender)

    def stop(self) -> dict:
        return final_facts(self.contender)

    def kill(self) -> None:
        pass


class ProcessWorker:
    """A configuration loaded in its own process (``throughput_worker.py``), spoken to over JSON lines; its
    stderr goes to ``log`` and is quoted when it fails."""

    def __init__(self, name: str, job: dict, log: Path) -> None:
        self.name = name
        self.log = log
        with open(log, "w") as err:
            self.process = subprocess.Popen([sys.executable, str(WORKER), json.dumps(job)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self._read()  # {"ready": true} once the model or session is loaded

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            tail = self.log.read_text()[-3000:]
            raise RuntimeError(f"benchmark worker for {self.name} exited ({self.process.returncode}):\n{tail}")
        return json.loads(line)

    def _request(self, op: str) -> dict:
        self.process.stdin.write(json.dumps({"op": op}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def step(self) -> dict[str, float]:
        return self._request("step")

    def stop(self) -> dict:
        facts = self._request("stop")
        self.process.wait()
        return facts

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def config_name(job: dict) -> str:
    """"family runtime precision bB", the key of a configuration in the JSON's steps."""
    return f"{job['family']} {job['runtime']} {job['precision']} b{job['batch']}"


def run_rounds(workers: Sequence[Worker], *, warmup: int, iterations: int) -> list[dict]:
    """``warmup`` untimed then ``iterations`` timed rounds; each round, every worker one step in turn, the
    order rotated by one each round (so no configuration always runs first, or always after the same one).

    Returns:
        Every step in the order run: {"round" (0-based, warm-up included), "timed", "config", "start", "end"}.
    """
    steps = []
    total = warmup + iterations
    for round_index in range(total):
        shift = round_index % len(workers)
        began = time.monotonic()
        for worker in [*workers[shift:], *workers[:shift]]:
            steps.append({"round": round_index, "timed": round_index >= warmup, "config": worker.name,
                          **worker.step()})
        kind = "warm-up" if round_index < warmup else "timed"
        print(f"round {round_index + 1}/{total} ({kind}): {time.monotonic() - began:.1f} s", flush=True)
    return steps


def start_workers(jobs: Sequence[dict], *, in_process: bool, folder: Path) -> list[Worker]:
    """One worker per job, loaded one after the other (so loading never competes with loading)."""
    workers: list[Worker] = []
    try:
        for i, job in enumerate(jobs):
            name = config_name(job)
            start = time.perf_counter()
            if in_process:
                workers.append(LocalWorker(name, job))
            else:
                workers.append(ProcessWorker(name, job, folder / f"worker_{i}.log"))
            print(f"loaded {name} ({i + 1}/{len(jobs)}) in {time.perf_counter() - start:.1f} s", flush=True)
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return workers


def measure(jobs: Sequence[dict], *, warmup: int, iterations: int, in_process: bool,
            folder: Path) -> tuple[list[dict], list[dict]]:
    """Load every job, run the rounds, stop the workers; returns (one result row per job, every step)."""
    workers = start_workers(jobs, in_process=in_process, folder=folder)
    try:
        steps = run_rounds(workers, warmup=warmup, iterations=iterations)
        facts = [worker.stop() for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    results = []
    for job, fact in zip(jobs, facts, strict=True):
        latencies = [s["end"] - s["start"] for s in steps if s["timed"] and s["config"] == config_name(job)]
        results.append(result_row(job, latencies, fact, warmup=warmup))
    return results, steps


def result_row(job: dict, latencies: Sequence[float], facts: dict, *, warmup: int) -> dict:
    """The row of one configuration from its timed latencies (seconds per batch) and its worker's facts."""
    return {
        **{k: job[k] for k in ("family", "runtime", "precision", "batch", "depth", "size", "device")},
        "iterations": len(latencies),
        "warmup": warmup,
        "images_per_second": job["batch"] * len(latencies) / sum(latencies),
        "latency_p50_ms": float(np.percentile(latencies, 50) * 1000),
        "latency_p95_ms": float(np.percentile(latencies, 95) * 1000),
        **facts,
    }


def add_floor_ratios(results: list[dict]) -> None:
    """Set each row's "x_floor": its time per image over the fp32 floor's of the same runtime (the graph-only
    onnxruntime floor for e2e rows) and batch; None where that floor was not measured."""
    floors = {(r["runtime"], r["batch"]): r["images_per_second"] for r in results
              if r["family"] == FLOOR and r["precision"] == "fp32"}
    for r in results:
        floor = floors.get((FLOOR_RUNTIME[r["runtime"]], r["batch"]))
        r["x_floor"] = None if floor is None else floor / r["images_per_second"]


# ---------------------------------------------------------------------------------------------------------
# Exports, calibration and the list of configurations.


def calibration_images(size: int, count: int = CALIBRATION_IMAGES) -> list[np.ndarray]:
    """``count`` uint8 [size, size, 3] synthetic images (shapes on textures), the int8 calibration set."""
    from PIL import Image

    from sp_ray.data.synthetic import write_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_dataset(Path(tmp), num_images=count, image_size=size, seed=1)
        return [np.asarray(Image.open(path).convert("RGB")) for path in sorted(data["images"].iterdir())]


def _quantize(fp32: Path, job: dict, info: ModelInfo | None, images: list[np.ndarray]) -> Path:
    """The int8 (QDQ) twin of the fp32 graph at ``fp32``; ``info`` None for the floor (no ModelInfo)."""
    out = fp32.with_name(fp32.stem + "_int8.onnx")
    start = time.perf_counter()
    if info is None:
        # The floor's input is the uint8 batch itself: one image per calibration run. Its nodes are K-Net's
        # backbone and FPN convolutions, quantized as K-Net's are.
        quantize_static_int8(fp32, out, [image.transpose(2, 0, 1)[None].copy() for image in images],
                             kinds=INT8_KINDS["knet"])
    else:
        quantize_int8(fp32, out, info, images)
    print(f"quantized {job['family']} to int8 in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def export_models(args: argparse.Namespace, folder: Path) -> dict[tuple[str, str, int], str]:
    """(family, precision, batch) -> .onnx: one dynamic-batch graph for the query-based families and the floor,
    one fixed-batch graph per batch size for Mask R-CNN; int8 ones when ``args.precisions`` asks."""
    paths: dict[tuple[str, str, int], str] = {}
    images = calibration_images(args.size) if "int8" in args.precisions else []
    size = args.size
    for family in args.families:
        job = _job(args, family, "onnxruntime", 0)
        model = None if family == FLOOR else build_random_model(job)
        dynamic = family == FLOOR or FAMILIES[family].dynamic_batch
        for batch in [None] if dynamic else args.batches:
            start = time.perf_counter()
            if family == FLOOR:
                info, path = None, export_floor(job, folder / "floor_bdyn.onnx")
            else:
                info = model_info(bench_config(job), class_names=[f"class{i}" for i in range(args.num_classes)],
                                  cat_ids=list(range(1, args.num_classes + 1)), input_size=(size, size),
                                  batch_size=batch)
                path = export_model(model, info, folder / f"{family}_b{batch or 'dyn'}.onnx",
                                    sample=random_batch(batch or 2, size))
            print(f"exported {family} (batch {batch or 'dynamic'}) in {time.perf_counter() - start:.0f} s",
                  flush=True)
            by_precision = {"fp32": path}
            if "int8" in args.precisions:
                by_precision["int8"] = _quantize(path, job, info, images)
            for precision, file in by_precision.items():
                for b in args.batches if batch is None else [batch]:
                    paths[(family, precision, b)] = str(file)
    return paths


def _job(args: argparse.Namespace, family: str, runtime: str, batch: int, onnx: str | None = None,
         precision: str = "fp32") -> dict:
    return {
        "family": family, "runtime": runtime, "precision": precision, "batch": batch, "depth": args.depth,
        "size": args.size, "num_classes": args.num_classes, "topk": args.topk, "proposals": args.proposals,
        "device": args.device, "threads": args.threads, "onnx": onnx,
    }  # fmt: skip


def configurations(args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    """(family, runtime, precision, batch) of every row, in table order. PyTorch rows are fp32 only (int8 is
    the ONNX graph's quantization); the floor has no end-to-end row (nothing to decode)."""
    rows = []
    for family in args.families:
        for batch in args.batches:
            for runtime in args.runtimes:
                if family == FLOOR and runtime == "onnxruntime-e2e":
                    continue
                for precision in args.precisions:
                    if runtime != "torch" or precision == "fp32":
                        rows.append((family, runtime, precision, batch))
    return rows


def jobs(args: argparse.Namespace, onnx_paths: dict[tuple[str, str, int], str]) -> list[dict]:
    return [
        _job(args, family, runtime, batch, onnx_paths.get((family, precision, batch)), precision)
        for family, runtime, precision, batch in configurations(args)
    ]  # fmt: skip


# Runs in a fresh interpreter: numpy, PIL and onnxruntime only, so its memory is the runtime's own.
SIDE_WORKER = """
import json, sys, time
import numpy as np
from export.runtime import Segmenter

job = json.loads(sys.argv[1])


def memory_mb(field):
    # /proc rather than getrusage: ru_maxrss survives exec and would report the parent's peak.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


segmenter = Segmenter(job["onnx"], providers=job["providers"], threads=job["threads"])
segmenter.predict(np.load(job["warmup_image"]), rle=job["rle"])
image = np.load(job["image"])
rss = memory_mb("VmRSS")
for _ in range(job["warmup"]):
    segmenter.predict(image, rle=job["rle"])
latencies, found = [], None
for _ in range(job["iterations"]):
    found = None  # the previous result's masks would double the peak
    start = time.perf_counter()
    found = segmenter.predict(image, rle=job["rle"])
    latencies.append(time.perf_counter() - start)
boxes = found.boxes
area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
print(json.dumps({"latencies": latencies, "peak_rss_mb": memory_mb("VmHWM"), "rss_before_mb": rss,
                  "instances": len(found), "box_fraction": float(area.mean()) / image.shape[0] / image.shape[1]
                  if len(found) else 0.0}))
"""


def sample_image(side: int) -> np.ndarray:
    """uint8 [side, side, 3]: a 512 x 512 synthetic image (shapes on textures) resized bilinearly to ``side``."""
    from PIL import Image

    from sp_ray.data.synthetic import write_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_dataset(Path(tmp), num_images=2, image_size=512, seed=0)
        image = Image.open(sorted(data["images"].iterdir())[0]).convert("RGB")
        return np.asarray(image.resize((side, side), Image.BILINEAR))


def measure_image_sides(args: argparse.Namespace) -> list[dict]:
    """``Segmenter.predict`` latency and peak memory per image side for random models of ``args.families``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = {}
        for family in args.families:
            job = _job(args, family, "onnxruntime-e2e", 1)
            dynamic = FAMILIES[family].dynamo  # Mask R-CNN's TorchScript graph has a fixed input
            info = model_info(bench_config(job), class_names=[f"class{i}" for i in range(args.num_classes)],
                              cat_ids=list(range(1, args.num_classes + 1)),
                              input_size=None if dynamic else (args.size, args.size),
                              batch_size=None if FAMILIES[family].dynamic_batch else 1)
            sample = np.random.default_rng(0).integers(0, 256, (1, 3, args.size, args.size), np.uint8)
            models[family] = str(export_model(build_random_model(job), info, folder / f"{family}.onnx", sample=sample))
        return run_image_sides(models, args, folder)


def run_image_sides(models: dict[str, str], args: argparse.Namespace, folder: Path) -> list[dict]:
    """Measure each exported model (family -> .onnx) at each of ``args.image_sides``; images go to ``folder``."""
    np.save(folder / "warmup.npy", sample_image(512))
    for side in args.image_sides:
        np.save(folder / f"image_{side}.npy", sample_image(side))
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    results = []
    for family, onnx in models.items():
        for side in args.image_sides:
            worker = {"onnx": onnx, "image": str(folder / f"image_{side}.npy"), "rle": args.rle,
                      "warmup_image": str(folder / "warmup.npy"), "warmup": args.warmup,
                      "iterations": args.iterations, "threads": args.threads, "providers": providers}
            done = subprocess.run([sys.executable, "-c", SIDE_WORKER, json.dumps(worker)], capture_output=True,
                                  text=True, **runtime_from(args.runtime_from))
            if done.returncode != 0:
                raise RuntimeError(f"image-side worker failed for {family} at {side} px:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            latencies = row.pop("latencies")
            results.append({"family": family, "depth": args.depth, "size": args.size, "side": side,
                            "rle": args.rle, "latency_p50_ms": float(np.percentile(latencies, 50) * 1000),
                            "latency_max_ms": float(max(latencies) * 1000), **row})
            print(f"{TITLES[family]:10} {side:5d} px: {results[-1]['latency_p50_ms']:.0f} ms, "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    return results


def runtime_from(checkout: str | None) -> dict:
    """subprocess.run arguments that make the side worker import ``export.runtime`` from ``checkout``.

    The worker's ``sys.path[0]`` is its working directory, so it runs there (a checkout of this repository at
    another commit, e.g. ``git worktree add /tmp/before COMMIT``); the model is still exported by this one.
    """
    if checkout is None:
        return {}
    return {"cwd": checkout, "env": {**os.environ, "PYTHONPATH": checkout}}


def image_sides_table(results: list[dict]) -> str:
    rows = ["| model | image side (px) | masks | latency p50 (ms) | x first side | peak RSS (MB) | RSS before (MB) "
            "| detections | mean box / image |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    first = {}
    for r in results:
        first.setdefault(r["family"], r["latency_p50_ms"])
        rows.append(f"| {TITLES[r['family']]} R{r['depth']} | {r['side']} | {'RLE' if r['rle'] else 'dense'} | "
                    f"{r['latency_p50_ms']:.0f} | {r['latency_p50_ms'] / first[r['family']]:.2f} | "
                    f"{r['peak_rss_mb']:.0f} | {r['rss_before_mb']:.0f} | {r['instances']} | "
                    f"{r['box_fraction']:.2f} |")
    return "\n".join(rows)


def row_title(r: dict) -> str:
    return f"{TITLES[r['family']]} R{r['depth']}"


def markdown_table(results: list[dict]) -> str:
    rows = ["| model | runtime | precision | batch | images/s | latency p50 (ms) | latency p95 (ms) | x floor "
            "| peak RSS (MB) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = "n/a" if r.get("x_floor") is None else f"{r['x_floor']:.2f}"
        rows.append(f"| {row_title(r)} | {r['runtime']} | {r['precision']} | {r['batch']} | "
                    f"{r['images_per_second']:.2f} | {r['latency_p50_ms']:.0f} | {r['latency_p95_ms']:.0f} | "
                    f"{ratio} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(rows)


def speedups(results: list[dict]) -> list[str]:
    """Query-based model / Mask R-CNN images/s for every runtime, precision and batch both were measured with."""
    index = {(r["family"], r["runtime"], r["precision"], r["batch"]): r["images_per_second"] for r in results}
    lines = []
    for (family, runtime, precision, batch), value in index.items():
        other = index.get(("maskrcnn", runtime, precision, batch))
        if family not in ("maskrcnn", FLOOR) and other:
            lines.append(f"{TITLES[family]} / Mask R-CNN, {runtime} {precision}, batch {batch}: {value / other:.2f}x")
    return lines


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["runtime"], r["precision"], r["batch"]) for r in results},
                    key=lambda g: (RUNTIMES.index(g[0]), PRECISIONS.index(g[1]), g[2]))
    families = [f for f in TITLES if any(r["family"] == f for r in results)]
    index = {(r["family"], r["runtime"], r["precision"], r["batch"]): r["images_per_second"] for r in results}
    width = 0.8 / max(1, len(families))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for i, family in enumerate(families):
        xs = [g + i * width for g in range(len(groups))]
        ys = [index.get((family, *group), 0.0) for group in groups]
        bars = ax.bar(xs, ys, width, label=TITLES[family])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([g + width * (len(families) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{runtime}\n{precision}, batch {batch}" for runtime, precision, batch in groups], fontsize=8)
    ax.set_ylabel("images / s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(args: argparse.Namespace, providers: Sequence[str] = ()) -> dict:
    """The machine and software of a run: ``sp_ray.machine.cpu_facts`` (model, cores, ISA and int8 flags),
    threads, versions, the onnxruntime providers that ran, and the load average."""
    env = {**cpu_facts(), "cpu_summary": describe_cpu(), "threads": getattr(args, "threads", None),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
           "onnxruntime": ort.__version__, "onnxruntime_providers": list(providers),
           "python": platform.python_version(), "device": args.device}
    if hasattr(os, "getloadavg"):
        env["load_average"] = list(os.getloadavg())
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def header(args: argparse.Namespace, env: dict) -> str:
    """The lines above the table: model size and device; CPU, ISA and int8 flags; threads, versions, provider."""
    threads = f"{args.threads} thread(s)" if args.threads else "default threads"
    machine = env["cpu_summary"] if args.device == "cpu" else env.get("gpu")
    providers = ", ".join(env["onnxruntime_providers"]) or "not run"
    lines = [f"ResNet-{args.depth}, {args.size}x{args.size}, {args.device} ({machine}), {threads}; "
             f"{args.warmup} warm-up and {args.iterations} timed rounds, configurations interleaved",
             f"ISA: {' '.join(env['isa']) or 'unknown'}; int8: {' '.join(env['int8_isa']) or 'no VNNI'}",
             f"torch {env['torch']}, onnxruntime {env['onnxruntime']} on {providers}"]
    if "load_average_before" in env and "load_average" in env:
        lines[-1] += (f"; 1-minute load average {env['load_average_before'][0]:.2f} before, "
                      f"{env['load_average'][0]:.2f} after")
    return "  \n".join(lines)


def memory_note(results: list[dict], *, in_process: bool) -> str:
    """What the run held in memory: every worker stays resident, so the machine needs the sum of their peaks."""
    if in_process:
        return f"Peak RSS: one process (--in-process) for all rows, {max(r['peak_rss_mb'] for r in results):.0f} MB."
    total = sum(r["peak_rss_mb"] for r in results) / 1024
    return f"Peak RSS: each row its own worker process; the {len(results)} workers together held up to {total:.1f} GB."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=50, choices=(18, 34, 50))
    p.add_argument("--size", type=int, default=512, help="square input side, a multiple of 32")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--iterations", type=int, default=10, help="timed rounds (one step of every configuration each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--topk", type=int, default=100, help="detections per image (both models)")
    p.add_argument("--proposals", type=int, default=1000, help="Mask R-CNN RPN proposals (torchvision: 1000)")
    p.add_argument("--families", nargs="+", default=["knet", "maskrcnn", FLOOR], choices=sorted(TITLES),
                   help=f"model families; {FLOOR!r} is the bare ResNet + FPN every row is compared with")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                   help="int8: calibrated static QDQ quantization of the ONNX graphs (onnxruntime rows only)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", choices=("cpu", "cuda"), default=default_device)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of both runtimes")
    p.add_argument("--in-process", action="store_true", help="every configuration in this process (for tests)")
    p.add_argument("--out", default="benchmarks/results/throughput", help="output prefix for .json/.md/.png")
    p.add_argument("--image-sides", type=int, nargs="+", default=None,
                   help="instead of the throughput grid: Segmenter.predict latency and peak memory per image side")
    p.add_argument("--rle", action="store_true", help="with --image-sides: RLE masks instead of dense ones")
    p.add_argument("--runtime-from", metavar="CHECKOUT", default=None,
                   help="with --image-sides: time the export/runtime.py of another checkout (before / after)")
    args = p.parse_args(argv)
    if args.size % 32:
        p.error(f"--size must be a multiple of 32, got {args.size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: PyTorch sees no CUDA device")
    if args.iterations < 1 or args.warmup < 0:
        p.error("--iterations must be >= 1 and --warmup >= 0")
    if args.image_sides is not None and min(args.image_sides) < 1:
        p.error("--image-sides must be positive")
    if args.runtime_from is not None and not (Path(args.runtime_from) / "export" / "runtime.py").is_file():
        p.error(f"--runtime-from {args.runtime_from}: no export/runtime.py there; give a checkout of this repository")
    if args.image_sides is not None and not Path("/proc/self/status").is_file():
        p.error("--image-sides reads peak memory from /proc (Linux only)")
    if args.image_sides is not None and FLOOR in args.families:
        args.families = [f for f in args.families if f != FLOOR]  # the floor has no Segmenter.predict
    if args.image_sides is None and not configurations(args):
        p.error("no configuration to run: the floor has no onnxruntime-e2e row and torch runs fp32 only")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.image_sides is not None:
        return write_image_sides(args, argv, out)
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as tmp:
        needs_onnx = any(r.startswith("onnxruntime") for r in args.runtimes)
        onnx_paths = export_models(args, Path(tmp)) if needs_onnx else {}
        results, steps = measure(jobs(args, onnx_paths), warmup=args.warmup, iterations=args.iterations,
                                 in_process=args.in_process, folder=Path(tmp))
    add_floor_ratios(results)
    command = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    providers = next((r["providers"] for r in results if r["runtime"] != "torch"), [])
    env = environment(args, providers)
    if load_before is not None:
        env["load_average_before"] = load_before
    table = markdown_table(results)
    notes = speedups(results)
    title = header(args, env)
    memory = memory_note(results, in_process=args.in_process)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "environment": env, "results": results, "speedups": notes, "steps": steps}, indent=2))
    text = (f"{title}\n\n{table}\n\n" + "".join(f"- {line}\n" for line in notes)
            + f"\n{memory}\n\n`{command}`\n")
    out.with_suffix(".md").write_text(text)
    plot(results, out.with_suffix(".png"), title.split("  \n")[0])
    print("\n" + text)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


def write_image_sides(args: argparse.Namespace, argv: list[str] | None, out: Path) -> int:
    results = measure_image_sides(args)
    command = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = environment(args)
    threads = f"{args.threads} thread(s)" if args.threads else "default threads"
    machine = env["cpu"] if args.device == "cpu" else env.get("gpu")
    title = (f"Segmenter.predict, one image per side, graph input {args.size} px on the long side, "
             f"ResNet-{args.depth}, {args.device} ({machine}, {threads})")
    if args.runtime_from:
        title += f", runtime of {args.runtime_from}"
        env["runtime_from"] = args.runtime_from
    out.with_suffix(".json").write_text(json.dumps({"command": command, "environment": env, "results": results},
                                                   indent=2))
    text = f"{title}\n\n{image_sides_table(results)}\n\n`{command}`\n"
    out.with_suffix(".md").write_text(text)
    print("\n" + text)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
