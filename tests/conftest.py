"""Fixtures shared by every test folder."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def local_ray():
    """A fresh single-machine Ray of 2 CPUs for the module's tests, unless one is running in this process already.

    ``address="local"`` starts a new instance: a test never joins a cluster that another process started here.
    """
    import ray  # a pinned dependency: missing, it is an install error, not a skip

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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
