"""ZipVL's per-layer prefill plan: score -> allocate -> select (arXiv 2410.08584 v1, Alg. 1).

Algorithm 1 order: probe attention A' -> Eq. 6 (the budget p from the raw mass) -> Eq. 7
(normalized scores) -> Eqs. 8/9 (T = top-p by normalized score, U = the rest). The components are
swappable; the defaults are ZipVL's (5 % + 5 % probes, tau = 0.975, per-KV-head top-p keeping the
last token).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from zipvl.sparsity.allocators import CumulativeMassAllocator
from zipvl.sparsity.scorers import ProbeScorer
from zipvl.sparsity.selectors import TopKSelector
from zipvl.types import Allocator, Scorer, Scores, Selection, Selector

__all__ = ["TokenPlan", "plan_tokens", "select_tokens"]

_DEFAULT_SCORER = ProbeScorer()
_DEFAULT_ALLOCATOR = CumulativeMassAllocator(0.975)
_DEFAULT_SELECTOR = TopKSelector()


@dataclass(frozen=True)
class TokenPlan:
    """Everything one layer's plan step produced.

    Attributes:
        scores: ``Scores`` (mass, normalized), each (B, Hkv, Skv) float32.
        budget: (B, Hkv) int32, the allocator's output.
        selection: ``Selection``, keep (B, Hkv, Skv) bool and ``num_kept``.
    """

    scores: Scores
    budget: Tensor
    selection: Selection


def plan_tokens(
    q: Tensor,
    k: Tensor,
    *,
    scorer: Scorer = _DEFAULT_SCORER,
    allocator: Allocator = _DEFAULT_ALLOCATOR,
    selector: Selector = _DEFAULT_SELECTOR,
    layer_idx: int | None = None,
) -> TokenPlan:
    """Score, allocate and select, returning the intermediate results too.

    Args:
        q: (B, Hq, Sq, D) queries with RoPE applied (the last Sq positions).
        k: (B, Hkv, Skv, D) keys with RoPE applied.
        scorer: (q, k) -> Scores. Default ``ProbeScorer()``.
        allocator: Scores.mass -> budget. Default ``CumulativeMassAllocator(0.975)``.
        selector: (Scores.normalized, budget) -> Selection. Default ``TopKSelector()``.
        layer_idx: passed to the allocator (required by ``PerLayerSchedule``).

    Returns:
        ``TokenPlan``. The only host sync is the selector reading the budget back once.
    """
    scores = scorer(q, k)
    budget = allocator(scores.mass, layer_idx=layer_idx)
    selection = selector(scores.normalized, budget)
    return TokenPlan(scores=scores, budget=budget, selection=selection)


def select_tokens(
    q: Tensor,
    k: Tensor,
    *,
    scorer: Scorer = _DEFAULT_SCORER,
    allocator: Allocator = _DEFAULT_ALLOCATOR,
    selector: Selector = _DEFAULT_SELECTOR,
    layer_idx: int | None = None,
) -> Selection:
    """Which tokens of one layer are important (ZipVL defaults). See ``plan_tokens``.

    Args:
        q: (B, Hq, Sq, D) queries with RoPE applied.
        k: (B, Hkv, Skv, D) keys with RoPE applied.
        scorer: importance scorer.
        allocator: ratio allocator.
        selector: token selector.
        layer_idx: passed to the allocator.

    Returns:
        ``Selection`` with keep (B, Hkv, Skv) bool.
    """
    plan = plan_tokens(
        q, k, scorer=scorer, allocator=allocator, selector=selector, layer_idx=layer_idx
    )
    return plan.selection
