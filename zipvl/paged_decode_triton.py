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

__all__ = ["CONVERTS", "DEFAULT_CONVERT", "INTERPRETED", "paged_decode_triton"]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels below were decorated for the Triton interpreter (read at import, when
Triton reads the variable too), so CPU tensors can run them."""

CONVERTS = ("cvt", "magic", "asm")
"""How the kernel turns codes into fp16 (see ``_fields_asm``): the workspace key ``convert``."""
DEFAULT_CONVERT = "magic" if INTERPRETED else "asm"


# Codes are read as int32 words: four bytes of one token row, i.e. channels 4j .. 4j + 3 of
# every field (contiguous-slice packing: byte i of a row holds channel i + f * ROW at shift
# f * BITS). Code -> fp16, three ways (``CONVERT``):
#   0 "cvt":   fields converted by the int -> float unit (a quarter of the integer throughput
#              on Hopper);
#   1 "magic": field | 0x6400 read as fp16 is 1024 + field exactly; subtract 1024 (integer and
#              fp16 ops only, one field at a time);
#   2 "asm":   the same on two fields per 32-bit register (prmt + lop3 + sub.f16x2 in inline
#              PTX, one word per instance); compiled CUDA only (the interpreter has no PTX).


@triton.jit
def _word_asm_4(w):
    """int32 words -> 8 int16 tensors (the bits of fp16 codes): output 4 f + r is field f of
    byte r of each word (one word per instance)."""
    return tl.inline_asm_elementwise(
        """
            {
            .reg .b32 t0, t1, t2, t3, k;
            mov.b32 k, 0x64006400;
            prmt.b32 t0, $8, 0, 0x4140;
            prmt.b32 t1, $8, 0, 0x4342;
            shr.b32 t2, t0, 4;
            shr.b32 t3, t1, 4;
            lop3.b32 t0, t0, 0x000F000F, 0x64006400, 0xEA;
            sub.f16x2 t0, t0, k;
            lop3.b32 t1, t1, 0x000F000F, 0x64006400, 0xEA;
            sub.f16x2 t1, t1, k;
            lop3.b32 t2, t2, 0x000F000F, 0x64006400, 0xEA;
            sub.f16x2 t2, t2, k;
            lop3.b32 t3, t3, 0x000F000F, 0x64006400, 0xEA;
            sub.f16x2 t3, t3, k;
            mov.b32 {$0, $1}, t0;
            mov.b32 {$2, $3}, t1;
            mov.b32 {$4, $5}, t2;
            mov.b32 {$6, $7}, t3;
            }
        """,
        "=h,=h,=h,=h,=h,=h,=h,=h,r", [w],
        dtype=(tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16),
        is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _word_asm_2(w):
    """int32 words -> 16 int16 tensors (the bits of fp16 codes): output 4 f + r is field f of
    byte r of each word (one word per instance)."""
    return tl.inline_asm_elementwise(
        """
            {
            .reg .b32 t0, t1, t2, t3, t4, t5, t6, t7, k;
            mov.b32 k, 0x64006400;
            prmt.b32 t0, $16, 0, 0x4140;
            prmt.b32 t1, $16, 0, 0x4342;
            shr.b32 t2, t0, 2;
            shr.b32 t3, t1, 2;
            shr.b32 t4, t0, 4;
            shr.b32 t5, t1, 4;
            shr.b32 t6, t0, 6;
            shr.b32 t7, t1, 6;
            lop3.b32 t0, t0, 0x00030003, 0x64006400, 0xEA;
            sub.f16x2 t0, t0, k;
            lop3.b32 t1, t1, 0x00030003, 0x64006400, 0xEA;
            sub.f16x2 t1, t1, k;
            lop3.b32 t2, t2, 0x00030003, 0x64006400, 0xEA;
            sub.f16x2 t2, t2, k;
            lop3.b32 t3, t3, 0x00030003, 0x64006400, 0xEA;
            sub.f16x2 t3, t3, k;
            lop3.b32 t4, t4, 0x00030003, 0x64006400, 0xEA;
            sub.f16x2 t4, t4, k;
            lop3.b32 t5, t5, 0x00030003, 0x64006400, 0xEA;
            sub.f16x2 t5, t5, k;
            lop3.b32 t6, t6, 0x00030003, 0x64006400, 0xEA;
            sub.f16x2 t6, t6, k;
            lop3.b32 t7, t7, 0x00030003, 0x64006400, 0xEA;
            sub.f16x2 t7, t7, k;
            mov.b32 {$0, $1}, t0;
            mov.b32 {$2, $3}, t1;
            mov.b32 {$4, $5}, t2;
            mov.b32 {$6, $7}, t3;
            mov.b32 {$8, $9}, t4;
            mov.b32 {$10, $11}, t5;
            mov.b32 {$12, $13}, t6;
            mov.b32 {$14, $15}, t7;
            }
        """,
        "=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,r", [w],
        dtype=(tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16,
               tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16),
        is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _word_asm_8(w):
    """int32 words -> 4 int16 tensors (the bits of fp16 codes): output 4 f + r is field f of
    byte r of each word (one word per instance)."""
    return tl.inline_asm_elementwise(
        """
            {
            .reg .b32 t0, t1, k;
            mov.b32 k, 0x64006400;
            prmt.b32 t0, $4, 0, 0x4140;
            prmt.b32 t1, $4, 0, 0x4342;
            lop3.b32 t0, t0, 0x00FF00FF, 0x64006400, 0xEA;
            sub.f16x2 t0, t0, k;
            lop3.b32 t1, t1, 0x00FF00FF, 0x64006400, 0xEA;
            sub.f16x2 t1, t1, k;
            mov.b32 {$0, $1}, t0;
            mov.b32 {$2, $3}, t1;
            }
        """,
        "=h,=h,=h,=h,r", [w],
        dtype=(tl.int16, tl.int16, tl.int16, tl.int16),
        is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _h(x):
    """int16 bits -> fp16."""
    return x.to(tl.float16, bitcast=True)


@triton.jit
def _interleave4(a, b, c, d):
    """Four (BT, W) tiles -> (BT, 4 W): element [t, 4 j + r] is tile r's [t, j]."""
    x = tl.join(tl.join(a, c), tl.join(b, d))  # [t, j, i, k] = tile 2 i + k
    return tl.reshape(x, (x.shape[0], 4 * x.shape[1]))


