"""Dense reference for token-sparse prefill attention (the ``impl="reference"`` oracle).

ZipVL (arXiv 2410.08584 v1, Alg. 1): kept queries attend causally to kept keys; unkept queries
get a zero output (``unkept="zero"``, the paper's reading) or attend to the kept keys at positions
<= their own (``unkept="attend"``). This module spells that out as an S x S boolean mask and a
masked softmax in float32 (float64 for float64 inputs). It materialises B x Hq x S x S scores: use
it for checking, not for speed. Fast paths never import it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from zipvl.types import Selection

__all__ = ["reference_sparse_attention", "selection_dense_mask"]


def selection_dense_mask(
    selection: Selection, *, unkept: Literal["zero", "attend"] = "zero"
) -> Tensor:
    """Which (query, key) pairs a selection lets attend, as a dense mask.

    Args:
        selection: ``keep`` (B, Hkv, S) bool.
        unkept: ``"zero"``: pair (q, kv) needs both kept; ``"attend"``: only kv kept.

    Returns:
        (B, Hkv, S, S) bool, ``[b, h, q, kv]``; always causal (``kv <= q``).
    """
    keep = selection.keep  # (B, Hkv, S)
    s = keep.shape[-1]
    pos = torch.arange(s, device=keep.device)
    causal = pos[None, :] <= pos[:, None]  # (S, S)
    mask = causal & keep[..., None, :]  # (B, Hkv, S, S)
    if unkept == "zero":
        mask = mask & keep[..., :, None]
    return mask


def reference_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    *,
    unkept: Literal["zero", "attend"] = "zero",
    scale: float | None = None,
) -> Tensor:
    """Dense masked-softmax attention under a selection.

    Args:
        q: (B, Hq, S, D).
        k: (B, Hkv, S, D).
        v: (B, Hkv, S, Dv).
        selection: ``keep`` (B, Hkv, S) bool.
        unkept: see ``selection_dense_mask``.
        scale: softmax scale; None = 1 / sqrt(D).

    Returns:
        (B, Hq, S, Dv) in q's dtype. Rows with no visible key (unkept queries in ``"zero"`` mode,
        or queries before the first kept key) are zero.
    """
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    sc = scale if scale is not None else d**-0.5
    mask = selection_dense_mask(selection, unkept=unkept)  # (B, Hkv, S, S)
    qf = q.to(acc).view(b, hkv, g, s, d)  # (B, Hkv, G, S, D)
    logits = torch.matmul(qf, k.to(acc)[:, :, None].transpose(-1, -2)) * sc  # (B,Hkv,G,S,S)
    logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, Hkv, G, S, S), NaN on fully masked rows
    probs = torch.where(mask.any(dim=-1, keepdim=True)[:, :, None], probs, 0.0)
    out = torch.matmul(probs, v.to(acc)[:, :, None])  # (B, Hkv, G, S, Dv)
    return out.reshape(b, hq, s, v.shape[-1]).to(q.dtype)
