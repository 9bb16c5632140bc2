"""Inference throughput: the query-based families against Mask R-CNN, PyTorch eager and onnxruntime, in one run.

The models get the same ResNet depth, input size and number of classes, random weights (speed does
not depend on them, with one exception handled below), and the same measurement:

- "model": the exported graph's computation, uint8 batch [B, 3, S, S] in, fixed-size detections
  out (K-Net, Mask2Former: backbone, heads and top-k; Mask R-CNN: backbone, RPN, box head, NMS, mask head),
  in PyTorch eager (the export adapter, ``torch.inference_mode``) and in onnxruntime (K-Net: one
  dynamic-batch graph; Mask R-CNN: one fixed-batch graph per batch size, as its exporter requires).
- "end-to-end" (onnxruntime only): ``Segmenter.predict_batch`` on S x S uint8 images, i.e. what a
  deployment pays: resize/pad, the graph, and decoding to boolean masks at the image size.

Mask R-CNN's box score threshold is 0 (the sp-ray default), so every image carries the full
100 detections through the mask head, as in COCO evaluation; a random model with torchvision's
0.05 threshold would detect nothing and skip the mask head. K-Net always selects its top 100.

Each configuration is timed after ``--warmup`` untimed runs over ``--iterations`` runs: images/s =
B x iterations / total time, latency p50 / p95 per batch, and the peak resident memory (RSS) of the
process during that configuration. By default every configuration runs in a fresh subprocess, so the
peak is that configuration's alone; ``--in-process`` runs them in one process (faster, for tests),
where the peak includes what earlier configurations left allocated. With ``--device cuda`` (the
default when a GPU is present) PyTorch runs on the GPU and onnxruntime must run on its CUDA
execution provider: the run stops if onnxruntime falls back to the CPU.

    python benchmarks/throughput.py --depth 50 --size 512 --batches 1 8 --out benchmarks/results/cpu_r50_512
    python benchmarks/throughput.py --families knet mask2former maskrcnn ...   # with Mask2Former
    python benchmarks/throughput.py --families knet queryinst maskrcnn ...     # with QueryInst

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
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.onnx_export import FAMILIES, export_model, model_info
from export.runtime import Segmenter
from sp_ray.config import Config, load_config
from sp_ray.models import build_model
from sp_ray.models.maskrcnn import build_maskrcnn

TITLES = {"knet": "K-Net", "mask2former": "Mask2Former", "queryinst": "QueryInst", "maskrcnn": "Mask R-CNN"}
# Settings of a family that differ from the dataclass defaults (Mask2Former: the paper's 9 decoder layers;
# QueryInst: its 6 dynamic stages).
FAMILY_OVERRIDES = {"mask2former": ["model.num_stages=9"], "queryinst": ["model.num_stages=6"]}
RUNTIMES = ("torch", "onnxruntime", "onnxruntime-e2e")


def bench_config(job: dict) -> Config:
    """The config of a benchmarked model: the defaults of each family (K-Net: 100 kernels, 3 stages;
    Mask2Former: 100 queries, 9 decoder layers, 6 pixel-decoder layers)."""
    size, family = job["size"], job["family"]
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
    model, _ = build_model(cfg)
    return model.eval()


class PeakRSS:
    """Samples this process's resident memory every few milliseconds; ``peak_mb`` is the largest seen."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the process's peak so far (KiB on Linux, bytes on macOS)
            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def measure(job: dict) -> dict:
    """Time one (family, runtime, batch) configuration; ``job`` is what ``jobs()`` makes."""
    device = torch.device(job["device"])
    batch, size = job["batch"], job["size"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
    threads = job["threads"]
    if threads:
        torch.set_num_threads(threads)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else [
        "CPUExecutionProvider"]
    used = ["PyTorch " + torch.__version__]
    with PeakRSS() as rss:
        if job["runtime"] == "torch":
            model = build_random_model(job).to(device)
            wrapper = FAMILIES[job["family"]].wrap(model, job["topk"]).eval()
            tensor = torch.from_numpy(images).to(device)

            def step() -> None:
                with torch.inference_mode():
                    wrapper(tensor)
                if device.type == "cuda":
                    torch.cuda.synchronize()
        else:
            segmenter = Segmenter(job["onnx"], providers=providers, threads=threads)
            used = segmenter.providers
            if device.type == "cuda" and used[0] != "CUDAExecutionProvider":
                raise RuntimeError(f"CUDA was requested but onnxruntime runs on {used}; install the CUDA "
                                   "libraries onnxruntime-gpu needs or run with --device cpu")
            if job["runtime"] == "onnxruntime":
                def step() -> None:
                    segmenter.run(images)
            else:
                hwc = [image.transpose(1, 2, 0).copy() for image in images]

                def step() -> None:
                    segmenter.predict_batch(hwc)
        for _ in range(job["warmup"]):
            step()
        latencies = []
        for _ in range(job["iterations"]):
            start = time.perf_counter()
            step()
            latencies.append(time.perf_counter() - start)
    total = sum(latencies)
    result = {
        **{k: job[k] for k in ("family", "runtime", "batch", "depth", "size", "iterations", "warmup")},
        "device": job["device"],
        "images_per_second": batch * len(latencies) / total,
        "latency_p50_ms": float(np.percentile(latencies, 50) * 1000),
        "latency_p95_ms": float(np.percentile(latencies, 95) * 1000),
        "peak_rss_mb": rss.peak_mb,
        "providers": used,
        "threads": torch.get_num_threads() if job["runtime"] == "torch" else threads or "onnxruntime default",
    }
    if device.type == "cuda" and job["runtime"] == "torch":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def export_models(args: argparse.Namespace, folder: Path) -> dict[tuple[str, int], str]:
    """Fixed-size ONNX models: K-Net one with a dynamic batch, Mask R-CNN one per batch size."""
    paths: dict[tuple[str, int], str] = {}
    size = args.size
    for family in args.families:
        job = _job(args, family, "onnxruntime", 0)
        model = build_random_model(job)
        for batch in [None] if FAMILIES[family].dynamic_batch else args.batches:
            info = model_info(bench_config(job), class_names=[f"class{i}" for i in range(args.num_classes)],
                              cat_ids=list(range(1, args.num_classes + 1)), input_size=(size, size),
                              batch_size=batch)
            sample = np.random.default_rng(0).integers(0, 256, (batch or 2, 3, size, size), np.uint8)
            start = time.perf_counter()
            path = export_model(model, info, folder / f"{family}_b{batch or 'dyn'}.onnx", sample=sample)
            print(f"exported {family} (batch {batch or 'dynamic'}) in {time.perf_counter() - start:.0f} s",
                  flush=True)
            for b in args.batches if batch is None else [batch]:
                paths[(family, b)] = str(path)
    return paths


def _job(args: argparse.Namespace, family: str, runtime: str, batch: int, onnx: str | None = None) -> dict:
    return {
        "family": family, "runtime": runtime, "batch": batch, "depth": args.depth, "size": args.size,
        "num_classes": args.num_classes, "topk": args.topk, "proposals": args.proposals,
        "iterations": args.iterations, "warmup": args.warmup, "device": args.device, "threads": args.threads,
        "onnx": onnx,
    }  # fmt: skip


def jobs(args: argparse.Namespace, onnx_paths: dict[tuple[str, int], str]) -> list[dict]:
    return [
        _job(args, family, runtime, batch, onnx_paths.get((family, batch)))
        for family in args.families for batch in args.batches for runtime in args.runtimes
    ]  # fmt: skip


def run_job(job: dict, in_process: bool) -> dict:
    if in_process:
        return measure(job)
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        name = f"{job['family']} {job['runtime']} batch {job['batch']}"
        raise RuntimeError(f"benchmark worker failed for {name}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def markdown_table(results: list[dict]) -> str:
    rows = ["| model | runtime | batch | images/s | latency p50 (ms) | latency p95 (ms) | peak RSS (MB) |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {TITLES[r['family']]} R{r['depth']} | {r['runtime']} | {r['batch']} | "
                    f"{r['images_per_second']:.2f} | {r['latency_p50_ms']:.0f} | {r['latency_p95_ms']:.0f} | "
                    f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(rows)


def speedups(results: list[dict]) -> list[str]:
    """Query-based model / Mask R-CNN images/s for every runtime and batch both were measured with."""
    index = {(r["family"], r["runtime"], r["batch"]): r["images_per_second"] for r in results}
    lines = []
    for (family, runtime, batch), value in index.items():
        other = index.get(("maskrcnn", runtime, batch))
        if family != "maskrcnn" and other:
            lines.append(f"{TITLES[family]} / Mask R-CNN, {runtime}, batch {batch}: {value / other:.2f}x")
    return lines


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["runtime"], r["batch"]) for r in results}, key=lambda g: (RUNTIMES.index(g[0]), g[1]))
    families = [f for f in TITLES if any(r["family"] == f for r in results)]
    index = {(r["family"], r["runtime"], r["batch"]): r["images_per_second"] for r in results}
    width = 0.8 / max(1, len(families))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for i, family in enumerate(families):
        xs = [g + i * width for g in range(len(groups))]
        ys = [index.get((family, runtime, batch), 0.0) for runtime, batch in groups]
        bars = ax.bar(xs, ys, width, label=TITLES[family])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([g + width * (len(families) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{runtime}\nbatch {batch}" for runtime, batch in groups], fontsize=8)
    ax.set_ylabel("images / s")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(args: argparse.Namespace) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    env = {"cpu": cpu, "cores": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version(),
           "device": args.device}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=50, choices=(18, 34, 50))
    p.add_argument("--size", type=int, default=512, help="square input side, a multiple of 32")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--iterations", type=int, default=10, help="timed runs per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--topk", type=int, default=100, help="detections per image (both models)")
    p.add_argument("--proposals", type=int, default=1000, help="Mask R-CNN RPN proposals (torchvision: 1000)")
    p.add_argument("--families", nargs="+", default=["knet", "maskrcnn"], choices=sorted(TITLES))
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", choices=("cpu", "cuda"), default=default_device)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of both runtimes")
    p.add_argument("--in-process", action="store_true", help="no subprocess per configuration (for tests)")
    p.add_argument("--out", default="benchmarks/results/throughput", help="output prefix for .json/.md/.png")
    p.add_argument("--image-sides", type=int, nargs="+", default=None,
                   help="instead of the throughput grid: Segmenter.predict latency and peak memory per image side")
    p.add_argument("--rle", action="store_true", help="with --image-sides: RLE masks instead of dense ones")
    p.add_argument("--runtime-from", metavar="CHECKOUT", default=None,
                   help="with --image-sides: time the export/runtime.py of another checkout (before / after)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size % 32:
        p.error(f"--size must be a multiple of 32, got {args.size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: PyTorch sees no CUDA device")
    if args.image_sides is not None and (min(args.image_sides) < 1 or args.iterations < 1):
        p.error("--image-sides must be positive and --iterations >= 1")
    if args.runtime_from is not None and not (Path(args.runtime_from) / "export" / "runtime.py").is_file():
        p.error(f"--runtime-from {args.runtime_from}: no export/runtime.py there; give a checkout of this repository")
    if args.image_sides is not None and not Path("/proc/self/status").is_file():
        p.error("--image-sides reads peak memory from /proc (Linux only)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.image_sides is not None:
        return write_image_sides(args, argv, out)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        needs_onnx = any(r.startswith("onnxruntime") for r in args.runtimes)
        onnx_paths = export_models(args, Path(tmp)) if needs_onnx else {}
        for job in jobs(args, onnx_paths):
            result = run_job(job, args.in_process)
            results.append(result)
            print(f"{TITLES[job['family']]:10} {job['runtime']:15} batch {job['batch']}: "
                  f"{result['images_per_second']:.2f} img/s, p50 {result['latency_p50_ms']:.0f} ms",
                  flush=True)
    command = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = environment(args)
    table = markdown_table(results)
    notes = speedups(results)
    threads = f"{args.threads} thread(s)" if args.threads else "default threads"
    title = (f"ResNet-{args.depth}, {args.size}x{args.size}, {args.device} "
             f"({env['cpu'] if args.device == 'cpu' else env.get('gpu')}, {threads})")
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "environment": env, "results": results, "speedups": notes}, indent=2))
    text = f"{title}\n\n{table}\n\n" + "\n".join(f"- {line}" for line in notes) + f"\n\n`{command}`\n"
    out.with_suffix(".md").write_text(text)
    plot(results, out.with_suffix(".png"), title)
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
