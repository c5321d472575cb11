"""Matplotlib on the Agg backend (no display needed), and atomic PNG writes.

Every figure of the package is drawn with ``plt`` from here and saved with ``save_figure``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

from sae_darkmatter._io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plt", "save_figure"]


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG through a temp file, then close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path
