"""The one rule for image files that readers skip: missing or undecodable, or above the pixel limit."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sp_ray.config import load_config
from sp_ray.data.images import TOO_LARGE, UNREADABLE, UnusableImageError, displayed_size, load_image_rgb


def test_truncated_jpeg_reads_its_header_but_is_unreadable(tmp_path: Path, write_bad_image) -> None:
    path = write_bad_image(tmp_path / "cut.jpg", "truncated_jpeg")
    assert displayed_size(path) == (64, 64)
    with pytest.raises(UnusableImageError, match="cut.jpg") as info:
        load_image_rgb(path)
    assert info.value.reason == UNREADABLE and info.value.path == path
    assert isinstance(info.value, OSError)  # older callers that catch OSError keep skipping it


def test_missing_and_non_image_files_are_unreadable(tmp_path: Path) -> None:
    (tmp_path / "text.png").write_text("not an image")
    for name in ("text.png", "absent.png"):
        for read in (load_image_rgb, displayed_size):
            with pytest.raises(UnusableImageError, match=name) as info:
                read(tmp_path / name)
            assert info.value.reason == UNREADABLE


def test_pixel_limit_is_checked_on_the_header(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    assert load_image_rgb(tmp_path / "a.png", max_pixels=600).shape == (20, 30, 3)
    for read in (load_image_rgb, displayed_size):
        limit = r"20x30 \(HxW\), 600 pixels, more than max_image_pixels = 599"
        with pytest.raises(UnusableImageError, match=limit) as info:
            read(tmp_path / "a.png", max_pixels=599)
        assert info.value.reason == TOO_LARGE
        assert "data.max_image_pixels" in str(info.value)


@pytest.mark.parametrize("kind", ["bomb_warning", "bomb_error"])
def test_decompression_bombs_are_too_large_without_pil_warnings(tmp_path: Path, write_bad_image, kind) -> None:
    """PIL warns about 10000 x 10000 and refuses 20000 x 20000; both are above the default limit, one rule."""
    path = write_bad_image(tmp_path / "bomb.png", kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither PIL's DecompressionBombWarning nor anything else escapes
        for read in (load_image_rgb, displayed_size):
            with pytest.raises(UnusableImageError, match="bomb.png.*max_image_pixels") as info:
                read(path)
            assert info.value.reason == TOO_LARGE


def test_a_limit_above_pils_guard_says_to_raise_pils_too(tmp_path: Path, write_bad_image) -> None:
    path = write_bad_image(tmp_path / "bomb.png", "bomb_error")
    with pytest.raises(UnusableImageError, match=r"raise PIL.Image.MAX_IMAGE_PIXELS too") as info:
        displayed_size(path, max_pixels=10**9)
    assert info.value.reason == TOO_LARGE


def test_the_error_survives_pickling_with_its_reason(tmp_path: Path) -> None:
    """DataLoader workers and Ray actors send exceptions between processes."""
    error = UnusableImageError(tmp_path / "a.png", TOO_LARGE, "too big")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.reason, str(copy)) == (tmp_path / "a.png", TOO_LARGE, "too big")


def test_the_config_default_is_the_runtime_default_and_pils_threshold() -> None:
    from export.geometry import MAX_IMAGE_PIXELS

    assert load_config(None, []).data.max_image_pixels == MAX_IMAGE_PIXELS == 1024**3 // 4 // 3