@triton.jit
def _field(w, SHIFT: tl.constexpr, MASK: tl.constexpr, CONVERT: tl.constexpr):
    """The field at bit SHIFT of int32 words, as fp16 (CONVERT 0 or 1, see above)."""
    f = (w >> SHIFT) & MASK if SHIFT > 0 else w & MASK
    if CONVERT == 0:
        return f.to(tl.float16)
    return (f | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _field_quarter(w, F: tl.constexpr, BITS: tl.constexpr, CONVERT: tl.constexpr):
    """Field F of every byte of (BT, W) words as a (BT, 4 W) fp16 tile (CONVERT 0 or 1)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    return _interleave4(_field(w, F * BITS, MASK, CONVERT), _field(w, 8 + F * BITS, MASK, CONVERT),
                        _field(w, 16 + F * BITS, MASK, CONVERT),
                        _field(w, 24 + F * BITS, MASK, CONVERT))  # fmt: skip


@triton.jit
def _quarters(base, offs_t, tv, QD: tl.constexpr, BITS: tl.constexpr, CONVERT: tl.constexpr):
    """Codes of a (BT, D) tile as four (BT, D / 4) fp16 quarters of channels, read as int32
    words (W = QD / 4 words per quarter row)."""
    ROW: tl.constexpr = 4 * QD * BITS // 8  # bytes per token
    W: tl.constexpr = QD // 4
    offs_w = tl.arange(0, W)
    words = base.to(tl.pointer_type(tl.int32)) + offs_t[:, None] * (ROW // 4) + offs_w[None, :]
    m = tv[:, None]
    if BITS == 2:  # one quarter of the words holds all four quarters (fields 0 .. 3)
        w0 = tl.load(words, mask=m, other=0)
        if CONVERT == 2:
            r = _word_asm_2(w0)
            return (_interleave4(_h(r[0]), _h(r[1]), _h(r[2]), _h(r[3])),
                    _interleave4(_h(r[4]), _h(r[5]), _h(r[6]), _h(r[7])),
                    _interleave4(_h(r[8]), _h(r[9]), _h(r[10]), _h(r[11])),
                    _interleave4(_h(r[12]), _h(r[13]), _h(r[14]), _h(r[15])))  # fmt: skip
        return (_field_quarter(w0, 0, 2, CONVERT), _field_quarter(w0, 1, 2, CONVERT),
                _field_quarter(w0, 2, 2, CONVERT), _field_quarter(w0, 3, 2, CONVERT))  # fmt: skip
    if BITS == 4:  # words [0, W): quarters 0 (low) and 2 (high); [W, 2 W): quarters 1 and 3
        w0 = tl.load(words, mask=m, other=0)
        w1 = tl.load(words + W, mask=m, other=0)
        if CONVERT == 2:
            r = _word_asm_4(w0)
            u = _word_asm_4(w1)
            return (_interleave4(_h(r[0]), _h(r[1]), _h(r[2]), _h(r[3])),
                    _interleave4(_h(u[0]), _h(u[1]), _h(u[2]), _h(u[3])),
                    _interleave4(_h(r[4]), _h(r[5]), _h(r[6]), _h(r[7])),
                    _interleave4(_h(u[4]), _h(u[5]), _h(u[6]), _h(u[7])))  # fmt: skip
        return (_field_quarter(w0, 0, 4, CONVERT), _field_quarter(w1, 0, 4, CONVERT),
                _field_quarter(w0, 1, 4, CONVERT), _field_quarter(w1, 1, 4, CONVERT))  # fmt: skip
    # 8 bits: quarter q is words [q W, (q + 1) W)
    w0 = tl.load(words, mask=m, other=0)
    w1 = tl.load(words + W, mask=m, other=0)
    w2 = tl.load(words + 2 * W, mask=m, other=0)
    w3 = tl.load(words + 3 * W, mask=m, other=0)
    if CONVERT == 2:
        r0, r1, r2, r3 = _word_asm_8(w0), _word_asm_8(w1), _word_asm_8(w2), _word_asm_8(w3)
        return (_interleave4(_h(r0[0]), _h(r0[1]), _h(r0[2]), _h(r0[3])),
                _interleave4(_h(r1[0]), _h(r1[1]), _h(r1[2]), _h(r1[3])),
                _interleave4(_h(r2[0]), _h(r2[1]), _h(r2[2]), _h(r2[3])),
                _interleave4(_h(r3[0]), _h(r3[1]), _h(r3[2]), _h(r3[3])))  # fmt: skip
    return (_field_quarter(w0, 0, 8, CONVERT), _field_quarter(w1, 0, 8, CONVERT),
            _field_quarter(w2, 0, 8, CONVERT), _field_quarter(w3, 0, 8, CONVERT))  # fmt: skip


@triton.jit
def _split16(x):
    """x (float32) as hi + lo fp16 terms (about 22 mantissa bits together)."""
    hi = x.to(tl.float16)
    return hi, (x - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _dot2(a, b, PRECISE: tl.constexpr):
    """a @ b for float32 a and fp16 b exact in fp16 (codes). Default: one fp16 dot (a rounded
    to fp16: 11 bits, finer than bf16, within the 2x rule of tests/test_decode.py for bf16 and
    fp16 inputs). With PRECISE (the default for float32 inputs, or workspace ``precise``), two
    fp16 dots on the hi and lo parts of a: float32-grade, at about 1.4x the instructions per
    page and register spills (sm_90 SASS)."""
    if PRECISE:
        hi, lo = _split16(a)
        return tl.dot(hi, b) + tl.dot(lo, b)
    return tl.dot(a.to(tl.float16), b)


@triton.jit
def _online(s, m_i, l_i):
    """One online-softmax step: returns (m_new, p, alpha, l_new)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, p, alpha, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _attend_page(qf, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3,
                 kc_ptr, vc_ptr, va_ptr, vb_ptr, page, fill,
                 ks0, ks1, ks2, ks3, kz, cs0, cs1, cs2, cs3,
                 QD: tl.constexpr, PAGE: tl.constexpr, BLOCK_T: tl.constexpr,
                 BITS: tl.constexpr, PRECISE: tl.constexpr, CONVERT: tl.constexpr):  # fmt: skip
    """One page (its parameters loaded one page ahead by ``_page_ahead``)."""
    ROW: tl.constexpr = 4 * QD * BITS // 8
    page = page.to(tl.int64)
    ks0, ks1 = ks0.to(tl.float32), ks1.to(tl.float32)
    ks2, ks3 = ks2.to(tl.float32), ks3.to(tl.float32)
    cs0, cs1 = cs0.to(tl.float32), cs1.to(tl.float32)
    cs2, cs3 = cs2.to(tl.float32), cs3.to(tl.float32)
    qz = tl.sum(qf * kz.to(tl.float32)[None, :], axis=1)  # (GP,): q . z, one reduction
    # q in code space (keys are per channel over the page): k = code * s + z
    qs0, qs1 = q0 * ks0[None, :], q1 * ks1[None, :]
    qs2, qs3 = q2 * ks2[None, :], q3 * ks3[None, :]
    for sub in tl.static_range(PAGE // BLOCK_T):
        offs_t = sub * BLOCK_T + tl.arange(0, BLOCK_T)
        tv = offs_t < fill
        kbase = kc_ptr + page * PAGE * ROW
        k0, k1, k2, k3 = _quarters(kbase, offs_t, tv, QD, BITS, CONVERT)
        s = _dot2(qs0, tl.trans(k0), PRECISE) + _dot2(qs1, tl.trans(k1), PRECISE)
        s += _dot2(qs2, tl.trans(k2), PRECISE) + _dot2(qs3, tl.trans(k3), PRECISE)
        s = tl.where(tv[None, :], s + qz[:, None], float("-inf"))  # (GP, BT) log2 domain
        m_i, p, alpha, l_i = _online(s, m_i, l_i)
        va = tl.load(va_ptr + page * PAGE + offs_t, mask=tv, other=0.0).to(tl.float32)
        vb = tl.load(vb_ptr + page * PAGE + offs_t, mask=tv, other=0.0).to(tl.float32)
        # values per token after the page's channel divisor: v = (code * a + b) * cs
        pa = p * va[None, :]
        pz = tl.sum(p * vb[None, :], axis=1)[:, None]
        vbase = vc_ptr + page * PAGE * ROW
        v0, v1, v2, v3 = _quarters(vbase, offs_t, tv, QD, BITS, CONVERT)
        a0 = a0 * alpha[:, None] + (_dot2(pa, v0, PRECISE) + pz) * cs0[None, :]
        a1 = a1 * alpha[:, None] + (_dot2(pa, v1, PRECISE) + pz) * cs1[None, :]
        a2 = a2 * alpha[:, None] + (_dot2(pa, v2, PRECISE) + pz) * cs2[None, :]
        a3 = a3 * alpha[:, None] + (_dot2(pa, v3, PRECISE) + pz) * cs3[None, :]
    return m_i, l_i, a0, a1, a2, a3


@triton.jit
def _page_ahead(pt_ptr, pf_ptr, ks_ptr, kz_ptr, cs_ptr, idx, valid, offs_c, QD: tl.constexpr):
    """Page id, fill and per-channel parameters of table entry ``idx`` (raw fp16), issued one
    page before use so their latency hides behind the current page (masked when ``valid`` is
    false: the entry may not exist)."""
    page = tl.load(pt_ptr + idx, mask=valid, other=0)
    fill = tl.load(pf_ptr + idx, mask=valid, other=0)
    base = page.to(tl.int64) * 4 * QD
    vm = offs_c < tl.where(valid, QD, 0)  # the scalar mask as a vector (for the interpreter)
    par = ks_ptr + base + offs_c
    ks0 = tl.load(par, mask=vm, other=0.0)
    ks1 = tl.load(par + QD, mask=vm, other=0.0)
    ks2 = tl.load(par + 2 * QD, mask=vm, other=0.0)
    ks3 = tl.load(par + 3 * QD, mask=vm, other=0.0)
    offs_d = tl.arange(0, 4 * QD)
    kz = tl.load(kz_ptr + base + offs_d, mask=offs_d < tl.where(valid, 4 * QD, 0), other=0.0)
    par = cs_ptr + base + offs_c
    cs0 = tl.load(par, mask=vm, other=0.0)
    cs1 = tl.load(par + QD, mask=vm, other=0.0)
    cs2 = tl.load(par + 2 * QD, mask=vm, other=0.0)
    cs3 = tl.load(par + 3 * QD, mask=vm, other=0.0)
    return page, fill, ks0, ks1, ks2, ks3, kz, cs0, cs1, cs2, cs3


@triton.jit
def _page_loop(qf, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3, start, end, base_idx,
               kc_ptr, vc_ptr, ks_ptr, kz_ptr, va_ptr, vb_ptr, cs_ptr, pt_ptr, pf_ptr, offs_c,
               QD: tl.constexpr, PAGE: tl.constexpr, BLOCK_T: tl.constexpr, BITS: tl.constexpr,
               PRECISE: tl.constexpr, CONVERT: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """Pages ``start .. end - 1`` of one pool's table row (entries ``base_idx + u``)."""
    last = tl.maximum(end - 1, start)
    (page, fill, ks0, ks1, ks2, ks3, kz, cs0, cs1, cs2, cs3) = _page_ahead(
        pt_ptr, pf_ptr, ks_ptr, kz_ptr, cs_ptr, base_idx + start, start < end, offs_c, QD)
    for u in tl.range(start, end, num_stages=STAGES):
        (npage, nfill, nks0, nks1, nks2, nks3, nkz, ncs0, ncs1, ncs2, ncs3) = _page_ahead(
            pt_ptr, pf_ptr, ks_ptr, kz_ptr, cs_ptr, base_idx + tl.minimum(u + 1, last),
            start < end, offs_c, QD)  # in the loop every entry up to ``last`` exists
        m_i, l_i, a0, a1, a2, a3 = _attend_page(
            qf, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3, kc_ptr, vc_ptr, va_ptr, vb_ptr,
            page, fill, ks0, ks1, ks2, ks3, kz, cs0, cs1, cs2, cs3,
            QD, PAGE, BLOCK_T, BITS, PRECISE, CONVERT)
        page, fill, ks0, ks1, ks2, ks3, kz = npage, nfill, nks0, nks1, nks2, nks3, nkz
        cs0, cs1, cs2, cs3 = ncs0, ncs1, ncs2, ncs3
    return m_i, l_i, a0, a1, a2, a3


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
    STAGES: tl.constexpr, PRECISE: tl.constexpr, CONVERT: tl.constexpr, FP_BLOCK: tl.constexpr,
):  # fmt: skip
    QD: tl.constexpr = HEAD_DIM // 4
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // num_kv_heads
    hkv = row % num_kv_heads
    offs_g = tl.arange(0, GROUP_PAD)
    offs_c = tl.arange(0, QD)
    g_valid = offs_g < group
    heads = hkv * group + offs_g
    num_heads = num_kv_heads * group
    q_rows = q_ptr + ((b * num_heads + heads).to(tl.int64) * HEAD_DIM)[:, None] + offs_c[None, :]
    gm = g_valid[:, None]
    q0 = tl.load(q_rows, mask=gm, other=0.0).to(tl.float32) * sm_scale  # (GP, QD) each
    q1 = tl.load(q_rows + QD, mask=gm, other=0.0).to(tl.float32) * sm_scale
    q2 = tl.load(q_rows + 2 * QD, mask=gm, other=0.0).to(tl.float32) * sm_scale
    q3 = tl.load(q_rows + 3 * QD, mask=gm, other=0.0).to(tl.float32) * sm_scale
    q_full = q_ptr + ((b * num_heads + heads).to(tl.int64) * HEAD_DIM)[:, None]
    qf = tl.load(q_full + tl.arange(0, HEAD_DIM)[None, :], mask=gm, other=0.0)
    qf = qf.to(tl.float32) * sm_scale  # (GP, D), for q . z
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    a0 = tl.zeros([GROUP_PAD, QD], tl.float32)
    a1 = tl.zeros([GROUP_PAD, QD], tl.float32)
    a2 = tl.zeros([GROUP_PAD, QD], tl.float32)
    a3 = tl.zeros([GROUP_PAD, QD], tl.float32)
    if split < NUM_SPLITS:
        nh = tl.load(hnp + row)
        nl = tl.load(lnp + row)
        total = nh + nl
        per = tl.cdiv(total, NUM_SPLITS)
        u0 = split * per
        u1 = tl.minimum(u0 + per, total)
        m_i, l_i, a0, a1, a2, a3 = _page_loop(
            qf, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3, u0, tl.minimum(u1, nh), row * hcols,
            hkc, hvc, hks, hkz, hva, hvb, hcs, hpt, hpf, offs_c,
            QD, PAGE, BLOCK_T, HBITS, PRECISE, CONVERT, STAGES)  # fmt: skip
        m_i, l_i, a0, a1, a2, a3 = _page_loop(
            qf, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3, tl.maximum(u0, nh) - nh, u1 - nh,
            row * lcols, lkc, lvc, lks, lkz, lva, lvb, lcs, lpt, lpf, offs_c,
            QD, PAGE, BLOCK_T, LBITS, PRECISE, CONVERT, STAGES)  # fmt: skip
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
            for t0 in range(0, n, FP_BLOCK):
                offs_t = t0 + tl.arange(0, FP_BLOCK)
                tv = (offs_t < n)[:, None]
                ptrs = fbase + (base + offs_t)[:, None] * HEAD_DIM + offs_c[None, :]
                k0 = tl.load(fk_ptr + ptrs, mask=tv, other=0.0).to(tl.float32)
                k1 = tl.load(fk_ptr + ptrs + QD, mask=tv, other=0.0).to(tl.float32)
                k2 = tl.load(fk_ptr + ptrs + 2 * QD, mask=tv, other=0.0).to(tl.float32)
                k3 = tl.load(fk_ptr + ptrs + 3 * QD, mask=tv, other=0.0).to(tl.float32)
                s = tl.dot(q0, tl.trans(k0), input_precision="ieee")
                s += tl.dot(q1, tl.trans(k1), input_precision="ieee")
                s += tl.dot(q2, tl.trans(k2), input_precision="ieee")
                s += tl.dot(q3, tl.trans(k3), input_precision="ieee")
                s = tl.where(tl.trans(tv), s, float("-inf"))
                m_i, p, alpha, l_i = _online(s, m_i, l_i)
                v0 = tl.load(fv_ptr + ptrs, mask=tv, other=0.0).to(tl.float32)
                v1 = tl.load(fv_ptr + ptrs + QD, mask=tv, other=0.0).to(tl.float32)
                v2 = tl.load(fv_ptr + ptrs + 2 * QD, mask=tv, other=0.0).to(tl.float32)
                v3 = tl.load(fv_ptr + ptrs + 3 * QD, mask=tv, other=0.0).to(tl.float32)
                a0 = a0 * alpha[:, None] + tl.dot(p, v0, input_precision="ieee")
                a1 = a1 * alpha[:, None] + tl.dot(p, v1, input_precision="ieee")
                a2 = a2 * alpha[:, None] + tl.dot(p, v2, input_precision="ieee")
                a3 = a3 * alpha[:, None] + tl.dot(p, v3, input_precision="ieee")
    out_row = (b * num_heads + heads).to(tl.int64) * (NUM_SPLITS + 1) + split
    tl.store(m_ptr + out_row, m_i, mask=g_valid)
    tl.store(l_ptr + out_row, l_i, mask=g_valid)
    o_rows = o_ptr + (out_row * HEAD_DIM)[:, None] + offs_c[None, :]
    tl.store(o_rows, a0, mask=gm)
    tl.store(o_rows + QD, a1, mask=gm)
    tl.store(o_rows + 2 * QD, a2, mask=gm)
    tl.store(o_rows + 3 * QD, a3, mask=gm)


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
    from zipvl.cache.paged import HIGH, LOW, STAGE_HIGH, STAGE_LOW, TAIL

    # ``store``: a PagedKVStore, or zipvl.decode's view of one rebuilt from a custom op's operands
    b, hq, d = q.shape
    hkv = store.num_heads
    g = hq // hkv
    ns = workspace["splits"]
    m, lsum, o = workspace["m"], workspace["l"], workspace["o"]
    hp, lp = store.pools[HIGH], store.pools[LOW]
    fmt = store.fmt
    block_t = int(workspace.get("block_t", min(fmt.page_size, 64)))  # PAGE / BLOCK_T tiles
    convert = CONVERTS.index(workspace.get("convert", DEFAULT_CONVERT))
    if convert == 2 and INTERPRETED:
        raise ValueError("convert: 'asm' is inline PTX, which the Triton interpreter cannot run")
    extra = {"maxnreg": int(workspace["maxnreg"])} if workspace.get("maxnreg") else {}
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
        STAGES=int(workspace.get("stages", 2)), num_warps=int(workspace.get("warps", 4)),
        PRECISE=bool(workspace.get("precise", q.dtype == torch.float32)), CONVERT=convert,
        FP_BLOCK=int(workspace.get("fp_block", 16)), **extra,
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
