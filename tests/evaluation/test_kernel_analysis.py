"""The kernel analysis figure: average mask per kernel over images, as a grid PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sp_ray.checkpoint import save_checkpoint
from sp_ray.cli import main
from sp_ray.config import load_config
from sp_ray.evaluation.kernel_analysis import (
    CELL_INCHES,
    DPI,
    average_kernel_masks,
    grid_shape,
    load_query_model,
    render_kernel_grid,
)
from sp_ray.models import build_model

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "knet_tiny_synthetic.yaml"


def _tiny_cfg(*extra: str):
    return load_config(
        CONFIG,
        [
            "model.num_classes=2",
            "model.num_kernels=5",
            "model.feat_channels=32",
            "model.ffn_channels=64",
            "model.num_heads=2",
            "model.num_stages=1",
            "data.max_size=64",
            "data.short_size=64",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    model = build_model(cfg)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "final", model=model, config=cfg, meta={})


def test_grid_shape():
    assert grid_shape(1) == (1, 1)
    assert grid_shape(5) == (2, 3)
    assert grid_shape(16) == (4, 4)
    assert grid_shape(100) == (10, 10)


def test_average_masks_are_probabilities_and_the_mean_of_single_images(checkpoint):
    model, _ = load_query_model(checkpoint)
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (48, 80, 3), dtype=np.uint8),
        rng.integers(0, 256, (64, 40, 3), dtype=np.uint8),
    ]
    both, count = average_kernel_masks(model, images, max_size=64, short_size=64, stage="last", size=(16, 16))
    assert count == 2 and both.shape == (5, 16, 16)
    assert 0.0 <= both.min() and both.max() <= 1.0
    singles = [
        average_kernel_masks(model, [image], max_size=64, short_size=64, stage="last", size=(16, 16))[0]
        for image in images
    ]
    torch.testing.assert_close(both, (singles[0] + singles[1]) / 2)
    with pytest.raises(ValueError, match="stage"):
        average_kernel_masks(model, images, max_size=64, short_size=64, stage="middle")
    with pytest.raises(ValueError, match="no images"):
        average_kernel_masks(model, [], max_size=64, short_size=64)


def test_render_writes_a_png_of_the_grid_size(tmp_path):
    rows, columns = render_kernel_grid(torch.rand(7, 8, 8), tmp_path / "sub" / "k.png")
    assert (rows, columns) == (3, 3)
    with Image.open(tmp_path / "sub" / "k.png") as png:
        assert png.size == (round(columns * CELL_INCHES * DPI), round(rows * CELL_INCHES * DPI))


def test_cli_analyze_kernels_on_a_folder_skips_undecodable_files(checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(np.full((40, 60, 3), 60 * index, dtype=np.uint8)).save(folder / f"{index}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "kernels.png"
    assert (
        main(
            [
                "analyze-kernels",
                "--checkpoint",
                str(checkpoint),
                "--images",
                str(folder),
                "--out",
                str(out),
                "--num-images",
                "10",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 3 and summary["skipped"] == 1 and summary["grid"] == [2, 3]
    with Image.open(out) as png:
        assert png.size == (round(3 * CELL_INCHES * DPI), round(2 * CELL_INCHES * DPI))


def test_a_checkpoint_that_does_not_fit_its_config_is_an_error(tmp_path):
    cfg = _tiny_cfg()
    model = build_model(_tiny_cfg("model.num_kernels=4"))
    bad = save_checkpoint(tmp_path / "bad", model=model, config=cfg, meta={})
    with pytest.raises(ValueError, match="does not fit"):
        load_query_model(bad)
