"""Pure quantization primitives: choose_qparams / quantize / dequantize / pack / unpack.

The reference (and CPU) implementation of the uniform quantizers of
docs/algorithm.md#mixed-precision-quantization (ZipCache / KIVI lineage). Every function is pure
tensor work: no host syncs, no data-dependent shapes, so all of them run under
``torch.compile(fullgraph=True)``.

Conventions:
    * ``x`` has shape (..., T, D); ``spec.axis`` is the axis the scale is shared along (see
      ``zipvl.quant.spec``). Parameters are float32, broadcastable against the *grouped* view
      of x: (..., T // G, 1, D) for ``axis="token"``, (..., T, D // G, 1) for ``"channel"``.
    * Asymmetric: zero = min, scale = (max - zero) / (2^bits - 1), both rounded outward to
      ``spec.param_dtype``. x_hat = code * scale + zero.
    * Rounding of codes is ``floor(y + 0.5)`` (round half up), not torch.round's half-to-even,
      because it is what the Triton kernel computes too; codes are clamped to [0, 2^bits - 1].
    * A constant group has max == min: its scale is clamped to a tiny positive value (never 0),
      so nothing divides by zero; with float32 parameters its codes are all 0 and it
      dequantizes exactly to the constant, otherwise to within half a step like any group.

Packing layout ("contiguous slices", as in ZipCache's code): along the last dimension of n
codes, with k = 8 // bits codes per byte and m = n // k bytes, byte j holds the codes of
elements j, j + m, ..., j + (k - 1) m; element i * m + j sits in bits [i * bits, (i+1) * bits).
Why: a fused decode kernel loads one contiguous row of m bytes and obtains slice i with a
single shift and mask, and slice i is the *contiguous* channel range [i m, (i+1) m) of the row,
so it multiplies a contiguous slice of q (no interleave/shuffle needed), and channel groups of
per-token scales stay contiguous too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .spec import QuantSpec, param_grid

__all__ = [
    "choose_qparams",
    "dequantize",
    "grouped_view",
    "pack",
    "pack_bitmap",
    "quantize",
    "round_param",
    "unpack",
    "unpack_bitmap",
]

# Smallest positive normal float32: the floor of every scale, so nothing divides by zero.
_TINY_SCALE = 2.0**-126


def grouped_view(x: Tensor, spec: QuantSpec) -> Tensor:
    """Reshape x (..., T, D) into the grouped view the parameters broadcast against.

    Args:
        x: (..., T, D) tensor (T >= 1).
        spec: the quantizer; its ``group_size`` must divide the grouped axis.

    Returns:
        (..., T // G, G, D) for ``axis="token"``, (..., T, D // G, G) for ``axis="channel"``.

    Raises:
        ValueError: naming ``x`` for fewer than 2 dims, ``group_size`` if it does not divide.
    """
    if x.ndim < 2:
        raise ValueError(f"x: expected a tensor of shape (..., T, D), got {tuple(x.shape)}")
    *lead, t, d = x.shape
    if spec.axis == "token":
        g = spec.group_length(t)
        return x.reshape(*lead, t // g, g, d)  # (..., T/G, G, D)
    g = spec.group_length(d)
    return x.reshape(*lead, t, d // g, g)  # (..., T, D/G, G)


def round_param(y: Tensor, dtype: torch.dtype, *, up: bool) -> Tensor:
    """Round float32 ``y`` to a value representable in ``dtype``, outward (up or down).

    Floor / ceil on the dtype's grid (``spec.param_grid``) with exact float32 operations (a
    power-of-two scaling, floor or ceil, and back), so ``torch.compile`` keeps the rounding
    (it may drop a float32 -> float16 -> float32 cast round trip). Values beyond the dtype's
    range (65504 for float16) end up on the grid but overflow when stored.

    Args:
        y: float32 tensor, any shape.
        dtype: target parameter dtype (float32: y is returned unchanged).
        up: True rounds towards +inf, False towards -inf.

    Returns:
        float32 tensor of y's shape whose values are exact in ``dtype``.
    """
    grid = param_grid(dtype)
    if grid is None:
        return y
    emin, mant = grid
    # nine elementwise ops (a launch each on a GPU): the biased exponent field E of y, floored
    # at the dtype's smallest normal exponent; the grid spacing is 2^(E - 127 - mant)
    biased = torch.clamp_min((y.view(torch.int32) >> 23) & 0xFF, emin + 127)
    ulp_bits = (biased - mant) << 23  # float32 bits of 2^e_ulp
    ulp = ulp_bits.view(torch.float32)  # 2^e_ulp, exact
    inv = ((254 << 23) - ulp_bits).view(torch.float32)  # 2^-e_ulp, exact
    steps = torch.ceil(y * inv) if up else torch.floor(y * inv)  # y * inv is exact
    return steps * ulp


def choose_qparams(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Asymmetric (or symmetric) min/max parameters of every group.

    Args:
        x: (..., T, D) floating tensor.
        spec: the quantizer.

    Returns:
        (scale, zero), float32, exactly representable in ``spec.param_dtype``, shaped
        (..., T // G, 1, D) (``axis="token"``) or (..., T, D // G, 1) (``axis="channel"``).
        scale > 0 always; zero <= min of the group and zero + levels * scale >= max up to
        the float32 rounding of (max - zero) / levels (codes are clamped at the top).
    """
    xg = grouped_view(x, spec).float()  # grouped view
    dim = spec.reduce_dim
    if spec.symmetric:
        hi = xg.abs().amax(dim=dim, keepdim=True)
        lo = -hi
    else:
        lo = xg.amin(dim=dim, keepdim=True)
        hi = xg.amax(dim=dim, keepdim=True)
    zero = round_param(lo, spec.param_dtype, up=False)
    # a tensor divisor, not a Python scalar: PyTorch's CUDA kernel turns division by a scalar
    # into a multiplication by its reciprocal, which is not bit-identical to IEEE division
    levels = torch.full_like(hi, spec.levels)
    scale = torch.clamp_min((hi - zero) / levels, _TINY_SCALE)
    scale = round_param(scale, spec.param_dtype, up=True)
    return scale, zero


