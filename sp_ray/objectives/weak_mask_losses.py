"""FreeSOLO's weak mask losses: learning from noisy pseudo masks through projections and colour affinity.

FreeSOLO (Wang et al., CVPR 2022, section 3.2; ``freesolo/modeling/solov2/solov2.py::loss``) supervises the
mask of each instance not with the pseudo mask itself but with what survives its noise:

- max-projection dice (BoxInst, Tian et al. CVPR 2021, eq. 2): the max of the mask along y and along x
  must match the target's, which fixes the box extent;
- average-projection dice (FreeSOLO's addition): the same with means, so that a soft target
  contributes its shape and not only its extent;
- the pairwise colour-affinity term (BoxInst eq. 3-4): neighbouring pixels of similar LAB colour inside
  the target's box should get the same label.

The criterion (``sp_ray.objectives.knet_criterion.KNetCriterion`` with ``mask_loss="weak"``) applies these at the loss
stride 4; the image colours reach it through each target's ``image`` (the padded uint8 input that
``sp_ray.data.transforms.collate`` attaches) and `color_affinity`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# BoxInst / FreeSOLO: 3 x 3 neighbourhood with dilation 2, i.e. 8 neighbours two pixels apart.
PAIRWISE_SIZE = 3
PAIRWISE_DILATION = 2
NUM_NEIGHBOURS = PAIRWISE_SIZE * PAIRWISE_SIZE - 1
# FreeSOLO's dice_coefficient smoothing.
DICE_EPS = 1e-5

# sRGB (D65) -> CIE XYZ, and the D65 white point: the constants of skimage.color.rgb2lab, which
# FreeSOLO calls.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """CIE LAB of sRGB colours (skimage ``rgb2lab`` with the D65 2-degree illuminant).

    Args:
        rgb: float [..., 3, H, W], RGB in 0..255.

    Returns:
        float32 [..., 3, H, W]: L in 0..100, a and b roughly in -128..127.
    """
    c = rgb.float() / 255.0
    linear = torch.where(c > 0.04045, ((c + 0.055) / 1.055).pow(2.4), c / 12.92)
    matrix = torch.tensor(_XYZ_FROM_RGB, device=rgb.device, dtype=torch.float32)
    white = torch.tensor(_D65_WHITE, device=rgb.device, dtype=torch.float32)
    xyz = torch.einsum("ij,...jhw->...ihw", matrix, linear) / white[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856).pow(1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(dim=-3)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-3)


def unfold_neighbours(x: Tensor) -> Tensor:
    """The 8 dilated neighbours of every pixel (3 x 3, dilation 2, centre removed), zero outside the map.

    Args:
        x: float [B, C, H, W].

    Returns:
        float [B, C, 8, H, W]; [:, :, k, i, j] is neighbour k of pixel (i, j).
    """
    batch, channels, height, width = x.shape
    padding = PAIRWISE_DILATION * (PAIRWISE_SIZE // 2)
    unfolded = F.unfold(x, kernel_size=PAIRWISE_SIZE, dilation=PAIRWISE_DILATION, padding=padding)
    unfolded = unfolded.reshape(batch, channels, PAIRWISE_SIZE * PAIRWISE_SIZE, height, width)
    centre = PAIRWISE_SIZE * PAIRWISE_SIZE // 2
    return torch.cat((unfolded[:, :, :centre], unfolded[:, :, centre + 1 :]), dim=2)


def color_affinity(image: Tensor, *, image_size: tuple[int, int], stride: int, threshold: float = 0.3) -> Tensor:
    """Which neighbouring pixel pairs have similar colours: the pair mask of the pairwise term (BoxInst eq. 4).

    The image is average-pooled by ``stride`` (to the loss resolution) and converted to LAB; a pair
    (i, j) of a pixel and one of its 8 dilated neighbours counts when exp(-||LAB_i - LAB_j||_2 / 2) >=
    ``threshold`` and both lie in the valid (unpadded) region.

    Args:
        image: uint8 or float [3, H, W], RGB 0..255, the padded network input; H and W divisible by stride.
        image_size: (H_valid, W_valid), the unpadded region of the input.
        stride: the loss stride (4 for K-Net).
        threshold: tau of FreeSOLO / BoxInst (0.3).

    Returns:
        float32 [8, H / stride, W / stride] of 0 / 1.
    """
    height, width = image.shape[-2:]
    if height % stride or width % stride:
        raise ValueError(f"color_affinity: the image size {(height, width)} must be divisible by stride {stride}")
    pooled = F.avg_pool2d(image[None].float(), kernel_size=stride, stride=stride)  # (1, 3, h, w)
    lab = rgb_to_lab(pooled)
    similarity = torch.exp(-(lab[:, :, None] - unfold_neighbours(lab)).norm(dim=1) * 0.5)  # (1, 8, h, w)
    # A cell is valid when its centre pixel lies in the unpadded image (FreeSOLO samples the centres).
    rows = torch.arange(height // stride, device=image.device) * stride + stride // 2 < image_size[0]
    cols = torch.arange(width // stride, device=image.device) * stride + stride // 2 < image_size[1]
    valid = (rows[:, None] & cols[None, :]).float()[None, None]  # (1, 1, h, w)
    pair_valid = valid[:, :, None] * unfold_neighbours(valid)  # (1, 1, 8, h, w)
    return ((similarity >= threshold).float() * pair_valid[:, 0])[0]


def _dice(probs: Tensor, targets: Tensor) -> Tensor:
    inter = (probs * targets).sum(-1)
    return 1 - 2 * inter / (probs.square().sum(-1) + targets.square().sum(-1) + DICE_EPS)


def projection_dice_loss(mask_logits: Tensor, targets: Tensor, *, reduce: str = "max") -> Tensor:
    """Dice of the x and y projections of each mask (BoxInst eq. 2 for "max"; FreeSOLO's average variant).

    L = dice(P_y(m), P_y(t)) + dice(P_x(m), P_x(t)), m = sigmoid(logits), P the max (or mean) over rows
    (P_y: one value per column) or columns (P_x: one per row); dice(a, b) = 1 - 2 sum(ab) /
    (sum a^2 + sum b^2 + 1e-5), FreeSOLO's ``dice_coefficient``.

    Args:
        mask_logits: float [M, H, W] mask logits.
        targets: float [M, H, W] in [0, 1] (soft pseudo masks allowed).
        reduce: "max" or "mean".

    Returns:
        float [M], one loss per mask.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"projection_dice_loss: reduce must be 'max' or 'mean', got {reduce!r}")
    probs = mask_logits.float().sigmoid()
    t = targets.float()

    def project(x: Tensor, dim: int) -> Tensor:
        return x.amax(dim=dim) if reduce == "max" else x.mean(dim=dim)

    return _dice(project(probs, 1), project(t, 1)) + _dice(project(probs, 2), project(t, 2))


