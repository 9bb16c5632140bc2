"""QueryInst for instance segmentation (Fang et al., ICCV 2021), in plain PyTorch.

Follows mmdet's ``queryinst_r50_fpn`` (METHODS.md section 5): ResNet + FPN, the Sparse R-CNN proposal
stage (N learned boxes and N learned proposal features, ``EmbeddingRPNHead``), then S dynamic stages.
Stage i: multi-head self-attention over the proposal features (the query q*_i), RoIAlign 7 x 7 of the
previous boxes, dynamic instance interaction (``DynamicConv``: a 1x1 dynamic layer pair whose weights
come from q*_i), FFN, class logits (sigmoid focal, no background) and box deltas; and, in parallel, the
dynamic mask head: RoIAlign 14 x 14 of the stage's new boxes, dynamic mask interaction with the same
q*_i, four 3 x 3 convs, a deconv and 28 x 28 mask logits.

Deviations, on purpose:

- Every query gets a mask at every stage (mmdet runs the mask head on the matched boxes only): the model
  returns raw predictions for all queries, as K-Net does, and matching stays in the criterion. Masks are
  class-agnostic (one channel) so that each query has one mask to rank and export.
- The mask head's convs use GroupNorm instead of BatchNorm: its batch is every query's RoI, mostly
  background boxes, whose statistics would not describe the matched ones.
- The 28 x 28 RoI mask logits are also pasted into a stride-4 grid over the input (``paste_roi_masks``),
  so ``pred_masks`` follows K-Net's image-mask convention and the shared post-processing, evaluation and
  export adapter apply unchanged.
- Initial proposal boxes are relative to the padded input (mmdet: the unpadded image), since the forward
  pass takes only the padded batch; batched equals single-image for inputs of one size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from sp_ray.models.backbone import FPN, build_resnet
from sp_ray.models.common import (
    GN_GROUPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIZE_DIVISOR,
    KernelSelfAttention,
    check_query_model_sizes,
)
from sp_ray.types import ModelOutputs, StageOutput

# Stride of the pasted image masks ``pred_masks`` (K-Net: 8); the finest FPN level's.
MASK_STRIDE = 4
FPN_STRIDES = (4, 8, 16, 32)
BOX_ROI_SIZE = 7
MASK_ROI_SIZE = 14
# Side of the mask logits of every RoI (the mask head upsamples the 14 x 14 RoI once).
MASK_SIZE = 28
# mmdet's RoIAlign settings for Sparse R-CNN / QueryInst: two samples per bin, pixel-centre aligned.
ROI_SAMPLING_RATIO = 2
# mmdet ``SingleRoIExtractor``: a box of side s goes to level floor(log2(s / 56)), clamped to the pyramid.
FINEST_SCALE = 56
# ``DeltaXYWHBBoxCoder`` of Sparse R-CNN: deltas are scaled by these stds; log-size deltas are clamped.
BOX_DELTA_STDS = (0.5, 0.5, 1.0, 1.0)
MAX_LOG_SIZE_DELTA = abs(math.log(16 / 1000))
# Logit pasted outside a query's box: sigmoid(-20) ~ 2e-9 passes no threshold, while the bilinear blend
# towards it across the box border stays a short fall-off rather than a cliff.
OUTSIDE_LOGIT = -20.0


def multilevel_roi_align(feats: list[Tensor], boxes: Tensor, *, output_size: int) -> Tensor:
    """RoIAlign of every box on its FPN level (mmdet ``SingleRoIExtractor``, finest_scale 56).

    Every level is pooled for every box and the box's level selected by a one-hot weight: fixed shapes
    and no data-dependent indexing, so the same graph runs in training and in ONNX (``RoiAlign``).

    Args:
        feats: [P2..P5], float [B, D, H/4 .. H/32, W/4 .. W/32].
        boxes: float [B, N, 4] xyxy in input pixels.
        output_size: side s of the pooled features.

    Returns:
        float [B * N, D, s, s], row b * N + n for box n of image b.
    """
    batch, n = boxes.shape[:2]
    flat = boxes.reshape(-1, 4)
    index = torch.arange(batch, device=boxes.device, dtype=boxes.dtype).repeat_interleave(n)
    rois = torch.cat([index[:, None], flat], dim=1)  # (B*N, 5)
    side = ((flat[:, 2] - flat[:, 0]) * (flat[:, 3] - flat[:, 1])).clamp(min=1e-6).sqrt()
    level = torch.floor(torch.log2(side / FINEST_SCALE + 1e-6)).clamp(0, len(feats) - 1)
    pooled = None
    for i, (feat, stride) in enumerate(zip(feats, FPN_STRIDES, strict=True)):
        # float32 under bf16 autocast too: box coordinates of hundreds of pixels need more than bf16's 8 bits.
        out = roi_align(
            feat.float(), rois.float(), output_size, spatial_scale=1.0 / stride,
            sampling_ratio=ROI_SAMPLING_RATIO, aligned=True,
        ).to(feat.dtype)
        weight = (level == i).to(out.dtype)[:, None, None, None]
        pooled = out * weight if pooled is None else pooled + out * weight
    return pooled


def decode_boxes(boxes: Tensor, deltas: Tensor) -> Tensor:
    """Apply (dx, dy, dw, dh) deltas to boxes (``DeltaXYWHBBoxCoder``, stds (0.5, 0.5, 1, 1), no clipping).

    x' = x + w * dx * 0.5, w' = w * exp(clamp(dw, +-log(1000/16))), likewise for y and h.

    Args:
        boxes: float [..., 4] xyxy.
        deltas: float [..., 4] raw deltas.

    Returns:
        float [..., 4] xyxy.
    """
    stds = deltas.new_tensor(BOX_DELTA_STDS)
    d = deltas * stds
    widths = boxes[..., 2:] - boxes[..., :2]
    centres = boxes[..., :2] + 0.5 * widths
    new_centres = centres + widths * d[..., :2]
    new_widths = widths * d[..., 2:].clamp(-MAX_LOG_SIZE_DELTA, MAX_LOG_SIZE_DELTA).exp()
    return torch.cat([new_centres - 0.5 * new_widths, new_centres + 0.5 * new_widths], dim=-1)


def paste_roi_masks(
    mask_logits: Tensor, boxes: Tensor, *, size: tuple[int, int], stride: int = MASK_STRIDE
) -> Tensor:
    """Paste per-box mask logits into an image grid by bilinear sampling at the grid-cell centres.

    The m x m map is padded with one ring of ``OUTSIDE_LOGIT`` (torchvision's paste pads its masks the
    same way), so cells outside the box read that value and cells across the box border blend into it.
    Bilinear sampling of an axis-aligned box is separable: out = W_y M W_x^T with hat-function weights, two
    batched matmuls that export to ONNX as MatMul.

    Args:
        mask_logits: float [B, N, m, m] logits in the frame of each box.
        boxes: float [B, N, 4] xyxy in input pixels.
        size: (h, w) of the grid; cell (i, j) is centred at input pixel ((j + 0.5) s, (i + 0.5) s).
        stride: s, input pixels per grid cell.

    Returns:
        float [B, N, h, w] logits.
    """
    m = mask_logits.shape[-1]
    padded = F.pad(mask_logits, (1, 1, 1, 1), value=OUTSIDE_LOGIT)  # (B, N, m+2, m+2)
    cells = torch.arange(m + 2, device=mask_logits.device, dtype=mask_logits.dtype)

    def weights(start: Tensor, end: Tensor, count: int) -> Tensor:
        centres = (torch.arange(count, device=start.device, dtype=start.dtype) + 0.5) * stride
        extent = (end - start).clamp(min=1e-6)
        # Position in padded-map cells: the centre of real cell j is at j + 1.
        pos = ((centres - start[..., None]) / extent[..., None] * m + 0.5).clamp(0, m + 1)  # (B, N, count)
        return (1 - (pos[..., None] - cells).abs()).clamp(min=0)  # (B, N, count, m+2)

    wy = weights(boxes[..., 1], boxes[..., 3], size[0])
    wx = weights(boxes[..., 0], boxes[..., 2], size[1])
    return wy @ padded @ wx.transpose(-1, -2)


class DynamicConv(nn.Module):
    """Dynamic instance interaction (Sparse R-CNN ``DynamicConv``): two 1x1 layers whose weights come from
    the query.

    F' = ReLU(LN(ReLU(LN(F W_in(q))) W_out(q))) over the S x S RoI positions, with [W_in | W_out] =
    Linear(q); with ``roi_size`` set, the result is flattened and projected to one vector per query.

    Args:
        channels: D, width of the query, the RoI features and the output.
        dynamic_channels: hidden width of the dynamic layers (64 in the paper).
        roi_size: S to flatten and project S*S*D -> D (box branch), or None to keep the map (mask branch).
    """

    def __init__(self, *, channels: int, dynamic_channels: int, roi_size: int | None) -> None:
        super().__init__()
        self.channels = channels
        self.dynamic_channels = dynamic_channels
        self.dynamic_layer = nn.Linear(channels, 2 * channels * dynamic_channels)
        self.norm_in = nn.LayerNorm(dynamic_channels)
        self.norm_out = nn.LayerNorm(channels)
        self.proj = None
        if roi_size is not None:
            self.proj = nn.Sequential(
                nn.Linear(channels * roi_size * roi_size, channels), nn.LayerNorm(channels), nn.ReLU(inplace=True)
            )

    def forward(self, queries: Tensor, roi_feats: Tensor) -> Tensor:
        """Interact.

        Args:
            queries: float [M, D].
            roi_feats: float [M, D, S, S].

        Returns:
            float [M, D] with a projection, else float [M, S*S, D].
        """
        d, h = self.channels, self.dynamic_channels
        params = self.dynamic_layer(queries)
        param_in = params[:, : d * h].reshape(-1, d, h)
        param_out = params[:, d * h :].reshape(-1, h, d)
        x = roi_feats.flatten(2).transpose(1, 2)  # (M, S*S, D)
        x = F.relu(self.norm_in(x @ param_in))
        x = F.relu(self.norm_out(x @ param_out))  # (M, S*S, D)
        if self.proj is None:
            return x
        return self.proj(x.flatten(1))


class DynamicMaskHead(nn.Module):
    """QueryInst's dynamic mask head (``DynamicMaskHead``), class-agnostic.

    Dynamic mask interaction of the 14 x 14 RoI features with the query, four 3 x 3 conv-GN-ReLU,
    a stride-2 deconv + ReLU and a 1x1 conv to one 28 x 28 logit map.

    Args:
        channels: D.
        dynamic_channels: hidden width of the dynamic interaction.
        num_convs: 3 x 3 convs before the upsampling.
    """

    def __init__(self, *, channels: int, dynamic_channels: int, num_convs: int = 4) -> None:
        super().__init__()
        self.interaction = DynamicConv(channels=channels, dynamic_channels=dynamic_channels, roi_size=None)
        self.convs = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                    nn.GroupNorm(GN_GROUPS, channels),
                    nn.ReLU(inplace=True),
                )
                for _ in range(num_convs)
            )
        )
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.logits = nn.Conv2d(channels, 1, 1)

    def forward(self, roi_feats: Tensor, queries: Tensor) -> Tensor:
        """Predict RoI masks.

        Args:
            roi_feats: float [M, D, 14, 14].
            queries: float [M, D], the stage's queries after self-attention (q*).

        Returns:
            float [M, 28, 28] mask logits in the frame of each box.
        """
        x = self.interaction(queries, roi_feats).transpose(1, 2).reshape(roi_feats.shape)  # (M, D, 14, 14)
        x = F.relu(self.upsample(self.convs(x)))
        return self.logits(x)[:, 0]


def _fcs(channels: int, count: int) -> nn.Sequential:
    return nn.Sequential(
        *(
            layer
            for _ in range(count)
            for layer in (nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(inplace=True))
        )
    )


class QueryInstStage(nn.Module):
    """One QueryInst stage: DIIHead (Sparse R-CNN) plus the parallel dynamic mask head.

    Args:
        num_classes: C.
        channels: D.
        dynamic_channels: hidden width of both dynamic interactions.
        ffn_channels: hidden width of the FFN.
        num_heads: heads of the self-attention.
    """

    def __init__(
        self, *, num_classes: int, channels: int, dynamic_channels: int, ffn_channels: int, num_heads: int
    ) -> None:
        super().__init__()
        d = channels
        self.attention = KernelSelfAttention(channels=d, num_heads=num_heads)
        self.attention_norm = nn.LayerNorm(d)
        self.interaction = DynamicConv(channels=d, dynamic_channels=dynamic_channels, roi_size=BOX_ROI_SIZE)
        self.interaction_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_channels), nn.ReLU(inplace=True), nn.Linear(ffn_channels, d))
        self.ffn_norm = nn.LayerNorm(d)
        self.cls_fcs = _fcs(d, 1)
        self.fc_cls = nn.Linear(d, num_classes)
        self.reg_fcs = _fcs(d, 3)
        self.fc_reg = nn.Linear(d, 4)
        self.mask_head = DynamicMaskHead(channels=d, dynamic_channels=dynamic_channels)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.attention.in_proj.bias)
        nn.init.zeros_(self.attention.out_proj.bias)
        nn.init.zeros_(self.mask_head.logits.bias)
        # Focal-loss prior: every class starts at probability 0.01 so background dominates early training.
        nn.init.constant_(self.fc_cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, fpn: list[Tensor], boxes: Tensor, queries: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Refine the queries and boxes once; predict classes, boxes and RoI masks.

        q*_i = LN(MHSA(q_{i-1})); q_i = LN(q*_i + DynConv(q*_i, RoIAlign_7(b_{i-1}))), then q_i = LN(q_i +
        FFN(q_i)); class logits and deltas from q_i give b_i; the mask is DynMaskHead(RoIAlign_14(b_i), q*_i)
        (QueryInst eq. 3-5, shared query, parallel supervision).

        Args:
            fpn: [P2..P5].
            boxes: b_{i-1}, float [B, N, 4] xyxy in input pixels.
            queries: q_{i-1}, float [B, N, D].

        Returns:
            (class logits [B, N, C], boxes b_i [B, N, 4], queries q_i [B, N, D], RoI mask logits
            [B, N, 28, 28] in the frame of b_i).
        """
        batch, n, d = queries.shape
        attn = self.attention_norm(self.attention(queries))  # q*, (B, N, D)
        flat = attn.reshape(-1, d)
        roi = multilevel_roi_align(fpn, boxes, output_size=BOX_ROI_SIZE)  # (B*N, D, 7, 7)
        obj = self.interaction_norm(flat + self.interaction(flat, roi))
        obj = self.ffn_norm(obj + self.ffn(obj))
        logits = self.fc_cls(self.cls_fcs(obj)).reshape(batch, n, -1)
        new_boxes = decode_boxes(boxes, self.fc_reg(self.reg_fcs(obj)).reshape(batch, n, 4))
        # Masks are cut at the refined boxes, without a gradient into them (mmdet's detached proposals).
        mask_roi = multilevel_roi_align(fpn, new_boxes.detach(), output_size=MASK_ROI_SIZE)
        masks = self.mask_head(mask_roi, flat).reshape(batch, n, MASK_SIZE, MASK_SIZE)
        return logits, new_boxes, obj.reshape(batch, n, d), masks


