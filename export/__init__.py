"""Deployment, in two layers.

- The runtime (this folder: ``runtime``, ``geometry``, ``resample``, ``rle``, ``metadata``, ``providers``,
  ``client``, ``coco_results``): numpy and onnxruntime only, no torch, no ray, nothing of ``sp_ray``; the
  bottom layer, which ``sp_ray.data`` may import.
- The exporter (``export.exporter``: torch -> ONNX, its adapters, the parity check, precision conversion):
  imports ``sp_ray`` and torch; nothing of the runtime imports it.

This package imports nothing itself, so ``import export.runtime`` loads only the runtime's modules.
"""
