"""Reports: one document model (`sp_ray.report.document`) rendered to HTML and Markdown, with figures
drawn by `draw` (masks on images, numpy + PIL) and `charts` (matplotlib, Agg), linked by relative paths."""
