"""Export adapters, outside the models: what wraps a trained model for torch -> ONNX.

The family table is ``sp_ray.models.FAMILIES``; this module keeps no table of families. It holds one adapter per
graph layout of the runtime (``export.metadata``), and a family's layout follows from its row there: masks at a
fixed stride (``mask_stride`` set: K-Net, Mask2Former, QueryInst) export as ``TOPK_FORMAT`` through
``QueryExport``; per-RoI masks (``mask_stride`` None: Mask R-CNN) as ``ROI_FORMAT`` through ``RoIExport``.
A new family whose outputs are ``ModelOutputs`` needs nothing here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from export.metadata import ROI_FORMAT, TOPK_FORMAT
from sp_ray.models import model_family
from sp_ray.models.postprocess import select_topk

# ``ModelInfo.mask_stride`` must be a positive integer, and a ``ROI_FORMAT`` model's runtime never reads it;
# this is the value RoI-format exports have always carried.
ROI_METADATA_MASK_STRIDE = 8


class QueryExport(nn.Module):
    """A query-based model for export (``TOPK_FORMAT``): uint8 images in, the k best (query, class) pairs out.

    Args:
        model: a trained ``KNet``, ``Mask2Former`` or ``QueryInst`` (eval mode): any model whose outputs have
            ``pred_logits`` [B, N, C] and ``pred_masks`` [B, N, h, w] at a fixed stride.
        k: detections per image (``eval.topk``, at most N * C).
    """

    def __init__(self, model: nn.Module, *, k: int) -> None:
        super().__init__()
        self.model = model
        self.k = k

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Args: images uint8 [B, 3, H, W] (RGB 0..255, H and W multiples of 32).

        Returns:
            (scores float [B, k], labels int64 [B, k], mask_logits float [B, k, H/s, W/s], s the
            family's mask stride).
        """
        outputs = self.model(images.float())
        return select_topk(outputs["pred_logits"], outputs["pred_masks"], k=self.k)


class RoIExport(nn.Module):
    """Mask R-CNN for export: uint8 images in, flattened detections with their 28 x 28 masks out.

    Args:
        model: a trained ``sp_ray.models.maskrcnn.MaskRCNN`` (eval mode).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Args: images uint8 [B, 3, H, W].

        Returns:
            (boxes [M, 4] input pixels, scores [M], labels int64 [M], mask_probs [M, 28, 28],
            batch_index int64 [M]).
        """
        d = self.model(images)
        return d["boxes"], d["scores"], d["labels"], d["masks"], d["batch_index"]


@dataclass(frozen=True)
class ExportAdapter:
    """How the models of one graph layout are exported.

    Attributes:
        output_format: the runtime's decoder (``export.metadata``).
        wrap: (model, k) -> the export adapter module.
        dynamo: True for the torch.export-based exporter, False for the TorchScript one.
        dynamic_batch: whether a dynamic batch dimension can be exported.
        fp16: whether onnxruntime's fp16 converter handles the graph.
    """

    output_format: str
    wrap: Callable[[nn.Module, int], nn.Module]
    dynamo: bool
    dynamic_batch: bool
    fp16: bool


ADAPTERS: dict[str, ExportAdapter] = {
    # K-Net; Mask2Former (sigmoid-compatible class logits, masks at stride 4); QueryInst, whose RoI masks are
    # pasted into a stride-4 grid inside the model and whose RoIAlign exports as ONNX RoiAlign (opset >= 16,
    # half_pixel = torchvision's aligned=True).
    TOPK_FORMAT: ExportAdapter(TOPK_FORMAT, lambda model, k: QueryExport(model, k=k), dynamo=True,
                               dynamic_batch=True, fp16=True),
    # torchvision's detection models only export with the TorchScript exporter, which unrolls the
    # per-image loops (fixed batch); onnxruntime's fp16 converter breaks the NMS subgraphs (If nodes).
    ROI_FORMAT: ExportAdapter(ROI_FORMAT, lambda model, k: RoIExport(model), dynamo=False,
                              dynamic_batch=False, fp16=False),
}


def export_adapter(name: str) -> ExportAdapter:
    """The adapter of family ``name`` (``model.name``), chosen by its row of ``sp_ray.models.FAMILIES``.

    Raises:
        ConfigError: ``name`` is not a family.
    """
    return ADAPTERS[TOPK_FORMAT if model_family(name).mask_stride is not None else ROI_FORMAT]


def metadata_mask_stride(name: str) -> int:
    """``ModelInfo.mask_stride`` of an export of family ``name``: its ``mask_stride`` from
    ``sp_ray.models.FAMILIES``, or ``ROI_METADATA_MASK_STRIDE`` where masks are per RoI."""
    stride = model_family(name).mask_stride
    return ROI_METADATA_MASK_STRIDE if stride is None else stride
