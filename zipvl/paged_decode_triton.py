# pyright: reportArgumentType=false, reportOperatorIssue=false, reportAttributeAccessIssue=false, reportCallIssue=false, reportIndexIssue=false, reportGeneralTypeIssues=false
# (Triton's constexpr arguments and tensor tuples are not statically typed)
"""The fused Triton decode kernel over a ``PagedKVStore`` (imported on first use: triton is
optional). See ``zipvl.decode`` for the algebra and the reference beside it.

One launch reads the whole layer: grid (rows = B * Hkv, NS + 1). Programs 0 .. NS-1 of a row
split its pages (high-precision pages, then low-precision ones) evenly; program NS reads the
row's full-precision regions (sinks, both staging regions, the tail). Every program handles the
G query heads of its KV head together (GQA packed into one tile) and writes a partial softmax
state, then takes a ticket of its row (an atomic counter, release / acquire at GPU scope); the
program that draws the last ticket merges the NS + 1 states of the row's query heads by
log-sum-exp, writes the output and the log-sum-exp itself (the decode-block scores are computed
from it), and zeroes the ticket for the next launch. How a program's warps share its pages is
the workspace key ``variant`` (``VARIANTS``): "tile" (the default) reads one page at a time,
all warps splitting its tokens; "pages" gives each warp its own page (batched dots, one
softmax state per warp, merged once per program), so the per-page softmax reductions stay
inside a warp. The store's pointers and sizes reach the kernel through one int64 address table
(built once per set of buffers) instead of 26 separate arguments: Triton's launcher inspects
every argument on every call, and a decode step launches once per layer. The number of
launches and every launch argument are independent of how many tokens were generated: the
counts live in device tensors, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import operator
import os
import weakref
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from zipvl.cache.paged import HIGH, LOW, STAGE_HIGH, STAGE_LOW, TAIL

__all__ = [
    "CONVERTS",
    "DEFAULT_CONVERT",
    "DEFAULT_VARIANT",
    "INTERPRETED",
    "VARIANTS",
    "default_variant",
    "paged_decode_triton",
]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels below were decorated for the Triton interpreter (read at import, when
Triton reads the variable too), so CPU tensors can run them."""

CONVERTS = ("cvt", "magic", "asm")
"""How the kernel turns codes into fp16 (see ``_fields_asm``): the workspace key ``convert``."""
DEFAULT_CONVERT = "magic" if INTERPRETED else "asm"

VARIANTS = ("tile", "pages", "pages-codes", "fragment")
"""How a program's warps share its pages (the workspace key ``variant``): "tile", the warps
split every page's tokens (one page at a time); "pages", each warp owns a page (batched dots,
one softmax state per warp, merged at the end; tiles dequantized to fp16 in registers, see
``_slot_loop_deq``); "pages-codes", the same in code space like "tile" (key codes times their
scales, q . z, p . b and the divisors applied per tile; see ``_slot_loop``). With ``precise``
both "pages" kernels run the code-space loop (float32-grade hi + lo dots). These three read
pages in the "slice" code order; "fragment" (``zipvl.fragment_decode_triton``) reads the
"fragment" order, and is the only variant that does (``PageFormat.code_order``)."""
DEFAULT_VARIANT = "tile"
FRAGMENT = VARIANTS.index("fragment")
DEFAULT_OFFSET = 2
"""The "fragment" kernel's handling of the conversion's 1024 offset (workspace key
``offset``): 0, every code operand keeps it and one bias per head and page removes it after
the dot (the fewest instructions); 1, the value codes lose it before the dot (one fp16
subtraction per two codes), the key codes keep it; 2, both lose it."""


def default_variant(code_order: str) -> str:
    """The variant that reads pages of ``code_order`` by default."""
    return "fragment" if code_order == "fragment" else DEFAULT_VARIANT


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
def _interleave4(a, b, c, d, FM: tl.constexpr):
    """Four (BT, W) tiles -> (BT, 4 W): element [t, 4 j + r] is tile r's [t, j] (channel order);
    with FM ("field-major"), element [t, r W + j]. Also for (NW, BT, W) tiles (one page per
    slot, the "pages" variant) -> (NW, BT, 4 W)."""
    x = tl.join(tl.join(a, c), tl.join(b, d))  # [.., t, j, i, k] = tile 2 i + k
    if len(a.shape) == 3:
        if FM:  # the tile index above the word index: [s, t, i, k, j]
            x = tl.permute(x, (0, 1, 3, 4, 2))
            y = tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] * x.shape[3] * x.shape[4]))
        else:
            y = tl.reshape(x, (x.shape[0], x.shape[1], 4 * x.shape[2]))
    else:
        if FM:
            x = tl.permute(x, (0, 2, 3, 1))
            y = tl.reshape(x, (x.shape[0], x.shape[1] * x.shape[2] * x.shape[3]))
        else:
            y = tl.reshape(x, (x.shape[0], 4 * x.shape[1]))
    return y


