"""The captured plan (``PlanGraph``, ``plan_tokens(impl="graph")``): the same plan as the eager
pipeline (hypothesis, on the CPU with ``capture=False``, which runs the captured function
eagerly; on a GPU, replays against eager calls on fresh inputs), one host read, errors that name
the argument, and the ``"auto"`` rule."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from tests.sparsity.test_plan_pipeline import selectors
from zipvl.config import ZipVLConfig
from zipvl.sparsity import (
    CumulativeMassAllocator,
    FixedRatioAllocator,
    KeyNormScorer,
    PerLayerSchedule,
    PlanGraph,
    ProbeScorer,
    TopKSelector,
    plan_tokens,
    sparse_attention,
)
from zipvl.sparsity.plan_graph import GRAPH_MAX_TOKENS, graph_plan_problem, graph_plannable
from zipvl.testing.inputs import random_qkv
from zipvl.types import Selection

allocators = st.one_of(
    st.floats(0.05, 1.0).map(CumulativeMassAllocator),
    st.floats(0.05, 1.0).map(FixedRatioAllocator),
)
scorers = st.builds(
    ProbeScorer,
    max_recent=st.integers(1, 8),
    max_random=st.integers(0, 8),
    denominator=st.sampled_from(["causal", "probe_count"]),
)


def _same_plan(a, b) -> None:
    assert torch.equal(a.budget, b.budget)
    assert a.selection.num_kept == b.selection.num_kept
    assert torch.equal(a.selection.keep, b.selection.keep)
    assert torch.equal(a.selection.indices(), b.selection.indices())
    torch.testing.assert_close(a.scores.mass, b.scores.mass, rtol=0, atol=0)
    torch.testing.assert_close(a.scores.normalized, b.scores.normalized, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(
        st.integers(1, 2), st.sampled_from([(4, 2), (4, 1), (2, 2)]), st.integers(1, 70)
    ),
    scorer=scorers,
    allocator=allocators,
    selector=selectors,
    seed=st.integers(0, 2**16),
)
def test_the_captured_function_is_the_eager_plan(shape, scorer, allocator, selector, seed) -> None:
    """What the graph replays (run eagerly here) gives exactly ``plan_tokens``'s plan: budget,
    keep mask, kept positions and scores."""
    b, (hq, hkv), s = shape
    q, k, _ = random_qkv(b, hq, hkv, s, 16, seed=seed)
    want = plan_tokens(q, k, scorer=scorer, allocator=allocator, selector=selector, impl="torch")
    got = PlanGraph(scorer, allocator, selector, capture=False)(q, k)
    _same_plan(got, want)


@pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="the fused probe kernels run on CUDA or under TRITON_INTERPRET=1",
)
@pytest.mark.parametrize(
    ("b", "s", "allocator", "selector"),
    [(2, 37, FixedRatioAllocator(0.42), TopKSelector()),
     (1, 70, CumulativeMassAllocator(0.9), TopKSelector(sink_tokens=2, recent_window=3)),
     (1, 50, FixedRatioAllocator(0.3), TopKSelector(granularity="layer"))],
)  # fmt: skip
def test_the_fused_scorer_writes_the_plan_in_place(b, s, allocator, selector) -> None:
    """With the fused probe kernels the captured function writes the scores and the selection
    straight into the (uninitialised) output buffer: the same plan as ``plan_tokens``."""
    from zipvl.sparsity.plan_graph import _layout, _views

    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = ProbeScorer(max_recent=6, max_random=6, impl="triton")
    q, k, _ = random_qkv(b, 4, 2, s, 16, seed=s, device=device)
    planner = PlanGraph(scorer, allocator, selector, capture=False)
    assert planner._fused(q)
    want = plan_tokens(q, k, scorer=scorer, allocator=allocator, selector=selector, impl="torch")
    _same_plan(planner(q, k), want)
    # every byte the plan reads back is written: a buffer of 0xFF (NaN scores, index -1, every
    # token kept) gives the same plan
    layout, nbytes = _layout(b, 2, s)
    views = _views(torch.full((nbytes,), 255, dtype=torch.uint8, device=device), layout)
    planner._static(q, k, None, views)
    _same_plan(planner._result(views, s, None), want)
    # the offset estimator through the kernels (its correction written into the buffer): the
    # same plan
    offset = ProbeScorer.estimator_preset(8, impl="triton")
    planner = PlanGraph(offset, allocator, selector, capture=False)
    assert planner._fused(q)
    want = plan_tokens(q, k, scorer=offset, allocator=allocator, selector=selector, impl="torch")
    _same_plan(planner(q, k), want)


def test_the_plan_feeds_sparse_attention_with_its_positions() -> None:
    q, k, v = random_qkv(1, 4, 2, 96, 16, seed=4)
    comps = {
        "scorer": ProbeScorer(),
        "allocator": FixedRatioAllocator(0.4),
        "selector": TopKSelector(),
    }
    plan = PlanGraph(**comps, capture=False)(q, k)
    eager = plan_tokens(q, k, **comps, impl="torch")
    assert plan.selection._indices is not None  # attached, not recomputed
    torch.testing.assert_close(
        sparse_attention(q, k, v, plan.selection, impl="sdpa"),
        sparse_attention(q, k, v, eager.selection, impl="sdpa"),
        rtol=0, atol=0,
    )  # fmt: skip


def test_the_captured_plan_reads_the_host_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.sparsity.host_reads import HostReads

    q, k, _ = random_qkv(2, 8, 4, 160, 16, seed=2)
    planner = PlanGraph(ProbeScorer(), CumulativeMassAllocator(0.9), TopKSelector(), capture=False)
    planner(q, k)  # warm caches (probe positions) outside the count
    reads = HostReads(monkeypatch)
    planner(q, k)
    assert reads.count == 1, reads.where


@pytest.mark.parametrize(
    "allocator",
    [FixedRatioAllocator(0.4), PerLayerSchedule([0.3, CumulativeMassAllocator(0.9)])],
    ids=["fixed", "schedule"],
)
def test_a_budget_known_on_the_host_plans_without_a_read(monkeypatch, allocator) -> None:
    """A fixed ratio's plan reads nothing back, and is the same plan as the eager pipeline;
    the schedule's adaptive layer (1) still reads once."""
    from tests.sparsity.host_reads import HostReads

    q, k, v = random_qkv(2, 8, 4, 160, 16, seed=2)
    comps = {"scorer": ProbeScorer(), "allocator": allocator, "selector": TopKSelector()}
    planner = PlanGraph(**comps, capture=False)
    planner(q, k, layer_idx=0)  # warm caches (probe positions) outside the count
    reads = HostReads(monkeypatch)
    got = planner(q, k, layer_idx=0)
    assert reads.count == 0, reads.where
    out = sparse_attention(q, k, v, got.selection, impl="sdpa")
    assert reads.count == 0, reads.where  # the attention does not read the flag either
    monkeypatch.undo()
    want = plan_tokens(q, k, **comps, layer_idx=0, impl="torch")
    _same_plan(got, want)
    assert got.selection.nan_flag is not None and not got.selection.nan_flag.item()
    torch.testing.assert_close(
        out, sparse_attention(q, k, v, want.selection, impl="sdpa"), rtol=0, atol=0
    )
    if isinstance(allocator, PerLayerSchedule):
        reads = HostReads(monkeypatch)
        adaptive = planner(q, k, layer_idx=1)
        assert reads.count == 1, reads.where
        assert adaptive.selection.nan_flag is None


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    s=st.integers(1, 40),
    ratio=st.one_of(st.sampled_from([1e-3, 1.0]), st.floats(0.01, 1.0)),
    selector=selectors,
    seed=st.integers(0, 2**16),
)
def test_a_read_free_plan_keeps_the_host_count_in_every_row(b, s, ratio, selector, seed) -> None:
    """What the device selected (the select path of the captured plan, run eagerly here) keeps
    exactly the count the host derived without reading: every row, its indices ascending and
    inside the mask, for sinks / recent windows, per-layer selection, budgets below the forced
    tokens and ratio 1, and prompts shorter than the forced tokens."""
    q, k, _ = random_qkv(b, 4, 2, s, 16, seed=seed)
    plan = PlanGraph(ProbeScorer(), FixedRatioAllocator(ratio), selector, capture=False)(q, k)
    sel = plan.selection
    assert sel.nan_flag is not None  # read-free: the flag travels instead of a read
    n = sel.num_kept
    assert n == min(max(math.ceil(round(ratio * s, 9)), selector.num_forced(s), 1), s)
    assert (sel.keep.sum(-1) == n).all()
    idx = sel.indices()
    assert idx.shape == (b, 2, n) and (idx.diff(dim=-1) > 0).all()
    assert sel.keep.gather(-1, idx).all()
    forced = selector.forced_mask(s)
    assert sel.keep[..., forced].all()