class QueryInstFeatures(NamedTuple):
    """What QueryInst computes before its stages (``QueryInst.forward_features``).

    fpn: [P2..P5], float [B, D, H/4 .. H/32, W/4 .. W/32] (P5 is the source of SP's feature prompts).
    init_boxes: b_0, float [B, N, 4] xyxy input pixels, the learned proposal boxes.
    init_kernels: q_0, float [B, N, D], the learned proposal features (prompts are added to these).
    """

    fpn: list[Tensor]
    init_boxes: Tensor
    init_kernels: Tensor


class QueryInst(nn.Module):
    """QueryInst: ``forward(images)`` returns raw per-stage predictions (``ModelOutputs``, with boxes).

    Same graph in training and evaluation; matching, losses and post-processing live elsewhere.

    Args:
        backbone: module mapping a normalised image [B, 3, H, W] to [C2..C5]; ``out_channels`` attribute.
        fpn: module mapping [C2..C5] to [P2..P5] with ``feat_channels`` channels each.
        num_classes: C (sigmoid classes, no background column).
        num_queries: N proposal boxes and features.
        num_stages: S dynamic stages.
        feat_channels: D.
        dynamic_channels: hidden width of the dynamic interactions.
        ffn_channels: hidden width of each stage's FFN.
        num_heads: heads of the self-attention; must divide D.
    """

    mask_stride = MASK_STRIDE

    def __init__(
        self,
        *,
        backbone: nn.Module,
        fpn: nn.Module,
        num_classes: int,
        num_queries: int = 100,
        num_stages: int = 6,
        feat_channels: int = 256,
        dynamic_channels: int = 64,
        ffn_channels: int = 2048,
        num_heads: int = 8,
    ) -> None:
        super().__init__()
        check_query_model_sizes("QueryInst", feat_channels, num_heads, num_classes=num_classes,
                                num_queries=num_queries, num_stages=num_stages, dynamic_channels=dynamic_channels)
        self.backbone = backbone
        self.fpn = fpn
        # Normalised (cx, cy, w, h), starting as the whole input (``EmbeddingRPNHead``).
        self.proposal_boxes = nn.Parameter(torch.tensor([0.5, 0.5, 1.0, 1.0]).repeat(num_queries, 1))
        self.proposal_features = nn.Parameter(torch.randn(num_queries, feat_channels))
        self.stages = nn.ModuleList(
            QueryInstStage(
                num_classes=num_classes,
                channels=feat_channels,
                dynamic_channels=dynamic_channels,
                ffn_channels=ffn_channels,
                num_heads=num_heads,
            )
            for _ in range(num_stages)
        )
        self.num_classes = num_classes
        self.num_kernels = num_queries
        self.feat_channels = feat_channels
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, kernel_offsets: Tensor | None = None) -> ModelOutputs:
        """Predict classes, boxes and masks for every query at every stage.

        Args:
            images: float [B, 3, H, W], RGB in 0..255, H and W multiples of 32 (padded).
            kernel_offsets: optional float [B, N, D] added to the proposal features q_0 (saliency prompts,
                SP prompt injection); None in fine-tuning and export.

        Returns:
            ``ModelOutputs``, every stage with: pred_logits [B, N, C]; pred_boxes [B, N, 4]
            xyxy input pixels; pred_roi_masks [B, N, 28, 28] logits in the frame of pred_boxes;
            pred_masks [B, N, H/4, W/4] the RoI logits pasted into the input (``OUTSIDE_LOGIT`` outside
            the box); pred_kernels q_i [B, N, D]. Top level = stage S, aux_outputs = stages 1..S-1;
            init_kernels q_0 [B, N, D] (before any offset); init_masks [B, N, H/4, W/4] the initial
            proposal boxes as logits (+20 inside, -20 outside).
        """
        return self.forward_from_features(self.forward_features(images), kernel_offsets)

    def forward_features(self, images: Tensor) -> QueryInstFeatures:
        """Backbone, FPN and the learned proposals: everything before the stages.

        Split from ``forward`` so that SP pre-training can build its prompts from P5 and q_0 and then
        run the stages (``forward_from_features``) without a second backbone pass.

        Args:
            images: float [B, 3, H, W], RGB in 0..255, H and W multiples of 32 (padded).

        Returns:
            ``QueryInstFeatures`` (P2..P5, b_0, q_0).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"QueryInst expects images [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-2] % SIZE_DIVISOR != 0 or images.shape[-1] % SIZE_DIVISOR != 0:
            raise ValueError(
                f"QueryInst input H and W must be multiples of {SIZE_DIVISOR}, got {tuple(images.shape[-2:])}; "
                "pad the batch in collate"
            )
        batch, _, height, width = images.shape
        x = (images - self.pixel_mean) / self.pixel_std
        fpn = self.fpn(self.backbone(x))
        cxcy, wh = self.proposal_boxes[:, :2], self.proposal_boxes[:, 2:]
        # Built from the shape by tensor arithmetic so that an exported graph keeps H and W dynamic.
        one = self.proposal_boxes.new_ones(())
        scale = torch.stack([one * width, one * height]).repeat(2)
        boxes = torch.cat([cxcy - 0.5 * wh, cxcy + 0.5 * wh], dim=1) * scale  # (N, 4)
        return QueryInstFeatures(
            fpn=list(fpn),
            init_boxes=boxes[None].expand(batch, -1, -1),
            init_kernels=self.proposal_features[None].expand(batch, -1, -1),
        )

    def forward_from_features(
        self, features: QueryInstFeatures, kernel_offsets: Tensor | None = None
    ) -> ModelOutputs:
        """Run the S stages from ``forward_features``' output.

        Args:
            features: ``QueryInstFeatures`` of a batch.
            kernel_offsets: optional float [B, N, D] added to q_0 (see ``forward``).

        Returns:
            ``ModelOutputs`` with ``pred_boxes`` and ``pred_roi_masks``, as ``forward``.
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
        grid = tuple(features.fpn[0].shape[-2:])  # the stride-4 level's (H/4, W/4)
        boxes = features.init_boxes
        stage_outputs: list[StageOutput] = []
        for stage in self.stages:
            logits, new_boxes, queries, roi_masks = stage(features.fpn, boxes, queries)
            pasted = paste_roi_masks(roi_masks, new_boxes.detach(), size=grid, stride=MASK_STRIDE)
            stage_outputs.append(
                StageOutput(
                    pred_logits=logits, pred_masks=pasted, pred_kernels=queries, pred_boxes=new_boxes,
                    pred_roi_masks=roi_masks,
                )
            )
            # Each stage refines the previous boxes without a gradient through them (Sparse R-CNN).
            boxes = new_boxes.detach()
        inside = init_kernels.new_full((*init_kernels.shape[:2], MASK_SIZE, MASK_SIZE), -OUTSIDE_LOGIT)
        init_masks = paste_roi_masks(inside, features.init_boxes.detach(), size=grid, stride=MASK_STRIDE)
        last = stage_outputs[-1]
        return ModelOutputs(
            **last,
            aux_outputs=stage_outputs[:-1],
            init_masks=init_masks,
            init_kernels=init_kernels,
        )


