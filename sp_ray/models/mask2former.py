"""Mask2Former for instance segmentation (Cheng et al., CVPR 2022), in plain PyTorch.

ResNet C2..C5 -> pixel decoder (6 multi-scale deformable-attention encoder layers over strides 8, 16, 32,
then an FPN step to stride 4 for the per-pixel mask features) -> transformer decoder: N learnable queries,
L layers of masked cross-attention (round-robin over strides 32, 16, 8), self-attention and FFN; a shared
head predicts classes (C + 1, the last "no object") and masks (query embedding . mask features, stride 4)
from the queries before layer 1 and after every layer.

Pixel-decoder attention: multi-scale deformable attention (Zhu et al. 2021), as in the paper, written with
``F.grid_sample`` instead of the CUDA op. It exports to ONNX (``GridSample``, opset >= 16) and onnxruntime
runs it; it samples L x P points per head and query, so its cost is linear in the number of tokens (about
22k at 1333 x 800), where plain self-attention over the same tokens would be quadratic.

Output convention (``ModelOutputs``): ``pred_logits`` [B, N, C] are sigmoid-compatible, logit(p_c) with p the
softmax over the C + 1 classes, so ``sigmoid(pred_logits)`` is exactly the paper's score p_c and the shared
K-Net post-processing, export adapter and runtime apply unchanged. The softmax logits the cross-entropy
needs are ``pred_class_logits`` [B, N, C + 1] (``Mask2FormerStageOutput``). ``pred_masks`` are at stride
``MASK_STRIDE`` = 4; ``pred_kernels`` are the query features after each decoder layer (K^i of SP);
``init_masks`` / ``init_kernels`` are the prediction from, and the value of, the learnable queries before
layer 1 (K^0, where SP adds its prompts).

Left out: dropout (0.0 in the paper's configs) and padding masks (the official pixel decoder uses none).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sp_ray.models.backbone import build_resnet
from sp_ray.models.common import (
    GN_GROUPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIZE_DIVISOR,
    check_query_model_sizes,
    sine_positional_encoding,
)
from sp_ray.types import ModelOutputs, StageOutput

# Stride of the mask features and of ``pred_masks`` (the paper's 1/4 resolution per-pixel embeddings).
MASK_STRIDE = 4
# The pixel decoder's transformer levels and the decoder's attention targets: strides 32, 16, 8.
NUM_LEVELS = 3


class Mask2FormerStageOutput(StageOutput):
    """A ``StageOutput`` plus the softmax class logits the Mask2Former criterion needs.

    pred_class_logits: [B, N, C + 1] softmax logits, the last column "no object"; ``pred_logits`` [B, N, C]
    is ``sigmoid_compatible_logits`` of it.
    """

    pred_class_logits: Tensor


class Mask2FormerOutputs(ModelOutputs):
    """``ModelOutputs`` of Mask2Former; every entry of ``aux_outputs`` is a ``Mask2FormerStageOutput``.

    pred_class_logits: [B, N, C + 1] of the last layer.
    init_class_logits: [B, N, C + 1] of the prediction from the queries before layer 1 (the one that gives
        ``init_masks``; the paper supervises it like every layer).
    """

    pred_class_logits: Tensor
    init_class_logits: Tensor


def sigmoid_compatible_logits(class_logits: Tensor) -> Tensor:
    """Logits s_c with sigmoid(s_c) = softmax(z)_c for the C object classes of C + 1 softmax logits z.

    s_c = log p_c - log(1 - p_c) = z_c - logsumexp_{j != c} z_j, computed with the class itself masked out
    of the log-sum-exp (exact and stable even where p_c rounds to 1). Float32 whatever the input dtype.

    Args:
        class_logits: float [B, N, C + 1], the last column "no object".

    Returns:
        float32 [B, N, C].
    """
    z = class_logits.float()
    num_classes = z.shape[-1] - 1
    own = torch.eye(num_classes, num_classes + 1, dtype=torch.bool, device=z.device)  # (C, C + 1)
    others = z.unsqueeze(-2).masked_fill(own, float("-inf"))  # (B, N, C, C + 1)
    return z[..., :num_classes] - torch.logsumexp(others, dim=-1)


def token_positions(features: Tensor, level_embed: Tensor) -> Tensor:
    """Positional encodings of a level's flattened pixels: 2-D sine encoding plus the level's learned embedding.

    Args:
        features: float [B, D, h, w] (only its size, device and dtype are used).
        level_embed: float [D].

    Returns:
        float [1, h*w, D], row-major as ``features.flatten(2)``.
    """
    h, w = features.shape[-2:]
    pos = sine_positional_encoding(h, w, features.shape[1], like=features).flatten(2) + level_embed[:, None]
    return pos.transpose(1, 2)


def _c2_xavier_fill(conv: nn.Conv2d) -> None:
    # detectron2's c2_xavier_fill, the init of Mask2Former's convolutions.
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable DETR eq. 3) with bilinear ``grid_sample``.

    MSDeformAttn(z_q, p_q, {x^l}) = sum_h W_h [sum_l sum_k A_hlqk . W'_h x^l(p_q + Delta p_hlqk)]: every head
    of every query samples ``num_points`` points per level around its reference point p_q, at learned
    offsets, and sums them with softmax weights over levels and points.

    Args:
        channels: D.
        num_heads: heads; must divide D.
        num_levels: L feature levels.
        num_points: sampling points per head and level.
    """

    def __init__(self, *, channels: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"deformable attention: num_heads ({num_heads}) must divide channels ({channels})")
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(channels, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(channels, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Deformable DETR's init: offsets start on rings of radius 1..P cells, one direction per head,
        # and every sample starts with the same weight.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, query: Tensor, reference_points: Tensor, values: list[Tensor]) -> Tensor:
        """Attend from every query to its sampled points on every level.

        Args:
            query: z_q (with its positional encoding), float [B, Q, D].
            reference_points: p_q, float [B, Q, 2] as (x, y) in [0, 1] of the image, the same on every level.
            values: L maps x^l, float [B, D, h_l, w_l].

        Returns:
            float [B, Q, D].
        """
        batch, num_queries, channels = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        head_dim = channels // heads
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points).softmax(-1)
        weights = weights.permute(0, 2, 1, 3).reshape(batch * heads, 1, num_queries, levels * points)
        sampled = []
        for level, value in enumerate(values):
            h, w = value.shape[-2:]
            # Offsets are in cells of their level: divide by (w, h) for image-relative units.
            level_offsets = offsets[:, :, :, level]  # (B, Q, heads, P, 2)
            scaled = torch.stack([level_offsets[..., 0] / w, level_offsets[..., 1] / h], dim=-1)
            locations = reference_points[:, :, None, None, :] + scaled
            grid = (2 * locations - 1).permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*heads, Q, P, 2)
            projected = self.value_proj(value.flatten(2).transpose(1, 2))  # (B, h*w, D)
            projected = projected.transpose(1, 2).reshape(batch * heads, head_dim, h, w)
            sampled.append(
                F.grid_sample(projected, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            )  # (B*heads, head_dim, Q, P)
        stacked = torch.cat(sampled, dim=-1)  # (B*heads, head_dim, Q, L*P), level-major as the weights
        out = (stacked * weights).sum(-1).view(batch, channels, num_queries)
        return self.output_proj(out.transpose(1, 2))


class PixelDecoderLayer(nn.Module):
    """One encoder layer of the pixel decoder: deformable self-attention and FFN, each residual + LayerNorm.

    Args:
        channels: D.
        num_heads: attention heads.
        num_points: sampling points per head and level.
        ffn_channels: hidden width of the FFN.
    """

    def __init__(self, *, channels: int, num_heads: int, num_points: int, ffn_channels: int) -> None:
        super().__init__()
        self.attention = MultiScaleDeformableAttention(
            channels=channels, num_heads=num_heads, num_levels=NUM_LEVELS, num_points=num_points
        )
        self.norm1 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, ffn_channels), nn.ReLU(inplace=True), nn.Linear(ffn_channels, channels)
        )
        self.norm2 = nn.LayerNorm(channels)

    def forward(self, tokens: Tensor, pos: Tensor, reference_points: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """Refine the tokens of all levels once.

        Args:
            tokens: float [B, Q, D], the levels' pixels flattened and concatenated (Q = sum h_l w_l).
            pos: float [B or 1, Q, D] positional + level encodings.
            reference_points: float [B or 1, Q, 2], each token's own centre in [0, 1].
            shapes: L (h_l, w_l), the split of the Q tokens into levels.

        Returns:
            float [B, Q, D].
        """
        ref = reference_points.expand(tokens.shape[0], -1, -1)
        tokens = self.norm1(tokens + self.attention(tokens + pos, ref, _tokens_to_maps(tokens, shapes)))
        return self.norm2(tokens + self.ffn(tokens))


class PixelDecoder(nn.Module):
    """Mask2Former's multi-scale deformable-attention pixel decoder (``MSDeformAttnPixelDecoder``).

    C3..C5 are projected to D (1x1 conv + GN), given sine positional and learned level encodings, and refined
    jointly by the encoder layers; C2 (1x1 conv + GN) plus the upsampled stride-8 output, through a 3x3
    conv-GN-ReLU, gives the stride-4 map, and a 1x1 conv the per-pixel mask features.

    Args:
        in_channels: channels of C2..C5.
        channels: D.
        num_layers: encoder layers (6 in the paper).
        num_heads: attention heads.
        num_points: sampling points per head and level (4).
        ffn_channels: FFN hidden width (1024).
    """

    def __init__(
        self, *, in_channels: list[int], channels: int, num_layers: int, num_heads: int, num_points: int,
        ffn_channels: int,
    ) -> None:
        super().__init__()
        if len(in_channels) != NUM_LEVELS + 1:
            raise ValueError(f"pixel decoder: expected the channels of C2..C5, got {in_channels}")
        d = channels
        # Coarsest first (C5, C4, C3), the order of the decoder's round-robin.
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(GN_GROUPS, d)) for c in reversed(in_channels[1:])
        )
        self.level_embed = nn.Parameter(torch.empty(NUM_LEVELS, d))
        self.layers = nn.ModuleList(
            PixelDecoderLayer(channels=d, num_heads=num_heads, num_points=num_points, ffn_channels=ffn_channels)
            for _ in range(num_layers)
        )
        self.lateral_conv = nn.Sequential(nn.Conv2d(in_channels[0], d, 1, bias=False), nn.GroupNorm(GN_GROUPS, d))
        self.output_conv = nn.Sequential(
            nn.Conv2d(d, d, 3, padding=1, bias=False), nn.GroupNorm(GN_GROUPS, d), nn.ReLU(inplace=True)
        )
        self.mask_features = nn.Conv2d(d, d, 1)
        self.channels = d
        for layer in self.layers:
            for name, p in layer.named_parameters():
                if p.dim() > 1 and not name.startswith("attention."):
                    nn.init.xavier_uniform_(p)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        nn.init.normal_(self.level_embed)
        _c2_xavier_fill(self.lateral_conv[0])
        _c2_xavier_fill(self.output_conv[0])
        _c2_xavier_fill(self.mask_features)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Decode the backbone pyramid.

        Args:
            feats: [C2..C5], float [B, in_channels[i], H / 2^(i+2), W / 2^(i+2)].

        Returns:
            (mask features float [B, D, H/4, W/4], [P2, P3, P4, P5] float [B, D, H/4 .. H/32, W/4 .. W/32]:
            P3..P5 the encoder's outputs, P2 the stride-4 map the mask features are computed from).
        """
        srcs = [proj(x) for proj, x in zip(self.input_proj, reversed(feats[1:]), strict=True)]  # C5, C4, C3
        shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        tokens = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], dim=1)  # (B, Q, D)
        pos = torch.cat([token_positions(s, self.level_embed[i]) for i, s in enumerate(srcs)], dim=1)  # (1, Q, D)
        reference_points = torch.cat([_cell_centres(h, w, like=tokens) for h, w in shapes], dim=0)[None]
        for layer in self.layers:
            tokens = layer(tokens, pos, reference_points, shapes)
        outs = _tokens_to_maps(tokens, shapes)  # P5, P4, P3
        p2 = self.lateral_conv(feats[0]) + F.interpolate(
            outs[-1], size=feats[0].shape[-2:], mode="bilinear", align_corners=False
        )
        p2 = self.output_conv(p2)
        return self.mask_features(p2), [p2, *reversed(outs)]


def _tokens_to_maps(tokens: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """Split flattened, concatenated levels [B, sum h_l w_l, D] back into maps [B, D, h_l, w_l]."""
    batch, _, channels = tokens.shape
    levels = tokens.split([h * w for h, w in shapes], dim=1)
    return [level.transpose(1, 2).reshape(batch, channels, h, w) for level, (h, w) in zip(levels, shapes, strict=True)]


def _cell_centres(height: int, width: int, *, like: Tensor) -> Tensor:
    """(x, y) of every cell centre of an h x w map in [0, 1], row-major: float [h*w, 2]."""
    ys = (torch.arange(height, device=like.device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=like.device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=-1).to(like.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with an optional boolean mask, written out with matmul + softmax.

    Not ``nn.MultiheadAttention``: evaluation then never takes its fused fast path, so the trained graph is
    the exported graph, and the masked attention exports without the ``attn_mask`` issues of that module.

    Args:
        channels: D.
        num_heads: heads; must divide D.
    """

    def __init__(self, *, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.out_proj = nn.Linear(channels, channels)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attend.

        Args:
            query: float [B, N, D].
            key: float [B or 1, M, D].
            value: float [B or 1, M, D].
            mask: optional bool [B, N, M], True where attention is forbidden; no row may be all True.

        Returns:
            float [B, N, D] (without residual).
        """
        q = self.q_proj(query).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, N, D/heads)
        k = self.k_proj(key).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, M, D/heads)
        v = self.v_proj(value).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, N, M)
        if mask is not None:
            scores = scores.masked_fill(mask[:, None], float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)  # (B, N, D)
        return self.out_proj(out)


class DecoderLayer(nn.Module):
    """One Mask2Former decoder layer: masked cross-attention, self-attention, FFN; each residual + LayerNorm.

    Args:
        channels: D.
        num_heads: attention heads.
        ffn_channels: FFN hidden width (2048).
    """

    def __init__(self, *, channels: int, num_heads: int, ffn_channels: int) -> None:
        super().__init__()
        self.cross_attention = MultiHeadAttention(channels=channels, num_heads=num_heads)
        self.cross_norm = nn.LayerNorm(channels)
        self.self_attention = MultiHeadAttention(channels=channels, num_heads=num_heads)
        self.self_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, ffn_channels), nn.ReLU(inplace=True), nn.Linear(ffn_channels, channels)
        )
        self.ffn_norm = nn.LayerNorm(channels)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, queries: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, mask: Tensor) -> Tensor:
        """Refine the queries on one feature level.

        Masked attention (Mask2Former eqs. 2-3): X_l = softmax(M_{l-1} + Q_l K_l^T) V_l + X_{l-1}, with M_{l-1}
        -inf outside the previous layer's binarised masks.

        Args:
            queries: X_{l-1}, float [B, N, D].
            query_pos: learnable query positional embeddings, float [1, N, D].
            memory: the level's pixel features, float [B, M, D] (M = h_l w_l).
            memory_pos: their sine + level encodings, float [1, M, D].
            mask: bool [B, N, M], True outside query n's predicted mask (no row all True).

        Returns:
            X_l, float [B, N, D].
        """
        attended = self.cross_attention(queries + query_pos, memory + memory_pos, memory, mask)
        queries = self.cross_norm(queries + attended)
        q = queries + query_pos
        queries = self.self_norm(queries + self.self_attention(q, q, queries))
        return self.ffn_norm(queries + self.ffn(queries))


class Mask2FormerFeatures(NamedTuple):
    """What Mask2Former computes before its decoder (``Mask2Former.forward_features``).

    fpn: [P2..P5], float [B, D, H/4 .. H/32, W/4 .. W/32] (P5, the encoder's stride-32 output, is the
        source of SP's feature prompts).
    mask_features: per-pixel embeddings, float [B, D, H/4, W/4].
    init_kernels: K^0, the learnable query features, float [B, N, D] (the same for every image).
    """

    fpn: list[Tensor]
    mask_features: Tensor
    init_kernels: Tensor


class Mask2Former(nn.Module):
    """Mask2Former: ``forward(images)`` returns raw per-layer predictions (``Mask2FormerOutputs``).

    Same graph in training and evaluation; matching, losses and post-processing live elsewhere.

    Args:
        backbone: module mapping a normalised image [B, 3, H, W] to [C2..C5]; ``out_channels`` attribute.
        num_classes: C object classes (the class head has C + 1 outputs, the last "no object").
        num_queries: N.
        num_layers: decoder layers L (9 in the paper: three rounds over three scales).
        feat_channels: D, the width of the pixel decoder, the queries and the mask features.
        num_heads: attention heads of encoder and decoder; must divide D.
        ffn_channels: FFN hidden width of the decoder layers.
        encoder_layers: deformable encoder layers of the pixel decoder.
        encoder_ffn_channels: FFN hidden width of the encoder layers.
        deform_points: sampling points per head and level of the deformable attention.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        num_classes: int,
        num_queries: int = 100,
        num_layers: int = 9,
        feat_channels: int = 256,
        num_heads: int = 8,
        ffn_channels: int = 2048,
        encoder_layers: int = 6,
        encoder_ffn_channels: int = 1024,
        deform_points: int = 4,
    ) -> None:
        super().__init__()
        check_query_model_sizes("Mask2Former", feat_channels, num_heads, num_classes=num_classes,
                                num_queries=num_queries, num_layers=num_layers, deform_points=deform_points)
        if encoder_layers < 0:
            raise ValueError(f"Mask2Former: encoder_layers must be >= 0, got {encoder_layers}")
        d = feat_channels
        self.backbone = backbone
        self.pixel_decoder = PixelDecoder(
            in_channels=list(backbone.out_channels), channels=d, num_layers=encoder_layers, num_heads=num_heads,
            num_points=deform_points, ffn_channels=encoder_ffn_channels,
        )
        self.query_feat = nn.Embedding(num_queries, d)
        self.query_embed = nn.Embedding(num_queries, d)
        self.level_embed = nn.Embedding(NUM_LEVELS, d)
        self.layers = nn.ModuleList(
            DecoderLayer(channels=d, num_heads=num_heads, ffn_channels=ffn_channels) for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(d)
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, d)
        )
        self.num_classes = num_classes
        self.num_kernels = num_queries
        self.feat_channels = d
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, kernel_offsets: Tensor | None = None) -> Mask2FormerOutputs:
        """Predict classes and masks from the queries before the decoder and after every decoder layer.

        Args:
            images: float [B, 3, H, W], RGB in 0..255, H and W multiples of 32 (padded).
            kernel_offsets: optional float [B, N, D] added to the query features K^0 before the first
                prediction (SP prompt injection, K_n = K_n^0 + P_{delta(n)}); None in fine-tuning and export.

        Returns:
            ``Mask2FormerOutputs``: top level = layer L (pred_logits [B, N, C] sigmoid-compatible,
            pred_class_logits [B, N, C + 1], pred_masks [B, N, H/4, W/4] logits, pred_kernels [B, N, D]);
            aux_outputs = layers 1..L-1; init_masks / init_class_logits = the prediction before layer 1;
            init_kernels = K^0 [B, N, D] (before any offset).
        """
        return self.forward_from_features(self.forward_features(images), kernel_offsets)

    def forward_features(self, images: Tensor) -> Mask2FormerFeatures:
        """Backbone and pixel decoder: everything before the transformer decoder.

        Split from ``forward`` so that SP pre-training can build its prompts from P5 and then run the same
        decoder (``forward_from_features``) without a second backbone pass.

        Args:
            images: float [B, 3, H, W], RGB in 0..255, H and W multiples of 32 (padded).

        Returns:
            ``Mask2FormerFeatures`` (P2..P5, the mask features, K^0).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Mask2Former expects images [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-2] % SIZE_DIVISOR != 0 or images.shape[-1] % SIZE_DIVISOR != 0:
            raise ValueError(
                f"Mask2Former input H and W must be multiples of {SIZE_DIVISOR}, got {tuple(images.shape[-2:])}; "
                "pad the batch in collate"
            )
        x = (images - self.pixel_mean) / self.pixel_std
        mask_features, fpn = self.pixel_decoder(self.backbone(x))
        init_kernels = self.query_feat.weight[None].expand(images.shape[0], -1, -1)
        return Mask2FormerFeatures(fpn=fpn, mask_features=mask_features, init_kernels=init_kernels)

    def _predict(self, queries: Tensor, mask_features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The shared prediction head: class logits [B, N, C + 1], pred_logits float32 [B, N, C], masks [B, N, h, w]."""
        decoded = self.decoder_norm(queries)
        class_logits = self.class_embed(decoded)
        masks = (self.mask_embed(decoded) @ mask_features.flatten(2)).unflatten(-1, mask_features.shape[-2:])
        return class_logits, sigmoid_compatible_logits(class_logits), masks

    def forward_from_features(
        self, features: Mask2FormerFeatures, kernel_offsets: Tensor | None = None
    ) -> Mask2FormerOutputs:
        """Run the transformer decoder from ``forward_features``' output.

        Args:
            features: ``Mask2FormerFeatures`` of a batch.
            kernel_offsets: optional float [B, N, D] added to K^0 (see ``forward``).

        Returns:
            ``Mask2FormerOutputs``, as ``forward``.
        """
        init_kernels = features.init_kernels
        queries = init_kernels
        if kernel_offsets is not None:
            if kernel_offsets.shape != init_kernels.shape:
                raise ValueError(
                    f"kernel_offsets must have shape [B, N, D] = {tuple(init_kernels.shape)}, "
                    f"got {tuple(kernel_offsets.shape)}"
                )
            queries = queries + kernel_offsets
        levels = list(reversed(features.fpn[1:]))  # P5, P4, P3: the round-robin order, coarsest first
        memories = [level.flatten(2).transpose(1, 2) for level in levels]  # (B, h_l*w_l, D)
        memory_pos = [token_positions(level, self.level_embed.weight[i]) for i, level in enumerate(levels)]
        query_pos = self.query_embed.weight[None]
        init_class_logits, _, init_masks = self._predict(queries, features.mask_features)
        masks = init_masks
        stage_outputs: list[Mask2FormerStageOutput] = []
        for i, layer in enumerate(self.layers):
            level = i % NUM_LEVELS
            # The attention mask of layer i is the previous prediction, resized to the layer's level and
            # binarised (sigmoid < 0.5 is forbidden); a query whose mask is empty attends everywhere.
            resized = F.interpolate(masks.detach(), size=levels[level].shape[-2:], mode="bilinear", align_corners=False)
            outside = (resized < 0).flatten(2)  # (B, N, h_l*w_l)
            outside = outside & ~outside.all(dim=-1, keepdim=True)
            queries = layer(queries, query_pos, memories[level], memory_pos[level], outside)
            class_logits, logits, masks = self._predict(queries, features.mask_features)
            stage_outputs.append(
                Mask2FormerStageOutput(
                    pred_logits=logits, pred_masks=masks, pred_kernels=queries, pred_class_logits=class_logits
                )
            )
        last = stage_outputs[-1]
        return Mask2FormerOutputs(
            pred_logits=last["pred_logits"],
            pred_masks=last["pred_masks"],
            pred_kernels=last["pred_kernels"],
            pred_class_logits=last["pred_class_logits"],
            aux_outputs=stage_outputs[:-1],
            init_masks=init_masks,
            init_kernels=init_kernels,
            init_class_logits=init_class_logits,
        )


