# pyright: reportArgumentType=false, reportOperatorIssue=false, reportAttributeAccessIssue=false, reportCallIssue=false, reportIndexIssue=false
# (Triton's constexpr arguments and tensor tuples are not statically typed)
"""One Triton launch that writes pages of a ``PagedKVStore``: gather, quantize, pack, store.

``PagedKVStore._write_pages`` in PyTorch is about 130 small operations per precision class
(the page gather, ``quantize_pages``' statistics, rounding, codes and packing, seven pool
copies and the page-table update). At a 32k prompt on an H200 their GPU time is under 1 ms
per layer, but their host time is several: the GPU waits on the host between the layer's
attention and its MLP. This kernel does all of it in one launch.

One program per candidate page and part ``(row r, page m, keys or values)``, walking the
page in chunks of ``R`` tokens (statistics first, then codes); pages ``m >= full[r]`` write
nothing, except, with staging, the row's partial page ``m == full[r]``, whose tokens go to the
full-precision staging region as they are.

* load the page's P token indices ``idx[r, m P : (m + 1) P]`` and gather its keys and values
  (B, H, S, D) by strides (row r = b H + h), as float32, NaN and infinities as 0;
* keys, one group per channel over the page (ZipCache): ``zero = round_down(min)``,
  ``scale = round_up(max(div_rn(max - zero, levels), tiny))``;
* values: the channel divisor ``cs = round_down(max(sqrt_rn(max |v|), 2^-14))`` (CST), then
  per token over ``v / cs``, the same min / max parameters;
* codes ``clamp(floor(div_rn(x - zero, scale) + 0.5), 0, levels)`` packed in the
  contiguous-slices layout of ``zipvl.quant.primitives.pack``;
* store codes and parameters at pool page ``base[r] + m`` and that page's number in column
  ``num_pages[r] + m`` of the row's page table (fill P); a row with more pages than the grid,
  or a page past the pool, sets a flag instead of being written.

Bit-exact agreement with ``zipvl.cache.paged.quantize_pages`` by construction, as in
``zipvl.quant.triton_kernels``: the same float32 operations in the same order, IEEE divisions
and square root (``div_rn``, ``sqrt_rn``), parameter rounding by exact power-of-two scaling.
Tested against the PyTorch path under ``TRITON_INTERPRET=1`` on the CPU and on a GPU.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import triton
import triton.language as tl
from torch import Tensor

from zipvl.cache.paged import _MIN_CHANNEL_SCALE
from zipvl.quant.primitives import _TINY_SCALE
from zipvl.quant.spec import param_grid
from zipvl.quant.triton_kernels import _PD_CODE, INTERPRETED, _round_param

__all__ = ["INTERPRETED", "page_write_problem", "write_pages_triton"]

# tokens of a page a program holds at once, and warps per program: an (R, D) tile in
# registers. Compiled for sm_90 (bench/sm90_page_write_sass.py, Triton 3.9): the whole
# (128, 128) page at once spilled 8 KB of stack per program at 4 warps (the first version:
# 1.2 ms per launch at a 32k prompt on an H200); chunks of 32 tokens at 8 warps take 99
# registers and no stack
ROWS_PER_CHUNK = 32
WARPS = 8


@triton.jit
def _codes_packed(x, zero, scale, LEVELS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                  BITS: tl.constexpr):  # fmt: skip
    """Codes of x (ROWS, D) packed along D (contiguous slices): (ROWS, D * BITS // 8) int32."""
    PER: tl.constexpr = 8 // BITS
    MB: tl.constexpr = D // PER
    y = tl.math.div_rn(x - zero, scale)
    codes = tl.minimum(tl.maximum(tl.floor(y + 0.5), 0.0), LEVELS).to(tl.int32)
    if PER == 1:
        return codes
    sl = tl.reshape(codes, (ROWS, PER, MB))  # slice i = channels [i MB, (i + 1) MB)
    shifts = tl.arange(0, PER) * BITS
    return tl.sum(sl << shifts[None, :, None], axis=1)  # disjoint bits: sum == or


@triton.jit
def _load_rows(ptr, base, stride_t, idx_ptr, idx_base, first, R: tl.constexpr, D: tl.constexpr,
               IDENTITY: tl.constexpr):  # fmt: skip
    """Rows ``first .. first + R`` of a page (R, D) as float32, NaN and +-inf as 0 (in their
    own token, as torch.nan_to_num stores them)."""
    t = first + tl.arange(0, R)
    if IDENTITY:  # noqa: SIM108 (a compile-time branch: only one load is emitted)
        tok = t.to(tl.int64)
    else:
        tok = tl.load(idx_ptr + idx_base + t).to(tl.int64)
    x = tl.load(ptr + base + tok[:, None] * stride_t + tl.arange(0, D)[None, :]).to(tl.float32)
    return tl.where((x == x) & (tl.abs(x) != float("inf")), x, 0.0)


# strides and sizes vary with the batch, the prompt length and the source (a prompt's K/V or a
# staging region): not specialized on, so one compile serves them all
@triton.jit(
    do_not_specialize=["skb", "skh", "skt", "svb", "svh", "svt", "H", "s_idx", "s_tab", "s_fp",
                       "stage_base", "region", "cap", "n_pages"]
)  # fmt: skip
def _write_pages_kernel(
    k_ptr,
    v_ptr,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    H,
    idx_ptr,
    s_idx,
    full_ptr,
    base_ptr,
    npages_ptr,
    table_ptr,
    fill_ptr,
    s_tab,
    kcode_ptr,
    vcode_ptr,
    kscale_ptr,
    kzero_ptr,
    vscale_ptr,
    vzero_ptr,
    vcs_ptr,
    fpk_ptr,
    fpv_ptr,
    s_fp,
    stage_base,
    n_ptr,
    fpcount_ptr,
    region,
    cap,
    n_pages,
    flag_ptr,
    P: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    LEVELS: tl.constexpr,
    EMIN: tl.constexpr,
    MANT: tl.constexpr,
    PD: tl.constexpr,
    TINY_SCALE: tl.constexpr,
    MIN_CS: tl.constexpr,
    CST: tl.constexpr,
    IDENTITY: tl.constexpr,
    R: tl.constexpr,
    STAGE: tl.constexpr,
):
    # One program per (row, candidate page, part): part 0 writes the keys and the page-table
    # entry, part 1 the values. A page is walked in chunks of R tokens twice (statistics, then
    # codes; the second read hits L2), so a program holds an (R, D) tile, not the whole page.
    MB: tl.constexpr = D * BITS // 8
    r = tl.program_id(0)
    m = tl.program_id(1)
    part = tl.program_id(2)
    full = tl.load(full_ptr + r)
    dest = tl.load(base_ptr + r).to(tl.int64) + m
    # counts beyond the host bounds (more pages than the grid or the pool holds): flagged, and
    # nothing is written past the pool
    bad = ((m == 0) & (full > n_pages)) | ((m < full) & (dest >= cap))
    if (part == 0) & bad:
        tl.store(flag_ptr, 1)
    if (m < full) & (dest < cap):
        b = (r // H).to(tl.int64)
        h = (r % H).to(tl.int64)
        ibase = r.to(tl.int64) * s_idx + m * P
        c = tl.arange(0, D)
        jr = tl.arange(0, R)
        j = tl.arange(0, MB)
        if part == 0:
            kb = b * skb + h * skh
            # keys: one group per channel over the page
            lo = tl.full((D,), float("inf"), tl.float32)
            hi = tl.full((D,), float("-inf"), tl.float32)
            for i in range(P // R):
                k = _load_rows(k_ptr, kb, skt, idx_ptr, ibase, i * R, R, D, IDENTITY)
                lo = tl.minimum(lo, tl.min(k, axis=0))
                hi = tl.maximum(hi, tl.max(k, axis=0))
            levels = tl.full((D,), LEVELS, tl.float32)
            kzero = _round_param(lo, EMIN, MANT, PD, False)  # (D,)
            kscale = tl.maximum(tl.math.div_rn(hi - kzero, levels), TINY_SCALE)
            kscale = _round_param(kscale, EMIN, MANT, PD, True)
            for i in range(P // R):
                k = _load_rows(k_ptr, kb, skt, idx_ptr, ibase, i * R, R, D, IDENTITY)
                kp = _codes_packed(k, kzero[None, :], kscale[None, :], LEVELS, R, D, BITS)
                coff = dest * (P * MB) + (i * R + jr)[:, None] * MB + j[None, :]
                tl.store(kcode_ptr + coff, kp.to(tl.uint8))
            tl.store(kscale_ptr + dest * D + c, kscale)
            tl.store(kzero_ptr + dest * D + c, kzero)
            col = tl.load(npages_ptr + r).to(tl.int64) + m
            tl.store(table_ptr + r.to(tl.int64) * s_tab + col, dest.to(tl.int32))
            tl.store(fill_ptr + r.to(tl.int64) * s_tab + col, P)
        else:
            vb = b * svb + h * svh
            # values: the channel divisor over the page, then one group per token
            if CST:
                amax = tl.zeros((D,), tl.float32)
                for i in range(P // R):
                    v = _load_rows(v_ptr, vb, svt, idx_ptr, ibase, i * R, R, D, IDENTITY)
                    amax = tl.maximum(amax, tl.max(tl.abs(v), axis=0))
                cs = tl.maximum(tl.math.sqrt_rn(amax), MIN_CS)
                cs = _round_param(cs, EMIN, MANT, PD, False)  # (D,)
            else:
                cs = tl.full((D,), 1.0, tl.float32)
            vlevels = tl.full((R,), LEVELS, tl.float32)
            for i in range(P // R):
                v = _load_rows(v_ptr, vb, svt, idx_ptr, ibase, i * R, R, D, IDENTITY)
                vq = tl.math.div_rn(v, tl.broadcast_to(cs[None, :], (R, D)))
                vzero = _round_param(tl.min(vq, axis=1), EMIN, MANT, PD, False)  # (R,)
                vscale = tl.maximum(
                    tl.math.div_rn(tl.max(vq, axis=1) - vzero, vlevels), TINY_SCALE
                )
                vscale = _round_param(vscale, EMIN, MANT, PD, True)
                vp = _codes_packed(vq, vzero[:, None], vscale[:, None], LEVELS, R, D, BITS)
                rows = i * R + jr
                coff = dest * (P * MB) + rows[:, None] * MB + j[None, :]
                tl.store(vcode_ptr + coff, vp.to(tl.uint8))
                tl.store(vscale_ptr + dest * P + rows, vscale)
                tl.store(vzero_ptr + dest * P + rows, vzero)
            tl.store(vcs_ptr + dest * D + c, cs)
    elif STAGE:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if m == full:
            # the row's last, partial page: its n - full P tokens (< P) go to the staging region
            # at full precision, slots 0, 1, ...
            rem = tl.load(n_ptr + r) - full * P
            b = (r // H).to(tl.int64)
            h = (r % H).to(tl.int64)
            ibase = r.to(tl.int64) * s_idx + m * P
            c = tl.arange(0, D)
            jr = tl.arange(0, R)
            if part == 0:
                src_ptr = k_ptr + b * skb + h * skh
                st = skt
                dst_ptr = fpk_ptr
                tl.store(fpcount_ptr + r.to(tl.int64) * 4 + region, rem.to(tl.int32))
            else:
                src_ptr = v_ptr + b * svb + h * svh
                st = svt
                dst_ptr = fpv_ptr
            for i in range(P // R):
                t = i * R + jr
                live = t < rem
                tok = tl.load(idx_ptr + ibase + t, mask=live, other=0).to(tl.int64)
                x = tl.load(src_ptr + tok[:, None] * st + c[None, :], mask=live[:, None])
                slot = r.to(tl.int64) * s_fp + (stage_base + t)[:, None] * D + c[None, :]
                tl.store(dst_ptr + slot, x.to(dst_ptr.dtype.element_ty), mask=live[:, None])


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def page_write_problem(page_size: int, head_dim: int, device: torch.device) -> str | None:
    """Why the page-write kernel cannot run for this store, or None."""
    if not _pow2(page_size):
        return f"a power-of-two page_size (got {page_size})"
    if not _pow2(head_dim) or head_dim < 4:
        return f"a power-of-two head_dim >= 4 (got {head_dim})"
    if device.type != "cuda" and not INTERPRETED:
        return (
            f"CUDA tensors (or TRITON_INTERPRET=1 set before zipvl.cache.page_triton is first "
            f"imported), got device {device}"
        )
    return None


def write_pages_triton(
    k: Tensor,
    v: Tensor,
    idx: Tensor | None,
    full: Tensor,
    base: Tensor,
    num_pages: Tensor,
    table: Tensor,
    fill: Tensor,
    pool: dict[str, Tensor],
    *,
    pages: int,
    bits: int,
    levels: int,
    param_dtype: torch.dtype,
    channel_separable: bool,
    stage: tuple[Tensor, Tensor, Tensor, Tensor, int, int] | None = None,
    flag: Tensor | None = None,
) -> None:
    """Launch the page-write kernel (module docstring); no host sync.

    Args:
        k: (B, H, S, D) source keys (last dim contiguous), row r = b H + h; v: values.
        idx: (B H, >= pages P) int token indices into S, or None for tokens [0, pages P).
        full: (B H,) integer, live pages of each row (more than ``pages``: see ``flag``).
        base: (B H,) int64, pool page of each row's first live page.
        num_pages: (B H,) int32, table column of each row's first live page.
        table, fill: (B H, cols) int32 page table and fill counts (contiguous rows).
        pool: the class's pool tensors (``PagedKVStore._new_pool``).
        pages: candidate pages per row (the grid's second dimension).
        stage: optional ``(fp_k, fp_v, counts, fp_count, region, base)``: also write each
            row's last, partial page (``counts[r] - full[r] P`` tokens, ``counts`` the row's
            tokens of this class, in ``idx`` order) into slots ``base, base + 1, ...`` of the
            full-precision buffers ``fp_k`` / ``fp_v`` (rows, slots, D), and that count into
            ``fp_count[r, region]`` (rows, 4) int32. Needs ``idx``.
        flag: optional (1,) int32, set to 1 when a row has more than ``pages`` pages or a
            page falls past the pool (such pages are not written).
    """
    b, h, _, d = k.shape
    rows = b * h
    p = pool["kcode"].shape[1]
    if (pages == 0 and stage is None) or rows == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k, v: expected the last dim contiguous")
    emin, mant = param_grid(param_dtype) or (0, 0)
    ident = idx is None
    idx_t = full if idx is None else idx
    if flag is None:
        flag = torch.zeros(1, dtype=torch.int32, device=k.device)
    if stage is not None:
        if idx is None:
            raise ValueError("stage: the partial page is read through idx, got idx=None")
        fpk, fpv, counts, fp_count, region, stage_base = stage
    else:
        fpk, fpv, counts, fp_count, region, stage_base = k, v, full, full, 0, 0
    kernel = cast(Any, _write_pages_kernel)
    kernel[(rows, pages + (stage is not None), 2)](
        k, v, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), h,
        idx_t, 0 if idx is None else idx.stride(0), full, base, num_pages, table, fill,
        table.stride(0), pool["kcode"], pool["vcode"], pool["kscale"], pool["kzero"],
        pool["vscale"], pool["vzero"], pool["vcs"], fpk, fpv,
        fpk.stride(0) if stage is not None else 0, stage_base, counts, fp_count, region,
        pool["kcode"].shape[0], pages, flag,
        P=p, D=d, BITS=bits, LEVELS=levels, EMIN=emin, MANT=mant,
        PD=_PD_CODE[param_dtype], TINY_SCALE=_TINY_SCALE, MIN_CS=_MIN_CHANNEL_SCALE,
        CST=channel_separable, IDENTITY=ident, R=min(p, ROWS_PER_CHUNK), STAGE=stage is not None,
        num_warps=WARPS,
    )  # fmt: skip
