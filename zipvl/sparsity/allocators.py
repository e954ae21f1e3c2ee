"""Ratio allocators: raw attention mass -> number of important tokens per (batch, KV head).

Implements ZipVL's layer-wise adaptive ratio (He et al., arXiv 2410.08584 v1, Sec. 4.1, Eq. 6) and
two fixed baselines: a constant ratio and a per-layer schedule (PyramidKV, Cai et al. 2024).

Contract (``zipvl.types.Allocator``)::

    allocator(mass, *, layer_idx=None) -> budget
    mass    (B, Hkv, Skv) float, >= 0   attention mass each key received (``Scores.mass``)
    budget  (B, Hkv)      int32         tokens to keep, in [min(min_keep, Skv), Skv], or
                                        NONFINITE_MASS_BUDGET (-1) everywhere when a
                                        mass-dependent allocator meets NaN/inf mass

Everything runs as plain PyTorch on the device of ``mass`` with fixed shapes and no host sync,
so an allocator can sit inside a ``torch.compile(fullgraph=True)`` region. For that reason it
cannot raise on bad mass values: non-finite mass yields the sentinel budget, which
``TopKSelector`` rejects at its host read (never a silently small budget).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor

from zipvl.checks import check_fraction, check_int, check_tensor
from zipvl.types import NONFINITE_MASS_BUDGET, Allocator

__all__ = [
    "CumulativeMassAllocator",
    "FixedRatioAllocator",
    "PerLayerSchedule",
    "host_budget",
    "layer_allocator",
]


def _check_mass(mass: object) -> Tensor:
    mass = check_tensor("mass", mass, ndim=3, floating=True)
    if mass.shape[-1] == 0:
        raise ValueError(
            f"mass: expected at least one key (Skv >= 1), got shape {tuple(mass.shape)}"
        )
    return mass


@dataclass(frozen=True)
class CumulativeMassAllocator:
    """ZipVL Eq. 6: keep the fewest tokens whose attention mass reaches ``tau`` of the total.

    The mass is summed over batch and KV heads into one layer vector ``a`` (Skv,), sorted in
    descending order, and ``p = #{i : cumsum(sorted a)[i] < tau * sum(a)} + 1``, clamped to
    ``[min(min_keep, Skv), Skv]``. This is the ZipCache prototype's "tau x total" form of the
    paper's ``tau * n`` (it stays right when only probe rows were summed). One ``p`` per layer,
    broadcast over (B, Hkv).

    Properties: ``p`` is monotone in ``tau``; the ``p`` largest entries of ``a`` carry at least
    ``tau`` of its mass (up to fp32 rounding of the cumulative sum); ``tau = 1`` keeps all Skv
    tokens, even when some keys have zero mass. An all-zero ``mass`` gives ``p = min_keep``. A
    ``mass`` with NaN or inf anywhere gives ``NONFINITE_MASS_BUDGET`` (-1) everywhere, which
    ``TopKSelector`` rejects: overflowed scores never pass as a tiny budget.

    Attributes:
        tau: retained mass fraction, in (0, 1]. The paper uses 0.96 and 0.975.
        min_keep: lower bound on the budget (>= 1; capped at Skv).
    """

    tau: float = 0.975
    min_keep: int = 1

    def __post_init__(self) -> None:
        check_fraction("tau", self.tau)
        check_int("min_keep", self.min_keep, 1)

    def __call__(self, mass: Tensor, /, *, layer_idx: int | None = None) -> Tensor:
        """Budget for one layer.

        Args:
            mass: (B, Hkv, Skv) float, non-negative attention mass per key.
            layer_idx: unused (the rule is the same for every layer); accepted for the protocol.

        Returns:
            (B, Hkv) int32, the same value everywhere, in [min(min_keep, Skv), Skv], or
            ``NONFINITE_MASS_BUDGET`` if ``mass`` holds NaN or inf.

        Raises:
            ValueError: ``mass`` is not a 3-D floating tensor with Skv >= 1.
        """
        mass = _check_mass(mass)
        b, hkv, skv = mass.shape
        a = mass.float().sum(dim=(0, 1))  # (Skv,)
        if self.tau == 1.0:
            # Exact: a cumulative-sum test would stop early when trailing keys have zero mass.
            p = torch.where(a.sum().isfinite(), skv, NONFINITE_MASS_BUDGET)  # () int64
            return p.to(torch.int32).expand(b, hkv).contiguous()  # (B, Hkv)
        cum = a.sort(descending=True).values.cumsum(0)  # (Skv,)
        # Fixed-shape form of "first index where cumsum >= tau * total, plus one": no host sync.
        p = (cum < self.tau * cum[-1]).sum() + 1  # () int64
        p = p.clamp(min=min(self.min_keep, skv), max=skv)
        # NaN/inf anywhere makes the total non-finite (a NaN comparison would count as "< tau"
        # and yield min_keep): return the sentinel instead, for the selector to reject
        p = torch.where(cum[-1].isfinite(), p, NONFINITE_MASS_BUDGET)  # () int64
        return p.to(torch.int32).expand(b, hkv).contiguous()  # (B, Hkv)


def _ratio_budget(ratio: float, skv: int, min_keep: int) -> int:
    # round() first so that e.g. 0.3 * 10 = 3.0000000000000004 does not ceil to 4
    p = math.ceil(round(ratio * skv, 9))
    return max(min(min_keep, skv), min(p, skv))


@dataclass(frozen=True)
class FixedRatioAllocator:
    """Keep ``ceil(ratio * Skv)`` tokens, clamped to ``[min(min_keep, Skv), Skv]``.

    The budget depends only on the shape of ``mass`` (its values are ignored), so it is computed on
    the host without reading the device.

    Attributes:
        ratio: fraction of tokens to keep, in (0, 1].
        min_keep: lower bound on the budget (>= 1; capped at Skv).
    """

    ratio: float
    min_keep: int = 1

    def __post_init__(self) -> None:
        check_fraction("ratio", self.ratio)
        check_int("min_keep", self.min_keep, 1)

    def __call__(self, mass: Tensor, /, *, layer_idx: int | None = None) -> Tensor:
        """Budget for one layer.

        Args:
            mass: (B, Hkv, Skv) float; only its shape and device are used.
            layer_idx: unused; accepted for the protocol.

        Returns:
            (B, Hkv) int32 filled with ``ceil(ratio * Skv)`` (clamped).
        """
        mass = _check_mass(mass)
        b, hkv, skv = mass.shape
        p = _ratio_budget(self.ratio, skv, self.min_keep)
        return torch.full((b, hkv), p, dtype=torch.int32, device=mass.device)

    def host_budget(self, skv: int, /, *, layer_idx: int | None = None) -> int:
        """The budget ``__call__`` returns for ``Skv`` keys, as a host int (it ignores the mass
        values): what lets a captured plan skip its host read (``host_budget``)."""
        return _ratio_budget(self.ratio, check_int("skv", skv, 0), self.min_keep)


@dataclass(frozen=True)
class PerLayerSchedule:
    """Apply a different allocator to each layer, chosen by ``layer_idx``.

    ``schedule[l]`` is an allocator, or a float ratio that is wrapped in ``FixedRatioAllocator``.
    ``PerLayerSchedule.pyramid`` builds the PyramidKV linear schedule (more tokens in early
    layers).

    Example::

        PerLayerSchedule([CumulativeMassAllocator(0.99), 0.5, 0.3])   # 3 layers
        PerLayerSchedule.pyramid(num_layers=28, min_ratio=0.1, max_ratio=0.7)

    Attributes:
        schedule: one allocator (or ratio in (0, 1]) per layer; stored as a tuple of allocators.
    """

    schedule: Sequence[Allocator | float] = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.schedule, (str, bytes)) or not isinstance(self.schedule, Sequence):
            raise TypeError(
                "schedule: expected a list or tuple of allocators or ratios, "
                f"got {type(self.schedule).__name__}"
            )
        if len(self.schedule) == 0:
            raise ValueError("schedule: expected at least one layer, got an empty sequence")
        items: list[Allocator] = []
        for i, item in enumerate(self.schedule):
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                items.append(FixedRatioAllocator(check_fraction(f"schedule[{i}]", item)))
            elif callable(item):
                items.append(item)
            else:
                raise TypeError(
                    f"schedule[{i}]: expected an allocator or a ratio, got {type(item).__name__}"
                )
        object.__setattr__(self, "schedule", tuple(items))

    @classmethod
    def pyramid(
        cls, num_layers: int, min_ratio: float, max_ratio: float, *, min_keep: int = 1
    ) -> PerLayerSchedule:
        """PyramidKV's linear schedule: ``ratio_l = max - l * (max - min) / (L - 1)``.

        Args:
            num_layers: L >= 1 (a single layer gets ``max_ratio``).
            min_ratio: ratio of the last layer, in (0, 1].
            max_ratio: ratio of the first layer, in [min_ratio, 1].
            min_keep: passed to every ``FixedRatioAllocator``.

        Returns:
            A schedule of ``FixedRatioAllocator``, one per layer.
        """
        check_int("num_layers", num_layers, 1)
        check_fraction("min_ratio", min_ratio)
        check_fraction("max_ratio", max_ratio)
        if min_ratio > max_ratio:
            raise ValueError(f"min_ratio: expected <= max_ratio ({max_ratio}), got {min_ratio}")
        step = 0.0 if num_layers == 1 else (max_ratio - min_ratio) / (num_layers - 1)
        ratios = [max(min_ratio, max_ratio - i * step) for i in range(num_layers)]
        return cls(tuple(FixedRatioAllocator(r, min_keep) for r in ratios))

    def for_layer(self, layer_idx: int) -> Allocator:
        """The allocator of layer ``layer_idx`` (what ``__call__`` delegates to).

        Setup code (``ZipVLConfig.for_layer``, ``ZipVLCache``) resolves a schedule once per
        layer with this, so no forward looks the layer up, and a schedule shorter than the
        model fails when the model is set up rather than in the middle of a forward.

        Raises:
            TypeError / ValueError: ``layer_idx`` is not an int in [0, len(schedule)).
        """
        n = len(self.schedule)
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"layer_idx: expected an int, got {type(layer_idx).__name__}")
        if not 0 <= layer_idx < n:
            raise ValueError(
                f"layer_idx: expected 0 <= layer_idx < {n} (a PerLayerSchedule of {n} layers), "
                f"got {layer_idx}"
            )
        # ratios were wrapped in FixedRatioAllocator by __post_init__
        return cast(Allocator, self.schedule[layer_idx])

    def __call__(self, mass: Tensor, /, *, layer_idx: int | None = None) -> Tensor:
        """Budget of layer ``layer_idx`` from its own allocator.

        Args:
            mass: (B, Hkv, Skv) float, passed to the layer's allocator.
            layer_idx: index into ``schedule``, required, in [0, len(schedule)).

        Returns:
            (B, Hkv) int32 budget.

        Raises:
            ValueError: ``layer_idx`` is missing or out of range.
        """
        n = len(self.schedule)
        if layer_idx is None:
            raise ValueError(
                f"layer_idx: PerLayerSchedule needs the layer index (0 <= layer_idx < {n}), "
                "got None"
            )
        return self.for_layer(layer_idx)(mass, layer_idx=layer_idx)


def host_budget(allocator: Allocator, skv: int, *, layer_idx: int | None = None) -> int | None:
    """The budget of ``allocator`` for ``Skv`` keys when it depends on nothing but the shape (and
    the layer), as a host int; None when it depends on the mass values.

    ``FixedRatioAllocator`` (and a ``PerLayerSchedule`` entry that is one) answers with an int;
    ``CumulativeMassAllocator`` and every other allocator with None. Only these exact types
    answer (a subclass may override ``__call__``). With an answer, a plan knows every row's
    kept count without reading the device (``zipvl.sparsity.PlanGraph``).

    Args:
        allocator: the layer's allocator.
        skv: number of keys.
        layer_idx: the layer (a ``PerLayerSchedule`` needs it; None there gives None).
    """
    if type(allocator) is PerLayerSchedule:
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            return None  # the allocator's own call names a bad layer_idx
        if not 0 <= layer_idx < len(allocator.schedule):
            return None
        return host_budget(allocator.for_layer(layer_idx), skv, layer_idx=layer_idx)
    if type(allocator) is FixedRatioAllocator:
        return allocator.host_budget(skv, layer_idx=layer_idx)
    return None


def layer_allocator(allocator: Allocator, layer_idx: int) -> Allocator:
    """The allocator layer ``layer_idx`` runs: a ``PerLayerSchedule`` resolved to that layer's
    entry (nested schedules too), any other allocator as it is.

    Called once per layer when a model or cache is set up; the result is still called with
    ``layer_idx``, so the budgets are those of the schedule itself.

    Raises:
        TypeError / ValueError: ``layer_idx`` is outside a schedule.
    """
    while isinstance(allocator, PerLayerSchedule):
        allocator = allocator.for_layer(layer_idx)
    return allocator
