# pyright: reportArgumentType=false, reportOperatorIssue=false, reportAttributeAccessIssue=false, reportCallIssue=false, reportIndexIssue=false
# (Triton's constexpr arguments and tensor tuples are not statically typed)
"""Fused probe scoring in Triton (ZipVL Alg. 1 step "A' = Softmax(Q'K^T)", Eq. 5 column mass).

The plain PyTorch scorer materialises the fp32 probe map (B, Hq, M, Skv) and makes several passes
over it (matmul, cast, scale, mask, softmax, sum). This module computes the same column mass with
two kernels that never write the map.

Packed rows: the G query heads of a KV head share its keys, so both kernels work on the G·M
probe rows of one KV head at once, "packed" position-major (packed row ``r`` is probe ``r // G``
of query head ``r % G``). One key tile then feeds 64-256 rows of a wgmma, and with ascending
probe rows (as ``probe_positions`` returns them) each chunk of packed rows spans a narrow band of
positions, so causally empty (chunk, key block) pairs are skipped and only the few pairs that
straddle the diagonal pay for a mask. Any order is correct: the bounds are per-chunk minima and
maxima, only their tightness depends on the order.

1. ``_probe_lse_kernel``, grid (row chunks, B·Hkv, key splits): per packed row, the log-sum-exp of
   its causal logits over one key range (an online softmax over key blocks, like a
   flash-attention forward without V); key blocks every row of the chunk sees run unmasked. The
   last split of a chunk to finish (an atomic ticket) merges the splits' partial states into the
   row's log-sum-exp, so no host-side merge is needed. The first split also writes the chunk's
   query rows in packed order, its probe positions and its position range for the second kernel.
2. ``_probe_colsum_kernel``, grid (key blocks, B·Hkv): keys are the M side of the product
   (``S^T = K Q^T``), so the key tile stays in place while the packed query chunks stream past it;
   ``exp2(logit - lse)`` is summed over the chunk's rows (a row reduction, no cross-warp sum).
   Chunks no key of the block is visible to are not visited; chunks that see the whole block run
   without the causal mask.

Cost: the logits are computed twice (2 · 2·Hq·M·Skv·D FLOPs at most, less the causally empty
part, ~1 % of dense causal attention at M = 128) and K is read about twice from memory; nothing
of size M·Skv touches memory. Logits are accumulated in fp32 from the input dtype (more precise
than the eager path, which rounds the matmul to bf16 first).

Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (how CI tests it, at small shapes).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from zipvl.checks import check_buffer, check_int, check_scale

__all__ = [
    "INTERPRETED",
    "ProbeKernelConfig",
    "probe_band_triton",
    "probe_mass_triton",
    "triton_probe_available",
]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels below were decorated for the Triton interpreter (Triton reads the variable
when a kernel is decorated, i.e. at this module's import), so CPU tensors can run them."""

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
_TABLE_BLOCK = 64  # chunk-range entries the column pass reads at once
_NO_POS = tl.constexpr(2**30)  # the earliest position of a chunk without rows


def triton_probe_available(device: torch.device) -> bool:
    """True where the kernels can run: CUDA, or any device when this module was imported with
    TRITON_INTERPRET=1."""
    return device.type == "cuda" or INTERPRETED


