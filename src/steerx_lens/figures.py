"""Figures without pyplot: every plot is drawn on its own :class:`matplotlib.figure.Figure`.

Drawing on a ``Figure`` (not ``pyplot``) leaves the user's matplotlib backend and pyplot state
alone (no ``matplotlib.use``), works headless, and needs no ``plt.close``. PNGs are written
atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from steerx_lens.atomic import write_bytes
from steerx_lens.extras import require


def new_figure(width: float, height: float) -> Any:
    """A fresh ``Figure`` of ``width`` x ``height`` inches, not registered with pyplot."""
    figure_module = require("matplotlib.figure", "plotting")
    return figure_module.Figure(figsize=(width, height))


def save_png(figure: Any, path: str | Path, dpi: int = 110) -> Path:
    """Render ``figure`` as PNG and write it to ``path`` atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return write_bytes(path, buffer.getvalue())
