"""``sp-ray predict`` end to end on a real Ray (one per module) with a real exported K-Net: a folder with a
corrupt and a grayscale image, AP against ``sp-ray evaluate --onnx``, resume, a killed actor, a video."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from export.rle import decode_rle
from export.runtime import Segmenter
from sp_ray.cli import main
from sp_ray.data.coco import DatasetSkipWarning
from sp_ray.data.images import UNREADABLE
from sp_ray.evaluation.coco_eval import evaluate_onnx
from sp_ray.predict.pipeline import PredictOptions, predict
from sp_ray.predict.score import score_predictions

pytestmark = pytest.mark.slow
OUTPUTS = ("images.json", "predictions.json", "skipped.json")


@pytest.fixture(scope="module")
def knet_onnx(knet_export) -> Path:
    """The tiny over-fitted K-Net of ``tests/conftest.py``, exported fp32 with dynamic size and batch."""
    return Path(knet_export.path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, synthetic, write_bad_image) -> dict[str, Path]:
    """The 10 synthetic images (linked) in a sub-folder, a grayscale copy of a val image, a truncated JPEG;
    ``gt``: the val json plus the grayscale image (with the annotations of its original) and the
    truncated one (with one annotation)."""
    root = tmp_path_factory.mktemp("predict_source")
    (root / "sub").mkdir()
    for path in sorted(synthetic["images"].iterdir()):
        (root / "sub" / path.name).symlink_to(path)
    data = json.loads(synthetic["val"].read_text())
    original = data["images"][0]
    Image.open(synthetic["images"] / original["file_name"]).convert("L").save(root / "gray.png")
    write_bad_image(root / "cut.jpg", "truncated_jpeg")
    for image in data["images"]:
        image["file_name"] = f"sub/{image['file_name']}"
    next_ann = max(a["id"] for a in data["annotations"]) + 1
    gray = {"id": 500, "file_name": "gray.png", "height": original["height"], "width": original["width"]}
    copies = [{**a, "id": next_ann + i, "image_id": 500}
              for i, a in enumerate(a for a in data["annotations"] if a["image_id"] == original["id"])]
    cut = {"id": 501, "file_name": "cut.jpg", "height": 64, "width": 64}
    square = {"id": next_ann + len(copies), "image_id": 501, "category_id": data["categories"][0]["id"],
              "iscrowd": 0, "segmentation": [[4, 4, 20, 4, 20, 20, 4, 20]], "area": 256.0, "bbox": [4, 4, 16, 16]}
    data["images"] += [gray, cut]
    data["annotations"] += [*copies, square]
    gt = root.parent / f"{root.name}_gt.json"
    gt.write_text(json.dumps(data))
    return {"root": root, "gt": gt}


@pytest.fixture(scope="module")
def full_run(local_ray, knet_onnx, folder, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted run over the folder: 12 inputs in shards of 3, 2 actors, overlays."""
    out = tmp_path_factory.mktemp("predict_full")
    summary = predict(PredictOptions(model=str(knet_onnx), source=str(folder["root"]), out=str(out), num_actors=2,
                                     shard_size=3, overlays=True))
    return out, summary


def test_folder_with_corrupt_and_grayscale_images(full_run, folder) -> None:
    out, summary = full_run
    assert summary["inputs"] == 12 and summary["images"] == 11 and summary["skipped"] == 1
    assert summary["shards"] == 4 and summary["shards_computed"] == 4
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped["count"] == 1 and skipped["reasons"] == {UNREADABLE: 1}
    assert skipped["skipped"][0]["file_name"] == "cut.jpg" and "cut.jpg" in skipped["skipped"][0]["detail"]
    listing = json.loads((out / "images.json").read_text())
    names = [entry["file_name"] for entry in listing["images"]]
    assert names == ["gray.png"] + sorted(n for n in names if n.startswith("sub/"))  # sorted, the folder's order
    gray = next(entry for entry in listing["images"] if entry["file_name"] == "gray.png")
    assert (gray["height"], gray["width"]) == (64, 64)
    # images.json is a COCO json without annotations: pycocotools loads the results against it.
    coco = COCO(str(out / "images.json"))
    results = coco.loadRes(str(out / "predictions.json"))
    assert len(results.getAnnIds()) == summary["instances"] > 0
    assert {r["image_id"] for r in json.loads((out / "predictions.json").read_text())} <= set(coco.getImgIds())
    overlay = np.asarray(Image.open(out / "overlays" / "gray.png"))
    assert overlay.shape == (64, 64, 3)
    assert len(list((out / "overlays").rglob("*.png"))) == 11


