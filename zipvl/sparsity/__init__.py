"""The prefill side of ZipVL: score -> allocate -> select -> mask -> attend.

Each stage is a small frozen-dataclass component (see ``zipvl.types`` for the protocols):

* scorers -> ``Scores`` (mass, normalized), (B, Hkv, Skv) float32, higher = keep;
* allocators: mass -> budget (B, Hkv) int32 (ZipVL's Eq. 6 is ``CumulativeMassAllocator``);
* selectors: normalized scores + budget -> ``Selection`` (keep (B, Hkv, Skv) bool);
* block masks and ``sparse_attention``: token-level sparse prefill attention.

``select_tokens`` / ``plan_tokens`` compose the first three with ZipVL's defaults; ``plan_scores``
and ``plan_row_keep`` run allocate -> select on scores computed elsewhere (the cache's decode
blocks). ``mass_reduce`` (e.g. ``AllReduceMass(group)``) sums the mass over processes that hold
different KV heads, so that every process allocates the same budget.
"""

from __future__ import annotations

from zipvl.sparsity.allocators import (
    CumulativeMassAllocator,
    FixedRatioAllocator,
    PerLayerSchedule,
    host_budget,
)
from zipvl.sparsity.attention import compiled_flex_attention, sparse_attention
from zipvl.sparsity.block_mask import (
    compacted_causal_block_mask,
    compacted_prefix_block_mask,
    selection_block_mask,
)
from zipvl.sparsity.masks import (
    causal_mask_mod,
    compacted_causal_mask_mod,
    prefix_count_mask_mod,
    selection_mask_mod,
)
from zipvl.sparsity.pipeline import (
    AllReduceMass,
    RowKeep,
    TokenPlan,
    plan_keep,
    plan_row_keep,
    plan_scores,
    plan_tokens,
    select_tokens,
)
from zipvl.sparsity.plan_graph import PlanGraph
from zipvl.sparsity.scorers import (
    AccumulatedAttentionScorer,
    KeyNormScorer,
    ProbeScorer,
    SnapKVScorer,
    probe_positions,
)
from zipvl.sparsity.selectors import TopKSelector
from zipvl.types import Scores, Selection

__all__ = [
    "AccumulatedAttentionScorer",
    "AllReduceMass",
    "CumulativeMassAllocator",
    "FixedRatioAllocator",
    "KeyNormScorer",
    "PerLayerSchedule",
    "PlanGraph",
    "ProbeScorer",
    "RowKeep",
    "Scores",
    "Selection",
    "SnapKVScorer",
    "TokenPlan",
    "TopKSelector",
    "causal_mask_mod",
    "compacted_causal_block_mask",
    "compacted_causal_mask_mod",
    "compacted_prefix_block_mask",
    "compiled_flex_attention",
    "host_budget",
    "plan_keep",
    "plan_row_keep",
    "plan_scores",
    "plan_tokens",
    "prefix_count_mask_mod",
    "probe_positions",
    "select_tokens",
    "selection_block_mask",
    "selection_mask_mod",
    "sparse_attention",
]
