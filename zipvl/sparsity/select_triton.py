# pyright: reportArgumentType=false, reportOperatorIssue=false, reportAttributeAccessIssue=false, reportCallIssue=false, reportIndexIssue=false, reportGeneralTypeIssues=false
# (Triton's constexpr arguments are not statically typed)
"""The keep mask and the kept positions of a device budget in one launch (imported on first use:
triton is optional).

``TopKSelector.keep_mask`` ranks every row by a stable descending sort (about ten launches at an
8k prompt: the order-preserving transform, the radix passes, the scatter of ranks, the compare)
and the captured plan then compacts the kept positions by a running count (a scan, a scatter
into zeros). This kernel does both in one program per row, in five passes over the row's
``ranked`` scores (float32, NaN and the forced tokens already mapped by ``TopKSelector._ranked``):

1. four radix passes find the ``kk``-th largest score ``t`` of the row exactly: each pass
   histograms one byte (high to low) of the order-preserving uint32 keys of the scores whose
   higher bytes equal the prefix found so far (``tl.histogram`` with a mask), and descends into
   the byte where the count from the top reaches what is still missing;
2. a last pass in position order keeps every score above ``t`` and, of the scores equal to
   ``t``, the lowest positions (a running count), as many as are missing; the running count of
   kept tokens is each kept position's slot in the compacted list.

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

__all__ = ["INTERPRETED", "keep_and_indices_triton"]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether Triton was told to interpret kernels (read at import, as Triton reads it)."""


@triton.jit
def _keys(s_ptr, offs, valid):
    """Order-preserving uint32 keys of float32 scores (greater score, greater key; -0.0 is
    +0.0, as the sort compares them)."""
    x = tl.load(s_ptr + offs, mask=valid, other=0.0) + 0.0  # -0.0 + 0.0 = +0.0
    b = x.to(tl.uint32, bitcast=True)
    top_bit = tl.full((), 1, tl.uint32) << 31
    return tl.where((b & top_bit) != 0, ~b, b | top_bit)