def test_predictions_score_as_evaluate_onnx(full_run, folder, knet_onnx, tmp_path) -> None:
    out, _ = full_run
    metrics = tmp_path / "scored" / "metrics.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetSkipWarning)
        expected, _ = evaluate_onnx(str(knet_onnx), annotations=str(folder["gt"]), images=str(folder["root"]),
                                    providers=["CPUExecutionProvider"], threads=1)
        scored = score_predictions(out, folder["gt"])
        code = main(["evaluate", "--results", str(out), "--annotations", str(folder["gt"]),
                     "--images", str(folder["root"]), "--out", str(metrics)])
    assert expected["segm"]["AP"] > 0 and expected["skipped"] == {"images": 1, "annotations": 1}
    assert scored == expected
    written = json.loads(metrics.read_text())
    assert code == 0 and {key: written[key] for key in expected} == expected
    categories = sorted(c["id"] for c in json.loads(Path(folder["gt"]).read_text())["categories"])
    assert [row["id"] for row in written["per_category"]["segm"]] == categories


def test_results_are_the_runtimes_own(full_run, knet_onnx, folder) -> None:
    out, _ = full_run
    segmenter = Segmenter(knet_onnx, providers=["CPUExecutionProvider"], threads=1)
    gray = np.repeat(np.asarray(Image.open(folder["root"] / "gray.png"))[..., None], 3, axis=2)
    found = segmenter.predict(gray)
    listing = json.loads((out / "images.json").read_text())
    gray_id = next(e["id"] for e in listing["images"] if e["file_name"] == "gray.png")
    mine = [r for r in json.loads((out / "predictions.json").read_text()) if r["image_id"] == gray_id]
    assert len(mine) == len(found) > 0
    np.testing.assert_allclose([r["score"] for r in mine], found.scores, rtol=1e-6)
    for result, mask in zip(mine, found.masks, strict=True):
        np.testing.assert_array_equal(decode_rle(result["segmentation"]), mask)


