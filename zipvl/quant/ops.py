"""`quantize_pack`: the write path of the KV cache (quantize + pack in one call), with `impl=`.

``impl="reference"`` composes the PyTorch primitives (any device, any axis); ``impl="triton"``
runs the fused Triton kernel of ``triton_kernels.py`` (token-wise ``axis="channel"`` only: the
path of values and per-token quantizers). Both return bit-identical codes and equal parameters.
A requested impl that cannot run raises; nothing falls back.
"""

from __future__ import annotations

from torch import Tensor

from ..impl import QUANT_IMPLS, Impl, parse_impl
from .primitives import choose_qparams, pack, quantize
from .spec import QuantSpec

__all__ = ["quantize_pack"]


def quantize_pack(
    x: Tensor, spec: QuantSpec, impl: Impl | str = Impl.REFERENCE
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``x`` with ``spec`` and pack the codes.

    Args:
        x: (..., T, D) float16 / bfloat16 / float32; D divisible by 8 // bits.
        spec: the quantizer.
        impl: ``"reference"`` (PyTorch primitives) or ``"triton"`` (fused kernel; CUDA tensors,
            or CPU tensors when the process runs with TRITON_INTERPRET=1; ``axis="channel"``,
            D a power of two).

    Returns:
        (packed (..., T, D * bits // 8) uint8, scale, zero): the parameters are float32,
        exact in ``spec.param_dtype``, shaped like ``choose_qparams``'s.

    Raises:
        ValueError: unknown ``impl``, or an ``impl`` that cannot run here: a ``spec`` / shape
            the requested impl does not cover, ``impl="triton"`` without the triton package, or
            on a CPU tensor without TRITON_INTERPRET=1 (like every other ``impl="triton"`` of
            zipvl: an impossible request is a bad argument, and nothing falls back).
    """
    impl = parse_impl("impl", impl, QUANT_IMPLS)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a floating-point tensor, got {got}")
    if impl is Impl.REFERENCE:
        xf = x.float()  # once: both primitives below work in float32 (a no-op for float32 x)
        scale, zero = choose_qparams(xf, spec)
        return pack(quantize(xf, spec, scale, zero), spec.bits), scale, zero
    if impl is Impl.TRITON:
        try:
            from .triton_kernels import quantize_pack_tokenwise
        except ImportError as e:
            raise ValueError(f"impl: 'triton' needs the triton package ({e})") from e

        return quantize_pack_tokenwise(x, spec)
    # parse_impl admits QUANT_IMPLS only
    raise AssertionError(f"unhandled impl {impl!r}")  # pragma: no cover
