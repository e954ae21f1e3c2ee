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
  contiguous-slices layout of ``zipvl.quant.primitives.pack``, or (``FRAG``) in the fragment
  order of ``zipvl.quant.fragment`` (a fixed column permutation before the slice packer, and
  at 2 bits a row-pair interleave of words): keys are loaded with their channels permuted and
  packed rows stored at interleaved addresses; values, stored channel-major, are loaded in
  chunks of 32 tokens in a permuted order and packed along the tokens (a chunk fills the same
  16 or 8 bytes of every channel row); statistics go to their natural channels and tokens;
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
from zipvl.quant.fragment import FRAGMENT_BITS, FRAGMENT_SIZE
from zipvl.quant.primitives import _TINY_SCALE
from zipvl.quant.spec import param_grid
from zipvl.quant.triton_kernels import _PD_CODE, INTERPRETED, _round_param

__all__ = ["INTERPRETED", "page_write_problem", "write_pages_triton"]

# tokens of a page a program holds at once, and warps per program: an (R, D) tile in
# registers. Compiled for sm_90 (bench/sm90_page_write_sass.py, Triton 3.9): the whole
# (128, 128) page at once spilled 8 KB of stack per program at 4 warps (the first version:
# 1.2 ms per launch at a 32k prompt on an H200); chunks of 32 tokens at 8 warps take 99
# registers and no stack (the fragment order: 97). The fragment order needs chunks of 32
ROWS_PER_CHUNK = 32
WARPS = 8


@triton.jit
def _codes(x, zero, scale, LEVELS: tl.constexpr):
    """``clamp(floor(div_rn(x - zero, scale) + 0.5), 0, levels)`` as int32."""
    y = tl.math.div_rn(x - zero, scale)
    return tl.minimum(tl.maximum(tl.floor(y + 0.5), 0.0), LEVELS).to(tl.int32)


@triton.jit
def _codes_packed(x, zero, scale, LEVELS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                  BITS: tl.constexpr):  # fmt: skip
    """Codes of x (ROWS, D) packed along D (contiguous slices): (ROWS, D * BITS // 8) int32."""
    PER: tl.constexpr = 8 // BITS
    MB: tl.constexpr = D // PER
    codes = _codes(x, zero, scale, LEVELS)
    if PER == 1:
        return codes
    sl = tl.reshape(codes, (ROWS, PER, MB))  # slice i = channels [i MB, (i + 1) MB)
    shifts = tl.arange(0, PER) * BITS
    return tl.sum(sl << shifts[None, :, None], axis=1)  # disjoint bits: sum == or


@triton.jit
def _frag_columns(c, BITS: tl.constexpr):
    """The fragment order's column permutation (``zipvl.quant.fragment._columns``) of a
    128-column row: the column whose code the slice packer puts at position ``c``."""
    if BITS == 4:  # c = 64 slot + 16 t + 4 w + 2 e + h
        s, t, w, e, h = c >> 6, (c >> 4) & 3, (c >> 2) & 3, (c >> 1) & 1, c & 1
        return 32 * w + 16 * h + 4 * t + 2 * s + e
    else:  # c = 32 (2 h + b) + 8 t + 4 j + 2 e + i
        h, b, t, j, e, i = c >> 6, (c >> 5) & 1, (c >> 3) & 3, (c >> 2) & 1, (c >> 1) & 1, c & 1
        return 32 * (2 * j + i) + 16 * h + 4 * t + 2 * b + e


@triton.jit
def _frag_chunk_tokens(rho, BITS: tl.constexpr):
    """The token (of a 32-token chunk) whose codes the slice packer, packing 32 rows along the
    rows, puts at row ``rho``: the fragment permutation restricted to one chunk, which fills
    bytes ``_frag_chunk_bytes`` of every channel row."""
    if BITS == 4:  # rho = 16 slot + 4 t + 2 e + h
        s, t, e, h = rho >> 4, (rho >> 2) & 3, (rho >> 1) & 1, rho & 1
        return 16 * h + 4 * t + 2 * s + e
    else:  # rho = 8 (2 h + b) + 2 t + e
        h, b, t, e = rho >> 4, (rho >> 3) & 1, (rho >> 1) & 3, rho & 1
        return 16 * h + 4 * t + 2 * b + e