def box_targets(targets: Tensor) -> Tensor:
    """The filled box of each target mask: the outer product of its y and x max-projections (FreeSOLO).

    Args:
        targets: float [M, H, W] in [0, 1].

    Returns:
        float [M, H, W]; 1 inside the box of a binary mask, 0 outside.
    """
    return targets.amax(dim=2, keepdim=True) * targets.amax(dim=1, keepdim=True)


def pairwise_affinity_loss(mask_logits: Tensor, affinity: Tensor, boxes: Tensor) -> Tensor:
    """Pairwise colour-affinity loss of BoxInst (eq. 3-4) as FreeSOLO applies it to pseudo masks.

    For a pixel i and its dilated neighbour j, P(same label) = m_i m_j + (1 - m_i)(1 - m_j) with
    m = sigmoid(logits), computed in log space; the loss -log P(same) is averaged over the pairs whose
    weight affinity(i, j) x box(i) is non-zero, weighted by it.

    Args:
        mask_logits: float [M, H, W] mask logits.
        affinity: float [M, 8, H, W], `color_affinity` of each mask's image.
        boxes: float [M, H, W], `box_targets` of each mask's target.

    Returns:
        float scalar; 0 (attached to the graph) when no pair has weight.
    """
    logits = mask_logits.float()[:, None]  # (M, 1, H, W)
    log_fg = F.logsigmoid(logits)
    log_bg = F.logsigmoid(-logits)
    log_same = torch.logaddexp(
        log_fg[:, :, None] + unfold_neighbours(log_fg), log_bg[:, :, None] + unfold_neighbours(log_bg)
    )[:, 0]  # (M, 8, H, W)
    weights = affinity * boxes[:, None]
    return (-log_same * weights).sum() / weights.sum().clamp(min=1.0)
