# pyright: reportArgumentType=false, reportOperatorIssue=false, reportAttributeAccessIssue=false, reportCallIssue=false, reportIndexIssue=false
# (Triton's constexpr arguments and tensor tuples are not statically typed)
"""Fused quantize-and-pack Triton kernel for the token-wise (``axis="channel"``) write path.

One program handles ``BLOCK_R`` rows (tokens) of D channels: it loads the rows once, computes
each channel group's min/max, the outward-rounded (scale, zero) in the parameter dtype, the codes
``clamp(floor((x - zero) / scale + 0.5), 0, 2^bits - 1)``, and packs them in the
contiguous-slices layout of ``primitives.pack`` (byte j of a row holds elements j, j + m, ...,
m = D * bits / 8). It writes packed codes and float32 parameters once: one read of x, one write
of D * bits / 8 bytes per row, instead of the reference path's float32 temporaries.

Bit-exact agreement with the PyTorch primitives (``primitives.choose_qparams`` / ``quantize`` /
``pack``) is by construction: the same float32 operations in the same order, divisions with
IEEE round-to-nearest (``tl.math.div_rn``: Triton's plain ``/`` may lower to an approximate
division on GPUs), and parameter rounding by exact power-of-two scaling and floor / ceil: there
is no multiply-add that FMA contraction could change. Tested on the CPU under
``TRITON_INTERPRET=1``.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when this module is first
imported (``quantize_pack(..., impl="triton")`` imports it lazily).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs

from .primitives import _TINY_SCALE
from .spec import QuantSpec, param_grid

__all__ = ["INTERPRETED", "quantize_pack_tokenwise"]

# Whether the kernel below was decorated in interpreter mode (CPU tensors allowed).
INTERPRETED: bool = bool(knobs.runtime.interpret)

_PD_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _round_param(
    y,
    EMIN: tl.constexpr,
    MANT: tl.constexpr,
    PD: tl.constexpr,
    UP: tl.constexpr,
):
    """Outward rounding of float32 y onto the parameter dtype's grid (primitives.round_param)."""
    if PD == 0:
        return y  # float32 parameters: no rounding
    e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # unbiased float32 exponent
    e_ulp = tl.maximum(e, EMIN) - MANT  # log2 of the grid spacing
    ulp = ((e_ulp + 127) << 23).to(tl.float32, bitcast=True)  # 2^e_ulp, exact
    inv = ((127 - e_ulp) << 23).to(tl.float32, bitcast=True)  # 2^-e_ulp, exact
    steps = tl.ceil(y * inv) if UP else tl.floor(y * inv)
    return steps * ulp


