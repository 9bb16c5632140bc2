"""The whole demo at its tiniest setting on a local Ray: every step, the report and its links, reruns."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from sp_ray.cli import PIPELINE_STEPS
from sp_ray.demo import TINY, run_demo
from sp_ray.run.settings import Layout, exported_runs, fine_tuning_runs, kernel_checkpoints

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(local_ray, tmp_path_factory):
    """The first run of the tiny demo: its folder and step records."""
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, TINY)


def linked_paths(report: Path) -> list[str]:
    text = report.read_text()
    if report.suffix == ".html":
        return re.findall(r'(?:src|href)="([^"]+)"', text)
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def test_first_run_runs_every_step(demo):
    out, records = demo
    assert [r.name for r in records] == list(PIPELINE_STEPS)
    assert all(r.status == "ran" for r in records)
    assert list(json.loads((out / "steps.json").read_text())) == list(PIPELINE_STEPS)


@pytest.mark.parametrize("name", ["report.html", "report.md"])
def test_report_links_resolve(demo, name):
    out, _ = demo
    links = linked_paths(out / name)
    # 6 drawn figures, the main model's 2 precision-recall curves and one kernel grid per analysed checkpoint
    assert len(links) == 8 + len(kernel_checkpoints(Layout.of(out, TINY), TINY))
    for link in links:
        assert not link.startswith(("/", "http")) and (out / link).is_file(), link


AP_TABLE_HEADER = ("labeled", "model", "epochs", "segm AP", "AP50", "AP75", "bbox AP")


def markdown_table(text: str, header: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of the pipe table of ``text`` whose header row is ``header``, as dicts by column."""
    lines = text.splitlines()
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    (start,) = [i for i, line in enumerate(lines) if line.startswith("|") and tuple(cells(line)) == header]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, cells(line), strict=True)))
    return rows


def test_artefacts_hold_what_the_report_says(demo):
    out, _ = demo
    layout = Layout.of(out, TINY)
    # The report's AP table is the metrics files, row for row, at the report's two decimals.
    table = markdown_table((out / "report.md").read_text(), AP_TABLE_HEADER)
    assert len(table) == len(fine_tuning_runs(TINY))
    titles = {"scratch": "K-Net from scratch", "sp": "K-Net from SP", "maskrcnn": "Mask R-CNN"}
    for run in fine_tuning_runs(TINY):
        metrics = json.loads(layout.metrics(run).read_text())
        lines = (layout.run(run) / "metrics.jsonl").read_text().splitlines()
        images = len(json.loads(layout.split(run.fraction, TINY.split_seed).read_text())["images"])
        labeled = f"{round(100 * run.fraction)}% ({images} image{'' if images == 1 else 's'})"
        (row,) = [r for r in table if r["labeled"] == labeled and r["model"] == titles[run.variant]]
        assert row == {"labeled": labeled, "model": titles[run.variant],
                       "epochs": str(json.loads(lines[-1])["epoch"]),
                       "segm AP": f"{metrics['segm']['AP']:.2f}", "AP50": f"{metrics['segm']['AP50']:.2f}",
                       "AP75": f"{metrics['segm']['AP75']:.2f}", "bbox AP": f"{metrics['bbox']['AP']:.2f}"}
        assert len(lines) == (TINY.maskrcnn_epochs if run.variant == "maskrcnn" else TINY.finetune_epochs)
        if run.variant != "maskrcnn":  # K-Net runs evaluate every eval_interval epochs: the AP curves
            assert all("segm_AP" in json.loads(line) for line in lines)
    export = json.loads((layout.export / "export.json").read_text())
    assert all(export[run.name]["parity"]["passed"] for run in exported_runs(TINY))
    knet = exported_runs(TINY)[0]
    onnx_ap = json.loads((layout.onnx_eval / knet.name / "metrics.json").read_text())["segm"]["AP"]
    torch_ap = json.loads(layout.metrics(knet).read_text())["segm"]["AP"]
    assert onnx_ap == pytest.approx(torch_ap, abs=0.5)
    assert f"segm AP: PyTorch {torch_ap:.2f}, onnxruntime {onnx_ap:.2f} " in (out / "report.md").read_text()
    samples = json.loads((layout.onnx_eval / "samples.json").read_text())
    assert [len(samples[run.name]) for run in exported_runs(TINY)] == [TINY.sample_images] * 2
    pseudo = json.loads(layout.pseudo_summary.read_text())
    assert pseudo["annotations"] > 0 and 0.0 <= pseudo["recall"]["0.5"] <= 1.0
    throughput = json.loads(layout.throughput.read_text())
    assert all(t["items_per_second"] > 0 and t["repeats"] == TINY.throughput_repeats
               for t in throughput["models"].values())
    workers = sorted((layout.pretrain / "workers").glob("rank*.json"))
    assert len(workers) == 2  # SP pre-training ran in two Ray Train workers


def test_results_file_copies_the_demos_ap_and_step_tables(demo, tmp_path):
    out, _ = demo
    layout = Layout.of(out, TINY)
    stem = tmp_path / "demo"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "demo_results.py"), "--demo", str(out),
                    "--results", str(stem)], check=True, capture_output=True, text=True)
    result = json.loads(stem.with_suffix(".json").read_text())
    assert result["steps"] == json.loads(layout.steps.read_text())
    table = markdown_table(stem.with_suffix(".md").read_text(),
                           ("labeled", "model", "epochs", "segm AP", "AP50", "bbox AP", "training images/s"))
    titles = {"scratch": "K-Net from scratch", "sp": "K-Net from SP", "maskrcnn": "Mask R-CNN"}
    expected = []
    for run in fine_tuning_runs(TINY):
        metrics = json.loads(layout.metrics(run).read_text())
        images = len(json.loads(layout.split(run.fraction, TINY.split_seed).read_text())["images"])
        curve = [json.loads(line) for line in (layout.run(run) / "metrics.jsonl").read_text().splitlines()]
        rate = statistics.median(row["images_per_second"] for row in curve)
        labeled = f"{round(100 * run.fraction)}% ({images} image{'' if images == 1 else 's'})"
        expected.append({"labeled": labeled, "model": titles[run.variant],
                         "epochs": str(curve[-1]["epoch"]), "segm AP": f"{metrics['segm']['AP']:.2f}",
                         "AP50": f"{metrics['segm']['AP50']:.2f}", "bbox AP": f"{metrics['bbox']['AP']:.2f}",
                         "training images/s": f"{rate:.2f}"})
    assert table == expected
    steps = markdown_table(stem.with_suffix(".md").read_text(),
                           ("step", "wall time (s)", "load average when it finished"))
    assert [row["step"] for row in steps] == list(PIPELINE_STEPS)


def test_rerun_skips_every_step_and_redo_reruns_from_a_step(demo):
    out, _ = demo
    before = (out / "report.html").stat().st_mtime_ns
    records = run_demo(out, TINY)
    assert all(r.status == "skipped" for r in records)
    assert (out / "report.html").stat().st_mtime_ns == before
    records = run_demo(out, TINY, redo=["throughput"])
    assert {r.name for r in records if r.status == "ran"} == {"throughput", "report"}