def quantize(x: Tensor, spec: QuantSpec, scale: Tensor, zero: Tensor) -> Tensor:
    """Codes of x: ``clamp(floor((x - zero) / scale + 0.5), 0, 2^bits - 1)``.

    Args:
        x: (..., T, D) floating tensor.
        spec: the quantizer.
        scale: float32, broadcastable against the grouped view (see ``choose_qparams``).
        zero: float32, same shape as ``scale``.

    Returns:
        (..., T, D) uint8 codes in [0, 2^bits - 1] (unpacked).
    """
    xg = grouped_view(x, spec).float()
    codes = torch.floor((xg - zero) / scale + 0.5).clamp_(0, spec.levels)
    return codes.to(torch.uint8).reshape(x.shape)  # (..., T, D)


def dequantize(
    codes: Tensor,
    spec: QuantSpec,
    scale: Tensor,
    zero: Tensor,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """x_hat = code * scale + zero, computed in float32 and cast to ``dtype``.

    Args:
        codes: (..., T, D) uint8 (unpacked).
        spec: the quantizer the codes were produced with.
        scale: float32, broadcastable against the grouped view.
        zero: float32, same shape as ``scale``.
        dtype: output dtype.

    Returns:
        (..., T, D) tensor of ``dtype``.
    """
    cg = grouped_view(codes, spec).to(torch.float32)
    return (cg * scale + zero).to(dtype).reshape(codes.shape)  # (..., T, D)


def _codes_per_byte(bits: int) -> int:
    if isinstance(bits, bool) or bits not in (2, 4, 8):
        raise ValueError(f"bits: expected one of (2, 4, 8), got {bits!r}")
    return 8 // bits


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes along the last dim, contiguous-slices layout (module docstring).

    Args:
        codes: (..., n) uint8, every value in [0, 2^bits - 1] (not checked: that would need a
            host sync); n divisible by 8 // bits.
        bits: 2 (4 codes a byte), 4 (2 a byte) or 8 (identity).

    Returns:
        (..., n * bits // 8) uint8.

    Raises:
        ValueError: naming ``bits`` or ``codes`` (dtype, last dim not divisible).
    """
    per = _codes_per_byte(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes: expected dtype torch.uint8, got {codes.dtype}")
    if codes.ndim < 1 or codes.shape[-1] % per != 0:
        raise ValueError(
            f"codes: expected a last dim divisible by {per} (codes per byte at {bits} bits), "
            f"got shape {tuple(codes.shape)}"
        )
    if per == 1:
        return codes
    m = codes.shape[-1] // per
    # slice i holds elements [i m, (i+1) m); its codes are shifted to bits [i bits, (i+1) bits)
    sl = codes.reshape(*codes.shape[:-1], per, m)  # (..., per, m)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (per,)
    # the shifted codes occupy disjoint bits, so their sum is their bitwise or (at most 255)
    return (sl << shifts[:, None]).sum(dim=-2, dtype=torch.uint8)  # (..., m)


def unpack(packed: Tensor, bits: int) -> Tensor:
    """Inverse of ``pack``.

    Args:
        packed: (..., m) uint8.
        bits: 2, 4 or 8.

    Returns:
        (..., m * 8 // bits) uint8 codes.
    """
    per = _codes_per_byte(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed: expected dtype torch.uint8, got {packed.dtype}")
    if per == 1:
        return packed
    mask = (1 << bits) - 1
    sl = [(packed >> (i * bits)) & mask for i in range(per)]
    out = torch.stack(sl, dim=-2)  # (..., per, m)
    return out.reshape(*packed.shape[:-1], per * packed.shape[-1])  # (..., n)


def pack_bitmap(mask: Tensor) -> Tensor:
    """Pack a bool mask along its last dim, 8 flags a byte: flag t is bit t % 8 of byte t // 8.

    Args:
        mask: (..., T) bool.

    Returns:
        (..., ceil(T / 8)) uint8; padding bits are 0.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected dtype torch.bool, got {mask.dtype}")
    t = mask.shape[-1]
    nb = -(-t // 8)
    pad = nb * 8 - t
    m = mask.to(torch.uint8)
    if pad:
        m = torch.cat([m, m.new_zeros(*m.shape[:-1], pad)], dim=-1)  # (..., 8 nb)
    m = m.reshape(*m.shape[:-1], nb, 8)  # (..., nb, 8)
    # shifts made on the device: a tensor built from a Python list would be a host-to-device
    # copy, which synchronizes the stream
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)  # (8,)
    return (m << shifts).sum(dim=-1, dtype=torch.uint8)  # (..., nb); bits are disjoint


def unpack_bitmap(packed: Tensor, length: int) -> Tensor:
    """Inverse of ``pack_bitmap``: (..., ceil(length / 8)) uint8 -> (..., length) bool."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed: expected dtype torch.uint8, got {packed.dtype}")
    if packed.shape[-1] != -(-length // 8):
        raise ValueError(
            f"length: expected {8 * (packed.shape[-1] - 1) + 1}..{8 * packed.shape[-1]} for "
            f"{packed.shape[-1]} bytes, got {length}"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (..., nb, 8)
    return bits.reshape(*packed.shape[:-1], -1)[..., :length].bool()  # (..., T)
