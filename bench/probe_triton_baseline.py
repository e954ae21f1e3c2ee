# pyright: reportArgumentType=false, reportOperatorIssue=false, reportAttributeAccessIssue=false, reportCallIssue=false, reportIndexIssue=false
"""The probe scoring kernels as they were before the packed, pipelined rewrite (commit 9733b56).

Kept only as the baseline of ``bench/gpu_probe.py``; the library's kernels are in
``zipvl/sparsity/probe_triton.py``. Per query head and 64 probe rows, the row pass runs an online
softmax over 64-key blocks (int64 causal compares on every block, the key splits merged by torch
ops on the host); the column pass reloads the G·M probe rows of a KV head for every 64-key block
and sums each product over its rows with a cross-warp reduction.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["probe_mass_triton_baseline"]

_LOG2E = 1.4426950408889634


@triton.jit
def _probe_lse_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    m_ptr,
    l_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    num_heads,
    group,
    num_probes,
    kv_len,
    keys_per_split,
    num_splits,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    mb = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // num_heads
    h = bh % num_heads
    hkv = h // group
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # probe slots
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < num_probes
    pos = tl.load(pos_ptr + offs_m, mask=m_valid, other=-1)  # query row of each probe
    q_row = tl.load(pos_ptr + num_probes + offs_m, mask=m_valid, other=0)  # row inside q
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + q_row[:, None] * stride_qs + offs_d[None, :],
        mask=m_valid[:, None],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    max_pos = tl.max(pos, axis=0)
    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    n_start = split * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, max_pos + 1)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_base + offs_n[:, None] * stride_ks + offs_d[None, :],
            mask=(offs_n < kv_len)[:, None],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # log2 domain
        s = tl.where(offs_n[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    # partial softmax state of this key split (log2 domain), merged on the host side of torch
    out = (bh * num_splits + split) * num_probes + offs_m
    tl.store(m_ptr + out, m_i, mask=m_valid)
    tl.store(l_ptr + out, l_i, mask=m_valid)


@triton.jit
def _probe_colsum_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    lse_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    num_kv_heads,
    group,
    num_probes,
    kv_len,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    bhkv = tl.program_id(0)
    nb = tl.program_id(1)
    b = bhkv // num_kv_heads
    hkv = bhkv % num_kv_heads
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < kv_len
    k = tl.load(
        k_ptr + b * stride_kb + hkv * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
        mask=n_valid[:, None],
        other=0.0,
    )
    acc = tl.zeros([BLOCK_N], tl.float32)
    num_heads = num_kv_heads * group
    for gi in range(0, group):
        h = hkv * group + gi
        for m0 in range(0, num_probes, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_valid = offs_m < num_probes
            pos = tl.load(pos_ptr + offs_m, mask=m_valid, other=-1)
            q_row = tl.load(pos_ptr + num_probes + offs_m, mask=m_valid, other=0)
            q = tl.load(
                q_ptr
                + b * stride_qb
                + h * stride_qh
                + q_row[:, None] * stride_qs
                + offs_d[None, :],
                mask=m_valid[:, None],
                other=0.0,
            )
            lse = tl.load(
                lse_ptr + (b * num_heads + h) * num_probes + offs_m,
                mask=m_valid,
                other=float("inf"),
            )
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # (BM, BN)
            p = tl.exp2(s - lse[:, None])
            p = tl.where(offs_n[None, :] <= pos[:, None], p, 0.0)
            acc += tl.sum(p, axis=0)
    tl.store(out_ptr + bhkv * kv_len + offs_n, acc, mask=n_valid)


def probe_mass_triton_baseline(
    q: Tensor, k: Tensor, rows: Tensor, *, scale: float, key_splits: int | None = None
) -> Tensor:
    """Column mass of the causal softmax of probe rows, fused (no probe map in memory).

    Args:
        q: (B, Hq, Sq, D) queries, the last Sq positions of the sequence; D a power of two >= 16.
        k: (B, Hkv, Skv, D) keys, Hq divisible by Hkv.
        rows: (M,) int64 probe rows (indices into the Sq query rows).
        scale: softmax scale.
        key_splits: how many key ranges the row pass is split into (None: enough to fill the
            GPU; the splits are merged exactly by log-sum-exp).

    Returns:
        (B, Hkv, Skv) float32: for each key, the softmax weight it receives summed over the M
        probe rows and the G query heads of its KV head (the same quantity as the eager path).

    Raises:
        ValueError: head dim not a power of two >= 16, or a device the kernels cannot run on.
    """
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if d < 16 or d & (d - 1):
        raise ValueError(
            f"q: the Triton probe scorer needs a power-of-two head dim >= 16, got {d}"
        )
    g = hq // hkv
    m = rows.shape[0]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    # one int64 buffer: absolute positions of the probes, then their rows inside q
    meta = torch.cat([rows + (skv - sq), rows]).to(device=q.device, dtype=torch.int64)  # (2M,)
    out = torch.empty(b, hkv, skv, device=q.device, dtype=torch.float32)  # (B, Hkv, Skv)
    scale_log2 = float(scale) * _LOG2E
    block_m = 64 if m > 32 else max(16, int(triton.next_power_of_2(m)))
    block_n = 64
    m_blocks = -(-m // block_m)
    # split the keys so that the row pass fills the GPU (~4 CTAs per SM); one split on CPU
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    n_blocks = -(-skv // block_n)
    if key_splits is None:
        key_splits = (4 * sms) // max(1, b * hq * m_blocks)
    splits = max(1, min(n_blocks, key_splits))
    per_split = -(-n_blocks // splits) * block_n
    splits = -(-skv // per_split)
    m_part = torch.empty(b, hq, splits, m, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)  # (B, Hq, NS, M)
    common: dict[str, Any] = {
        "HEAD_DIM": d,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        # fp32 inputs get exact fp32 products (no TF32), like the eager fp32 matmul
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }
    _probe_lse_kernel[(b * hq, m_blocks, splits)](
        q, k, meta, m_part, l_part,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        hq, g, m, skv, per_split, splits, scale_log2,
        **common,
    )  # fmt: skip
    # merge the splits: lse = max + log2(sum l * 2^(m - max)); empty splits have m = -inf
    m_max = m_part.amax(dim=2, keepdim=True)  # (B, Hq, 1, M), finite: key 0 is always visible
    lse = m_max + torch.log2((l_part * torch.exp2(m_part - m_max)).sum(2, keepdim=True))
    lse = lse.squeeze(2).contiguous()  # (B, Hq, M) log2 domain
    _probe_colsum_kernel[(b * hkv, triton.cdiv(skv, block_n))](
        q, k, meta, lse, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        hkv, g, m, skv, scale_log2,
        **common,
    )  # fmt: skip
    return out
