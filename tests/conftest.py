"""Fixtures shared by every test folder."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sp_ray.config import load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.train.loop import fit

REPO = Path(__file__).resolve().parents[1]
KNET_TINY = REPO / "configs" / "demo" / "knet_tiny_synthetic.yaml"
IMAGE_SIZE = 64


# CI machines have a few GB of disk free and the suite's trainings write about 17 GB of checkpoints, so what a
# module wrote is deleted once the module is done (kept when one of its tests failed, to look at). Passing tests'
# ``tmp_path`` folders go at once (``tmp_path_retention_policy = "failed"`` in pyproject.toml); session fixtures'
# folders live until the session ends and are made with ``session_dir``.
_SESSION_DIRS: set[Path] = set()


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Callable[[str], Path]:
    """``session_dir(name)``: a fresh folder under the basetemp that outlives the module that first asked for it."""

    def make(name: str) -> Path:
        path = tmp_path_factory.mktemp(name)
        _SESSION_DIRS.add(path)
        return path

    return make


@pytest.fixture(scope="module", autouse=True)
def _free_module_disk(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed != failed_before:
        return
    for path in set(base.iterdir()) - before - _SESSION_DIRS:
        if path.is_symlink():  # pytest's ``<name>current`` links
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class TinyKnetCli:
    """The tiny K-Net of the command-line tests (tests/cli, tests/train/test_user_errors_ray.py): the demo's
    tiny config shrunk to 64 px, 8 kernels, 1 stage, so that an epoch takes seconds."""

    config: Path = KNET_TINY
    overrides: tuple[str, ...] = (
        "data.max_size=64", "data.short_size=64", "model.num_kernels=8", "model.feat_channels=32",
        "model.ffn_channels=64", "model.num_heads=2", "model.num_stages=1", "train.batch_size=2",
        "train.warmup_iters=2",
    )  # fmt: skip

    @staticmethod
    def data_args(data: dict[str, Path]) -> list[str]:
        return [f"data.train_annotations={data['train']}", f"data.train_images={data['images']}"]

    def finetune_argv(self, data: dict[str, Path], work_dir: Path, *extra: str) -> list[str]:
        """``sp-ray finetune`` of this model on ``data`` (``write_synthetic_dataset``'s paths) into ``work_dir``."""
        return ["finetune", "--config", str(self.config), "--work-dir", str(work_dir), *self.data_args(data),
                *self.overrides, *extra]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_knet_cli() -> TinyKnetCli:
    return TinyKnetCli()


@pytest.fixture(scope="module")
def local_ray(request):
    """A fresh single-machine Ray of 2 CPUs for the module's tests, unless one is running in this process already.

    ``address="local"`` starts a new instance: a test never joins a cluster that another process started here.
    Without a dashboard, unless the module sets ``RAY_DASHBOARD = True``: one whose Ray Train runs are killed
    mid-run (Tune's ASHA stopping a trial, a stopped sweep) needs it, because Ray Train's PlacementGroupCleaner
    frees a killed run's worker CPUs through the State API, which the dashboard serves; without it each such
    run holds its CPUs until Ray stops and later trials wait for them forever.
    """
    import ray  # a pinned dependency: missing, it is an install error, not a skip

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=getattr(request.module, "RAY_DASHBOARD", False),
                 log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def one_thread():
    """One torch thread for the test: on a shared 2-core machine, intra-op threads spinning against other
    processes slow the small training loops down by orders of magnitude."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def write_bad_image() -> Callable[[Path, str], Path]:
    """Writes image files that every reader must skip (``sp_ray.data.images``), by kind:

    - ``truncated_jpeg``: a 64 x 64 JPEG cut in half: the header reads, the pixels do not decode;
    - ``bomb_warning``: a PNG header that claims 10000 x 10000 pixels (PIL warns above 89.5M) and no pixels;
    - ``bomb_error``: the same claiming 20000 x 20000 (PIL raises DecompressionBombError above 179M).
    """

    def png_claiming(height: int, width: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(buffer, format="PNG")
        data = bytearray(buffer.getvalue())
        data[16:24] = struct.pack(">II", width, height)  # IHDR data follows the signature, length and type
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
        return bytes(data)

    def write(path: Path, kind: str) -> Path:
        if kind == "truncated_jpeg":
            buffer = io.BytesIO()
            noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
            path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        elif kind == "bomb_warning":
            path.write_bytes(png_claiming(10_000, 10_000))
        elif kind == "bomb_error":
            path.write_bytes(png_claiming(20_000, 20_000))
        else:
            raise ValueError(f"unknown bad image kind {kind!r}")
        return path

    return write


# A tiny K-Net over-fitted on synthetic data, exported: the export and predict tests share it (trained once).
@pytest.fixture(scope="session")
def synthetic(session_dir) -> dict[str, Path]:
    """10 synthetic 64 x 64 images: ``images`` folder, ``train`` json (7 images), ``val`` json (3)."""
    return write_synthetic_dataset(
        session_dir("synthetic"), num_images=10, image_size=IMAGE_SIZE, seed=0, val_fraction=0.25
    )


@pytest.fixture(scope="session")
def trained_knet(session_dir, synthetic) -> Path:
    """Final checkpoint of a tiny K-Net trained 40 epochs on the train images (evaluated on them too).

    Over-fitting a handful of images gives segm / bbox AP of about 20 / 25 on them, so AP comparisons
    between PyTorch and onnxruntime are made on real, non-empty predictions.
    """
    cfg = load_config(KNET_TINY, [
        f"data.train_annotations={synthetic['train']}", f"data.train_images={synthetic['images']}",
        f"data.val_images={synthetic['images']}",
        f"data.max_size={IMAGE_SIZE}", f"data.short_size={IMAGE_SIZE}",
        "data.flip_prob=0.0", "model.frozen_stages=4", "model.num_kernels=8", "model.feat_channels=32",
        "model.ffn_channels=64", "train.epochs=40", "train.lr_steps=[40]", "train.warmup_iters=5",
        "train.lr=1e-3", "train.grad_clip=0", "eval.topk=20",
    ])  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(cfg, session_dir("knet_run"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def knet_export(session_dir, trained_knet, synthetic):
    """``export_checkpoint`` of the trained K-Net: fp32, dynamic size and batch, parity on the val images."""
    from export.exporter.onnx_export import export_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return export_checkpoint(
            trained_knet, session_dir("onnx") / "knet.onnx", input_size=None, batch_size=None,
            parity_images=synthetic["images"], parity_count=4,
        )
    finally:
        torch.set_num_threads(threads)
