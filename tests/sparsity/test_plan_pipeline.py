"""The one planning pipeline: ``plan_scores`` / ``plan_row_keep`` give what the separate
allocate -> select calls gave (hypothesis), and ``mass_reduce`` makes processes that hold
different KV heads allocate the single-process budget of all heads, with one call per plan."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from zipvl.sparsity import (
    AllReduceMass,
    CumulativeMassAllocator,
    FixedRatioAllocator,
    PerLayerSchedule,
    ProbeScorer,
    Scores,
    TopKSelector,
    plan_row_keep,
    plan_scores,
    plan_tokens,
)
from zipvl.testing.inputs import random_qkv
from zipvl.types import Allocator, Selector

allocators = st.one_of(
    st.floats(0.05, 1.0).map(CumulativeMassAllocator),
    st.floats(0.05, 1.0).map(FixedRatioAllocator),
    st.just(PerLayerSchedule([CumulativeMassAllocator(0.9), 0.3])),
)
selectors = st.builds(
    TopKSelector,
    granularity=st.sampled_from(["kv_head", "layer"]),
    keep_last=st.booleans(),
    sink_tokens=st.integers(0, 3),
    recent_window=st.integers(0, 3),
)


@st.composite
def dyadic_scores(draw: st.DrawFn, min_heads: int = 1) -> Scores:
    """(B, Hkv, S) masses on a 1/64 grid (every partial sum is exact in fp32, so any summation
    order gives the same value) with ties, zeros and, sometimes, a normalized score that is not
    the mass."""
    b = draw(st.integers(1, 3))
    h = draw(st.integers(min_heads, 4))
    s = draw(st.integers(1, 40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    mass = torch.randint(0, 65, (b, h, s), generator=g).float() / 64  # (B, Hkv, S)
    if draw(st.booleans()):
        return Scores(mass=mass, normalized=mass)
    normalized = mass / torch.arange(s, 0, -1).float()  # (B, Hkv, S), Eq. 7's n - j
    return Scores(mass=mass, normalized=normalized)


def _old_plan(scores: Scores, allocator: Allocator, selector: Selector) -> tuple:
    """What the prefill pipeline and the chunked cache ran before: allocate, then select."""
    budget = allocator(scores.mass, layer_idx=1)
    sel = selector(scores.normalized, budget)
    return budget, sel.keep, sel.num_kept


def _old_row_keep(scores: Scores, allocator: Allocator, selector: TopKSelector) -> tuple:
    """What the paged cache ran before on a decode block: every row alone, then keep_mask."""
    b = scores.mass.shape[0]
    budget = torch.cat([allocator(scores.mass[i : i + 1], layer_idx=1) for i in range(b)])
    return budget, selector.keep_mask(scores.normalized, budget)


@given(scores=dyadic_scores(), allocator=allocators, selector=selectors)
def test_plan_scores_is_allocate_then_select(
    scores: Scores, allocator: Allocator, selector: TopKSelector
) -> None:
    budget, keep, kept = _old_plan(scores, allocator, selector)
    plan = plan_scores(scores, allocator=allocator, selector=selector, layer_idx=1)
    assert torch.equal(plan.budget, budget)
    assert torch.equal(plan.selection.keep, keep) and plan.selection.num_kept == kept
    assert plan.scores is scores


@given(scores=dyadic_scores(), allocator=allocators, selector=selectors)
def test_plan_row_keep_is_the_per_row_allocation(
    scores: Scores, allocator: Allocator, selector: TopKSelector
) -> None:
    budget, keep = _old_row_keep(scores, allocator, selector)
    plan = plan_row_keep(scores, allocator=allocator, selector=selector, layer_idx=1)
    assert torch.equal(plan.budget, budget) and torch.equal(plan.keep, keep)


def test_plan_row_keep_takes_a_selector_without_keep_mask() -> None:
    scores = Scores(mass=torch.rand(2, 2, 9), normalized=torch.rand(2, 2, 9))
    calls = []

    def selector(s: torch.Tensor, budget: torch.Tensor):  # a plain-function Selector
        calls.append(budget.clone())
        return TopKSelector()(s, budget)

    plan = plan_row_keep(scores, allocator=FixedRatioAllocator(0.5), selector=selector)
    assert len(calls) == 1 and (plan.keep.sum(-1) == 5).all()


# ----------------------------------------------------------------------------- mass_reduce


class SplitReduce:
    """A fake all-reduce for one process of two: adds the other process's head-summed mass
    (known to the test) and counts its calls."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other  # (B, Hkv', S) the other process's mass
        self.calls = 0

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert local.shape[1] == 1 and local.dtype == torch.float32
        return local + self.other.float().sum(dim=1, keepdim=True)