@dataclass(frozen=True)
class ProbeKernelConfig:
    """Launch settings of the two probe kernels (tile sizes are powers of two).

    Attributes:
        lse_block_m: packed probe rows per program of the row pass (the wgmma M side: 64 per
            warpgroup; >= 16).
        lse_block_n: keys per step of the row pass (>= 16).
        lse_warps, lse_stages: ``num_warps`` and ``num_stages`` of the row pass.
        col_block_n: keys per program of the column pass (the wgmma M side; >= 16).
        col_block_m: packed probe rows per step of the column pass (>= 16).
        col_warps, col_stages: ``num_warps`` and ``num_stages`` of the column pass.
    """

    lse_block_m: int = 128
    lse_block_n: int = 64
    lse_warps: int = 8
    lse_stages: int = 3
    col_block_n: int = 128
    col_block_m: int = 64
    col_warps: int = 8
    col_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("lse_block_m", "lse_block_n", "col_block_n", "col_block_m"):
            value = check_int(name, getattr(self, name), 16)
            if value & (value - 1):
                raise ValueError(f"{name}: expected a power of two >= 16, got {value}")
        for name in ("lse_warps", "col_warps"):
            value = check_int(name, getattr(self, name), 1)
            if value & (value - 1):
                raise ValueError(f"{name}: expected a power of two, got {value}")
        check_int("lse_stages", self.lse_stages, 1)
        check_int("col_stages", self.col_stages, 1)

    @classmethod
    def default_for(cls, dtype: torch.dtype, head_dim: int) -> ProbeKernelConfig:
        """The settings ``probe_mass_triton`` uses when given none.

        16-bit inputs up to D = 256: the class defaults (128 packed rows by 64 keys per step of
        the row pass, 128 keys by 64 rows in the column pass, 8 warps, 3 stages: both kernels run
        wgmma with M = 64 per warpgroup, about 82 registers and 80 KiB of shared memory at
        D = 128, so two programs share an SM). Wider heads and float32 inputs (whose exact
        products run on the FMA units, not the tensor cores) get smaller tiles, 4 warps and 2
        stages, so that the tiles fit in shared memory and the registers do not spill.
        """
        return _default_config(dtype, head_dim)  # cached: building one costs ~3 us a call


@functools.cache
def _default_config(dtype: torch.dtype, head_dim: int) -> ProbeKernelConfig:
    if dtype != torch.float32 and head_dim <= 256:
        return ProbeKernelConfig()
    if dtype == torch.float32:
        tile = 32 if head_dim <= 256 else 16
    else:
        tile = 64 if head_dim <= 512 else 32
    step = min(tile, 32)
    return ProbeKernelConfig(
        lse_block_m=tile, lse_block_n=step, lse_warps=4, lse_stages=2,
        col_block_n=tile, col_block_m=step, col_warps=4, col_stages=2,
    )  # fmt: skip


@triton.jit
def _input(addr_ptr, slot, like):
    """Entry ``slot`` of the int64 address table as a pointer of ``like``'s type (16-byte
    aligned: the host checked it)."""
    return tl.multiple_of(tl.load(addr_ptr + slot).to(like.dtype), 16)