def build_queryinst(
    *,
    num_classes: int,
    depth: int = 50,
    backbone_weights: str | None = None,
    frozen_stages: int = 1,
    norm_eval: bool = True,
    num_queries: int = 100,
    num_stages: int = 6,
    feat_channels: int = 256,
    dynamic_channels: int = 64,
    ffn_channels: int = 2048,
    num_heads: int = 8,
) -> QueryInst:
    """Build QueryInst with a torchvision ResNet backbone and an FPN neck.

    Args:
        num_classes: C.
        depth: ResNet depth (18, 34, 50).
        backbone_weights: local torchvision / MoCo-v2 / DenseCL checkpoint, or None (random init).
        frozen_stages: mmdet semantics, -1 none .. 4 the whole backbone.
        norm_eval: freeze BatchNorm (``FrozenBatchNorm2d``).
        num_queries: N.
        num_stages: S.
        feat_channels: D (multiple of 32).
        dynamic_channels: hidden width of the dynamic interactions.
        ffn_channels: FFN hidden width.
        num_heads: attention heads (divides D).

    Returns:
        The model, randomly initialised apart from the loaded backbone weights.
    """
    backbone = build_resnet(depth, weights=backbone_weights, frozen_stages=frozen_stages, norm_eval=norm_eval)
    fpn = FPN(in_channels=backbone.out_channels, out_channels=feat_channels)
    return QueryInst(
        backbone=backbone,
        fpn=fpn,
        num_classes=num_classes,
        num_queries=num_queries,
        num_stages=num_stages,
        feat_channels=feat_channels,
        dynamic_channels=dynamic_channels,
        ffn_channels=ffn_channels,
        num_heads=num_heads,
    )