def _halves(scores: Scores, cut: int) -> tuple[Scores, Scores]:
    lo = Scores(mass=scores.mass[:, :cut], normalized=scores.normalized[:, :cut])
    hi = Scores(mass=scores.mass[:, cut:], normalized=scores.normalized[:, cut:])
    return lo, hi


@given(scores=dyadic_scores(min_heads=2), data=st.data())
def test_split_heads_allocate_the_unsplit_budget(scores: Scores, data: st.DataObject) -> None:
    """Two processes with a share of the KV heads each and a summing reduce: each one's budget
    is the single-process budget, its kept set the single-process kept set of its heads, and
    the reduce runs once per plan."""
    allocator = data.draw(allocators)
    selector = TopKSelector(keep_last=data.draw(st.booleans()))  # per KV head: local
    cut = data.draw(st.integers(1, scores.mass.shape[1] - 1))
    whole = plan_scores(scores, allocator=allocator, selector=selector, layer_idx=1)
    whole_rows = plan_row_keep(scores, allocator=allocator, selector=selector, layer_idx=1)
    lo, hi = _halves(scores, cut)
    for mine, other, heads in ((lo, hi, slice(0, cut)), (hi, lo, slice(cut, None))):
        reduce = SplitReduce(other.mass)
        part = plan_scores(
            mine, allocator=allocator, selector=selector, layer_idx=1, mass_reduce=reduce
        )
        assert reduce.calls == 1
        assert torch.equal(part.budget, whole.budget[:, heads])
        assert part.selection.num_kept == whole.selection.num_kept
        assert torch.equal(part.selection.keep, whole.selection.keep[:, heads])
        rows = plan_row_keep(
            mine, allocator=allocator, selector=selector, layer_idx=1, mass_reduce=reduce
        )
        assert reduce.calls == 2
        assert torch.equal(rows.budget, whole_rows.budget[:, heads])
        assert torch.equal(rows.keep, whole_rows.keep[:, heads])


@pytest.mark.parametrize("padded", [False, True])
def test_plan_tokens_reduces_once_and_matches_the_unsplit_plan(padded: bool) -> None:
    """ProbeScorer on real q / k split by KV head (each process has the query heads of its KV
    heads): budget and kept sets of the whole model, one reduce per plan, padded or not."""
    b, hq, hkv, s, d = 3, 8, 4, 48, 16
    q, k, _ = random_qkv(b, hq, hkv, s, d, seed=11)
    valid = None
    if padded:
        valid = torch.ones(b, s, dtype=torch.bool)
        valid[1, :9] = False  # left padding
        valid[2, 30:] = False  # right padding
    comps = {
        "scorer": ProbeScorer(),
        "allocator": CumulativeMassAllocator(0.9),
        "selector": TopKSelector(),
    }
    whole = plan_tokens(q, k, key_valid=valid, **comps)  # type: ignore[arg-type]
    g = hq // hkv
    parts = {0: slice(0, 1), 1: slice(1, hkv)}  # uneven shares on purpose
    for mine, other in ((0, 1), (1, 0)):
        kv_m, kv_o = parts[mine], parts[other]
        q_o = q[:, kv_o.start * g : (kv_o.stop or hkv) * g]
        # the other process's contribution: its own plan's mass (zero on padding)
        other_mass = plan_tokens(q_o, k[:, kv_o], key_valid=valid, **comps).scores.mass  # type: ignore[arg-type]
        reduce = SplitReduce(other_mass)
        q_m = q[:, kv_m.start * g : (kv_m.stop or hkv) * g]
        part = plan_tokens(q_m, k[:, kv_m], key_valid=valid, mass_reduce=reduce, **comps)  # type: ignore[arg-type]
        assert reduce.calls == 1
        assert torch.equal(part.budget, whole.budget[:, kv_m])
        assert torch.equal(part.selection.keep, whole.selection.keep[:, kv_m])
        assert part.row_kept == whole.row_kept


def test_mass_reduce_errors_name_the_argument() -> None:
    scores = Scores(mass=torch.rand(2, 2, 7), normalized=torch.rand(2, 2, 7))
    with pytest.raises(TypeError, match=r"mass_reduce: expected a callable"):
        plan_scores(scores, mass_reduce=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"mass_reduce: expected .*\(2, 1, 7\).*got \(2, 2, 7\)"):
        plan_scores(scores, mass_reduce=lambda m: m.expand(2, 2, 7))

    def per_head(mass: torch.Tensor, /, *, layer_idx: int | None = None) -> torch.Tensor:
        return torch.ones(mass.shape[0], 2, dtype=torch.int32)

    with pytest.raises(ValueError, match=r"allocator: expected a budget of shape \(B, 1\)"):
        plan_scores(scores, allocator=per_head, mass_reduce=lambda m: m)


def test_all_reduce_mass_over_a_single_process_group() -> None:
    """``AllReduceMass`` with torch.distributed (gloo, one rank): the sum over one process is
    the input itself, and the caller's tensor is not modified."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a default process group already exists")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        scores = Scores(mass=torch.rand(2, 3, 11), normalized=torch.rand(2, 3, 11))
        before = scores.mass.clone()
        reduce = AllReduceMass()
        got = plan_scores(scores, mass_reduce=reduce)
        assert torch.equal(scores.mass, before)
        local = scores.mass.sum(dim=1, keepdim=True)
        assert torch.equal(reduce(local), local)
        want = plan_scores(scores, mass_reduce=lambda m: m)
        assert torch.equal(got.selection.keep, want.selection.keep)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- host reads


@pytest.mark.parametrize(
    "components",
    [
        {},
        {"allocator": FixedRatioAllocator(0.3)},
        {"allocator": PerLayerSchedule([0.5, CumulativeMassAllocator(0.9)]), "layer_idx": 1},
        {"selector": TopKSelector(granularity="layer", sink_tokens=4, recent_window=8)},
        {"scorer": ProbeScorer(denominator="probe_count", max_recent=8, max_random=8)},
    ],
    ids=["defaults", "fixed", "schedule", "layer-sinks-window", "probe-count"],
)
def test_an_unpadded_plan_reads_the_host_once(
    monkeypatch: pytest.MonkeyPatch, components: dict
) -> None:
    """Exactly one device-to-host read per layer plan without padding (the selector's), none
    where the budget is known on the host (a fixed ratio without ``mass_reduce``): a further
    read anywhere on the path (scorer, allocator, selector, mass_reduce, the sparse attention
    that consumes the plan) fails this test."""
    from tests.sparsity.host_reads import HostReads
    from zipvl.sparsity import sparse_attention

    q, k, v = random_qkv(2, 8, 4, 160, 16, seed=2)
    plan_tokens(q, k, **components)  # warm caches (probe positions) outside the count
    reads = HostReads(monkeypatch)
    plan = plan_tokens(q, k, **components)
    known = isinstance(components.get("allocator"), FixedRatioAllocator)
    assert reads.count == (0 if known else 1), reads.where
    assert (plan.selection.nan_flag is not None) == known
    sparse_attention(q, k, v, plan.selection, impl="sdpa")
    assert reads.count == (0 if known else 1), reads.where
    reads.reset()
    plan_tokens(q, k, mass_reduce=lambda m: m, **components)
    assert reads.count == 1, reads.where


def test_a_fixed_ratio_plan_without_a_read_equals_the_plan_with_one() -> None:
    """The read-free plan of a fixed ratio selects exactly what the selector's read path does
    (``plan_scores``), on the same scores."""
    for seed, ratio, sel in ((0, 0.3, TopKSelector()), (1, 0.55, TopKSelector(sink_tokens=4,
                             recent_window=8, granularity="layer"))):  # fmt: skip
        q, k, _ = random_qkv(2, 8, 4, 97, 16, seed=seed)
        comps = {"allocator": FixedRatioAllocator(ratio), "selector": sel}
        fast = plan_tokens(q, k, **comps)
        slow = plan_scores(fast.scores, **comps)
        assert fast.selection.num_kept == slow.selection.num_kept
        assert torch.equal(fast.selection.keep, slow.selection.keep)
        assert torch.equal(fast.budget, slow.budget)


def test_prefill_attention_reads_the_host_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.sparsity.host_reads import HostReads
    from zipvl.config import ZipVLConfig
    from zipvl.models.attention import prefill_attention

    q, k, v = random_qkv(2, 8, 4, 160, 16, seed=3)
    layer = ZipVLConfig(tau=0.9).for_layer(0)
    prefill_attention(q, k, v, layer=layer)  # warm-up
    reads = HostReads(monkeypatch)
    res = prefill_attention(q, k, v, layer=layer)
    assert res.keep is not None, "the sparse branch ran"
    assert reads.count == 1, reads.where


def test_paged_decode_blocks_plan_without_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode step stays free of host syncs, the block plans (plan_row_keep) included."""
    from tests.sparsity.host_reads import HostReads
    from zipvl.cache import PagedCacheLayer
    from zipvl.config import ZipVLConfig
    from zipvl.models import make_cache, zipvl_attention

    cfg = ZipVLConfig(recompress_every=4)
    q, k, v = random_qkv(2, 8, 4, 40, 16, seed=4)
    cache = make_cache(cfg, 1, mass_reduce=lambda m: m)
    zipvl_attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], config=cfg, cache=cache)
    assert isinstance(cache.layer(0), PagedCacheLayer)
    reads = HostReads(monkeypatch)
    for t in range(30, 39):
        sl = slice(t, t + 1)
        zipvl_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], config=cfg, cache=cache)
    assert reads.count == 0, reads.where
    assert cache.layer(0).decode_blocks == 2
