"""The Python steps of ``benchmarks/gpu_check.sh``: each GPU path of sp-ray once, its figures as JSON.

    python benchmarks/gpu_check.py data    --work W            # the synthetic dataset every step uses
    python benchmarks/gpu_check.py train   --work W --out O    # one epoch per family, in-process, bf16 autocast
    python benchmarks/gpu_check.py ray     --work W --out O    # sp-ray finetune --gpu: 1 Ray Train worker (NCCL)
    python benchmarks/gpu_check.py parity  --work W --out O --providers cuda      # export; parity on CUDA
    python benchmarks/gpu_check.py parity  --work W --out O --providers tensorrt  # parity on TensorRT
    python benchmarks/gpu_check.py cli     --work W --out O    # sp-ray evaluate --onnx / predict with --gpu --trt-cache
    python benchmarks/gpu_check.py summary --work W --out O    # O/gpu_check.json and O/gpu_check.md

W holds what the steps hand each other (data, checkpoints, ONNX models, TensorRT's engine cache); O gets
one ``<step>.json`` per step, rewritten after every unit of work, so a step stopped by its timeout leaves
what it measured. ``--device cpu`` (``parity --providers cpu``) runs the same steps on the CPU (no
``--gpu``, the CPU provider), to check this script where there is no GPU; its files say so and are not
GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

TINY_CONFIGS = {family: REPO / "configs" / "demo" / f"{family}_tiny_synthetic.yaml"
                for family in ("knet", "maskrcnn", "mask2former", "queryinst")}  # fmt: skip
TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
# The steps in the order gpu_check.sh runs them; summary reads their files in this order.
STEPS = ("data", "train", "ray", "parity_cuda", "parity_tensorrt", "cli", "throughput_512", "throughput_800",
         "throughput_512_precisions")


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` to ``path`` through a temporary file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(".tmp")
    staged.write_text(json.dumps(payload, indent=2))
    os.replace(staged, path)


def dataset(work: Path) -> dict[str, Path]:
    """The check's data: 48 synthetic 160 px images, 36 train and 12 val (written once, then read)."""
    folder = work / "data"
    paths = {"images": folder / "images", "train": folder / "train.json", "val": folder / "val.json"}
    if not all(p.exists() for p in paths.values()):
        from sp_ray.data.synthetic import write_synthetic_dataset

        write_synthetic_dataset(folder, num_images=48, image_size=160, seed=0, val_fraction=0.25)
    return paths


def data_overrides(data: dict[str, Path]) -> list[str]:
    return [f"data.train_annotations={data['train']}", f"data.train_images={data['images']}",
            f"data.val_annotations={data['val']}", f"data.val_images={data['images']}"]


def last_metrics(work_dir: Path) -> dict[str, Any]:
    """The last epoch's line of ``WORK_DIR/metrics.jsonl`` ({} when there is none)."""
    path = work_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def cmd_data(args: argparse.Namespace) -> None:
    paths = dataset(args.work)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


def cmd_train(args: argparse.Namespace) -> None:
    """(a) ``fit`` of each family's tiny config for one epoch, then its validation, on ``args.device``.

    ``train.amp`` (bf16 autocast of the forward pass, CUDA only) is set explicitly: it is what is checked.
    """
    import torch

    from sp_ray.config import load_config
    from sp_ray.train.loop import fit

    data = dataset(args.work)
    cuda = args.device == "cuda"
    out = args.out / "train.json"
    payload: dict[str, Any] = {"device": args.device, "amp": "bf16" if cuda else "off (CPU)", "runs": []}
    if cuda:
        payload.update(gpu=torch.cuda.get_device_name(), bf16_supported=torch.cuda.is_bf16_supported())
    for family in args.families:
        config = TINY_CONFIGS[family]
        cfg = load_config(config, [*data_overrides(data), "train.epochs=1", f"train.use_gpu={str(cuda).lower()}",
                                   "train.amp=true"])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        row: dict[str, Any] = {"family": family, "config": str(config.relative_to(REPO))}
        try:
            final = fit(cfg, args.work / "train" / family)
        except Exception as err:  # noqa: BLE001 - recorded; the other families still run
            row.update(status="failed", error=f"{type(err).__name__}: {err}")
        else:
            metrics = last_metrics(args.work / "train" / family)
            row.update(status="ok", checkpoint=str(final), images_per_second=metrics.get("images_per_second"),
                       loss=metrics.get("loss"), segm_AP=metrics.get("segm_AP"), bbox_AP=metrics.get("bbox_AP"))
        row["seconds"] = round(time.perf_counter() - start, 2)
        if cuda:
            row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        payload["runs"].append(row)
        write_json(out, payload)
        print(json.dumps(row), flush=True)
    if any(r["status"] != "ok" for r in payload["runs"]):
        sys.exit(1)


