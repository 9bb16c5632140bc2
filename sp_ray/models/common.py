"""What every model family shares: input normalisation, size rules, GroupNorm groups, the size checks of the
query-based families, the 2-D sine positional encoding and the kernel (query) self-attention.

Moved here from ``knet.py`` (K-Net was the first family); the code is unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
GN_GROUPS = 32
# Input sides must be multiples of the coarsest stride (C5).
SIZE_DIVISOR = 32


def check_query_model_sizes(model: str, feat_channels: int, num_heads: int, **counts: int) -> None:
    """The size checks every query-based family makes on construction: each of ``counts`` >= 1, ``feat_channels``
    a multiple of the GroupNorm groups, ``num_heads`` a divisor of ``feat_channels``.

    Raises:
        ValueError: naming ``model`` and the first size that fails.
    """
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{model}: {name} must be >= 1, got {value}")
    if feat_channels % GN_GROUPS != 0:
        raise ValueError(f"{model}: feat_channels must be a multiple of {GN_GROUPS} (GroupNorm), got {feat_channels}")
    if feat_channels % num_heads != 0:
        raise ValueError(f"{model}: num_heads ({num_heads}) must divide feat_channels ({feat_channels})")


def sine_positional_encoding(height: int, width: int, channels: int, *, like: Tensor) -> Tensor:
    """Normalised 2-D sine positional encoding (DETR / mmcv ``SinePositionalEncoding``, normalize=True).

    Args:
        height: h of the feature map.
        width: w of the feature map.
        channels: D (even); D/2 channels encode y, D/2 encode x, alternating sin and cos.
        like: any tensor giving the device and dtype of the result.

    Returns:
        float [1, D, h, w].
    """
    num_feats = channels // 2
    scale = 2 * math.pi
    y = torch.arange(1, height + 1, device=like.device, dtype=torch.float32)
    x = torch.arange(1, width + 1, device=like.device, dtype=torch.float32)
    y = y / (height + 1e-6) * scale
    x = x / (width + 1e-6) * scale
    i = torch.arange(num_feats, device=like.device, dtype=torch.float32)
    dim_t = 10000.0 ** (2 * torch.div(i, 2, rounding_mode="floor") / num_feats)
    pos_y = y[:, None] / dim_t  # (h, D/2)
    pos_x = x[:, None] / dim_t  # (w, D/2)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)  # (h, D/2)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)  # (w, D/2)
    pos = torch.cat(
        (
            pos_y[:, None, :].expand(height, width, num_feats),
            pos_x[None, :, :].expand(height, width, num_feats),
        ),
        dim=2,
    )  # (h, w, D)
    return pos.permute(2, 0, 1)[None].to(like.dtype)


class KernelSelfAttention(nn.Module):
    """Multi-head self-attention over the N kernels of one image, with a residual (kernel interaction).

    Written out with matmul + softmax rather than ``nn.MultiheadAttention`` so that evaluation never takes
    the fused fast path: the graph that is trained is the graph that is exported.

    Args:
        channels: D.
        num_heads: number of heads; must divide D.
    """

    def __init__(self, *, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj = nn.Linear(channels, 3 * channels)
        self.out_proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        """Attend.

        Args:
            x: float [B, N, D].

        Returns:
            float [B, N, D], x + attention(x).
        """
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        q = q.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, N, D/heads)
        k = k.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        v = v.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (B, heads, N, N)
        out = (attn @ v).transpose(1, 2).flatten(2)  # (B, N, D)
        return x + self.out_proj(out)
