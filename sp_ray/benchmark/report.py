"""The outputs of ``sp-ray benchmark``: ``PREFIX.md`` (header and table), ``PREFIX.json`` (every figure,
the machine, the settings, each failure's traceback) and ``PREFIX.png`` (segm AP against end-to-end
images/s, one labelled point per format that has both)."""

from __future__ import annotations

import json
from pathlib import Path

from sp_ray.benchmark import FORMATS
from sp_ray.benchmark.run import BenchmarkReport, FormatResult
from sp_ray.drawing.charts import Point, plot_points

COLUMNS = ("format", "file", "size (MB)", "segm AP", "bbox AP", "graph images/s", "graph p50 / p95 (ms)",
           "e2e images/s", "e2e p50 / p95 (ms)", "parity matched", "max score diff", "mean mask IoU", "error")


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _latency(timing: dict[str, float] | None) -> str:
    return "-" if timing is None else f"{timing['median_ms']:.1f} / {timing['p95_ms']:.1f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_row(row: FormatResult) -> str:
    """One markdown row of ``COLUMNS``; "-" where the format has no value (torch's parity: "reference")."""
    parity = row.parity
    if FORMATS[row.format] is None:  # the PyTorch model is what the others are compared with
        matched = score = iou = "reference"
    elif parity is None:
        matched = score = iou = "-"
    else:
        matched = f"{parity['matched_fraction']:.1%}" + ("" if parity["passed"] else " (FAIL)")
        score, iou = f"{parity['max_score_diff']:.2e}", f"{parity['mean_iou']:.4f}"
    graph, e2e = row.graph, row.e2e
    cells = [
        row.format, Path(row.file).name if row.file else "-", _number(row.size_mb, 1),
        _number(row.ap("segm")), _number(row.ap("bbox")),
        _number(graph and graph["items_per_second"]), _latency(graph),
        _number(e2e and e2e["items_per_second"]), _latency(e2e),
        matched, score, iou, _cell(row.error) if row.error else "",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(report: BenchmarkReport) -> str:
    """The table alone: a header row, then one row per format in the order asked for."""
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---:|" * (len(COLUMNS) - 3) + "---|"]
    return "\n".join([*lines, *(table_row(row) for row in report.rows)])


def header(report: BenchmarkReport) -> list[str]:
    """What was measured and on what: checkpoint and set, timing protocol, CPU, threads, runtimes, load."""
    env, s = report.environment, report.settings
    int8 = ", ".join(env["int8_isa"]) or "none (no VNNI: onnxruntime's int8 kernels fall back to AVX2 / AVX-512BW)"
    threads = (f"{env['threads']} (onnxruntime intra-op and PyTorch)" if env["threads"] is not None else
               f"each runtime's default (onnxruntime: one per core; PyTorch: {env['torch_threads']})")
    before, after = env["load_average_before"], env["load_average_after"]
    return [
        f"`{s['checkpoint']}` ({s['family']}, {s['classes']} classes) on `{s['annotations']}` "
        f"({s['images_in_set']} images); batch {s['batch']}; {s['rounds']} timed rounds after {s['warmup']} "
        f"warm-up, each running every format once, the order rotated by one format per round; round r runs "
        f"batch r of the set's first {s['timing_batches']} batches of {s['images_per_call']} image(s).",
        "",
        f"CPU: {env['cpu']}, {env['cores']} cores; ISA: {' '.join(env['isa']) or 'unknown'}; int8 dot products: "
        f"{int8}. Threads: {threads}. onnxruntime {env['onnxruntime']} on {env['provider']}; PyTorch "
        f"{env['torch']}; load average (1 min) before / after: {before[0]:.2f} / {after[0]:.2f}.",
    ]


def notes(report: BenchmarkReport) -> list[str]:
    """What the columns mean, and each row's note."""
    lines = [
        "- images/s: images per call / median latency of the call; p50 / p95: latency of one call (one batch).",
        "- graph: `Segmenter.run` on the prepared batch (torch: the export adapter in eager mode); e2e: "
        "`Segmenter.predict_batch(images, rle=True)`: resize, pad, graph, RLE masks at image size (torch: the "
        "same numpy pre- and post-processing around the eager adapter).",
        "- AP: as `sp-ray evaluate --checkpoint` (torch) and `sp-ray evaluate --onnx` compute it on this set.",
        f"- parity: against PyTorch fp32 on the first {report.settings['parity_count']} images of `--images`, as "
        "`sp-ray export` checks it: detections matched (same label, score within the precision's bound, mask "
        "IoU >= 0.5), the largest score difference and the mean mask IoU of the matched pairs.",
    ]
    if "onnx-int8" in report.settings["formats"]:
        lines.append(f"- onnx-int8: static int8 (QDQ), activation ranges calibrated on up to "
                     f"{report.settings['calibration_count']} images of `--images`, i.e. on the images it is "
                     "scored on; benchmark on a held-out set to see what the calibration transfers.")
    return lines + [f"- {row.format}: {row.note}" for row in report.rows if row.note]


def chart_points(report: BenchmarkReport) -> list[Point]:
    """(end-to-end images/s, segm AP) of every format that has both."""
    return [Point(row.format, row.e2e["items_per_second"], row.ap("segm")) for row in report.rows
            if row.e2e is not None and row.metrics is not None]


def write_report(report: BenchmarkReport) -> dict[str, Path]:
    """Write ``PREFIX.md``, ``PREFIX.json`` and, when a format has AP and speed, ``PREFIX.png``.

    Returns:
        {"md", "json"[, "png"]} -> the path written.
    """
    options = report.options
    files = {"md": options.output(".md"), "json": options.output(".json")}
    files["md"].parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(["# sp-ray benchmark", "", *header(report), "", markdown_table(report), "", *notes(report),
                      "", f"`{options.command()}`", ""])
    files["md"].write_text(text)
    files["json"].write_text(json.dumps(report.to_json(), indent=2))
    points = chart_points(report)
    if points:
        s, env = report.settings, report.environment
        threads = f"{env['threads']} thread(s)" if env["threads"] is not None else "default threads"
        files["png"] = plot_points(
            points, options.output(".png"), xlabel="end-to-end images / s", ylabel="segm AP",
            title=f"{s['family']}, batch {s['batch']}, {threads}\n{env['cpu_line']}",
        )
    return files
