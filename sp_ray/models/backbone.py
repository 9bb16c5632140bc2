"""ResNet backbone (torchvision, never downloaded), local weight loading and the FPN neck.

The backbone keeps torchvision's attribute names (``conv1``, ``bn1``, ``layer1`` .. ``layer4``) so that
its state dict keys are exactly torchvision's without ``fc.*``; that is what the weight loader maps
every supported file layout onto.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

_RESNETS = {
    18: (torchvision.models.resnet18, [64, 128, 256, 512]),
    34: (torchvision.models.resnet34, [64, 128, 256, 512]),
    50: (torchvision.models.resnet50, [256, 512, 1024, 2048]),
}

# Top-level names of the projection heads that self-supervised checkpoints carry next to the ResNet.
_HEAD_PREFIXES = ("fc.", "neck.", "projector.", "head.", "predictor.")


class ResNetBackbone(nn.Module):
    """A torchvision ResNet returning C2..C5 (strides 4, 8, 16, 32), with mmdet-style freezing.

    Args:
        depth: 18, 34 or 50.
        frozen_stages: -1 trains everything; 0 freezes the stem (conv1 + bn1); s >= 1 freezes the stem
            and layer1..layer{s} (4 freezes the whole backbone). Frozen parts have requires_grad False
            and their norm layers stay in eval mode.
        norm_eval: True uses ``FrozenBatchNorm2d`` everywhere (fixed statistics and affine, folds away
            in ONNX, batched equals single-image); False uses trainable ``BatchNorm2d``.
    """

    def __init__(self, *, depth: int, frozen_stages: int, norm_eval: bool) -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNETS)}, got {depth}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
        constructor, channels = _RESNETS[depth]
        norm_layer = FrozenBatchNorm2d if norm_eval else nn.BatchNorm2d
        resnet = constructor(weights=None, norm_layer=norm_layer)
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.depth = depth
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.out_channels: list[int] = list(channels)
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        return [self.conv1, self.bn1, *stages[: self.frozen_stages]]

    def train(self, mode: bool = True) -> ResNetBackbone:
        """Set train mode, keeping the frozen stages (and their BatchNorm statistics) in eval mode."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """Compute the four residual stages.

        Args:
            x: float [B, 3, H, W] normalised image.

        Returns:
            [C2, C3, C4, C5], float [B, out_channels[i], H / 2^(i+2), W / 2^(i+2)].
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


@dataclass
class LoadReport:
    """What ``load_backbone_weights`` did.

    Attributes:
        layout: "torchvision", "moco_v2" or "densecl".
        loaded: number of ResNet tensors copied.
        skipped: keys of the file that were not ResNet tensors (heads, momentum encoder, queue, ...).
    """

    layout: str
    loaded: int
    skipped: list[str] = field(default_factory=list)


# (layout name, key prefix of the ResNet inside the file), tried in this order.
_LAYOUTS = (
    ("moco_v2", "module.encoder_q."),
    ("densecl", "encoder_q.0."),
    ("densecl", "backbone."),
)


def _list_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)}: [{shown}]{more}"


def _detect_layout(state: dict[str, Tensor], wrapped: bool, path: str) -> tuple[str, str]:
    for name, prefix in _LAYOUTS:
        if f"{prefix}conv1.weight" in state:
            return name, prefix
    if "conv1.weight" in state:
        # DenseCL releases backbone-only weights wrapped in {"state_dict": ...}; torchvision files are bare.
        return ("densecl" if wrapped else "torchvision"), ""
    raise ValueError(
        f"{path}: no ResNet found; expected a key 'conv1.weight' (torchvision), "
        f"'module.encoder_q.conv1.weight' (MoCo-v2) or 'backbone.conv1.weight' / "
        f"'encoder_q.0.conv1.weight' (DenseCL). Keys in the file "
        f"{_list_keys(sorted(state))}"
    )


