"""``make demo``: `sp_ray.run`'s pipeline on the built-in synthetic dataset with the tiny preset, on a local Ray.

The data step writes the synthetic shapes (400 images of 160 px, 320 train, 80 val); the fine-tuning runs are
K-Net from scratch, from SP and Mask R-CNN on 5% and 10% of train. `DEMO` is ``make demo``, `TINY` the test
suite's (``sp-ray demo --tiny``). Everything else, the report included, is `sp_ray.run`'s.
"""

from __future__ import annotations

from sp_ray.demo.pipeline import run_demo
from sp_ray.demo.settings import DEMO, TINY

__all__ = ["DEMO", "TINY", "run_demo"]
