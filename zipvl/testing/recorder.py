"""A stand-in for ``zipvl.models.captured.CUDARecorder`` on the CPU (tests, smoke runs).

A CUDA graph's replay writes its results into the tensors the recording returned. The stand-in
does the same by running the recorded step again and copying every tensor of the new result
into the matching tensor of the recorded one, so a ``GraphDecoder`` driven by it keeps reading
the recorded (static) tensors, as it does with real graphs. It runs the step's Python again on
each replay, so values a real graph would freeze at record time are not caught by it: the GPU
tests replay real graphs for that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["ReRunRecorder"]


def _copy_into(old: Any, new: Any) -> None:
    if isinstance(old, torch.Tensor):
        old.copy_(new)
    elif isinstance(old, Mapping):
        for key, value in old.items():
            _copy_into(value, new[key])
    elif isinstance(old, (list, tuple)):
        for a, b in zip(old, new, strict=True):
            _copy_into(a, b)


class ReRunRecorder:
    """``record`` runs the step (its effect is the first replay's, as a captured graph's first
    replay would be); each later ``replay`` runs it again into the recorded outputs."""

    def __init__(self) -> None:
        self.fn: Callable[[], Any] | None = None
        self.out: Any = None
        self.fresh = False
        self.records = 0

    def eager(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def record(self, fn: Callable[[], Any]) -> Any:
        self.fn, self.fresh = fn, True
        self.out = fn()
        self.records += 1
        return self.out

    def replay(self) -> None:
        if self.fn is None:
            raise RuntimeError("replay: nothing recorded")
        if self.fresh:
            self.fresh = False
            return
        _copy_into(self.out, self.fn())
