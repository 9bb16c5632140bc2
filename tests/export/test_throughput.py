"""benchmarks/throughput.py at toy scale: every configuration is measured and reported."""

from __future__ import annotations

import importlib.util
import json

import pytest

from .conftest import REPO


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_benchmark_writes_table_json_and_chart(throughput, tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    argv = ["--depth", "18", "--size", "64", "--batches", "2", "--iterations", "2", "--warmup", "1",
            "--num-classes", "3", "--topk", "10", "--proposals", "20", "--threads", "1", "--device", "cpu",
            "--in-process", "--out", str(out)]
    assert throughput.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["results"]
    assert {(r["family"], r["runtime"], r["batch"]) for r in rows} == {
        (family, runtime, 2) for family in ("knet", "maskrcnn") for runtime in throughput.RUNTIMES
    }
    for row in rows:
        assert row["images_per_second"] > 0 and 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
        assert row["peak_rss_mb"] > 50
        if row["runtime"] != "torch":
            assert row["providers"][0] == "CPUExecutionProvider"
    assert len(report["speedups"]) == 3 and report["environment"]["device"] == "cpu"
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = out.with_suffix(".md").read_text()
    assert "| K-Net R18 | onnxruntime | 2 |" in table and "| Mask R-CNN R18 | torch | 2 |" in table
    assert table in capsys.readouterr().out


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
