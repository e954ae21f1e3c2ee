"""Decode attention that reads the packed mixed-precision KV cache directly (method.md 5.1 step 3).

ZipVL decodes densely over every cached token, the unimportant ones at low precision. Reading a
4/2-bit cache by first dequantizing it to bf16 moves more bytes than the bf16 cache itself
(targets.md: 12-22x slower than bf16 SDPA), so the fast path never materialises K or V:

* Keys are quantized per channel over a chunk (ZipCache): k_tc = code_tc * s_c + z_c, so
  q . k_t = sum_c (q_c s_c) code_tc + sum_c q_c z_c. The kernel scales q once per chunk and
  dots it with the raw codes.
* Values are quantized per token after a per-channel divisor (ZipCache's CST):
  v_tc = (code_tc * a_t + b_t) * cs_c, so sum_t p_t v_tc = cs_c * (sum_t (p_t a_t) code_tc
  + sum_t p_t b_t). The kernel accumulates in code space and applies cs_c once at the end.

Each stored part (the high-bit and the low-bit tokens of every chunk, plus the full-precision
sinks and tail) yields a partial softmax state (running max, sum, un-normalised output) per
split of its tokens; the states are merged by log-sum-exp in PyTorch (a few KB). Token order does
not matter for one decoding query, so the parts are read in storage order.

``impl="reference"`` dequantizes every chunk and runs the same merge in float32: the oracle.
``impl="triton"`` runs the fused kernel on CUDA (or on the CPU under ``TRITON_INTERPRET=1``);
it supports ZipCache-layout parts (keys per channel over the whole chunk, values per token over
the whole head dim, with or without CST) and 16-bit parts, and raises for anything else.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import check_tensor
from .quant import QuantizedKV
from .quant.base import QuantizedTensor

__all__ = [
    "Segment",
    "decode_attention",
    "decode_read_bytes",
    "fused_decode_supports",
    "layer_segments",
]

Segment = QuantizedKV | tuple[Tensor, Tensor]
"""A stored run of tokens: a compressed chunk, or full-precision (k, v) each (B, Hkv, T, D)."""

_LOG2E = 1.4426950408889634


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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _layout_problem(qt: QuantizedTensor, role: str) -> str | None:
    """Why the fused kernel cannot read this quantized tensor, or None when it can."""
    spec = qt.spec
    if spec is None:
        return None
    if qt.head_dim * spec.bits // 8 < 16:
        return (
            f"impl='triton' needs head_dim * bits / 8 >= 16 (one packed field is a "
            f"matrix-multiply operand); got a {spec.bits}-bit {role} part with head dim "
            f"{qt.head_dim}"
        )
    if role == "key":
        ok = spec.axis == "token" and spec.group_size is None and qt.channel_scale is None
        want = "keys quantized per channel over the whole chunk (ZipCache)"
    else:
        ok = spec.axis == "channel" and spec.group_size is None
        want = "values quantized per token over the whole head dim (ZipCache / CST)"
    if not ok or spec.symmetric:
        return f"impl='triton' reads {want}; got a {role} part with spec {spec}"
    return None


def _check_zipcache_layout(qt: QuantizedTensor, role: str) -> None:
    problem = _layout_problem(qt, role)
    if problem is not None:
        raise ValueError(f"segments: {problem}")


def fused_decode_supports(chunk: QuantizedKV) -> bool:
    """Whether ``impl="triton"`` reads every part of ``chunk`` (ZipCache layouts or 16-bit)."""
    return all(
        part.num_tokens == 0 or _layout_problem(qt, role) is None
        for part in chunk.parts
        for qt, role in ((part.key, "key"), (part.value, "value"))
    )


class _States:
    """Partial softmax states of one query: lists of (m, l, o) in log2 units, merged at the end."""

    def __init__(self) -> None:
        self.m: list[Tensor] = []  # each (B, Hq, n)
        self.lsum: list[Tensor] = []  # each (B, Hq, n)
        self.o: list[Tensor] = []  # each (B, Hq, n, D)

    def add(self, m: Tensor, lsum: Tensor, o: Tensor) -> None:
        self.m.append(m)
        self.lsum.append(lsum)
        self.o.append(o)

    def merge(self) -> Tensor:
        m = torch.cat(self.m, dim=-1)  # (B, Hq, N)
        lsum = torch.cat(self.lsum, dim=-1)
        o = torch.cat(self.o, dim=-2)  # (B, Hq, N, D)
        m_max = m.amax(dim=-1, keepdim=True)  # (B, Hq, 1)
        m_max = torch.where(torch.isinf(m_max), 0.0, m_max)
        w = torch.exp2(m - m_max)  # (B, Hq, N); empty states have m = -inf -> 0
        den = (lsum * w).sum(-1)  # (B, Hq)
        num = (o * w[..., None]).sum(-2)  # (B, Hq, D)
        return num / den[..., None]


def _dense_state(q2: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One partial state over full-precision k, v (B, Hkv, T, D); q2 (B, Hq, D) log2-scaled."""
    b, hq, d = q2.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q2.view(b, hkv, g, d)  # (B, Hkv, G, D)
    s = torch.einsum("bhgd,bhtd->bhgt", qg, k.float())  # (B, Hkv, G, T)
    m = s.amax(-1)  # (B, Hkv, G)
    p = torch.exp2(s - m[..., None])
    lsum = p.sum(-1)
    o = torch.einsum("bhgt,bhtd->bhgd", p, v.float())  # (B, Hkv, G, D)
    return m.reshape(b, hq, 1), lsum.reshape(b, hq, 1), o.reshape(b, hq, 1, d)


