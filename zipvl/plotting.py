"""matplotlib, an optional dependency: only the plots need it (``pip install "zipvl[plot]"``).

``figure`` makes a matplotlib ``Figure`` with an Agg canvas of its own (no process-global
backend switch, style C5), importing matplotlib on first use (it is slow to import) and raising
an ``ImportError`` that names the extra when it is missing. ``available`` says whether it can
be imported, without importing it.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["EXTRA", "available", "figure", "missing_message"]

EXTRA = "plot"
"""The pip extra that installs matplotlib: ``pip install "zipvl[plot]"``."""


def missing_message(what: str) -> str:
    """The message for a plot that cannot be drawn because matplotlib is missing."""
    return (
        f"{what} needs matplotlib, which is not installed: "
        f'pip install "zipvl[{EXTRA}]" (or pip install matplotlib)'
    )


def available() -> bool:
    """Whether matplotlib can be imported (it is not imported here)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a broken or blocked entry in sys.modules
        return False


def figure(figsize: tuple[float, float], *, what: str) -> Figure:
    """A matplotlib ``Figure`` of ``figsize`` inches with an Agg canvas attached.

    Args:
        figsize: (width, height) in inches.
        what: the caller, named in the error (e.g. ``"CacheReport.plot"``).

    Raises:
        ImportError: matplotlib is not installed (the message names the ``plot`` extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(missing_message(what)) from err
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig
