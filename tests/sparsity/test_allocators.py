"""Ratio allocators: Eq. 6 invariants (hypothesis), fixed ratios, schedules, validation."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from zipvl.sparsity import CumulativeMassAllocator, FixedRatioAllocator, PerLayerSchedule
from zipvl.types import NONFINITE_MASS_BUDGET, Allocator

FIXTURE_OK = settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

taus = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)


@st.composite
def masses(draw: st.DrawFn) -> torch.Tensor:
    """(B, Hkv, S) non-negative masses, sometimes with many zeros and exact ties."""
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 3))
    s = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["uniform", "peaked", "sparse", "ties"]))
    if kind == "uniform":
        m = torch.rand(b, h, s, generator=g)
    elif kind == "peaked":
        m = torch.softmax(4 * torch.randn(b, h, s, generator=g), dim=-1)
    elif kind == "sparse":
        m = torch.rand(b, h, s, generator=g) * (torch.rand(b, h, s, generator=g) < 0.2)
    else:
        m = torch.randint(0, 3, (b, h, s), generator=g).float()
    return m


def _kept_mass_fraction(mass: torch.Tensor, p: int) -> float:
    a = mass.double().sum(dim=(0, 1))
    top = a.sort(descending=True).values[:p].sum()
    return (top / a.sum()).item() if a.sum() > 0 else 1.0


@FIXTURE_OK
@given(mass=masses(), tau=taus)
def test_cumulative_mass_budget_invariants(device: str, mass: torch.Tensor, tau: float) -> None:
    mass = mass.to(device)
    budget = CumulativeMassAllocator(tau)(mass)
    b, h, s = mass.shape
    assert budget.shape == (b, h) and budget.dtype == torch.int32
    assert budget.device == mass.device
    p = int(budget[0, 0])
    assert (budget == p).all(), "one budget per layer"
    assert 1 <= p <= s
    # the p heaviest tokens carry at least tau of the total mass (fp32 cumsum rounding aside)
    assert _kept_mass_fraction(mass.cpu(), p) >= tau - 1e-5
    # and p is the fewest such tokens: p - 1 tokens fall short of tau (unless clamped at 1)
    if p > 1:
        assert _kept_mass_fraction(mass.cpu(), p - 1) < tau + 1e-5


@FIXTURE_OK
@given(mass=masses(), t1=taus, t2=taus)
def test_cumulative_mass_budget_monotone_in_tau(
    device: str, mass: torch.Tensor, t1: float, t2: float
) -> None:
    lo, hi = sorted((t1, t2))
    mass = mass.to(device)
    p_lo = int(CumulativeMassAllocator(lo)(mass)[0, 0])
    assert p_lo <= int(CumulativeMassAllocator(hi)(mass)[0, 0])


@FIXTURE_OK
@given(mass=masses())
def test_tau_one_keeps_everything(device: str, mass: torch.Tensor) -> None:
    budget = CumulativeMassAllocator(1.0)(mass.to(device))
    assert (budget == mass.shape[-1]).all()


@given(mass=masses(), min_keep=st.integers(1, 80), tau=taus)
def test_min_keep_is_a_floor_capped_at_length(
    mass: torch.Tensor, min_keep: int, tau: float
) -> None:
    p = int(CumulativeMassAllocator(tau, min_keep=min_keep)(mass)[0, 0])
    assert min(min_keep, mass.shape[-1]) <= p <= mass.shape[-1]


def test_all_zero_mass_gives_min_keep() -> None:
    assert int(CumulativeMassAllocator(0.9, min_keep=3)(torch.zeros(1, 2, 10))[0, 0]) == 3


def test_budget_sums_over_batch_and_heads() -> None:
    # head 0 puts its mass on token 0, head 1 on token 1: the layer vector needs both for tau > 0.5
    mass = torch.zeros(1, 2, 4)
    mass[0, 0, 0] = 1.0
    mass[0, 1, 1] = 1.0
    assert int(CumulativeMassAllocator(0.5)(mass)[0, 0]) == 1
    assert int(CumulativeMassAllocator(0.6)(mass)[0, 0]) == 2


@given(ratio=st.floats(1e-3, 1.0), s=st.integers(1, 500), min_keep=st.integers(1, 10))
def test_fixed_ratio_budget(ratio: float, s: int, min_keep: int) -> None:
    budget = FixedRatioAllocator(ratio, min_keep=min_keep)(torch.zeros(2, 3, s))
    assert budget.shape == (2, 3) and budget.dtype == torch.int32
    expected = max(min(min_keep, s), min(s, math.ceil(round(ratio * s, 9))))
    assert (budget == expected).all()


def test_fixed_ratio_does_not_round_up_float_noise() -> None:
    # 0.3 * 10 = 3.0000000000000004 in binary floating point
    assert int(FixedRatioAllocator(0.3)(torch.zeros(1, 1, 10))[0, 0]) == 3


def test_per_layer_schedule_dispatches_by_layer() -> None:
    sched = PerLayerSchedule([CumulativeMassAllocator(1.0), 0.5, FixedRatioAllocator(0.25)])
    mass = torch.rand(1, 2, 8)
    got = [int(sched(mass, layer_idx=i)[0, 0]) for i in range(3)]
    assert got == [8, 4, 2]
    assert isinstance(sched, Allocator)


def test_pyramid_schedule_is_linear_and_decreasing() -> None:
    sched = PerLayerSchedule.pyramid(5, min_ratio=0.1, max_ratio=0.5)
    ratios = [a.ratio for a in sched.schedule]  # type: ignore[union-attr]
    assert ratios == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1])
    single = PerLayerSchedule.pyramid(1, min_ratio=0.1, max_ratio=0.5)
    assert [a.ratio for a in single.schedule] == [0.5]  # type: ignore[union-attr]


@pytest.mark.parametrize("layer_idx", [None, 3, -1])
def test_schedule_rejects_missing_or_out_of_range_layer(layer_idx: int | None) -> None:
    sched = PerLayerSchedule([0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="layer_idx"):
        sched(torch.rand(1, 1, 4), layer_idx=layer_idx)


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.01, float("nan")])
def test_tau_outside_unit_interval_raises(tau: float) -> None:
    with pytest.raises(ValueError, match=r"tau: expected a value in \(0, 1\]"):
        CumulativeMassAllocator(tau)


@pytest.mark.parametrize("ratio", [0.0, 1.5, -1.0])
def test_ratio_outside_unit_interval_raises(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"ratio: expected a value in \(0, 1\]"):
        FixedRatioAllocator(ratio)
    with pytest.raises(ValueError, match=r"schedule\[1\]"):
        PerLayerSchedule([0.5, ratio])


def test_allocator_validation_messages() -> None:
    with pytest.raises(ValueError, match="min_keep: expected an int >= 1, got 0"):
        CumulativeMassAllocator(0.9, min_keep=0)
    with pytest.raises(ValueError, match="mass: expected a 3-D tensor"):
        CumulativeMassAllocator()(torch.rand(4, 8))
    with pytest.raises(ValueError, match="mass: expected a floating-point tensor"):
        FixedRatioAllocator(0.5)(torch.ones(1, 1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="min_ratio: expected <= max_ratio"):
        PerLayerSchedule.pyramid(4, min_ratio=0.6, max_ratio=0.5)
    with pytest.raises(ValueError, match="schedule: expected at least one layer"):
        PerLayerSchedule([])
    with pytest.raises(ValueError, match="num_layers: expected an int >= 1, got 0"):
        PerLayerSchedule.pyramid(0, min_ratio=0.1, max_ratio=0.5)
    with pytest.raises(TypeError, match="num_layers: expected an int, got float"):
        PerLayerSchedule.pyramid(4.0, min_ratio=0.1, max_ratio=0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("tau", [0.5, 0.975, 1.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_mass_gives_the_sentinel_not_min_keep(tau: float, bad: float) -> None:
    # before: "cum < tau * total" is False against a NaN total, so p = 0 + 1 = min_keep silently
    mass = torch.rand(2, 3, 16, generator=torch.Generator().manual_seed(0))
    mass[1, 2, 5] = bad
    budget = CumulativeMassAllocator(tau, min_keep=1)(mass)
    assert budget.dtype == torch.int32 and budget.shape == (2, 3)
    assert (budget == NONFINITE_MASS_BUDGET).all()
    # the schedule wrapper passes it through unchanged
    sched = PerLayerSchedule([CumulativeMassAllocator(tau)])
    assert (sched(mass, layer_idx=0) == NONFINITE_MASS_BUDGET).all()


def _brute_force_budget(a: list[int], tau: float, min_keep: int) -> int:
    """Eq. 6 by enumeration, in exact arithmetic: the fewest tokens whose summed mass reaches
    (>=) tau of the total; tau = 1 keeps every token."""
    skv = len(a)
    if tau == 1.0:
        return skv
    top = sorted(a, reverse=True)
    target = tau * sum(a)  # exact: dyadic tau, integer masses below 2^24
    p = next(n for n in range(1, skv + 1) if sum(top[:n]) >= target)
    return max(min(min_keep, skv), p)


@st.composite
def _dyadic_mass_and_tau(draw: st.DrawFn) -> tuple[list[int], float, bool]:
    """Integer masses padded to a power-of-two total, and a dyadic tau that is exact in float32;
    half the time tau * total equals a cumulative sum of the sorted masses (a tie)."""
    a = draw(st.lists(st.integers(0, 9), min_size=1, max_size=24))
    total = 1 << max(1, (sum(a) + 1).bit_length())
    a = [*a, total - sum(a)]  # one more token: the total is a power of two
    a = draw(st.permutations(a))
    tie = draw(st.booleans())
    if tie:
        cums = sorted({c for c in _cumsums(sorted(a, reverse=True)) if 0 < c <= total})
        tau = draw(st.sampled_from(cums)) / total
    else:
        tau = draw(st.integers(1, total)) / total
    return list(a), tau, tie


def _cumsums(values: list[int]) -> list[int]:
    out, run = [], 0
    for v in values:
        run += v
        out.append(run)
    return out


@given(_dyadic_mass_and_tau(), st.integers(1, 4), st.sampled_from([(1, 1), (2, 3)]))
def test_cumulative_mass_budget_equals_brute_force(
    case: tuple[list[int], float, bool], min_keep: int, heads: tuple[int, int]
) -> None:
    """Exactly at the boundary (a prefix of the sorted mass carries exactly tau of the total)
    that prefix is enough: the rule is "reaches", not "exceeds"."""
    a, tau, _ = case
    b, hkv = heads
    mass = torch.zeros(b, hkv, len(a))
    mass[0, 0] = torch.tensor(a, dtype=torch.float32)  # the layer vector sums over (B, Hkv)
    if b * hkv > 1:  # split each token's mass over two rows: the sum is unchanged, exactly
        half = torch.tensor([x // 2 for x in a], dtype=torch.float32)
        mass[0, 0] -= half
        mass[-1, -1] += half
    budget = CumulativeMassAllocator(tau=tau, min_keep=min_keep)(mass)
    assert budget.shape == (b, hkv) and budget.dtype == torch.int32
    expected = _brute_force_budget(a, tau, min_keep)
    assert torch.all(budget == expected), (a, tau, budget.flatten()[0].item(), expected)


def test_layer_allocator_resolves_schedules_once() -> None:
    from zipvl.sparsity.allocators import layer_allocator

    inner = PerLayerSchedule([CumulativeMassAllocator(0.9), 0.5])
    outer = PerLayerSchedule([inner, 0.25])
    assert layer_allocator(outer, 0) is inner.schedule[0]  # nested: down to a plain allocator
    assert layer_allocator(outer, 1) == FixedRatioAllocator(0.25)
    plain = CumulativeMassAllocator(0.8)
    assert layer_allocator(plain, 7) is plain
    mass = torch.rand(1, 2, 20)
    for i in range(2):
        assert torch.equal(layer_allocator(outer, i)(mass, layer_idx=i), outer(mass, layer_idx=i))
    with pytest.raises(ValueError, match=r"layer_idx: expected 0 <= layer_idx < 2 \(a Per"):
        layer_allocator(outer, 2)
    with pytest.raises(TypeError, match=r"layer_idx: expected an int, got str"):
        outer.for_layer("1")  # type: ignore[arg-type]
