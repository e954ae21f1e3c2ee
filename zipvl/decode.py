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
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .checks import check_scale, check_tensor
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


def _triton_backend(q: Tensor) -> Any:
    """The fused kernel's entry point, imported on first use (triton is optional).

    Raises:
        ValueError: triton is not installed, or ``q`` lives where the kernel cannot run (a CPU
            tensor without ``TRITON_INTERPRET=1`` set before the kernels were first imported).
    """
    try:
        from zipvl import decode_triton
    except ImportError as exc:
        raise ValueError(f"impl: 'triton' needs the triton package ({exc})") from exc
    if not (q.is_cuda or decode_triton.INTERPRETED):
        raise ValueError(
            f"impl: 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1 set before the kernels "
            f"are imported), got device {q.device}"
        )
    return decode_triton.triton_part_state


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
    if block_t is not None and (
        isinstance(block_t, bool)
        or not isinstance(block_t, int)
        or block_t < 16
        or block_t & (block_t - 1)
    ):
        raise ValueError(f"block_t: expected an int power of two >= 16 or None, got {block_t!r}")
    scale = check_scale("scale", scale)
    part_state = None
    if impl == "triton":
        part_state = _triton_backend(q)
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
                assert part_state is not None  # set for impl == "triton"
                states.add(*part_state(q2, part.key, part.value, block_t))
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
