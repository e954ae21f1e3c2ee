"""FlexAttention ``mask_mod`` factories for token-level sparse prefill (ZipVL, arXiv 2410.08584).

Every factory is pure: it closes over tensors passed to it (never over mutable Python state), the
returned predicate has no Python control flow on index values, and its ``__name__`` says what it
is, so compiled kernels and logs are legible. Index arguments are FlexAttention's
``(b, h, q_idx, kv_idx)``; ``h`` is a *query* head, so per-head lookup tensors carry one row per
query head (a per-KV-head tensor repeated G times; lookups derived from the inputs also work inside
an enclosing compiled region, where Inductor's CPU flex template rejects constant index maps).

Lookup tensors are padded by the callers to a multiple of the block size, because compiled kernels
may evaluate a ``mask_mod`` at the padded tail of the last tile.
"""

from __future__ import annotations

from torch import Tensor

from zipvl.types import MaskMod

__all__ = [
    "causal_mask_mod",
    "compacted_causal_mask_mod",
    "prefix_count_mask_mod",
    "selection_mask_mod",
]


def causal_mask_mod() -> MaskMod:
    """Plain causal mask: ``kv_idx <= q_idx`` (Sq = Skv)."""

    def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx

    causal.__name__ = "causal"
    return causal


def compacted_causal_mask_mod(num_kept: Tensor | int) -> MaskMod:
    """Causal over gathered (compacted) tokens, with the padding after ``num_kept`` masked.

    Kept tokens are gathered in ascending position order, so causality over the original positions
    equals causality over the compacted indices. Gathered length 5 padded to 8::

        kv       0 1 2 3 4 | 5 6 7  (padding)
        q 0      1 0 0 0 0 | 0 0 0
        q 4      1 1 1 1 1 | 0 0 0
        q 6      1 1 1 1 1 | 0 0 0  (padded query row: its output is discarded)

    Args:
        num_kept: P, a () integer tensor so that a compiled kernel does not specialise on it; an
            int only inside an enclosing compiled region, where shapes already specialise on P.

    Returns:
        The mask_mod ``(kv_idx <= q_idx) & (kv_idx < P)``.
    """

    def compacted_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) & (kv_idx < num_kept)

    compacted_causal.__name__ = "compacted_causal"
    return compacted_causal


def prefix_count_mask_mod(visible: Tensor) -> MaskMod:
    """Queries in the original layout over gathered keys: row q sees the first ``visible[q]`` keys.

    Used by ``unkept="attend"``: every query attends to the kept keys at positions <= its own.
    Because kept keys are gathered in ascending order, those keys are a prefix of the gathered
    sequence whose length is the number of kept positions <= q, ``visible = cumsum(keep)``.
    keep = 1 0 1 1 0 (5 positions, 3 kept)::

        gathered kv    0 1 2     (positions 0, 2, 3)
        q 0 (kept)     1 0 0     visible 1
        q 1 (unkept)   1 0 0     visible 1
        q 2 (kept)     1 1 0     visible 2
        q 4 (unkept)   1 1 1     visible 3

    Args:
        visible: (B, H, S') integer with one row per head of the attention call (query heads;
            repeat a per-KV-head tensor G times), S' >= S padded with 0 (padded rows see nothing).

    Returns:
        The mask_mod ``kv_idx < visible[b, h, q_idx]``.
    """

    def prefix_count(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx < visible[b, h, q_idx]

    prefix_count.__name__ = "prefix_count"
    return prefix_count


def selection_mask_mod(keep_kv: Tensor, keep_q: Tensor | None = None) -> MaskMod:
    """A selection over the original layout: ``keep_kv[kv] & kv <= q`` (& ``keep_q[q]`` if given).

    For ``unkept="zero"`` pass ``keep_q = keep_kv = keep``; for ``unkept="attend"`` omit
    ``keep_q`` (every query attends). keep = 1 0 1 1 (zero mode)::

        kv     0 1 2 3
        q 0    1 0 0 0
        q 1    0 0 0 0   (unkept query: no attention)
        q 2    1 0 1 0
        q 3    1 0 1 1

    Args:
        keep_kv: (B, H, S') bool, which keys are kept, one row per head of the attention call
            (query heads; repeat a per-KV-head tensor G times), padded with False to S' >= S.
        keep_q: optional (B, H, S') bool, which query rows attend (padded with False).

    Returns:
        The mask_mod.
    """
    if keep_q is None:

        def kept_keys(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return keep_kv[b, h, kv_idx] & (kv_idx <= q_idx)

        kept_keys.__name__ = "selection_attend"
        return kept_keys

    def selection(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return keep_q[b, h, q_idx] & keep_kv[b, h, kv_idx] & (kv_idx <= q_idx)

    selection.__name__ = "selection"
    return selection
