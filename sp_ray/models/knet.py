"""K-Net for instance segmentation (Zhang et al., NeurIPS 2021), in plain PyTorch.

Follows the official det configuration (``configs/det/_base_/models/knet_s3_r50_fpn.py``, METHODS.md
section 5): ResNet + FPN, a semantic-FPN localisation branch at stride 8, N learned 1x1 kernels whose
initial masks m^0 pool the features into K^0, then S kernel-update stages (group feature assembling,
adaptive kernel update, kernel interaction by self-attention, FFN, class and mask heads).

Left out on purpose: the auxiliary semantic-segmentation head of the RPN stage (``conv_seg`` with its
focal loss). It only adds a training signal to the semantic branch and needs per-class semantic targets.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sp_ray.models.backbone import FPN, build_resnet
from sp_ray.models.common import (
    GN_GROUPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIZE_DIVISOR,
    KernelSelfAttention,
    check_query_model_sizes,
    sine_positional_encoding,
)
from sp_ray.types import ModelOutputs, StageOutput

# Stride of the mask logits and of the features the kernels act on.
MASK_STRIDE = 8


def _conv_gn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.GroupNorm(GN_GROUPS, out_channels),
        nn.ReLU(inplace=True),
    )


def _upsample2() -> nn.Upsample:
    return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)


class LocalizationFPN(nn.Module):
    """Semantic-FPN branch (``SemanticFPNWrapper`` + the ``loc_convs`` / ``seg_convs`` of ``ConvKernelHead``).

    P2 gets one stride-2 conv, P3 one conv, P4 conv-up-conv, P5 (plus a sine positional encoding)
    conv-up-conv-up-conv; all 3x3 conv + GN(32) + ReLU, all at stride 8, summed. Two 1x1 conv-GN-ReLU
    heads give the localisation and the semantic features, each followed by one more 1x1 conv-GN-ReLU.

    Args:
        channels: D, channels of the FPN levels and of the outputs.
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        d = channels
        self.level_convs = nn.ModuleList(
            [
                _conv_gn_relu(d, d, 3, stride=2),
                _conv_gn_relu(d, d, 3),
                nn.Sequential(_conv_gn_relu(d, d, 3), _upsample2(), _conv_gn_relu(d, d, 3)),
                nn.Sequential(
                    _conv_gn_relu(d, d, 3),
                    _upsample2(),
                    _conv_gn_relu(d, d, 3),
                    _upsample2(),
                    _conv_gn_relu(d, d, 3),
                ),
            ]
        )
        self.loc_pred = _conv_gn_relu(d, d, 1)
        self.sem_pred = _conv_gn_relu(d, d, 1)
        self.loc_conv = _conv_gn_relu(d, d, 1)
        self.sem_conv = _conv_gn_relu(d, d, 1)
        self.channels = d
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Fuse P2..P5 at stride 8.

        Args:
            feats: [P2..P5], float [B, D, H/4 .. H/32, W/4 .. W/32].

        Returns:
            (loc_feats, sem_feats), each float [B, D, H/8, W/8].
        """
        p5 = feats[3]
        p5 = p5 + sine_positional_encoding(p5.shape[-2], p5.shape[-1], self.channels, like=p5)
        levels = [feats[0], feats[1], feats[2], p5]
        fused = self.level_convs[0](levels[0])
        for conv, level in zip(self.level_convs[1:], levels[1:], strict=True):
            fused = fused + conv(level)
        loc = self.loc_conv(self.loc_pred(fused))
        sem = self.sem_conv(self.sem_pred(fused))
        return loc, sem


class KernelUpdator(nn.Module):
    """Adaptive feature update of K-Net (``KernelUpdator``): gated fusion of kernels and group features.

    gate = phi_1(F) * psi_1(K); G_F = sigmoid(LN(Linear(gate))); G_K = sigmoid(LN(Linear(gate)));
    K~ = G_F * LN(phi_2(F)) + G_K * LN(psi_2(K)); out = ReLU(LN(Linear(K~))).

    Args:
        channels: D.
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        d = channels
        self.dynamic_layer = nn.Linear(d, 2 * d)
        self.input_layer = nn.Linear(d, 2 * d)
        self.input_gate = nn.Linear(d, d)
        self.update_gate = nn.Linear(d, d)
        self.norm_in = nn.LayerNorm(d)
        self.norm_out = nn.LayerNorm(d)
        self.input_norm_in = nn.LayerNorm(d)
        self.input_norm_out = nn.LayerNorm(d)
        self.fc_layer = nn.Linear(d, d)
        self.fc_norm = nn.LayerNorm(d)

    def forward(self, group_feats: Tensor, kernels: Tensor) -> Tensor:
        """Update the kernels with their assembled group features.

        Args:
            group_feats: F, float [B, N, D].
            kernels: K, float [B, N, D].

        Returns:
            float [B, N, D], the updated kernels K~.
        """
        param_in, param_out = self.dynamic_layer(group_feats).chunk(2, dim=-1)
        input_in, input_out = self.input_layer(kernels).chunk(2, dim=-1)
        gate = input_in * param_in
        kernel_gate = self.input_norm_in(self.input_gate(gate)).sigmoid()
        feat_gate = self.norm_in(self.update_gate(gate)).sigmoid()
        updated = feat_gate * self.norm_out(param_out) + kernel_gate * self.input_norm_out(input_out)
        return F.relu(self.fc_norm(self.fc_layer(updated)))


