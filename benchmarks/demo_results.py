"""The results file of a finished demo run: its AP table and step times, copied out of ``runs/demo`` into
``benchmarks/results`` so that the README's demo tables have a file behind them.

Reads (nothing is recomputed): every fine-tuning run's ``eval/<run>/metrics.json`` and ``finetune/<run>/metrics.jsonl``,
``steps.json`` (each step's wall time, finish time and load average), ``pseudo/summary.json``,
``export/export.json``, the onnxruntime AP and ``throughput.json``. Writes STEM.json (all of it, plus the CPU, the
commit and whether the tree had uncommitted changes) and STEM.md (the two tables as the README prints them; the
training images/s of a run is the median over its epochs of ``metrics.jsonl``'s ``images_per_second``).

    make demo && python benchmarks/demo_results.py --demo runs/demo --results benchmarks/results/demo
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from results_files import commit, uncommitted_changes, write_results

from sp_ray.demo.settings import DEMO
from sp_ray.machine import cpu_facts
from sp_ray.run.settings import Layout, RunSettings, exported_runs, fine_tuning_runs, variant_title


def _read(path: Path) -> Any:
    if not path.is_file():
        sys.exit(f"demo_results.py: {path} does not exist: run the whole demo first (make demo)")
    return json.loads(path.read_text())


def collect(demo: Path, settings: RunSettings = DEMO) -> dict[str, Any]:
    """Everything the README's demo tables show, read from the output folder ``demo`` of a run of ``settings``
    (the demo's by default; ``benchmarks/run_tiny.py`` passes its ``sp-ray run``'s)."""
    layout = Layout.of(demo, settings)
    runs = {}
    for run in fine_tuning_runs(settings):
        metrics = _read(layout.metrics(run))
        curve = [json.loads(line) for line in (layout.run(run) / "metrics.jsonl").read_text().splitlines()]
        images = len(_read(layout.split(run.fraction, settings.split_seed))["images"])
        runs[run.name] = {"variant": run.variant, "model": variant_title(run.variant, settings.family),
                          "fraction": run.fraction,
                          "labeled_images": images, "epochs": curve[-1]["epoch"], "segm": metrics["segm"],
                          "bbox": metrics["bbox"], "curve": curve}
    knet = exported_runs(settings)[0]
    steps = _read(layout.steps)
    return {
        "demo": str(layout.root), "commit": commit(),
        "uncommitted_changes": uncommitted_changes(),
        "machine": cpu_facts(), "steps": steps,
        "steps_seconds_total": sum(entry["seconds"] for entry in steps.values()),
        "runs": runs, "pseudo_masks": _read(layout.pseudo_summary),
        "export": _read(layout.export / "export.json"),
        "onnxruntime_ap": {"run": knet.name, **_read(layout.onnx_eval / knet.name / "metrics.json")},
        "throughput": _read(layout.throughput),
    }


def markdown(result: dict[str, Any], command: str = "make demo") -> str:
    machine = result["machine"]
    dirty = ", with uncommitted changes" if result["uncommitted_changes"] else ""
    lines = [f"`{command}` output `{result['demo']}`, recorded at commit {result['commit']}{dirty}, on "
             f"{machine['cpu']} ({machine['cores']} cores; {' '.join(machine['isa'])}).", "",
             "| labeled | model | epochs | segm AP | AP50 | bbox AP | training images/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for run in result["runs"].values():
        images = run["labeled_images"]
        labeled = f"{run['fraction']:.0%} ({images} image{'' if images == 1 else 's'})"
        segm, bbox = run["segm"], run["bbox"]
        rate = statistics.median(row["images_per_second"] for row in run["curve"])
        lines.append(f"| {labeled} | {run['model']} | {run['epochs']} | {segm['AP']:.2f} | {segm['AP50']:.2f} | "
                     f"{bbox['AP']:.2f} | {rate:.2f} |")
    lines += ["", "| step | wall time (s) | load average when it finished |", "|---|---:|---:|"]
    lines += [f"| {name} | {entry['seconds']:.0f} | {entry['load_average']:.1f} |"
              for name, entry in result["steps"].items()]
    lines += ["", f"Sum of the steps: {result['steps_seconds_total'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="the demo's output folder (sp-ray demo --out)")
    parser.add_argument("--results", default="benchmarks/results/demo", help="writes STEM.json and STEM.md")
    args = parser.parse_args()
    result = collect(Path(args.demo))
    table = markdown(result)
    print(table, end="")
    write_results([args.results], result, table)


if __name__ == "__main__":
    main()