@pytest.mark.parametrize(
    ("impl", "unkept"),
    [("sdpa", "zero"), ("reference", "zero"), ("flex", "zero"), ("sdpa", "attend")],
)
def test_nan_scores_of_a_plan_without_a_read_turn_the_output_into_nan(impl, unkept) -> None:
    """Where the adaptive plan raises on NaN scores, a fixed ratio's plan (no read) hands the
    flag to ``sparse_attention``, which writes NaN everywhere, as dense attention would give NaN
    (here only the unkept key 0 is NaN, so the output would otherwise look finite)."""
    q, k, v = random_qkv(1, 4, 2, 48, 16, seed=1)
    k[0, 0, 5, 0] = float("nan")
    plan = PlanGraph(ProbeScorer(), FixedRatioAllocator(0.5), TopKSelector(), capture=False)(q, k)
    assert plan.selection.nan_flag is not None and plan.selection.nan_flag.item() == 1
    out = sparse_attention(q, k, v, plan.selection, impl=impl, unkept=unkept, compile=False)
    assert out.isnan().all()
    qc, kc, vc = random_qkv(1, 4, 2, 48, 16, seed=1)
    clean = PlanGraph(ProbeScorer(), FixedRatioAllocator(0.5), TopKSelector(), capture=False)
    sel = clean(qc, kc).selection
    assert sel.nan_flag is not None and sel.nan_flag.item() == 0
    clean_out = sparse_attention(qc, kc, vc, sel, impl=impl, unkept=unkept, compile=False)
    assert clean_out.isfinite().all()


