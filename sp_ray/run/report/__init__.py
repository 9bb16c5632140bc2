"""The demo's report: one document model (`sp_ray.run.report.document`) rendered to HTML and Markdown, with
figures drawn by `sp_ray.drawing` (masks on images, numpy + PIL; charts, matplotlib Agg), linked by relative
paths; `demo_report` writes it from the demo's outputs."""
