"""PNG figures the commands write with ``--plot``: captioned image sheets (``mm caption``) and query + top-k
rows (``mm search``). Training curves and the MoE routing heatmap are :func:`mm.train.log.plot_run`'s.

Figures are built with matplotlib's object API (``Figure``), never pyplot: no backend is selected or
changed, so these work on headless machines and leave a notebook's inline backend alone.
"""
from __future__ import annotations

import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# A cell of a sheet: (PIL image or None, text). None with text: a text panel (a text query, a text result).
Cell = tuple[Any, str]


def _draw(ax: Any, cell: Cell | None, wrap: int, bold: bool = False) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if cell is None:
        ax.set_axis_off()
        return
    image, text = cell
    text = "".join(ch for ch in text if ch.isprintable() or ch == "\n")  # an untrained decoder emits anything
    text = "\n".join(textwrap.fill(line, wrap) for line in text.splitlines())
    weight = "bold" if bold else "normal"
    if image is None:  # a text panel: the text in the middle of a framed box
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, wrap=True, weight=weight,
                transform=ax.transAxes)
        return
    ax.imshow(image, interpolation="nearest" if max(image.size) < 128 else "antialiased")
    ax.set_title(text, fontsize=8, weight=weight, loc="center")
    for spine in ax.spines.values():
        spine.set_visible(bold)  # a frame marks the query


def image_sheet(grid: Sequence[Sequence[Cell | None]], path: str | Path, title: str | None = None,
                first_column_bold: bool = False, cell_inches: float = 2.2, wrap: int = 26) -> Path:
    """Write a PNG of ``grid`` (rows of cells; ``None`` = empty) to ``path``; returns the path."""
    from matplotlib.figure import Figure

    rows, cols = len(grid), max((len(r) for r in grid), default=1)
    lines = max((len(textwrap.fill(c[1], wrap).splitlines()) for r in grid for c in r if c and c[0] is not None),
                default=1)
    fig = Figure(figsize=(cell_inches * cols, (cell_inches + 0.16 * lines) * rows + (0.4 if title else 0)), dpi=100,
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            cell = grid[r][c] if c < len(grid[r]) else None
            _draw(axes[r][c], cell, wrap, bold=first_column_bold and c == 0)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # a glyph the font lacks (emoji in a caption) is drawn as a box: fine
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path)
    return path


def caption_sheet(items: Sequence[tuple[Any, str]], path: str | Path, columns: int = 4,
                  title: str | None = None) -> Path:
    """Images with their captions (``[(PIL image, caption)]``), ``columns`` per row."""
    items = list(items)
    grid = [items[i:i + columns] for i in range(0, len(items), columns)] or [[]]
    return image_sheet(grid, path, title=title)


def search_sheet(rows: Sequence[tuple[Cell, Sequence[Cell]]], path: str | Path, title: str | None = None) -> Path:
    """One row per query: the query cell (framed) then its results, best first."""
    return image_sheet([[query, *results] for query, results in rows], path, title=title, first_column_bold=True)