def test_errors_name_the_argument() -> None:
    q, k, _ = random_qkv(1, 4, 2, 32, 16, seed=0)
    with pytest.raises(ValueError, match=r"impl: 'graph' cannot run: q: .*CUDA"):
        plan_tokens(q, k, impl="graph")
    valid = torch.ones(1, 32, dtype=torch.bool)
    valid[0, :4] = False
    with pytest.raises(ValueError, match=r"impl: 'graph' cannot run: key_valid"):
        plan_tokens(q, k, key_valid=valid, impl="graph")
    with pytest.raises(ValueError, match=r"plan_impl: expected one of"):
        ZipVLConfig(plan_impl="cuda")  # type: ignore[arg-type]

    class NoMask:
        def __call__(self, scores, budget):
            return TopKSelector()(scores, budget)

    with pytest.raises(ValueError, match=r"selector: .*keep_mask"):
        PlanGraph(ProbeScorer(), CumulativeMassAllocator(), NoMask())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_shapes"):
        PlanGraph(ProbeScorer(), CumulativeMassAllocator(), TopKSelector(), max_shapes=0)
    with pytest.raises(ValueError, match=r"q: PlanGraph plans a prefill"):
        PlanGraph(ProbeScorer(), CumulativeMassAllocator(), TopKSelector(), capture=False)(
            q[:, :, :8], k
        )
    sel = Selection(keep=torch.ones(1, 2, 8, dtype=torch.bool), num_kept=8)
    with pytest.raises(ValueError, match=r"indices: expected shape"):
        sel.attach_indices(torch.zeros(1, 2, 7, dtype=torch.int64))


