"""Figures shared by the demo's report, `sp-ray predict --overlays` and `sp-ray benchmark`: `draw` (masks,
labels and tiles on images, numpy + PIL) and `charts` (matplotlib, Agg). Imports nothing of sp_ray."""
