"""ZipVL's per-layer plan: score -> allocate -> select (arXiv 2410.08584 v1, Alg. 1).

Algorithm 1 order: probe attention A' -> Eq. 6 (the budget p from the raw mass) -> Eq. 7
(normalized scores) -> Eqs. 8/9 (T = top-p by normalized score, U = the rest). The components are
swappable; the defaults are ZipVL's (5 % + 5 % probes, tau = 0.975, per-KV-head top-p keeping the
last token).

This module is the one place where a budget is allocated and tokens are selected:

* ``plan_tokens`` (prefill) scores q against k and then runs ``plan_scores``;
* ``plan_scores`` allocates and selects on scores computed elsewhere (the decode blocks of the
  chunked cache, scored by ``zipvl.cache.scoring``); one budget for the whole batch, one host
  read (the selector's);
* ``plan_row_keep`` allocates every batch row on its own and builds the keep mask without any
  host read (the decode blocks of the paged cache, scored from the decode kernel's LSE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from zipvl.checks import check_tensor
from zipvl.impl import PLAN_IMPLS, Impl, parse_impl
from zipvl.sparsity.allocators import CumulativeMassAllocator, host_budget
from zipvl.sparsity.scorers import ProbeScorer
from zipvl.sparsity.selectors import TopKSelector
from zipvl.types import (
    Allocator,
    MassReduce,
    Scorer,
    Scores,
    Selection,
    Selector,
    equalize_keep_counts,
    keep_with_positions,
)

__all__ = [
    "AllReduceMass",
    "RowKeep",
    "TokenPlan",
    "padded_spans",
    "plan_keep",
    "plan_row_keep",
    "plan_scores",
    "plan_tokens",
    "row_spans",
    "select_tokens",
]

_DEFAULT_SCORER = ProbeScorer()
_DEFAULT_ALLOCATOR = CumulativeMassAllocator(0.975)
_DEFAULT_SELECTOR = TopKSelector()


@dataclass(frozen=True)
class TokenPlan:
    """Everything one layer's plan step produced.

    Attributes:
        scores: ``Scores`` (mass, normalized), each (B, Hkv, Skv) float32 (0 on padding).
        budget: (B, Hkv) int32, the allocator's output (each row's own with padding).
        selection: ``Selection``, keep (B, Hkv, Skv) bool and ``num_kept`` (equal counts).
        row_keep: with padding, the selection of every row without the top-up (padding False);
            None without padding.
        row_kept: with padding, every row's own kept count (host ints); None without.
    """

    scores: Scores
    budget: Tensor
    selection: Selection
    row_keep: Tensor | None = None
    row_kept: tuple[int, ...] | None = None


def row_spans(key_valid: Tensor) -> list[tuple[int, int]]:
    """The [start, end) run of real tokens of every row (one host read).

    Args:
        key_valid: (B, S) bool, True = real token.

    Returns:
        One (start, end) per row.

    Raises:
        ValueError: a row has no real token or its real tokens are not contiguous.
    """
    check_tensor("key_valid", key_valid, ndim=2, dtype=torch.bool)
    host = key_valid.detach().to("cpu")
    spans = []
    for b in range(host.shape[0]):
        idx = host[b].nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError(f"key_valid: row {b} has no real token")
        start, end = int(idx[0]), int(idx[-1]) + 1
        if end - start != idx.numel():
            raise ValueError(
                f"key_valid: expected one contiguous run of real tokens per row (left or right "
                f"padding), row {b} has {idx.numel()} real tokens spread over [{start}, {end})"
            )
        spans.append((start, end))
    return spans


def padded_spans(key_valid: Tensor, batch: int, length: int) -> list[tuple[int, int]] | None:
    """Check a (B, S) padding mask and return its row spans, or None when no row is padded.

    Raises:
        ValueError: the wrong shape or dtype, or padding inside a row (see ``row_spans``).
    """
    check_tensor("key_valid", key_valid, ndim=2, dtype=torch.bool)
    if tuple(key_valid.shape) != (batch, length):
        raise ValueError(
            f"key_valid: expected shape (B, S) = {(batch, length)}, got {tuple(key_valid.shape)}"
        )
    spans = row_spans(key_valid)
    return None if all(span == (0, length) for span in spans) else spans


def _topped_up_keep(sels: list[Selection], spans: list[tuple[int, int]], s: int) -> Tensor:
    """Full-length keep (B, Hkv, S) with equal row counts: each row's selection placed on its
    span, short rows topped up with padding positions, then (if padding runs out) with their
    latest unkept real tokens."""
    target = max(sel.num_kept for sel in sels)
    rows = []
    for sel, (start, end) in zip(sels, spans, strict=True):
        keep = torch.zeros(1, sel.keep.shape[1], s, dtype=torch.bool, device=sel.keep.device)
        keep[:, :, start:end] = sel.keep
        missing = target - sel.num_kept
        if missing:
            pads = [p for p in range(s) if p < start or p >= end][:missing]
            keep[:, :, pads] = True
        rows.append(keep)
    # rows still short of the target (padding ran out) promote their latest unkept real tokens
    return equalize_keep_counts(torch.cat(rows, dim=0))  # (B, Hkv, S)


def plan_tokens(
    q: Tensor,
    k: Tensor,
    *,
    scorer: Scorer = _DEFAULT_SCORER,
    allocator: Allocator = _DEFAULT_ALLOCATOR,
    selector: Selector = _DEFAULT_SELECTOR,
    layer_idx: int | None = None,
    key_valid: Tensor | None = None,
    mass_reduce: MassReduce | None = None,
    impl: Impl | str = Impl.AUTO,
) -> TokenPlan:
    """Score, allocate and select, returning the intermediate results too.

    Padding (``key_valid``): every row is scored, budgeted and selected on its own real tokens
    (one contiguous run: left or right padding), exactly as if it ran alone. ``selection`` then
    keeps the same count in every row (short rows are topped up with padding positions, which
    ``sparse_attention(key_valid=...)`` never attends to); ``row_keep`` is the selection without
    the top-up (padding False) and ``row_kept`` each row's own count.

    Args:
        q: (B, Hq, Sq, D) queries with RoPE applied (the last Sq positions).
        k: (B, Hkv, Skv, D) keys with RoPE applied.
        scorer: (q, k) -> Scores. Default ``ProbeScorer()``.
        allocator: Scores.mass -> budget. Default ``CumulativeMassAllocator(0.975)``.
        selector: (Scores.normalized, budget) -> Selection. Default ``TopKSelector()``.
        layer_idx: passed to the allocator (required by ``PerLayerSchedule``).
        key_valid: optional (B, Skv) bool, True = real token (Sq = Skv: prefill).
        mass_reduce: optional cross-process sum of the head-summed mass, for heads split over
            processes (tensor parallelism); see ``plan_scores``. Called once per call of
            ``plan_tokens``, with or without padding.
        impl: ``"torch"`` runs the components eagerly; ``"graph"`` replays the whole plan from
            a CUDA graph captured per input shape (``zipvl.sparsity.plan_graph.PlanGraph``: the
            same plan, one host read or none, the kept positions computed in the graph);
            ``"auto"``
            (default) replays when ``graph_plan_problem`` finds nothing against it (eager CUDA
            inputs, no padding, no ``mass_reduce``, at most ``GRAPH_MAX_TOKENS`` tokens, a
            ``ProbeScorer`` / ``CumulativeMassAllocator`` or ``FixedRatioAllocator`` /
            ``TopKSelector``). A shape is captured the second time it is planned.

    Returns:
        ``TokenPlan``. The only host sync is the selector reading the budget back once (with
        padding: once per row, plus the read of the row spans). Without padding and
        ``mass_reduce``, a budget known on the host (``host_budget``: a fixed ratio) with
        ``TopKSelector`` reads nothing: the same selection, whose NaN check of the scores
        stays on the device (``Selection.nan_flag``; ``sparse_attention`` then writes NaN
        instead of the plan raising).

    Raises:
        ValueError: ``key_valid`` of the wrong shape or with padding inside a row; ``impl``
            not in ``PLAN_IMPLS``, or ``"graph"`` where it cannot run (naming why).
    """
    impl = parse_impl("impl", impl, PLAN_IMPLS)
    if key_valid is not None:
        s = k.shape[-2]
        if q.shape[-2] != s:
            raise ValueError(
                f"key_valid: a padding mask plans a prefill (Sq = Skv = {s}), got Sq = "
                f"{q.shape[-2]}"
            )
        spans = padded_spans(key_valid, k.shape[0], s)
        if spans is not None:
            if impl is Impl.GRAPH:
                raise ValueError("impl: 'graph' cannot run: key_valid: padded rows are planned "
                                 "one by one (eagerly)")  # fmt: skip
            return _plan_rows(q, k, spans, scorer, allocator, selector, layer_idx, mass_reduce)
    if impl is not Impl.TORCH:
        from zipvl.sparsity.plan_graph import graph_plan_problem, graph_planner

        problem = graph_plan_problem(
            q, k, scorer, allocator, selector, padded=False, mass_reduce=mass_reduce,
            explicit=impl is Impl.GRAPH,
        )  # fmt: skip
        if problem is None:
            return graph_planner(scorer, allocator, selector)(q, k, layer_idx=layer_idx)
        if impl is Impl.GRAPH:
            raise ValueError(f"impl: 'graph' cannot run: {problem}")
    scores = scorer(q, k)
    if mass_reduce is None:
        known = _read_free_plan(scores, allocator, selector, layer_idx)
        if known is not None:
            return known
    return plan_scores(
        scores,
        allocator=allocator,
        selector=selector,
        layer_idx=layer_idx,
        mass_reduce=mass_reduce,
    )


def read_free_budget(
    allocator: Allocator, selector: Selector, skv: int, layer_idx: int | None
) -> int | None:
    """The budget when a plan of ``skv`` keys needs no host read, else None: the allocator's
    budget is known on the host (``host_budget``: a fixed ratio) and the selector is exactly
    ``TopKSelector``, whose rows keep ``kept_count(Skv, budget)`` tokens by construction. The
    one rule of the eager plan (``plan_tokens``) and the captured one (``PlanGraph``)."""
    if type(selector) is not TopKSelector:
        return None
    return host_budget(allocator, skv, layer_idx=layer_idx)


def _read_free_plan(
    scores: Scores, allocator: Allocator, selector: Selector, layer_idx: int | None
) -> TokenPlan | None:
    """``plan_scores`` without its host read where ``read_free_budget`` allows it: the same
    plan, with the NaN check of the scores left on the device (``Selection.attach_nan_flag``).
    None otherwise."""
    known = read_free_budget(allocator, selector, scores.normalized.shape[-1], layer_idx)
    if known is None:
        return None
    assert isinstance(selector, TopKSelector)
    budget = _budget(scores.mass, allocator, layer_idx, _num_heads(scores.mass))  # (B, Hkv)
    sel = selector.select_k(scores.normalized, known)
    sel.attach_nan_flag(scores.normalized.isnan().any())
    return TokenPlan(scores=scores, budget=budget, selection=sel)


def plan_scores(
    scores: Scores,
    *,
    allocator: Allocator = _DEFAULT_ALLOCATOR,
    selector: Selector = _DEFAULT_SELECTOR,
    layer_idx: int | None = None,
    mass_reduce: MassReduce | None = None,
) -> TokenPlan:
    """Allocate and select on scores computed elsewhere: the step ``plan_tokens`` runs after its
    scorer, and what the chunked cache runs on every decode block.

    One budget for the whole batch (the allocator sees ``scores.mass`` as it is), then the
    selector on ``scores.normalized``.

    Heads split over processes (``mass_reduce``): the allocator must see the mass of ALL KV
    heads, but this process holds only some of them. Instead of ``scores.mass`` the allocator
    then gets ``mass_reduce(scores.mass.sum(dim=1, keepdim=True))``, (B, 1, Skv): the mass
    summed over the local heads and then over the processes (one all-reduce of B * Skv floats
    per plan), and its (B, 1) budget is broadcast to the local (B, Hkv). For an allocator that
    sums over heads (``CumulativeMassAllocator``) or reads only the shape (``FixedRatioAllocator``)
    that is the single-process budget of the whole model, on every process (up to the fp32
    rounding of the summation order); no head count is needed because no allocator averages
    over heads. The selection stays local: with ``granularity="kv_head"`` each process selects
    for its own heads exactly what a single process would (``"layer"`` sums the scores of the
    local heads only).

    Args:
        scores: ``Scores`` with mass and normalized (B, Hkv, Skv) float32.
        allocator: mass -> budget (B, Hkv). Default ``CumulativeMassAllocator(0.975)``.
        selector: (normalized, budget) -> Selection. Default ``TopKSelector()``.
        layer_idx: passed to the allocator.
        mass_reduce: ``MassReduce`` (B, 1, Skv) -> (B, 1, Skv) summing over processes, called
            exactly once; None: the heads are all here.

    Returns:
        ``TokenPlan`` (scores as given). One host read: the selector's.

    Raises:
        TypeError / ValueError: ``mass_reduce`` is not callable or returns the wrong shape, or
            the allocator gives a budget of the wrong shape for the head-summed mass.
    """
    mass = scores.mass
    if mass_reduce is not None:
        mass = _summed_over_processes(mass, mass_reduce)  # (B, 1, Skv)
    budget = _budget(mass, allocator, layer_idx, _num_heads(scores.mass))  # (B, Hkv)
    selection = selector(scores.normalized, budget)
    return TokenPlan(scores=scores, budget=budget, selection=selection)


def keep_mask_of(selector: Selector) -> Callable[[Tensor, Tensor], Tensor]:
    """The selector's fixed-shape ``keep_mask(scores, budget)``, which a plan without host
    reads needs.

    Raises:
        ValueError: the selector has none.
    """
    keep_mask = getattr(selector, "keep_mask", None)
    if not callable(keep_mask):
        raise ValueError(
            "selector: expected a selector with the fixed-shape keep_mask(scores, budget) "
            f"(TopKSelector has it), got {type(selector).__name__}"
        )
    return cast(Callable[[Tensor, Tensor], Tensor], keep_mask)


def plan_keep(
    scores: Scores,
    *,
    allocator: Allocator = _DEFAULT_ALLOCATOR,
    selector: Selector = _DEFAULT_SELECTOR,
    layer_idx: int | None = None,
    out: tuple[Tensor, Tensor] | None = None,
) -> RowKeep:
    """``plan_scores`` without its host read: one budget for the whole batch, on the device, and
    the selector's fixed-shape keep mask for it. What the captured plan
    (``zipvl.sparsity.plan_graph.PlanGraph``) runs inside its CUDA graph; it reads the budget's
    range afterwards, once, and applies ``plan_scores``'s checks.

    Args:
        scores: ``Scores`` with mass and normalized (B, Hkv, Skv) float32.
        allocator: mass -> budget (B, Hkv).
        selector: a selector with ``keep_mask(scores, budget)`` (``TopKSelector``).
        layer_idx: passed to the allocator.
        out: contiguous (keep (B, Hkv, Skv) bool, indices (B, Hkv, Skv) int64) to write into
            (the captured plan's output buffer); the indices are then always computed (by
            ``keep_and_indices``, or a running count of the keep mask).

    Returns:
        ``RowKeep`` (budget (B, Hkv) int32, keep (B, Hkv, Skv) bool, indices or None; ``out``'s
        tensors when given).

    Raises:
        ValueError: the selector has no ``keep_mask``.
    """
    keep_mask = keep_mask_of(selector)
    budget = _budget(scores.mass, allocator, layer_idx, _num_heads(scores.mass))  # (B, Hkv)
    both = getattr(selector, "keep_and_indices", None)
    if callable(both):  # TopKSelector: one launch on CUDA
        keep, idx = cast(tuple[Tensor, Tensor], both(scores.normalized, budget, out=out))
        return RowKeep(budget=budget, keep=keep, indices=idx)
    keep = keep_mask(scores.normalized, budget)  # (B, Hkv, Skv)
    if out is None:
        return RowKeep(budget=budget, keep=keep)
    keep, idx = keep_with_positions(keep, out)
    return RowKeep(budget=budget, keep=keep, indices=idx)


@dataclass(frozen=True)
class RowKeep:
    """What ``plan_row_keep`` produced (device tensors only: nothing was read back).

    Attributes:
        budget: (B, Hkv) int32, every batch row's own budget.
        keep: (B, Hkv, Skv) bool, the selector's keep mask for those budgets.
        indices: (B, Hkv, Skv) int64 or None: where the selector computed them with the mask
            (``plan_keep`` with ``TopKSelector.keep_and_indices``), each row's kept positions in
            ascending order at its first ``keep.sum(-1)`` slots (0 after).
    """

    budget: Tensor
    keep: Tensor
    indices: Tensor | None = None


def plan_row_keep(
    scores: Scores,
    *,
    allocator: Allocator = _DEFAULT_ALLOCATOR,
    selector: Selector = _DEFAULT_SELECTOR,
    layer_idx: int | None = None,
    mass_reduce: MassReduce | None = None,
) -> RowKeep:
    """Allocate every batch row on its own mass and build the keep mask, without a host read.

    What the paged cache runs on every decode block (rows are independent there: each keeps
    its own count). The allocator runs once per row on ``scores.mass[b : b + 1]``; the keep
    mask comes from the selector's ``keep_mask(normalized, budget)`` (fixed-shape, no host
    sync; ``TopKSelector`` has it) or, for a selector without one, from its ``Selection``
    (which may read back).

    Args:
        scores: ``Scores`` with mass and normalized (B, Hkv, Skv) float32.
        allocator: one row's mass (1, Hkv, Skv) -> budget (1, Hkv).
        selector: a ``Selector``, preferably with ``keep_mask``.
        layer_idx: passed to the allocator.
        mass_reduce: as in ``plan_scores``: called once for the whole batch, then every row
            is allocated on its slice of the reduced (B, 1, Skv) mass.

    Returns:
        ``RowKeep`` (budget (B, Hkv) int32, keep (B, Hkv, Skv) bool).
    """
    mass = scores.mass
    hkv = _num_heads(mass)
    if mass_reduce is not None:
        mass = _summed_over_processes(mass, mass_reduce)  # (B, 1, Skv)
    budget = torch.cat(
        [_budget(mass[i : i + 1], allocator, layer_idx, hkv) for i in range(mass.shape[0])]
    )  # (B, Hkv): every row on its own mass
    keep_mask = getattr(selector, "keep_mask", None)
    if keep_mask is not None:
        keep = keep_mask(scores.normalized, budget)  # (B, Hkv, Skv)
    else:  # a custom selector: its Selection (it may read back)
        keep = selector(scores.normalized, budget).keep
    return RowKeep(budget=budget, keep=keep)


@dataclass(frozen=True)
class AllReduceMass:
    """A ``MassReduce`` over a ``torch.distributed`` process group: all-reduce SUM.

    Pass it as ``mass_reduce`` when the KV heads of a layer are split over the ranks of
    ``group`` (tensor parallelism), so that every rank allocates the same budget. One
    collective per layer plan (per decode block on the cache).

    Attributes:
        group: the process group (None: the default group).
    """

    group: Any = None

    def __call__(self, mass: Tensor, /) -> Tensor:
        """(B, 1, Skv) local head-summed mass -> the same summed over the group's ranks."""
        import torch.distributed as dist

        total = mass.clone()  # the caller's tensor is left as it was
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    @property
    def world_size(self) -> int:
        """Ranks in ``group`` (the processes the KV heads are split over)."""
        import torch.distributed as dist

        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        """This process's rank within ``group``."""
        import torch.distributed as dist

        return dist.get_rank(self.group)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order: one ``all_gather_object`` over
        ``group``, a collective that every rank must call (``ZipVLCache.report`` gathers its
        small per-rank figures with it)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def _num_heads(mass: object) -> int:
    return check_tensor("Scores.mass", mass, ndim=3, floating=True).shape[1]


