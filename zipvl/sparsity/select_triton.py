# pyright: reportArgumentType=false, reportOperatorIssue=false, reportAttributeAccessIssue=false, reportCallIssue=false, reportIndexIssue=false, reportGeneralTypeIssues=false
# (Triton's constexpr arguments are not statically typed)
"""The keep mask and the kept positions of a device budget, in launches whose number does not
depend on the length (imported on first use: triton is optional).

``TopKSelector.keep_mask`` ranks every row by a stable descending sort (about ten launches at an
8k prompt: the order-preserving transform, the radix passes, the scatter of ranks, the compare)
and the captured plan then compacts the kept positions by a running count (a scan, a scatter
into zeros). Here every launch spreads each row's ``ranked`` scores (float32, NaN and the forced
tokens mapped by ``TopKSelector._ranked``, or by the kernels themselves as they read the raw
scores: ``forced``) over blocks of ``block`` positions:

1. four radix passes (``_hist_kernel``, one launch each) find the ``kk``-th largest score ``t``
   of every row exactly: pass p histograms byte p (high to low) of the order-preserving uint32
   keys whose higher bytes equal the prefix found so far (``tl.histogram`` with a mask; the
   blocks add into the row's histogram with atomics), and every program of the next launch
   replays the descent from the finished histograms (``_descend``: the byte where the count
   from the top reaches what is still missing);
2. ``_count_kernel`` counts, per block, the keys equal to ``t`` and above it;
3. ``_write_kernel`` keeps every key above ``t`` and, of the keys equal to ``t``, the lowest
   positions (the block's earlier ties from the counts, then a running count), as many as are
   missing, and writes each kept position at its slot (the keys kept before the block plus a
   running count).

This is exactly the first ``kk`` entries of the stable descending sort (what ``keep_mask``
keeps), with ``kk = clamp(max(budget, n_forced), 0, Skv)`` read from the device budget: no host
read, fixed shapes, so it runs inside the plan's CUDA graph. Tested against ``keep_mask`` under
the Triton interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from zipvl.checks import check_buffer

__all__ = ["INTERPRETED", "keep_and_indices_triton"]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether Triton was told to interpret kernels (read at import, as Triton reads it)."""


@triton.jit
def _keys(s_ptr, offs, valid, sink, recent_start, PREP: tl.constexpr):
    """Order-preserving uint32 keys of float32 scores (greater score, greater key; -0.0 is
    +0.0, as the sort compares them). PREP: the scores are raw, and ``TopKSelector._ranked``'s
    preparation happens here (NaN to the lowest finite value, +-inf clamped to the finite range,
    the forced positions ``< sink`` and ``>= recent_start`` at +inf)."""
    x = tl.load(s_ptr + offs, mask=valid, other=0.0) + 0.0  # -0.0 + 0.0 = +0.0
    if PREP:
        fmax = 3.4028234663852886e38  # float32's largest finite value
        x = tl.where(x != x, -fmax, x)
        x = tl.minimum(tl.maximum(x, -fmax), fmax)
        x = tl.where((offs < sink) | (offs >= recent_start), float("inf"), x)
    b = x.to(tl.uint32, bitcast=True)
    top_bit = tl.full((), 1, tl.uint32) << 31
    return tl.where((b & top_bit) != 0, ~b, b | top_bit)


@triton.jit
def _row_budget(budget_ptr, row, n_forced, S, HKV: tl.constexpr, HKV_PAD: tl.constexpr,
                LAYER: tl.constexpr):  # fmt: skip
    """kk = clamp(max(budget, n_forced), 0, S) of ranked row ``row`` (LAYER: the largest budget
    of the batch row's heads)."""
    if LAYER:
        offs_h = tl.arange(0, HKV_PAD)
        bud = tl.load(budget_ptr + row * HKV + offs_h, mask=offs_h < HKV, other=-(2**31) + 1)
        kk = tl.max(bud.to(tl.int64), axis=0)
    else:
        kk = tl.load(budget_ptr + row).to(tl.int64)
    return tl.minimum(tl.maximum(kk, n_forced), S).to(tl.int32)


@triton.jit
def _descend(hist_ptr, kk, PASSES: tl.constexpr):
    """Replay the decisions of the first PASSES radix passes from their finished histograms:
    the prefix of the kk-th largest key found so far, its mask, and how many of the keys that
    share that prefix are still to be taken from the top."""
    prefix = tl.zeros((), tl.uint32)
    pmask = tl.zeros((), tl.uint32)
    missing = tl.maximum(kk, 1)  # kk == 0 keeps nothing: any threshold does, none is taken
    offs = tl.arange(0, 256)
    for p in tl.static_range(PASSES):
        shift = 24 - 8 * p
        hist = tl.load(hist_ptr + p * 256 + offs)
        top = tl.cumsum(tl.flip(hist, 0), 0)  # top[j]: matches with digit >= 255 - j
        j = tl.sum((top < missing).to(tl.int32), axis=0)  # first j with top[j] >= missing
        missing -= tl.max(tl.where(top < missing, top, 0), axis=0)  # the digits above
        prefix = prefix | ((255 - j).to(tl.uint32) << shift)
        pmask = pmask | (tl.full((), 0xFF, tl.uint32) << shift)
    return prefix, pmask, missing


