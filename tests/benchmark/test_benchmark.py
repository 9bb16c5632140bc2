"""``sp-ray benchmark``: one row per format with the AP ``sp-ray evaluate`` gives, failures as rows, bad paths.

No test asserts a time: the timing tests check which calls ran in which order, not how fast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.exporter.onnx_export import ExportResult, ParityError
from sp_ray.benchmark import FORMATS
from sp_ray.benchmark import run as bench
from sp_ray.cli import main
from sp_ray.machine import cpu_name

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PNG = b"\x89PNG\r\n\x1a\n"


def _args(checkpoint, synthetic, out: Path, *extra: str) -> list[str]:
    # The train images: the tiny K-Net over-fits them, so its AP there is far from 0 (tests/conftest.py).
    return ["benchmark", "--checkpoint", str(checkpoint), "--annotations", str(synthetic["train"]), "--images",
            str(synthetic["images"]), "--threads", "1", "--rounds", "2", "--warmup", "0", "--out", str(out), *extra]


def _evaluate(source: list[str], synthetic, out: Path) -> dict:
    """The metrics ``sp-ray evaluate`` writes for ``source`` (["--onnx", M] or ["--checkpoint", C])."""
    code = main(["evaluate", *source, "--annotations", str(synthetic["train"]), "--images", str(synthetic["images"]),
                 "--out", str(out), *(["--threads", "1"] if source[0] == "--onnx" else [])])
    assert code == 0
    return json.loads(out.read_text())


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.split("|")[1:-1]]


def _table_lines(md: str) -> dict[str, str]:
    """format -> its table line."""
    return {line.split("|")[1].strip(): line for line in md.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in FORMATS}


def test_benchmark_has_a_row_per_format_with_the_ap_of_sp_ray_evaluate(trained_knet, synthetic, tmp_path,
                                                                       capsys) -> None:
    prefix = tmp_path / "bench" / "knet"
    assert main(_args(trained_knet, synthetic, prefix, "--calibration-count", "2")) == 0  # 2: a faster int8 export
    printed = capsys.readouterr().out
    report = json.loads(prefix.with_name("knet.json").read_text())
    rows = {row["format"]: row for row in report["rows"]}
    assert list(rows) == list(FORMATS)
    assert all(row["error"] is None for row in rows.values()), [row["error"] for row in rows.values()]

    # The expected AP comes from `sp-ray evaluate` on the same files, not from the benchmark's code.
    expected = {"torch": _evaluate(["--checkpoint", str(trained_knet)], synthetic, tmp_path / "torch.json")}
    for name in ("onnx", "onnx-fp16", "onnx-int8"):
        model = prefix.with_name(f"knet.{FORMATS[name]}.onnx")
        # A model outside its precision's parity bounds is measured from the file the export kept.
        assert Path(rows[name]["file"]) in (model, model.with_name(model.stem + ".parity-failed.onnx"))
        expected[name] = _evaluate(["--onnx", rows[name]["file"]], synthetic, tmp_path / f"{name}.json")
    assert expected["torch"]["segm"]["AP"] > 5, expected["torch"]  # real predictions, not an empty set
    md = prefix.with_name("knet.md").read_text()
    lines = _table_lines(md)
    assert list(lines) == list(FORMATS)
    for name, metrics in expected.items():
        for iou_type in ("segm", "bbox"):
            assert rows[name]["metrics"][iou_type] == metrics[iou_type], (name, iou_type)
            assert f" {metrics[iou_type]['AP']:.2f} |" in lines[name]
        assert rows[name]["size_mb"] > 0
        for kind in ("graph", "e2e"):
            timing = rows[name][kind]
            assert timing["repeats"] == 2 and timing["items_per_call"] == 1 and timing["items_per_second"] > 0

    assert rows["torch"]["parity"] is None and "reference" in lines["torch"]
    assert rows["torch"]["file"] == str(trained_knet / "model.pt")
    for name in ("onnx", "onnx-fp16", "onnx-int8"):
        parity = rows[name]["parity"]
        assert parity["images"] == 4 and parity["detections"] > 0 and 0 <= parity["matched_fraction"] <= 1
        assert 0 <= parity["mean_iou"] <= 1 and parity["max_score_diff"] >= 0
        assert rows[name]["providers"][0] == "CPUExecutionProvider"
    assert rows["onnx"]["parity"]["passed"] and rows["onnx"]["parity"]["matched_fraction"] == 1.0

    env = report["environment"]
    assert env["threads"] == 1 and env["provider"] == "CPUExecutionProvider" and "isa" in env and "int8_isa" in env
    assert cpu_name() in md and f"onnxruntime {env['onnxruntime']}" in md and "Threads: 1 " in md
    assert report["command"].startswith("sp-ray benchmark --checkpoint")
    assert prefix.with_name("knet.png").read_bytes()[:8] == PNG
    assert all(line in printed for line in lines.values())  # the table is printed too


def _fake_export(knet_export, *, fail: dict[str, BaseException], calls: list | None = None):
    """An ``export_checkpoint`` that copies the session's fp32 export, or raises ``fail[precision]``; a
    ParityError leaves the model at ``.parity-failed.onnx``, as the real one does. ``calls`` collects
    (precision, keyword arguments) of each call."""

    def export(checkpoint, out, *, precision="fp32", **kwargs):
        out = Path(out)
        if calls is not None:
            calls.append((precision, kwargs))
        if isinstance(fail.get(precision), ParityError):
            shutil.copy(knet_export.path, out.with_name(out.stem + ".parity-failed.onnx"))
        if precision in fail:
            raise fail[precision]
        shutil.copy(knet_export.path, out)
        return ExportResult(path=out, info=knet_export.info, parity=knet_export.parity)

    return export


def test_a_format_that_fails_is_a_row_with_its_error_and_the_others_run(trained_knet, knet_export, synthetic,
                                                                        tmp_path, monkeypatch) -> None:
    fail = {"fp16": ValueError("--fp16 is not supported for maskrcnn: onnxruntime's fp16 converter ..."),
            "int8": ParityError("parity int8 on 4 images: ... FAIL")}
    calls: list = []
    monkeypatch.setattr(bench, "export_checkpoint", _fake_export(knet_export, fail=fail, calls=calls))
    prefix = tmp_path / "bench"
    assert main(_args(trained_knet, synthetic, prefix, "--formats", "onnx-fp16", "torch", "onnx", "onnx-int8",
                      "--batch", "2", "--calibration-count", "5")) == 0
    # Exported with the benchmark's batch and parity images; int8 alone calibrated, on the set's images.
    assert [precision for precision, _ in calls] == ["fp16", "fp32", "int8"]
    for precision, kwargs in calls:
        assert kwargs["batch_size"] == 2 and kwargs["parity_images"] == synthetic["images"]
        assert ("calibration_images" in kwargs) == (precision == "int8")
    assert calls[2][1]["calibration_images"] == synthetic["images"] and calls[2][1]["calibration_count"] == 5
    rows = {row["format"]: row for row in json.loads(prefix.with_suffix(".json").read_text())["rows"]}
    assert list(rows) == ["onnx-fp16", "torch", "onnx", "onnx-int8"]
    fp16 = rows["onnx-fp16"]
    assert fp16["error"].startswith("export: ValueError: --fp16 is not supported for maskrcnn")
    assert "Traceback" in fp16["traceback"] and fp16["metrics"] is None and fp16["e2e"] is None
    for name in ("torch", "onnx", "onnx-int8"):
        assert rows[name]["error"] is None and rows[name]["metrics"]["segm"]["AP"] > 5
        assert rows[name]["e2e"]["items_per_second"] > 0
    # Outside its parity bounds: measured from the kept model all the same, and the row says so.
    int8 = rows["onnx-int8"]
    assert int8["file"].endswith("bench.int8.parity-failed.onnx") and "parity outside the int8 bounds" in int8["note"]
    assert int8["parity"]["detections"] > 0
    lines = _table_lines(prefix.with_suffix(".md").read_text())
    assert "export: ValueError: --fp16 is not supported" in lines["onnx-fp16"]
    assert set(_cells(lines["onnx-fp16"])[1:-1]) == {"-"}  # no file, size, AP, speed or parity
    assert "parity outside the int8 bounds" in prefix.with_suffix(".md").read_text()


def test_no_format_that_runs_is_exit_status_1_with_the_table_written(trained_knet, knet_export, synthetic,
                                                                     tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench, "export_checkpoint",
                        _fake_export(knet_export, fail={"fp32": RuntimeError("the exporter crashed")}))
    prefix = tmp_path / "bench"
    assert main(_args(trained_knet, synthetic, prefix, "--formats", "onnx")) == 1
    assert "no format ran" in capsys.readouterr().err
    assert "export: RuntimeError: the exporter crashed" in prefix.with_suffix(".md").read_text()
    assert not prefix.with_suffix(".png").exists()  # nothing to plot


@pytest.mark.parametrize("broken", ["checkpoint", "annotations", "images", "not_a_checkpoint"])
def test_bad_paths_are_exit_status_2_naming_the_path(trained_knet, synthetic, tmp_path, capsys, broken) -> None:
    paths = {"checkpoint": trained_knet, "annotations": synthetic["train"], "images": synthetic["images"]}
    if broken == "not_a_checkpoint":
        (tmp_path / "empty").mkdir()
        paths["checkpoint"] = bad = tmp_path / "empty"
    else:
        paths[broken] = bad = tmp_path / f"no_such_{broken}"
    argv = ["benchmark", "--checkpoint", str(paths["checkpoint"]), "--annotations", str(paths["annotations"]),
            "--images", str(paths["images"]), "--out", str(tmp_path / "bench")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sp-ray benchmark: error: ") and str(bad) in err, err
    assert not list(tmp_path.glob("bench*"))  # nothing was exported or written


def test_bad_settings_are_exit_status_2(trained_knet, synthetic, tmp_path, capsys) -> None:
    assert main(_args(trained_knet, synthetic, tmp_path / "b", "--batch", "0")) == 2
    assert "--batch 0: it must be >= 1" in capsys.readouterr().err


def test_rounds_run_every_format_once_in_an_order_rotated_each_round() -> None:
    calls: list[tuple[int, str, str]] = []

    def call(name: str, kind: str, fail_at: int | None = None):
        def run(round_index: int) -> None:
            if round_index == fail_at:
                raise RuntimeError(f"{name} broke")
            calls.append((round_index, name, kind))

        return run

    contenders = {name: {"graph": call(name, "graph"), "e2e": call(name, "e2e")} for name in "abc"}
    timings, failed = bench.time_rounds(contenders, rounds=3, warmup=1, items_per_call=2)
    assert not failed
    orders = [[name for r, name, kind in calls if r == round_index and kind == "graph"] for round_index in range(4)]
    assert orders == [list("abc"), list("bca"), list("cab"), list("abc")]
    assert [kind for _, name, kind in calls if name == "a"] == ["graph", "e2e", "e2e", "graph"] * 2  # swapped
    assert all(len(timings[name][kind].latencies) == 3 and timings[name][kind].items_per_call == 2
               for name in "abc" for kind in ("graph", "e2e"))  # the warm-up round is not timed

    calls.clear()
    contenders["b"]["e2e"] = call("b", "e2e", fail_at=1)
    timings, failed = bench.time_rounds(contenders, rounds=3, warmup=1, items_per_call=1)
    assert list(failed) == ["b"] and str(failed["b"]) == "b broke" and set(timings) == {"a", "c"}
    # Round 1 runs b's e2e call first (swapped), which raises: b's graph call and later rounds are skipped.
    assert [(r, kind) for r, name, kind in calls if name == "b"] == [(0, "graph"), (0, "e2e")]
    assert max(r for r, name, _ in calls) == 3