def _summed_over_processes(mass: Tensor, mass_reduce: MassReduce) -> Tensor:
    """The one call of ``mass_reduce`` in the package: (B, Hkv, Skv) local mass -> (B, 1, Skv)
    mass summed over the KV heads of every process."""
    if not callable(mass_reduce):
        raise TypeError(
            "mass_reduce: expected a callable (B, 1, Skv) -> (B, 1, Skv) that sums over "
            f"processes, or None, got {type(mass_reduce).__name__}"
        )
    local = mass.float().sum(dim=1, keepdim=True)  # (B, 1, Skv)
    total = mass_reduce(local)
    if (
        not isinstance(total, Tensor)
        or tuple(total.shape) != tuple(local.shape)
        or not total.is_floating_point()
    ):
        got = (
            f"{tuple(total.shape)} {total.dtype}"
            if isinstance(total, Tensor)
            else type(total).__name__
        )
        raise ValueError(
            f"mass_reduce: expected it to return a float tensor of shape (B, 1, Skv) = "
            f"{tuple(local.shape)} (its input summed over processes), got {got}"
        )
    return total


def _budget(mass: Tensor, allocator: Allocator, layer_idx: int | None, num_heads: int) -> Tensor:
    """The allocator's budget (B, num_heads); a head-summed (B, 1, Skv) mass gets one budget
    per row, shared by the local heads."""
    budget = allocator(mass, layer_idx=layer_idx)
    if mass.shape[1] == num_heads:
        return budget
    want = (mass.shape[0], 1)
    if not isinstance(budget, Tensor) or tuple(budget.shape) != want:
        got = tuple(budget.shape) if isinstance(budget, Tensor) else type(budget).__name__
        raise ValueError(
            f"allocator: expected a budget of shape (B, 1) = {want} for the head-summed mass "
            f"of mass_reduce, got {got}"
        )
    return budget.expand(mass.shape[0], num_heads).contiguous()  # (B, Hkv)


