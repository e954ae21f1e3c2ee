"""Token selectors: normalized scores + budget -> ``Selection`` (which tokens are important).

Implements ZipVL's Eqs. 8/9 (He et al., arXiv 2410.08584 v1): T = the ``p`` tokens with the
largest normalized score (Eq. 7), U = the rest, per KV head (the ZipCache code lineage) or one set
per layer.

Contract (``zipvl.types.Selector``)::

    selector(scores, budget) -> Selection
    scores  (B, Hkv, Skv) float32, higher = keep
    budget  (B, Hkv)      int32, the same value in every row (one budget per layer)

The keep mask itself (``TopKSelector.keep_mask``) is fixed-shape tensor work with no host sync;
``__call__`` reads back to the host once, the budget and whether the scores hold NaN, and then
builds the mask for the budget it read by a threshold select (``keep_mask_k``: no sort), with
exactly ``num_kept`` entries per row by construction, so ``sparse_attention`` reads nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from zipvl.checks import check_int, check_same_device, check_tensor
from zipvl.impl import SCORER_IMPLS, Impl, parse_impl
from zipvl.types import NONFINITE_MASS_BUDGET, Selection, keep_with_positions

__all__ = ["SELECT_TRITON_MAX_TOKENS", "Selection", "TopKSelector"]

SELECT_TRITON_MAX_TOKENS = 131072
"""``TopKSelector.keep_and_indices(impl="auto")`` runs the select kernels for rows up to this many
scores, the sort path above (where neither is measured). Measured on an H200 (torch 2.11,
LongVA heads, ``bench/gpu_prefill.py``): the captured plan at r = 0.42 took 0.254 / 0.444 ms
with the select kernels inside its graph against 0.350 / 0.525 ms with the sort path (8k /
32k), and the selection alone, eager, 0.258 against 0.404 ms at 128k. (The first form of the
kernel, one program per row, lost to the sort path from 32k; the blocked form replaced it.)"""

_GRANULARITIES = ("kv_head", "layer")


def check_budget_read(p_min: int, p_max: int, has_nan: int, skv: int) -> None:
    """The checks of a plan's one host read: the budget's range over the rows and whether the
    scores hold NaN (``TopKSelector.__call__`` and the captured plan both read these three).

    Raises:
        ValueError: the allocators' non-finite-mass sentinel, NaN scores, a budget that differs
            between rows, or one outside [0, Skv].
    """
    if p_min == NONFINITE_MASS_BUDGET:
        raise ValueError(
            f"budget: got {NONFINITE_MASS_BUDGET}, the allocators' sentinel for NaN or inf in "
            "the attention mass (Scores.mass): the scorer's logits overflowed (e.g. fp16 keys "
            "with outlier channels) or its inputs hold NaN/inf"
        )
    if has_nan:
        raise ValueError(
            "scores: expected no NaN (higher = keep), got NaN entries: the scorer's logits "
            "overflowed or its inputs hold NaN/inf"
        )
    if p_min != p_max:
        raise ValueError(
            "budget: expected one value shared by all (b, h) rows so that every row keeps the "
            f"same number of tokens, got values from {p_min} to {p_max}"
        )
    if not 0 <= p_max <= skv:
        raise ValueError(f"budget: expected values in [0, Skv={skv}], got {p_max}")


@dataclass(frozen=True)
class TopKSelector:
    """Keep the forced tokens plus the highest-scoring others, ``max(p, |forced|)`` per row.

    Forced tokens are the last token (``keep_last``), the first ``sink_tokens`` and the last
    ``recent_window`` tokens. They count against the budget: ``keep = forced ∪ top-(p - |forced|)``
    of the remaining tokens by score, ties broken by the lower position. Every (b, h) row therefore
    keeps exactly ``max(p, |forced|)`` tokens (capped at Skv). A budget of 0 keeps only the forced
    tokens (nothing at all if there are none).

    Granularity:
        * ``"kv_head"``: one set per (b, KV head) from that head's scores (ZipCache's code).
        * ``"layer"``: one set per batch row, shared by all KV heads, from the scores summed over
          heads. Batch rows stay separate.

    Forced positions for Skv = 8, sink_tokens = 1, recent_window = 2, keep_last = True::

        position  0 1 2 3 4 5 6 7
        forced    1 0 0 0 0 0 1 1

    Attributes:
        granularity: ``"kv_head"`` (default) or ``"layer"``.
        keep_last: always keep the last token (the prompt's final token drives generation).
        sink_tokens: always keep this many leading tokens (attention sinks), >= 0.
        recent_window: always keep this many trailing tokens, >= 0.
    """

    granularity: Literal["kv_head", "layer"] = "kv_head"
    keep_last: bool = True
    sink_tokens: int = 0
    recent_window: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in _GRANULARITIES:
            raise ValueError(
                f"granularity: expected one of {_GRANULARITIES}, got {self.granularity!r}"
            )
        if not isinstance(self.keep_last, bool):
            raise TypeError(f"keep_last: expected a bool, got {type(self.keep_last).__name__}")
        check_int("sink_tokens", self.sink_tokens, 0)
        check_int("recent_window", self.recent_window, 0)

    @property
    def _recent(self) -> int:
        """The forced recent positions: ``recent_window``, at least the last with ``keep_last``."""
        return max(self.recent_window, 1 if self.keep_last else 0)

    def num_forced(self, skv: int) -> int:
        """Number of forced tokens in a sequence of ``skv`` keys (host arithmetic on the shape)."""
        recent = min(self._recent, skv)
        sinks = min(self.sink_tokens, skv)
        return min(skv, sinks + recent)

    def kept_count(self, skv: int, k: int) -> int:
        """How many tokens every row keeps for a budget ``k``: ``clamp(max(k, |forced|), 0,
        Skv)`` (host arithmetic; what ``keep_mask`` and the select kernels keep)."""
        return min(max(int(k), self.num_forced(skv)), skv)

    def forced_mask(self, skv: int, device: torch.device | str | None = None) -> Tensor:
        """Forced positions as a (Skv,) bool tensor."""
        pos = torch.arange(skv, device=device)  # (Skv,)
        return (pos < self.sink_tokens) | (pos >= skv - self._recent)  # (Skv,)

    def _ranked(self, scores: Tensor) -> Tensor:
        """The float32 scores the selection ranks, (B, Hs, Skv) with Hs = Hkv (``"kv_head"``) or
        1 (``"layer"``): NaN below every finite score, -inf / +inf clamped to the finite range,
        and the forced positions at +inf, above everything else."""
        s = scores.float()
        if self.granularity == "layer":
            s = s.sum(dim=1, keepdim=True)  # (B, 1, Skv)
        # Forced tokens rank above everything, including +inf scores; NaN ranks below -inf would,
        # and stays deterministic through the position tie-break.
        finite_max = torch.finfo(torch.float32).max
        s = torch.nan_to_num(s, nan=-finite_max, posinf=finite_max, neginf=-finite_max)
        forced = self.forced_mask(s.shape[-1], device=scores.device)  # (Skv,)
        return s.masked_fill(forced, float("inf"))  # (B, Hs, Skv)

    def keep_and_indices(
        self,
        scores: Tensor,
        budget: Tensor,
        *,
        impl: Impl | str = Impl.AUTO,
        out: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``keep_mask`` together with the kept positions, fixed-shape and without host sync.

        Args:
            scores: (B, Hkv, Skv) float, higher = keep (as in ``keep_mask``).
            budget: (B, Hkv) integer device tensor (as in ``keep_mask``).
            impl: ``"triton"``: ``zipvl.sparsity.select_triton`` (a radix select of each row's
                threshold, then the ties by position and the compaction by running count,
                every launch spread over blocks of the row); ``"torch"``: ``keep_mask`` (a
                stable sort) and a running-count compaction; ``"auto"`` (default): ``"triton"``
                on CUDA outside ``torch.compile`` for rows of at most
                ``SELECT_TRITON_MAX_TOKENS`` scores, ``"torch"`` elsewhere. With
                ``granularity="kv_head"`` the kernels prepare the scores as ``_ranked`` does
                while they read them.
            out: contiguous (keep, idx) tensors of the returned shapes and dtypes to write
                into (None: new ones); what the captured plan writes its outputs through.

        Returns:
            keep (B, Hkv, Skv) bool, exactly ``keep_mask``'s, and idx (B, Hkv, Skv) int64: row
            (b, h)'s first ``keep[b, h].sum()`` entries are its kept positions in ascending
            order, the rest 0.

        Raises:
            ValueError: ``impl`` not in ``SCORER_IMPLS`` or ``"triton"`` where it cannot run.
        """
        impl = parse_impl("impl", impl, SCORER_IMPLS)
        if impl is Impl.AUTO:
            fast = scores.is_cuda and not torch.compiler.is_compiling()
            fast = fast and scores.shape[-1] <= SELECT_TRITON_MAX_TOKENS
            impl = Impl.TRITON if fast else Impl.TORCH
        hkv, skv = scores.shape[1], scores.shape[2]
        if impl is Impl.TRITON:
            from zipvl.sparsity.select_triton import keep_and_indices_triton

            n_forced = self.num_forced(skv)
            if self.granularity == "kv_head":  # _ranked inside the kernels
                raw = scores.float().contiguous()
                return keep_and_indices_triton(
                    raw, budget, n_forced, hkv, forced=(self.sink_tokens, self._recent), out=out
                )
            return keep_and_indices_triton(self._ranked(scores), budget, n_forced, hkv, out=out)
        return keep_with_positions(self.keep_mask(scores, budget), out)  # (B, Hkv, Skv) each

    def keep_mask(self, scores: Tensor, budget: Tensor) -> Tensor:
        """The keep mask, fixed-shape and without host sync (safe under ``fullgraph=True``).

        The reference of ``keep_mask_k`` (a stable descending sort of every row): used where the
        budget is a device tensor that must not be read back.

        Args:
            scores: (B, Hkv, Skv) float, higher = keep. NaN ranks lowest; +inf ranks above every
                finite score but below the forced tokens.
            budget: (B, Hkv) integer, tokens to keep per row; values outside [0, Skv] are clamped.

        Returns:
            (B, Hkv, Skv) bool; row (b, h) has ``clamp(max(budget[b, h], |forced|), 0, Skv)`` True
            entries.
        """
        b, hkv, skv = scores.shape
        s = self._ranked(scores)  # (B, Hs, Skv)
        # Stable descending sort: equal scores keep position order, so lower positions win ties.
        order = s.sort(dim=-1, descending=True, stable=True).indices  # (B, Hs, Skv)
        ranks = torch.empty_like(order).scatter_(
            -1, order, torch.arange(skv, device=scores.device).expand_as(order)
        )  # (B, Hs, Skv): rank of each position, 0 = best
        k = budget.to(torch.int64).clamp(min=self.num_forced(skv), max=skv)  # (B, Hkv)
        if self.granularity == "layer":
            # one budget per batch row; rows are uniform in practice (one p per layer)
            k = k.amax(dim=1, keepdim=True)  # (B, 1)
        keep = ranks < k[..., None]  # (B, Hs, Skv)
        return keep.expand(b, hkv, skv).contiguous()  # (B, Hkv, Skv)

    def keep_mask_k(self, scores: Tensor, k: int) -> Tensor:
        """``keep_mask`` for a budget the host knows (one ``k`` for every row): the same mask,
        by a threshold select instead of a sort of every row.

        The ``kk = clamp(max(k, |forced|), 0, Skv)``-th largest ranked score of a row is its
        threshold t (one ``topk`` of ``min(kk, Skv - kk + 1)`` entries, the smaller side); the
        row keeps every score above t and, of the scores equal to t, the ones at the lowest
        positions, as many as are still missing (a cumulative count): exactly the first ``kk``
        entries of the stable descending sort.

        Args:
            scores: (B, Hkv, Skv) float, higher = keep (as in ``keep_mask``).
            k: the budget, a host int (values outside [0, Skv] are clamped).

        Returns:
            (B, Hkv, Skv) bool with ``kk`` True entries per row.
        """
        b, hkv, skv = scores.shape
        kk = self.kept_count(skv, k)
        if kk == 0 or kk == skv or scores.numel() == 0:
            return torch.full((b, hkv, skv), kk > 0, dtype=torch.bool, device=scores.device)
        s = self._ranked(scores)  # (B, Hs, Skv)
        if kk <= skv - kk + 1:
            t = s.topk(kk, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        else:
            t = s.topk(skv - kk + 1, dim=-1, largest=False, sorted=False).values
            t = t.amax(dim=-1, keepdim=True)  # (B, Hs, 1): the kk-th largest
        above = s > t  # (B, Hs, Skv)
        tie = s == t
        missing = kk - above.sum(dim=-1, keepdim=True)  # (B, Hs, 1), >= 1
        keep = above | (tie & (tie.cumsum(dim=-1) <= missing))  # lowest tied positions first
        return keep.expand(b, hkv, skv).contiguous()  # (B, Hkv, Skv)

    def __call__(self, scores: Tensor, budget: Tensor, /) -> Selection:
        """Select the important tokens.

        Args:
            scores: (B, Hkv, Skv) float32, higher = keep (``Scores.normalized``).
            budget: (B, Hkv) integer tensor, the same value in every row, in [0, Skv].

        Returns:
            ``Selection`` with ``keep`` (B, Hkv, Skv) bool and ``num_kept = max(p, |forced|)``.

        Raises:
            ValueError: wrong ranks/shapes, devices differ, ``scores`` hold NaN, the budget is
                the allocators' non-finite-mass sentinel (``NONFINITE_MASS_BUDGET``), or it is
                not one value in [0, Skv] shared by all rows. All checked on one host read.
        """
        check_tensor("scores", scores, ndim=3, floating=True)
        check_tensor("budget", budget, ndim=2)
        if budget.is_floating_point() or budget.dtype == torch.bool:
            raise ValueError(f"budget: expected an integer dtype, got {budget.dtype}")
        check_same_device(scores=scores, budget=budget)
        b, hkv, skv = scores.shape
        if tuple(budget.shape) != (b, hkv):
            raise ValueError(
                f"budget: expected shape (B, Hkv) = {(b, hkv)} like scores, "
                f"got {tuple(budget.shape)}"
            )
        # The one host read of the plan step: the budget sizes the gathered tensors and picks
        # the threshold of the keep mask; the same transfer carries the NaN check of the scores.
        stats = torch.stack(
            [*torch.aminmax(budget.to(torch.int64)), scores.isnan().any().to(torch.int64)]
        )  # (3,) int64
        p_min, p_max, has_nan = stats.tolist()
        check_budget_read(p_min, p_max, has_nan, skv)
        return self.select_k(scores, p_max)

    def select_k(self, scores: Tensor, k: int) -> Selection:
        """The selection for a budget the host knows (one ``k`` for every row), without a host
        read: ``keep_mask_k``'s mask with ``kept_count(Skv, k)`` entries per row, returned as
        checked (it keeps exactly that many by construction, property-tested against the sort
        of ``keep_mask``). ``__call__`` ends here after its read; a plan whose allocator knows
        the budget on the host starts here (``zipvl.sparsity.host_budget``).

        Args:
            scores: (B, Hkv, Skv) float, higher = keep.
            k: the budget, a host int.
        """
        num_kept = self.kept_count(scores.shape[-1], k)
        keep = self.keep_mask_k(scores, k)  # (B, Hkv, Skv), num_kept per row
        return Selection(keep=keep, num_kept=num_kept).check_counts(
            count_range=(num_kept, num_kept)
        )