@triton.jit
def _hist_kernel(
    s_ptr, budget_ptr, hist_ptr, S, n_forced, sink, recent_start,
    PASS: tl.constexpr, HKV: tl.constexpr, HKV_PAD: tl.constexpr, LAYER: tl.constexpr,
    BLOCK: tl.constexpr, PREP: tl.constexpr,
):  # fmt: skip
    """Radix pass PASS over one block of one ranked row: the histogram of byte PASS (high to low)
    of the keys that match the prefix of the earlier passes, added to the row's histogram."""
    row = tl.program_id(0)
    blk = tl.program_id(1)
    kk = _row_budget(budget_ptr, row, n_forced, S, HKV, HKV_PAD, LAYER)
    hrow = hist_ptr + row * (4 * 256)
    prefix, pmask, _ = _descend(hrow, kk, PASS)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < S
    key = _keys(s_ptr + row.to(tl.int64) * S, offs, valid, sink, recent_start, PREP)
    match = valid & ((key & pmask) == prefix)
    digit = ((key >> (24 - 8 * PASS)) & 0xFF).to(tl.int32)
    hist = tl.histogram(digit, 256, mask=match)
    tl.atomic_add(hrow + PASS * 256 + tl.arange(0, 256), hist, sem="relaxed")


@triton.jit
def _count_kernel(
    s_ptr, budget_ptr, hist_ptr, cnt_ptr, S, n_forced, sink, recent_start, NB,
    HKV: tl.constexpr, HKV_PAD: tl.constexpr, LAYER: tl.constexpr, BLOCK: tl.constexpr,
    PREP: tl.constexpr,
):  # fmt: skip
    """Per block: how many keys equal the threshold and how many lie above it."""
    row = tl.program_id(0)
    blk = tl.program_id(1)
    kk = _row_budget(budget_ptr, row, n_forced, S, HKV, HKV_PAD, LAYER)
    t, _, _ = _descend(hist_ptr + row * (4 * 256), kk, 4)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < S
    key = _keys(s_ptr + row.to(tl.int64) * S, offs, valid, sink, recent_start, PREP)
    c = cnt_ptr + (row * NB + blk) * 2
    tl.store(c, tl.sum((valid & (key == t)).to(tl.int32), axis=0))
    tl.store(c + 1, tl.sum((valid & (key > t)).to(tl.int32), axis=0))


@triton.jit
def _write_kernel(
    s_ptr, budget_ptr, hist_ptr, cnt_ptr, keep_ptr, idx_ptr, S, n_forced, sink, recent_start,
    NB, HKV: tl.constexpr, HKV_PAD: tl.constexpr, LAYER: tl.constexpr, BLOCK: tl.constexpr,
    NB_PAD: tl.constexpr, PREP: tl.constexpr,
):  # fmt: skip
    """Per block: keep the keys above the threshold and the ties whose rank in position order is
    within what is missing; write the keep mask and each kept position at its running count."""
    row = tl.program_id(0)
    blk = tl.program_id(1)
    kk = _row_budget(budget_ptr, row, n_forced, S, HKV, HKV_PAD, LAYER)
    t, _, missing = _descend(hist_ptr + row * (4 * 256), kk, 4)
    missing = tl.where(kk > 0, missing, 0)
    offs_b = tl.arange(0, NB_PAD)
    before = offs_b < blk
    c = cnt_ptr + (row * NB + offs_b) * 2
    ties_before = tl.sum(tl.load(c, mask=before, other=0), axis=0)
    above_before = tl.sum(tl.load(c + 1, mask=before, other=0), axis=0)
    kept_before = above_before + tl.minimum(ties_before, missing)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < S
    key = _keys(s_ptr + row.to(tl.int64) * S, offs, valid, sink, recent_start, PREP)
    tie = valid & (key == t)
    tie_rank = ties_before + tl.cumsum(tie.to(tl.int32), 0)  # inclusive, in position order
    # (the block-shaped kk > 0: the interpreter refuses a mask broadcast from a scalar)
    keep = valid & ((key > t) | (tie & (tie_rank <= missing))) & (offs * 0 + kk > 0)
    slot = kept_before + tl.cumsum(keep.to(tl.int32), 0) - 1
    # the row keeps kk positions exactly: slots kk.. are zero (this block's share of them)
    tail = kk + offs
    zero = tl.zeros([BLOCK], tl.int64)
    if LAYER:
        for h in tl.static_range(HKV):
            out = (row * HKV + h).to(tl.int64) * S
            tl.store(keep_ptr + out + offs, keep, mask=valid)
            tl.store(idx_ptr + out + slot, offs.to(tl.int64), mask=keep)
            tl.store(idx_ptr + out + tail, zero, mask=tail < S)
    else:
        out = row.to(tl.int64) * S
        tl.store(keep_ptr + out + offs, keep, mask=valid)
        tl.store(idx_ptr + out + slot, offs.to(tl.int64), mask=keep)
        tl.store(idx_ptr + out + tail, zero, mask=tail < S)


