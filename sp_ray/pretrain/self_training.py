"""FreeSOLO self-training: a trained model re-labels the unlabeled images for the next round of pre-training.

FreeSOLO (Wang et al., CVPR 2022, section 3.3; ``gen_pseudo_labels.sh``, ``train_pl.sh``) runs the model
trained on Free-Mask pseudo masks over the unlabeled images, keeps its confident predictions and trains
again from the same initialisation on them. ``sp-ray propose --from-checkpoint DIR`` does the first half:
`CheckpointProposer` takes the place of the frozen saliency backbone inside ``propose``'s sharded Ray Data
run, so the output is the same ``annotations.json`` + ``prompts.npy`` and ``sp-ray pretrain`` trains on it
unchanged.

Selection (`select_pseudo_masks`): every kernel is one class-agnostic candidate, scored by its best class
probability times its maskness (mean probability inside the mask); the candidates are ranked, decayed by
Gaussian Matrix NMS and kept when the decayed score and the maskness reach ``selftrain.score_threshold``
and ``selftrain.maskness_threshold``, at most ``selftrain.max_per_image``; masks that are empty at image
size or whose box spans ``selftrain.max_box_width`` of the width are dropped (FreeSOLO's filter).

Prompts: the row of a pseudo mask in ``prompts.npy`` plays the part of the saliency query S_l, the query
that produced the mask. For a model prediction it is the model's own C5 feature averaged inside the
predicted mask (the mask at the prediction stride, pooled to the C5 grid), L2-normalised like S_l.
Its width is the C5 width of the checkpoint's backbone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from sp_ray.checkpoint import MODEL_FILE, load_checkpoint, load_init_weights
from sp_ray.config import Config, ConfigError, InstanceUniqueConfig, SelfTrainConfig
from sp_ray.data.transforms import resize_for_inference
from sp_ray.models import build_model
from sp_ray.models.common import SIZE_DIVISOR
from sp_ray.models.postprocess import paste_crops, paste_mask_logits
from sp_ray.pretrain.proposers import OBJECT_CATEGORY, Proposals, Ready, c5_channels
from sp_ray.pretrain.saliency import matrix_nms


def check_selftrain_config(cfg: SelfTrainConfig) -> None:
    """Raise ``ConfigError`` naming the ``selftrain.*`` key of an out-of-range setting."""
    problems = []
    for key in ("score_threshold", "mask_threshold"):
        if not 0 <= getattr(cfg, key) < 1:
            problems.append(f"selftrain.{key} must be in [0, 1), got {getattr(cfg, key)}")
    # Above 0, so that a kept mask is never empty at the prediction stride (its prompt needs pixels).
    if not 0 < cfg.maskness_threshold <= 1:
        problems.append(f"selftrain.maskness_threshold must be in (0, 1], got {cfg.maskness_threshold}")
    if cfg.max_per_image < 1:
        problems.append(f"selftrain.max_per_image must be >= 1, got {cfg.max_per_image}")
    if cfg.nms_sigma <= 0:
        problems.append(f"selftrain.nms_sigma must be > 0, got {cfg.nms_sigma}")
    if not 0 < cfg.max_box_width <= 1:
        problems.append(f"selftrain.max_box_width must be in (0, 1], got {cfg.max_box_width}")
    if problems:
        raise ConfigError("; ".join(problems))


def load_model_for_self_training(checkpoint: str | Path) -> tuple[nn.Module, Config]:
    """The plain detector of a fine-tuning or pre-training checkpoint, in eval mode, with its config.

    Pre-training wrappers (SP, IUQ) are not rebuilt: their detector's tensors are loaded into the plain model.

    Raises:
        FileNotFoundError: not a checkpoint directory.
        ValueError: the model is not a query-based (QEIS) model, or the checkpoint does not fit its config.
    """
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, backbone_weights=None),  # every weight is in the checkpoint
        pretrain=dataclasses.replace(cfg.pretrain, enabled=False),
        iuq=InstanceUniqueConfig(),
    )
    model = build_model(cfg)
    if not hasattr(model, "forward_features") or not hasattr(model, "backbone"):
        raise ValueError(
            f"{checkpoint}: self-training needs a query-based model (K-Net, QueryInst, Mask2Former), got "
            f"model.name {cfg.model.name!r}"
        )
    report = load_init_weights(model, ckpt.model_state)
    if report.missing or report.reinitialised:
        raise ValueError(f"{checkpoint}: the checkpoint does not fit its own config's model: {report.summary()}")
    return model.eval(), cfg


def checkpoint_identity(checkpoint: str | Path) -> dict[str, Any]:
    """What identifies a checkpoint's weights for the shard fingerprint: its path and model.pt's size and mtime."""
    path = Path(checkpoint).resolve()
    stat = (path / MODEL_FILE).stat()
    return {"checkpoint": str(path), "model_stamp": [stat.st_size, stat.st_mtime_ns]}


def maskness(mask_logits: Tensor, *, threshold: float = 0.5) -> Tensor:
    """Mean probability inside each mask (the pixels above ``threshold``), 0 for an empty mask.

    Args:
        mask_logits: float [N, h, w].
        threshold: probability threshold of the mask.

    Returns:
        float [N].
    """
    probs = mask_logits.float().sigmoid().flatten(1)
    inside = (probs > threshold).float()
    return (probs * inside).sum(1) / inside.sum(1).clamp(min=1.0)


def select_pseudo_masks(pred_logits: Tensor, mask_logits: Tensor, cfg: SelfTrainConfig) -> tuple[Tensor, Tensor]:
    """Which kernels of one image become pseudo masks, and their scores (FreeSOLO's pseudo-label step).

    score_n = max_c sigmoid(logit_nc) x maskness_n; the kernels are ranked by it, decayed by Gaussian
    Matrix NMS (SOLOv2) on their binary masks, kept when the decayed score >= ``score_threshold`` and the
    maskness >= ``maskness_threshold``, re-ranked by the decayed score and cut to ``max_per_image``.

    Args:
        pred_logits: float [N, C] class logits of the last stage.
        mask_logits: float [N, h, w] mask logits over the valid (unpadded) region.
        cfg: the ``selftrain`` section.

    Returns:
        (kernel indices int64 [L], decayed scores float [L]), best first.
    """
    quality = maskness(mask_logits, threshold=cfg.mask_threshold)
    scores = pred_logits.float().sigmoid().amax(dim=1) * quality
    order = scores.argsort(descending=True)
    binary = mask_logits[order].float().sigmoid() > cfg.mask_threshold
    decayed = matrix_nms(binary, scores[order], sigma=cfg.nms_sigma)
    keep = (decayed >= cfg.score_threshold) & (quality[order] >= cfg.maskness_threshold)
    kept, kept_scores = order[keep], decayed[keep]
    best = kept_scores.argsort(descending=True)[: cfg.max_per_image]
    return kept[best], kept_scores[best]


def pooled_prompts(c5: Tensor, mask_logits: Tensor, *, threshold: float = 0.5) -> Tensor:
    """The prompt of each predicted mask: C5 averaged inside the mask, L2-normalised.

    Args:
        c5: float [C, H/32, W/32] of the padded input.
        mask_logits: float [L, H/s, W/s] over the padded input (s the prediction stride, dividing 32).
        threshold: probability threshold of the mask.

    Returns:
        float [L, C].
    """
    factor = mask_logits.shape[-1] // c5.shape[-1]
    inside = (mask_logits.float().sigmoid() > threshold).float()
    # Masks as the batch dimension, so that an image with no pseudo mask (L = 0) pools to no prompt.
    weights = F.avg_pool2d(inside[:, None], kernel_size=factor)[:, 0]  # (L, H/32, W/32): the mask's share of each cell
    pooled = torch.einsum("lhw,chw->lc", weights, c5.float()) / weights.sum((1, 2)).clamp(min=1e-6)[:, None]
    return F.normalize(pooled, dim=1)


class CheckpointProposer:
    """A trained model as ``propose``'s proposal source (a ``Proposer``): decoded images in, one ``Proposals``
    per image out.

    Images are resized as for evaluation (the checkpoint's ``data.max_size`` / ``data.short_size``), padded
    to a common multiple of 32 and run as one batch; C5 is read from the backbone by a forward hook, so the
    prompts cost no second backbone pass.

    Args:
        checkpoint: a fine-tuning or pre-training checkpoint directory of a query-based model.
        cfg: the ``selftrain`` section.
        device: where the model runs.
    """

    def __init__(self, checkpoint: str | Path, cfg: SelfTrainConfig, *, device: torch.device) -> None:
        check_selftrain_config(cfg)
        self.model, self.model_config = load_model_for_self_training(checkpoint)
        self.model.to(device)
        self.backbone: nn.Module = self.model.backbone
        self.cfg = cfg
        self.device = device
        self._c5: list[Tensor] = []
        self.backbone.register_forward_hook(lambda _module, _inputs, output: self._c5.append(output[-1]))

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of an image after the evaluation resize, before padding."""
        data = self.model_config.data
        return resize_for_inference(height, width, max_size=data.max_size, short_size=data.short_size)

    @property
    def prompt_width(self) -> int:
        return c5_channels(self.backbone)

    @property
    def categories(self) -> list[dict[str, Any]]:
        return [OBJECT_CATEGORY]  # class-free pseudo masks

    def check_size(self, height: int, width: int) -> None:
        """Images are checked against the resize that the model's evaluation applies."""
        self.input_size(height, width)

    @torch.inference_mode()
    def __call__(self, ready: Ready) -> list[Proposals]:
        """Pseudo masks of decoded images.

        Args:
            ready: (item, uint8 [H0, W0, 3] RGB) pairs of ``propose``'s image list.

        Returns:
            One ``Proposals`` per image: masks bool [L, H0, W0], decayed scores [L], boxes [L, 4] xyxy,
            queries float [L, C] (the pooled C5 prompts).
        """
        if not ready:
            return []
        resized, sizes = [], []
        for _, pixels in ready:
            size = self.input_size(pixels.shape[0], pixels.shape[1])
            image = torch.from_numpy(np.require(pixels, requirements=["C", "W"])).permute(2, 0, 1).to(self.device)
            resized.append(TF.resize(image, list(size), antialias=True))
            sizes.append(size)
        height = -(-max(h for h, _ in sizes) // SIZE_DIVISOR) * SIZE_DIVISOR
        width = -(-max(w for _, w in sizes) // SIZE_DIVISOR) * SIZE_DIVISOR
        batch = torch.stack(
            [F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2])) for image in resized]
        ).float()  # (B, 3, H, W)
        self._c5.clear()
        outputs = self.model(batch)
        c5 = self._c5[-1]
        pred_logits, pred_masks = outputs["pred_logits"].float(), outputs["pred_masks"].float()
        stride = height // pred_masks.shape[-2]
        results = []
        for b, ((_, pixels), size) in enumerate(zip(ready, sizes, strict=True)):
            valid = (-(-size[0] // stride), -(-size[1] // stride))
            index, scores = select_pseudo_masks(pred_logits[b], pred_masks[b, :, : valid[0], : valid[1]], self.cfg)
            results.append(self._instances(pred_masks[b, index], scores, c5[b], size, pixels.shape[:2], stride))
        return results

    def _instances(
        self,
        mask_logits: Tensor,
        scores: Tensor,
        c5: Tensor,
        image_size: tuple[int, int],
        orig_size: tuple[int, int],
        stride: int,
    ) -> Proposals:
        boxes, crops = paste_mask_logits(mask_logits, image_size=image_size, orig_size=orig_size,
                                         mask_stride=stride, mask_threshold=self.cfg.mask_threshold)
        masks = paste_crops(boxes, crops, orig_size)  # (L, H0, W0)
        boxes = boxes.float()
        keep = masks.flatten(1).any(1) & (boxes[:, 2] - boxes[:, 0] < self.cfg.max_box_width * orig_size[1])
        return Proposals(
            masks=masks[keep].cpu(),
            scores=scores[keep].cpu(),
            boxes=boxes[keep].cpu(),
            queries=pooled_prompts(c5, mask_logits[keep], threshold=self.cfg.mask_threshold).cpu(),
        )