def build_mask2former(
    *,
    num_classes: int,
    depth: int = 50,
    backbone_weights: str | None = None,
    frozen_stages: int = 1,
    norm_eval: bool = True,
    num_queries: int = 100,
    num_layers: int = 9,
    feat_channels: int = 256,
    num_heads: int = 8,
    ffn_channels: int = 2048,
    encoder_layers: int = 6,
    encoder_ffn_channels: int = 1024,
    deform_points: int = 4,
) -> Mask2Former:
    """Build Mask2Former with a torchvision ResNet backbone.

    Args:
        num_classes: C.
        depth: ResNet depth (18, 34, 50).
        backbone_weights: local torchvision / MoCo-v2 / DenseCL checkpoint, or None (random init).
        frozen_stages: mmdet semantics, -1 none .. 4 the whole backbone.
        norm_eval: freeze BatchNorm (``FrozenBatchNorm2d``).
        num_queries: N.
        num_layers: decoder layers L.
        feat_channels: D (multiple of 32).
        num_heads: attention heads (divides D).
        ffn_channels: decoder FFN hidden width.
        encoder_layers: pixel-decoder encoder layers.
        encoder_ffn_channels: pixel-decoder FFN hidden width.
        deform_points: deformable sampling points per head and level.

    Returns:
        The model, randomly initialised apart from the loaded backbone weights.
    """
    backbone = build_resnet(depth, weights=backbone_weights, frozen_stages=frozen_stages, norm_eval=norm_eval)
    return Mask2Former(
        backbone=backbone, num_classes=num_classes, num_queries=num_queries, num_layers=num_layers,
        feat_channels=feat_channels, num_heads=num_heads, ffn_channels=ffn_channels,
        encoder_layers=encoder_layers, encoder_ffn_channels=encoder_ffn_channels, deform_points=deform_points,
    )
