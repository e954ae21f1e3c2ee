"""`QuantSpec`: what one uniform quantization looks like, with ONE axis convention.

ZipVL (arXiv 2410.08584 v1, docs/algorithm.md#mixed-precision-quantization) stores the KV cache of
important tokens at b_h = 4 bits and the rest at b_l = 2 bits with asymmetric uniform quantizers
inherited from ZipCache. This module only describes a quantizer; the maths lives in
``primitives.py``.

Axis convention (the only one in zipvl): for a tensor ``x`` of shape (..., T, D),
``axis`` names THE AXIS THE SCALE IS SHARED ALONG.

* ``axis="token"``: one (scale, zero) per channel per group of ``group_size`` tokens
  (per-channel quantization: KIVI and ZipCache keys). Grouped view (..., T // G, G, D),
  parameters (..., T // G, 1, D).
* ``axis="channel"``: one (scale, zero) per token per group of ``group_size`` channels
  (per-token quantization: KIVI values, ZipCache's token-wise values). Grouped view
  (..., T, D // G, G), parameters (..., T, D // G, 1).

``group_size=None`` means the whole axis is one group.

Parameter storage. ``param_dtype`` is the dtype scales and zero points are stored in. The
primitives round the parameters *outward* to values exactly representable in ``param_dtype``
(zero point rounded down, scale rounded up) before computing codes, so storing them in
``param_dtype`` is lossless and the round-trip error stays within half a (stored) step.
float16 halves the metadata of float32 (what KIVI and ZipCache store) but overflows for
|x| >= 65504; pick bfloat16 or float32 for such data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "PARAM_DTYPES",
    "SUPPORTED_BITS",
    "Axis",
    "QuantSpec",
    "param_grid",
]

Axis = Literal["token", "channel"]

SUPPORTED_BITS: tuple[int, ...] = (2, 4, 8)
PARAM_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)

# Outward rounding of parameters to ``param_dtype`` (see ``param_grid``): the grid of a dtype
# near y has spacing 2^(max(exponent(y), EMIN) - MANT); rounding is floor / ceil on that grid,
# computed with exact float32 operations (no dtype cast, which torch.compile may elide).
# bfloat16's subnormal spacing is clamped to 2^-126 (a coarser grid, still exact in bfloat16).
_GRID: dict[torch.dtype, tuple[int, int] | None] = {
    torch.float32: None,
    torch.float16: (-14, 10),
    torch.bfloat16: (-126 + 7, 7),
}


def param_grid(dtype: torch.dtype) -> tuple[int, int] | None:
    """(EMIN, MANT) of a parameter dtype's grid, None for float32 (no rounding).

    The representable values of ``dtype`` near a float32 y are the multiples of
    2^(max(e, EMIN) - MANT), e = the unbiased float32 exponent of y (EMIN = the smallest
    normal exponent, MANT = the stored mantissa bits). The PyTorch primitives and the Triton
    kernel both round on this grid, so they agree bit for bit.

    Raises:
        ValueError: if ``dtype`` is not one of ``PARAM_DTYPES``.
    """
    if dtype not in _GRID:
        raise ValueError(f"param_dtype: expected one of {PARAM_DTYPES}, got {dtype}")
    return _GRID[dtype]


@dataclass(frozen=True)
class QuantSpec:
    """A uniform (affine) quantizer for tensors of shape (..., T, D).

    Attributes:
        bits: code width, one of 2, 4, 8. Codes are uint8 in [0, 2**bits - 1].
        axis: the axis the scale is shared along: ``"token"`` (per-channel quantization, one
            scale per channel per token group) or ``"channel"`` (per-token quantization, one
            scale per token per channel group). See the module docstring.
        group_size: tokens (``axis="token"``) or channels (``axis="channel"``) per group;
            None = the whole axis. It must divide the axis length; this is checked when the
            length is known (at quantize time), raising ValueError naming ``group_size``.
        symmetric: False (default) = asymmetric min/max; True = range [-amax, amax]. Both store
            a scale and a zero point (x_hat = code * scale + zero).
        param_dtype: dtype the scale and zero point are exactly representable in (and stored
            in by the quantizers): float32 (default), float16 or bfloat16.
    """

    bits: int
    axis: Axis
    group_size: int | None = None
    symmetric: bool = False
    param_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits: expected one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.axis not in ("token", "channel"):
            raise ValueError(f"axis: expected 'token' or 'channel', got {self.axis!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size < 1
        ):
            raise ValueError(
                f"group_size: expected a positive int or None, got {self.group_size!r}"
            )
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric: expected a bool, got {type(self.symmetric).__name__}")
        param_grid(self.param_dtype)  # validates param_dtype

    @property
    def levels(self) -> int:
        """Largest code, 2**bits - 1."""
        return (1 << self.bits) - 1

    @property
    def codes_per_byte(self) -> int:
        """How many codes one packed byte holds: 4 (2-bit), 2 (4-bit), 1 (8-bit)."""
        return 8 // self.bits

    @property
    def reduce_dim(self) -> int:
        """Dimension of the grouped view that a (scale, zero) pair is shared along."""
        return -2 if self.axis == "token" else -1

    def group_length(self, length: int) -> int:
        """Group size for an axis of ``length`` elements (checks divisibility).

        Args:
            length: length of the axis the scale is shared along (T for ``"token"``,
                D for ``"channel"``).

        Raises:
            ValueError: naming ``group_size`` if it does not divide ``length``.
        """
        g = length if self.group_size is None else self.group_size
        if length < 1 or length % g != 0:
            which = "token" if self.axis == "token" else "channel"
            raise ValueError(
                f"group_size: expected a divisor of the {which} axis length {length}, "
                f"got {self.group_size}"
            )
        return g

    def num_params(self, tokens: int, head_dim: int) -> int:
        """Number of (scale, zero) pairs for one (tokens, head_dim) slice; ceil for a token
        remainder group (used by quantizers that handle the remainder explicitly)."""
        if tokens == 0:
            return 0
        if self.axis == "token":
            g = tokens if self.group_size is None else self.group_size
            return -(-tokens // g) * head_dim
        g = head_dim if self.group_size is None else self.group_size
        return tokens * -(-head_dim // g)
