"""ZipVL's per-layer prefill plan: score -> allocate -> select (arXiv 2410.08584 v1, Alg. 1).

Algorithm 1 order: probe attention A' -> Eq. 6 (the budget p from the raw mass) -> Eq. 7
(normalized scores) -> Eqs. 8/9 (T = top-p by normalized score, U = the rest). The components are
swappable; the defaults are ZipVL's (5 % + 5 % probes, tau = 0.975, per-KV-head top-p keeping the
last token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from zipvl.checks import check_tensor
from zipvl.sparsity.allocators import CumulativeMassAllocator
from zipvl.sparsity.scorers import ProbeScorer
from zipvl.sparsity.selectors import TopKSelector
from zipvl.types import Allocator, Scorer, Scores, Selection, Selector, equalize_keep_counts

__all__ = ["TokenPlan", "padded_spans", "plan_tokens", "row_spans", "select_tokens"]

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

    Returns:
        ``TokenPlan``. The only host sync is the selector reading the budget back once (with
        padding: once per row, plus the read of the row spans).

    Raises:
        ValueError: ``key_valid`` of the wrong shape or with padding inside a row.
    """
    if key_valid is not None:
        s = k.shape[-2]
        if q.shape[-2] != s:
            raise ValueError(
                f"key_valid: a padding mask plans a prefill (Sq = Skv = {s}), got Sq = "
                f"{q.shape[-2]}"
            )
        spans = padded_spans(key_valid, k.shape[0], s)
        if spans is not None:
            return _plan_rows(q, k, spans, scorer, allocator, selector, layer_idx)
    scores = scorer(q, k)
    budget = allocator(scores.mass, layer_idx=layer_idx)
    selection = selector(scores.normalized, budget)
    return TokenPlan(scores=scores, budget=budget, selection=selection)


def _plan_rows(
    q: Tensor,
    k: Tensor,
    spans: list[tuple[int, int]],
    scorer: Scorer,
    allocator: Allocator,
    selector: Selector,
    layer_idx: int | None,
) -> TokenPlan:
    """One plan per row on its real span, assembled over the padded length."""
    b, hkv, s = k.shape[0], k.shape[1], k.shape[-2]
    mass = torch.zeros(b, hkv, s, dtype=torch.float32, device=k.device)
    normalized = torch.zeros_like(mass)
    budgets, sels = [], []
    for r, (start, end) in enumerate(spans):
        sc = scorer(q[r : r + 1, :, start:end], k[r : r + 1, :, start:end])
        row_budget = allocator(sc.mass, layer_idx=layer_idx)  # (1, Hkv)
        sels.append(selector(sc.normalized, row_budget))
        budgets.append(row_budget)
        mass[r, :, start:end], normalized[r, :, start:end] = sc.mass[0], sc.normalized[0]
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
