"""Dense attention oracles and the measured-tolerance assertion (the flash-attention 2x rule).

Written independently of ``zipvl.sparsity.reference`` (einops, float64) so that the library's
reference path is itself checked against something else.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange, repeat
from torch import Tensor

__all__ = [
    "assert_close_to_reference",
    "dense_attention",
    "dense_selection_mask",
    "max_abs_error",
]


def dense_selection_mask(keep: Tensor, *, unkept: Literal["zero", "attend"] = "zero") -> Tensor:
    """Selection -> dense boolean attention mask with causality.

    Args:
        keep: (B, Hkv, S) bool.
        unkept: ``"zero"``: pair (q, kv) allowed iff both kept and kv <= q; ``"attend"``: iff kv
            kept and kv <= q.

    Returns:
        (B, Hkv, S, S) bool, indexed ``[b, h, q, kv]``.
    """
    s = keep.shape[-1]
    pos = torch.arange(s, device=keep.device)
    causal = rearrange(pos, "k -> 1 1 1 k") <= rearrange(pos, "q -> 1 1 q 1")  # (1, 1, S, S)
    allowed = causal & rearrange(keep, "b h k -> b h 1 k")
    if unkept == "zero":
        allowed = allowed & rearrange(keep, "b h q -> b h q 1")
    return allowed


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    *,
    scale: float | None = None,
    upcast: bool = True,
) -> Tensor:
    """Masked-softmax attention, the plain way.

    Args:
        q: (B, Hq, Sq, D).
        k: (B, Hkv, Skv, D).
        v: (B, Hkv, Skv, Dv).
        mask: (B, Hkv, Sq, Skv) bool (True = attend), shared by the G query heads of a KV head.
        scale: softmax scale; None = 1 / sqrt(D).
        upcast: compute in float64 (the oracle) or in the inputs' dtype (the "plain PyTorch in the
            same dtype" path whose error sets the tolerance).

    Returns:
        (B, Hq, Sq, Dv), float64 if ``upcast`` else q's dtype. Rows with no allowed key are zero.
    """
    g = q.shape[1] // k.shape[1]
    dt = torch.float64 if upcast else q.dtype
    sc = scale if scale is not None else q.shape[-1] ** -0.5
    kr = repeat(k.to(dt), "b h s d -> b (h g) s d", g=g)
    vr = repeat(v.to(dt), "b h s d -> b (h g) s d", g=g)
    mr = repeat(mask, "b h q k -> b (h g) q k", g=g)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.to(dt), kr) * sc
    logits = logits.masked_fill(~mr, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.where(mr.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
    return torch.einsum("bhqk,bhkd->bhqd", probs, vr)


def max_abs_error(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| in float64."""
    return (out.double() - ref.double()).abs().max().item()


def assert_close_to_reference(
    out: Tensor, ref64: Tensor, same_dtype_err: float, *, factor: float = 2.0
) -> None:
    """The 2x rule: ``err(out) <= factor * err(plain same-dtype path) + band``.

    ``band`` is one unit in the last place of ``out``'s dtype at the output's scale
    (``2 * eps(dtype) * max|ref64|`` bounds the ulp of every value up to ``max|ref64|``): a fused
    kernel may round once more than the plain path even where the plain path is exact (S = 1).

    Args:
        out: the fast path's output.
        ref64: the float64 oracle on the same inputs.
        same_dtype_err: ``max_abs_error(plain same-dtype attention, ref64)``.
        factor: allowed multiple of the plain error (2 in the flash-attention rule).

    Raises:
        AssertionError: with both errors in the message.
    """
    assert out.shape == ref64.shape, f"shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), "output has non-finite values"
    band = 2 * torch.finfo(out.dtype).eps * max(ref64.abs().max().item(), 1e-6)
    err = max_abs_error(out, ref64)
    bound = factor * same_dtype_err + band
    assert err <= bound, (
        f"max abs error {err:.3e} > {factor} x same-dtype error {same_dtype_err:.3e} "
        f"+ band {band:.3e} = {bound:.3e}"
    )
