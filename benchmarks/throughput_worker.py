"""One configuration of ``benchmarks/throughput.py``, loaded once and stepped on request.

    python benchmarks/throughput_worker.py JOB      # JOB: the JSON of one throughput.py job

loads the job's model or session, answers {"ready": true} on stdout, then one JSON line per request line
on stdin: {"op": "step"} runs one batch and answers its {"start", "end"} on the monotonic clock;
{"op": "stop"} answers the process's peak memory (VmHWM), pid, runtime and threads, and exits.

At import this module needs numpy, onnxruntime and ``export.runtime`` only, so an onnxruntime worker's
memory is the runtime's own, as in a deployment (torch, torchvision and the model code alone hold about
0.7 GB); a PyTorch worker imports torch and ``throughput.torch_module`` when it loads.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import IO, Any, NamedTuple

import numpy as np
import onnxruntime as ort

from export.metadata import INPUT_NAME
from export.runtime import Segmenter, session_options

FLOOR = "floor"


class Contender(NamedTuple):
    """A loaded configuration: ``step()`` runs one batch; the rest is reported with its row.

    Attributes:
        step: one timed unit of work (one batch of ``job["batch"]`` images), results discarded.
        providers: the runtime that runs it ("PyTorch <version>", or the onnxruntime session's providers).
        threads: intra-op threads it runs with.
        cuda: whether PyTorch runs it on a GPU (its peak CUDA memory is reported then).
    """

    step: Callable[[], None]
    providers: list[str]
    threads: int | str
    cuda: bool = False


def random_batch(batch: int, size: int) -> np.ndarray:
    """uint8 [batch, 3, size, size], uniform noise (the same for every configuration)."""
    return np.random.default_rng(0).integers(0, 256, (batch, 3, size, size), dtype=np.uint8)


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark (VmHWM), MB; ``ru_maxrss`` where /proc is absent."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def load_contender(job: dict, torch_module: Callable[[dict], Any] | None = None) -> Contender:
    """Load ``job`` (a ``throughput.jobs()`` entry) and its step on a fixed random batch.

    Args:
        job: family, runtime, precision, batch, size, device, threads, onnx (the graph of onnxruntime jobs), ...
        torch_module: job -> the eval-mode ``torch.nn.Module`` of a PyTorch job, uint8 [B, 3, S, S] in
            (``throughput.torch_module``); needed for PyTorch jobs only.
    """
    images = random_batch(job["batch"], job["size"])
    if job["runtime"] == "torch":
        if torch_module is None:
            raise ValueError("a PyTorch job needs torch_module")
        return _torch_contender(job, images, torch_module)
    return _onnx_contender(job, images)


def _torch_contender(job: dict, images: np.ndarray, torch_module: Callable[[dict], Any]) -> Contender:
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    module = torch_module(job).to(device)
    tensor = torch.from_numpy(images).to(device)

    def step() -> None:
        with torch.inference_mode():
            module(tensor)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return Contender(step, ["PyTorch " + torch.__version__], torch.get_num_threads(), cuda=device.type == "cuda")


def _onnx_contender(job: dict, images: np.ndarray) -> Contender:
    cuda = job["device"] == "cuda"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    threads = job["threads"]
    if job["family"] == FLOOR:
        # No sp-ray metadata, so no Segmenter: a bare session with the Segmenter's options.
        session = ort.InferenceSession(job["onnx"], sess_options=session_options(threads), providers=providers)
        used = session.get_providers()

        def step() -> None:
            session.run(None, {INPUT_NAME: images})
    else:
        segmenter = Segmenter(job["onnx"], providers=providers, threads=threads)
        used = segmenter.providers
        if job["runtime"] == "onnxruntime":
            def step() -> None:
                segmenter.run(images)
        else:
            hwc = [image.transpose(1, 2, 0).copy() for image in images]

            def step() -> None:
                segmenter.predict_batch(hwc)
    if cuda and used[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"CUDA was requested but onnxruntime runs on {used}; install the CUDA "
                           "libraries onnxruntime-gpu needs or run with --device cpu")
    return Contender(step, used, threads or "onnxruntime default")


def timed_step(contender: Contender) -> dict[str, float]:
    """Run one step; its start and end on the monotonic clock, which on Linux (CLOCK_MONOTONIC) and macOS is
    one system-wide clock, so the driver can order the steps of different worker processes."""
    start = time.monotonic()
    contender.step()
    return {"start": start, "end": time.monotonic()}


def final_facts(contender: Contender) -> dict:
    """What a worker reports when it stops: its peak memory, process id, runtime and threads, and whether torch
    was imported (in an onnxruntime worker it is not, so the peak is the runtime's own)."""
    facts = {"peak_rss_mb": peak_rss_mb(), "pid": os.getpid(), "providers": contender.providers,
             "threads": contender.threads, "torch_imported": "torch" in sys.modules}
    if contender.cuda:
        import torch

        facts["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return facts


def serve(contender: Contender, requests: IO[str], replies: IO[str]) -> None:
    """Answer {"ready": true}, then one JSON line per request line until {"op": "stop"} (see the module
    docstring)."""

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    reply({"ready": True})
    for line in requests:
        op = json.loads(line)["op"]
        if op == "step":
            reply(timed_step(contender))
        elif op == "stop":
            reply(final_facts(contender))
            return
        else:
            raise ValueError(f"unknown worker request {op!r}")


def main(argv: list[str]) -> int:
    job = json.loads(argv[1])
    # The replies go to a private copy of stdout and fd 1 is pointed at stderr, so that what torch,
    # onnxruntime or their C++ code print cannot corrupt the protocol.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    torch_module = None
    if job["runtime"] == "torch":
        from throughput import torch_module  # sys.path[0] is this script's folder, benchmarks/
    serve(load_contender(job, torch_module), sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
