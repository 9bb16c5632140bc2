"""The report as data: sections of paragraphs, tables, figures and command blocks.

One `Report` is rendered by `sp_ray.run.report.html` and `sp_ray.run.report.markdown`, so both formats say
the same thing. Figure paths are relative to the folder the report is written to, which keeps the report
movable (copy the folder, the images follow) and lets `missing_links` check it before it is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class Paragraph:
    """Text; spans between backticks are rendered as code."""

    text: str


@dataclass(frozen=True)
class Table:
    """A table of strings; ``numeric`` columns (by index) are right-aligned."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""
    numeric: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for index, row in enumerate(self.rows):
            if len(row) != len(self.header):
                raise ValueError(
                    f"table {self.caption or self.header!r}: row {index} has {len(row)} cells, the header "
                    f"{len(self.header)}"
                )


@dataclass(frozen=True)
class Commands:
    """Shell commands shown verbatim, one per line."""

    lines: tuple[str, ...]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    """An image file (a relative POSIX path) with its caption and the commands that reproduce it."""

    path: str
    caption: str
    commands: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        pure = PurePosixPath(self.path)
        if pure.is_absolute() or ".." in pure.parts or "\\" in self.path:
            raise ValueError(f"figure path {self.path!r} must be relative to the report folder, without '..'")


Block = Paragraph | Table | Commands | Figure


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Report:
    title: str
    intro: tuple[Block, ...] = ()
    sections: tuple[Section, ...] = field(default_factory=tuple)

    def figures(self) -> list[Figure]:
        """Every figure, in reading order."""
        blocks = [*self.intro, *(block for section in self.sections for block in section.blocks)]
        return [block for block in blocks if isinstance(block, Figure)]


def missing_links(report: Report, folder: str | Path) -> list[str]:
    """The figure paths of ``report`` that name no file under ``folder`` (the report's folder)."""
    return [figure.path for figure in report.figures() if not (Path(folder) / figure.path).is_file()]


def split_code_spans(text: str) -> list[tuple[str, bool]]:
    """``text`` cut at backticks into (piece, is_code) pairs; an unpaired backtick is kept as text."""
    pieces = text.split("`")
    if len(pieces) % 2 == 0:  # odd number of backticks: the last one opens nothing
        pieces[-2:] = [pieces[-2] + "`" + pieces[-1]]
    return [(piece, index % 2 == 1) for index, piece in enumerate(pieces) if piece]
