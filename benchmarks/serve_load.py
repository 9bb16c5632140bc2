"""Serving load: a bounded closed-loop HTTP load on loopback against ``sp-ray serve``, beside in-process
``Segmenter.predict_batch`` at the same batch size, measured in the same run.

A random K-Net (``--depth``, ``--size`` x ``--size`` fixed input, dynamic batch, ``--topk`` detections, score
threshold 0 so every answer carries ``--topk`` RLE masks) is exported and served by ``sp_ray.serve.run.
start_service`` on a local Ray (``--replicas`` x ``--threads``, ``--max-batch-size``, ``--batch-wait-timeout-s``).
The clients are ``requests`` sessions in threads of this process, each sending JPEG files back to back
(closed loop): ``--requests`` requests per concurrency level, then it stops. The contenders run
interleaved, round by round (``--rounds``): in-process ``predict_batch`` (same threads, batches of
``--max-batch-size``, RLE output, the decoded arrays as input) and the service at each ``--concurrency``.
images/s is the median over rounds of requests / wall time; latency percentiles pool every request of
every round; a request fails when it gets no 200.

``--kill-replica-after N`` adds a fault run after the rounds: the same load at the highest concurrency,
and after N answers one replica process is killed (SIGKILL). It reports the failed requests, the time
from the kill to the last failure, the longest request, and when Serve had a replacement replica running.

    python benchmarks/serve_load.py --depth 18 --size 256 --requests 96 --rounds 2 --threads 2 \\
        --kill-replica-after 40 --out benchmarks/results/serve_load

writes OUT.json and OUT.md (the table printed at the end).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import requests
from PIL import Image

from export.exporter.onnx_export import export_model, model_info
from export.runtime import Segmenter
from sp_ray.machine import isa_flags
from sp_ray.serve.settings import ServeSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import bench_config, build_random_model, environment, sample_image  # noqa: E402

TIMEOUT_S = 120


@dataclass
class Load:
    """What one closed-loop load saw: per request (start, end) seconds since the load began and the status."""

    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # 0: no answer (connection error, timeout)
    batch_sizes: list[int] = field(default_factory=list)
    wall_s: float = 0.0


def export_random_knet(args: argparse.Namespace, folder: Path) -> Path:
    job = {"family": "knet", "depth": args.depth, "size": args.size, "num_classes": args.num_classes,
           "topk": args.topk, "proposals": 0}
    cfg = bench_config(job)
    info = model_info(cfg, class_names=[f"class{i}" for i in range(args.num_classes)],
                      cat_ids=list(range(1, args.num_classes + 1)), input_size=(args.size, args.size),
                      batch_size=None, source="benchmarks/serve_load.py random K-Net")
    sample = np.random.default_rng(0).integers(0, 256, (2, 3, args.size, args.size), np.uint8)
    return export_model(build_random_model(job), info, folder / "knet_serve.onnx", sample=sample)


def test_images(size: int, count: int) -> list[np.ndarray]:
    """``count`` distinct size x size images: one synthetic image, shifted and flipped."""
    base = sample_image(size)
    return [np.ascontiguousarray(np.roll(base if i % 2 == 0 else base[:, ::-1], 7 * i, axis=(0, 1)))
            for i in range(count)]


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def run_load(url: str, payloads: list[bytes], *, total: int, concurrency: int,
             on_answer: callable | None = None) -> Load:
    """``total`` requests from ``concurrency`` closed-loop clients; ``on_answer(n)`` after the n-th answer."""
    load = Load()
    lock = threading.Lock()
    issued = [0]
    answered = [0]
    began = time.perf_counter()

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                if issued[0] >= total:
                    return
                index = issued[0]
                issued[0] += 1
            start = time.perf_counter()
            try:
                response = session.post(f"{url}/predict", data=payloads[index % len(payloads)],
                                        headers={"Content-Type": "image/jpeg"}, timeout=TIMEOUT_S)
                status = response.status_code
                if status == 200:
                    response.json()  # a client parses the answer: part of its cost
                batch = int(response.headers.get("X-Batch-Size", 0))
            except requests.RequestException:
                status, batch = 0, 0
            end = time.perf_counter()
            with lock:
                load.starts.append(start - began)
                load.ends.append(end - began)
                load.statuses.append(status)
                load.batch_sizes.append(batch)
                answered[0] += 1
                count = answered[0]
            if on_answer is not None:
                on_answer(count)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    load.wall_s = time.perf_counter() - began
    return load


def in_process(segmenter: Segmenter, images: list[np.ndarray], *, total: int, batch: int) -> float:
    """Wall seconds of ``predict_batch`` over ``total`` images in batches of ``batch`` (RLE output)."""
    start = time.perf_counter()
    for first in range(0, total, batch):
        chunk = [images[i % len(images)] for i in range(first, min(total, first + batch))]
        segmenter.predict_batch(chunk, rle=True)
    return time.perf_counter() - start


def replica_pids() -> dict[str, int]:
    """Process id of every running replica of the app, by actor name (Serve names them SERVE_REPLICA::...)."""
    import ray

    pids = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith("SERVE_REPLICA::"):
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            try:
                pids[entry["name"]] = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
            except Exception:  # a replica being replaced
                continue
    return pids


def fault_run(url: str, payloads: list[bytes], args: argparse.Namespace, concurrency: int) -> dict:
    """The load with one replica killed after ``--kill-replica-after`` answers; see the module docstring."""
    before = replica_pids()
    victim_name, victim_pid = sorted(before.items())[0]
    state: dict = {}

    def watch_replacement() -> None:
        # Serve has replaced the replica when a replica other than the killed ones answers again.
        while "killed_at" in state and "replaced_at" not in state:
            running = replica_pids()
            if len([n for n in running if n != victim_name]) >= len(before):
                state["replaced_at"] = time.perf_counter()
                state["replicas_after"] = sorted(running)
                return
            time.sleep(0.2)

    def on_answer(count: int) -> None:
        if count == args.kill_replica_after and "killed_at" not in state:
            os.kill(victim_pid, signal.SIGKILL)
            state["killed_at"] = time.perf_counter()
            threading.Thread(target=watch_replacement, daemon=True).start()

    began = time.perf_counter()
    load = run_load(url, payloads, total=args.fault_requests, concurrency=concurrency, on_answer=on_answer)
    deadline = time.perf_counter() + 120
    while "replaced_at" not in state and time.perf_counter() < deadline:
        time.sleep(0.5)
    kill_s = state["killed_at"] - began
    failures = [end for end, status in zip(load.ends, load.statuses, strict=True) if status != 200]
    failed_codes = sorted({s for s in load.statuses if s != 200})
    in_flight = [st for s, e, st in zip(load.starts, load.ends, load.statuses, strict=True) if s < kill_s < e]
    return {
        "concurrency": concurrency, "requests": len(load.statuses), "killed_replica": victim_name,
        "killed_after_answers": args.kill_replica_after, "failed": len(failures), "failed_statuses": failed_codes,
        "in_flight_at_kill": len(in_flight), "in_flight_at_kill_failed": sum(st != 200 for st in in_flight),
        "last_failure_after_kill_s": round(max(failures) - kill_s, 2) if failures else None,
        "replacement_running_after_s": (round(state["replaced_at"] - state["killed_at"], 2)
                                        if "replaced_at" in state else None),
        "longest_request_s": round(max(e - s for s, e in zip(load.starts, load.ends, strict=True)), 2),
        "replicas_before": sorted(before), "replicas_after": state.get("replicas_after"),
        "wall_s": round(load.wall_s, 2),
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(name: str, rounds: list[Load] | list[float], total: int, batch: int) -> dict:
    if rounds and isinstance(rounds[0], float):  # in-process: wall seconds per round
        rates = [total / wall for wall in rounds]
        return {"contender": name, "images_per_second": float(np.median(rates)), "rates": rates,
                "latency_p50_ms": None, "latency_p95_ms": None, "latency_p99_ms": None, "errors": 0,
                "requests": total * len(rounds), "mean_batch": batch}
    ok = [(e - s) * 1000 for load in rounds for s, e, st in zip(load.starts, load.ends, load.statuses, strict=True)
          if st == 200]
    rates = [sum(st == 200 for st in load.statuses) / load.wall_s for load in rounds]
    sizes = [b for load in rounds for b, st in zip(load.batch_sizes, load.statuses, strict=True) if st == 200]
    return {"contender": name, "images_per_second": float(np.median(rates)), "rates": rates,
            "latency_p50_ms": percentile(ok, 50), "latency_p95_ms": percentile(ok, 95),
            "latency_p99_ms": percentile(ok, 99), "errors": sum(st != 200 for load in rounds for st in load.statuses),
            "requests": sum(len(load.statuses) for load in rounds), "mean_batch": float(np.mean(sizes)) if sizes else 0}


def markdown(results: list[dict], baseline: float) -> str:
    lines = ["| contender | requests | images/s | per round | x in-process | latency p50 (ms) | p95 (ms) | "
             "p99 (ms) | errors | mean batch |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lat = [f"{r[k]:.0f}" if r[k] is not None else "-" for k in ("latency_p50_ms", "latency_p95_ms",
                                                                    "latency_p99_ms")]
        rounds = " ".join(f"{rate:.2f}" for rate in r["rates"])
        lines.append(f"| {r['contender']} | {r['requests']} | {r['images_per_second']:.2f} | {rounds} | "
                     f"{r['images_per_second'] / baseline:.2f} | {' | '.join(lat)} | {r['errors']} | "
                     f"{r['mean_batch']:.1f} |")
    return "\n".join(lines)


def fault_markdown(fault: dict) -> str:
    return "\n".join([
        "| concurrency | requests | killed after | in flight at the kill | failed | statuses | "
        "last failure after the kill (s) | replacement running after (s) | longest request (s) |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        f"| {fault['concurrency']} | {fault['requests']} | {fault['killed_after_answers']} answers | "
        f"{fault['in_flight_at_kill']} | {fault['failed']} | {fault['failed_statuses'] or '-'} | "
        f"{fault['last_failure_after_kill_s'] if fault['failed'] else '-'} | "
        f"{fault['replacement_running_after_s']} | {fault['longest_request_s']} |",
    ])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=18, choices=(18, 34, 50))
    p.add_argument("--size", type=int, default=256, help="square image and graph input side, a multiple of 32")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--topk", type=int, default=20, help="detections (RLE masks) per answer")
    p.add_argument("--requests", type=int, default=96, help="requests per concurrency level and round")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads per replica and in-process")
    p.add_argument("--max-batch-size", type=int, default=8, help="serving batch limit = in-process batch size")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument("--kill-replica-after", type=int, default=None, metavar="N",
                   help="fault run: kill a replica process after N answers")
    p.add_argument("--fault-requests", type=int, default=160, help="requests of the fault run")
    p.add_argument("--out", default="benchmarks/results/serve_load", help="output prefix for .json/.md")
    args = p.parse_args(argv)
    if args.size % 32:
        p.error(f"--size must be a multiple of 32, got {args.size}")
    if args.kill_replica_after is not None and not 0 < args.kill_replica_after < args.fault_requests:
        p.error("--kill-replica-after must be between 0 and --fault-requests")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    from sp_ray.serve.run import start_service

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    images = test_images(args.size, 16)
    payloads = [jpeg(image) for image in images]
    decoded = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in payloads]  # what the server sees
    with tempfile.TemporaryDirectory() as tmp:
        model = export_random_knet(args, Path(tmp))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            settings = ServeSettings(model=str(model), port=free_port(), replicas=args.replicas,
                                     max_batch_size=args.max_batch_size,
                                     batch_wait_timeout_s=args.batch_wait_timeout_s, threads=args.threads)
            url = start_service(settings)
            segmenter = Segmenter(model, providers=["CPUExecutionProvider"], threads=args.threads)
            # Warm-up: both contenders, untimed.
            in_process(segmenter, decoded, total=2 * args.max_batch_size, batch=args.max_batch_size)
            run_load(url, payloads, total=2 * args.max_batch_size, concurrency=max(args.concurrency))
            walls: list[float] = []
            loads: dict[int, list[Load]] = {c: [] for c in args.concurrency}
            for round_index in range(args.rounds):
                walls.append(in_process(segmenter, decoded, total=args.requests, batch=args.max_batch_size))
                print(f"round {round_index + 1}: in-process {args.requests / walls[-1]:.2f} img/s", flush=True)
                for c in args.concurrency:
                    load = run_load(url, payloads, total=args.requests, concurrency=c)
                    loads[c].append(load)
                    print(f"round {round_index + 1}: serve c={c} {args.requests / load.wall_s:.2f} img/s, "
                          f"{sum(s != 200 for s in load.statuses)} errors", flush=True)
            fault = (fault_run(url, payloads, args, max(args.concurrency))
                     if args.kill_replica_after is not None else None)
        finally:
            serve.shutdown()
            ray.shutdown()
    baseline = summarize(f"in-process predict_batch (batch {args.max_batch_size})", walls, args.requests,
                         args.max_batch_size)
    results = [baseline] + [summarize(f"serve, concurrency {c}", loads[c], args.requests, args.max_batch_size)
                            for c in args.concurrency]
    command = "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = environment(argparse.Namespace(device="cpu"))
    env["isa"] = isa_flags()
    env["ray"] = ray.__version__
    env["onnxruntime"] = ort.__version__
    env["load_average_1min_before"] = round(load_before[0], 2)  # other jobs on the machine
    title = (f"sp-ray serve, random K-Net R{args.depth}, {args.size}x{args.size} JPEG, {args.topk} RLE masks per "
             f"answer; {args.replicas} replica(s) x {args.threads} onnxruntime thread(s), max batch "
             f"{args.max_batch_size}, batch wait {args.batch_wait_timeout_s * 1000:.0f} ms; {args.requests} requests "
             f"per level x {args.rounds} rounds, clients on the same machine ({env['cpu']}, {env['cores']} cores)")
    table = markdown(results, baseline["images_per_second"])
    machine = (f"ISA: {' '.join(env['isa'])}; Ray {env['ray']}, onnxruntime {env['onnxruntime']}, Python "
               f"{env['python']}; 1-minute load average before the run (other jobs): {env['load_average_1min_before']}")
    text = f"{title}\n\n{machine}\n\n{table}\n"
    if fault is not None:
        text += f"\nFault run (one replica process killed with SIGKILL during the load):\n\n{fault_markdown(fault)}\n"
    text += f"\n`{command}`\n"
    out.with_suffix(".json").write_text(json.dumps({"command": command, "environment": env, "results": results,
                                                    "fault": fault}, indent=2))
    out.with_suffix(".md").write_text(text)
    print("\n" + text)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
