# pyright: reportArgumentType=false, reportOperatorIssue=false, reportAttributeAccessIssue=false, reportCallIssue=false, reportIndexIssue=false, reportGeneralTypeIssues=false
# (Triton's constexpr arguments and tensor tuples are not statically typed)
"""The fused Triton decode kernel over a ``PagedKVStore`` (imported on first use: triton is
optional). See ``zipvl.decode`` for the algebra and the reference beside it.

One launch reads the whole layer: grid (rows = B * Hkv, NS + 1). Programs 0 .. NS-1 of a row
split its pages (high-precision pages, then low-precision ones) evenly; program NS reads the
row's full-precision regions (sinks, both staging regions, the tail). Every program handles the
G query heads of its KV head together (GQA packed into one tile) and writes a partial softmax
state; a second, tiny launch merges the NS + 1 states of every query head by log-sum-exp and also
writes the log-sum-exp itself (the decode-block scores are computed from it). The number of
launches and every launch argument are independent of how many tokens were generated: the
counts live in device tensors, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["INTERPRETED", "paged_decode_triton"]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels below were decorated for the Triton interpreter (read at import, when
Triton reads the variable too), so CPU tensors can run them."""


@triton.jit
def _codes(base, offs_t, t_valid, offs_d, ROW: tl.constexpr, BITS: tl.constexpr):
    # contiguous-slice packing: channel c is bits [(c // ROW) * BITS, ...) of byte c % ROW
    byte = tl.load(base + offs_t[:, None] * ROW + (offs_d % ROW)[None, :], mask=t_valid[:, None],
                   other=0)  # fmt: skip
    shift = (offs_d // ROW) * BITS
    return ((byte.to(tl.int32) >> shift[None, :]) & ((1 << BITS) - 1)).to(tl.float16)


@triton.jit
def _online(s, m_i, l_i, acc):
    """One online-softmax step: returns (m_new, p, alpha, l_new)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, p, alpha, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _attend_page(q, m_i, l_i, acc, kc_ptr, vc_ptr, ks_ptr, kz_ptr, va_ptr, vb_ptr, cs_ptr,
                 page, fill, offs_d,
                 HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_T: tl.constexpr,
                 BITS: tl.constexpr):  # fmt: skip
    ROW: tl.constexpr = HEAD_DIM * BITS // 8
    page = page.to(tl.int64)
    ks = tl.load(ks_ptr + page * HEAD_DIM + offs_d).to(tl.float32)
    kz = tl.load(kz_ptr + page * HEAD_DIM + offs_d).to(tl.float32)
    cs = tl.load(cs_ptr + page * HEAD_DIM + offs_d).to(tl.float32)
    # q in code space as two fp16 terms (hi + lo ~ 22 mantissa bits): the codes are exact in
    # fp16, so the two dots give float32-grade logits at tensor-core speed
    qs32 = q * ks[None, :]  # (GP, D)
    qs = qs32.to(tl.float16)
    qs_lo = (qs32 - qs.to(tl.float32)).to(tl.float16)
    qz = tl.sum(q * kz[None, :], axis=1)  # (GP,): the zero-point term
    kbase = kc_ptr + page * PAGE * ROW
    vbase = vc_ptr + page * PAGE * ROW
    for t0 in range(0, fill, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        tv = offs_t < fill
        kcode = _codes(kbase, offs_t, tv, offs_d, ROW, BITS)  # (BT, D)
        s = tl.dot(qs, tl.trans(kcode)) + tl.dot(qs_lo, tl.trans(kcode)) + qz[:, None]
        s = tl.where(tv[None, :], s, float("-inf"))
        m_i, p, alpha, l_i = _online(s, m_i, l_i, acc)
        va = tl.load(va_ptr + page * PAGE + offs_t, mask=tv, other=0.0).to(tl.float32)
        vb = tl.load(vb_ptr + page * PAGE + offs_t, mask=tv, other=0.0).to(tl.float32)
        vcode = _codes(vbase, offs_t, tv, offs_d, ROW, BITS)  # (BT, D)
        # in code space the zero point cancels most of sum p a code: the weights need float32
        # grade too (two fp16 terms), or the output loses ~3 bits to the cancellation
        pa = p * va[None, :]
        pa_hi = pa.to(tl.float16)
        pa_lo = (pa - pa_hi.to(tl.float32)).to(tl.float16)
        pv = tl.dot(pa_hi, vcode) + tl.dot(pa_lo, vcode)  # (GP, D) in code space
        pv = (pv + tl.sum(p * vb[None, :], axis=1)[:, None]) * cs[None, :]
        acc = acc * alpha[:, None] + pv
    return m_i, l_i, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # (B, Hq, D) queries (any float dtype)
    hkc, hvc, hks, hkz, hva, hvb, hcs, hpt, hpf, hnp,  # high pool, table, fill, page counts
    lkc, lvc, lks, lkz, lva, lvb, lcs, lpt, lpf, lnp,  # low pool, ...
    fk_ptr, fv_ptr, fcnt_ptr,  # fp buffer (rows, CAP + 1, D), counts (rows, 4) int32
    m_ptr, l_ptr, o_ptr,  # out: (B, Hq, NS + 1), (B, Hq, NS + 1), (B, Hq, NS + 1, D) fp32
    sm_scale,  # softmax scale * log2(e)
    num_kv_heads, group, hcols, lcols, fp_stride,
    B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,  # region bases
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    HBITS: tl.constexpr, LBITS: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // num_kv_heads
    hkv = row % num_kv_heads
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_valid = offs_g < group
    heads = hkv * group + offs_g
    num_heads = num_kv_heads * group
    q_rows = (b * num_heads + heads).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=g_valid[:, None],
                other=0.0).to(tl.float32) * sm_scale  # fmt: skip
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    if split < NUM_SPLITS:
        nh = tl.load(hnp + row)
        nl = tl.load(lnp + row)
        total = nh + nl
        per = tl.cdiv(total, NUM_SPLITS)
        u0 = split * per
        u1 = tl.minimum(u0 + per, total)
        for u in range(u0, tl.minimum(u1, nh)):
            page = tl.load(hpt + row * hcols + u)
            fill = tl.load(hpf + row * hcols + u)
            m_i, l_i, acc = _attend_page(q, m_i, l_i, acc, hkc, hvc, hks, hkz, hva, hvb, hcs,
                                         page, fill, offs_d, HEAD_DIM, PAGE, BLOCK_T, HBITS)
        for u in range(tl.maximum(u0, nh), u1):
            page = tl.load(lpt + row * lcols + (u - nh))
            fill = tl.load(lpf + row * lcols + (u - nh))
            m_i, l_i, acc = _attend_page(q, m_i, l_i, acc, lkc, lvc, lks, lkz, lva, lvb, lcs,
                                         page, fill, offs_d, HEAD_DIM, PAGE, BLOCK_T, LBITS)
    else:
        fbase = row.to(tl.int64) * fp_stride * HEAD_DIM
        for r in tl.static_range(4):
            if r == 0:
                base = 0
            elif r == 1:
                base = B1
            elif r == 2:
                base = B2
            else:
                base = B3
            n = tl.load(fcnt_ptr + row * 4 + r)
            for t0 in range(0, n, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                tv = offs_t < n
                ptrs = fbase + (base + offs_t)[:, None] * HEAD_DIM + offs_d[None, :]
                k = tl.load(fk_ptr + ptrs, mask=tv[:, None], other=0.0).to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (GP, BT)
                s = tl.where(tv[None, :], s, float("-inf"))
                m_i, p, alpha, l_i = _online(s, m_i, l_i, acc)
                v = tl.load(fv_ptr + ptrs, mask=tv[:, None], other=0.0).to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    out_row = (b * num_heads + heads).to(tl.int64) * (NUM_SPLITS + 1) + split
    tl.store(m_ptr + out_row, m_i, mask=g_valid)
    tl.store(l_ptr + out_row, l_i, mask=g_valid)
    tl.store(o_ptr + out_row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_valid[:, None])


@triton.jit
def _merge_kernel(m_ptr, l_ptr, o_ptr, out_ptr, lse_ptr,
                  NS1: tl.constexpr, NS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    hq = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, NS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    sv = offs_s < NS1
    m = tl.load(m_ptr + hq * NS1 + offs_s, mask=sv, other=float("-inf"))
    lsum = tl.load(l_ptr + hq * NS1 + offs_s, mask=sv, other=0.0)
    o = tl.load(o_ptr + (hq * NS1 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=sv[:, None], other=0.0)  # fmt: skip
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    den = tl.sum(lsum * w, axis=0)
    num = tl.sum(o * w[:, None], axis=0)
    tl.store(out_ptr + hq * HEAD_DIM + offs_d, (num / den).to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + hq, m_max + tl.log2(den))


def paged_decode_triton(
    q: Tensor, store: object, scale: float, workspace: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """Launch the two kernels. q (B, Hq, D) contiguous; returns (out (B, Hq, D) in q's dtype,
    lse2 (B, Hq) float32: log2 of the softmax denominator of the log2-scaled logits).

    ``workspace`` holds the partial-state buffers (sized once per batch shape, reused)."""
    from zipvl.cache.paged import HIGH, LOW, STAGE_HIGH, STAGE_LOW, TAIL, PagedKVStore

    assert isinstance(store, PagedKVStore)
    b, hq, d = q.shape
    hkv = store.num_heads
    g = hq // hkv
    ns = workspace["splits"]
    m, lsum, o = workspace["m"], workspace["l"], workspace["o"]
    hp, lp = store.pools[HIGH], store.pools[LOW]
    fmt = store.fmt
    block_t = min(fmt.page_size, 64)
    _paged_decode_kernel[(store.rows, int(ns) + 1)](
        q,
        hp["kcode"], hp["vcode"], hp["kscale"], hp["kzero"], hp["vscale"], hp["vzero"],
        hp["vcs"], store.page_table[HIGH], store.page_fill[HIGH], store.num_pages[HIGH],
        lp["kcode"], lp["vcode"], lp["kscale"], lp["kzero"], lp["vscale"], lp["vzero"],
        lp["vcs"], store.page_table[LOW], store.page_fill[LOW], store.num_pages[LOW],
        store.fp_k, store.fp_v, store.fp_count,
        m, lsum, o,
        scale * 1.4426950408889634,
        hkv, g, store.page_table[HIGH].shape[1], store.page_table[LOW].shape[1],
        store.fp_k.shape[1],
        B1=store.region_base[STAGE_HIGH], B2=store.region_base[STAGE_LOW],
        B3=store.region_base[TAIL],
        NUM_SPLITS=int(ns), HEAD_DIM=d, PAGE=fmt.page_size,
        HBITS=fmt.high_bits, LBITS=fmt.low_bits,
        GROUP_PAD=max(16, int(triton.next_power_of_2(g))), BLOCK_T=block_t,
    )  # fmt: skip
    # The interpreter converts float32 to bf16 / fp16 by truncation (compiled Triton rounds to
    # nearest even): interpreted runs write float32 and let PyTorch round.
    out_dtype = torch.float32 if INTERPRETED else q.dtype
    out = torch.empty(b, hq, d, dtype=out_dtype, device=q.device)
    lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
    ns1 = int(ns) + 1
    _merge_kernel[(b * hq,)](
        m, lsum, o, out, lse, NS1=ns1, NS_PAD=int(triton.next_power_of_2(ns1)), HEAD_DIM=d
    )
    return out.to(q.dtype), lse