@triton.jit
def _probe_lse_kernel(
    q_ptr,
    k_ptr,
    addr_ptr,
    rows_ptr,
    w_ptr,
    lse_ptr,
    qpack_ptr,
    f_ptr,
    i_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    num_kv_heads,
    group,
    packed_rows,
    pos_offset,
    kv_len,
    keys_per_split,
    num_splits,
    rows_padded,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BY_ADDR: tl.constexpr,
    WEIGHTED: tl.constexpr,
    LSE_OUT: tl.constexpr,
):
    if BY_ADDR:  # the inputs' addresses are data (a captured replay on new inputs)
        q_ptr = _input(addr_ptr, 0, q_ptr)
        k_ptr = _input(addr_ptr, 1, k_ptr)
    chunk = tl.program_id(0)
    bhkv = tl.program_id(1)
    split = tl.program_id(2)
    n_chunks = tl.num_programs(0)
    n_bh = tl.num_programs(1)
    b = bhkv // num_kv_heads
    hkv = bhkv % num_kv_heads
    offs_r = chunk * BLOCK_M + tl.arange(0, BLOCK_M)  # packed rows
    offs_d = tl.arange(0, HEAD_DIM)
    r_valid = offs_r < packed_rows
    row = tl.load(rows_ptr + offs_r // group, mask=r_valid, other=0).to(tl.int32)  # row in q
    pos = tl.where(r_valid, row + pos_offset, -1)  # absolute position, -1 for padding
    head = hkv * group + offs_r % group
    q = tl.load(
        q_ptr
        + b.to(tl.int64) * stride_qb
        + head.to(tl.int64)[:, None] * stride_qh
        + row[:, None] * stride_qs
        + offs_d[None, :],
        mask=r_valid[:, None],
        other=0.0,
    )
    lo = tl.min(tl.where(r_valid, pos, _NO_POS), axis=0)  # the chunk's position range
    hi = tl.max(pos, axis=0)
    # int32 workspace: [tickets (B*Hkv, chunks) | lo (chunks) | hi (chunks) | pos (rows_padded)]
    lo_ptr = i_ptr + n_bh * n_chunks
    if split == 0:  # inputs of the column pass, written once
        qpack = qpack_ptr + (bhkv * rows_padded + offs_r)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(qpack, q)
        if bhkv == 0:
            tl.store(lo_ptr + chunk, lo)
            tl.store(lo_ptr + n_chunks + chunk, hi)
            tl.store(lo_ptr + 2 * n_chunks + offs_r, pos)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    n_start = split * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, hi + 1)
    # key blocks that every row of the chunk sees: no mask (n_start is a multiple of BLOCK_N)
    n_mid = tl.maximum(tl.minimum((lo + 1) // BLOCK_N * BLOCK_N, n_end), n_start)
    # Software-pipelined online softmax: each step issues the next block's product, then
    # exponentiates the previous block's logits (``x``, already shifted by the running max)
    # while the tensor cores work. The first block (masked; empty when the range is) is peeled.
    offs_n = n_start + tl.arange(0, BLOCK_N)
    k = tl.load(
        k_base + offs_n[:, None] * stride_ks + offs_d[None, :],
        mask=(offs_n < kv_len)[:, None],
        other=0.0,
    )
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BM, BN) fp32
    s = tl.where((offs_n[None, :] <= pos[:, None]) & (n_start < n_end), s, float("-inf"))
    m_i = tl.max(s, axis=1)  # running max, raw logit units
    m_log2 = tl.where(m_i == float("-inf"), 0.0, m_i * scale_log2)  # the scale is positive
    x = s * scale_log2 - m_log2[:, None]  # pending exponents, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(n_start + BLOCK_N, n_mid, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        l_i += tl.sum(tl.exp2(x), axis=1)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every key is visible
        m_log2 = m_new * scale_log2
        l_i *= tl.exp2(m_i * scale_log2 - m_log2)
        x = s * scale_log2 - m_log2[:, None]
        m_i = m_new
    for n0 in range(tl.maximum(n_mid, n_start + BLOCK_N), n_end, BLOCK_N):  # causal boundary
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_base + offs_n[:, None] * stride_ks + offs_d[None, :],
            mask=(offs_n < kv_len)[:, None],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = tl.where(offs_n[None, :] <= pos[:, None], s, float("-inf"))
        l_i += tl.sum(tl.exp2(x), axis=1)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_log2 = tl.where(m_new == float("-inf"), 0.0, m_new * scale_log2)
        l_i *= tl.exp2(m_i * scale_log2 - m_log2)
        x = s * scale_log2 - m_log2[:, None]
        m_i = m_new
    l_i += tl.sum(tl.exp2(x), axis=1)
    # fp32 workspace: [m (B*Hkv, splits, rows_padded) | l (same) | lse (B*Hkv, rows_padded)]
    part_size = n_bh * num_splits * rows_padded
    part = f_ptr + (bhkv * num_splits + split) * rows_padded + offs_r
    tl.store(part, m_i * scale_log2)  # log2 units; -inf where no key was visible
    tl.store(part + part_size, l_i)
    # the last split of this chunk to finish merges all of them (acq_rel: the other splits'
    # stores above, ordered before their tickets by the barrier, are visible to it)
    tl.debug_barrier()
    ticket = tl.atomic_add(i_ptr + bhkv * n_chunks + chunk, 1, sem="acq_rel", scope="gpu")
    if ticket == num_splits - 1:
        mm = tl.full([BLOCK_M], float("-inf"), tl.float32)
        ll = tl.zeros([BLOCK_M], tl.float32)
        for j in range(0, num_splits):
            pj = f_ptr + (bhkv * num_splits + j) * rows_padded + offs_r
            m_j = tl.load(pj, cache_modifier=".cg")
            l_j = tl.load(pj + part_size, cache_modifier=".cg")
            m_new = tl.maximum(mm, m_j)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            ll = ll * tl.exp2(mm - m_safe) + l_j * tl.exp2(m_j - m_safe)
            mm = m_new
        lse = mm + tl.log2(tl.where(r_valid, ll, 1.0))
        if LSE_OUT:  # natural-log units, (B * Hkv, G * M) position-major
            tl.store(lse_ptr + bhkv * packed_rows + offs_r, lse * _LN2, mask=r_valid)
        nlse = -lse
        if WEIGHTED:  # the row's weight as a shift: the column pass sums w * p
            w = tl.load(w_ptr + offs_r // group, mask=r_valid, other=1.0)
            nlse += tl.log2(w)
        # stored negated (the column pass adds it), -inf on padding rows (they weigh nothing)
        tl.store(
            f_ptr + 2 * part_size + bhkv * rows_padded + offs_r,
            tl.where(r_valid, nlse, -float("inf")),
        )


@triton.jit
def _probe_colsum_kernel(
    k_ptr,
    addr_ptr,
    qpack_ptr,
    f_ptr,
    i_ptr,
    out_ptr,
    norm_ptr,
    nlse_offset,
    table_offset,
    stride_kb,
    stride_kh,
    stride_ks,
    num_kv_heads,
    packed_rows,
    rows_padded,
    lse_chunks,
    lse_block_m,
    kv_len,
    pos_offset,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TABLE_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BY_ADDR: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    if BY_ADDR:
        k_ptr = _input(addr_ptr, 1, k_ptr)
    nb = tl.program_id(0)
    bhkv = tl.program_id(1)
    table_ptr = i_ptr + table_offset  # chunk lo (lse_chunks), chunk hi (lse_chunks), positions
    b = bhkv // num_kv_heads
    hkv = bhkv % num_kv_heads
    n0 = nb * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < kv_len
    k = tl.load(
        k_ptr
        + b.to(tl.int64) * stride_kb
        + hkv.to(tl.int64) * stride_kh
        + offs_n[:, None] * stride_ks
        + offs_d[None, :],
        mask=n_valid[:, None],
        other=0.0,
    )  # (BN, D), in place for the whole program
    # which row chunks (of the row pass) matter to this key block: c_lo = the first one whose
    # latest position reaches n0; c_hi = one past the last one whose earliest position is before
    # the block's last key (it needs the mask); chunks from max(c_lo, c_hi) on see every key
    c_lo = lse_chunks
    c_hi = 0
    for t0 in range(0, lse_chunks, TABLE_BLOCK):
        offs_t = t0 + tl.arange(0, TABLE_BLOCK)
        t_valid = offs_t < lse_chunks
        lo = tl.load(table_ptr + offs_t, mask=t_valid, other=_NO_POS)
        hi = tl.load(table_ptr + lse_chunks + offs_t, mask=t_valid, other=-1)
        c_lo = tl.minimum(c_lo, tl.min(tl.where(hi >= n0, offs_t, lse_chunks), axis=0))
        c_hi = tl.maximum(c_hi, tl.max(tl.where(lo < n0 + BLOCK_N - 1, offs_t + 1, 0), axis=0))
    # the same bounds in chunks of BLOCK_M packed rows (rounded outwards)
    j_end = tl.cdiv(packed_rows, BLOCK_M)
    j_lo = c_lo * lse_block_m // BLOCK_M
    j_mid = tl.minimum(tl.maximum(tl.cdiv(c_hi * lse_block_m, BLOCK_M), j_lo), j_end)
    pos_ptr = table_ptr + 2 * lse_chunks
    q_base = qpack_ptr + bhkv * rows_padded * HEAD_DIM
    l_base = f_ptr + nlse_offset + bhkv * rows_padded
    # Software-pipelined: each step issues the next chunk's product, then exponentiates the
    # previous chunk's shifted logits (``x``) while the tensor cores work. The first chunk is
    # peeled (masked; all -inf when the block has no chunk, then chunk j_end - 1 is read).
    offs_r = tl.minimum(j_lo, j_end - 1) * BLOCK_M + tl.arange(0, BLOCK_M)
    qc = tl.load(q_base + offs_r[:, None] * HEAD_DIM + offs_d[None, :])
    nlse = tl.load(l_base + offs_r)  # -lse: -inf on padding rows
    pos = tl.load(pos_ptr + offs_r)
    s = tl.dot(k, tl.trans(qc), input_precision=DOT_PRECISION)  # (BN, BM) fp32
    visible = (offs_n[:, None] <= pos[None, :]) & (j_lo < j_end)
    x = tl.where(visible, s * scale_log2 + nlse[None, :], float("-inf"))
    acc = tl.zeros([BLOCK_N], tl.float32)
    for j in range(j_lo + 1, j_mid):  # chunks on the causal boundary of some key
        offs_r = j * BLOCK_M + tl.arange(0, BLOCK_M)
        qc = tl.load(q_base + offs_r[:, None] * HEAD_DIM + offs_d[None, :])
        nlse = tl.load(l_base + offs_r)
        pos = tl.load(pos_ptr + offs_r)
        s = tl.dot(k, tl.trans(qc), input_precision=DOT_PRECISION)
        acc += tl.sum(tl.exp2(x), axis=1)
        x = tl.where(
            offs_n[:, None] <= pos[None, :], s * scale_log2 + nlse[None, :], -float("inf")
        )
    for j in range(tl.maximum(j_mid, j_lo + 1), j_end):  # chunks that see the whole block
        offs_r = j * BLOCK_M + tl.arange(0, BLOCK_M)
        qc = tl.load(q_base + offs_r[:, None] * HEAD_DIM + offs_d[None, :])
        nlse = tl.load(l_base + offs_r)
        s = tl.dot(k, tl.trans(qc), input_precision=DOT_PRECISION)
        acc += tl.sum(tl.exp2(x), axis=1)
        x = s * scale_log2 + nlse[None, :]
    acc += tl.sum(tl.exp2(x), axis=1)
    tl.store(out_ptr + bhkv * kv_len + offs_n, acc, mask=n_valid)
    if NORMALIZE:  # Eq. 7 with the causal count Skv - max(j, Skv - Sq), rounded as torch divides
        den = tl.where(n_valid, kv_len - tl.maximum(offs_n, pos_offset), 1).to(tl.float32)
        tl.store(norm_ptr + bhkv * kv_len + offs_n, tl.math.div_rn(acc, den), mask=n_valid)


@triton.jit
def _probe_band_kernel(
    q_ptr, k_ptr, addr_ptr, rows_ptr, lse_ptr, band_ptr,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    num_kv_heads, group, num_probes, pos_offset, width, scale_log2,
    HEAD_DIM: tl.constexpr, G_PAD: tl.constexpr, BLOCK_W: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BY_ADDR: tl.constexpr,
):  # fmt: skip
    """Band of one probe row: ``band[b, h, i, d] = sum_g P_g[i, pos_i - d]`` for one block of
    offsets d, from the row's G query heads against the keys just before it, normalised by the
    rows' natural-log log-sum-exp (``lse``, (B, Hkv, M, G)); 0 where ``pos_i - d < 0``."""
    if BY_ADDR:
        q_ptr = _input(addr_ptr, 0, q_ptr)
        k_ptr = _input(addr_ptr, 1, k_ptr)
    i = tl.program_id(0)
    bhkv = tl.program_id(1)
    wb = tl.program_id(2)
    b = bhkv // num_kv_heads
    hkv = bhkv % num_kv_heads
    row = tl.load(rows_ptr + i)  # the probe's row in q
    pos = row + pos_offset  # its absolute position
    offs_g = tl.arange(0, G_PAD)
    g_valid = offs_g < group
    offs_d = tl.arange(0, HEAD_DIM)
    head = hkv * group + offs_g
    qv = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + head.to(tl.int64)[:, None] * stride_qh
        + row * stride_qs + offs_d[None, :],
        mask=g_valid[:, None], other=0.0,
    )  # fmt: skip
    offs_w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    col = pos - offs_w
    valid = (offs_w < width) & (col >= 0)
    kv = tl.load(
        k_ptr + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
        + col[:, None] * stride_ks + offs_d[None, :],
        mask=valid[:, None], other=0.0,
    )  # fmt: skip
    s = tl.dot(qv, tl.trans(kv), input_precision=DOT_PRECISION)  # (G_PAD, BLOCK_W) fp32
    row_lse = tl.load(lse_ptr + (bhkv * num_probes + i) * group + offs_g, mask=g_valid, other=0.0)
    p = tl.exp2(s * scale_log2 - row_lse[:, None] * 1.4426950408889634)
    p = tl.where(g_valid[:, None] & valid[None, :], p, 0.0)
    tl.store(
        band_ptr + (bhkv * num_probes + i).to(tl.int64) * width + offs_w,
        tl.sum(p, axis=0),
        mask=offs_w < width,
    )


def probe_band_triton(
    q: Tensor,
    k: Tensor,
    rows: Tensor,
    lse: Tensor,
    *,
    width: int,
    scale: float,
    addr: Tensor | None = None,
) -> Tensor:
    """The offset estimator's band next to each probe row's diagonal, fused.

    Args:
        q, k, rows, scale, addr: as ``probe_mass_triton`` (its ``addr`` checks apply).
        lse: (B, Hkv, M, G) float32, the rows' natural-log log-sum-exp as ``probe_mass_triton``
            returns it in ``lse``.
        width: band width W >= 1 (``ProbeScorer.band_width``).

    Returns:
        (B, Hkv, M, W) float32: ``sum_g softmax(q_{h G + g, i} k^T * scale)[pos_i - d]`` over the
        G query heads of KV head h, 0 where ``pos_i - d < 0`` (``pos_i`` = row i's absolute
        position); the band keys are read in place, nothing of size M x W x D is gathered.

    Raises:
        ValueError: a bad ``width`` / ``lse`` / ``addr``, or a device the kernel cannot run on.
    """
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    g, m = hq // hkv, rows.shape[0]
    check_int("width", width, 1)
    check_buffer("lse", lse, (b, hkv, m, g), torch.float32, q.device)
    q, k = _kernel_inputs(q, k, addr)
    band = torch.empty(b, hkv, m, width, device=q.device, dtype=torch.float32)
    if m == 0 or b * hkv == 0:
        return band
    rows = rows.to(device=q.device, dtype=torch.int64).contiguous()
    block_w = min(64, max(16, triton.next_power_of_2(width)))
    _probe_band_kernel[(m, b * hkv, _cdiv(width, block_w))](
        q, k, addr if addr is not None else rows, rows, lse, band,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        hkv, g, m, skv - sq, width, float(scale) * _LOG2E,
        HEAD_DIM=d, G_PAD=max(16, triton.next_power_of_2(g)), BLOCK_W=block_w,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BY_ADDR=addr is not None, num_warps=4,
    )  # fmt: skip
    return band


def _kernel_inputs(q: Tensor, k: Tensor, addr: Tensor | None) -> tuple[Tensor, Tensor]:
    """q and k as the kernels read them (the last dim contiguous), after the checks every
    kernel wrapper makes: ``addr`` a contiguous int64 (2,) table on q's device with inputs of
    a last stride of 1, and a device the kernels run on."""
    if addr is not None:
        check_buffer("addr", addr, (2,), torch.int64, q.device)
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            raise ValueError(
                f"addr: inputs read by address need a last stride of 1, got q {q.stride()}, "
                f"k {k.stride()}"
            )
    if not triton_probe_available(q.device):
        raise ValueError(
            f"q: impl='triton' needs a CUDA tensor (or TRITON_INTERPRET=1), got device {q.device}"
        )
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    return q, k


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def probe_mass_triton(
    q: Tensor,
    k: Tensor,
    rows: Tensor,
    *,
    scale: float,
    key_splits: int | None = None,
    config: ProbeKernelConfig | None = None,
    out: Tensor | None = None,
    normalized: Tensor | None = None,
    addr: Tensor | None = None,
    weights: Tensor | None = None,
    lse: Tensor | None = None,
) -> Tensor:
    """Column mass of the causal softmax of probe rows, fused (no probe map in memory).

    Args:
        q: (B, Hq, Sq, D) queries, the last Sq positions of the sequence; D a power of two >= 16.
        k: (B, Hkv, Skv, D) keys, Hq divisible by Hkv.
        rows: (M,) integer probe rows (indices into the Sq query rows), in any order; ascending
            rows (as ``probe_positions`` returns them) let the kernels skip the most work.
        scale: softmax scale, positive.
        key_splits: how many key ranges the row pass is split into (None: enough to fill the
            GPU; the splits are merged exactly by log-sum-exp).
        config: tile sizes, warps and pipeline stages of the two kernels (None:
            ``ProbeKernelConfig.default_for(q.dtype, D)``).
        out: a contiguous (B, Hkv, Skv) float32 tensor to write the mass into (None: a new one).
        normalized: a contiguous (B, Hkv, Skv) float32 tensor that also receives Eq. 7's
            normalized score with the causal count, ``mass / (Skv - max(j, Skv - Sq))``
            (``ProbeScorer``'s default ``denominator="causal"``), computed in the column pass and
            rounded as PyTorch's division rounds.
        addr: an int64 (2,) tensor on q's device holding the addresses of the inputs to read
            (``q.data_ptr()``, ``k.data_ptr()``, each 16-byte aligned) in place of q's and k's
            own: q and k then only give shapes and strides (their last stride must be 1). A
            CUDA graph captured with ``addr`` replays on new inputs of the same shapes and
            strides once their addresses are written into it, without copying them
            (``PlanGraph``).
        weights: (M,) float32 weight of each probe row (``ProbeScorer.probe_weights``, the
            offset estimator's inverse inclusion probabilities): the mass becomes
            ``sum_i weights[i] * P[i, :]``. Applied as a shift of each row's log-sum-exp.
        lse: a contiguous (B, Hkv, M, G) float32 tensor that receives each probe row's
            natural-log log-sum-exp (probe i of query head ``h * G + g`` at ``[b, h, i, g]``,
            unweighted): what the offset estimator's band needs.

    Returns:
        (B, Hkv, Skv) float32 (``out`` when given): for each key, the softmax weight it receives
        summed over the M probe rows and the G query heads of its KV head (the same quantity as
        the eager path).

    Raises:
        ValueError: head dim not a power of two >= 16, a non-positive scale, a device the
            kernels cannot run on, or an ``out`` / ``normalized`` / ``addr`` / ``weights`` /
            ``lse`` of the wrong shape, dtype, device or layout.
    """
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if d < 16 or d & (d - 1):
        raise ValueError(
            f"q: the Triton probe scorer needs a power-of-two head dim >= 16, got {d}"
        )
    check_scale("scale", scale)  # before the device check: a bad argument is named anywhere
    cfg = config if config is not None else ProbeKernelConfig.default_for(q.dtype, d)
    g = hq // hkv
    m = rows.shape[0]
    check_buffer("out", out, (b, hkv, skv), torch.float32, k.device)
    check_buffer("normalized", normalized, (b, hkv, skv), torch.float32, k.device)
    check_buffer("weights", weights, (m,), torch.float32, q.device)
    check_buffer("lse", lse, (b, hkv, m, g), torch.float32, q.device)
    q, k = _kernel_inputs(q, k, addr)
    if out is None:
        out = torch.empty(b, hkv, skv, device=q.device, dtype=torch.float32)  # (B, Hkv, Skv)
    if m == 0:
        out.zero_()
        if normalized is not None:
            normalized.zero_()
        return out
    # (M,) a no-op for the scorer's rows
    rows = rows.to(device=q.device, dtype=torch.int64).contiguous()
    scale_log2 = float(scale) * _LOG2E
    bh = b * hkv
    packed = g * m  # G*M rows per KV head, position-major
    bm, bn = cfg.lse_block_m, cfg.lse_block_n
    rows_padded = _cdiv(packed, max(bm, cfg.col_block_m)) * max(bm, cfg.col_block_m)
    n_chunks = rows_padded // bm  # chunks past the last packed row are empty
    n_blocks = _cdiv(skv, bn)
    if key_splits is None:
        # enough programs for the row pass to fill the GPU in several waves (~8 per SM; the
        # causally empty ones end at once), each at least 8 key blocks long; one on the CPU
        cuda = q.device.type == "cuda"
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if cuda else 0
        key_splits = min(round(8 * sms / (bh * _cdiv(packed, bm))), n_blocks // 8)
    splits = max(1, min(n_blocks, key_splits))
    per_split = _cdiv(n_blocks, splits) * bn
    splits = _cdiv(skv, per_split)
    dev = q.device
    qpack = torch.empty(bh, rows_padded, d, device=dev, dtype=q.dtype)  # probe rows, packed
    fbuf = torch.empty((2 * splits + 1) * bh * rows_padded, device=dev, dtype=torch.float32)
    ibuf = torch.zeros(bh * n_chunks + 2 * n_chunks + rows_padded, device=dev, dtype=torch.int32)
    # fp32 inputs get exact fp32 products (no TF32), like the eager fp32 matmul
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    launch: dict[str, Any] = {
        "HEAD_DIM": d, "DOT_PRECISION": precision, "BY_ADDR": addr is not None,
    }  # fmt: skip
    table = addr if addr is not None else rows  # never read without BY_ADDR
    _probe_lse_kernel[(n_chunks, bh, splits)](
        q, k, table, rows, weights if weights is not None else fbuf,
        lse if lse is not None else fbuf, qpack, fbuf, ibuf,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        hkv, g, packed, skv - sq, skv, per_split, splits, rows_padded, scale_log2,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg.lse_warps, num_stages=cfg.lse_stages,
        WEIGHTED=weights is not None, LSE_OUT=lse is not None, **launch,
    )  # fmt: skip
    _probe_colsum_kernel[(_cdiv(skv, cfg.col_block_n), bh)](
        k, table, qpack, fbuf, ibuf, out, normalized if normalized is not None else out,
        2 * splits * bh * rows_padded, bh * n_chunks,
        k.stride(0), k.stride(1), k.stride(2),
        hkv, packed, rows_padded, n_chunks, bm, skv, skv - sq, scale_log2,
        BLOCK_N=cfg.col_block_n, BLOCK_M=cfg.col_block_m, TABLE_BLOCK=_TABLE_BLOCK,
        num_warps=cfg.col_warps, num_stages=cfg.col_stages, NORMALIZE=normalized is not None,
        **launch,
    )  # fmt: skip
    return out
