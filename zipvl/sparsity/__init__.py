"""The prefill side of ZipVL: score -> allocate -> select -> mask -> attend.

Each stage is a small frozen-dataclass component (see ``zipvl.types`` for the protocols):

* scorers (``Scores.mass`` / ``Scores.normalized``, (B, Hkv, Skv) float32, higher = keep);
* allocators (mass -> budget (B, Hkv) int32; ZipVL's Eq. 6 is ``CumulativeMassAllocator``);
* selectors (normalized scores + budget -> ``Selection``);
* block masks and ``sparse_attention`` (token-level sparse prefill attention).
"""

from __future__ import annotations

from zipvl.sparsity.allocators import (
    CumulativeMassAllocator,
    FixedRatioAllocator,
    PerLayerSchedule,
)
from zipvl.sparsity.selectors import TopKSelector
from zipvl.types import Scores, Selection

__all__ = [
    "CumulativeMassAllocator",
    "FixedRatioAllocator",
    "PerLayerSchedule",
    "Scores",
    "Selection",
    "TopKSelector",
]
