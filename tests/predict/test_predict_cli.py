"""``sp-ray predict``'s own bad inputs (one line naming the thing, exit 2, before Ray starts), how a source
resolves, and the actor's imports (no torch). No Ray here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from sp_ray.cli import main
from sp_ray.errors import UserError
from sp_ray.predict.sources import resolve_source


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    (folder / "b").mkdir(parents=True)
    for name in ("b/2.png", "1.jpg", "b/a.png", "b/a.jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / name)
    (folder / "notes.md").write_text("not an image")
    return folder


def _plain_onnx(path: Path) -> Path:
    """A valid ONNX model (Identity) without sp-ray metadata."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), path)
    return path


def _fails(args: list[str], capsys) -> str:
    assert main(["predict", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sp-ray predict: error: "), err
    return err[0]


def test_bad_counts_threshold_and_out(images, tmp_path, capsys) -> None:
    base = ["--model", str(tmp_path / "m.onnx"), "--source", str(images), "--out", str(tmp_path / "out")]
    assert "--num-actors 0: it must be >= 1" in _fails([*base, "--num-actors", "0"], capsys)
    assert "--threads -1" in _fails([*base, "--threads", "-1"], capsys)
    assert "--batch-size 0" in _fails([*base, "--batch-size", "0"], capsys)
    assert "--shard-size 0" in _fails([*base, "--shard-size", "0"], capsys)
    assert "--score-threshold 1.5" in _fails([*base, "--score-threshold", "1.5"], capsys)
    (tmp_path / "file").write_text("x")
    message = _fails([*base[:4], "--out", str(tmp_path / "file")], capsys)
    assert f"--out {tmp_path / 'file'} is a file" in message


def test_tensorrt_options_need_gpu_and_a_folder(images, tmp_path, capsys) -> None:
    base = ["--model", str(tmp_path / "m.onnx"), "--source", str(images), "--out", str(tmp_path / "out")]
    assert "--trt-cache and --trt-fp16 are options of onnxruntime's TensorRT provider: give them with --gpu" in (
        _fails([*base, "--trt-fp16"], capsys))
    (tmp_path / "engines").write_text("x")
    message = _fails([*base, "--gpu", "--trt-cache", str(tmp_path / "engines")], capsys)
    assert f"trt_cache_dir (--trt-cache) {tmp_path / 'engines'} is a file; give a folder" in message


def test_bad_sources(images, tmp_path, capsys) -> None:
    base = ["--model", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "out")]
    assert "does not exist" in _fails([*base, "--source", str(tmp_path / "nowhere")], capsys)
    assert "matches no image files" in _fails([*base, "--source", str(tmp_path / "nowhere" / "*.jpg")], capsys)
    (tmp_path / "empty").mkdir()
    assert "holds no image files" in _fails([*base, "--source", str(tmp_path / "empty")], capsys)
    assert "not an image" in _fails([*base, "--source", str(images / "notes.md")], capsys)
    (tmp_path / "list.txt").write_text("# nothing\n\n")
    assert "names no files" in _fails([*base, "--source", str(tmp_path / "list.txt")], capsys)


def test_bad_models_and_annotations(images, tmp_path, capsys) -> None:
    base = ["--source", str(images), "--out", str(tmp_path / "out")]
    missing = tmp_path / "missing.onnx"
    assert f"--model {missing} does not exist" in _fails([*base, "--model", str(missing)], capsys)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 these bytes are not a protobuf \xff\xff")
    assert "is not an ONNX model" in _fails([*base, "--model", str(garbage)], capsys)
    plain = _plain_onnx(tmp_path / "plain.onnx")
    assert "has no sp-ray metadata" in _fails([*base, "--model", str(plain)], capsys)
    message = _fails([*base, "--model", str(plain), "--annotations", str(tmp_path / "gt.json")], capsys)
    assert "--annotations" in message and "does not exist" in message
    assert not (tmp_path / "out" / "shards").exists()


def test_sources_resolve_in_a_fixed_order(images, tmp_path) -> None:
    folder = resolve_source(str(images))
    assert folder.kind == "images" and folder.root == images
    assert [(e["id"], e["file_name"]) for e in folder.images] == [
        (1, "1.jpg"), (2, "b/2.png"), (3, "b/a.jpg"), (4, "b/a.png")]
    # Overlays are PNGs named after their image, unless two images would get the same name.
    assert [e["overlay"] for e in folder.images] == ["1.png", "b/2.png", "b/a.jpg.png", "b/a.png.png"]
    globbed = resolve_source(str(images / "**" / "*.png"))
    assert [e["file_name"] for e in globbed.images] == ["2.png", "a.png"] and globbed.root == images / "b"
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two files and a missing one\nimages/b/a.png\n\n{images / '1.jpg'}\nimages/gone.jpg\n")
    listed = resolve_source(str(listing))
    assert [e["file_name"] for e in listed.images] == ["b/a.png", "1.jpg", "gone.jpg"]  # the list's order
    assert listed.images[2]["path"] == str(images / "gone.jpg")  # kept: skipped when read
    single = resolve_source(str(images / "b" / "2.png"))
    assert [e["file_name"] for e in single.images] == ["2.png"]
    video = tmp_path / "clip.MP4"
    video.write_bytes(b"")
    assert resolve_source(str(video)).kind == "video"
    with pytest.raises(UserError, match="does not exist"):
        resolve_source(str(tmp_path / "none.png"))


def test_the_actor_imports_no_torch() -> None:
    code = ("import sys, sp_ray.predict.actor, sp_ray.predict.pipeline; "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_pool_the_cluster_cannot_hold_is_refused() -> None:
    from sp_ray.predict.pipeline import PredictOptions, _check_resources

    options = PredictOptions(model="m.onnx", source="s", out="o", num_actors=2, threads=2)
    with pytest.raises(UserError, match="--num-actors 2 x --threads 2 needs 4 CPUs, the Ray cluster has 2"):
        _check_resources({"CPU": 2.0}, 2, options)
    with pytest.raises(UserError, match="--gpu with 2 actors needs 2 GPUs, the Ray cluster has 1"):
        _check_resources({"CPU": 8.0, "GPU": 1.0}, 2, PredictOptions(model="m", source="s", out="o", gpu=True))
    _check_resources({"CPU": 4.0}, 2, options)  # fits