@triton.jit
def _frag_chunk_bytes(beta, chunk, BITS: tl.constexpr):
    """Byte of a fragment row (before the 2-bit row-pair interleave) that packed byte ``beta``
    of 32-token chunk ``chunk`` (tokens 32 chunk .. 32 chunk + 31) goes to."""
    if BITS == 4:  # beta = 4 t + j: word 4 t + chunk, byte j
        return 16 * (beta >> 2) + 4 * chunk + (beta & 3)
    else:  # beta = 2 t + e, chunk = 2 j + i: word 2 t + j, byte 2 e + i
        return 8 * (beta >> 1) + 4 * (chunk >> 1) + 2 * (beta & 1) + (chunk & 1)


@triton.jit
def _frag_offsets(row, byte, BITS: tl.constexpr):
    """Offset in a fragment-ordered page of ``byte`` of packed row ``row``: rows of 64 bytes
    at 4 bits; at 2 bits rows of 32 bytes whose words interleave in pairs ``g``, ``g + 8`` of
    each block of 16 rows (stored word 16 g + 4 t + 2 half + j)."""
    if BITS == 4:
        return row * 64 + byte
    else:
        return (row >> 4) * 512 + (row & 7) * 64 + ((row >> 3) & 1) * 8 + byte + (byte >> 3) * 8


