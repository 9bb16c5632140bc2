"""Where each kernel (query) looks: its mask averaged over images, drawn as a grid (SP's visual analysis).

The SP paper shows that pre-trained kernels cover spread-out locations and shapes, where randomly
initialised ones are alike. ``sp-ray analyze-kernels`` renders that figure for any K-Net, Mask2Former or
QueryInst checkpoint (fine-tuned or pre-trained): for every kernel n, the mean over the images of
sigmoid(m_n), the initial masks m^0 or the last stage's masks, each resized from the image's valid region
to one common size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sp_ray.checkpoint import load_checkpoint, load_init_weights
from sp_ray.config import Config
from sp_ray.data.images import load_image_rgb
from sp_ray.data.listing import list_images
from sp_ray.data.transforms import resize_for_inference
from sp_ray.device import select_device
from sp_ray.models import build_model, model_family
from sp_ray.models.common import SIZE_DIVISOR
from sp_ray.models.knet import MASK_STRIDE as KNET_STRIDE

log = logging.getLogger("sp_ray")

STAGES = ("init", "last")
CELL_INCHES = 1.2  # side of one kernel's panel in the figure
DPI = 100


def load_query_model(checkpoint: str | Path) -> tuple[nn.Module, Config]:
    """The query-based model (K-Net, Mask2Former, QueryInst) of a fine-tuning or pre-training checkpoint
    directory, in eval mode.

    Raises:
        ValueError: the checkpoint's family has no per-query masks (Mask R-CNN), or lacks some tensors.
    """
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    if model_family(cfg.model.name).mask_stride is None:
        raise ValueError(
            f"{checkpoint}: kernel analysis needs a query-based model (knet, mask2former, queryinst), got "
            f"model.name {cfg.model.name!r}"
        )
    model = build_model(cfg)  # pure: a pre-training checkpoint's model.pt holds the same model
    report = load_init_weights(model, ckpt.model_state)
    if report.missing or report.reinitialised:
        raise ValueError(
            f"{checkpoint}: the checkpoint does not fit its own config's model: {report.summary()}"
        )
    return model.eval(), cfg


@torch.no_grad()
def average_kernel_masks(
    model: nn.Module,
    images: Iterable[np.ndarray],
    *,
    max_size: int,
    short_size: int,
    mask_stride: int = KNET_STRIDE,
    stage: str = "init",
    size: tuple[int, int] = (64, 64),
) -> tuple[Tensor, int]:
    """Mean over images of every kernel's mask probability.

    Each image is resized as for evaluation (``resize_for_inference``), padded to a multiple of 32 and
    run alone; the masks' valid region (the unpadded part) is resized bilinearly to ``size``.

    Args:
        model: a query-based model returning ``ModelOutputs``, in eval mode.
        images: RGB uint8 [H, W, 3] arrays.
        max_size: long-side cap of the resize (``data.max_size``).
        short_size: short-side target of the resize (``data.short_size``).
        mask_stride: stride of the model's masks (``sp_ray.models.FAMILIES[name].mask_stride``).
        stage: "init" for the initial masks m^0, "last" for the last stage's masks.
        size: (h, w) of the averaged masks.

    Returns:
        (float [N, h, w] in [0, 1] on the CPU, number of images averaged).

    Raises:
        ValueError: unknown stage or no images.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    device = next(model.parameters()).device
    total: Tensor | None = None
    count = 0
    for pixels in images:
        height, width = resize_for_inference(
            pixels.shape[0], pixels.shape[1], max_size=max_size, short_size=short_size
        )
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].to(device).float()
        image = F.interpolate(
            image, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
        pad_h, pad_w = (-height) % SIZE_DIVISOR, (-width) % SIZE_DIVISOR
        outputs = model(F.pad(image, (0, pad_w, 0, pad_h)))
        masks = (outputs["init_masks"] if stage == "init" else outputs["pred_masks"]).float().sigmoid()
        valid = masks[:, :, : math.ceil(height / mask_stride), : math.ceil(width / mask_stride)]
        resized = F.interpolate(valid, size=size, mode="bilinear", align_corners=False)[0].cpu()  # (N, h, w)
        total = resized if total is None else total + resized
        count += 1
    if total is None:
        raise ValueError("average_kernel_masks got no images")
    return total / count, count


def grid_shape(num_kernels: int) -> tuple[int, int]:
    """(rows, columns) of the figure: ceil(sqrt(N)) columns."""
    columns = math.ceil(math.sqrt(num_kernels))
    return math.ceil(num_kernels / columns), columns


def render_kernel_grid(masks: Tensor, out: str | Path, *, title: str | None = None) -> tuple[int, int]:
    """Draw one panel per kernel (its average mask, 0 dark to 1 bright) and save a PNG.

    The figure is ``columns x rows`` panels of ``CELL_INCHES`` at ``DPI``, so the PNG is
    ``columns * CELL_INCHES * DPI`` pixels wide and ``rows * CELL_INCHES * DPI`` high.

    Args:
        masks: float [N, h, w] in [0, 1].
        out: the PNG path (parent folders are created).
        title: figure title.

    Returns:
        (rows, columns) of the grid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns = grid_shape(masks.shape[0])
    fig, axes = plt.subplots(
        rows, columns, figsize=(columns * CELL_INCHES, rows * CELL_INCHES), dpi=DPI, squeeze=False
    )
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index < masks.shape[0]:
            ax.imshow(masks[index].numpy(), vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            ax.set_title(f"kernel {index}", fontsize=6, pad=2)
    if title:
        fig.suptitle(title, fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return rows, columns


def analyze_kernels(
    checkpoint: str | Path,
    images: str | Path,
    out: str | Path | None = None,
    *,
    image_root: str | Path | None = None,
    num_images: int = 100,
    stage: str = "init",
    use_gpu: bool = False,
) -> dict[str, Any]:
    """Render the average mask of every kernel of a K-Net checkpoint over the first images of a set.

    Args:
        checkpoint: checkpoint directory (``sp-ray finetune`` or ``sp-ray pretrain``).
        images: image folder (searched recursively) or COCO json.
        out: PNG path; default ``CHECKPOINT/kernels_<stage>.png``.
        image_root: folder of a json's file names (default: the json's folder).
        num_images: how many images (the first ones, in folder or json order) to average over.
        stage: "init" (initial masks m^0) or "last" (the last stage's masks).
        use_gpu: run on CUDA.

    Returns:
        Summary: out, images (averaged), skipped (unreadable files or images above data.max_image_pixels,
        counted and left out), kernels, grid [rows, columns], stage.
    """
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    model, cfg = load_query_model(checkpoint)
    model.to(select_device(use_gpu))
    entries = list_images(images, image_root)[:num_images]
    skipped: list[str] = []

    def decoded() -> Iterable[np.ndarray]:
        for entry in entries:
            try:
                yield load_image_rgb(entry["path"], max_pixels=cfg.data.max_image_pixels)
            except OSError as err:
                skipped.append(entry["path"])
                log.warning("analyze-kernels: skipping %s", err)

    try:
        masks, count = average_kernel_masks(
            model, decoded(), max_size=cfg.data.max_size, short_size=cfg.data.short_size,
            mask_stride=model_family(cfg.model.name).mask_stride, stage=stage,
        )
    except ValueError as err:
        if skipped and len(skipped) == len(entries):
            raise ValueError(
                f"none of the {len(entries)} images could be decoded (e.g. {skipped[0]}); check --images "
                "and --image-root"
            ) from err
        raise
    out = Path(out) if out is not None else Path(checkpoint) / f"kernels_{stage}.png"
    which = "initial" if stage == "init" else "last-stage"
    title = f"{Path(checkpoint).name}: mean {which} mask over {count} images"
    rows, columns = render_kernel_grid(masks, out, title=title)
    return {
        "out": str(out),
        "images": count,
        "skipped": len(skipped),
        "kernels": int(masks.shape[0]),
        "grid": [rows, columns],
        "stage": stage,
    }
