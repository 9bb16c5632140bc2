"""Images/s of ``sp-ray predict`` (the Ray Data job) with 1 and 2 actors of 1 thread each, beside the plain
in-process loop of ``Segmenter.predict``, on one folder of images; then the same job with an actor killed.

A random K-Net (``benchmarks/throughput.py``'s model builder, random weights: speed does not depend on
them) is exported with a dynamic size and batch. The folder holds ``--num-images`` synthetic images of
``--size`` px. Every round runs the three contenders once, in the same order (interleaved, so drift in
the machine's load hits all of them); after one untimed warm-up round, ``--rounds`` rounds are timed.

- "in-process loop": decode each file (``load_image_rgb``) and ``Segmenter.predict(image, rle=True)``,
  one session of 1 thread in this process: the work of the job without Ray.
- "predict, N actors": ``sp_ray.predict.pipeline.predict`` (what ``sp-ray predict`` calls) into a fresh
  DIR, ``--num-actors N --threads 1``, shards of ``--shard-size``: the whole call, actor start-up (process,
  model load), decoding, prediction, RLE and the writing of DIR included.

images/s = images / wall time of the contender's run; the table gives the median and p95 over rounds and
the ratio of medians to one actor. "After start-up" is the rate between the first and the last shard
written (images of the shards after the first / that time span): the job's throughput once its actors
are up, without the fixed cost of starting them. "Core share" is CPU seconds / wall seconds of the work
(the loop; each shard inside its actor): below 1 when other processes hold the cores, which is what
limits a second actor on a busy machine. The fault run (``--kill``) starts the 2-actor job, SIGKILLs the actor
that wrote the first shard, and reports how many images were predicted, how many were written twice
(none: the driver writes each shard once), whether the results equal an undisturbed run's byte for
byte, and the time it cost.

    OMP_NUM_THREADS=1 python benchmarks/predict_scaling.py --out benchmarks/results/predict_scaling
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from export.exporter.onnx_export import export_model, model_info
from export.runtime import Segmenter
from sp_ray.data.images import list_image_files, load_image_rgb
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.predict.pipeline import PredictOptions, predict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import bench_config, build_random_model, environment  # noqa: E402

OUTPUTS = ("images.json", "predictions.json", "skipped.json")


def export_random_knet(args: argparse.Namespace, folder: Path) -> Path:
    job = {"family": "knet", "depth": args.depth, "size": args.size, "num_classes": args.num_classes,
           "topk": args.topk, "proposals": 0}
    info = model_info(bench_config(job), class_names=[f"class{i}" for i in range(args.num_classes)],
                      cat_ids=list(range(1, args.num_classes + 1)), input_size=None, batch_size=None)
    sample = np.random.default_rng(0).integers(0, 256, (2, 3, args.size, args.size), np.uint8)
    return export_model(build_random_model(job), info, folder / "knet.onnx", sample=sample)


def in_process(model: Path, images: Path) -> tuple[float, None, float]:
    """(seconds of the plain loop: decode and ``Segmenter.predict`` every image, session start excluded;
    None; CPU seconds / wall seconds of the loop)."""
    segmenter = Segmenter(model, providers=["CPUExecutionProvider"], threads=1)
    files = list_image_files(images)
    start, cpu = time.perf_counter(), time.process_time()
    for path in files:
        segmenter.predict(load_image_rgb(path), rle=True)
    seconds = time.perf_counter() - start
    return seconds, None, (time.process_time() - cpu) / seconds


def ray_job(model: Path, images: Path, out: Path, actors: int, shard_size: int) -> tuple[float, float, float]:
    """(seconds of the whole predict call, images/s between the first and the last shard written, CPU
    seconds / wall seconds of the actors' shards: the share of a core each actor got)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    predict(PredictOptions(model=str(model), source=str(images), out=str(out), num_actors=actors, threads=1,
                           shard_size=shard_size))
    seconds = time.perf_counter() - start
    shards = sorted((out / "shards").glob("0*.json"), key=lambda p: p.stat().st_mtime)
    after_first = sum(len(json.loads(p.read_text())["images"]) + len(json.loads(p.read_text())["skipped"])
                      for p in shards[1:])
    span = shards[-1].stat().st_mtime - shards[0].stat().st_mtime
    records = [json.loads(p.read_text()) for p in shards]
    share = sum(r["cpu_seconds"] for r in records) / sum(r["seconds"] for r in records)
    return seconds, after_first / span if span > 0 else float("nan"), share


def killed_job(model: Path, images: Path, out: Path, reference: Path, shard_size: int, count: int) -> dict:
    """The 2-actor job with the actor of the first written shard SIGKILLed; what came out of it."""
    shutil.rmtree(out, ignore_errors=True)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = predict(PredictOptions(model=str(model), source=str(images), out=str(out),
                                                        num_actors=2, threads=1, shard_size=shard_size))
        except BaseException as err:  # noqa: BLE001 - reported in the result
            outcome["error"] = repr(err)

    start = time.perf_counter()
    worker = threading.Thread(target=run)
    worker.start()
    while worker.is_alive() and not list((out / "shards").glob("0*.json")):
        time.sleep(0.01)
    first = next((out / "shards").glob("0*.json"), None)
    victim = json.loads(first.read_text())["actor_pid"] if first else None
    if victim is not None:
        os.kill(victim, signal.SIGKILL)
    killed_at = time.perf_counter() - start
    shards_done_at_kill = len(list((out / "shards").glob("0*.json")))
    worker.join()
    seconds = time.perf_counter() - start
    if "error" in outcome:
        return {"error": outcome["error"], "killed_pid": victim}
    ids = [e["id"] for e in json.loads((out / "images.json").read_text())["images"]]
    pids = sorted({json.loads(p.read_text())["actor_pid"] for p in (out / "shards").glob("0*.json")})
    return {"killed_pid": victim, "killed_after_s": round(killed_at, 2), "shards_done_at_kill": shards_done_at_kill,
            "shards": len(list((out / "shards").glob("0*.json"))), "images": count, "images_predicted": len(ids),
            "images_predicted_twice": len(ids) - len(set(ids)), "actor_pids_in_shards": pids,
            "equal_to_undisturbed_run": all((out / n).read_bytes() == (reference / n).read_bytes() for n in OUTPUTS),
            "seconds": round(seconds, 2)}