def test_resumed_run_equals_the_uninterrupted_one(full_run, folder, knet_onnx, tmp_path, capsys) -> None:
    out, _ = full_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    # What an interruption after shards 0 and 2 leaves: no merged results, shards 1 and 3 missing
    # (shard 3's json gone, its overlays kept; shard 1 written half: a stray temporary file).
    for name in OUTPUTS:
        (resumed / name).unlink()
    (resumed / "shards" / "00001.json").rename(resumed / "shards" / ".00001.json.123.tmp")
    (resumed / "shards" / "00003.json").unlink()
    args = ["predict", "--model", str(knet_onnx), "--source", str(folder["root"]), "--out", str(resumed),
            "--shard-size", "3", "--overlays", "--num-actors", "2"]
    assert main(args) == 2  # an earlier run's shards, without --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume", "--annotations", str(folder["gt"])]) == 0
    summary, _ = json.JSONDecoder().raw_decode(capsys.readouterr().out)  # the summary, then the metrics table
    assert summary["shards_computed"] == 2 and summary["shards_reused"] == 2
    for name in OUTPUTS:
        assert (resumed / name).read_bytes() == (out / name).read_bytes(), name
    assert json.loads((resumed / "metrics.json").read_text()) == score_predictions(out, folder["gt"])


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(local_ray, full_run, folder, knet_onnx, tmp_path) -> None:
    """A real interrupt: ``sp-ray predict`` in its own process, on this module's Ray through RAY_ADDRESS,
    SIGINT once 3 of its 12 one-image shards are written, then ``--resume``; the shard size differs from
    the full run's, the results do not."""
    out, _ = full_run
    interrupted = tmp_path / "interrupted"
    args = [sys.executable, "-m", "sp_ray.cli", "predict", "--model", str(knet_onnx), "--source",
            str(folder["root"]), "--out", str(interrupted), "--shard-size", "1"]
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while len(list((interrupted / "shards").glob("0*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    written = len(list((interrupted / "shards").glob("0*.json")))
    assert process.returncode == 130 and "sp-ray predict: interrupted" in err, err[-2000:]
    hint = next(line for line in err.splitlines() if "sp-ray predict: interrupted" in line)
    assert "continue it with: sp-ray predict " in hint and hint.endswith(" --resume"), hint
    assert "Started a local Ray instance" not in err  # it joined RAY_ADDRESS
    assert 3 <= written < 12 and not (interrupted / "predictions.json").exists()
    summary = predict(PredictOptions(model=str(knet_onnx), source=str(folder["root"]), out=str(interrupted),
                                     shard_size=1, resume=True))
    assert summary["shards_reused"] == written and summary["shards_computed"] == 12 - written
    for name in OUTPUTS:
        assert (interrupted / name).read_bytes() == (out / name).read_bytes(), name


def test_killed_actor_is_replaced_and_every_image_is_predicted_once(local_ray, knet_onnx, folder,
                                                                      tmp_path) -> None:
    # 48 inputs in shards of one: the same 12 files listed 4 times (distinct ids).
    files = sorted(str(p) for p in folder["root"].rglob("*") if p.is_file())
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(files * 4))
    reference = tmp_path / "reference"
    predict(PredictOptions(model=str(knet_onnx), source=str(listing), out=str(reference), shard_size=1))
    out = tmp_path / "killed"
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["summary"] = predict(PredictOptions(model=str(knet_onnx), source=str(listing), out=str(out),
                                                        num_actors=2, shard_size=1))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = err

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 120
    while not list((out / "shards").glob("0*.json")) and time.monotonic() < deadline:
        time.sleep(0.005)
    first = next((out / "shards").glob("0*.json"))
    victim = json.loads(first.read_text())["actor_pid"]
    os.kill(victim, signal.SIGKILL)
    done_at_kill = len(list((out / "shards").glob("0*.json")))
    worker.join(timeout=180)
    assert "error" not in outcome, outcome.get("error")
    assert done_at_kill < 48  # the kill came while shards were left to compute
    pids = {json.loads(p.read_text())["actor_pid"] for p in (out / "shards").glob("0*.json")}
    assert len(pids) >= 2
    ids = [e["id"] for e in json.loads((out / "images.json").read_text())["images"]]
    assert len(ids) == len(set(ids)) == 44  # 4 x 11 decodable inputs, each once
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def _write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def test_video_gives_an_annotated_video_of_every_frame(local_ray, knet_onnx, synthetic, tmp_path) -> None:
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(synthetic["images"].iterdir())]
    frames = [images[i % len(images)] for i in range(13)]
    video = tmp_path / "clip.mp4"
    _write_video(video, frames, fps=12)
    out = tmp_path / "video_out"
    summary = predict(PredictOptions(model=str(knet_onnx), source=str(video), out=str(out), shard_size=5,
                                     batch_size=2))
    assert summary["inputs"] == 13 and summary["images"] == 13 and summary["skipped"] == 0
    annotated = Path(summary["annotated_video"])
    with av.open(str(annotated)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert Fraction(stream.average_rate) == 12
    assert len(decoded) == 13 and decoded[0].shape == (64, 64, 3)
    listing = json.loads((out / "images.json").read_text())["images"]
    assert [e["frame_index"] for e in listing] == list(range(13))
    # Per-frame results are the runtime's on the decoded input frames.
    segmenter = Segmenter(str(knet_onnx), providers=["CPUExecutionProvider"], threads=1)
    with av.open(str(video)) as container:
        inputs = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    results = json.loads((out / "predictions.json").read_text())
    # Shards of 5 frames, graph runs of 2: frames 0 and 1, 7 and 8 run together, 12 alone.
    for index, batch in ((0, [0, 1]), (7, [7, 8]), (12, [12])):
        mine = [r for r in results if r["frame_index"] == index]
        found = segmenter.predict_batch([inputs[i] for i in batch], rle=True, batch_size=len(batch))[0]
        assert len(mine) == len(found) and all(r["image_id"] == index + 1 for r in mine)
        assert [r["segmentation"]["counts"] for r in mine] == [rle["counts"] for rle in found.rles]