@triton.jit
def _field(w, SHIFT: tl.constexpr, MASK: tl.constexpr, CONVERT: tl.constexpr):
    """The field at bit SHIFT of int32 words, as fp16 (CONVERT 0 or 1, see above)."""
    f = (w >> SHIFT) & MASK if SHIFT > 0 else w & MASK
    if CONVERT == 0:
        return f.to(tl.float16)
    return (f | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _field_quarter(
    w, F: tl.constexpr, BITS: tl.constexpr, CONVERT: tl.constexpr, FM: tl.constexpr
):
    """Field F of every byte of (BT, W) words as a (BT, 4 W) fp16 tile (CONVERT 0 or 1)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    return _interleave4(_field(w, F * BITS, MASK, CONVERT), _field(w, 8 + F * BITS, MASK, CONVERT),
                        _field(w, 16 + F * BITS, MASK, CONVERT),
                        _field(w, 24 + F * BITS, MASK, CONVERT), FM)  # fmt: skip


@triton.jit
def _quarters(base, offs_t, tv, QD: tl.constexpr, BITS: tl.constexpr, CONVERT: tl.constexpr):
    """Codes of a (BT, D) tile as four (BT, D / 4) fp16 quarters of channels, read as int32
    words (W = QD / 4 words per quarter row)."""
    ROW: tl.constexpr = 4 * QD * BITS // 8  # bytes per token
    W: tl.constexpr = QD // 4
    offs_w = tl.arange(0, W)
    words = base.to(tl.pointer_type(tl.int32)) + offs_t[:, None] * (ROW // 4) + offs_w[None, :]
    return _quarters_at(words, tv[:, None], QD, BITS, CONVERT, False)


@triton.jit
def _wload(words, m):
    """int32 words (.., BT, W) (masked by ``m``, which broadcasts to them; see
    ``_slot_load`` for page-slot tiles)."""
    if len(words.shape) == 3:  # noqa: SIM108 (Triton: no early return, no conditional expression)
        w = _slot_load(words, m, 0)
    else:
        w = tl.load(words, mask=m, other=0)
    return w


@triton.jit
def _slot_load(ptrs, m, other):
    """Load a tile whose first dimension is the page slot, (NW, X) or (NW, X, Y), as (X, NW) or
    (X, NW, Y) and permute it back: Triton's coalescing then spreads the lanes over the other
    dimensions and the warps over the slots, the MMA layout's assignment, so the tile reaches
    its warp's dot without a conversion through shared memory (loaded as (NW, ..), the warps
    would split the tokens or channels of every slot)."""
    mb = tl.broadcast_to(m, ptrs.shape)
    if len(ptrs.shape) == 3:
        x = tl.load(tl.permute(ptrs, (1, 0, 2)), mask=tl.permute(mb, (1, 0, 2)), other=other)
        x = tl.permute(x, (1, 0, 2))
    else:
        x = tl.permute(tl.load(tl.permute(ptrs, (1, 0)), mask=tl.permute(mb, (1, 0)),
                               other=other), (1, 0))  # fmt: skip
    return x


@triton.jit
def _quarters_at(
    words, m, QD: tl.constexpr, BITS: tl.constexpr, CONVERT: tl.constexpr, FM: tl.constexpr
):
    """``_quarters`` from the int32 pointers of the first W words of each token row, (.., W),
    and a mask that broadcasts to them: four (.., 4 W) fp16 quarters of channels (in
    field-major order with FM, see ``_interleave4``)."""
    W: tl.constexpr = QD // 4
    if BITS == 2:  # one quarter of the words holds all four quarters (fields 0 .. 3)
        w0 = _wload(words, m)
        if CONVERT == 2:
            r = _word_asm_2(w0)
            return (_interleave4(_h(r[0]), _h(r[1]), _h(r[2]), _h(r[3]), FM),
                    _interleave4(_h(r[4]), _h(r[5]), _h(r[6]), _h(r[7]), FM),
                    _interleave4(_h(r[8]), _h(r[9]), _h(r[10]), _h(r[11]), FM),
                    _interleave4(_h(r[12]), _h(r[13]), _h(r[14]), _h(r[15]), FM))  # fmt: skip
        return (_field_quarter(w0, 0, 2, CONVERT, FM), _field_quarter(w0, 1, 2, CONVERT, FM),
                _field_quarter(w0, 2, 2, CONVERT, FM),
                _field_quarter(w0, 3, 2, CONVERT, FM))  # fmt: skip
    if BITS == 4:  # words [0, W): quarters 0 (low) and 2 (high); [W, 2 W): quarters 1 and 3
        w0 = _wload(words, m)
        w1 = _wload(words + W, m)
        if CONVERT == 2:
            r = _word_asm_4(w0)
            u = _word_asm_4(w1)
            return (_interleave4(_h(r[0]), _h(r[1]), _h(r[2]), _h(r[3]), FM),
                    _interleave4(_h(u[0]), _h(u[1]), _h(u[2]), _h(u[3]), FM),
                    _interleave4(_h(r[4]), _h(r[5]), _h(r[6]), _h(r[7]), FM),
                    _interleave4(_h(u[4]), _h(u[5]), _h(u[6]), _h(u[7]), FM))  # fmt: skip
        return (_field_quarter(w0, 0, 4, CONVERT, FM), _field_quarter(w1, 0, 4, CONVERT, FM),
                _field_quarter(w0, 1, 4, CONVERT, FM),
                _field_quarter(w1, 1, 4, CONVERT, FM))  # fmt: skip
    # 8 bits: quarter q is words [q W, (q + 1) W)
    w0 = _wload(words, m)
    w1 = _wload(words + W, m)
    w2 = _wload(words + 2 * W, m)
    w3 = _wload(words + 3 * W, m)
    if CONVERT == 2:
        r0, r1, r2, r3 = _word_asm_8(w0), _word_asm_8(w1), _word_asm_8(w2), _word_asm_8(w3)
        return (_interleave4(_h(r0[0]), _h(r0[1]), _h(r0[2]), _h(r0[3]), FM),
                _interleave4(_h(r1[0]), _h(r1[1]), _h(r1[2]), _h(r1[3]), FM),
                _interleave4(_h(r2[0]), _h(r2[1]), _h(r2[2]), _h(r2[3]), FM),
                _interleave4(_h(r3[0]), _h(r3[1]), _h(r3[2]), _h(r3[3]), FM))  # fmt: skip
    return (_field_quarter(w0, 0, 8, CONVERT, FM), _field_quarter(w1, 0, 8, CONVERT, FM),
            _field_quarter(w2, 0, 8, CONVERT, FM),
            _field_quarter(w3, 0, 8, CONVERT, FM))  # fmt: skip


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
        pt_ptr, pf_ptr, ks_ptr, kz_ptr, cs_ptr, base_idx + start, start < end, offs_c, QD
    )
    for u in tl.range(start, end, num_stages=STAGES):
        (npage, nfill, nks0, nks1, nks2, nks3, nkz, ncs0, ncs1, ncs2, ncs3) = _page_ahead(
            pt_ptr,
            pf_ptr,
            ks_ptr,
            kz_ptr,
            cs_ptr,
            base_idx + tl.minimum(u + 1, last),
            start < end,
            offs_c,
            QD,
        )  # in the loop every entry up to ``last`` exists
        m_i, l_i, a0, a1, a2, a3 = _attend_page(
            qf,
            q0,
            q1,
            q2,
            q3,
            m_i,
            l_i,
            a0,
            a1,
            a2,
            a3,
            kc_ptr,
            vc_ptr,
            va_ptr,
            vb_ptr,
            page,
            fill,
            ks0,
            ks1,
            ks2,
            ks3,
            kz,
            cs0,
            cs1,
            cs2,
            cs3,
            QD,
            PAGE,
            BLOCK_T,
            BITS,
            PRECISE,
            CONVERT,
        )
        page, fill, ks0, ks1, ks2, ks3, kz = npage, nfill, nks0, nks1, nks2, nks3, nkz
        cs0, cs1, cs2, cs3 = ncs0, ncs1, ncs2, ncs3
    return m_i, l_i, a0, a1, a2, a3


# The "pages" variant (workspace ``variant``): the NW warps of a program own NW different pages
# at a time instead of sharing one. Code tiles are (NW, BT, words), one page per slot (row
# pointers per slot, no reshape across pages), and every dot is a batched (rank-3) ``tl.dot``
# over the slots: for rank-3 operands Triton's MMA layout puts the warps along the batch
# dimension, so each warp multiplies its own page, and the softmax max / sum over a page's
# tokens (the reductions that cost block barriers when 4 warps split the tokens) stay inside
# one warp. Each slot keeps its own online-softmax state (m, l: (NW, GP); accumulators
# (NW, GP, QD) x 4, i.e. (GP, D) float32 per warp: 64 registers per thread); the NW states are
# merged once per program, before the partial state is written. A program's pages go NW at a
# time; slots past its last page read nothing (fill 0: every token masked). A page is read in
# tiles of BLOCK_T tokens (default 16; 32 spills on sm_90: 255 registers + 144 B, reloads in
# the tile loop). Two loops: ``_slot_loop_deq`` (the default) dequantizes the tiles to fp16 in
# registers; ``_slot_loop`` stays in code space like the "tile" kernel (variant "pages-codes",
# and every "pages" launch with PRECISE).


@triton.jit
def _slot_params(pt_ptr, pf_ptr, ks_ptr, kz_ptr, cs_ptr, idx, valid, offs_c, offs_v,
                 QD: tl.constexpr):  # fmt: skip
    """``_page_ahead`` for NW table entries ``idx`` (NW,) at once: page ids and fills (NW,) and
    the per-channel parameters as (NW, QD) quarters (raw PARAM dtype; masked where ``valid``
    is false): the keys' in channel order ``offs_c``, the values' divisors in ``offs_v``."""
    page = tl.load(pt_ptr + idx, mask=valid, other=0)
    fill = tl.load(pf_ptr + idx, mask=valid, other=0)
    base = (page.to(tl.int64) * 4 * QD)[:, None] + offs_c[None, :]
    vm = valid[:, None]
    par = ks_ptr + base
    ks0 = _slot_load(par, vm, 0.0)
    ks1 = _slot_load(par + QD, vm, 0.0)
    ks2 = _slot_load(par + 2 * QD, vm, 0.0)
    ks3 = _slot_load(par + 3 * QD, vm, 0.0)
    par = kz_ptr + base
    kz0 = _slot_load(par, vm, 0.0)
    kz1 = _slot_load(par + QD, vm, 0.0)
    kz2 = _slot_load(par + 2 * QD, vm, 0.0)
    kz3 = _slot_load(par + 3 * QD, vm, 0.0)
    par = cs_ptr + (page.to(tl.int64) * 4 * QD)[:, None] + offs_v[None, :]
    cs0 = _slot_load(par, vm, 0.0)
    cs1 = _slot_load(par + QD, vm, 0.0)
    cs2 = _slot_load(par + 2 * QD, vm, 0.0)
    cs3 = _slot_load(par + 3 * QD, vm, 0.0)
    return page, fill, ks0, ks1, ks2, ks3, kz0, kz1, kz2, kz3, cs0, cs1, cs2, cs3


@triton.jit
def _slot_dot(a, b, PRECISE: tl.constexpr):
    """``_dot2`` for (NW, M, K) x (NW, K, N) operands: one product per slot (warp)."""
    if PRECISE:
        hi, lo = _split16(a)
        return tl.dot(hi, b) + tl.dot(lo, b)
    return tl.dot(a.to(tl.float16), b)


@triton.jit
def _slot_q32(q_rows, gm, sm_scale, NW: tl.constexpr):
    """``_slot_q`` in float32 (the PRECISE dots)."""
    q = tl.load(q_rows, mask=gm, other=0.0).to(tl.float32) * sm_scale
    return tl.broadcast_to(q[None, :, :], (NW, q.shape[0], q.shape[1]))


@triton.jit
def _slot_q(q_rows, gm, sm_scale, NW: tl.constexpr):
    """One quarter of q (pointers (GP, QD)) scaled, in fp16 and repeated for the NW slots:
    (NW, GP, QD), the loop-invariant left operand of the key dots (keys scaled instead)."""
    q = tl.load(q_rows, mask=gm, other=0.0).to(tl.float32) * sm_scale
    return tl.broadcast_to(q.to(tl.float16)[None, :, :], (NW, q.shape[0], q.shape[1]))


@triton.jit
def _slot_keys(q, k, ks, PRECISE: tl.constexpr):
    """The logits of one quarter: q (NW, GP, QD) . (codes k (NW, BT, QD) x scales ks
    (NW, QD)). Default: the codes scaled in fp16 (exact codes, one rounding, as q * s in the
    "tile" variant) against the fp16 q of ``_slot_q``; PRECISE: q is float32 and q * s is
    split into hi + lo fp16 dots against the exact codes."""
    if PRECISE:
        s = _slot_dot(q * ks.to(tl.float32)[:, None, :], tl.permute(k, (0, 2, 1)), True)
    else:
        s = tl.dot(q, tl.permute(k * ks.to(tl.float16)[:, None, :], (0, 2, 1)))
    return s


@triton.jit
def _slot_loop(q_rows, gm, sm_scale, m_i, l_i, a0, a1, a2, a3, start, end, base_idx,
               kc_ptr, vc_ptr, ks_ptr, kz_ptr, va_ptr, vb_ptr, cs_ptr, pt_ptr, pf_ptr, offs_c,
               offs_v, NW: tl.constexpr, QD: tl.constexpr, PAGE: tl.constexpr,
               BLOCK_T: tl.constexpr, BITS: tl.constexpr, PRECISE: tl.constexpr,
               CONVERT: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """Pages ``start .. end - 1`` of one pool's table row, NW at a time, page ``u + i`` in slot
    i: the per-slot states m_i, l_i (NW, GP) and a0 .. a3 (NW, GP, QD) advance independently."""
    ROW: tl.constexpr = 4 * QD * BITS // 8  # bytes per token
    W: tl.constexpr = QD // 4
    slots = tl.arange(0, NW)
    offs_w = tl.arange(0, W)
    if PRECISE:  # float32 (GP, QD), repeated over the slots
        q0 = _slot_q32(q_rows, gm, sm_scale, NW)
        q1 = _slot_q32(q_rows + QD, gm, sm_scale, NW)
        q2 = _slot_q32(q_rows + 2 * QD, gm, sm_scale, NW)
        q3 = _slot_q32(q_rows + 3 * QD, gm, sm_scale, NW)
    else:
        q0 = _slot_q(q_rows, gm, sm_scale, NW)
        q1 = _slot_q(q_rows + QD, gm, sm_scale, NW)
        q2 = _slot_q(q_rows + 2 * QD, gm, sm_scale, NW)
        q3 = _slot_q(q_rows + 3 * QD, gm, sm_scale, NW)
    for u in tl.range(start, end, NW, num_stages=STAGES):
        idx = u + slots
        (page, fill, ks0, ks1, ks2, ks3, kz0, kz1, kz2, kz3, cs0, cs1, cs2, cs3) = _slot_params(
            pt_ptr, pf_ptr, ks_ptr, kz_ptr, cs_ptr, base_idx + idx, idx < end, offs_c, offs_v, QD
        )
        page = page.to(tl.int64)
        z = tl.sum(q0.to(tl.float32) * kz0.to(tl.float32)[:, None, :], axis=2)
        z += tl.sum(q1.to(tl.float32) * kz1.to(tl.float32)[:, None, :], axis=2)
        z += tl.sum(q2.to(tl.float32) * kz2.to(tl.float32)[:, None, :], axis=2)
        qz = z + tl.sum(q3.to(tl.float32) * kz3.to(tl.float32)[:, None, :], axis=2)  # (NW, GP)
        cs0, cs1 = cs0.to(tl.float32)[:, None, :], cs1.to(tl.float32)[:, None, :]
        cs2, cs3 = cs2.to(tl.float32)[:, None, :], cs3.to(tl.float32)[:, None, :]
        # int32 word pointers of each slot's page, (NW, 1, 1)
        kw = (kc_ptr + page * (PAGE * ROW)).to(tl.pointer_type(tl.int32))[:, None, None]
        vw = (vc_ptr + page * (PAGE * ROW)).to(tl.pointer_type(tl.int32))[:, None, None]
        # a loop, not unrolled (unrolled tiles of 32 tokens spill: sm_90, 255 registers + 424 B
        # of stack), pipelined: the codes come through cp.async and shared memory, read back
        # in the dot operand's layout (plain loads take a blocked layout and a conversion
        # through shared memory, 2 block barriers each)
        for sub in tl.range(0, PAGE // BLOCK_T, num_stages=STAGES):
            offs_t = sub * BLOCK_T + tl.arange(0, BLOCK_T)
            tv = offs_t[None, :] < fill[:, None]  # (NW, BT)
            rows = offs_t[None, :, None] * (ROW // 4) + offs_w[None, None, :]  # (1, BT, W)
            k0, k1, k2, k3 = _quarters_at(kw + rows, tv[:, :, None], QD, BITS, CONVERT, False)
            s = _slot_keys(q0, k0, ks0, PRECISE) + _slot_keys(q1, k1, ks1, PRECISE)
            s += _slot_keys(q2, k2, ks2, PRECISE) + _slot_keys(q3, k3, ks3, PRECISE)
            s = tl.where(tv[:, None, :], s + qz[:, :, None], float("-inf"))  # (NW, GP, BT)
            m_new = tl.maximum(m_i, tl.max(s, axis=2))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, :, None])
            l_i = l_i * alpha + tl.sum(p, axis=2)
            m_i = m_new
            tok = page[:, None] * PAGE + offs_t[None, :]  # (NW, BT)
            va = tl.load(va_ptr + tok, mask=tv, other=0.0).to(tl.float32)
            vb = tl.load(vb_ptr + tok, mask=tv, other=0.0).to(tl.float32)
            pa = p * va[:, None, :]
            pz = tl.sum(p * vb[:, None, :], axis=2)[:, :, None]
            v0, v1, v2, v3 = _quarters_at(vw + rows, tv[:, :, None], QD, BITS, CONVERT, True)
            alpha = alpha[:, :, None]
            a0 = a0 * alpha + (_slot_dot(pa, v0, PRECISE) + pz) * cs0
            a1 = a1 * alpha + (_slot_dot(pa, v1, PRECISE) + pz) * cs1
            a2 = a2 * alpha + (_slot_dot(pa, v2, PRECISE) + pz) * cs2
            a3 = a3 * alpha + (_slot_dot(pa, v3, PRECISE) + pz) * cs3
    return m_i, l_i, a0, a1, a2, a3


@triton.jit
def _slot_pages(tab, row, q_rows, gm, sm_scale, u0, u1, nh, hcols, offs_c, offs_v,
                hkc, hvc, hks, hkz, hva, hvb, hcs, hpt, hpf,
                GP: tl.constexpr, NW: tl.constexpr, QD: tl.constexpr, PAGE: tl.constexpr,
                BLOCK_T: tl.constexpr, HBITS: tl.constexpr, LBITS: tl.constexpr,
                PRECISE: tl.constexpr, CONVERT: tl.constexpr, STAGES: tl.constexpr,
                PARAM: tl.constexpr, ALIGNED: tl.constexpr, DEQ: tl.constexpr):  # fmt: skip
    """The "pages" variants of a split: its high pages, then its low pages, NW slots each
    (fp16-dequantized operands with DEQ, code space otherwise); returns the merged state of
    the program."""
    m_i = tl.full([NW, GP], float("-inf"), tl.float32)
    l_i = tl.zeros([NW, GP], tl.float32)
    a0 = tl.zeros([NW, GP, QD], tl.float32)
    a1 = tl.zeros([NW, GP, QD], tl.float32)
    a2 = tl.zeros([NW, GP, QD], tl.float32)
    a3 = tl.zeros([NW, GP, QD], tl.float32)
    if DEQ:
        m_i, l_i, a0, a1, a2, a3 = _slot_loop_deq(
            q_rows, gm, sm_scale, m_i, l_i, a0, a1, a2, a3, u0, tl.minimum(u1, nh), row * hcols,
            hkc, hvc, hks, hkz, hva, hvb, hcs, hpt, hpf, offs_c, offs_v,
            NW, QD, PAGE, BLOCK_T, HBITS, CONVERT, STAGES)  # fmt: skip
    else:
        m_i, l_i, a0, a1, a2, a3 = _slot_loop(
            q_rows, gm, sm_scale, m_i, l_i, a0, a1, a2, a3, u0, tl.minimum(u1, nh), row * hcols,
            hkc, hvc, hks, hkz, hva, hvb, hcs, hpt, hpf, offs_c, offs_v,
            NW, QD, PAGE, BLOCK_T, HBITS, PRECISE, CONVERT, STAGES)  # fmt: skip
    lkc, lvc, lks, lkz, lva, lvb, lcs = _pool(tab, 7, PARAM, ALIGNED)  # L_POOL
    lpt = _addr(tab, 17, tl.int32, ALIGNED)  # L_PT
    lpf = _addr(tab, 18, tl.int32, ALIGNED)  # L_PF
    lcols = tl.load(tab + 24).to(tl.int32)  # LCOLS
    if DEQ:
        m_i, l_i, a0, a1, a2, a3 = _slot_loop_deq(
            q_rows, gm, sm_scale, m_i, l_i, a0, a1, a2, a3, tl.maximum(u0, nh) - nh, u1 - nh,
            row * lcols, lkc, lvc, lks, lkz, lva, lvb, lcs, lpt, lpf, offs_c, offs_v,
            NW, QD, PAGE, BLOCK_T, LBITS, CONVERT, STAGES)  # fmt: skip
    else:
        m_i, l_i, a0, a1, a2, a3 = _slot_loop(
            q_rows, gm, sm_scale, m_i, l_i, a0, a1, a2, a3, tl.maximum(u0, nh) - nh, u1 - nh,
            row * lcols, lkc, lvc, lks, lkz, lva, lvb, lcs, lpt, lpf, offs_c, offs_v,
            NW, QD, PAGE, BLOCK_T, LBITS, PRECISE, CONVERT, STAGES)  # fmt: skip
    return _slot_merge(m_i, l_i, a0, a1, a2, a3)


@triton.jit
def _slot_loop_deq(q_rows, gm, sm_scale, m_i, l_i, a0, a1, a2, a3, start, end, base_idx,
                   kc_ptr, vc_ptr, ks_ptr, kz_ptr, va_ptr, vb_ptr, cs_ptr, pt_ptr, pf_ptr,
                   offs_c, offs_v, NW: tl.constexpr, QD: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_T: tl.constexpr, BITS: tl.constexpr, CONVERT: tl.constexpr,
                   STAGES: tl.constexpr):  # fmt: skip
    """``_slot_loop`` with every tile dequantized to fp16 in registers, in the dot operand's
    layout: keys code * s + z, values (code * a + b) * cs (one fp16 rounding each, as the
    "tile" variant's q * s and p * a), so the logits need no q . z term and the accumulators
    no per-tile divisor or p . b term (the default "pages" kernel; PRECISE uses
    ``_slot_loop``)."""
    ROW: tl.constexpr = 4 * QD * BITS // 8  # bytes per token
    W: tl.constexpr = QD // 4
    slots = tl.arange(0, NW)
    offs_w = tl.arange(0, W)
    q0 = _slot_q(q_rows, gm, sm_scale, NW)
    q1 = _slot_q(q_rows + QD, gm, sm_scale, NW)
    q2 = _slot_q(q_rows + 2 * QD, gm, sm_scale, NW)
    q3 = _slot_q(q_rows + 3 * QD, gm, sm_scale, NW)
    for u in tl.range(start, end, NW, num_stages=STAGES):
        idx = u + slots
        (page, fill, ks0, ks1, ks2, ks3, kz0, kz1, kz2, kz3, cs0, cs1, cs2, cs3) = _slot_params(
            pt_ptr, pf_ptr, ks_ptr, kz_ptr, cs_ptr, base_idx + idx, idx < end, offs_c, offs_v, QD
        )
        page = page.to(tl.int64)
        ks0, ks1 = ks0.to(tl.float16)[:, None, :], ks1.to(tl.float16)[:, None, :]
        ks2, ks3 = ks2.to(tl.float16)[:, None, :], ks3.to(tl.float16)[:, None, :]
        kz0, kz1 = kz0.to(tl.float16)[:, None, :], kz1.to(tl.float16)[:, None, :]
        kz2, kz3 = kz2.to(tl.float16)[:, None, :], kz3.to(tl.float16)[:, None, :]
        cs0, cs1 = cs0.to(tl.float16)[:, None, :], cs1.to(tl.float16)[:, None, :]
        cs2, cs3 = cs2.to(tl.float16)[:, None, :], cs3.to(tl.float16)[:, None, :]
        kw = (kc_ptr + page * (PAGE * ROW)).to(tl.pointer_type(tl.int32))[:, None, None]
        vw = (vc_ptr + page * (PAGE * ROW)).to(tl.pointer_type(tl.int32))[:, None, None]
        for sub in tl.range(0, PAGE // BLOCK_T, num_stages=STAGES):  # as in _slot_loop
            offs_t = sub * BLOCK_T + tl.arange(0, BLOCK_T)
            tv = offs_t[None, :] < fill[:, None]  # (NW, BT)
            rows = offs_t[None, :, None] * (ROW // 4) + offs_w[None, None, :]  # (1, BT, W)
            k0, k1, k2, k3 = _quarters_at(kw + rows, tv[:, :, None], QD, BITS, CONVERT, False)
            s = tl.dot(q0, tl.permute(k0 * ks0 + kz0, (0, 2, 1)))
            s = tl.dot(q1, tl.permute(k1 * ks1 + kz1, (0, 2, 1)), s)
            s = tl.dot(q2, tl.permute(k2 * ks2 + kz2, (0, 2, 1)), s)
            s = tl.dot(q3, tl.permute(k3 * ks3 + kz3, (0, 2, 1)), s)
            s = tl.where(tv[:, None, :], s, float("-inf"))  # (NW, GP, BT), log2 domain
            m_new = tl.maximum(m_i, tl.max(s, axis=2))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, :, None])
            l_i = l_i * alpha + tl.sum(p, axis=2)
            m_i = m_new
            tok = page[:, None] * PAGE + offs_t[None, :]  # (NW, BT)
            va = tl.load(va_ptr + tok, mask=tv, other=0.0).to(tl.float16)[:, :, None]
            vb = tl.load(vb_ptr + tok, mask=tv, other=0.0).to(tl.float16)[:, :, None]
            v0, v1, v2, v3 = _quarters_at(vw + rows, tv[:, :, None], QD, BITS, CONVERT, True)
            p = p.to(tl.float16)
            alpha = alpha[:, :, None]
            a0 = tl.dot(p, (v0 * va + vb) * cs0, a0 * alpha)
            a1 = tl.dot(p, (v1 * va + vb) * cs1, a1 * alpha)
            a2 = tl.dot(p, (v2 * va + vb) * cs2, a2 * alpha)
            a3 = tl.dot(p, (v3 * va + vb) * cs3, a3 * alpha)
    return m_i, l_i, a0, a1, a2, a3


@triton.jit
def _slot_merge(m_i, l_i, a0, a1, a2, a3):
    """The NW slot states -> one state of the program ((GP,), (GP,), (GP, QD) x 4): the only
    reduction across warps, once per program."""
    m = tl.max(m_i, axis=0)
    w = tl.exp2(m_i - tl.where(m == float("-inf"), 0.0, m)[None, :])  # (NW, GP), 0 where -inf
    w3 = w[:, :, None]
    return (m, tl.sum(l_i * w, axis=0), tl.sum(a0 * w3, axis=0), tl.sum(a1 * w3, axis=0),
            tl.sum(a2 * w3, axis=0), tl.sum(a3 * w3, axis=0))  # fmt: skip


# The address table (``_address_table``): one int64 per slot, the pointers of both pool classes
# and of the store's tables, fills, counts and full-precision buffer, then three sizes. One
# tensor argument stands for 23 pointers and 3 integers, so a launch specialises a handful of
# arguments instead of 38 (Triton's launcher inspects every non-constexpr argument per call).
POOL_FIELDS = ("kcode", "vcode", "kscale", "kzero", "vscale", "vzero", "vcs")
# Slots. The kernel spells them as literals (with these names beside them): Triton re-checks
# every global a kernel reads on every launch.
H_POOL, L_POOL = 0, 7  # + index in POOL_FIELDS
H_PT, H_PF, H_NP = 14, 15, 16  # high class: page table, page fill, page count per row
L_PT, L_PF, L_NP = 17, 18, 19  # low class
FK, FV, FCNT = 20, 21, 22  # full-precision buffers and their counts
HCOLS, LCOLS, FP_STRIDE = 23, 24, 25  # sizes: table widths, fp buffer row stride (tokens)
TABLE_SLOTS = 26


@triton.jit
def _addr(tab, SLOT: tl.constexpr, TY: tl.constexpr, ALIGNED: tl.constexpr):
    """Slot SLOT of the address table as a pointer to TY (16-byte aligned when ALIGNED: the
    host checked every address, as Triton checks a pointer argument)."""
    a = tl.load(tab + SLOT).to(tl.pointer_type(TY))
    if ALIGNED:
        a = tl.multiple_of(a, 16)
    return a


@triton.jit
def _pool(tab, BASE: tl.constexpr, PARAM: tl.constexpr, ALIGNED: tl.constexpr):
    """The seven pool pointers of one class (codes as bytes, parameters as PARAM)."""
    return (_addr(tab, BASE, tl.uint8, ALIGNED), _addr(tab, BASE + 1, tl.uint8, ALIGNED),
            _addr(tab, BASE + 2, PARAM, ALIGNED), _addr(tab, BASE + 3, PARAM, ALIGNED),
            _addr(tab, BASE + 4, PARAM, ALIGNED), _addr(tab, BASE + 5, PARAM, ALIGNED),
            _addr(tab, BASE + 6, PARAM, ALIGNED))  # fmt: skip


@triton.jit
def _merge_row(m_ptr, l_ptr, o_ptr, out_ptr, lse_ptr, b, hkv, n_live,
               HKV: tl.constexpr, GROUP: tl.constexpr, NS1: tl.constexpr, NS_PAD: tl.constexpr,
               GM: tl.constexpr, SB: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    """Merge the first ``n_live`` of the NS1 partial states of the GROUP query heads of KV head
    ``hkv`` (the others are empty) by log-sum-exp; write out (GROUP, D) and the log-sum-exp
    (GROUP,). Partial states are read past L1 (``.cg``): other SMs wrote them."""
    offs_h = tl.arange(0, GM)
    hv = offs_h < GROUP
    heads = (b * HKV + hkv) * GROUP + offs_h  # query-head rows of (B, Hq)
    srow = heads.to(tl.int64) * NS1  # first partial state of each head
    offs_s = tl.arange(0, NS_PAD)
    sm = hv[:, None] & (offs_s < n_live)[None, :]
    m = tl.load(m_ptr + srow[:, None] + offs_s[None, :], mask=sm, other=float("-inf"),
                cache_modifier=".cg")  # fmt: skip
    m_max = tl.max(m, axis=1)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    lsum = tl.load(l_ptr + srow[:, None] + offs_s[None, :], mask=sm, other=0.0,
                   cache_modifier=".cg")  # fmt: skip
    den = tl.sum(lsum * tl.exp2(m - m_max[:, None]), axis=1)
    den = tl.where(hv, den, 1.0)  # padding heads (not stored): no 0 / 0
    offs_d = tl.arange(0, HEAD_DIM)
    num = tl.zeros([GM, HEAD_DIM], tl.float32)
    for s0 in tl.range(0, n_live, SB):  # SB partial states of every head at a time
        offs = s0 + tl.arange(0, SB)
        cm = hv[:, None] & (offs < n_live)[None, :]
        mc = tl.load(m_ptr + srow[:, None] + offs[None, :], mask=cm, other=float("-inf"),
                     cache_modifier=".cg")  # fmt: skip
        w = tl.exp2(mc - m_max[:, None])  # (GM, SB), 0 where masked
        orow = (srow[:, None] + offs[None, :]) * HEAD_DIM
        o = tl.load(o_ptr + orow[:, :, None] + offs_d[None, None, :], mask=cm[:, :, None],
                    other=0.0, cache_modifier=".cg")  # fmt: skip
        num += tl.sum(o * w[:, :, None], axis=1)
    out_rows = out_ptr + (heads.to(tl.int64) * HEAD_DIM)[:, None] + offs_d[None, :]
    tl.store(out_rows, (num / den[:, None]).to(out_ptr.dtype.element_ty), mask=hv[:, None])
    tl.store(lse_ptr + heads, m_max + tl.log2(den), mask=hv)


@triton.jit
def _fp_regions(tab, row, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3, offs_c, offs_v, f0,
                B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, HEAD_DIM: tl.constexpr,
                FP_BLOCK: tl.constexpr, FP: tl.constexpr, ALIGNED: tl.constexpr,
                FSTEP: tl.constexpr):  # fmt: skip
    """The row's full-precision regions (sinks, both staging regions, the tail) folded into an
    online-softmax state: q0 .. q3 the (GP, QD) channel quarters of the scaled queries, the
    accumulators a0 .. a3 in ``offs_v``'s channel order. FP_BLOCK-token blocks f0, f0 + FSTEP,
    ... of every region (FSTEP programs share the regions)."""
    QD: tl.constexpr = HEAD_DIM // 4
    fk_ptr = _addr(tab, 20, FP, ALIGNED)  # FK
    fv_ptr = _addr(tab, 21, FP, ALIGNED)  # FV
    fcnt_ptr = _addr(tab, 22, tl.int32, ALIGNED)  # FCNT
    fbase = row.to(tl.int64) * tl.load(tab + 25) * HEAD_DIM  # FP_STRIDE
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
        for t0 in range(f0 * FP_BLOCK, n, FSTEP * FP_BLOCK):
            offs_t = t0 + tl.arange(0, FP_BLOCK)
            tv = (offs_t < n)[:, None]
            ptrs = fbase + (base + offs_t)[:, None] * HEAD_DIM + offs_c[None, :]
            vptrs = fbase + (base + offs_t)[:, None] * HEAD_DIM + offs_v[None, :]
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
            v0 = tl.load(fv_ptr + vptrs, mask=tv, other=0.0).to(tl.float32)
            v1 = tl.load(fv_ptr + vptrs + QD, mask=tv, other=0.0).to(tl.float32)
            v2 = tl.load(fv_ptr + vptrs + 2 * QD, mask=tv, other=0.0).to(tl.float32)
            v3 = tl.load(fv_ptr + vptrs + 3 * QD, mask=tv, other=0.0).to(tl.float32)
            a0 = a0 * alpha[:, None] + tl.dot(p, v0, input_precision="ieee")
            a1 = a1 * alpha[:, None] + tl.dot(p, v1, input_precision="ieee")
            a2 = a2 * alpha[:, None] + tl.dot(p, v2, input_precision="ieee")
            a3 = a3 * alpha[:, None] + tl.dot(p, v3, input_precision="ieee")
    return m_i, l_i, a0, a1, a2, a3


@triton.jit
def _publish(m_ptr, l_ptr, o_ptr, ticket_ptr, out_ptr, lse_ptr, row, b, hkv, n_live,
             HKV: tl.constexpr, GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr,
             NS_PAD: tl.constexpr, MERGE_GM: tl.constexpr, MERGE_SB: tl.constexpr,
             HEAD_DIM: tl.constexpr):  # fmt: skip
    """After a program stored its partial state: take the row's ticket; the last of the row's
    NUM_SPLITS + 1 programs merges the first ``n_live`` states."""
    # Publish the partial state; the last of the row's programs merges. The barrier
    # orders every warp's stores before the ticket (one thread issues a scalar atomic); the
    # atomic releases them at GPU scope and, for the last program, acquires the other
    # programs' states (the same pattern as a cooperative grid sync: bar.sync, then one
    # thread's fenced atomic).
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel", scope="gpu")
    if ticket == NUM_SPLITS:
        tl.debug_barrier()  # every thread reads after the acquire
        _merge_row(m_ptr, l_ptr, o_ptr, out_ptr, lse_ptr, b, hkv, n_live, HKV, GROUP,
                   NUM_SPLITS + 1, NS_PAD, MERGE_GM, MERGE_SB, HEAD_DIM)  # fmt: skip
        tl.store(ticket_ptr + row, 0)  # zero for the next launch (and a graph replay)


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # (B, Hq, D) queries (any float dtype)
    tab,  # address table (TABLE_SLOTS,) int64: pools, tables, fills, counts, fp buffers, sizes
    m_ptr, l_ptr, o_ptr,  # partial states: (B, Hq, NS + 1), (B, Hq, NS + 1), (B, Hq, NS + 1, D)
    ticket_ptr,  # (rows,) int32, zero between launches: partial states published per row
    out_ptr, lse_ptr,  # (B, Hq, D), (B, Hq) float32
    sm_scale,  # softmax scale * log2(e)
    HKV: tl.constexpr, GROUP: tl.constexpr,  # KV heads, query heads per KV head
    B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,  # region bases
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    HBITS: tl.constexpr, LBITS: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    STAGES: tl.constexpr, PRECISE: tl.constexpr, CONVERT: tl.constexpr, FP_BLOCK: tl.constexpr,
    PARAM: tl.constexpr, FP: tl.constexpr, ALIGNED: tl.constexpr,  # pool parameter, fp dtypes
    NS_PAD: tl.constexpr, MERGE_GM: tl.constexpr, MERGE_SB: tl.constexpr,  # merge tiles
    VARIANT: tl.constexpr, NW: tl.constexpr,  # index in VARIANTS; NW: page slots ("pages")
):  # fmt: skip
    QD: tl.constexpr = HEAD_DIM // 4
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // HKV
    hkv = row % HKV
    offs_g = tl.arange(0, GROUP_PAD)
    offs_c = tl.arange(0, QD)
    offs_v = offs_c  # the channel at each position of the value side: accumulators, outputs
    if VARIANT > 0:  # channel 4 (n % W) + n // W at position n of a quarter (W = QD / 4):
        offs_v = 4 * (offs_c % (QD // 4)) + offs_c // (QD // 4)  # the codes' field-major order
    g_valid = offs_g < GROUP
    heads = hkv * GROUP + offs_g
    num_heads = HKV * GROUP
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
        hkc, hvc, hks, hkz, hva, hvb, hcs = _pool(tab, 0, PARAM, ALIGNED)  # H_POOL
        hpt = _addr(tab, 14, tl.int32, ALIGNED)  # H_PT
        hpf = _addr(tab, 15, tl.int32, ALIGNED)  # H_PF
        nh = tl.load(_addr(tab, 16, tl.int32, ALIGNED) + row)  # H_NP
        nl = tl.load(_addr(tab, 19, tl.int32, ALIGNED) + row)  # L_NP
        hcols = tl.load(tab + 23).to(tl.int32)  # HCOLS
        total = nh + nl
        per = tl.cdiv(total, NUM_SPLITS)
        u0 = split * per
        u1 = tl.minimum(u0 + per, total)
        if VARIANT > 0:  # "pages" / "pages-codes": the warps own separate pages
            m_i, l_i, a0, a1, a2, a3 = _slot_pages(
                tab, row, q_rows, gm, sm_scale, u0, u1, nh, hcols, offs_c, offs_v,
                hkc, hvc, hks, hkz, hva, hvb, hcs, hpt, hpf,
                GROUP_PAD, NW, QD, PAGE, BLOCK_T, HBITS, LBITS, PRECISE, CONVERT, STAGES, PARAM,
                ALIGNED, VARIANT == 1 and not PRECISE)  # fmt: skip
        else:
            m_i, l_i, a0, a1, a2, a3 = _page_loop(
                qf, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3, u0, tl.minimum(u1, nh), row * hcols,
                hkc, hvc, hks, hkz, hva, hvb, hcs, hpt, hpf, offs_c,
                QD, PAGE, BLOCK_T, HBITS, PRECISE, CONVERT, STAGES)  # fmt: skip
            # the low class's addresses only now: loaded before the first loop they would hold
            # 18 registers through it (sm_90: 232 registers instead of 241)
            lkc, lvc, lks, lkz, lva, lvb, lcs = _pool(tab, 7, PARAM, ALIGNED)  # L_POOL
            lpt = _addr(tab, 17, tl.int32, ALIGNED)  # L_PT
            lpf = _addr(tab, 18, tl.int32, ALIGNED)  # L_PF
            lcols = tl.load(tab + 24).to(tl.int32)  # LCOLS
            m_i, l_i, a0, a1, a2, a3 = _page_loop(
                qf, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3, tl.maximum(u0, nh) - nh, u1 - nh,
                row * lcols, lkc, lvc, lks, lkz, lva, lvb, lcs, lpt, lpf, offs_c,
                QD, PAGE, BLOCK_T, LBITS, PRECISE, CONVERT, STAGES)  # fmt: skip
    else:
        m_i, l_i, a0, a1, a2, a3 = _fp_regions(
            tab, row, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3, offs_c, offs_v, 0,
            B1, B2, B3, HEAD_DIM, FP_BLOCK, FP, ALIGNED, 1)  # fmt: skip
    out_row = (b * num_heads + heads).to(tl.int64) * (NUM_SPLITS + 1) + split
    tl.store(m_ptr + out_row, m_i, mask=g_valid)
    tl.store(l_ptr + out_row, l_i, mask=g_valid)
    o_rows = o_ptr + (out_row * HEAD_DIM)[:, None] + offs_v[None, :]
    tl.store(o_rows, a0, mask=gm)
    tl.store(o_rows + QD, a1, mask=gm)
    tl.store(o_rows + 2 * QD, a2, mask=gm)
    tl.store(o_rows + 3 * QD, a3, mask=gm)
    _publish(m_ptr, l_ptr, o_ptr, ticket_ptr, out_ptr, lse_ptr, row, b, hkv, NUM_SPLITS + 1,
             HKV, GROUP, NUM_SPLITS, NS_PAD, MERGE_GM, MERGE_SB, HEAD_DIM)  # fmt: skip


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_TABLES: dict[tuple, _Entry] = {}
_CAPTURED: list[Tensor] = []  # tables read by a captured CUDA graph (kept for the process)


def _drop_table(key: tuple, ref: weakref.ref) -> None:
    """Forget a table once one of its buffers is gone (unless a newer table took the key). The
    finalizers hold the entry weakly, so the table is freed with the first buffer that dies."""
    entry = ref()
    if entry is not None and _TABLES.get(key) is entry:
        del _TABLES[key]


class _Entry:
    """A cached (table, aligned) pair, referenced weakly by its buffers' finalizers."""

    __slots__ = ("__weakref__", "hit")

    def __init__(self, hit: tuple[Tensor, bool]) -> None:
        self.hit = hit


_pool_fields = operator.itemgetter(*POOL_FIELDS)


def _slot_tensors(store: object) -> list[Tensor]:
    """The store's tensors in address-table slot order (the sizes excluded)."""
    pools, pt, pf, npg = store.pools, store.page_table, store.page_fill, store.num_pages
    return [
        *_pool_fields(pools[HIGH]), *_pool_fields(pools[LOW]),
        pt[HIGH], pf[HIGH], npg[HIGH], pt[LOW], pf[LOW], npg[LOW],
        store.fp_k, store.fp_v, store.fp_count,
    ]  # fmt: skip


def _entries(tensors: list[Tensor]) -> list[int]:
    sizes = [tensors[H_PT].shape[1], tensors[L_PT].shape[1], tensors[FK].shape[1]]
    return [*(t.data_ptr() for t in tensors), *sizes]


def table_entries(store: object) -> list[int]:
    """The address table's values for ``store`` (slot order above): data pointers, then the
    page-table widths and the fp buffer's row stride (in tokens)."""
    return _entries(_slot_tensors(store))


class _HeldTable:
    """A workspace's address table and the identities of the tensors it was built from: equal
    ids of objects that are still alive (weak references with a callback) mean the very same
    tensors."""

    def __init__(self, tensors: list[Tensor], ids: tuple[int, ...], table: Tensor,
                 aligned: bool) -> None:  # fmt: skip
        self.ids, self.table, self.aligned, self.alive = ids, table, aligned, True
        self._refs = [weakref.ref(t, self._died) for t in tensors]

    def _died(self, _ref: object) -> None:
        self.alive = False


def _address_table(
    store: object, device: torch.device, workspace: dict[str, Any]
) -> tuple[Tensor, bool]:
    """The store's address table on ``device`` and whether every address is 16-byte aligned.

    The workspace keeps its store's table with the identities of the tensors it was built
    from: while the store holds the very same tensor objects (it replaces a buffer that grows or
    is reordered, never re-points one in place), the table stands, at the cost of comparing 23
    ids. Otherwise the table comes from a module cache keyed by its own contents (pointers
    and sizes), so it is rebuilt exactly when an address changed and two stores never share a
    stale one; that cache also serves the custom operator (a fresh workspace per call, marked
    ``keep_table=False``: nothing to keep). A cached table lives exactly as long as every
    buffer it points at (finalizers on the buffers drop it), and a table read inside a
    CUDA-graph capture is kept for the process, since the graph holds its address.
    Building a table copies 208 bytes to the device: the first decode of a store must run
    before a CUDA-graph capture (it does anyway: it compiles the kernel)."""
    tensors = _slot_tensors(store)
    ids = tuple(map(id, tensors))
    held = workspace.get("table")
    if held is not None and held.ids == ids and held.alive:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            _keep_captured(held.table)  # a graph now holds this table's address
        return held.table, held.aligned
    entries = _entries(tensors)
    key = (device.type, device.index, *entries)
    entry = _TABLES.get(key)
    if entry is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "paged decode: the store's buffers changed inside a CUDA-graph capture (their "
                "address table is built by a host copy); run one decode step before capturing"
            )
        aligned = all(p % 16 == 0 for p in entries[:HCOLS])
        hit = (torch.tensor(entries, dtype=torch.int64, device=device), aligned)
        entry = _TABLES[key] = _Entry(hit)
        # dropped when a buffer it points at dies, never while they all live (a count limit
        # freed the table of a live store, which a captured graph may still read)
        ref = weakref.ref(entry)
        for t in tensors:
            weakref.finalize(t, _drop_table, key, ref)
    hit = entry.hit
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _keep_captured(hit[0])  # a graph now holds this table's address
    if workspace.get("keep_table", True):
        workspace["table"] = _HeldTable(tensors, ids, *hit)
    return hit


