"""The fragment code order of a 128 x 128 page: codes where the decode kernel's matrix-multiply
operands want them.

A page of codes ``C`` (128 rows x 128 columns; keys: rows are tokens, columns channels; values:
rows are channels, columns tokens, i.e. the value page transposed) is packed row by row into
int32 words whose 4-bit (or 2-bit) fields land, after one 16-byte load per lane, exactly in the
fp16 operand registers of an m16n8k16 MMA (Triton's ``dot_op`` layout with ``kWidth = 4``): a
lane's word holds columns ``4 t .. 4 t + 3`` and ``+ 16`` of a 32-column block. Conversion to
fp16 is then one mask-and-or per two codes (``(w & 0x000F000F) | 0x64006400`` reads as
``1024 + mu * code``, ``mu`` the field's power-of-two position, folded into the scale), with no
shuffle and no shared memory. Layout (bytes little-endian within a word):

* **4 bits**: a row is 16 words; word ``4 t + w`` (t, w < 4), nibble ``(2 h + b) + 4 e`` holds
  column ``32 w + 16 h + 4 t + 2 b + e``. ``mu = 16`` where ``b = 1``, else 1.
* **2 bits**: a row is 8 words; word ``2 t + j``, field ``(2 h + b) + 4 i`` at bit
  ``2 ((2 h + b) + 4 i) + 16 e`` holds column ``32 (2 j + i) + 16 h + 4 t + 2 b + e``;
  ``mu = 4 ** (2 h + b)``. Rows are stored in pairs: in each block of 16 rows, the words of rows
  ``g`` and ``g + 8`` interleave (stored word ``16 g + 4 t + 2 half + j``), so a lane's 16-byte
  load is its whole operand fragment.

``pack_fragment`` / ``unpack_fragment`` are the reference (PyTorch) packers: a fixed column
permutation followed by ``zipvl.quant.primitives.pack``'s contiguous slices, and for 2 bits the
row-pair interleave. The Triton page writer produces the same bytes
(``zipvl.cache.page_triton``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .primitives import pack, unpack

__all__ = [
    "CODE_ORDERS",
    "FRAGMENT_BITS",
    "FRAGMENT_SIZE",
    "fragment_mu",
    "pack_fragment",
    "unpack_fragment",
]

CODE_ORDERS = ("auto", "slice", "fragment")
"""How a page's codes may be laid out (``zipvl.cache.PageFormat.code_order``): "slice" rows
(``zipvl.quant.primitives.pack``), "fragment" (this module), or "auto" (fragment where it
applies)."""

FRAGMENT_SIZE = 128
"""Rows and columns of a fragment-ordered page (page size and head dim both 128)."""
FRAGMENT_BITS = (2, 4)
"""Code widths with a fragment order."""


def _columns(bits: int) -> list[int]:
    """perm[slot * m + byte] = the column whose code sits in field ``slot`` of byte ``byte`` of
    a packed row (m bytes a row), i.e. pack(row[perm], bits) is the fragment-ordered row."""
    if bits == 4:
        m = 64
        perm = [0] * 128
        for byte in range(m):
            word, j = divmod(byte, 4)
            t, w = divmod(word, 4)
            h, e = j % 2, j // 2
            lo = 32 * w + 16 * h + 4 * t + e  # b = 0: the low nibble
            perm[byte], perm[m + byte] = lo, lo + 2  # b = 1: the high nibble
        return perm
    m = 32
    perm = [0] * 128
    for byte in range(m):
        word, bb = divmod(byte, 4)
        t, j = divmod(word, 2)
        i, e = bb % 2, bb // 2
        for slot in range(4):  # slot = 2 h + b: shift 2 * slot within the byte
            h, b = divmod(slot, 2)
            perm[slot * m + byte] = 32 * (2 * j + i) + 16 * h + 4 * t + 2 * b + e
    return perm


_PERMS: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}


def _perm(bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    key = (bits, device)
    hit = _PERMS.get(key)
    if hit is None:
        p = torch.tensor(_columns(bits), dtype=torch.long)
        hit = _PERMS[key] = (p.to(device), torch.argsort(p).to(device))
    return hit


def _check(x: Tensor, name: str, cols: int, bits: int) -> None:
    if bits not in FRAGMENT_BITS:
        raise ValueError(
            f"bits: expected one of {FRAGMENT_BITS} for the fragment order, got {bits}"
        )
    if x.dtype != torch.uint8:
        raise ValueError(f"{name}: expected dtype torch.uint8, got {x.dtype}")
    if x.ndim < 2 or x.shape[-2] != FRAGMENT_SIZE or x.shape[-1] != cols:
        raise ValueError(
            f"{name}: expected a (..., {FRAGMENT_SIZE}, {cols}) tensor, got {tuple(x.shape)}"
        )


def pack_fragment(codes: Tensor, bits: int) -> Tensor:
    """Pack (..., 128, 128) uint8 codes (values < 2 ** bits, not checked) into the fragment
    order: (..., 128, 128 * bits // 8) uint8."""
    _check(codes, "codes", FRAGMENT_SIZE, bits)
    perm, _ = _perm(bits, codes.device)
    rows = pack(codes.index_select(-1, perm), bits)  # (..., 128, m)
    if bits == 2:  # words (blk, half, g, t, j) -> (blk, g, t, half, j)
        lead = rows.shape[:-2]
        w = rows.reshape(*lead, 8, 2, 8, 4, 2, 4)
        n = len(lead)
        w = w.permute(*range(n), n, n + 2, n + 3, n + 1, n + 4, n + 5)
        rows = w.reshape(*lead, FRAGMENT_SIZE, 32)
    return rows.contiguous()


def unpack_fragment(packed: Tensor, bits: int) -> Tensor:
    """Inverse of ``pack_fragment``: (..., 128, 128 * bits // 8) uint8 -> (..., 128, 128)."""
    _check(packed, "packed", FRAGMENT_SIZE * bits // 8, bits)
    if bits == 2:  # (blk, g, t, half, j) -> (blk, half, g, t, j)
        lead = packed.shape[:-2]
        n = len(lead)
        w = packed.reshape(*lead, 8, 8, 4, 2, 2, 4)
        w = w.permute(*range(n), n, n + 3, n + 1, n + 2, n + 4, n + 5)
        packed = w.reshape(*lead, FRAGMENT_SIZE, 32)
    _, inv = _perm(bits, packed.device)
    return unpack(packed, bits).index_select(-1, inv)


def fragment_mu(bits: int, device: torch.device | str | None = None) -> Tensor:
    """(128,) float32: the power of two that the fp16 conversion multiplies column k's code by
    (the kernel divides the column's scale by it)."""
    k = torch.arange(FRAGMENT_SIZE, device=device)
    if bits == 4:
        return torch.where((k >> 1) & 1 == 1, 16.0, 1.0)
    return (4.0 ** (2 * ((k >> 4) & 1) + ((k >> 1) & 1))).float()