@triton.jit
def _load_rows(ptr, base, stride_t, idx_ptr, idx_base, t, c, IDENTITY: tl.constexpr):
    """Tokens ``t`` (R,) of a page (positions in the page), channels ``c`` (D,): (R, D) as
    float32, NaN and +-inf as 0 (in their own token, as torch.nan_to_num stores them)."""
    if IDENTITY:  # noqa: SIM108 (a compile-time branch: only one load is emitted)
        tok = t.to(tl.int64)
    else:
        tok = tl.load(idx_ptr + idx_base + t).to(tl.int64)
    x = tl.load(ptr + base + tok[:, None] * stride_t + c[None, :]).to(tl.float32)
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
    FRAG: tl.constexpr,
):
    # One program per (row, candidate page, part): part 0 writes the keys and the page-table
    # entry, part 1 the values. A page is walked in chunks of R tokens twice (statistics, then
    # codes; the second read hits L2), so a program holds an (R, D) tile, not the whole page.
    MB: tl.constexpr = D * BITS // 8
    # the fragment order: 128 x 128 pages of 2- or 4-bit codes, walked in 32-token chunks
    tl.static_assert((not FRAG) or (P == 128 and D == 128 and R == 32 and BITS != 8))
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
            # keys: one group per channel over the page. In the fragment order the channels
            # are loaded permuted (tile column c holds channel kc[c]), so that the slice packer
            # writes fragment rows; the statistics go to the natural channels
            kc = _frag_columns(c, BITS) if FRAG else c
            lo = tl.full((D,), float("inf"), tl.float32)
            hi = tl.full((D,), float("-inf"), tl.float32)
            for i in range(P // R):
                k = _load_rows(k_ptr, kb, skt, idx_ptr, ibase, i * R + jr, kc, IDENTITY)
                lo = tl.minimum(lo, tl.min(k, axis=0))
                hi = tl.maximum(hi, tl.max(k, axis=0))
            levels = tl.full((D,), LEVELS, tl.float32)
            kzero = _round_param(lo, EMIN, MANT, PD, False)  # (D,)
            kscale = tl.maximum(tl.math.div_rn(hi - kzero, levels), TINY_SCALE)
            kscale = _round_param(kscale, EMIN, MANT, PD, True)
            for i in range(P // R):
                k = _load_rows(k_ptr, kb, skt, idx_ptr, ibase, i * R + jr, kc, IDENTITY)
                kp = _codes_packed(k, kzero[None, :], kscale[None, :], LEVELS, R, D, BITS)
                if FRAG:
                    off = _frag_offsets((i * R + jr)[:, None], j[None, :], BITS)
                else:
                    off = (i * R + jr)[:, None] * MB + j[None, :]
                tl.store(kcode_ptr + dest * (P * MB) + off, kp.to(tl.uint8))
            tl.store(kscale_ptr + dest * D + kc, kscale)
            tl.store(kzero_ptr + dest * D + kc, kzero)
            col = tl.load(npages_ptr + r).to(tl.int64) + m
            tl.store(table_ptr + r.to(tl.int64) * s_tab + col, dest.to(tl.int32))
            tl.store(fill_ptr + r.to(tl.int64) * s_tab + col, P)
        else:
            vb = b * svb + h * svh
            # values: the channel divisor over the page, then one group per token
            if CST:
                amax = tl.zeros((D,), tl.float32)
                for i in range(P // R):
                    v = _load_rows(v_ptr, vb, svt, idx_ptr, ibase, i * R + jr, c, IDENTITY)
                    amax = tl.maximum(amax, tl.max(tl.abs(v), axis=0))
                cs = tl.maximum(tl.math.sqrt_rn(amax), MIN_CS)
                cs = _round_param(cs, EMIN, MANT, PD, False)  # (D,)
            else:
                cs = tl.full((D,), 1.0, tl.float32)
            vlevels = tl.full((R,), LEVELS, tl.float32)
            # the fragment order stores values channel-major and a 32-token chunk fills the
            # same bytes of every channel row: its tokens are loaded permuted (tile row rho
            # holds token vt[rho] of the chunk) and packed along the tokens
            vt = _frag_chunk_tokens(jr, BITS) if FRAG else jr
            for i in range(P // R):
                rows = i * R + vt
                v = _load_rows(v_ptr, vb, svt, idx_ptr, ibase, rows, c, IDENTITY)
                vq = tl.math.div_rn(v, tl.broadcast_to(cs[None, :], (R, D)))
                vzero = _round_param(tl.min(vq, axis=1), EMIN, MANT, PD, False)  # (R,)
                vscale = tl.maximum(
                    tl.math.div_rn(tl.max(vq, axis=1) - vzero, vlevels), TINY_SCALE
                )
                vscale = _round_param(vscale, EMIN, MANT, PD, True)
                if FRAG:
                    PER: tl.constexpr = 8 // BITS
                    vc = _codes(vq, vzero[:, None], vscale[:, None], LEVELS)  # (R, D)
                    sl = tl.reshape(vc, (PER, R // PER, D))  # slice s = rows [s R / PER, ...)
                    shifts = tl.arange(0, PER) * BITS
                    vp = tl.sum(sl << shifts[:, None, None], axis=0)  # (R / PER, D)
                    beta = tl.arange(0, R // PER)
                    byte = _frag_chunk_bytes(beta, i, BITS)
                    off = _frag_offsets(c[None, :], byte[:, None], BITS)
                else:
                    vp = _codes_packed(vq, vzero[:, None], vscale[:, None], LEVELS, R, D, BITS)
                    off = rows[:, None] * MB + j[None, :]
                tl.store(vcode_ptr + dest * (P * MB) + off, vp.to(tl.uint8))
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
    frag: bool = False,
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
        frag: write codes in the fragment order (``zipvl.quant.fragment``: keys token-major,
            values channel-major; page size and head dim 128, 4 or 2 bits) instead of
            contiguous slices.
    """
    b, h, _, d = k.shape
    rows = b * h
    p = pool["kcode"].shape[1]
    if (pages == 0 and stage is None) or rows == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k, v: expected the last dim contiguous")
    if frag and (p, d) != (FRAGMENT_SIZE, FRAGMENT_SIZE):
        raise ValueError(
            f"frag: the fragment order needs pages of {FRAGMENT_SIZE} tokens and head dim "
            f"{FRAGMENT_SIZE}, got page size {p} and head dim {d}"
        )
    if frag and bits not in FRAGMENT_BITS:
        raise ValueError(f"frag: the fragment order needs bits in {FRAGMENT_BITS}, got {bits}")
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
        FRAG=frag, num_warps=WARPS,
    )  # fmt: skip
