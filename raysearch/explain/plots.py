"""Explain stage, pictures: a heatmap over the radiograph, and a contact sheet per study.

matplotlib's object API with the Agg canvas (no pyplot: no global figure state, no display
needed). Pictures are returned as PNG bytes, for the caller to write atomically.

Never imports ray.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

__all__ = ["contact_sheet", "overlay_png"]

MAX_SIDE = 512  # pixels of the longest side of a drawn image (a 1760 px film is shown smaller)


def _shrink(gray: np.ndarray, heat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays strided down so the longest side is at most :data:`MAX_SIDE` (display only)."""
    step = max(1, int(np.ceil(max(gray.shape) / MAX_SIDE)))
    return gray[::step, ::step], heat[::step, ::step]


def _draw(ax, gray: np.ndarray, heat: np.ndarray, title: str) -> None:
    gray, heat = _shrink(gray, heat)
    ax.imshow(gray, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    peak = float(heat.max())
    shown = heat / peak if peak > 0 else heat  # display scaling only; stored maps are raw
    ax.imshow(shown, cmap="jet", alpha=0.4 * (shown > 0.05), vmin=0, vmax=1,
              interpolation="bilinear")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight", pad_inches=0.05)
    return buf.getvalue()


def overlay_png(gray: np.ndarray, heat: np.ndarray, *, title: str = "") -> bytes:
    """One radiograph (uint8 ``[H, W]``) with a map (float ``[H, W]``, any scale) over it, as a
    PNG: the map in the jet colour map at 40 % opacity, hidden below 5 % of its peak."""
    from matplotlib.figure import Figure

    h, w = _shrink(gray, heat)[0].shape
    fig = Figure(figsize=(w / 100, h / 100 + (0.25 if title else 0)), dpi=100)
    _draw(fig.add_axes((0, 0, 1, 1)), gray, heat, title)
    return _png(fig)


def contact_sheet(rows: Sequence[tuple[np.ndarray, Sequence[tuple[str, np.ndarray]]]], *,
                  title: str = "") -> bytes:
    """A study on one page: one row per image (its uint8 picture and ``(name, map)`` panels, e.g.
    each member then the ensemble), as a PNG."""
    from matplotlib.figure import Figure

    cols = 1 + max(len(panels) for _, panels in rows)
    fig = Figure(figsize=(2.2 * cols, 2.3 * len(rows) + 0.3), dpi=100)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (gray, panels) in enumerate(rows):
        _draw(axes[r][0], gray, np.zeros_like(gray, dtype=np.float32), "image")
        for c, (name, heat) in enumerate(panels, start=1):
            _draw(axes[r][c], gray, heat, name)
        for c in range(len(panels) + 1, cols):
            axes[r][c].set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    return _png(fig)