def _keep_captured(table: Tensor) -> None:
    """Keep ``table`` alive for the process: a captured graph reads its address."""
    if all(t is not table for t in _CAPTURED):
        _CAPTURED.append(table)


def _setting_index(
    workspace: dict[str, Any], key: str, allowed: tuple[str, ...], default: str
) -> int:
    """The index of workspace[key] in ``allowed`` (the default when absent or None)."""
    value = workspace.get(key)
    value = default if value is None else value
    if value not in allowed:
        raise ValueError(f"workspace[{key!r}]: expected one of {allowed}, got {value!r}")
    return allowed.index(value)


def _fragment_settings(workspace: dict[str, Any], ns: int) -> tuple[int, int, int]:
    """The "fragment" kernel's launch settings from the workspace, checked: (fp_splits,
    min_pages, offset). Keys of the other variants' page loops raise: this kernel has none of
    them, and ignoring one would pass off another launch as the one asked for."""
    # checked once per set of values: a decode step launches once per layer (bench/launch_host.py:
    # the checked path cost about 1 us of the wrapper's ~16 us on a 2-core CPU)
    get = workspace.get
    ms, ls, os_ = workspace["m"], workspace["l"], workspace["o"]
    raw = (ns, get("fp_splits"), get("min_pages"), get("offset"), get("stages"),
           get("block_t"), get("convert"), id(ms), ms.shape[2], id(ls), ls.shape[2], id(os_),
           os_.shape[2])  # fmt: skip
    hit = workspace.get("_fragment_settings")
    if hit is not None and hit[0] == raw:
        return hit[1]
    from zipvl.decode import FRAGMENT_FP_SPLITS, FRAGMENT_MIN_PAGES

    for key in ("stages", "block_t"):
        if workspace.get(key) is not None:
            raise ValueError(
                f"workspace[{key!r}]: the 'fragment' kernel has no such setting (it reads a page "
                f"per warp in one step); expected it absent, got {workspace[key]!r}"
            )
    if workspace.get("convert") == "cvt":
        raise ValueError(
            "workspace['convert']: the 'fragment' kernel converts codes with 'magic' (lop3 "
            "in Triton) or 'asm' (inline PTX); expected one of those, got 'cvt'"
        )
    out = []
    checked = (("fp_splits", FRAGMENT_FP_SPLITS, 1), ("min_pages", FRAGMENT_MIN_PAGES, 1),
               ("offset", DEFAULT_OFFSET, 0))  # fmt: skip
    for key, default, low in checked:
        value = workspace.get(key)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"workspace[{key!r}]: expected an int >= {low}, got {value!r}")
        out.append(value)
    if out[2] > 2:
        raise ValueError(f"workspace['offset']: expected 0, 1 or 2, got {out[2]}")
    states = ns + out[0]
    for key in ("m", "l", "o"):
        if workspace[key].shape[2] < states:
            raise ValueError(
                f"workspace[{key!r}]: holds {workspace[key].shape[2]} partial states a head, "
                f"expected splits + fp_splits = {states}"
            )
    checked = (out[0], out[1], out[2])
    workspace["_fragment_settings"] = (raw, checked)
    return checked


