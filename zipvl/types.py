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
      broadcast over (B, Hkv). ``NONFINITE_MASS_BUDGET`` (-1) marks NaN/inf attention mass.
    * A selection is a fixed-shape boolean ``keep`` (B, Hkv, Skv); every (b, h) row keeps the same
      number of tokens, so gathered tensors are rectangular.

Dependency direction: ``types`` <- ``sparsity``, ``quant`` <- ``cache`` <- ``decode`` <-
``models``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from zipvl.checks import check_int, check_tensor
from zipvl.impl import Impl, parse_impl

__all__ = [
    "NONFINITE_MASS_BUDGET",
    "Allocator",
    "Impl",
    "MaskMod",
    "MassReduce",
    "ScoreMod",
    "Scorer",
    "Scores",
    "Selection",
    "Selector",
    "equalize_keep_counts",
    "parse_impl",
]

NONFINITE_MASS_BUDGET = -1
"""The budget an allocator returns when the attention mass holds NaN or inf.

An allocator cannot raise on values without a host sync, so it returns this sentinel in every
(b, h) entry; ``TopKSelector`` rejects it with a ``ValueError`` at its one host read."""

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""FlexAttention mask_mod: (b, h, q_idx, kv_idx) -> bool (our alias, not torch's private one)."""

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""FlexAttention score_mod: (score, b, h, q_idx, kv_idx) -> score."""

MassReduce = Callable[[Tensor], Tensor]
"""Cross-process sum of attention mass: (B, 1, Skv) float32 -> (B, 1, Skv) float32.

The input is this process's mass summed over its own KV heads; the output must be that tensor
summed over every process that holds heads of the same layer (an all-reduce SUM, e.g.
``zipvl.sparsity.AllReduceMass(group)``), so that every process allocates the same budget.
It may return a new tensor or reduce in place and return its input.

A reduction over a process group may also have ``world_size`` and ``rank`` (ints) and
``gather(obj) -> list`` (every rank's ``obj``, in rank order), as ``AllReduceMass`` has:
``ZipVLCache`` then reports its world size (checked against the model by ``zipvl.enable``) and
``report()`` gathers the figures of every rank. A plain callable reduces the mass only."""


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

    Construction checks what is free to check on the host: ``keep`` is a 3-D bool tensor and
    ``num_kept`` an int in [0, Skv]. That every row of ``keep`` really has ``num_kept`` True
    entries needs a read of the device, so it is checked by ``check_counts`` (one host read of
    the min and max row count), which every consumer that sizes tensors by ``num_kept``
    (``sparse_attention``, ``indices``) calls first, outside ``torch.compile`` tracing. The result
    is remembered on the instance, so one selection is read back at most once;
    ``TopKSelector`` builds its mask with exactly ``num_kept`` entries per row (property-tested)
    and returns a selection marked as checked. (``dataclasses.replace`` gives a new, unchecked
    selection.)

    Attributes:
        keep: (B, Hkv, Skv) bool, True for important tokens. Every (b, h) row has the same
            number of True entries (``num_kept``).
        num_kept: the number of kept tokens per row, as a host int (the plan step reads it
            back once per layer to size the gathered tensors, or knows it without a read when
            the budget is known on the host: ``zipvl.sparsity.host_budget``).

    Raises:
        TypeError: ``keep`` is not a tensor or ``num_kept`` not an int.
        ValueError: ``keep`` is not 3-D bool, or ``num_kept`` is outside [0, Skv].
    """

    keep: Tensor
    num_kept: int
    # set by check_counts once the row counts have been verified (not part of equality / repr)
    _counts_checked: bool = field(default=False, init=False, repr=False, compare=False)
    # kept positions computed with the mask (``attach_indices``; not part of equality / repr)
    _indices: Tensor | None = field(default=None, init=False, repr=False, compare=False)
    # the plan's unread NaN check (``attach_nan_flag``; not part of equality / repr)
    _nan_flag: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keep = check_tensor("Selection.keep", self.keep, ndim=3, dtype=torch.bool)
        n = check_int("Selection.num_kept", self.num_kept, 0)
        if n > keep.shape[-1]:
            raise ValueError(
                f"Selection.num_kept: expected an int in [0, Skv={keep.shape[-1]}], got {n}"
            )

    @property
    def ratio(self) -> float:
        """Fraction of tokens kept (num_kept / Skv)."""
        return self.num_kept / max(self.keep.shape[-1], 1)

    def check_counts(self, *, count_range: tuple[int, int] | None = None) -> Selection:
        """Verify that every (b, h) row of ``keep`` has exactly ``num_kept`` True entries.

        One host read (the min and max of ``keep.sum(-1)`` in a single transfer), skipped while
        ``torch.compile`` traces (a read there would break the graph) and when this selection was
        already checked.

        Args:
            count_range: (min, max) row count the caller has already read back to the host
                together with its own data (``TopKSelector`` does); then nothing is read here.

        Returns:
            ``self``, so that calls chain.

        Raises:
            ValueError: the row counts differ from each other or from ``num_kept``.
        """
        if self._counts_checked or torch.compiler.is_compiling():
            return self
        if count_range is None:
            if self.keep.numel() == 0:
                count_range = (self.num_kept, self.num_kept)  # no rows: nothing to disagree
            else:
                lo_hi = torch.stack(torch.aminmax(self.keep.sum(dim=-1)))  # (2,) int64
                lo, hi = lo_hi.tolist()  # the one host read
                count_range = (int(lo), int(hi))
        lo, hi = count_range
        if lo != hi:
            raise ValueError(
                "Selection.keep: expected the same number of kept tokens in every (b, h) row, "
                f"got row counts from {lo} to {hi}"
            )
        if lo != self.num_kept:
            raise ValueError(
                f"Selection.num_kept: expected {lo}, the number of True entries in every row of "
                f"keep, got {self.num_kept}"
            )
        object.__setattr__(self, "_counts_checked", True)
        return self

    def attach_indices(self, indices: Tensor) -> Selection:
        """Remember the kept positions, computed together with ``keep`` by the caller (the
        captured plan compacts them inside its graph), so that ``indices`` returns them.

        Args:
            indices: (B, Hkv, num_kept) int64, every row's kept positions in ascending order.

        Returns:
            ``self``.

        Raises:
            ValueError: ``indices`` of another shape or dtype.
        """
        b, h, _ = self.keep.shape
        check_tensor("indices", indices, ndim=3, dtype=torch.int64)
        if tuple(indices.shape) != (b, h, self.num_kept):
            raise ValueError(
                f"indices: expected shape (B, Hkv, num_kept) = {(b, h, self.num_kept)}, got "
                f"{tuple(indices.shape)}"
            )
        object.__setattr__(self, "_indices", indices)
        return self

    def attach_nan_flag(self, flag: Tensor) -> Selection:
        """Remember the plan's NaN check of the scores, left on the device: a plan that knows
        its budget on the host (``zipvl.sparsity.host_budget``) reads nothing back, so instead
        of raising it hands the flag on, and ``sparse_attention`` writes NaN into every output
        element when it is set (as dense attention's output would hold NaN), without a read.

        Args:
            flag: 0-dim integer or bool tensor on ``keep``'s device, nonzero = the scores held
                NaN.

        Returns:
            ``self``.

        Raises:
            ValueError: ``flag`` is not a 0-dim integer/bool tensor on ``keep``'s device.
        """
        flag = check_tensor("flag", flag, ndim=0)
        if flag.is_floating_point() or flag.is_complex():
            raise ValueError(f"flag: expected an integer or bool tensor, got {flag.dtype}")
        if flag.device != self.keep.device:
            raise ValueError(
                f"flag: expected device {self.keep.device} like keep, got {flag.device}"
            )
        object.__setattr__(self, "_nan_flag", flag)
        return self

    @property
    def nan_flag(self) -> Tensor | None:
        """The unread NaN check of the plan (``attach_nan_flag``), or None when the plan read
        and checked it (it raised then)."""
        return self._nan_flag

    def indices(self) -> Tensor:
        """Positions of the kept tokens in ascending order: (B, Hkv, P) int64.

        Checks the row counts first (``check_counts``: one host read unless already checked).
        ``zipvl.quant.keep_order`` gives the same kept order on a bare mask, together with the
        other positions (a stable sort, which it needs for those).
        """
        self.check_counts()
        if self._indices is not None:
            return self._indices
        # clamped to P: in range even for a selection whose row counts were not checked (e.g.
        # inside torch.compile)
        return kept_positions(self.keep, self.num_kept)  # (B, Hkv, P)


def kept_positions(keep: Tensor, width: int | None = None) -> Tensor:
    """Every row's kept positions in ascending order, by running count (no sort): the j-th
    kept position of a row goes to slot j, the other positions to a spare slot dropped at the
    end.

    Args:
        keep: (..., Skv) bool.
        width: slots per row (default Skv); kept positions past it are dropped.

    Returns:
        (..., width) int64: row r's first ``min(keep[r].sum(), width)`` entries are its True
        positions in ascending order, the rest 0.
    """
    skv = keep.shape[-1]
    width = skv if width is None else width
    count = keep.cumsum(dim=-1) - 1  # (..., Skv): the running count of each kept position
    if width < skv:
        count = count.clamp(max=width)
    slot = torch.where(keep, count, width)  # spare slot: width
    pos = torch.arange(skv, device=keep.device).expand(keep.shape)
    idx = torch.zeros(*keep.shape[:-1], width + 1, dtype=torch.int64, device=keep.device)
    return idx.scatter_(-1, slot, pos)[..., :width]


def keep_with_positions(
    keep: Tensor, out: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """``keep`` (..., Skv) bool and its ``kept_positions``, copied into ``out`` = (keep, idx)
    where given (a captured plan's output buffer) and returned as those."""
    idx = kept_positions(keep)
    if out is None:
        return keep, idx
    out[0].copy_(keep)
    out[1].copy_(idx)
    return out


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
        """mass (B, Hkv, Skv) float32 >= 0 -> budget (B, Hkv) int32 in [1, Skv].

        A mass-dependent allocator returns ``NONFINITE_MASS_BUDGET`` everywhere when the mass
        holds NaN or inf (the selector raises on it)."""
        ...


@runtime_checkable
class Selector(Protocol):
    """Token selector: normalized scores + budget -> Selection."""

    def __call__(self, scores: Tensor, budget: Tensor, /) -> Selection:
        """scores (B, Hkv, Skv) float32 (higher = keep), budget (B, Hkv) int32 -> Selection.

        A selector that has read the row counts of its ``keep`` back anyway can pass them to
        ``Selection.check_counts(count_range=...)``; otherwise the first consumer reads them."""
        ...


def equalize_keep_counts(keep: Tensor) -> Tensor:
    """Raise rows of ``keep`` to the largest row count by promoting their latest unkept tokens.

    Args:
        keep: (B, Hkv, T) bool.

    Returns:
        (B, Hkv, T) bool, a superset of ``keep`` with equal row counts (no host sync).
    """
    counts = keep.sum(-1, keepdim=True)  # (B, Hkv, 1)
    deficit = counts.amax(dim=(0, 1), keepdim=True) - counts  # (B, Hkv, 1)
    unkept = ~keep  # (B, Hkv, T)
    # rank of each unkept token counted from the end: 1 = latest unkept position
    from_end = unkept.flip(-1).cumsum(-1).flip(-1)  # (B, Hkv, T)
    return keep | (unkept & (from_end <= deficit))  # (B, Hkv, T)
