# pyright: reportArgumentType=false, reportOperatorIssue=false, reportAttributeAccessIssue=false, reportCallIssue=false, reportIndexIssue=false, reportGeneralTypeIssues=false
# (Triton's constexpr arguments and tensor tuples are not statically typed)
"""The fused decode kernel over pages in the fragment code order (``zipvl.quant.fragment``):
the ``"fragment"`` variant of ``zipvl.paged_decode_triton``.

Same launch as the other variants, but with FS programs for the full-precision regions: grid
(rows = B * Hkv, FS + NS). Programs 0 .. FS-1 of a row share its full-precision regions
(sinks, staging, tail: up to ~600 tokens in blocks of 16 with float32 dots, which one program
alone walks longer than a page program at batch 1, where a program reads ~32 pages); programs
FS .. FS + NS - 1 split its pages (high-precision pages, then low-precision ones), at least
MIN_PAGES each from the row's page count at this step, so a short row runs few page programs
and the rest return at once. Every program writes a partial softmax state and the last one of a
row merges the states written (the ticket of ``zipvl.paged_decode_triton._publish``). What
differs is the page loop:

* **Orientation.** The matrix multiplies run tokens (keys) or channels (values) as the MMA's M
  side and the G query heads of a KV head as N (padded to 8), so GQA's 7 heads fill 7 of 8
  columns instead of 7 of 16 rows, and the (D, 8) value accumulator is 32 floats per lane.
* **Warps own pages.** The 4 warps of a program read 4 pages at once, one each (a rank-3 slot
  dimension, warp i = slot i in the MMA layout), with their own online-softmax state; the
  per-page max and sum are warp shuffles, and the 4 states are merged once per program.
* **Codes straight into operands.** One 16-byte load per lane gives the lane its whole
  operand fragment (the fragment order stores codes in the ``dot_op`` register order), and one
  ``lop3`` per two codes makes them fp16 (``1024 + mu * code``): no shuffle, no shared memory
  between load and MMA. The column multipliers ``mu`` are divided out of the page's scales,
  and the 1024 offset is removed by one bias per head and page (``q . s`` and ``p . a`` sums).

Per page: keys ``k_tc = code_tc s_c + z_c`` give ``q . k_t = sum_c x_tc (q_c s_c / mu_c) -
1024 sum_c (q_c s_c / mu_c) + sum_c q_c z_c`` with ``x = 1024 + mu code``; values
``v_tc = (code_tc a_t + b_t) cs_c`` give ``sum_t p_t v_tc = cs_c (sum_t x_ct (p_t a_t / mu_t) -
1024 sum_t (p_t a_t / mu_t) + sum_t p_t b_t)``. The operands ``q s / mu`` and ``p a / mu`` are
fp16 (one rounding each, like the other variants' single fp16 dot); with ``PRECISE`` (float32
queries) each is split into an fp16 high and low part and dotted twice, and the codes lose
their offset before the dot (``x - 1024``, exact in fp16), so no float32 sum cancels it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from zipvl.paged_decode_triton import _addr, _fp_regions, _publish

__all__ = ["fragment_decode_kernel"]

_ASM4 = tl.constexpr("""
{
.reg .b32 r0, r1, r2, r3, w8;
shr.u32 w8, $8, 8;
lop3.b32 r0, $8, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 r1, $8, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 r2, w8, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 r3, w8, 0x00F000F0, 0x64006400, 0xEA;
mov.b32 {$0, $1}, r0;
mov.b32 {$2, $3}, r1;
mov.b32 {$4, $5}, r2;
mov.b32 {$6, $7}, r3;
}
""")

_ASM2 = tl.constexpr("""
{
.reg .b32 r0, r1, r2, r3, r4, r5, r6, r7, w8;
shr.u32 w8, $16, 8;
lop3.b32 r0, $16, 0x00030003, 0x64006400, 0xEA;
lop3.b32 r1, $16, 0x000C000C, 0x64006400, 0xEA;
lop3.b32 r2, $16, 0x00300030, 0x64006400, 0xEA;
lop3.b32 r3, $16, 0x00C000C0, 0x64006400, 0xEA;
lop3.b32 r4, w8, 0x00030003, 0x64006400, 0xEA;
lop3.b32 r5, w8, 0x000C000C, 0x64006400, 0xEA;
lop3.b32 r6, w8, 0x00300030, 0x64006400, 0xEA;
lop3.b32 r7, w8, 0x00C000C0, 0x64006400, 0xEA;
mov.b32 {$0, $1}, r0;
mov.b32 {$2, $3}, r1;
mov.b32 {$4, $5}, r2;
mov.b32 {$6, $7}, r3;
mov.b32 {$8, $9}, r4;
mov.b32 {$10, $11}, r5;
mov.b32 {$12, $13}, r6;
mov.b32 {$14, $15}, r7;
}
""")


@triton.jit
def _halves(r):
    """The two 16-bit halves of int32 words, as int16 bit patterns."""
    return (r & 0xFFFF).to(tl.int16), ((r >> 16) & 0xFFFF).to(tl.int16)


@triton.jit
def _unpack4(w, S: tl.constexpr, R: tl.constexpr, ASM: tl.constexpr):
    """(S, R, 16) int32 words of 4-bit fragment rows -> (S, R, 128) fp16 ``1024 + mu * code``
    in column order (column 32 w + 16 h + 4 t + 2 b + e from word 4 t + w, nibble
    (2 h + b) + 4 e): a register reorder only, the operand layout is the load's."""
    w = tl.reshape(w, (S, R, 4, 4))
    if ASM:
        o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
            _ASM4, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w],
            dtype=(tl.int16,) * 8, is_pure=True, pack=1)  # fmt: skip
    else:
        w8 = w >> 8
        o0, o1 = _halves((w & 0x000F000F) | 0x64006400)
        o2, o3 = _halves((w & 0x00F000F0) | 0x64006400)
        o4, o5 = _halves((w8 & 0x000F000F) | 0x64006400)
        o6, o7 = _halves((w8 & 0x00F000F0) | 0x64006400)
    h0 = tl.join(tl.join(o0, o1), tl.join(o2, o3))
    h1 = tl.join(tl.join(o4, o5), tl.join(o6, o7))
    x = tl.join(h0, h1)  # (S, R, t, w, e, b, h)
    x = tl.permute(x, (0, 1, 3, 6, 2, 5, 4))  # (S, R, w, h, t, b, e)
    return tl.reshape(x, (S, R, 128)).to(tl.float16, bitcast=True)