@triton.jit
def _quantize_pack_rows_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    zero_ptr,
    n_rows,
    D: tl.constexpr,
    G: tl.constexpr,
    BITS: tl.constexpr,
    LEVELS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    PD: tl.constexpr,
    EMIN: tl.constexpr,
    MANT: tl.constexpr,
    TINY_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    NG: tl.constexpr = D // G  # channel groups per row
    PER: tl.constexpr = 8 // BITS  # codes per byte
    M: tl.constexpr = D // PER  # packed bytes per row

    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    rmask = rows < n_rows
    offs = rows[:, None].to(tl.int64) * D + tl.arange(0, D)[None, :]  # (R, D)
    x = tl.load(x_ptr + offs, mask=rmask[:, None], other=0.0).to(tl.float32)  # (R, D)
    xg = tl.reshape(x, (BLOCK_R, NG, G))  # (R, NG, G)

    if SYMMETRIC:
        hi = tl.max(tl.abs(xg), axis=2)  # (R, NG)
        lo = -hi
    else:
        lo = tl.min(xg, axis=2)  # (R, NG)
        hi = tl.max(xg, axis=2)
    zero = _round_param(lo, EMIN, MANT, PD, False)  # (R, NG)
    scale = tl.maximum(
        tl.math.div_rn(hi - zero, tl.full(hi.shape, LEVELS, tl.float32)), TINY_SCALE
    )
    scale = _round_param(scale, EMIN, MANT, PD, True)  # (R, NG)

    y = tl.math.div_rn(xg - zero[:, :, None], tl.broadcast_to(scale[:, :, None], xg.shape))
    codes = tl.minimum(tl.maximum(tl.floor(y + 0.5), 0.0), LEVELS).to(tl.int32)  # (R, NG, G)

    if PER == 1:
        packed = tl.reshape(codes, (BLOCK_R, M))  # (R, D)
    else:
        sl = tl.reshape(codes, (BLOCK_R, PER, M))  # slice i = channels [i M, (i+1) M)
        shifts = tl.arange(0, PER) * BITS  # (PER,)
        packed = tl.sum(sl << shifts[None, :, None], axis=1)  # (R, M); disjoint bits: sum == or
    poffs = rows[:, None].to(tl.int64) * M + tl.arange(0, M)[None, :]  # (R, M)
    tl.store(packed_ptr + poffs, packed.to(tl.uint8), mask=rmask[:, None])
    goffs = rows[:, None].to(tl.int64) * NG + tl.arange(0, NG)[None, :]  # (R, NG)
    tl.store(scale_ptr + goffs, scale, mask=rmask[:, None])
    tl.store(zero_ptr + goffs, zero, mask=rmask[:, None])


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def quantize_pack_tokenwise(
    x: Tensor, spec: QuantSpec, block_rows: int = 16
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused token-wise quantize + pack (the ``impl="triton"`` branch of ``quantize_pack``).

    Args:
        x: (..., T, D) float16 / bfloat16 / float32 on CUDA (or on the CPU under
            TRITON_INTERPRET=1); D a power of two (so is every group size dividing it).
        spec: a ``QuantSpec`` with ``axis="channel"``.
        block_rows: rows per program (a power of two).

    Returns:
        (packed (..., T, D * bits // 8) uint8, scale (..., T, D // G, 1) float32,
        zero (..., T, D // G, 1) float32), equal to the reference path's.

    Raises:
        ValueError: naming ``spec`` (axis), ``x`` (dtype / head dim, or a CPU tensor while the
            kernel is not interpreted) or ``group_size`` (not dividing D).
    """
    if spec.axis != "channel":
        raise ValueError(
            f"spec: impl='triton' implements the token-wise path (axis='channel') only, "
            f"got axis={spec.axis!r}"
        )
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x: expected dtype in {_X_DTYPES}, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x: expected a tensor of shape (..., T, D), got {tuple(x.shape)}")
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"x: impl='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 set before "
            f"zipvl.quant.triton_kernels is first imported), got a tensor on {x.device}"
        )
    if not _is_pow2(block_rows):
        raise ValueError(f"block_rows: expected a power of two, got {block_rows}")
    d = x.shape[-1]
    g = spec.group_length(d)
    per = spec.codes_per_byte
    if not _is_pow2(d) or d < per:
        raise ValueError(f"x: impl='triton' needs a power-of-two head dim >= {per}, got D={d}")
    # g divides a power-of-two D, so it is a power of two too
    lead = x.shape[:-1]  # (..., T)
    rows = x.reshape(-1, d).contiguous()  # (N, D)
    n = rows.shape[0]
    packed = torch.empty(n, d // per, dtype=torch.uint8, device=x.device)  # (N, M)
    scale = torch.empty(n, d // g, dtype=torch.float32, device=x.device)  # (N, NG)
    zero = torch.empty_like(scale)
    emin, mant = param_grid(spec.param_dtype) or (0, 0)
    if n:
        grid = (triton.cdiv(n, block_rows),)
        # cast: the tl.constexpr annotations are for Triton, not for the type checker
        kernel = cast(Any, _quantize_pack_rows_kernel)
        kernel[grid](
            rows,
            packed,
            scale,
            zero,
            n,
            D=d,
            G=g,
            BITS=spec.bits,
            LEVELS=spec.levels,
            SYMMETRIC=spec.symmetric,
            PD=_PD_CODE[spec.param_dtype],
            EMIN=emin,
            MANT=mant,
            TINY_SCALE=_TINY_SCALE,
            BLOCK_R=block_rows,
        )
    return (
        packed.reshape(*lead, d // per),  # (..., T, M)
        scale.reshape(*lead, d // g, 1),  # (..., T, NG, 1)
        zero.reshape(*lead, d // g, 1),
    )
