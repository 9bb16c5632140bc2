"""What an exported model says about itself: the ONNX ``metadata_props`` the runtime reads (plain Python).

Every field is stored under its own key as JSON text, so other tools (Netron, ``onnx.load``) show it
readably. The exporter writes a ``ModelInfo``; the runtime reads it back and refuses a model that
lacks a field, naming the missing keys.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

FORMAT_VERSION = 1

# The two graph layouts the runtime decodes. The strings are what exported models carry in ``output_format``
# (``TOPK_FORMAT`` was named ``KNET_FORMAT`` before; its value is unchanged, so older exports still load).
TOPK_FORMAT = "topk_mask_logits"  # scores [B, k], labels [B, k], mask_logits [B, k, H/s, W/s]
ROI_FORMAT = "roi_mask_probs"  # boxes [M, 4], scores [M], labels [M], mask_probs [M, 28, 28], batch_index [M]

INPUT_NAME = "images"
OUTPUT_NAMES = {
    TOPK_FORMAT: ("scores", "labels", "mask_logits"),
    ROI_FORMAT: ("boxes", "scores", "labels", "mask_probs", "batch_index"),
}


@dataclass(frozen=True)
class ModelInfo:
    """Facts the runtime needs besides the graph.

    Attributes:
        family: ``model.name`` of the checkpoint ("knet", "mask2former", "maskrcnn").
        output_format: ``TOPK_FORMAT`` or ``ROI_FORMAT``.
        class_names: category names by contiguous label.
        cat_ids: COCO category id of each contiguous label.
        max_size: long-side cap of the training resize (``data.max_size``).
        short_size: short-side target of the training resize (``data.short_size``).
        size_divisor: padded input sides are multiples of this.
        input_size: fixed (H, W) of the graph input, or None for any size (multiples of size_divisor).
        batch_size: fixed batch of the graph input, or None for any batch.
        mask_stride: stride of the mask logits of ``TOPK_FORMAT`` (K-Net 8, Mask2Former 4; unused by ``ROI_FORMAT``).
        topk: detections per image in the graph.
        score_threshold: default score threshold of the runtime (detections with score > it are kept).
        mask_threshold: mask pixels are those with probability > it.
        mean: per-channel mean (RGB, 0..255) subtracted inside the graph; recorded, not applied again.
        std: per-channel std (RGB, 0..255) divided inside the graph; recorded, not applied again.
        precision: "fp32", "fp16" or "int8" (weights; inputs and outputs keep their types).
        config_hash: ``sp_ray.config.config_hash`` of the checkpoint's config.
        source: free text, e.g. the checkpoint path and versions.
    """

    family: str
    output_format: str
    class_names: list[str]
    cat_ids: list[int]
    max_size: int
    short_size: int
    size_divisor: int
    input_size: tuple[int, int] | None
    batch_size: int | None
    mask_stride: int
    topk: int
    score_threshold: float
    mask_threshold: float
    mean: list[float]
    std: list[float]
    precision: str
    config_hash: str
    source: str = ""

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` entries: one key per field, JSON values, plus ``sp_ray_format``."""
        props = {f.name: json.dumps(getattr(self, f.name)) for f in dataclasses.fields(self)}
        props["sp_ray_format"] = json.dumps(FORMAT_VERSION)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str], *, where: str = "model") -> ModelInfo:
        """Rebuild from ``metadata_props`` (``InferenceSession.get_modelmeta().custom_metadata_map``).

        Raises:
            ValueError: a field is missing, not JSON or of the wrong type or range, or the format is unknown;
                the message names them.
        """
        if "sp_ray_format" not in props:
            raise ValueError(
                f"{where} has no sp-ray metadata (keys present: {sorted(props)}); "
                "export it with 'sp-ray export --checkpoint DIR --out model.onnx'"
            )
        if json.loads(props["sp_ray_format"]) != FORMAT_VERSION:
            raise ValueError(f"{where}: sp-ray metadata format {props['sp_ray_format']}, this runtime reads "
                             f"{FORMAT_VERSION}; re-export the model with this version")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in props and n != "source"]
        if missing:
            raise ValueError(f"{where}: metadata lacks {missing}; re-export the model")
        values = {}
        for name in names:
            if name not in props:
                continue
            try:
                values[name] = json.loads(props[name])
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: metadata field {name!r} is not JSON: {props[name]!r}") from err
        _check_field_types(values, where)
        if values["input_size"] is not None:
            values["input_size"] = tuple(values["input_size"])
        if values["output_format"] not in OUTPUT_NAMES:
            raise ValueError(f"{where}: unknown output_format {values['output_format']!r}; "
                             f"this runtime decodes {sorted(OUTPUT_NAMES)}")
        return cls(**values)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _positive_int(value: object) -> bool:
    return _is_int(value) and value > 0


# What each metadata field must hold, as a check and its description (a tampered or hand-edited
# model must fail here with the field's name, not later inside the decoding with a TypeError).
_FIELD_CHECKS = {
    "family": (lambda v: isinstance(v, str), "a string"),
    "output_format": (lambda v: isinstance(v, str), "a string"),
    "class_names": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of strings"),
    "cat_ids": (lambda v: isinstance(v, list) and all(_is_int(i) for i in v), "a list of integers"),
    "max_size": (_positive_int, "a positive integer"),
    "short_size": (_positive_int, "a positive integer"),
    "size_divisor": (_positive_int, "a positive integer"),
    "input_size": (lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(map(_positive_int, v))),
                   "null or [H, W] of positive integers"),
    "batch_size": (lambda v: v is None or _positive_int(v), "null or a positive integer"),
    "mask_stride": (_positive_int, "a positive integer"),
    "topk": (_positive_int, "a positive integer"),
    "score_threshold": (_is_number, "a number"),
    "mask_threshold": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "mean": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_number, v)), "a list of 3 numbers"),
    "std": (lambda v: isinstance(v, list) and len(v) == 3 and all(_is_number(x) and x > 0 for x in v),
            "a list of 3 positive numbers"),
    "precision": (lambda v: isinstance(v, str), "a string"),
    "config_hash": (lambda v: isinstance(v, str), "a string"),
    "source": (lambda v: isinstance(v, str), "a string"),
}


def _check_field_types(values: dict[str, object], where: str) -> None:
    for name, (check, expected) in _FIELD_CHECKS.items():
        if name in values and not check(values[name]):
            raise ValueError(f"{where}: metadata field {name!r} must be {expected}, got {values[name]!r}; "
                             "the model was altered after export: re-export it with 'sp-ray export'")
    if len(values["class_names"]) != len(values["cat_ids"]):
        raise ValueError(f"{where}: metadata has {len(values['class_names'])} class_names but "
                         f"{len(values['cat_ids'])} cat_ids; re-export the model with 'sp-ray export'")


def replace_metadata_props(model: object, info: ModelInfo) -> None:
    """Replace the ``metadata_props`` of ``model`` (an ``onnx.ModelProto``) with the fields of ``info``."""
    del model.metadata_props[:]
    for key, value in info.to_props().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