def test_non_finite_inputs_raise_as_the_eager_plan_does() -> None:
    q, k, _ = random_qkv(1, 4, 2, 48, 16, seed=1)
    k[0, 0, 5, 0] = float("nan")
    comps = {
        "scorer": ProbeScorer(),
        "allocator": CumulativeMassAllocator(0.9),
        "selector": TopKSelector(),
    }
    with pytest.raises(ValueError, match=r"budget: got -1") as eager:
        plan_tokens(q, k, **comps, impl="torch")
    with pytest.raises(ValueError, match=r"budget: got -1") as graph:
        PlanGraph(**comps, capture=False)(q, k)
    assert str(eager.value) == str(graph.value)


def test_the_auto_rule() -> None:
    q, _, _ = random_qkv(1, 4, 2, 32, 16, seed=0)
    comps = (ProbeScorer(), CumulativeMassAllocator(), TopKSelector())
    kw = {"padded": False, "mass_reduce": None, "explicit": False}
    assert "CUDA" in str(graph_plan_problem(q, q[:, :2], *comps, **kw))
    assert graph_plannable(*comps) is None
    assert "scorer" in str(graph_plannable(KeyNormScorer(), comps[1], comps[2]))
    # both estimators run fixed-shape on the device (the offset one through the fused kernels)
    assert graph_plannable(ProbeScorer.estimator_preset(32), *comps[1:]) is None
    # plan_tokens' default is "auto": eager here, and the same plan as "torch"
    q, k, _ = random_qkv(1, 4, 2, 64, 16, seed=3)
    _same_plan(plan_tokens(q, k), plan_tokens(q, k, impl="torch"))
    assert GRAPH_MAX_TOKENS >= 32768


# -- on a GPU: capture and replay ----------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize(
    ("allocator", "dtype", "s"),
    [(CumulativeMassAllocator(0.975), torch.bfloat16, 4096),
     (FixedRatioAllocator(0.42), torch.bfloat16, 8192),
     (CumulativeMassAllocator(0.9), torch.float16, 1000),
     (FixedRatioAllocator(0.42), torch.bfloat16, 20000),
     (CumulativeMassAllocator(0.975), torch.bfloat16, 16384)],
    ids=["tau-bf16-4k", "fixed-bf16-8k", "tau-fp16-1000", "fixed-bf16-20k", "tau-bf16-16k"],
)  # fmt: skip
def test_replays_equal_eager_plans_on_fresh_inputs(allocator, dtype, s) -> None:
    """Every call draws new inputs; from the second call on the plan is a replay and must equal
    the eager plan of the same inputs (a replay that reused stale inputs or outputs fails)."""
    comps = {"scorer": ProbeScorer(), "allocator": allocator, "selector": TopKSelector()}
    planner = PlanGraph(**comps)
    for seed in range(4):
        q, k, _ = random_qkv(1, 28, 4, s, 128, dtype=dtype, device="cuda", seed=seed)
        got = planner(q, k)
        want = plan_tokens(q, k, **comps, impl="torch")
        _same_plan(got, want)
    assert planner.captures == 1 and planner.replays == 3


