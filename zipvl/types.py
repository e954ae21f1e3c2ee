"""Shared vocabulary of zipvl: the shape legend, the component protocols and the result types.

Shape legend (used by every docstring and shape comment in the package):

    B    batch size
    Hq   query heads                  Hkv  key/value heads        G = Hq // Hkv (GQA group)
    Sq   query length                 Skv  key/value length       S = Sq = Skv in prefill
    D    head dimension               L    number of layers
    P    kept (important) tokens per KV head, the same for every (b, h) of one selection
    M    probe queries                BLOCK  attention tile size (128 unless stated)
    Nq   ceil(Sq / BLOCK)             Nkv  ceil(Skv / BLOCK)

Layout: queries are (B, Hq, Sq, D) and keys / values (B, Hkv, Skv, D), the layout of SDPA,
FlexAttention and the transformers cache. No function in zipvl takes another layout.

Conventions:
    * Scores are float32 and "higher = more important".
    * Budgets are int32 tensors of shape (B, Hkv); ZipVL's allocator gives one value per layer,
      broadcast over (B, Hkv).
    * A selection is a fixed-shape boolean ``keep`` (B, Hkv, Skv); every (b, h) row keeps the same
      number of tokens, so gathered tensors are rectangular.

Dependency direction: ``types`` <- ``sparsity``, ``quant`` <- ``cache`` <- ``decode`` <-
``models``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "Allocator",
    "Impl",
    "MaskMod",
    "ScoreMod",
    "Scorer",
    "Scores",
    "Selection",
    "Selector",
]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""FlexAttention mask_mod: (b, h, q_idx, kv_idx) -> bool (our alias, not torch's private one)."""

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""FlexAttention score_mod: (score, b, h, q_idx, kv_idx) -> score."""


class Impl(str, enum.Enum):
    """Implementation selector of a public operation. A requested impl never falls back."""

    REFERENCE = "reference"  # dense, eager, the oracle
    FLEX = "flex"  # gather + FlexAttention
    SDPA = "sdpa"  # gather + scaled_dot_product_attention
    TRITON = "triton"  # hand-written Triton kernel


@dataclass(frozen=True)
class Scores:
    """What an importance scorer returns.

    Attributes:
        mass: (B, Hkv, Skv) float32, the raw attention mass each key received, summed over the
            probe rows and the G query heads of its KV head. Used by allocators (Eq. 6).
        normalized: (B, Hkv, Skv) float32, the mass divided by the number of queries that can see
            the key (Eq. 7). Used by selectors. Higher = more important.
    """

    mass: Tensor
    normalized: Tensor


@dataclass(frozen=True)
class Selection:
    """Which tokens are important, per KV head.

    Attributes:
        keep: (B, Hkv, Skv) bool, True for important tokens. Every (b, h) row has the same
            number of True entries (``num_kept``).
        num_kept: the number of kept tokens per row, as a host int (the plan step reads it
            back once per layer to size the gathered tensors).
    """

    keep: Tensor
    num_kept: int

    @property
    def ratio(self) -> float:
        """Fraction of tokens kept (num_kept / Skv)."""
        return self.num_kept / max(self.keep.shape[-1], 1)

    def indices(self) -> Tensor:
        """Positions of the kept tokens in ascending order: (B, Hkv, P) int64."""
        skv = self.keep.shape[-1]
        pos = torch.arange(skv, device=self.keep.device).expand_as(self.keep)  # (B, Hkv, Skv)
        # kept positions sort first, in position order (stable sort on the inverted flag)
        key = (~self.keep).to(torch.int64) * skv + pos  # (B, Hkv, Skv)
        return key.sort(dim=-1).values[..., : self.num_kept] % max(skv, 1)  # (B, Hkv, P)


@runtime_checkable
class Scorer(Protocol):
    """Importance scorer: (q, k) -> Scores. Higher = more important."""

    def __call__(self, q: Tensor, k: Tensor, /) -> Scores:
        """q (B, Hq, Sq, D), k (B, Hkv, Skv, D) with RoPE applied -> Scores over Skv."""
        ...


@runtime_checkable
class Allocator(Protocol):
    """Ratio allocator: raw mass -> budget."""

    def __call__(self, mass: Tensor, /, *, layer_idx: int | None = None) -> Tensor:
        """mass (B, Hkv, Skv) float32 >= 0 -> budget (B, Hkv) int32 in [1, Skv]."""
        ...


@runtime_checkable
class Selector(Protocol):
    """Token selector: normalized scores + budget -> Selection."""

    def __call__(self, scores: Tensor, budget: Tensor, /) -> Selection:
        """scores (B, Hkv, Skv) float32 (higher = keep), budget (B, Hkv) int32 -> Selection."""
        ...
