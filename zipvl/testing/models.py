"""Test oracles for ``zipvl.models``: ZipVL prefill / decode attention in float64, plain loops.

Written independently of ``zipvl.models.attention`` (dense masks and ``dense_attention`` from
``zipvl.testing.attention``) so that the model-side code, padding handling included, is checked
against the semantics rather than against itself. transformers-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from zipvl.testing.attention import dense_attention

__all__ = ["FixedBudget", "reference_decode", "reference_prefill"]


@dataclass(frozen=True)
class FixedBudget:
    """Allocator stub: the same budget ``p`` for every layer and input (capped at Skv).

    Lets a padded batch and its unpadded rows get identical budgets, so their outputs can be
    compared exactly.
    """

    p: int

    def __call__(self, mass: Tensor, /, *, layer_idx: int | None = None) -> Tensor:
        """mass (B, Hkv, Skv) -> (B, Hkv) int32 filled with ``min(p, Skv)``."""
        b, h, s = mass.shape
        return torch.full((b, h), min(self.p, s), dtype=torch.int32, device=mass.device)


def reference_prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor | None,
    *,
    key_valid: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """ZipVL prefill semantics in float64: kept query i attends to kept real keys j <= i.

    Args:
        q: (B, Hq, S, D).
        k: (B, Hkv, S, D).
        v: (B, Hkv, S, Dv).
        keep: (B, Hkv, S) bool, or None (everything kept: dense causal attention).
        key_valid: optional (B, S) bool, False = padding (never attended, output row 0).
        scale: softmax scale (None: 1 / sqrt(D)).

    Returns:
        (B, Hq, S, Dv) float64; unkept and padding query rows are 0.
    """
    b, hkv, s = k.shape[0], k.shape[1], k.shape[2]
    if keep is None:
        keep = torch.ones(b, hkv, s, dtype=torch.bool, device=k.device)
    if key_valid is not None:
        keep = keep & key_valid[:, None, :]  # (B, Hkv, S)
    pos = torch.arange(s, device=k.device)
    causal = pos[None, :] <= pos[:, None]  # (S, S) [q, kv]
    mask = causal[None, None] & keep[:, :, None, :] & keep[:, :, :, None]  # (B, Hkv, S, S)
    return dense_attention(q, k, v, mask, scale=scale)


def reference_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_valid: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Dense attention of the last Sq positions over N keys in float64 (bottom-right causal).

    Args:
        q: (B, Hq, Sq, D), positions N - Sq .. N - 1.
        k: (B, Hkv, N, D).
        v: (B, Hkv, N, Dv).
        key_valid: optional (B, N) bool, False = padding.
        scale: softmax scale (None: 1 / sqrt(D)).

    Returns:
        (B, Hq, Sq, Dv) float64.
    """
    b, hkv, n = k.shape[0], k.shape[1], k.shape[2]
    sq = q.shape[2]
    qpos = torch.arange(n - sq, n, device=k.device)
    mask = torch.arange(n, device=k.device)[None, :] <= qpos[:, None]  # (Sq, N)
    mask = mask[None, None].expand(b, hkv, sq, n)  # (B, Hkv, Sq, N)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return dense_attention(q, k, v, mask, scale=scale)
