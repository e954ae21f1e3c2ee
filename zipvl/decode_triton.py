"""The fused Triton kernel of ``zipvl.decode`` (imported on first use: triton is optional).

One program reads one split of the tokens of one stored part (the high-bit or the low-bit tokens
of a chunk) for the G query heads of one KV head, straight from the packed codes, and writes a
partial softmax state (running max, sum, un-normalised output in code space); ``zipvl.decode``
merges the states. See ``zipvl.decode`` for the algebra.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .quant.base import QuantizedTensor

__all__ = ["INTERPRETED", "triton_part_state"]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels below were decorated for the Triton interpreter (read at import, when
Triton reads the variable too), so CPU tensors can run them."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@triton.jit
def _qkv_part_kernel(
    q_ptr,  # (B, Hq, D) fp32, already multiplied by the softmax scale * log2(e)
    kd_ptr,  # packed key codes (B, Hkv, T, D * KBITS // 8) uint8
    ks_ptr,  # key scale (B, Hkv, D) fp32
    kz_ptr,  # key zero (B, Hkv, D) fp32
    vd_ptr,  # packed value codes (B, Hkv, T, D * VBITS // 8) uint8
    va_ptr,  # value scale per token (B, Hkv, T) fp32
    vb_ptr,  # value zero per token (B, Hkv, T) fp32
    m_ptr,  # out: running max (B, Hq, NS) fp32 (log2 domain)
    l_ptr,  # out: running sum (B, Hq, NS) fp32
    o_ptr,  # out: un-normalised output in code space (B, Hq, NS, D) fp32
    num_kv_heads,
    group,
    num_tokens,
    tokens_per_split,
    num_splits,
    t_bucket,  # autotune key only: next power of two of num_tokens
    HEAD_DIM: tl.constexpr,
    KBITS: tl.constexpr,
    VBITS: tl.constexpr,
    KMASK: tl.constexpr,
    VMASK: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # Contiguous-slice packing: slice i of a row (channels [i * ROW, (i + 1) * ROW)) is bits
    # [i * BITS, (i + 1) * BITS) of the row's ROW bytes. Every dot below works on one slice, so
    # the codes never need reordering: a shift and a mask of the loaded bytes give the slice.
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    hkv = bh % num_kv_heads
    KPER: tl.constexpr = 8 // KBITS
    VPER: tl.constexpr = 8 // VBITS
    KROW: tl.constexpr = HEAD_DIM // KPER  # packed bytes per key row
    VROW: tl.constexpr = HEAD_DIM // VPER
    offs_g = tl.arange(0, GROUP_PAD)
    offs_kr = tl.arange(0, KROW)
    offs_vr = tl.arange(0, VROW)
    g_valid = offs_g < group

    heads = hkv * group + offs_g  # (GP,) query heads of this KV head
    num_heads = num_kv_heads * group
    q_rows = q_ptr + (b * num_heads + heads)[:, None] * HEAD_DIM  # (GP, 1) row pointers
    k_par = bh * HEAD_DIM
    # q scaled into code space, one (GP, KROW) slice per packed field; and the zero-point term
    q0 = tl.load(q_rows + offs_kr[None, :], mask=g_valid[:, None], other=0.0)
    qs0 = (q0 * tl.load(ks_ptr + k_par + offs_kr)[None, :]).to(tl.float16)
    qz = tl.sum(q0 * tl.load(kz_ptr + k_par + offs_kr)[None, :], axis=1)  # (GP,)
    qs1 = qs0
    qs2 = qs0
    qs3 = qs0
    if KPER >= 2:
        q1 = tl.load(q_rows + KROW + offs_kr[None, :], mask=g_valid[:, None], other=0.0)
        qs1 = (q1 * tl.load(ks_ptr + k_par + KROW + offs_kr)[None, :]).to(tl.float16)
        qz += tl.sum(q1 * tl.load(kz_ptr + k_par + KROW + offs_kr)[None, :], axis=1)
    if KPER == 4:
        q2 = tl.load(q_rows + 2 * KROW + offs_kr[None, :], mask=g_valid[:, None], other=0.0)
        qs2 = (q2 * tl.load(ks_ptr + k_par + 2 * KROW + offs_kr)[None, :]).to(tl.float16)
        qz += tl.sum(q2 * tl.load(kz_ptr + k_par + 2 * KROW + offs_kr)[None, :], axis=1)
        q3 = tl.load(q_rows + 3 * KROW + offs_kr[None, :], mask=g_valid[:, None], other=0.0)
        qs3 = (q3 * tl.load(ks_ptr + k_par + 3 * KROW + offs_kr)[None, :]).to(tl.float16)
        qz += tl.sum(q3 * tl.load(kz_ptr + k_par + 3 * KROW + offs_kr)[None, :], axis=1)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc0 = tl.zeros([GROUP_PAD, VROW], tl.float32)  # output channels of value slice 0
    acc1 = tl.zeros([GROUP_PAD, VROW], tl.float32)  # slice 1: 4- and 2-bit values
    acc2 = tl.zeros([GROUP_PAD, VROW], tl.float32)  # slices 2, 3: 2-bit values only
    acc3 = tl.zeros([GROUP_PAD, VROW], tl.float32)
    pz = tl.zeros([GROUP_PAD], tl.float32)
    t_start = split * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, num_tokens)
    kd_base = kd_ptr + bh.to(tl.int64) * num_tokens * KROW
    vd_base = vd_ptr + bh.to(tl.int64) * num_tokens * VROW
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_valid = offs_t < t_end
        kb = tl.load(
            kd_base + offs_t[:, None] * KROW + offs_kr[None, :], mask=t_valid[:, None], other=0
        )  # (BT, KROW) uint8, contiguous rows
        s = tl.dot(qs0, tl.trans((kb & KMASK).to(tl.float16)))  # (GP, BT)
        if KPER >= 2:
            s += tl.dot(qs1, tl.trans(((kb >> KBITS) & KMASK).to(tl.float16)))
        if KPER == 4:
            s += tl.dot(qs2, tl.trans(((kb >> (2 * KBITS)) & KMASK).to(tl.float16)))
            s += tl.dot(qs3, tl.trans(((kb >> (3 * KBITS)) & KMASK).to(tl.float16)))
        s = s + qz[:, None]  # log2-domain logits
        s = tl.where(t_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])  # (GP, BT)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        va = tl.load(va_ptr + bh * num_tokens + offs_t, mask=t_valid, other=0.0)  # (BT,)
        vb = tl.load(vb_ptr + bh * num_tokens + offs_t, mask=t_valid, other=0.0)
        vbyte = tl.load(
            vd_base + offs_t[:, None] * VROW + offs_vr[None, :], mask=t_valid[:, None], other=0
        )  # (BT, VROW)
        pa = (p * va[None, :]).to(tl.float16)  # (GP, BT)
        acc0 = acc0 * alpha[:, None] + tl.dot(pa, (vbyte & VMASK).to(tl.float16))
        if VPER >= 2:
            acc1 = acc1 * alpha[:, None] + tl.dot(pa, ((vbyte >> VBITS) & VMASK).to(tl.float16))
        if VPER == 4:
            acc2 = acc2 * alpha[:, None] + tl.dot(
                pa, ((vbyte >> (2 * VBITS)) & VMASK).to(tl.float16)
            )
            acc3 = acc3 * alpha[:, None] + tl.dot(
                pa, ((vbyte >> (3 * VBITS)) & VMASK).to(tl.float16)
            )
        pz = pz * alpha + tl.sum(p * vb[None, :], axis=1)
        m_i = m_new
    out_row = (b * num_heads + heads) * num_splits + split  # (GP,)
    tl.store(m_ptr + out_row, m_i, mask=g_valid)
    tl.store(l_ptr + out_row, l_i, mask=g_valid)
    # + the zero-point term, per channel (the CST divisor is applied by the caller)
    o_rows = o_ptr + out_row[:, None] * HEAD_DIM  # (GP, 1)
    tl.store(o_rows + offs_vr[None, :], acc0 + pz[:, None], mask=g_valid[:, None])
    if VPER >= 2:
        tl.store(o_rows + VROW + offs_vr[None, :], acc1 + pz[:, None], mask=g_valid[:, None])
    if VPER == 4:
        tl.store(o_rows + 2 * VROW + offs_vr[None, :], acc2 + pz[:, None], mask=g_valid[:, None])
        tl.store(o_rows + 3 * VROW + offs_vr[None, :], acc3 + pz[:, None], mask=g_valid[:, None])


_TUNE_CONFIGS = [
    triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=st)
    for bt in (32, 64, 128)
    for w in (4, 8)
    for st in (2, 3)
]
# The same kernel, autotuned on CUDA per (length bucket, bit-widths, GQA padding, head dim).
_qkv_part_kernel_tuned = triton.autotune(
    configs=_TUNE_CONFIGS, key=["t_bucket", "KBITS", "VBITS", "GROUP_PAD", "HEAD_DIM"]
)(_qkv_part_kernel)
_SPLIT_QUANTUM = 128  # split lengths are multiples of every tuned BLOCK_T


def triton_part_state(
    q2: Tensor, key: QuantizedTensor, value: QuantizedTensor, block_t: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Partial states of one quantized part from the fused kernel: (B, Hq, NS), (B, Hq, NS, D)."""
    b, hq, d = q2.shape
    hkv, t = key.data.shape[1], key.data.shape[2]
    g = hq // hkv
    assert key.scale is not None and key.zero is not None
    assert value.scale is not None and value.zero is not None
    # ~ 4 CTAs per SM over the whole grid: split long parts along tokens
    sms = torch.cuda.get_device_properties(q2.device).multi_processor_count if q2.is_cuda else 8
    quantum = block_t if block_t is not None else _SPLIT_QUANTUM
    splits = max(1, min(_cdiv(t, quantum), (4 * sms) // max(1, b * hkv)))
    per_split = _cdiv(_cdiv(t, splits), quantum) * quantum
    splits = _cdiv(t, per_split)
    m = torch.empty(b, hq, splits, device=q2.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    o = torch.empty(b, hq, splits, d, device=q2.device, dtype=torch.float32)
    ks = key.scale.float().reshape(b, hkv, d).contiguous()
    kz = key.zero.float().reshape(b, hkv, d).contiguous()
    va = value.scale.float().reshape(b, hkv, t).contiguous()
    vb = value.zero.float().reshape(b, hkv, t).contiguous()
    meta: dict[str, Any] = {
        "HEAD_DIM": d,
        "KBITS": key.bits,
        "VBITS": value.bits,
        "KMASK": (1 << key.bits) - 1,
        "VMASK": (1 << value.bits) - 1,
        "GROUP_PAD": max(16, int(triton.next_power_of_2(g))),
    }
    args = (
        q2, key.data.contiguous(), ks, kz, value.data.contiguous(), va, vb, m, lsum, o,
        hkv, g, t, per_split, splits, int(triton.next_power_of_2(t)),
    )  # fmt: skip
    if block_t is None and q2.is_cuda:
        _qkv_part_kernel_tuned[(b * hkv, splits)](*args, **meta)
    else:
        meta["BLOCK_T"] = block_t or 64
        _qkv_part_kernel[(b * hkv, splits)](*args, **meta)
    if value.channel_scale is not None:
        cs = value.channel_scale.float().reshape(b, hkv, 1, 1, d)
        o = (o.view(b, hkv, g, splits, d) * cs).view(b, hq, splits, d)
    return m, lsum, o