def load_backbone_weights(resnet: nn.Module, path: str) -> LoadReport:
    """Load a local torchvision, MoCo-v2 or DenseCL ResNet checkpoint into ``resnet``.

    Heads (``fc``, projection MLPs, necks) and everything outside the ResNet (momentum encoder,
    queues) are skipped. Every ResNet tensor of ``resnet`` must be found with the right shape.

    Args:
        resnet: a ``ResNetBackbone`` (state dict keys as torchvision's, without ``fc``).
        path: local file read with ``torch.load(path, map_location="cpu", weights_only=True)``.

    Returns:
        A ``LoadReport`` with the detected layout, the number of tensors loaded and the skipped keys.

    Raises:
        ValueError: not a torch file, no known layout, or ResNet tensors missing, mis-shaped or
            unrecognised; the message names the file and lists the first keys of each kind with their count.
    """
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError) as err:
        # Text, an image, an LFS pointer or a truncated download surface as any of these four.
        raise ValueError(
            f"{path} is not a PyTorch weights file (torch.load, weights_only, failed with "
            f"{type(err).__name__}); pass a local file written by torch.save holding a ResNet state dict"
        ) from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(raw).__name__}")
    wrapped = isinstance(raw.get("state_dict"), dict)
    state = raw["state_dict"] if wrapped else raw
    layout, prefix = _detect_layout(state, wrapped, path)

    wanted = {k: v for k, v in resnet.state_dict().items() if not k.endswith("num_batches_tracked")}
    found: dict[str, Tensor] = {}
    skipped: list[str] = []
    unmatched: list[str] = []
    mis_shaped: list[str] = []
    for key, value in state.items():
        if not key.startswith(prefix):
            skipped.append(key)
            continue
        name = key[len(prefix) :]
        if name.startswith(_HEAD_PREFIXES) or name.endswith("num_batches_tracked"):
            skipped.append(key)
        elif name not in wanted:
            unmatched.append(key)
        elif tuple(value.shape) != tuple(wanted[name].shape):
            mis_shaped.append(f"{key} {tuple(value.shape)} != {tuple(wanted[name].shape)}")
        else:
            found[name] = value
    missing = [k for k in wanted if k not in found]
    if missing or unmatched or mis_shaped:
        problems = []
        if missing:
            problems.append(f"missing ResNet tensors {_list_keys(missing)}")
        if unmatched:
            problems.append(f"unmatched keys {_list_keys(unmatched)}")
        if mis_shaped:
            problems.append(f"wrong shapes {_list_keys(mis_shaped)}")
        depth = getattr(resnet, "depth", "?")
        raise ValueError(
            f"{path} (layout {layout}, prefix '{prefix}') does not fit ResNet-{depth}: "
            + "; ".join(problems)
            + ". Check that the file holds a ResNet of the configured depth."
        )
    incompatible = resnet.load_state_dict(found, strict=False)
    leftover = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
    if leftover or incompatible.unexpected_keys:
        raise ValueError(f"{path}: state dict did not load cleanly: {incompatible}")
    return LoadReport(layout=layout, loaded=len(found), skipped=skipped)


def build_resnet(depth: int, *, weights: str | None, frozen_stages: int, norm_eval: bool) -> ResNetBackbone:
    """Build a torchvision ResNet-18/34/50 returning C2..C5, optionally loading local weights.

    Args:
        depth: 18, 34 or 50.
        weights: path of a local torchvision / MoCo-v2 / DenseCL checkpoint, or None for random init.
        frozen_stages: mmdet semantics, -1 none .. 4 all (see ``ResNetBackbone``).
        norm_eval: True freezes BatchNorm as ``FrozenBatchNorm2d``.

    Returns:
        The backbone; ``out_channels`` lists the channels of C2..C5.
    """
    backbone = ResNetBackbone(depth=depth, frozen_stages=frozen_stages, norm_eval=norm_eval)
    if weights is not None:
        load_backbone_weights(backbone, weights)
    return backbone


class FPN(nn.Module):
    """Feature pyramid (Lin et al. 2017): 1x1 laterals, nearest top-down path, 3x3 output convs.

    Same layout as mmdet's FPN with ``num_outs`` equal to the number of inputs (no extra levels).

    Args:
        in_channels: channels of C2..C5.
        out_channels: D, channels of every output level.
    """

    def __init__(self, *, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )
        self.out_channels = out_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """Fuse the pyramid.

        Args:
            feats: [C2..C5], float [B, in_channels[i], H_i, W_i], each level half the size of the previous.

        Returns:
            [P2..P5], float [B, D, H_i, W_i].
        """
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        return [conv(x) for conv, x in zip(self.output_convs, laterals, strict=True)]
