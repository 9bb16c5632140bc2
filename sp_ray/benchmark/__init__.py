"""``sp-ray benchmark``: every deployable format of one checkpoint side by side on one COCO set.

``run.py`` exports, evaluates and times the formats (``run_benchmark``); ``report.py`` writes the table,
the JSON and the AP-against-speed chart. This module holds only the format names, so that the CLI's
parser can list them without importing torch or onnxruntime.
"""

from __future__ import annotations

# Format name -> the precision of its ONNX export (``export.exporter.onnx_export.PRECISIONS``); None: the PyTorch
# model itself, the reference of the parity columns.
FORMATS: dict[str, str | None] = {"torch": None, "onnx": "fp32", "onnx-fp16": "fp16", "onnx-int8": "int8"}
