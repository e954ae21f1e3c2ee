"""A CPU-side count of device-to-host reads, for tests of how often a step syncs.

On a GPU each of these waits for the device: reading a value (``item``, ``tolist``, ``int`` /
``float`` / ``bool`` / ``operator.index`` of a tensor), copying to the host (``cpu``,
``numpy``, ``to("cpu")``) and ops whose output shape depends on the data (``nonzero``). On the
CPU nothing waits, so the calls are counted instead: a test that runs on the CPU still fails
when a second read is added to a path.
"""

from __future__ import annotations

import traceback

import pytest
import torch

_READS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy")
_SHAPE_SYNCS = ("nonzero",)


def _to_host(args: tuple[object, ...], kwargs: dict[str, object]) -> bool:
    targets = [a for a in args if isinstance(a, (str, torch.device))]
    if "device" in kwargs:
        targets.append(kwargs["device"])  # type: ignore[arg-type]
    return any(torch.device(t).type == "cpu" for t in targets)  # type: ignore[arg-type]


class HostReads:
    """Counts device-to-host reads made through ``torch.Tensor`` methods; ``where`` lists the
    calling line of each (for assertion messages)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.where: list[str] = []
        for name in (*_READS, *_SHAPE_SYNCS, "to"):
            original = getattr(torch.Tensor, name)

            def counted(
                t: torch.Tensor, *args: object, _f=original, _n=name, **kwargs: object
            ) -> object:
                if _n != "to" or _to_host(args, kwargs):
                    self.count += 1
                    caller = traceback.extract_stack(limit=2)[0]
                    self.where.append(f"{_n} at {caller.filename}:{caller.lineno}")
                return _f(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        original_nonzero = torch.nonzero

        def nonzero(*args: object, **kwargs: object) -> object:
            self.count += 1
            self.where.append("torch.nonzero")
            return original_nonzero(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(torch, "nonzero", nonzero)

    def reset(self) -> None:
        self.count = 0
        self.where.clear()