@triton.jit
def _keep_and_indices_kernel(
    s_ptr,  # (B, HS, S) float32 ranked scores, contiguous
    budget_ptr,  # (B, HKV) integer budget, contiguous
    keep_ptr,  # (B, HKV, S) bool out
    idx_ptr,  # (B, HKV, S) int64 out: kept positions at slots 0 .. kk - 1 (the rest untouched)
    S,
    n_forced,
    HKV: tl.constexpr,
    HKV_PAD: tl.constexpr,
    LAYER: tl.constexpr,  # one ranked row per batch row, shared by its HKV heads
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)  # b * HS + hs
    if LAYER:
        b = row
        offs_h = tl.arange(0, HKV_PAD)
        bud = tl.load(budget_ptr + b * HKV + offs_h, mask=offs_h < HKV, other=-(2**31) + 1)
        kk = tl.max(bud.to(tl.int64), axis=0)
    else:
        b = row // HKV
        kk = tl.load(budget_ptr + row).to(tl.int64)
    kk = tl.minimum(tl.maximum(kk, n_forced), S).to(tl.int32)
    srow = s_ptr + row.to(tl.int64) * S
    # -- radix select of the kk-th largest key (prefix of bytes found so far, high to low) -----
    prefix = tl.zeros((), tl.uint32)
    pmask = tl.zeros((), tl.uint32)
    missing = tl.maximum(kk, 1)  # kk == 0 keeps nothing: any threshold does, none is taken
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros((256,), tl.int32)
        for start in range(0, S, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < S
            key = _keys(srow, offs, valid)
            match = valid & ((key & pmask) == prefix)
            digit = ((key >> shift) & 0xFF).to(tl.int32)
            hist += tl.histogram(digit, 256, mask=match)
        top = tl.cumsum(tl.flip(hist, 0), 0)  # top[j]: matches with digit >= 255 - j
        j = tl.sum((top < missing).to(tl.int32), axis=0)  # first j with top[j] >= missing
        above = tl.max(tl.where(top < missing, top, 0), axis=0)  # digits > 255 - j
        missing -= above
        prefix = prefix | ((255 - j).to(tl.uint32) << shift)
        pmask = pmask | (tl.full((), 0xFF, tl.uint32) << shift)
    # -- keep: above t, and the lowest-positioned ties at t; compact by running count ---------
    missing = tl.where(kk > 0, missing, 0)
    ties = tl.zeros((), tl.int32)
    kept = tl.zeros((), tl.int32)
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < S
        key = _keys(srow, offs, valid)
        tie = valid & (key == prefix)
        tie_rank = ties + tl.cumsum(tie.to(tl.int32), 0)  # inclusive, in position order
        # (the block-shaped kk > 0: the interpreter refuses a mask broadcast from a scalar)
        keep = valid & ((key > prefix) | (tie & (tie_rank <= missing))) & (offs * 0 + kk > 0)
        slot = kept + tl.cumsum(keep.to(tl.int32), 0) - 1
        if LAYER:
            for h in tl.static_range(HKV):
                out = (b * HKV + h).to(tl.int64) * S
                tl.store(keep_ptr + out + offs, keep, mask=valid)
                tl.store(idx_ptr + out + slot, offs.to(tl.int64), mask=keep)
        else:
            out = row.to(tl.int64) * S
            tl.store(keep_ptr + out + offs, keep, mask=valid)
            tl.store(idx_ptr + out + slot, offs.to(tl.int64), mask=keep)
        ties += tl.sum(tie.to(tl.int32), axis=0)
        kept += tl.sum(keep.to(tl.int32), axis=0)


def keep_and_indices_triton(
    ranked: Tensor, budget: Tensor, n_forced: int, num_heads: int, *, block: int = 1024
) -> tuple[Tensor, Tensor]:
    """The keep mask and the ascending kept positions of every row, in one launch.

    Args:
        ranked: (B, Hs, S) float32 scores as ``TopKSelector._ranked`` returns them (Hs = Hkv,
            or 1 for ``granularity="layer"``).
        budget: (B, Hkv) integer device budget.
        n_forced: ``TopKSelector.num_forced(S)``.
        num_heads: Hkv.
        block: positions per step of each pass (a power of two).

    Returns:
        keep (B, Hkv, S) bool with ``clamp(max(budget, n_forced), 0, S)`` True entries per row
        (``"layer"``: the largest budget of the batch row), and idx (B, Hkv, S) int64 whose first
        that-many entries of each row are the kept positions in ascending order (the rest are
        zero).

    Raises:
        ValueError: shapes that do not fit, or a device the kernel cannot run on.
    """
    b, hs, s = ranked.shape
    if ranked.dtype != torch.float32:
        raise ValueError(f"ranked: expected float32, got {ranked.dtype}")
    if hs not in (1, num_heads) or tuple(budget.shape) != (b, num_heads):
        raise ValueError(
            f"budget: expected shape (B, Hkv) = {(b, num_heads)} for ranked scores of shape "
            f"{tuple(ranked.shape)}, got {tuple(budget.shape)}"
        )
    if not (ranked.is_cuda or (INTERPRETED and ranked.device.type == "cpu")):
        raise ValueError(
            f"ranked: the select kernel needs a CUDA tensor (or TRITON_INTERPRET=1 with CPU "
            f"tensors), got device {ranked.device}"
        )
    layer = hs == 1 and num_heads > 1
    keep = torch.empty(b, num_heads, s, dtype=torch.bool, device=ranked.device)
    idx = torch.zeros(b, num_heads, s, dtype=torch.int64, device=ranked.device)
    if s == 0 or b == 0:
        return keep, idx
    _keep_and_indices_kernel[(b * hs,)](
        ranked.contiguous(), budget.contiguous(), keep, idx, s, int(n_forced),
        HKV=num_heads, HKV_PAD=triton.next_power_of_2(num_heads), LAYER=layer, BLOCK=block,
        num_warps=4,
    )  # fmt: skip
    return keep, idx