def keep_and_indices_triton(
    ranked: Tensor,
    budget: Tensor,
    n_forced: int,
    num_heads: int,
    *,
    block: int = 1024,
    forced: tuple[int, int] | None = None,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The keep mask and the ascending kept positions of every row (six launches and one
    fill, whatever the length).

    Args:
        ranked: (B, Hs, S) float32 scores as ``TopKSelector._ranked`` returns them (Hs = Hkv,
            or 1 for ``granularity="layer"``), or, with ``forced``, the raw (B, Hkv, S) scores
            that ``_ranked`` would prepare.
        budget: (B, Hkv) integer device budget.
        n_forced: ``TopKSelector.num_forced(S)``.
        num_heads: Hkv.
        block: positions per step of each pass (a power of two).
        forced: (sinks, recent): the kernels prepare raw scores as ``_ranked`` does (NaN lowest,
            +-inf clamped to the finite range, positions ``< sinks`` and ``>= S - recent`` at
            +inf) while they read them, which saves ``_ranked``'s launches.
        out: (keep, idx) tensors of the returned shapes and dtypes, contiguous, written in place
            (None: new ones).

    Returns:
        keep (B, Hkv, S) bool with ``clamp(max(budget, n_forced), 0, S)`` True entries per row
        (``"layer"``: the largest budget of the batch row), and idx (B, Hkv, S) int64 whose first
        that-many entries of each row are the kept positions in ascending order (the rest are
        zero).

    Raises:
        ValueError: shapes that do not fit, a bad ``out`` or ``forced``, or a device the kernel
            cannot run on.
    """
    b, hs, s = ranked.shape
    if ranked.dtype != torch.float32:
        raise ValueError(f"ranked: expected float32, got {ranked.dtype}")
    if hs not in (1, num_heads) or tuple(budget.shape) != (b, num_heads):
        raise ValueError(
            f"budget: expected shape (B, Hkv) = {(b, num_heads)} for ranked scores of shape "
            f"{tuple(ranked.shape)}, got {tuple(budget.shape)}"
        )
    if forced is not None and (hs != num_heads or len(forced) != 2 or min(forced) < 0):
        raise ValueError(
            f"forced: expected (sinks, recent) >= 0 with raw (B, Hkv, S) scores, got {forced} "
            f"for scores of shape {tuple(ranked.shape)}"
        )
    if not (ranked.is_cuda or (INTERPRETED and ranked.device.type == "cpu")):
        raise ValueError(
            f"ranked: the select kernel needs a CUDA tensor (or TRITON_INTERPRET=1 with CPU "
            f"tensors), got device {ranked.device}"
        )
    shape = (b, num_heads, s)
    if out is None:
        keep = torch.empty(shape, dtype=torch.bool, device=ranked.device)
        idx = torch.empty(shape, dtype=torch.int64, device=ranked.device)
    else:
        keep, idx = out
        check_buffer("out: keep", keep, shape, torch.bool, ranked.device)
        check_buffer("out: idx", idx, shape, torch.int64, ranked.device)
    if s == 0 or b == 0:
        return keep, idx
    layer = hs == 1 and num_heads > 1
    rows, nb = b * hs, triton.cdiv(s, block)
    ranked, budget = ranked.contiguous(), budget.contiguous()
    hist = torch.zeros(rows, 4, 256, dtype=torch.int32, device=ranked.device)
    cnt = torch.empty(rows, nb, 2, dtype=torch.int32, device=ranked.device)
    sink, recent = forced if forced is not None else (0, 0)
    bounds = (int(n_forced), min(int(sink), s), s - min(int(recent), s))
    meta = {"HKV": num_heads, "HKV_PAD": triton.next_power_of_2(num_heads), "LAYER": layer,
            "BLOCK": block, "PREP": forced is not None, "num_warps": 4}  # fmt: skip
    for p in range(4):
        _hist_kernel[(rows, nb)](ranked, budget, hist, s, *bounds, PASS=p, **meta)
    _count_kernel[(rows, nb)](ranked, budget, hist, cnt, s, *bounds, nb, **meta)
    _write_kernel[(rows, nb)](
        ranked, budget, hist, cnt, keep, idx, s, *bounds, nb,
        NB_PAD=triton.next_power_of_2(nb), **meta,
    )  # fmt: skip
    return keep, idx
