"""Constants of the export tests; their data and trained K-Net fixtures are in ``tests/conftest.py``
(shared with the predict tests, so the model is trained once per session)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 64
