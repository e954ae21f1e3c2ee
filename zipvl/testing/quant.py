"""Float64 fake-quantization oracles and SQNR, for tests and benchmarks of ``zipvl.quant``.

The oracle is the *ideal* uniform quantizer written independently of ``zipvl.quant.primitives``:
parameters from the exact float64 min/max (no outward rounding to a storage dtype, no clamped
scale), codes ``floor((x - min) / step + 0.5)``, result ``code * step + min`` in float64. The
PyTorch primitives may differ from it by one code where a value sits on a rounding boundary or
where parameter storage rounded the step; tests bound that, and compare SQNRs.

``fake_quantize_kv`` rebuilds what each ``zipvl.quant`` KV quantizer should return, row by row
with boolean indexing (slow and obvious, on purpose).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zipvl.quant import (
    IdentityKVQuantizer,
    KIVIKVQuantizer,
    KVQuantizer,
    MixedPrecisionKVQuantizer,
    PerTokenKVQuantizer,
    QuantSpec,
    ZipCacheKVQuantizer,
)

__all__ = ["fake_quantize", "fake_quantize_kv", "oracle_qparams", "sqnr"]

_MIN_CHANNEL_SCALE = 2.0**-14  # the CST divisor floor of zipvl.quant.quantizers


def _groups(x: Tensor, spec: QuantSpec) -> tuple[Tensor, int]:
    """Grouped float64 view of x (..., T, D) and the reduced dim (written from the spec's docs)."""
    *lead, t, d = x.shape
    x = x.to(torch.float64)
    if spec.axis == "token":
        g = spec.group_size or t
        if t % g:
            raise ValueError(f"group_size: expected a divisor of {t}, got {g}")
        return x.reshape(*lead, t // g, g, d), -2
    g = spec.group_size or d
    if d % g:
        raise ValueError(f"group_size: expected a divisor of {d}, got {g}")
    return x.reshape(*lead, t, d // g, g), -1


def oracle_qparams(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """The ideal float64 (step, low) of every element's group, each shaped like x.

    x ~ low + code * step, low = the group min (or -amax when symmetric).
    """
    xg, dim = _groups(x, spec)
    if spec.symmetric:
        hi = xg.abs().amax(dim, keepdim=True)
        lo = -hi
    else:
        lo, hi = xg.amin(dim, keepdim=True), xg.amax(dim, keepdim=True)
    step = (hi - lo) / spec.levels
    return step.expand_as(xg).reshape(x.shape), lo.expand_as(xg).reshape(x.shape)


def fake_quantize(x: Tensor, spec: QuantSpec) -> Tensor:
    """Ideal quantize-dequantize of x (..., T, D) with ``spec``, in float64.

    A constant group is returned exactly.
    """
    xg, dim = _groups(x, spec)
    if spec.symmetric:
        hi = xg.abs().amax(dim, keepdim=True)
        lo = -hi
    else:
        lo, hi = xg.amin(dim, keepdim=True), xg.amax(dim, keepdim=True)
    step = (hi - lo) / spec.levels
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.floor((xg - lo) / safe + 0.5).clamp(0, spec.levels)
    out = torch.where(step > 0, codes * step + lo, xg)
    return out.reshape(x.shape)


def _fq_cst(x: Tensor, spec: QuantSpec) -> Tensor:
    """ZipCache channel-separable token-wise fake quantization of x (B, H, T, D), float64."""
    s = x.to(torch.float64).abs().amax(dim=-2, keepdim=True).sqrt().clamp_min(_MIN_CHANNEL_SCALE)
    return fake_quantize(x.to(torch.float64) / s, spec) * s


def _fq_token_groups_with_remainder(x: Tensor, spec: QuantSpec) -> Tensor:
    """Per-channel fake quantization over consecutive token groups, the last one partial."""
    g = spec.group_size or x.shape[-2]
    whole = QuantSpec(spec.bits, "token", None, spec.symmetric)
    pieces = [fake_quantize(x[..., i : i + g, :], whole) for i in range(0, x.shape[-2], g)]
    return torch.cat(pieces, dim=-2)


def _uniform(q: KVQuantizer, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    if k.shape[-2] == 0:
        return k.to(torch.float64), v.to(torch.float64)
    if isinstance(q, IdentityKVQuantizer):
        return k.to(torch.float64), v.to(torch.float64)
    if isinstance(q, ZipCacheKVQuantizer):
        k_hat = fake_quantize(k, QuantSpec(q.bits, "token"))
        return k_hat, _fq_cst(v, QuantSpec(q.bits, "channel"))
    if isinstance(q, KIVIKVQuantizer):
        ks = QuantSpec(q.bits, "token", q.group_size)
        vs = QuantSpec(q.bits, "channel", q.group_size)
        return _fq_token_groups_with_remainder(k, ks), fake_quantize(v, vs)
    if isinstance(q, PerTokenKVQuantizer):
        spec = QuantSpec(q.bits, "channel", q.group_size)
        return fake_quantize(k, spec), fake_quantize(v, spec)
    raise TypeError(f"q: no oracle for {type(q).__name__}")


def fake_quantize_kv(
    quantizer: KVQuantizer, k: Tensor, v: Tensor, keep: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """What ``quantizer.dequantize(quantizer.quantize(k, v, keep))`` ideally returns, float64.

    Args:
        quantizer: one of the ``zipvl.quant`` KV quantizers.
        k: (B, Hkv, T, D).
        v: (B, Hkv, T, D).
        keep: (B, Hkv, T) bool (mixed quantizer: kept tokens go through ``high``).

    Returns:
        (k_hat, v_hat), (B, Hkv, T, D) float64, original positions.
    """
    if not isinstance(quantizer, MixedPrecisionKVQuantizer):
        return _uniform(quantizer, k, v)
    b, h, t, _ = k.shape
    if keep is None:
        keep = torch.ones(b, h, t, dtype=torch.bool, device=k.device)
    k_out = torch.empty(k.shape, dtype=torch.float64, device=k.device)
    v_out = torch.empty_like(k_out)
    for bi in range(b):
        for hi in range(h):
            for sub, sel in ((quantizer.high, keep[bi, hi]), (quantizer.low, ~keep[bi, hi])):
                kk = k[bi, hi][sel][None, None]  # (1, 1, n, D)
                vv = v[bi, hi][sel][None, None]
                kq, vq = _uniform(sub, kk, vv)
                k_out[bi, hi][sel] = kq[0, 0]
                v_out[bi, hi][sel] = vq[0, 0]
    return k_out, v_out


def sqnr(x: Tensor, x_hat: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, 10 log10(sum x^2 / sum (x - x_hat)^2), float64.

    Returns +inf for an exact reconstruction (and -inf for a zero signal with nonzero error).
    """
    if x.shape != x_hat.shape:
        raise ValueError(
            f"x_hat: expected shape {tuple(x.shape)} like x, got {tuple(x_hat.shape)}"
        )
    xd = x.to(torch.float64)
    noise = float((xd - x_hat.to(torch.float64)).pow(2).sum())
    signal = float(xd.pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