def _triton_part_state(
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


def decode_attention(
    q: Tensor,
    segments: Sequence[Segment],
    *,
    scale: float | None = None,
    impl: str = "triton",
    block_t: int | None = None,
) -> Tensor:
    """Attention of one decoding query over a cache stored as compressed chunks + fp runs.

    Args:
        q: (B, Hq, 1, D) query (RoPE applied).
        segments: the stored runs of one layer, any order: ``QuantizedKV`` chunks and
            full-precision ``(k, v)`` pairs, each (B, Hkv, T, D) with Hq divisible by Hkv.
            Every batch row attends to every stored token (no padding mask here).
        scale: softmax scale; None = 1 / sqrt(D).
        impl: ``"triton"`` (fused kernel reading the packed codes) or ``"reference"``
            (dequantize each chunk, float32 softmax merge).
        block_t: tokens per kernel tile (a power of two >= 16); None = autotuned on CUDA
            (tile, warps, stages per length bucket; 64 under the Triton interpreter).

    Returns:
        (B, Hq, 1, D) attention output in q's dtype.

    Raises:
        ValueError: bad shapes, an unknown impl, a part layout the fused kernel does not read,
            or impl="triton" on a device where Triton cannot run.
    """
    check_tensor("q", q, ndim=4, floating=True)
    b, hq, sq, d = q.shape
    if sq != 1:
        raise ValueError(f"q: expected one decoding query (B, Hq, 1, D), got {tuple(q.shape)}")
    if impl not in ("triton", "reference"):
        raise ValueError(f"impl: expected 'triton' or 'reference', got {impl!r}")
    if not segments:
        raise ValueError("segments: expected at least one stored run of tokens, got none")
    if block_t is not None and (block_t < 16 or block_t & (block_t - 1)):
        raise ValueError(f"block_t: expected a power of two >= 16, got {block_t}")
    if impl == "triton" and not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(
            f"impl: 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1), got device {q.device}"
        )
    sm = scale if scale is not None else 1.0 / math.sqrt(d)
    q2 = (q[:, :, 0].float() * (sm * _LOG2E)).contiguous()  # (B, Hq, D) log2 domain
    states = _States()
    for i, seg in enumerate(segments):
        if isinstance(seg, QuantizedKV):
            _check_segment_shape(i, seg.batch_size, seg.num_kv_heads, seg.head_dim, b, hq, d)
            if impl == "reference":
                k, v = seg.dequantize(torch.float32)
                states.add(*_dense_state(q2, k, v))
                continue
            for part in seg.parts:
                if part.num_tokens == 0:
                    continue
                if part.key.bits == 16 or part.value.bits == 16:
                    states.add(*_dense_state(q2, part.key.dequantize(torch.float32),
                                             part.value.dequantize(torch.float32)))  # fmt: skip
                    continue
                _check_zipcache_layout(part.key, "key")
                _check_zipcache_layout(part.value, "value")
                states.add(*_triton_part_state(q2, part.key, part.value, block_t))
        else:
            k, v = seg
            check_tensor(f"segments[{i}][0]", k, ndim=4, floating=True)
            check_tensor(f"segments[{i}][1]", v, ndim=4, floating=True)
            _check_segment_shape(i, k.shape[0], k.shape[1], k.shape[3], b, hq, d)
            if k.shape[2]:
                states.add(*_dense_state(q2, k, v))
    if not states.m:
        raise ValueError("segments: every stored run is empty")
    return states.merge().to(q.dtype).unsqueeze(2)  # (B, Hq, 1, D)


def _check_segment_shape(i: int, b: int, hkv: int, d: int, qb: int, hq: int, qd: int) -> None:
    if b != qb or d != qd or hkv == 0 or hq % hkv:
        raise ValueError(
            f"segments[{i}]: expected (B={qb}, Hkv dividing {hq}, *, D={qd}), "
            f"got B={b}, Hkv={hkv}, D={d}"
        )


def decode_read_bytes(segments: Sequence[Segment]) -> int:
    """Bytes the fused decode must read: every stored tensor once (codes, parameters, fp runs)."""
    total = 0
    for seg in segments:
        if isinstance(seg, QuantizedKV):
            total += seg.nbytes - (seg.keep.nbytes if seg.keep is not None else 0)
        else:
            total += seg[0].nbytes + seg[1].nbytes
    return total


def layer_segments(layer: Any) -> list[Segment]:
    """The stored runs of one ``ZipVLCacheLayer``: sinks, compressed chunks, full-precision tail.

    Args:
        layer: a ``zipvl.cache.ZipVLCacheLayer`` after ``compress_prefill``.

    Returns:
        Segments for ``decode_attention`` (storage order; order does not matter for decode).

    Raises:
        ValueError: the layer still holds uncompressed prefill K/V, or a chunk was cropped
            part-way (its trailing tokens are stored but must not be read).
    """
    if getattr(layer, "pending_keys", None) is not None:
        raise ValueError(
            f"layer: layer {layer.layer_idx} holds uncompressed prefill K/V; "
            "call compress_prefill first"
        )
    segs: list[Segment] = []
    if layer.sink_keys is not None and layer.sink_values is not None:
        segs.append((layer.sink_keys, layer.sink_values))
    for i, (chunk, length) in enumerate(zip(layer.chunks, layer.chunk_lengths, strict=True)):
        if length != chunk.num_tokens:
            raise ValueError(
                f"layer: chunk {i} of layer {layer.layer_idx} was cropped to {length} of its "
                f"{chunk.num_tokens} tokens; the fused decode reads whole chunks"
            )
        segs.append(chunk)
    if layer.tail_keys is not None and layer.tail_values is not None:
        segs.append((layer.tail_keys, layer.tail_values))
    return segs
