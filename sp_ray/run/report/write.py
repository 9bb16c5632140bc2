"""Write a `Report` as ``<stem>.html`` and ``<stem>.md`` side by side, after checking its figure links."""

from __future__ import annotations

import os
from pathlib import Path

from sp_ray.run.report.document import Report, missing_links
from sp_ray.run.report.html import render_html
from sp_ray.run.report.markdown import render_markdown


def write_report(report: Report, folder: str | Path, *, stem: str = "report") -> dict[str, Path]:
    """Render ``report`` into ``folder`` (each file written beside its destination, then renamed).

    Args:
        report: the document; its figure paths are relative to ``folder``.
        folder: where the report files go (the figures must already be there).
        stem: file name without suffix.

    Returns:
        {"html": path, "md": path}.

    Raises:
        FileNotFoundError: a figure names a file that does not exist (nothing is written).
    """
    folder = Path(folder)
    missing = missing_links(report, folder)
    if missing:
        raise FileNotFoundError(f"report {report.title!r}: figures missing under {folder}: {', '.join(missing)}")
    paths = {"html": folder / f"{stem}.html", "md": folder / f"{stem}.md"}
    for kind, text in (("html", render_html(report)), ("md", render_markdown(report))):
        tmp = paths[kind].with_name(f".{paths[kind].name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, paths[kind])
    return paths
