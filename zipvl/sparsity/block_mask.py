"""Selection -> FlexAttention ``BlockMask``, built from block indices (never an S x S predicate).

Token-level sparse prefill (ZipVL, arXiv 2410.08584 v1, Alg. 1: O[T] = Attn(Q[T], K[T], V[T])) in
FlexAttention. Three builders, all plain PyTorch on the selection's device, classifying each tile
from per-block statistics and passing full tiles (every pair visible, ``mask_mod`` skipped) and
partial tiles (``mask_mod`` evaluated) to ``BlockMask.from_kv_blocks``; empty tiles are dropped:

* ``compacted_causal_block_mask``: causal over the gathered kept tokens, padded to a multiple of
  the block size (the fast path of ``sparse_attention``).
* ``compacted_prefix_block_mask``: all queries in the original layout over the gathered keys,
  each query seeing the kept keys at positions <= its own (``unkept="attend"``).
* ``selection_block_mask``: the selection over the original S x S layout. Token-level selection
  leaves nearly every tile partial, so this is slow as an attention path; it exists for block-level
  selectors and comparisons.

``create_block_mask`` over a dense predicate is used only by the tests, as the oracle.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from zipvl.checks import check_int, check_tensor
from zipvl.sparsity.masks import (
    compacted_causal_mask_mod,
    prefix_count_mask_mod,
    selection_mask_mod,
)
from zipvl.types import MaskMod, Selection

__all__ = [
    "compacted_causal_block_mask",
    "compacted_prefix_block_mask",
    "selection_block_mask",
]


def _from_tiles(
    partial: Tensor,
    full: Tensor,
    *,
    block_size: int,
    mask_mod: MaskMod,
    seq_lengths: tuple[int, int],
) -> BlockMask:
    """BlockMask from tile classes.

    Args:
        partial: (B, H, Nq, Nkv) bool, tiles where the mask_mod must be evaluated.
        full: (B, H, Nq, Nkv) bool, tiles where every pair is visible; disjoint from ``partial``.
        block_size: tile size along both axes.
        mask_mod: the exact token-level predicate.
        seq_lengths: (Q_LEN, KV_LEN).
    """

    def ordered(tiles: Tensor) -> tuple[Tensor, Tensor]:
        num = tiles.sum(dim=-1, dtype=torch.int32)  # (B, H, Nq)
        # stable argsort of "not selected": the selected kv blocks first, in ascending order
        idx = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True)  # (B, H, Nq, Nkv)
        return num, idx.to(torch.int32)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=seq_lengths,
    )


def _build_compacted_causal(
    num_kept: int, padded_len: int, block_size: int, device: torch.device, *, traced: bool
) -> BlockMask:
    nb = padded_len // block_size
    i = torch.arange(nb, device=device)[:, None]  # (Nq, 1) query block
    j = torch.arange(nb, device=device)[None, :]  # (1, Nkv) key block
    valid = j * block_size < num_kept  # (1, Nkv): block holds at least one kept token
    full = (j < i) & ((j + 1) * block_size <= num_kept)  # (Nq, Nkv)
    partial = (j <= i) & valid & ~full  # (Nq, Nkv): diagonal and the padded last block
    # Eagerly, P is a captured 0-d tensor so the compiled kernel does not specialise on it.
    # Inside an enclosing compiled region the gathered shapes already specialise on P, and
    # Inductor's CPU flex template cannot take a 0-d tensor created in the graph: use the int.
    n = num_kept if traced else torch.tensor(num_kept, device=device)
    mask_mod = compacted_causal_mask_mod(n)
    return _from_tiles(
        partial[None, None],
        full[None, None],
        block_size=block_size,
        mask_mod=mask_mod,
        seq_lengths=(padded_len, padded_len),
    )


@functools.lru_cache(maxsize=32)
def _compacted_causal_cached(
    num_kept: int, padded_len: int, block_size: int, device: torch.device
) -> BlockMask:
    return _build_compacted_causal(num_kept, padded_len, block_size, device, traced=False)


def compacted_causal_block_mask(
    num_kept: int,
    padded_len: int,
    block_size: int = 128,
    *,
    device: torch.device | str | None = None,
) -> BlockMask:
    """Causal BlockMask over P gathered tokens padded to ``padded_len``, padding masked.

    Tiles (block 2, P = 5, padded_len = 6; F = full, P = partial, . = dropped)::

        kv block   0 1 2
        q block 0  P . .
        q block 1  F P .
        q block 2  F F P      (block 2 holds kept token 4 and one padding slot)

    The mask broadcasts over batch and heads (B = H = 1). Results are cached per
    (num_kept, padded_len, block_size, device), so layers with the same kept count share one.

    Args:
        num_kept: P >= 1, the number of gathered tokens.
        padded_len: a multiple of ``block_size``, >= P.
        block_size: tile size (128 is FlexAttention's default and what its GPU kernels expect).
        device: where to build the mask.

    Returns:
        A BlockMask with Q_LEN = KV_LEN = ``padded_len`` and mask_mod
        ``(kv <= q) & (kv < num_kept)``.

    Raises:
        ValueError: non-positive sizes, ``padded_len`` not a multiple of ``block_size`` or < P.
    """
    check_int("num_kept", num_kept, 1)
    check_int("block_size", block_size, 1)
    check_int("padded_len", padded_len, 1)
    if padded_len % block_size != 0 or padded_len < num_kept:
        raise ValueError(
            f"padded_len: expected a multiple of block_size ({block_size}) that is >= num_kept "
            f"({num_kept}), got {padded_len}"
        )
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if torch.compiler.is_compiling():
        # dynamo cannot trace through lru_cache; inside a compiled region build it inline
        return _build_compacted_causal(num_kept, padded_len, block_size, dev, traced=True)
    return _compacted_causal_cached(num_kept, padded_len, block_size, dev)


def compacted_prefix_block_mask(
    visible: Tensor,
    padded_kv_len: int,
    block_size: int = 128,
    *,
    group_size: int = 1,
) -> BlockMask:
    """BlockMask of all S queries over the gathered keys, query q seeing the first ``visible[q]``.

    With keys gathered in ascending position order and ``visible = cumsum(keep)`` this is
    "every query attends to the kept keys at positions <= its own" (``unkept="attend"``). Tiles
    are full where the whole key block lies below the smallest prefix of the query block, and
    dropped where it lies beyond the largest.

    Args:
        visible: (B, Hkv, S) integer, non-decreasing along S, values in [0, padded_kv_len].
        padded_kv_len: gathered key length, a multiple of ``block_size``.
        block_size: tile size.
        group_size: G, query heads per KV head; the mask has B x (Hkv * G) heads.

    Returns:
        A BlockMask with Q_LEN = S, KV_LEN = ``padded_kv_len``.
    """
    check_tensor("visible", visible, ndim=3)
    check_int("block_size", block_size, 1)
    check_int("group_size", group_size, 1)
    check_int("padded_kv_len", padded_kv_len, 1)
    if padded_kv_len % block_size != 0:
        raise ValueError(
            f"padded_kv_len: expected a multiple of block_size ({block_size}), got {padded_kv_len}"
        )
    b, hkv, s = visible.shape
    nq = -(-s // block_size)
    nkv = padded_kv_len // block_size
    # padded rows see nothing (functional pad: no in-place writes, which compiled regions dislike)
    vis = F.pad(visible.to(torch.int32), (0, nq * block_size - s))  # (B, Hkv, Nq*BLOCK)
    blocks = vis.view(b, hkv, nq, block_size)  # (B, Hkv, Nq, BLOCK)
    vmin = blocks.amin(dim=-1)[..., None]  # (B, Hkv, Nq, 1)
    vmax = blocks.amax(dim=-1)[..., None]  # (B, Hkv, Nq, 1)
    lo = torch.arange(nkv, device=visible.device) * block_size  # (Nkv,)
    full = lo + block_size <= vmin  # (B, Hkv, Nq, Nkv)
    partial = (lo < vmax) & ~full  # (B, Hkv, Nq, Nkv)
    if group_size > 1:
        full = full.repeat_interleave(group_size, dim=1)  # (B, Hq, Nq, Nkv)
        partial = partial.repeat_interleave(group_size, dim=1)
        vis = vis.repeat_interleave(group_size, dim=1)  # (B, Hq, Nq*BLOCK)
    return _from_tiles(
        partial,
        full,
        block_size=block_size,
        mask_mod=prefix_count_mask_mod(vis),
        seq_lengths=(s, padded_kv_len),
    )


def selection_block_mask(
    selection: Selection,
    block_size: int = 128,
    *,
    group_size: int = 1,
    unkept: Literal["zero", "attend"] = "zero",
) -> BlockMask:
    """The selection over the original S x S layout, as a BlockMask.

    Pair (q, kv) is visible iff ``kv <= q``, key kv is kept, and (``unkept="zero"``) query q is
    kept too. A tile is full when every query row and every key of it are kept and the tile lies
    strictly below the diagonal; empty (dropped) when the smallest kept key position exceeds the
    largest attending query position; partial otherwise. keep = 1 1 0 1 | 1 1 1 1, block 4::

        kv block   0 1
        q block 0  P .
        q block 1  P P     (block 0 has an unkept token, so tile (1, 0) is partial, not full)

    Args:
        selection: ``keep`` (B, Hkv, S) bool.
        block_size: tile size.
        group_size: G, query heads per KV head; the mask has B x (Hkv * G) heads (use the query
            head count of the attention call; 1 gives one mask per KV head).
        unkept: ``"zero"`` (unkept queries attend nothing) or ``"attend"`` (every query attends).

    Returns:
        A BlockMask with Q_LEN = KV_LEN = S.
    """
    if not isinstance(selection, Selection):
        raise TypeError(f"selection: expected a Selection, got {type(selection).__name__}")
    keep = selection.keep  # (B, Hkv, S) bool, checked by Selection; the row counts are not used
    check_int("block_size", block_size, 1)
    check_int("group_size", group_size, 1)
    if unkept not in ("zero", "attend"):
        raise ValueError(f"unkept: expected 'zero' or 'attend', got {unkept!r}")
    b, hkv, s = keep.shape
    if s == 0:
        raise ValueError("selection.keep: expected at least one token, got S = 0")
    dev = keep.device
    nb = -(-s // block_size)
    padded = nb * block_size
    keep_kv = torch.zeros(b, hkv, padded, dtype=torch.bool, device=dev)
    keep_kv[..., :s] = keep  # (B, Hkv, Nb*BLOCK)
    in_range = torch.arange(padded, device=dev) < s  # (Nb*BLOCK,)
    keep_q = keep_kv if unkept == "zero" else in_range.expand(b, hkv, padded).contiguous()
    pos = torch.arange(padded, device=dev).view(nb, block_size)  # (Nb, BLOCK)
    kvb = keep_kv.view(b, hkv, nb, block_size)  # (B, Hkv, Nb, BLOCK)
    qb = keep_q.view(b, hkv, nb, block_size)  # (B, Hkv, Nb, BLOCK)
    max_q = torch.where(qb, pos, -1).amax(dim=-1)  # (B, Hkv, Nb), -1 if no attending query
    min_kv = torch.where(kvb, pos, padded).amin(dim=-1)  # (B, Hkv, Nb), padded if no kept key
    blen = torch.clamp(s - torch.arange(nb, device=dev) * block_size, max=block_size)  # (Nb,)
    all_q = qb.sum(dim=-1) == blen  # (B, Hkv, Nb)
    all_kv = kvb.sum(dim=-1) == blen  # (B, Hkv, Nb)
    q_lo = torch.arange(nb, device=dev) * block_size  # (Nb,)
    kv_hi = torch.clamp(q_lo + block_size, max=s) - 1  # (Nb,)
    below = kv_hi[None, :] <= q_lo[:, None]  # (Nq, Nkv): every pair causal-visible
    nonempty = min_kv[..., None, :] <= max_q[..., :, None]  # (B, Hkv, Nq, Nkv)
    full = all_q[..., :, None] & all_kv[..., None, :] & below  # (B, Hkv, Nq, Nkv)
    partial = nonempty & ~full
    if group_size > 1:
        full = full.repeat_interleave(group_size, dim=1)  # (B, Hq, Nq, Nkv)
        partial = partial.repeat_interleave(group_size, dim=1)
        keep_kv = keep_kv.repeat_interleave(group_size, dim=1)  # (B, Hq, Nb*BLOCK)
    mask_mod = (
        selection_mask_mod(keep_kv, keep_kv) if unkept == "zero" else selection_mask_mod(keep_kv)
    )
    return _from_tiles(
        partial,
        full,
        block_size=block_size,
        mask_mod=mask_mod,
        seq_lengths=(s, s),
    )
