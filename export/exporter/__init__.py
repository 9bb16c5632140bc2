"""The exporter: checkpoint -> ONNX (``onnx_export``), the parity check against PyTorch (``parity``) and
calibrated static int8 (``quantize``). It imports ``sp_ray`` and torch; the runtime one level up never imports it.

This package imports nothing itself.
"""
