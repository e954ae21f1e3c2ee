"""Whether a decode step is being recorded for replay (``zipvl.models.captured``).

While a ``GraphDecoder`` records a model's decode step (a CUDA-graph capture, or the stand-in
recorder of the CPU tests), the paged cache works in two halves: the device half of every
append (``PagedKVStore.append_device``: no host counter read) runs inside the step, and the
host half (``advance``) and the decode-block recompression run on the host after every replay.
This flag is how the cache and the attention function know which half they are in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["graph_step", "recorded_step"]

_RECORDING: ContextVar[bool] = ContextVar("zipvl_graph_step", default=False)


def graph_step() -> bool:
    """True while a decode step is being recorded (or replayed by the stand-in recorder)."""
    return _RECORDING.get()


@contextlib.contextmanager
def recorded_step() -> Iterator[None]:
    """Mark the enclosed forward as a recorded decode step."""
    token = _RECORDING.set(True)
    try:
        yield
    finally:
        _RECORDING.reset(token)