@cuda
@pytest.mark.parametrize("s", [8192, 20000])
def test_the_offset_estimator_replays_as_its_eager_plan(s) -> None:
    """The better budget estimator (fused kernels, then the correction in PyTorch) is captured
    by "auto" and its replays equal eager plans on fresh inputs."""
    comps = {"scorer": ProbeScorer.estimator_preset(128),
             "allocator": CumulativeMassAllocator(0.9), "selector": TopKSelector()}  # fmt: skip
    q, _, _ = random_qkv(1, 28, 4, 64, 128, dtype=torch.bfloat16, device="cuda", seed=0)
    assert comps["scorer"].impl_for(q).value == "triton"
    planner = PlanGraph(**comps)
    for seed in range(3):
        q, k, _ = random_qkv(1, 28, 4, s, 128, dtype=torch.bfloat16, device="cuda", seed=seed)
        _same_plan(planner(q, k), plan_tokens(q, k, **comps, impl="torch"))
    assert planner.captures == 1 and planner.replays == 2


@cuda
def test_a_replay_reads_its_inputs_where_they_are() -> None:
    """The fused scorer's graph reads q and k by address (no static copies): replays on fresh
    inputs at new addresses (the old ones kept alive, so no address is reused) equal eager
    plans, for contiguous inputs and for views of one fused projection (other strides: a graph
    of their own); an input that is not 16-byte aligned is copied into static buffers."""
    comps = {"scorer": ProbeScorer(), "allocator": FixedRatioAllocator(0.42),
             "selector": TopKSelector()}  # fmt: skip
    planner = PlanGraph(**comps)
    s, d, alive = 4096, 128, []

    def views(seed: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device="cuda").manual_seed(seed)
        if kind == "fused":  # q and k as head ranges of one (B, Hq + 2 Hkv, S, D) tensor
            qkv = torch.randn(1, 36, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
            alive.append(qkv)
            return qkv[:, :28], qkv[:, 28:32]
        q, k, _ = random_qkv(1, 28, 4, s, d, dtype=torch.bfloat16, device="cuda", seed=seed)
        if kind == "unaligned":  # k two bytes past a 16-byte boundary
            flat = torch.empty(k.numel() + 1, device="cuda", dtype=k.dtype)
            k = flat[1:].view(k.shape).copy_(k)
        alive.append((q, k))
        return q, k

    for kind in ("contiguous", "fused", "unaligned"):
        for seed in range(3):  # eager, capture, replay
            q, k = views(100 * len(alive) + seed, kind)
            _same_plan(planner(q, k), plan_tokens(q, k, **comps, impl="torch"))
    entries = [e[None] for e in planner._entries.values()]
    assert len(entries) == 3 and planner.replays == 6  # the capturing call replays too
    assert [e.addr is not None and e.q is None for e in entries] == [True, True, False]


@cuda
def test_a_replay_outlives_the_scorers_cache_of_probe_rows() -> None:
    """A graph bakes the address of the probe rows its kernels index q with; the scorer's cache
    of them is bounded and shared by every length. Emptied (its rows freed) and its memory
    handed out again with other row numbers, replays still equal eager plans."""
    from zipvl.sparsity import scorers

    comps = {"scorer": ProbeScorer(), "allocator": FixedRatioAllocator(0.42),
             "selector": TopKSelector()}  # fmt: skip
    planner = PlanGraph(**comps)
    s, alive = 4096, []
    for seed in range(4):
        q, k, _ = random_qkv(1, 28, 4, s, 128, dtype=torch.bfloat16, device="cuda", seed=seed)
        alive.append((q, k))
        if seed == 2:  # after the capture
            m = comps["scorer"].probe_rows(s, device="cuda").numel()
            scorers._probe_positions_cached.cache_clear()
            torch.cuda.synchronize()
            alive += [torch.full((m,), 7, dtype=torch.int64, device="cuda") for _ in range(256)]
        _same_plan(planner(q, k), plan_tokens(q, k, **comps, impl="torch"))
    assert planner.captures == 1 and planner.replays == 3


@cuda
def test_a_replay_syncs_once_and_shapes_share_buffers() -> None:
    comps = {
        "scorer": ProbeScorer(),
        "allocator": CumulativeMassAllocator(0.9),
        "selector": TopKSelector(),
    }
    a, b = PlanGraph(**comps), PlanGraph(**comps)
    q, k, _ = random_qkv(1, 28, 4, 2048, 128, dtype=torch.bfloat16, device="cuda", seed=0)
    for planner in (a, b):
        planner(q, k)
        planner(q, k)  # captured
    assert a._entries and b._entries
    # one shape, one graph shared by every layer (key None) in each planner
    ea, eb = (next(iter(p._entries.values()))[None] for p in (a, b))
    assert ea.packed.data_ptr() == eb.packed.data_ptr()
    assert ea.q is None and eb.q is None  # read by address: no static copies at all
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as record:
            a(q, k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in record if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


@cuda
@pytest.mark.parametrize("s", [2048, 16384])
def test_a_fixed_ratio_layer_never_syncs(s) -> None:
    """The plan of a fixed ratio (captured, replayed) and the sparse attention on it make no
    host synchronisation at all."""
    import warnings

    comps = {"scorer": ProbeScorer(), "allocator": FixedRatioAllocator(0.42),
             "selector": TopKSelector()}  # fmt: skip
    planner = PlanGraph(**comps)
    q, k, v = random_qkv(1, 28, 4, s, 128, dtype=torch.bfloat16, device="cuda", seed=0)
    for _ in range(2):  # eager, captured
        sparse_attention(q, k, v, planner(q, k).selection, impl="auto")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out = sparse_attention(q, k, v, planner(q, k).selection, impl="auto")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in record if "synchroniz" in str(w.message)]
    assert syncs == [] and planner.replays == 2
    assert out.isfinite().all()


@cuda
def test_prefill_attention_with_a_captured_plan_equals_eager() -> None:
    from zipvl.models.attention import prefill_attention

    q, k, v = random_qkv(1, 28, 4, 4096, 128, dtype=torch.bfloat16, device="cuda", seed=5)
    eager = ZipVLConfig(tau=0.9, plan_impl="torch").for_layer(0)
    graph = ZipVLConfig(tau=0.9, plan_impl="graph").for_layer(0)
    want = prefill_attention(q, k, v, layer=eager)
    for _ in range(3):  # eager, capture, replay
        got = prefill_attention(q, k, v, layer=graph)
        torch.testing.assert_close(got.output, want.output, rtol=0, atol=0)
        assert torch.equal(got.keep, want.keep)


# -- the capture bookkeeping, on the CPU: inputs that say they are CUDA tensors, and a recorder
# that stands in for the CUDA graph (it replays the captured function eagerly) -------------------


class _LooksCuda(torch.Tensor):
    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


class _Replay:
    def __init__(self, fn) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()


def _stand_in_recorder(monkeypatch: pytest.MonkeyPatch) -> None:
    from zipvl.sparsity import plan_graph, selectors

    # CPU tensors that say they are CUDA would send the selection to the select kernels, which
    # only run on them under the interpreter: the sort path (the same selection) instead
    monkeypatch.setattr(selectors, "SELECT_TRITON_MAX_TOKENS", 0)

    def record(self, entry, layer_idx, views, q, k):
        return _Replay(lambda: self._static(entry.q, entry.k, layer_idx, views))

    monkeypatch.setattr(plan_graph.PlanGraph, "_record", record)


def _qk(s: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, _ = random_qkv(1, 4, 2, s, 16, seed=seed)
    return q.as_subclass(_LooksCuda), k.as_subclass(_LooksCuda)


def _forward(planner: PlanGraph, q, k, layers: int) -> None:
    for layer in range(layers):
        planner(q, k, layer_idx=layer)


def test_a_model_captures_in_its_second_forward_and_replays_after(monkeypatch) -> None:
    _stand_in_recorder(monkeypatch)
    comps = (ProbeScorer(impl="torch"), CumulativeMassAllocator(0.9), TopKSelector())
    planner = PlanGraph(*comps)
    q, k = _qk(64)
    _forward(planner, q, k, 4)
    assert (planner.captures, planner.replays) == (0, 0)  # a length seen once: all eager
    _forward(planner, q, k, 4)
    # one shared graph, captured by layer 0 (whose plan is then a replay too)
    assert (planner.captures, planner.replays) == (1, 4)
    _forward(planner, q, k, 4)
    assert (planner.captures, planner.replays) == (1, 8)
    fresh_q, fresh_k = _qk(64, seed=9)  # the replay plans the new inputs, not the captured ones
    plain = (fresh_q.as_subclass(torch.Tensor), fresh_k.as_subclass(torch.Tensor))
    want = plan_tokens(*plain, scorer=comps[0], allocator=comps[1], selector=comps[2],
                       impl="torch")  # fmt: skip
    _same_plan(planner(fresh_q, fresh_k, layer_idx=0), want)


@pytest.mark.skipif(
    __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="the by-address kernels run on CPU tensors under TRITON_INTERPRET=1 only",
)
@pytest.mark.parametrize(
    "scorer",
    [ProbeScorer(max_recent=6, max_random=6, impl="triton"),
     ProbeScorer.estimator_preset(8, impl="triton")],
    ids=["sum", "offset"],
)  # fmt: skip
def test_a_stand_in_replay_reads_fresh_inputs_by_address(monkeypatch, scorer) -> None:
    """The by-address path on the CPU (the kernels under the interpreter, a recorder that
    replays the captured function with the capture call's tensors for shapes and strides and
    the address table for data): replays on fresh batch-2 inputs at new addresses (the old
    ones kept alive) equal eager plans; a replay that read the capture call's inputs would not.
    (The stand-in re-runs the Python, so the lifetime of what a real graph bakes is tested on
    CUDA below.)"""
    from zipvl.sparsity import plan_graph

    def record(self, entry, layer_idx, views, q, k):
        assert entry.addr is not None and entry.q is None  # read by address: no copies
        return _Replay(lambda: self._static(q, k, layer_idx, views, entry.addr))

    monkeypatch.setattr(plan_graph.PlanGraph, "_record", record)
    comps = (scorer, FixedRatioAllocator(0.42), TopKSelector(sink_tokens=2))
    planner = PlanGraph(*comps)
    alive = []
    for seed in range(5):
        q, k, _ = random_qkv(2, 4, 2, 48, 16, seed=seed)
        alive.append((q, k))
        got = planner(q.as_subclass(_LooksCuda), k.as_subclass(_LooksCuda))
        want = plan_tokens(q, k, scorer=scorer, allocator=comps[1], selector=comps[2],
                           impl="torch")  # fmt: skip
        _same_plan(got, want)
    assert (planner.captures, planner.replays) == (1, 4)


def test_per_layer_allocators_capture_once_per_layer(monkeypatch) -> None:
    from zipvl.sparsity import PerLayerSchedule

    _stand_in_recorder(monkeypatch)
    planner = PlanGraph(
        ProbeScorer(impl="torch"), PerLayerSchedule([0.3, 0.5, 0.7]), TopKSelector()
    )
    q, k = _qk(64)
    counts = []
    for _ in range(4):
        _forward(planner, q, k, 3)
        counts.append(planner.captures)
    assert counts == [0, 3, 3, 3]  # no re-capture: every layer keeps its graph


def test_recurring_lengths_do_not_recapture(monkeypatch) -> None:
    _stand_in_recorder(monkeypatch)
    planner = PlanGraph(ProbeScorer(impl="torch"), FixedRatioAllocator(0.4), TopKSelector(),
                        max_shapes=3)  # fmt: skip
    inputs = [_qk(s) for s in (48, 64, 80)]
    counts = []
    for _ in range(4):
        for q, k in inputs:
            _forward(planner, q, k, 2)
        counts.append(planner.captures)
    assert counts == [0, 3, 3, 3]
    q, k = _qk(96)  # a fourth length evicts the least recently used, which must earn it again
    _forward(planner, q, k, 2)
    _forward(planner, q, k, 2)
    assert planner.captures == 4 and len(planner._entries) == 3
    q, k = inputs[0]
    _forward(planner, q, k, 2)
    assert planner.captures == 4  # evicted: eager again, not re-captured at once


def test_a_capture_under_inference_mode_serves_calls_outside_it(monkeypatch) -> None:
    _stand_in_recorder(monkeypatch)
    planner = PlanGraph(ProbeScorer(impl="torch"), FixedRatioAllocator(0.4), TopKSelector(),
                        capture_after=0)  # fmt: skip
    q, k = _qk(40)
    with torch.inference_mode():
        planner(q, k)
    with torch.no_grad():
        planner(q, k)  # writes into the static buffers: they must not be inference tensors
    assert (planner.captures, planner.replays) == (1, 2)  # the capturing call replays too


def test_a_failed_capture_keeps_the_other_graphs(monkeypatch) -> None:
    from zipvl.sparsity import plan_graph

    _stand_in_recorder(monkeypatch)
    planner = PlanGraph(ProbeScorer(impl="torch"), FixedRatioAllocator(0.4), TopKSelector(),
                        capture_after=0, max_shapes=1)  # fmt: skip
    q, k = _qk(40)
    planner(q, k)
    assert len(planner._entries) == 1

    def fail(self, entry, layer_idx, views, q, k):
        raise ValueError("plan_impl: 'graph' could not capture")

    monkeypatch.setattr(plan_graph.PlanGraph, "_record", fail)
    q2, k2 = _qk(48)
    with pytest.raises(ValueError, match="could not capture"):
        planner(q2, k2)
    assert len(planner._entries) == 1  # the good graph is still there
    planner(q, k)
    assert planner.replays == 2


def test_a_custom_selectors_unequal_rows_raise() -> None:
    class Ragged(TopKSelector):
        def keep_mask(self, scores, budget):
            keep = super().keep_mask(scores, budget)
            keep[0, 0, :] = True  # one row keeps everything
            return keep

    q, k, _ = random_qkv(1, 4, 2, 48, 16, seed=2)
    planner = PlanGraph(ProbeScorer(), FixedRatioAllocator(0.4), Ragged(), capture=False)
    with pytest.raises(ValueError, match=r"same number of kept tokens in every \(b, h\) row"):
        planner(q, k)


def test_chunked_prefill_plans_eagerly_under_auto() -> None:
    q, k, _ = random_qkv(1, 4, 2, 64, 16, seed=1)
    comps = (ProbeScorer(), CumulativeMassAllocator(), TopKSelector())
    kw = {"padded": False, "mass_reduce": None, "explicit": False}
    reason = graph_plan_problem(q[:, :, -16:], k, *comps, **kw)
    assert reason is not None and "Sq = 16" in reason
    plan = plan_tokens(q[:, :, -16:], k)  # "auto" on a chunk: the eager plan
    assert plan.selection.num_kept > 0
    assert graph_plannable(ProbeScorer(), type("Sub", (FixedRatioAllocator,), {})(0.4),
                           TopKSelector()) is not None  # subclasses are not trusted  # fmt: skip


def test_equal_components_share_one_planner() -> None:
    from zipvl.sparsity.plan_graph import graph_planner

    a = graph_planner(ProbeScorer(), FixedRatioAllocator(0.4), TopKSelector())
    b = graph_planner(ProbeScorer(), FixedRatioAllocator(0.4), TopKSelector())
    c = graph_planner(ProbeScorer(), FixedRatioAllocator(0.5), TopKSelector())
    assert a is b and a is not c

    class Unhashable(TopKSelector):
        __hash__ = None  # type: ignore[assignment]

    sel = Unhashable()
    d = graph_planner(ProbeScorer(), FixedRatioAllocator(0.4), sel)
    assert d is graph_planner(ProbeScorer(), FixedRatioAllocator(0.4), sel)  # by identity
    assert d is not graph_planner(ProbeScorer(), FixedRatioAllocator(0.4), Unhashable())