def cmd_ray(args: argparse.Namespace) -> None:
    """(b) ``sp-ray finetune`` of the tiny K-Net for one epoch: one Ray Train worker, NCCL with ``--gpu``."""
    data = dataset(args.work)
    work_dir = args.work / "ray_knet"
    cuda = args.device == "cuda"
    command = [str(Path(sys.executable).with_name("sp-ray")), "finetune", "--config", str(TINY_CONFIGS["knet"]),
               "--num-workers", "1", *(["--gpu"] if cuda else []), "--work-dir", str(work_dir),
               "train.epochs=1", *data_overrides(data)]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command)
    seconds = time.perf_counter() - start
    records = [json.loads(p.read_text()) for p in sorted((work_dir / "workers").glob("rank*.json"))]
    metrics = last_metrics(work_dir)
    payload = {"device": args.device, "command": " ".join(command), "returncode": done.returncode,
               "seconds": round(seconds, 2), "images_per_second": metrics.get("images_per_second"),
               "loss": metrics.get("loss"), "segm_AP": metrics.get("segm_AP"), "workers": records}
    write_json(args.out / "ray.json", payload)
    print(json.dumps(payload, indent=2))
    expected = "nccl" if cuda else "gloo"
    if done.returncode != 0 or not records or any(r.get("backend") != expected for r in records):
        sys.exit(1)


def _sessions(providers: str, family: str) -> list[tuple[str, list[str], bool]]:
    """(label, providers, trt_fp16) of each session the parity step opens for ``family``."""
    if providers == "cpu":
        return [("CPU", [CPU], False)]
    if providers == "cuda":
        return [("CUDA", [CUDA, CPU], False)]
    sessions = [("TensorRT", [TRT, CUDA, CPU], False)]
    if family == "knet":  # one fp16 engine: the fp16 path of TensorRT, at the fp16 parity bounds
        sessions.append(("TensorRT fp16", [TRT, CUDA, CPU], True))
    return sessions


def export_family(checkpoint: str, onnx: str, images: str, count: int) -> dict[str, Any]:
    """``sp-ray export`` of one checkpoint (fp32, any size, batch 1, its CPU parity check); run in a worker."""
    import torch

    from export.exporter.onnx_export import export_checkpoint

    torch.set_num_threads(1)  # the exports run side by side, one core each
    start = time.perf_counter()
    exported = export_checkpoint(checkpoint, onnx, input_size=None, batch_size=1, parity_images=images,
                                 parity_count=count)
    return {"export_seconds": round(time.perf_counter() - start, 2), "cpu_parity": exported.parity.summary()}


