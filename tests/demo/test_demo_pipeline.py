"""The whole demo at its tiniest setting on a local Ray: every step, the report and its links, reruns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sp_ray.cli import DEMO_STEPS
from sp_ray.demo import TINY, DemoLayout, run_demo
from sp_ray.demo.settings import demo_runs, exported_runs, kernel_checkpoints

pytestmark = pytest.mark.slow


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
    assert [r.name for r in records] == list(DEMO_STEPS)
    assert all(r.status == "ran" for r in records)
    assert list(json.loads((out / "steps.json").read_text())) == list(DEMO_STEPS)


@pytest.mark.parametrize("name", ["report.html", "report.md"])
def test_report_links_resolve(demo, name):
    out, _ = demo
    links = linked_paths(out / name)
    # 6 drawn figures and one kernel grid per analysed checkpoint
    assert len(links) == 6 + len(kernel_checkpoints(DemoLayout(out), TINY))
    for link in links:
        assert not link.startswith(("/", "http")) and (out / link).is_file(), link


def test_artefacts_hold_what_the_report_says(demo):
    out, _ = demo
    layout = DemoLayout(out)
    for run in demo_runs(TINY):
        metrics = json.loads(layout.metrics(run).read_text())
        assert 0.0 <= metrics["segm"]["AP"] <= 100.0
        lines = (layout.run(run) / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == (TINY.maskrcnn_epochs if run.variant == "maskrcnn" else TINY.finetune_epochs)
        if run.variant != "maskrcnn":  # K-Net runs evaluate every eval_interval epochs: the AP curves
            assert all("segm_AP" in json.loads(line) for line in lines)
    export = json.loads((layout.export / "export.json").read_text())
    assert all(export[run.name]["parity"]["passed"] for run in exported_runs(TINY))
    knet = exported_runs(TINY)[0]
    onnx_ap = json.loads((layout.onnx_eval / knet.name / "metrics.json").read_text())["segm"]["AP"]
    torch_ap = json.loads(layout.metrics(knet).read_text())["segm"]["AP"]
    assert onnx_ap == pytest.approx(torch_ap, abs=0.5)
    samples = json.loads((layout.onnx_eval / "samples.json").read_text())
    assert [len(samples[run.name]) for run in exported_runs(TINY)] == [TINY.sample_images] * 2
    pseudo = json.loads(layout.pseudo_summary.read_text())
    assert pseudo["annotations"] > 0 and 0.0 <= pseudo["recall"]["0.5"] <= 1.0
    throughput = json.loads(layout.throughput.read_text())
    assert all(t["items_per_second"] > 0 and t["repeats"] == TINY.throughput_repeats
               for t in throughput["models"].values())
    workers = sorted((layout.pretrain / "workers").glob("rank*.json"))
    assert len(workers) == 2  # SP pre-training ran in two Ray Train workers


def test_rerun_skips_every_step_and_redo_reruns_from_a_step(demo):
    out, _ = demo
    before = (out / "report.html").stat().st_mtime_ns
    records = run_demo(out, TINY)
    assert all(r.status == "skipped" for r in records)
    assert (out / "report.html").stat().st_mtime_ns == before
    records = run_demo(out, TINY, redo=["throughput"])
    assert {r.name for r in records if r.status == "ran"} == {"throughput", "report"}
