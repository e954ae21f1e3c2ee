"""A CPU-side count of device-to-host reads, for tests of how often a step syncs."""

from __future__ import annotations

import pytest
import torch


class HostReads:
    """Counts Python-level device-to-host reads (tolist, item, int, float, bool of a tensor)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in ("tolist", "item", "__int__", "__float__", "__bool__"):
            original = getattr(torch.Tensor, name)

            def counted(t: torch.Tensor, *args: object, _f=original) -> object:
                self.count += 1
                return _f(t, *args)

            monkeypatch.setattr(torch.Tensor, name, counted)