def _pow2(n: int) -> int:
    """The least power of two >= n (n >= 1), in plain Python (triton.next_power_of_2 is a
    constexpr function with a wrapper's cost, and this runs on every decode launch)."""
    return 1 << (n - 1).bit_length()


def paged_decode_triton(
    q: Tensor, store: object, scale: float, workspace: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    """Launch the kernel. q (B, Hq, D) contiguous; returns (out (B, Hq, D) in q's dtype,
    lse2 (B, Hq) float32: log2 of the softmax denominator of the log2-scaled logits).

    ``workspace`` holds the partial-state buffers (sized once per batch shape, reused), the
    per-row tickets (``"ticket"``, int32, zero between launches: made here when absent) and
    the store's address table (``"table"``, kept here)."""
    # ``store``: a PagedKVStore, or zipvl.decode's view of one rebuilt from a custom op's operands
    b, hq, d = q.shape
    hkv = store.num_heads
    g = hq // hkv
    ns = int(workspace["splits"])
    if INTERPRETED and q.device.type != "cpu":
        raise ValueError(
            "TRITON_INTERPRET=1 runs the decode kernel on CPU tensors only (it reads raw host "
            f"addresses from the address table), got device {q.device}"
        )
    ticket = workspace.get("ticket")
    if ticket is None or ticket.shape[0] < store.rows:
        ticket = workspace["ticket"] = torch.zeros(store.rows, dtype=torch.int32, device=q.device)
    tab, aligned = _address_table(store, q.device, workspace)
    fmt = store.fmt
    variant = _setting_index(workspace, "variant", VARIANTS, default_variant(fmt.code_order))
    if (variant == FRAGMENT) != (fmt.code_order == "fragment"):
        raise ValueError(
            f"workspace['variant']: {VARIANTS[variant]!r} cannot read pages in the "
            f"{fmt.code_order!r} code order; expected "
            f"{'fragment' if fmt.code_order == 'fragment' else 'one of ' + str(VARIANTS[:3])}"
        )
    # PAGE / BLOCK_T tiles per page ("pages": per warp, whose operands are a whole tile each)
    block_t = int(workspace.get("block_t", min(fmt.page_size, 16 if variant else 64)))
    convert = _setting_index(workspace, "convert", CONVERTS, DEFAULT_CONVERT)
    if convert == 2 and INTERPRETED:
        raise ValueError("convert: 'asm' is inline PTX, which the Triton interpreter cannot run")
    extra = {"maxnreg": int(workspace["maxnreg"])} if workspace.get("maxnreg") else {}
    # The interpreter converts float32 to bf16 / fp16 by truncation (compiled Triton rounds to
    # nearest even): interpreted runs write float32 and let PyTorch round.
    out_dtype = torch.float32 if INTERPRETED else q.dtype
    out = torch.empty(b, hq, d, dtype=out_dtype, device=q.device)
    lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
    # merge tiles: (MERGE_GM heads, MERGE_SB states, D), at most 128 floats per thread (sm_90,
    # 4 warps: 16384 floats cost no register over the page loop; 32768 spill 160 bytes)
    warps = int(workspace.get("warps", 4))
    gm = _pow2(g)
    ns_pad = _pow2(ns + 1)
    sb = max(1, min(ns_pad, 128 * 32 * warps // (gm * d)))
    param = _TL_DTYPES[store.pools[HIGH]["kscale"].dtype]  # scales, zeros, divisors
    precise = bool(workspace.get("precise", q.dtype == torch.float32))
    if variant != FRAGMENT and int(workspace.get("fp_splits", 1)) != 1:
        raise ValueError(
            f"workspace['fp_splits']: the {VARIANTS[variant]!r} kernel reads the full-precision "
            f"regions in one program; expected 1, got {workspace['fp_splits']}"
        )
    if variant == FRAGMENT:
        from zipvl.fragment_decode_triton import fragment_decode_kernel

        nf, min_pages, offset = _fragment_settings(workspace, ns)
        ns_pad = _pow2(ns + nf)
        sb = max(1, min(ns_pad, 128 * 32 * warps // (gm * d)))
        try:
            fragment_decode_kernel[(store.rows, ns + nf)](
                q, tab, workspace["m"], workspace["l"], workspace["o"], ticket, out, lse,
                scale * 1.4426950408889634,
                HKV=hkv, GROUP=g,
                B1=store.region_base[STAGE_HIGH], B2=store.region_base[STAGE_LOW],
                B3=store.region_base[TAIL],
                NUM_SPLITS=ns, FP_SPLITS=nf, MIN_PAGES=min_pages, HEAD_DIM=d,
                PAGE=fmt.page_size,
                HBITS=fmt.high_bits, LBITS=fmt.low_bits, GP=max(8, gm), GROUP_PAD=max(16, gm),
                ASM=int(convert == 2), PRECISE=precise,
                OFFSET=offset,
                FP_BLOCK=int(workspace.get("fp_block", 16)),
                PARAM=param, FP=_TL_DTYPES[store.fp_k.dtype], ALIGNED=aligned,
                NS_PAD=ns_pad, MERGE_GM=gm, MERGE_SB=sb, NW=warps, num_warps=warps,
                num_stages=1, **extra,
            )  # fmt: skip
        except BaseException:
            ticket.zero_()
            raise
        return out.to(q.dtype), lse
    try:
        _paged_decode_kernel[(store.rows, ns + 1)](
            q, tab, workspace["m"], workspace["l"], workspace["o"], ticket, out, lse,
            scale * 1.4426950408889634,
            HKV=hkv, GROUP=g,
            B1=store.region_base[STAGE_HIGH], B2=store.region_base[STAGE_LOW],
            B3=store.region_base[TAIL],
            NUM_SPLITS=ns, HEAD_DIM=d, PAGE=fmt.page_size,
            HBITS=fmt.high_bits, LBITS=fmt.low_bits,
            GROUP_PAD=max(16, gm), BLOCK_T=block_t,
            STAGES=int(workspace.get("stages", 2)), num_warps=warps,
            PRECISE=precise, CONVERT=convert,
            FP_BLOCK=int(workspace.get("fp_block", 16)),
            PARAM=param, FP=_TL_DTYPES[store.fp_k.dtype], ALIGNED=aligned,
            NS_PAD=ns_pad, MERGE_GM=gm, MERGE_SB=sb, VARIANT=variant, NW=warps, **extra,
        )  # fmt: skip
    except BaseException:
        ticket.zero_()  # a launch cut short (interpreter) must not leave a row's count behind
        raise
    return out.to(q.dtype), lse
