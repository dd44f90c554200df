"""PNG figures the commands write with ``--plot``: captioned image sheets (``mm caption``), query + top-k
rows (``mm search``) and images with boxes (``mm ground``, ``mm caption --box``). Training curves and the MoE routing heatmap are :func:`mm.train.log.plot_run`'s.

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
# Boxes drawn on a cell's image: ((x0, y0, x1, y1) in its pixels, label or "")
Boxes = Sequence[tuple[Sequence[float], str]]
BOX_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4")


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


def _draw_boxes(ax: Any, boxes: Boxes) -> None:
    """Rectangles (and their labels, above them) on ``ax``'s image, in the image's pixel coordinates."""
    from matplotlib.patches import Rectangle

    for i, (box, label) in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) for v in box)
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        # imshow puts pixel centres on integers: the image's edges (and box coordinates) are at -0.5
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2))
        if label:
            ax.text(x0 - 0.5, y0 - 0.5, label, color="white", fontsize=7, va="bottom", ha="left", clip_on=True,
                    bbox={"facecolor": colour, "edgecolor": "none", "pad": 1, "alpha": 0.8})


def image_sheet(grid: Sequence[Sequence[Cell | None]], path: str | Path, title: str | None = None,
                first_column_bold: bool = False, cell_inches: float = 2.2, wrap: int = 26,
                boxes: Sequence[Sequence[Boxes]] | None = None) -> Path:
    """Write a PNG of ``grid`` (rows of cells; ``None`` = empty) to ``path``; returns the path. ``boxes``: per
    row, per cell, the boxes drawn on its image."""
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
            if boxes is not None and cell is not None and cell[0] is not None and c < len(boxes[r]):
                _draw_boxes(axes[r][c], boxes[r][c])
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


def box_sheet(items: Sequence[tuple[Any, Boxes, str]], path: str | Path, columns: int = 4,
              title: str | None = None) -> Path:
    """Images with boxes drawn on them and a caption each (``[(PIL image, [(box, label)], caption)]``), ``columns``
    per row; boxes in the image's pixels."""
    items = list(items)
    rows = [items[i:i + columns] for i in range(0, len(items), columns)] or [[]]
    grid = [[(image, text) for image, _, text in row] for row in rows]
    return image_sheet(grid, path, title=title, boxes=[[list(b) for _, b, _ in row] for row in rows])