def export_all(families: list[str], work: Path, images: str, count: int) -> dict[str, dict[str, Any]]:
    """Export the trained families side by side (torch's exporters are single-threaded, exports are the
    step's largest cost); family -> its export record, or {"error": ...}."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    (work / "onnx").mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    jobs = {}
    with ProcessPoolExecutor(max_workers=max(1, min(len(families), os.cpu_count() or 1)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        for family in families:
            checkpoint = work / "train" / family / "final"
            if not checkpoint.is_dir():
                results[family] = {"error": f"no checkpoint {checkpoint} (the train step did not finish {family})"}
                continue
            jobs[family] = pool.submit(export_family, str(checkpoint), str(work / "onnx" / f"{family}.onnx"),
                                       images, count)
        for family, job in jobs.items():
            try:
                results[family] = job.result()
            except Exception as err:  # noqa: BLE001 - recorded; the other families still run
                results[family] = {"error": f"{type(err).__name__}: {err}"}
    return results


def cmd_parity(args: argparse.Namespace) -> None:
    """(c) Parity against PyTorch through ``Segmenter`` on one kind of provider (``--providers``).

    ``cuda`` (and ``cpu``) first exports each trained family to WORK/onnx (``export_all``); ``tensorrt``
    uses those files, so that a slow engine build cannot cost the CUDA figures. A TensorRT session is
    opened twice with the same engine cache: the first builds and caches the engine (its time is the
    build), the second loads it.
    """
    import torch

    from export.exporter.onnx_export import sample_images, torch_instances
    from export.providers import GpuSettings
    from export.runtime import read_metadata
    from sp_ray.checkpoint import load_checkpoint
    from sp_ray.models import build_model

    data = dataset(args.work)
    images = sample_images(data["images"], count=4)
    cache = args.work / "trt_cache"
    out = args.out / f"parity_{args.providers}.json"
    payload: dict[str, Any] = {"providers": args.providers, "images": len(images), "trt_cache": str(cache),
                               "rows": []}
    exports = {}
    if args.providers != "tensorrt":
        exports = export_all(args.families, args.work, str(data["images"]), len(images))
    failed = False
    for family in args.families:
        onnx = args.work / "onnx" / f"{family}.onnx"
        row: dict[str, Any] = {"family": family, "onnx": str(onnx), **exports.get(family, {}), "sessions": []}
        payload["rows"].append(row)
        try:
            if "error" in row:
                raise RuntimeError(row.pop("error"))
            if not onnx.is_file():
                raise FileNotFoundError(f"no {onnx} (the CUDA parity step exports it)")
            info = read_metadata(onnx)
            ckpt = load_checkpoint(args.work / "train" / family / "final")
            model = build_model(ckpt.config)
            model.load_state_dict(ckpt.model_state)
            reference = torch_instances(model.eval(), info, images, device=torch.device("cpu"))
        except Exception as err:  # noqa: BLE001 - recorded; the next family still runs
            row["error"] = f"{type(err).__name__}: {err}"
            failed = True
            write_json(out, payload)
            continue
        nms = info.output_format == "roi_mask_probs"
        for label, providers, fp16 in _sessions(args.providers, family):
            session: dict[str, Any] = {"session": label, "providers_requested": providers}
            row["sessions"].append(session)
            settings = GpuSettings(trt_cache_dir=cache, trt_fp16=fp16, trt_max_batch=1)
            try:
                session.update(_parity_session(onnx, providers, settings, images, reference,
                                               precision="fp16" if fp16 else "fp32", nms=nms))
            except Exception as err:  # noqa: BLE001 - e.g. a TensorRT build error: recorded, the next one runs
                session.update(passed=False, error=f"{type(err).__name__}: {err}")
            failed = failed or not session["passed"]
            write_json(out, payload)
            print(family, json.dumps(session), flush=True)
    write_json(out, payload)
    if failed:
        sys.exit(1)


def _parity_session(onnx: Path, providers: list[str], settings: Any, images: list, reference: list, *,
                    precision: str, nms: bool) -> dict[str, Any]:
    """Open one session, time its creation and two passes over ``images``, compare with ``reference``."""
    from export.exporter.parity import compare_instances
    from export.runtime import Segmenter

    start = time.perf_counter()
    segmenter = Segmenter(onnx, providers=providers, gpu=settings)
    created = time.perf_counter() - start
    start = time.perf_counter()
    candidate = segmenter.predict_batch(images, score_threshold=0.0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    segmenter.predict_batch(images, score_threshold=0.0)
    second = time.perf_counter() - start
    report = compare_instances(reference, candidate, precision=precision, nms=nms)
    on_requested = segmenter.providers[0] == providers[0]
    result = {
        "providers_used": segmenter.providers, "io_binding": segmenter.io_binding,
        "provider_options": segmenter.session.get_provider_options().get(segmenter.providers[0], {}),
        "session_seconds": round(created, 3), "first_pass_seconds": round(first, 3),
        "second_pass_seconds": round(second, 3), "parity": report.summary(),
        "passed": bool(report.passed and on_requested),
    }
    if not on_requested:
        result["error"] = f"onnxruntime did not start {providers[0]}: it runs on {segmenter.providers}"
    if providers[0] == TRT and on_requested:
        # The same model again: the engine comes from the cache this time.
        del segmenter
        start = time.perf_counter()
        again = Segmenter(onnx, providers=providers, gpu=settings)
        again.predict_batch(images[:1], score_threshold=0.0)
        result["cached_session_seconds"] = round(time.perf_counter() - start, 3)
        result["cache_files"] = sorted(p.name for p in Path(settings.trt_cache_dir).iterdir())
    return result


def cmd_cli(args: argparse.Namespace) -> None:
    """``sp-ray evaluate --onnx`` and ``sp-ray predict`` on the exported K-Net with ``--gpu --trt-cache``:
    the GPU options of the commands, end to end (Ray Data GPU actor for predict)."""
    data = dataset(args.work)
    onnx = args.work / "onnx" / "knet.onnx"
    cache = args.work / "trt_cache"
    gpu = ["--gpu", "--trt-cache", str(cache)] if args.device == "cuda" else []
    sp_ray = str(Path(sys.executable).with_name("sp-ray"))
    evaluate_out = args.work / "cli" / "evaluate" / "metrics.json"
    predict_out = args.work / "cli" / "predict"
    commands = {
        "evaluate": [sp_ray, "evaluate", "--onnx", str(onnx), "--annotations", str(data["val"]), "--images",
                     str(data["images"]), "--out", str(evaluate_out), *gpu],
        "predict": [sp_ray, "predict", "--model", str(onnx), "--source", str(data["images"]), "--out",
                    str(predict_out), "--num-actors", "1", "--threads", "1", "--shard-size", "16", *gpu,
                    "--annotations", str(data["val"])],
    }
    payload: dict[str, Any] = {"device": args.device, "runs": []}
    for name, command in commands.items():
        if name == "predict" and predict_out.exists():  # a rerun of the check: start this output afresh
            import shutil

            shutil.rmtree(predict_out)
        print(" ".join(command), flush=True)
        start = time.perf_counter()
        done = subprocess.run(command)
        row: dict[str, Any] = {"command": name, "argv": " ".join(command), "returncode": done.returncode,
                               "seconds": round(time.perf_counter() - start, 2)}
        metrics = evaluate_out if name == "evaluate" else predict_out / "metrics.json"
        if done.returncode == 0 and metrics.exists():
            ap = json.loads(metrics.read_text())
            row.update(segm_AP=ap.get("segm", {}).get("AP"), bbox_AP=ap.get("bbox", {}).get("AP"))
        payload["runs"].append(row)
        write_json(args.out / "cli.json", payload)
    if any(r["returncode"] != 0 for r in payload["runs"]):
        sys.exit(1)


def environment() -> dict[str, Any]:
    """Versions and hardware of this run (nvidia-smi's view of the GPU when present)."""
    import onnxruntime as ort
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "onnxruntime": ort.__version__,
                           "onnxruntime_providers": ort.get_available_providers()}
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError:
        pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        env["gpus"] = smi.stdout.strip().splitlines() if smi.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        env["gpus"] = []
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=20)
        env["commit"] = commit.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return env


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(text: Any) -> str:
    """A Markdown table cell: pipes in the text (the parity summary's |score diff|) escaped."""
    return str(text).replace("|", "\\|")


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the steps' statuses, then each step's figures."""
    env = report["environment"]
    lines = [f"# GPU check ({', '.join(env.get('gpus') or ['no GPU listed'])})", "",
             f"commit {env.get('commit', '?')}; torch {env['torch']} (CUDA {env['torch_cuda']}), onnxruntime "
             f"{env['onnxruntime']}, ray {env.get('ray', '-')}, python {env['python']}", "",
             "| step | status | seconds | timeout (s) |", "|---|---|---:|---:|"]
    for step in report["steps"]:
        lines.append(f"| {step['step']} | {step['status']} | {step['seconds']} | {step['timeout_s']} |")
    train = report.get("train")
    if train:
        lines += ["", f"## One epoch per family, in-process ({train['device']}, autocast {train['amp']})", "",
                  "| family | status | images/s | loss | val segm AP | seconds | peak CUDA MB |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in train["runs"]:
            lines.append(f"| {r['family']} | {r['status']} | {_fmt(r.get('images_per_second'), 1)} | "
                         f"{_fmt(r.get('loss'), 3)} | {_fmt(r.get('segm_AP'))} | {r['seconds']} | "
                         f"{_fmt(r.get('peak_cuda_mb'), 0)} |")
    ray_run = report.get("ray")
    if ray_run:
        backends = sorted({str(w.get("backend")) for w in ray_run["workers"]}) or ["no worker record"]
        lines += ["", f"## Ray Train, one worker ({ray_run['device']})", "", f"`{ray_run['command']}`", "",
                  f"exit {ray_run['returncode']}, {ray_run['seconds']} s, {_fmt(ray_run['images_per_second'], 1)} "
                  f"images/s, process group {', '.join(backends)}, devices "
                  f"{', '.join(sorted({str(w.get('device')) for w in ray_run['workers']}))}"]
    rows = [(name, row) for name in ("parity_cpu", "parity_cuda", "parity_tensorrt")
            for row in (report.get(name) or {}).get("rows", [])]
    if rows:
        lines += ["", "## Export and parity against PyTorch (4 images; fp32 bounds, fp16 for TensorRT fp16)", "",
                  "| family | session | passed | runs on | session s | 1st pass s | 2nd pass s | cached session s "
                  "| parity |", "|---|---|---|---|---:|---:|---:|---:|---|"]
        for name, row in rows:
            if "export_seconds" in row:
                lines.append(f"| {row['family']} | export ({row['export_seconds']} s) | - | CPU | - | - | - | - | "
                             f"{_cell(row['cpu_parity'])} |")
            if not row["sessions"]:
                lines.append(f"| {row['family']} | {name} | no | - | - | - | - | - | {_cell(row.get('error', ''))} |")
            for s in row["sessions"]:
                used = (s.get("providers_used") or ["-"])[0].replace("ExecutionProvider", "")
                lines.append(f"| {row['family']} | {s['session']} | {'yes' if s['passed'] else 'no'} | {used} | "
                             f"{_fmt(s.get('session_seconds'))} | {_fmt(s.get('first_pass_seconds'))} | "
                             f"{_fmt(s.get('second_pass_seconds'))} | {_fmt(s.get('cached_session_seconds'))} | "
                             f"{_cell(s.get('error') or s.get('parity', ''))} |")
    cli = report.get("cli")
    if cli:
        lines += ["", f"## Commands ({cli['device']}; with `--gpu --trt-cache` on CUDA)", "",
                  "| command | exit | seconds | segm AP |",
                  "|---|---:|---:|---:|"]
        for r in cli["runs"]:
            lines.append(f"| sp-ray {r['command']} | {r['returncode']} | {r['seconds']} | {_fmt(r.get('segm_AP'))} |")
    for name, text in report.get("throughput_md", {}).items():
        lines += ["", f"## {name} (benchmarks/throughput.py)", "", text.strip()]
    return "\n".join(lines) + "\n"


def cmd_summary(args: argparse.Namespace) -> None:
    """Gather the steps' records (``O/steps.jsonl``, written by gpu_check.sh) and files into one report."""
    steps_file = args.out / "steps.jsonl"
    steps = [json.loads(line) for line in steps_file.read_text().splitlines()] if steps_file.exists() else []
    report: dict[str, Any] = {"environment": environment(), "steps": steps}
    for name in ("train", "ray", "parity_cpu", "parity_cuda", "parity_tensorrt", "cli"):
        value = _read(args.out / f"{name}.json")
        if value is not None:
            report[name] = value
    report["throughput"], report["throughput_md"] = {}, {}
    for name in STEPS:
        if name.startswith("throughput") and (args.out / f"{name}.json").exists():
            report["throughput"][name] = _read(args.out / f"{name}.json")
            report["throughput_md"][name] = (args.out / f"{name}.md").read_text()
    text = markdown(report)
    del report["throughput_md"]
    write_json(args.out / "gpu_check.json", report)
    (args.out / "gpu_check.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=("data", "train", "ray", "parity", "cli", "summary"))
    p.add_argument("--work", type=Path, default=REPO / "runs" / "gpu_check", help="scratch folder of the steps")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu", help="results folder")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--families", nargs="+", choices=list(TINY_CONFIGS), default=list(TINY_CONFIGS),
                   help="train and parity: these families only (default all four)")
    p.add_argument("--providers", choices=("cuda", "tensorrt", "cpu"), default="cuda",
                   help="parity: the onnxruntime provider checked (cuda and cpu also export the models)")
    args = p.parse_args(argv)
    args.work, args.out = args.work.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if (args.device == "cuda" and args.step in ("train", "ray", "cli")) or (
            args.step == "parity" and args.providers != "cpu"):
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"gpu_check.py {args.step}: torch sees no CUDA device (use --device cpu to check the script)")
    {"data": cmd_data, "train": cmd_train, "ray": cmd_ray, "parity": cmd_parity, "cli": cmd_cli,
     "summary": cmd_summary}[args.step](args)


if __name__ == "__main__":
    main()