def summarize(name: str, seconds: list[float], steady: list[float], shares: list[float], images: int) -> dict:
    rates = [images / s for s in seconds]
    return {"contender": name, "images_per_s_median": float(np.median(rates)),
            "images_per_s_p95": float(np.percentile(rates, 95)), "images_per_s_p5": float(np.percentile(rates, 5)),
            "seconds_median": float(np.median(seconds)), "rounds": len(seconds), "images": images,
            "steady_images_per_s_median": float(np.median(steady)) if steady else None,
            "core_share_median": float(np.median(shares))}


def markdown(rows: list[dict], fault: dict | None, env: dict, command: str) -> str:
    one = next(r["images_per_s_median"] for r in rows if r["contender"] == "predict, 1 actor")
    lines = [f"`{command}`", "",
             f"{env['cpu']}, {env['cores']} cores, flags: {', '.join(env['isa_flags']) or 'none of interest'}; "
             f"onnxruntime {env['onnxruntime']}, ray {env['ray']}, python {env['python']}; load average before: "
             f"{', '.join(f'{v:.2f}' for v in env['load_average'])} (1, 5, 15 min)", "",
             "| contender | images/s median | images/s p95 | images/s p5 | s per run (median) | x 1 actor "
             "| after start-up: images/s median | x 1 actor | core share per actor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    steady_one = next(r["steady_images_per_s_median"] for r in rows if r["contender"] == "predict, 1 actor")
    for r in rows:
        steady = r["steady_images_per_s_median"]
        after = f"{steady:.2f} | {steady / steady_one:.2f}" if steady is not None else "- | -"
        lines.append(f"| {r['contender']} | {r['images_per_s_median']:.2f} | {r['images_per_s_p95']:.2f} | "
                     f"{r['images_per_s_p5']:.2f} | {r['seconds_median']:.2f} | {r['images_per_s_median'] / one:.2f} "
                     f"| {after} | {r['core_share_median']:.2f} |")
    if fault:
        lines += ["", "Fault: 2 actors, the actor of the first written shard SIGKILLed:", "",
                  "| " + " | ".join(fault) + " |", "|" + "---|" * len(fault),
                  "| " + " | ".join(str(v) for v in fault.values()) + " |"]
    return "\n".join(lines)


def isa_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8") if flag in flags]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=18, choices=(18, 34, 50))
    p.add_argument("--size", type=int, default=192, help="image side and the model's resize (px)")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--no-kill", dest="kill", action="store_false", help="skip the killed-actor run")
    p.add_argument("--out", default="benchmarks/results/predict_scaling", help="writes OUT.json and OUT.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import ray

    args = parse_args(argv)
    command = "python benchmarks/predict_scaling.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    env = {**environment(argparse.Namespace(device="cpu")), "isa_flags": isa_flags(), "ray": ray.__version__,
           "load_average": os.getloadavg(), "platform": platform.platform()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = write_synthetic_dataset(folder / "data", num_images=args.num_images, image_size=args.size, seed=0)
        images = data["images"]
        model = export_random_knet(args, folder)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        contenders = {
            "in-process loop (Segmenter.predict, 1 thread)": lambda: in_process(model, images),
            "predict, 1 actor": lambda: ray_job(model, images, folder / "out1", 1, args.shard_size),
            "predict, 2 actors": lambda: ray_job(model, images, folder / "out2", 2, args.shard_size),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        steady: dict[str, list[float]] = {name: [] for name in contenders}
        shares: dict[str, list[float]] = {name: [] for name in contenders}
        for round_ in range(args.rounds + 1):
            for name, run in contenders.items():
                seconds, rate, share = run()
                if round_ > 0:
                    times[name].append(seconds)
                    shares[name].append(share)
                    if rate is not None:
                        steady[name].append(rate)
                print(f"round {round_}{' (warm-up)' if round_ == 0 else ''}: {name}: {seconds:.2f} s, "
                      f"{args.num_images / seconds:.2f} images/s, core share {share:.2f}", flush=True)
        rows = [summarize(name, times[name], steady[name], shares[name], args.num_images) for name in contenders]
        fault = None
        if args.kill:
            fault = killed_job(model, images, folder / "killed", folder / "out2", args.shard_size, args.num_images)
            print(f"fault: {fault}", flush=True)
        ray.shutdown()
    table = markdown(rows, fault, env, command)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    out.with_suffix(".json").write_text(json.dumps({"command": command, "environment": env, "settings": settings,
                                                    "results": rows, "fault": fault}, indent=2))
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
