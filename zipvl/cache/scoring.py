"""Decode-time importance of cached tokens (ZipVL, arXiv 2410.08584 v1, Algorithm 1 decode branch).

Every ``recompress_every`` generated tokens ZipVL scores the newest block of the full-precision
tail with the attention of the *current* query (docs/algorithm.md#decode-blocks)::

    a = Softmax(q K^T / sqrt(D))[-block:]        q: the last query row, K: ALL cached keys

in float32, summed over the G query heads of each KV head (the head aggregation of the ZipCache
code). For a single decoding query every key is seen by exactly one query row, so the normalized
score of Eq. 7 equals this raw mass: the same tensor feeds the allocator (Eq. 6) and the selector.

Plain PyTorch; the score matrix is (B, Hq, N) for one query row, small next to the cache itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zipvl.checks import check_qkv, check_scale, check_tensor

__all__ = ["check_key_valid", "last_query_mass", "lse_block_mass"]


def last_query_mass(
    query: Tensor,
    keys: Tensor,
    *,
    scale: float | None = None,
    key_valid: Tensor | None = None,
) -> Tensor:
    """Attention mass that the last query row puts on every key, summed over each GQA group.

    Args:
        query: (B, Hq, Sq, D) queries with RoPE applied; only the last row ``query[:, :, -1]`` is
            used (the current decoding position).
        keys: (B, Hkv, N, D) all cached keys in position order (RoPE applied), N >= 1.
        scale: softmax scale; ``None`` means ``1 / sqrt(D)``.
        key_valid: optional (B, N) bool, True = a real token, False = padding. Padding keys get
            probability exactly 0 (the softmax runs over the real keys of the row only); a row
            without any real key gets zero mass everywhere. ``None``: every key is real.

    Returns:
        (B, Hkv, N) float32, ``sum_g softmax(q_g K^T * scale)``; each (b, h) row sums to G
        (0 for a row without real keys).

    Raises:
        ValueError: shapes do not form a GQA pair (see ``zipvl.checks.check_qkv``), N == 0, a
            non-positive ``scale``, or ``key_valid`` of the wrong shape / dtype / device.
    """
    b, hq, hkv = check_qkv(query, keys)
    n, d = keys.shape[-2], keys.shape[-1]
    if n == 0:
        raise ValueError(f"keys: expected at least one cached key, got shape {tuple(keys.shape)}")
    scale = check_scale("scale", scale)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if key_valid is not None:
        check_key_valid(key_valid, b, n, keys.device)
    g = hq // hkv
    q = query[:, :, -1, :].float().reshape(b, hkv, g, d)  # (B, Hkv, G, D)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scale  # (B, Hkv, G, N)
    if key_valid is None:
        return torch.softmax(logits, dim=-1).sum(dim=2)  # (B, Hkv, N)
    pad = ~key_valid[:, None, None, :]  # (B, 1, 1, N)
    # a finite floor instead of -inf: exp(floor - row max) underflows to exactly 0 for padding,
    # and a row of padding only gives a finite uniform row (zeroed below) instead of NaN
    logits = logits.masked_fill(pad, torch.finfo(torch.float32).min)  # (B, Hkv, G, N)
    probs = torch.softmax(logits, dim=-1).masked_fill(pad, 0.0)  # (B, Hkv, G, N)
    return probs.sum(dim=2)  # (B, Hkv, N)


def lse_block_mass(q2: Tensor, block_keys: Tensor, lse2: Tensor) -> Tensor:
    """The same mass for a block of keys, from the log-sum-exp over ALL cached keys.

    The paged decode kernel returns the step's log-sum-exp, so a block is scored from its own
    keys alone: ``p = exp2(q2 . k - lse2)`` is the softmax probability over every cached key.

    Args:
        q2: (B, Hkv, G, D) float32 last query row, pre-scaled by ``scale * log2(e)``.
        block_keys: (B, Hkv, R, D) the block's keys.
        lse2: (B, Hkv, G) float32 log2-domain log-sum-exp of the same row over all keys.

    Returns:
        (B, Hkv, R) float32, summed over the G query heads of each KV head.
    """
    s = torch.einsum("bhgd,bhrd->bhgr", q2, block_keys.float())  # (B, Hkv, G, R)
    return torch.exp2(s - lse2[..., None]).sum(2)  # (B, Hkv, R)


def check_key_valid(key_valid: object, batch: int, length: int, device: torch.device) -> Tensor:
    """``key_valid``: a (B, N) bool tensor on ``device``, True = real token; returns it."""
    check_tensor("key_valid", key_valid, ndim=2, dtype=torch.bool)
    assert isinstance(key_valid, Tensor)
    if tuple(key_valid.shape) != (batch, length):
        raise ValueError(
            f"key_valid: expected shape (B, N) = {(batch, length)}, got {tuple(key_valid.shape)}"
        )
    if key_valid.device != device:
        raise ValueError(f"key_valid: expected device {device}, got {key_valid.device}")
    return key_valid


def sink_padding_error(num_sinks: int) -> ValueError:
    """What both layers raise when left padding would become full-precision sinks."""
    return ValueError(
        f"key_valid: some batch row has padding among its first sink_tokens={num_sinks} "
        "positions (left padding), which would become full-precision sinks; sinks are "
        "positional, so build the cache with sink_tokens=0 for left-padded batches"
    )
