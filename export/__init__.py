"""Deployment: torch -> ONNX conversion (``export.onnx_export``, needs torch) and the onnxruntime
runtime (``export.runtime``, needs numpy and onnxruntime only, no torch, no ray).

This package imports nothing itself, so ``import export.runtime`` loads only the runtime's modules.
"""