@triton.jit
def _unpack2(w, S: tl.constexpr, R: tl.constexpr, ASM: tl.constexpr):
    """(S, R, 8) int32 words of 2-bit fragment rows -> (S, R, 128) fp16 ``1024 + mu * code``
    (column 32 (2 j + i) + 16 h + 4 t + 2 b + e from word 2 t + j, field (2 h + b) + 4 i of
    half e)."""
    w = tl.reshape(w, (S, R, 4, 2))
    if ASM:
        a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7 = (
            tl.inline_asm_elementwise(
                _ASM2, "=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,r", [w],
                dtype=(tl.int16,) * 16, is_pure=True, pack=1))  # fmt: skip
    else:
        w8 = w >> 8
        a0, a1 = _halves((w & 0x00030003) | 0x64006400)
        a2, a3 = _halves((w & 0x000C000C) | 0x64006400)
        a4, a5 = _halves((w & 0x00300030) | 0x64006400)
        a6, a7 = _halves((w & 0x00C000C0) | 0x64006400)
        b0, b1 = _halves((w8 & 0x00030003) | 0x64006400)
        b2, b3 = _halves((w8 & 0x000C000C) | 0x64006400)
        b4, b5 = _halves((w8 & 0x00300030) | 0x64006400)
        b6, b7 = _halves((w8 & 0x00C000C0) | 0x64006400)
    i0 = tl.join(tl.join(tl.join(a0, a1), tl.join(a2, a3)),
                 tl.join(tl.join(a4, a5), tl.join(a6, a7)))  # fmt: skip
    i1 = tl.join(tl.join(tl.join(b0, b1), tl.join(b2, b3)),
                 tl.join(tl.join(b4, b5), tl.join(b6, b7)))  # fmt: skip
    x = tl.join(i0, i1)  # (S, R, t, j, e, b, h, i)
    x = tl.permute(x, (0, 1, 3, 7, 6, 2, 5, 4))  # (S, R, j, i, h, t, b, e)
    return tl.reshape(x, (S, R, 128)).to(tl.float16, bitcast=True)


