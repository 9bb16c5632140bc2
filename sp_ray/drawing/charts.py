"""Charts for reports, drawn with matplotlib's Agg backend (no display needed): line panels and bars."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DPI = 110


@dataclass(frozen=True)
class Line:
    """One curve: y against x; ``dashed`` for a series of another kind (e.g. another model family).

    ``marker`` draws a dot at each point (off for dense curves such as precision-recall); ``width`` and
    ``color`` default to matplotlib's; an empty ``label`` keeps the line out of the legend.
    """

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    dashed: bool = False
    marker: bool = True
    width: float | None = None
    color: str | None = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"line {self.label!r}: {len(self.x)} x values and {len(self.y)} y values")


@dataclass(frozen=True)
class Panel:
    title: str
    lines: tuple[Line, ...]
    ylabel: str
    xlabel: str = "epoch"
    log_y: bool = False
    limits: tuple[tuple[float, float], tuple[float, float]] | None = None  # ((x0, x1), (y0, y1))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, path)
    return path


def plot_panels(panels: Sequence[Panel], path: str | Path, *, title: str | None = None) -> Path:
    """Line panels side by side, one legend per panel; a line with a single point is drawn as a marker.

    Args:
        panels: the panels, left to right.
        path: PNG to write (parent folders are created).
        title: figure title.

    Returns:
        ``path``.
    """
    if not panels:
        raise ValueError("plot_panels needs at least one panel")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.5), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for line in panel.lines:
            ax.plot(line.x, line.y, linestyle="--" if line.dashed else "-", marker="o" if line.marker else None,
                    markersize=3, linewidth=line.width, color=line.color, label=line.label or "_nolegend_")
        if panel.log_y:
            ax.set_yscale("log")
        if panel.limits is not None:
            ax.set_xlim(*panel.limits[0])
            ax.set_ylim(*panel.limits[1])
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if any(line.label for line in panel.lines):
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


@dataclass(frozen=True)
class Bar:
    """One bar: ``value`` with an optional lower whisker at ``low`` (e.g. median and p95 rates)."""

    label: str
    value: float
    low: float | None = None


def plot_bars(bars: Sequence[Bar], path: str | Path, *, xlabel: str, title: str | None = None) -> Path:
    """Horizontal bars, labelled with their values; whiskers from each ``low`` to its value.

    Args:
        bars: the bars, top to bottom.
        path: PNG to write (parent folders are created).
        xlabel: the value axis' label.
        title: chart title.

    Returns:
        ``path``.
    """
    if not bars:
        raise ValueError("plot_bars needs at least one bar")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 0.6 * len(bars) + 1.4))
    positions = list(range(len(bars)))[::-1]
    values = [bar.value for bar in bars]
    lows = [bar.value - bar.low if bar.low is not None else 0.0 for bar in bars]
    drawn = ax.barh(positions, values, xerr=[lows, [0.0] * len(bars)], capsize=4,
                    color=[f"C{i}" for i in range(len(bars))])
    ax.bar_label(drawn, fmt="%.1f", padding=4, fontsize=9)
    ax.set_yticks(positions, [bar.label for bar in bars])
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, max(values) * 1.25 if max(values) > 0 else 1.0)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


@dataclass(frozen=True)
class Point:
    """One labelled point of a scatter chart (e.g. a model format: its speed and its accuracy)."""

    label: str
    x: float
    y: float


def plot_points(points: Sequence[Point], path: str | Path, *, xlabel: str, ylabel: str,
                title: str | None = None) -> Path:
    """A scatter of labelled points, each in its own colour, the label written beside it.

    Args:
        points: the points (at least one).
        path: PNG to write (parent folders are created).
        xlabel, ylabel: the axes' labels.
        title: chart title.

    Returns:
        ``path``.
    """
    if not points:
        raise ValueError("plot_points needs at least one point")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    # Labels alternate above and below in order of x, so that two points side by side keep both readable;
    # the legend names every point even where labels still touch.
    rank = {i: r for r, i in enumerate(sorted(range(len(points)), key=lambda i: (points[i].x, points[i].y)))}
    for i, point in enumerate(points):
        ax.scatter([point.x], [point.y], s=48, color=f"C{i}", zorder=3, label=point.label)
        ax.annotate(point.label, (point.x, point.y), xytext=(6, 5 if rank[i] % 2 == 0 else -13),
                    textcoords="offset points", fontsize=9)
    xs, ys = [p.x for p in points], [p.y for p in points]
    # Room for the labels right of the points, and 0 in view so that ratios read off the axes.
    ax.set_xlim(0, max(xs) * 1.3 if max(xs) > 0 else 1.0)
    ax.set_ylim(min(0.0, min(ys)), max(ys) * 1.15 if max(ys) > 0 else 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