class KernelUpdateStage(nn.Module):
    """One K-Net iteration (``KernelUpdateHead`` with conv_kernel_size 1).

    Args:
        num_classes: C.
        channels: D.
        ffn_channels: hidden width of the FFN.
        num_heads: heads of the kernel self-attention.
    """

    def __init__(self, *, num_classes: int, channels: int, ffn_channels: int, num_heads: int) -> None:
        super().__init__()
        d = channels
        self.feat_transform = nn.Conv2d(d, d, 1)
        self.kernel_update = KernelUpdator(channels=d)
        self.attention = KernelSelfAttention(channels=d, num_heads=num_heads)
        self.attention_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, ffn_channels), nn.ReLU(inplace=True), nn.Linear(ffn_channels, d)
        )
        self.ffn_norm = nn.LayerNorm(d)
        self.cls_fcs = nn.Sequential(nn.Linear(d, d, bias=False), nn.LayerNorm(d), nn.ReLU(inplace=True))
        self.fc_cls = nn.Linear(d, num_classes)
        self.mask_fcs = nn.Sequential(nn.Linear(d, d, bias=False), nn.LayerNorm(d), nn.ReLU(inplace=True))
        self.fc_mask = nn.Linear(d, d)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.attention.in_proj.bias)
        nn.init.zeros_(self.attention.out_proj.bias)
        # Focal-loss prior: every class starts at probability 0.01 so background dominates early training.
        nn.init.constant_(self.fc_cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, x_feats: Tensor, kernels: Tensor, mask_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Refine the kernels once and predict classes and masks.

        K-Net's kernel update head: X' = feat_transform(X); group feature assembling
        F = sum_hw 1[sigmoid(M^{i-1}) > 0.5] X'; adaptive feature update; kernel interaction (self-attention
        + FFN) giving K^i; then M^i = mask_head(K^i) * X', a 1x1 dynamic conv.

        Args:
            x_feats: X, float [B, D, h, w] stride-8 features.
            kernels: K^{i-1}, float [B, N, D].
            mask_logits: M^{i-1}, float [B, N, h, w].

        Returns:
            (class logits [B, N, C], mask logits M^i [B, N, h, w], kernels K^i [B, N, D]).
        """
        x = self.feat_transform(x_feats)
        # sigmoid(m) > 0.5 <=> m > 0: the binarised masks of the previous stage pick the pixels to group.
        hard = (mask_logits > 0).to(x.dtype).flatten(2)  # (B, N, h*w)
        group_feats = hard @ x.flatten(2).transpose(1, 2)  # (B, N, D)
        kernels = self.kernel_update(group_feats, kernels)
        kernels = self.attention_norm(self.attention(kernels))
        kernels = self.ffn_norm(kernels + self.ffn(kernels))
        logits = self.fc_cls(self.cls_fcs(kernels))
        mask_kernels = self.fc_mask(self.mask_fcs(kernels))
        masks = (mask_kernels @ x.flatten(2)).unflatten(-1, x.shape[-2:])  # (B, N, h, w)
        return logits, masks, kernels


class KNetFeatures(NamedTuple):
    """What K-Net computes before its kernel-update stages (``KNet.forward_features``).

    fpn: [P2..P5], float [B, D, H/4 .. H/32, W/4 .. W/32] (P5 is the source of SP's feature prompts).
    x_feats: X = loc + sem, float [B, D, H/8, W/8], the features the kernels act on.
    init_masks: m^0, float [B, N, H/8, W/8] mask logits of the initial kernels.
    init_kernels: K^0, float [B, N, D] (learned weight + mask-pooled features).
    """

    fpn: list[Tensor]
    x_feats: Tensor
    init_masks: Tensor
    init_kernels: Tensor


class KNet(nn.Module):
    """K-Net instance segmenter: ``forward(images)`` returns raw per-stage predictions (``ModelOutputs``).

    Same graph in training and evaluation; matching, losses and post-processing live elsewhere.

    Args:
        backbone: module mapping a normalised image [B, 3, H, W] to [C2..C5]; ``out_channels`` attribute.
        fpn: module mapping [C2..C5] to [P2..P5] with ``feat_channels`` channels each.
        num_classes: C (sigmoid classes, no background column).
        num_kernels: N.
        num_stages: S kernel-update stages.
        feat_channels: D.
        ffn_channels: hidden width of each stage's FFN.
        num_heads: heads of the kernel self-attention; must divide D.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        fpn: nn.Module,
        num_classes: int,
        num_kernels: int = 100,
        num_stages: int = 3,
        feat_channels: int = 256,
        ffn_channels: int = 2048,
        num_heads: int = 8,
    ) -> None:
        super().__init__()
        check_query_model_sizes("KNet", feat_channels, num_heads, num_classes=num_classes, num_kernels=num_kernels,
                                num_stages=num_stages)
        self.backbone = backbone
        self.fpn = fpn
        self.localization = LocalizationFPN(channels=feat_channels)
        self.init_kernels = nn.Conv2d(feat_channels, num_kernels, 1, bias=False)
        nn.init.normal_(self.init_kernels.weight, std=1.0)
        self.stages = nn.ModuleList(
            KernelUpdateStage(
                num_classes=num_classes,
                channels=feat_channels,
                ffn_channels=ffn_channels,
                num_heads=num_heads,
            )
            for _ in range(num_stages)
        )
        self.num_classes = num_classes
        self.num_kernels = num_kernels
        self.feat_channels = feat_channels
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, kernel_offsets: Tensor | None = None) -> ModelOutputs:
        """Predict classes and masks for every kernel at every stage.

        Args:
            images: float [B, 3, H, W], RGB in 0..255, H and W multiples of 32 (padded).
            kernel_offsets: optional float [B, N, D] added to K^0 before the stages (saliency prompts,
                SP prompt injection K_n = K_n^0 + P_{delta(n)}); None in fine-tuning and export.

        Returns:
            ``ModelOutputs``: top level = stage S (pred_logits [B, N, C], pred_masks [B, N, H/8, W/8]
            logits, pred_kernels [B, N, D]); aux_outputs = stages 1..S-1; init_masks m^0 [B, N, H/8, W/8];
            init_kernels K^0 [B, N, D] (before any offset).
        """
        return self.forward_from_features(self.forward_features(images), kernel_offsets)

    def forward_features(self, images: Tensor) -> KNetFeatures:
        """Backbone, FPN, localisation branch and the initial kernels: everything before the stages.

        Split from ``forward`` so that SP pre-training can build its prompts from P5 and K^0 and then
        run the same stages (``forward_from_features``) without a second backbone pass.

        Args:
            images: float [B, 3, H, W], RGB in 0..255, H and W multiples of 32 (padded).

        Returns:
            ``KNetFeatures`` (P2..P5, X, m^0, K^0).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"KNet expects images [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-2] % SIZE_DIVISOR != 0 or images.shape[-1] % SIZE_DIVISOR != 0:
            raise ValueError(
                f"KNet input H and W must be multiples of {SIZE_DIVISOR}, got {tuple(images.shape[-2:])}; "
                "pad the batch in collate"
            )
        x = (images - self.pixel_mean) / self.pixel_std
        fpn = self.fpn(self.backbone(x))
        loc, sem = self.localization(fpn)
        x_feats = loc + sem
        init_masks = self.init_kernels(loc)  # (B, N, h, w)
        # K^0 = kernel weight + sum of x over the pixels of its binarised initial mask (METHODS 1.2).
        hard = (init_masks > 0).to(x_feats.dtype).flatten(2)  # (B, N, h*w)
        init_kernels = self.init_kernels.weight.flatten(1)[None] + hard @ x_feats.flatten(2).transpose(1, 2)
        return KNetFeatures(fpn=list(fpn), x_feats=x_feats, init_masks=init_masks, init_kernels=init_kernels)

    def forward_from_features(
        self, features: KNetFeatures, kernel_offsets: Tensor | None = None
    ) -> ModelOutputs:
        """Run the S kernel-update stages from ``forward_features``' output.

        Args:
            features: ``KNetFeatures`` of a batch.
            kernel_offsets: optional float [B, N, D] added to K^0 (see ``forward``).

        Returns:
            ``ModelOutputs``, as ``forward``.
        """
        init_kernels = features.init_kernels
        kernels = init_kernels
        if kernel_offsets is not None:
            if kernel_offsets.shape != init_kernels.shape:
                raise ValueError(
                    f"kernel_offsets must have shape [B, N, D] = {tuple(init_kernels.shape)}, "
                    f"got {tuple(kernel_offsets.shape)}"
                )
            kernels = kernels + kernel_offsets
        masks = features.init_masks
        stage_outputs: list[StageOutput] = []
        for stage in self.stages:
            logits, masks, kernels = stage(features.x_feats, kernels, masks)
            stage_outputs.append(StageOutput(pred_logits=logits, pred_masks=masks, pred_kernels=kernels))
        last = stage_outputs[-1]
        return ModelOutputs(
            pred_logits=last["pred_logits"],
            pred_masks=last["pred_masks"],
            pred_kernels=last["pred_kernels"],
            aux_outputs=stage_outputs[:-1],
            init_masks=features.init_masks,
            init_kernels=init_kernels,
        )


def build_knet(
    *,
    num_classes: int,
    depth: int = 50,
    backbone_weights: str | None = None,
    frozen_stages: int = 1,
    norm_eval: bool = True,
    num_kernels: int = 100,
    num_stages: int = 3,
    feat_channels: int = 256,
    ffn_channels: int = 2048,
    num_heads: int = 8,
) -> KNet:
    """Build K-Net with a torchvision ResNet backbone and an FPN neck.

    Args:
        num_classes: C.
        depth: ResNet depth (18, 34, 50).
        backbone_weights: local torchvision / MoCo-v2 / DenseCL checkpoint, or None (random init).
        frozen_stages: mmdet semantics, -1 none .. 4 the whole backbone.
        norm_eval: freeze BatchNorm (``FrozenBatchNorm2d``).
        num_kernels: N.
        num_stages: S.
        feat_channels: D (multiple of 32).
        ffn_channels: FFN hidden width.
        num_heads: attention heads (divides D).

    Returns:
        The model, randomly initialised apart from the loaded backbone weights.
    """
    backbone = build_resnet(depth, weights=backbone_weights, frozen_stages=frozen_stages, norm_eval=norm_eval)
    fpn = FPN(in_channels=backbone.out_channels, out_channels=feat_channels)
    return KNet(
        backbone=backbone,
        fpn=fpn,
        num_classes=num_classes,
        num_kernels=num_kernels,
        num_stages=num_stages,
        feat_channels=feat_channels,
        ffn_channels=ffn_channels,
        num_heads=num_heads,
    )