@triton.jit
def _rows(base, row0, S: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr,
          ASM: tl.constexpr, SUB: tl.constexpr):  # fmt: skip
    """Rows [row0, row0 + R) of each slot's page (``base``: (S,) int32 pointers to the pages'
    words) as (S, R, 128) fp16 operands ``1024 + mu * code`` (SUB: ``mu * code``, the
    offset subtracted exactly in fp16, so no sum cancels it later). The lanes of a warp fill
    512 contiguous bytes and the warps take the slots, so the load lands in the MMA layout
    with the slot as the warp."""
    f = tl.max_contiguous(tl.multiple_of(tl.arange(0, 128), 128), 128)
    if BITS == 4:  # (S, R / 8, 8 rows x 16 words)
        a = tl.arange(0, R // 8)
        w = tl.load(base[:, None, None] + (row0 + 8 * a)[None, :, None] * 16 + f[None, None, :])
        x = _unpack4(tl.reshape(w, (S, R, 16)), S, R, ASM)
    else:  # (S, R / 16, a 16-row block of row pairs)
        a = tl.arange(0, R // 16)
        w = tl.load(base[:, None, None] + (row0 + 16 * a)[None, :, None] * 8 + f[None, None, :])
        w = tl.reshape(w, (S, R // 16, 8, 4, 2, 2))  # (S, blk, g, t, half, j)
        w = tl.permute(w, (0, 1, 4, 2, 3, 5))  # (S, blk, half, g, t, j)
        x = _unpack2(tl.reshape(w, (S, R, 8)), S, R, ASM)
    if SUB:
        x = x - 1024.0
    return x


@triton.jit
def _join4(x0, x1, x2, x3, S: tl.constexpr, R: tl.constexpr, N: tl.constexpr):
    """4 (S, R, N) tiles -> (S, 4 R, N), tile i at rows [i R, (i + 1) R)."""
    x = tl.join(tl.join(x0, x1), tl.join(x2, x3))  # (S, R, N, a, b): tile 2 b + a
    return tl.reshape(tl.permute(x, (0, 4, 3, 1, 2)), (S, 4 * R, N))


@triton.jit
def _mu_inv(k, BITS: tl.constexpr):
    """1 / mu of column k (the power of two the conversion multiplied its code by)."""
    if BITS == 4:
        return tl.where(((k >> 1) & 1) == 1, 0.0625, 1.0)
    return tl.exp2(-2.0 * (2 * ((k >> 4) & 1) + ((k >> 1) & 1)).to(tl.float32))


@triton.jit
def _dot(x0, x1, x2, x3, y, acc, S: tl.constexpr, R: tl.constexpr, N: tl.constexpr,
         PRECISE: tl.constexpr):  # fmt: skip
    """The 4 (S, R, 128) fp16 tiles times y (S, 128, N) float32 plus acc (S, R, N), joined to
    (S, 4 R, N): y as one fp16 operand, or (PRECISE) as an fp16 high and low part."""
    yh = y.to(tl.float16)
    r0 = tl.dot(x0, yh, acc=acc)
    r1 = tl.dot(x1, yh, acc=acc)
    r2 = tl.dot(x2, yh, acc=acc)
    r3 = tl.dot(x3, yh, acc=acc)
    if PRECISE:
        # the low part is ~2^-11 of y: scaled by 2^11 before its fp16 rounding (exact power
        # of two), or it would sit in fp16's subnormals for the small operands here
        yl = ((y - yh.to(tl.float32)) * 2048.0).to(tl.float16)
        zero = tl.zeros_like(acc)
        r0 += tl.dot(x0, yl, acc=zero) * (1.0 / 2048.0)
        r1 += tl.dot(x1, yl, acc=zero) * (1.0 / 2048.0)
        r2 += tl.dot(x2, yl, acc=zero) * (1.0 / 2048.0)
        r3 += tl.dot(x3, yl, acc=zero) * (1.0 / 2048.0)
    return _join4(r0, r1, r2, r3, S, R, N)


@triton.jit
def _page_dot(base, y, acc, S: tl.constexpr, TT: tl.constexpr, N: tl.constexpr,
              BITS: tl.constexpr, ASM: tl.constexpr, SUB: tl.constexpr,
              PRECISE: tl.constexpr):  # fmt: skip
    """One page per slot (``base``: (S,) word pointers) as four (S, TT, 128) operand tiles of
    rows, times y (S, 128, N) plus acc: (S, 4 TT, N)."""
    x0 = _rows(base, 0, S, TT, BITS, ASM, SUB)
    x1 = _rows(base, TT, S, TT, BITS, ASM, SUB)
    x2 = _rows(base, 2 * TT, S, TT, BITS, ASM, SUB)
    x3 = _rows(base, 3 * TT, S, TT, BITS, ASM, SUB)
    return _dot(x0, x1, x2, x3, y, acc, S, TT, N, PRECISE)


@triton.jit
def _offset(y, other, SUB: tl.constexpr):
    """The bias that removes the operands' 1024 offset, per head: sum(other - 1024 y16) over
    axis 1, y16 the fp16 operand the dot saw; with SUB the operands carry no offset."""
    if SUB:
        return tl.sum(other, axis=1)
    return tl.sum(tl.fma(y.to(tl.float16).to(tl.float32), -1024.0, other), axis=1)


@triton.jit
def _fragment_pages(q_base, qoffs, sm_scale, m_i, l_i, acc, start, end, base_idx,
                    kc, vc, ks_ptr, kz_ptr, va_ptr, vb_ptr, cs_ptr, pt, pf,
                    NW: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, T: tl.constexpr,
                    BITS: tl.constexpr, ASM: tl.constexpr, PRECISE: tl.constexpr,
                    OFFSET: tl.constexpr):  # fmt: skip
    """Pages [start, end) of one class (table entries ``base_idx + j``), NW at a time, one per
    warp: the slots' online-softmax states m_i, l_i (NW, GP) and acc (NW, D, GP)."""
    W: tl.constexpr = T * BITS // 32  # words per row
    SUB_K: tl.constexpr = PRECISE or OFFSET >= 2  # keys' codes lose their offset before the dot
    SUB_V: tl.constexpr = PRECISE or OFFSET >= 1  # values' codes
    TT: tl.constexpr = T // 4
    offs_s = tl.arange(0, NW)
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, T)
    offs_h = tl.arange(0, GP)
    mu_k = _mu_inv(offs_d, BITS)[None, :, None] * sm_scale  # (1, D, 1): channel multipliers
    mu_t = _mu_inv(offs_t, BITS)[None, :]  # (1, T): token multipliers of the value rows
    for u in range(start, end, NW):
        sl = u + offs_s
        valid = sl < end
        page = tl.load(pt + base_idx + sl, mask=valid, other=0).to(tl.int64)  # (NW,)
        fill = tl.load(pf + base_idx + sl, mask=valid, other=0)  # live tokens (0: no page)
        # scales in q's layout (broadcast over the heads): no layout conversion
        kvo = page[:, None, None] * D + offs_d[None, :, None] + 0 * offs_h[None, None, :]
        ks = tl.load(ks_ptr + kvo).to(tl.float32) * mu_k  # (NW, D, GP)
        kz = tl.load(kz_ptr + kvo).to(tl.float32) * sm_scale
        # q reloaded per page (from L1; the + 0 keeps LLVM from hoisting it, which would hold
        # it in registers across the loop)
        q = tl.load(q_base + (tl.minimum(page, 0) * 64).to(tl.int32)[:, None, None] + qoffs)
        q = q.to(tl.float32)  # (NW, D, GP)
        qs = q * ks
        bias = _offset(qs, q * kz, SUB_K)  # (NW, GP)
        sb = tl.broadcast_to(bias[:, None, :], (NW, TT, GP))
        s = _page_dot(kc + page * (T * W), qs, sb, NW, TT, GP, BITS, ASM, SUB_K,
                      PRECISE)  # (NW, T, GP)  # fmt: skip
        s = tl.where(offs_t[None, :, None] < fill[:, None, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None, :])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        vo = page[:, None] * T + offs_t[None, :]
        va = tl.load(va_ptr + vo).to(tl.float32) * mu_t  # (NW, T)
        vb = tl.load(vb_ptr + vo).to(tl.float32)
        pa = p * va[:, :, None]
        uu = _offset(pa, p * vb[:, :, None], SUB_V)
        cs = tl.load(cs_ptr + page[:, None] * D + offs_d[None, :]).to(tl.float32)  # (NW, D)
        ub = tl.broadcast_to(uu[:, None, :], (NW, TT, GP))
        op = _page_dot(vc + page * (D * W), pa, ub, NW, TT, GP, BITS, ASM, SUB_V,
                       PRECISE)  # (NW, D, GP)  # fmt: skip
        acc = acc * alpha[:, None, :] + cs[:, :, None] * op
    return m_i, l_i, acc


@triton.jit
def fragment_decode_kernel(
    q_ptr,  # (B, Hq, D) queries (any float dtype)
    tab,  # the address table of zipvl.paged_decode_triton
    m_ptr, l_ptr, o_ptr,  # partial states: (B, Hq, FS + NS), (B, Hq, FS + NS), (.., FS + NS, D)
    ticket_ptr,  # (rows,) int32, zero between launches
    out_ptr, lse_ptr,  # (B, Hq, D), (B, Hq) float32
    sm_scale,  # softmax scale * log2(e)
    HKV: tl.constexpr, GROUP: tl.constexpr,  # KV heads, query heads per KV head
    B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,  # region bases
    NUM_SPLITS: tl.constexpr, FP_SPLITS: tl.constexpr, MIN_PAGES: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, HBITS: tl.constexpr, LBITS: tl.constexpr, GP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    ASM: tl.constexpr, PRECISE: tl.constexpr, OFFSET: tl.constexpr, FP_BLOCK: tl.constexpr,
    PARAM: tl.constexpr, FP: tl.constexpr, ALIGNED: tl.constexpr,
    NS_PAD: tl.constexpr, MERGE_GM: tl.constexpr, MERGE_SB: tl.constexpr, NW: tl.constexpr,
):  # fmt: skip
    D: tl.constexpr = HEAD_DIM
    NS1: tl.constexpr = NUM_SPLITS + FP_SPLITS  # partial states a head
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // HKV
    hkv = row % HKV
    num_heads = HKV * GROUP
    head0 = (b * num_heads + hkv * GROUP).to(tl.int64)  # the row's first query head
    # this row's pages now: the page programs take MIN_PAGES or more each (whole slot groups),
    # so a short row uses few programs and the merge reads only the states written
    nh = tl.load(_addr(tab, 16, tl.int32, ALIGNED) + row)  # H_NP
    nl = tl.load(_addr(tab, 19, tl.int32, ALIGNED) + row)  # L_NP
    total = nh + nl
    per = tl.maximum(tl.cdiv(total, NUM_SPLITS), MIN_PAGES)
    per = tl.cdiv(per, NW) * NW
    n_live = FP_SPLITS + tl.cdiv(total, per)  # states written: fp programs, then page programs
    if split >= FP_SPLITS:
        j = split - FP_SPLITS  # page program j
        offs_h = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        # (1, D, GP) offsets of q: head h at column h, the pad heads read head G - 1
        qoffs = tl.minimum(offs_h, GROUP - 1)[None, None, :] * D + offs_d[None, :, None]
        q_base = q_ptr + head0 * D
        u0 = tl.minimum(j * per, total)
        u1 = tl.minimum(u0 + per, total)
        m_i = tl.full([NW, GP], float("-inf"), tl.float32)
        l_i = tl.zeros([NW, GP], tl.float32)
        acc = tl.zeros([NW, D, GP], tl.float32)
        m_i, l_i, acc = _fragment_pages(
            q_base, qoffs, sm_scale, m_i, l_i, acc, u0, tl.minimum(u1, nh),
            row * tl.load(tab + 23).to(tl.int32),  # HCOLS
            _addr(tab, 0, tl.int32, ALIGNED), _addr(tab, 1, tl.int32, ALIGNED),  # H_POOL codes
            _addr(tab, 2, PARAM, ALIGNED), _addr(tab, 3, PARAM, ALIGNED),
            _addr(tab, 4, PARAM, ALIGNED), _addr(tab, 5, PARAM, ALIGNED),
            _addr(tab, 6, PARAM, ALIGNED),
            _addr(tab, 14, tl.int32, ALIGNED), _addr(tab, 15, tl.int32, ALIGNED),  # H_PT, H_PF
            NW, GP, D, PAGE, HBITS, ASM, PRECISE, OFFSET)  # fmt: skip
        m_i, l_i, acc = _fragment_pages(
            q_base, qoffs, sm_scale, m_i, l_i, acc, tl.maximum(u0, nh) - nh, u1 - nh,
            row * tl.load(tab + 24).to(tl.int32),  # LCOLS
            _addr(tab, 7, tl.int32, ALIGNED), _addr(tab, 8, tl.int32, ALIGNED),  # L_POOL codes
            _addr(tab, 9, PARAM, ALIGNED), _addr(tab, 10, PARAM, ALIGNED),
            _addr(tab, 11, PARAM, ALIGNED), _addr(tab, 12, PARAM, ALIGNED),
            _addr(tab, 13, PARAM, ALIGNED),
            _addr(tab, 17, tl.int32, ALIGNED), _addr(tab, 18, tl.int32, ALIGNED),  # L_PT, L_PF
            NW, GP, D, PAGE, LBITS, ASM, PRECISE, OFFSET)  # fmt: skip
        # the slots' states merged: the only reduction across warps, once per program
        mx = tl.max(m_i, axis=0)  # (GP,)
        wgt = tl.exp2(m_i - tl.where(mx == float("-inf"), 0.0, mx)[None, :])  # 0 where -inf
        out_row = (head0 + offs_h) * NS1 + split
        hv = offs_h < GROUP
        tl.store(m_ptr + out_row, mx, mask=hv)
        tl.store(l_ptr + out_row, tl.sum(l_i * wgt, axis=0), mask=hv)
        o = tl.sum(acc * wgt[:, None, :], axis=0)  # (D, GP)
        tl.store(o_ptr + out_row[None, :] * D + offs_d[:, None], o, mask=hv[None, :])
    else:
        QD: tl.constexpr = D // 4
        offs_g = tl.arange(0, GROUP_PAD)
        offs_c = tl.arange(0, QD)
        g_valid = offs_g < GROUP
        gm = g_valid[:, None]
        q_rows = q_ptr + ((head0 + offs_g) * D)[:, None] + offs_c[None, :]
        q0 = tl.load(q_rows, mask=gm, other=0.0).to(tl.float32) * sm_scale  # (GROUP_PAD, QD)
        q1 = tl.load(q_rows + QD, mask=gm, other=0.0).to(tl.float32) * sm_scale
        q2 = tl.load(q_rows + 2 * QD, mask=gm, other=0.0).to(tl.float32) * sm_scale
        q3 = tl.load(q_rows + 3 * QD, mask=gm, other=0.0).to(tl.float32) * sm_scale
        m_f = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_f = tl.zeros([GROUP_PAD], tl.float32)
        a0 = tl.zeros([GROUP_PAD, QD], tl.float32)
        a1 = tl.zeros([GROUP_PAD, QD], tl.float32)
        a2 = tl.zeros([GROUP_PAD, QD], tl.float32)
        a3 = tl.zeros([GROUP_PAD, QD], tl.float32)
        m_f, l_f, a0, a1, a2, a3 = _fp_regions(
            tab, row, q0, q1, q2, q3, m_f, l_f, a0, a1, a2, a3, offs_c, offs_c,
            split, B1, B2, B3, HEAD_DIM, FP_BLOCK, FP, ALIGNED,
            FP_SPLITS)  # fmt: skip
        f_row = (head0 + offs_g) * NS1 + split
        tl.store(m_ptr + f_row, m_f, mask=g_valid)
        tl.store(l_ptr + f_row, l_f, mask=g_valid)
        o_rows = o_ptr + (f_row * D)[:, None] + offs_c[None, :]
        tl.store(o_rows, a0, mask=gm)
        tl.store(o_rows + QD, a1, mask=gm)
        tl.store(o_rows + 2 * QD, a2, mask=gm)
        tl.store(o_rows + 3 * QD, a3, mask=gm)
    _publish(m_ptr, l_ptr, o_ptr, ticket_ptr, out_ptr, lse_ptr, row, b, hkv, n_live, HKV,
             GROUP, NS1 - 1, NS_PAD, MERGE_GM, MERGE_SB, HEAD_DIM)  # fmt: skip