def _plan_rows(
    q: Tensor,
    k: Tensor,
    spans: list[tuple[int, int]],
    scorer: Scorer,
    allocator: Allocator,
    selector: Selector,
    layer_idx: int | None,
    mass_reduce: MassReduce | None,
) -> TokenPlan:
    """One plan per row on its real span, assembled over the padded length."""
    b, hkv, s = k.shape[0], k.shape[1], k.shape[-2]
    mass = torch.zeros(b, hkv, s, dtype=torch.float32, device=k.device)
    normalized = torch.zeros_like(mass)
    row_scores = []
    for r, (start, end) in enumerate(spans):
        sc = scorer(q[r : r + 1, :, start:end], k[r : r + 1, :, start:end])
        row_scores.append(sc)
        mass[r, :, start:end], normalized[r, :, start:end] = sc.mass[0], sc.normalized[0]
    # one collective for the whole batch: padding holds zero mass and is sliced off per row
    total = None if mass_reduce is None else _summed_over_processes(mass, mass_reduce)
    budgets, sels = [], []
    for r, (sc, (start, end)) in enumerate(zip(row_scores, spans, strict=True)):
        row_mass = sc.mass if total is None else total[r : r + 1, :, start:end]
        row_budget = _budget(row_mass, allocator, layer_idx, hkv)  # (1, Hkv)
        sels.append(selector(sc.normalized, row_budget))
        budgets.append(row_budget)
    keep = _topped_up_keep(sels, spans, s)
    row_keep = torch.zeros_like(keep)
    for r, (sel, (start, end)) in enumerate(zip(sels, spans, strict=True)):
        row_keep[r, :, start:end] = sel.keep[0]
    return TokenPlan(
        scores=Scores(mass=mass, normalized=normalized),
        budget=torch.cat(budgets),
        selection=Selection(keep=keep, num_kept=max(sel.num_kept for sel in sels)),
        row_keep=row_keep,
        row_kept=tuple(sel.num_kept for sel in sels),
    )


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
