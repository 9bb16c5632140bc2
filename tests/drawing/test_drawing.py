"""The shared figures: mask drawings on images and the charts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sp_ray.drawing.charts import DPI, Bar, Line, Panel, plot_bars, plot_panels
from sp_ray.drawing.draw import draw_labels, instance_colors, mask_outline, overlay_masks, save_png, tile, upscale


def test_mask_outline_of_a_square():
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    outline = mask_outline(mask)
    assert outline.sum() == 12  # the 4 x 4 square's border ring
    assert not outline[2:4, 2:4].any()
    assert mask_outline(np.ones((3, 3), bool)).sum() == 8  # the image border counts as outside


def test_overlay_masks_blends_inside_and_leaves_outside():
    image = np.full((8, 8, 3), 100, np.uint8)
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 2:6, 2:6] = True
    color = np.array([[200, 0, 0]], np.uint8)
    out = overlay_masks(image, masks, colors=color, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert (out[0, 0] == 100).all()  # outside: unchanged
    assert out[3, 3].tolist() == [150, 50, 50]  # inside: half the colour
    assert out[2, 2].tolist() == [200, 0, 0]  # outline: the colour
    assert (image == 100).all()  # the input is not modified
    assert (overlay_masks(image, np.zeros((0, 8, 8), bool)) == image).all()


def test_overlay_masks_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="masks must be"):
        overlay_masks(np.zeros((8, 8, 3), np.uint8), np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match="uint8"):
        overlay_masks(np.zeros((8, 8, 3), np.float32), np.zeros((1, 8, 8), bool))


def test_upscale_tile_labels_and_png(tmp_path):
    assert upscale(np.arange(4, dtype=np.uint8).reshape(2, 2, 1), 3).shape == (6, 6, 1)
    panels = [[np.zeros((10, 20, 3), np.uint8), np.zeros((12, 8, 3), np.uint8)], [np.zeros((5, 5, 3), np.uint8)]]
    grid = tile(panels, column_titles=["a", "b"], pad=2)
    # cells of 12 x 20 pixels, 2 columns, 2 rows, a 16-pixel title row
    assert grid.shape == (2 + 16 + 2 * (12 + 2), 2 + 2 * (20 + 2), 3)
    labelled = draw_labels(np.zeros((40, 60, 3), np.uint8), [(5, 5)], ["disk 0.9"], instance_colors(1))
    assert labelled[6, 6].tolist() == instance_colors(1)[0].tolist()  # the label box has the instance's colour
    path = save_png(grid, tmp_path / "sub" / "grid.png")
    assert np.asarray(Image.open(path)).shape == grid.shape


def test_instance_colors_cycle():
    colors = instance_colors(25)
    assert colors.shape == (25, 3)
    assert (colors[20] == colors[0]).all() and len({tuple(c) for c in colors[:20]}) == 20


def test_plot_panels_and_bars_write_pngs(tmp_path):
    panels = [Panel("5%", (Line("scratch", (1, 2, 3), (3.0, 2.0, 1.0)), Line("mrcnn", (3,), (0.5,), dashed=True)),
                    "loss", log_y=True),
              Panel("10%", (), "AP")]
    path = plot_panels(panels, tmp_path / "curves.png", title="t")
    width, height = Image.open(path).size
    assert (width, height) == (round(4.6 * 2 * DPI), round(3.5 * DPI))
    bars = plot_bars([Bar("K-Net", 10.0, 8.0), Bar("Mask R-CNN", 1.0)], tmp_path / "bars.png", xlabel="images/s")
    assert Image.open(bars).size[0] == round(7.0 * DPI)
    with pytest.raises(ValueError, match="3 x values and 2 y values"):
        Line("bad", (1, 2, 3), (1.0, 2.0))
    with pytest.raises(ValueError):
        plot_panels([], tmp_path / "none.png")
