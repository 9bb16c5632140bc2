"""benchmarks/throughput.py at toy scale: every configuration is measured and reported."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOY = ["--depth", "18", "--size", "64", "--num-classes", "3", "--topk", "10", "--proposals", "20", "--threads", "1",
       "--device", "cpu"]
# The rows a user gets for each batch: PyTorch fp32, onnxruntime fp32 and int8, graph and end to end; the floor
# (bare ResNet + FPN) has no end-to-end row.
MODEL_ROWS = [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("onnxruntime-e2e", "fp32"),
              ("onnxruntime-e2e", "int8")]
FLOOR_ROWS = [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]


def check_interleaved(steps: list[dict], configs: set[str], *, warmup: int, iterations: int) -> None:
    """Every round runs every configuration once, rounds follow one another in time (by the workers' own
    clocks), and each round's order is the first one's rotated by the round number."""
    assert [s["round"] for s in steps] == sorted(s["round"] for s in steps)
    rounds = [[s for s in steps if s["round"] == r] for r in range(warmup + iterations)]
    assert [all(s["timed"] == (r >= warmup) for s in steps_r) for r, steps_r in enumerate(rounds)] == [True] * len(
        rounds)
    orders = [[s["config"] for s in steps_r] for steps_r in rounds]
    for order in orders:
        assert sorted(order) == sorted(configs)
    n = len(orders[0])
    assert orders == [orders[0][r % n:] + orders[0][: r % n] for r in range(len(orders))]
    by_time = sorted(steps, key=lambda s: s["start"])
    assert [s["config"] for s in by_time] == [s["config"] for s in steps]  # no step overlaps the next one
    assert all(a["end"] <= b["start"] for a, b in zip(by_time, by_time[1:], strict=False))


def test_toy_benchmark_writes_every_row_floor_ratios_and_interleaved_steps(throughput, tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    argv = [*TOY, "--batches", "2", "--iterations", "2", "--warmup", "1", "--families", "knet", "maskrcnn", "floor",
            "--in-process", "--out", str(out)]
    assert throughput.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["results"]
    expected = {(family, runtime, precision, 2) for family in ("knet", "maskrcnn") for runtime, precision in MODEL_ROWS}
    expected |= {("floor", runtime, precision, 2) for runtime, precision in FLOOR_ROWS}
    assert sorted((r["family"], r["runtime"], r["precision"], r["batch"]) for r in rows) == sorted(expected)
    for row in rows:
        assert row["images_per_second"] > 0 and 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
        assert row["peak_rss_mb"] > 50 and row["iterations"] == 2 and row["x_floor"] > 0
        if row["runtime"] != "torch":
            assert row["providers"][0] == "CPUExecutionProvider"
    floors = {r["runtime"]: r for r in rows if r["family"] == "floor" and r["precision"] == "fp32"}
    assert {runtime: r["x_floor"] for runtime, r in floors.items()} == {"torch": 1.0, "onnxruntime": 1.0}
    # e2e rows are relative to the graph-only onnxruntime floor, int8 rows to the fp32 floor
    e2e = next(r for r in rows if (r["family"], r["runtime"], r["precision"]) == ("knet", "onnxruntime-e2e", "int8"))
    assert e2e["x_floor"] == pytest.approx(floors["onnxruntime"]["images_per_second"] / e2e["images_per_second"])

    configs = {f"{r['family']} {r['runtime']} {r['precision']} b{r['batch']}" for r in rows}
    check_interleaved(report["steps"], configs, warmup=1, iterations=2)

    assert len(report["speedups"]) == 5 and not any("floor" in line for line in report["speedups"])
    env = report["environment"]
    assert env["device"] == "cpu" and env["onnxruntime_providers"][0] == "CPUExecutionProvider"
    assert {"cpu", "cores", "isa", "int8_isa", "torch", "onnxruntime", "threads"} <= set(env)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = out.with_suffix(".md").read_text()
    assert env["cpu"] in table and f"onnxruntime {env['onnxruntime']} on CPUExecutionProvider" in table
    assert "| K-Net R18 | onnxruntime | int8 | 2 |" in table and "| Mask R-CNN R18 | torch | fp32 | 2 |" in table
    floor_line = next(line for line in table.splitlines() if line.startswith("| floor (ResNet + FPN) R18 | onnxruntime "
                                                                             "| fp32 | 2 |"))
    assert floor_line.split("|")[8].strip() == "1.00"
    assert table in capsys.readouterr().out


def test_workers_are_separate_processes_interleaved_round_by_round(throughput, knet_export, tmp_path) -> None:
    """Without --in-process every configuration is its own persistent process (an onnxruntime one on the tiny
    exported K-Net, a PyTorch floor), and the steps those processes timestamp alternate round by round."""
    args = throughput.parse_args([*TOY, "--batches", "1"])
    jobs = [throughput._job(args, "knet", "onnxruntime", 1, str(knet_export.path)),
            throughput._job(args, "floor", "torch", 1)]
    rows, steps = throughput.measure(jobs, warmup=1, iterations=2, in_process=False, folder=tmp_path)
    assert [(r["family"], r["runtime"], r["iterations"]) for r in rows] == [("knet", "onnxruntime", 2),
                                                                           ("floor", "torch", 2)]
    pids = {r["pid"] for r in rows}
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(r["peak_rss_mb"] > 30 for r in rows) and rows[0]["providers"] == ["CPUExecutionProvider"]
    # the onnxruntime worker's memory is the runtime's own: no torch in that process
    assert [r["torch_imported"] for r in rows] == [False, True]
    check_interleaved(steps, {"knet onnxruntime fp32 b1", "floor torch fp32 b1"}, warmup=1, iterations=2)


def test_a_failing_worker_reports_its_error(throughput, tmp_path) -> None:
    args = throughput.parse_args([*TOY, "--batches", "1"])
    job = throughput._job(args, "knet", "onnxruntime", 1, str(tmp_path / "missing.onnx"))
    with pytest.raises(RuntimeError, match="missing.onnx does not exist"):
        throughput.ProcessWorker("knet onnxruntime fp32 b1", job, tmp_path / "worker.log")


def test_floor_ratios_compare_with_the_fp32_floor_of_the_same_runtime_and_batch(throughput) -> None:
    def row(family, runtime, precision, batch, ips):
        return {"family": family, "runtime": runtime, "precision": precision, "batch": batch, "images_per_second": ips}

    rows = [row("floor", "onnxruntime", "fp32", 1, 10.0), row("floor", "onnxruntime", "int8", 1, 20.0),
            row("floor", "torch", "fp32", 1, 5.0), row("knet", "onnxruntime-e2e", "int8", 1, 4.0),
            row("knet", "torch", "fp32", 1, 2.5), row("knet", "onnxruntime", "fp32", 8, 1.0)]
    throughput.add_floor_ratios(rows)
    assert [r["x_floor"] for r in rows] == [1.0, 0.5, 1.0, 2.5, 2.0, None]


def test_requesting_cuda_without_a_gpu_is_refused(throughput, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        throughput.main(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_image_sides_report_latency_and_peak_memory_per_side(throughput, knet_export, tmp_path) -> None:
    """The --image-sides measurement on the tiny exported K-Net (the random R50 export is the slow part)."""
    args = throughput.parse_args(["--image-sides", "64", "600", "--iterations", "2", "--warmup", "0", "--threads",
                                  "1", "--device", "cpu", "--families", "knet", "--rle", "--depth", "18"])
    rows = throughput.run_image_sides({"knet": str(knet_export.path)}, args, tmp_path)
    assert [(r["family"], r["side"], r["rle"]) for r in rows] == [("knet", 64, True), ("knet", 600, True)]
    for row in rows:
        assert 0 < row["latency_p50_ms"] <= row["latency_max_ms"]
        assert row["peak_rss_mb"] >= row["rss_before_mb"] > 30
        assert 1 <= row["instances"] <= knet_export.info.topk and 0 < row["box_fraction"] <= 1
    table = throughput.image_sides_table(rows)
    assert "| K-Net R18 | 600 | RLE |" in table and "| 1.00 |" in table


def test_runtime_from_runs_the_other_checkouts_runtime(throughput, knet_export, tmp_path) -> None:
    """--runtime-from: the side worker imports export.runtime from that checkout, not from this one."""
    other = tmp_path / "other_checkout"
    (other / "export").mkdir(parents=True)
    (other / "export" / "__init__.py").write_text("")
    (other / "export" / "runtime.py").write_text(
        "class Segmenter:\n    def __init__(self, *a, **k):\n        raise SystemExit('the other checkout ran')\n")
    args = throughput.parse_args(["--image-sides", "64", "--iterations", "1", "--warmup", "0", "--device", "cpu",
                                  "--families", "knet", "--runtime-from", str(other)])
    with pytest.raises(RuntimeError, match="the other checkout ran"):
        throughput.run_image_sides({"knet": str(knet_export.path)}, args, tmp_path)
    with pytest.raises(SystemExit):
        throughput.parse_args(["--image-sides", "64", "--runtime-from", str(tmp_path / "nothing_here")])
