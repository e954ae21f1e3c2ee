"""TopKSelector: exact top set, forced tokens, counts, granularity, validation (hypothesis)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from zipvl.sparsity import FixedRatioAllocator, ProbeScorer, Selection, TopKSelector, plan_tokens
from zipvl.testing.inputs import random_qkv, random_scores
from zipvl.types import NONFINITE_MASS_BUDGET, Selector

FIXTURE_OK = settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

selectors = st.builds(
    TopKSelector,
    granularity=st.sampled_from(["kv_head", "layer"]),
    keep_last=st.booleans(),
    sink_tokens=st.integers(0, 6),
    recent_window=st.integers(0, 6),
)


def _expected_keep(sel: TopKSelector, scores: torch.Tensor, p: int) -> torch.Tensor:
    """Hand-written rule: forced tokens, then the best others by (score desc, position asc)."""
    b, h, s = scores.shape
    forced = set(range(min(sel.sink_tokens, s)))
    recent = max(sel.recent_window, 1 if sel.keep_last else 0)
    forced |= set(range(max(0, s - recent), s))
    sc = scores.double()
    if sel.granularity == "layer":
        sc = sc.sum(dim=1, keepdim=True).expand(b, h, s)
    keep = torch.zeros(b, h, s, dtype=torch.bool)
    n = min(s, max(p, len(forced)))
    for bi in range(b):
        for hi in range(h):
            rest = sorted(
                (j for j in range(s) if j not in forced), key=lambda j: (-sc[bi, hi, j].item(), j)
            )
            chosen = list(forced) + rest[: n - len(forced)]
            keep[bi, hi, chosen] = True
    return keep


@FIXTURE_OK
@given(
    sel=selectors,
    s=st.integers(1, 40),
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
    ties=st.booleans(),
)
def test_kept_set_is_forced_plus_top_of_rest(
    device: str,
    sel: TopKSelector,
    s: int,
    b: int,
    h: int,
    frac: float,
    seed: int,
    ties: bool,
) -> None:
    scores = random_scores(b, h, s, seed=seed, ties=ties, device=device)
    p = round(frac * s)
    selection = sel(scores, torch.full((b, h), p, dtype=torch.int32, device=device))
    assert isinstance(selection, Selection)
    assert selection.keep.shape == (b, h, s) and selection.keep.dtype == torch.bool
    assert selection.keep.device == scores.device
    expected = _expected_keep(sel, scores.cpu(), p)
    assert torch.equal(selection.keep.cpu(), expected)
    # every row keeps exactly max(p, |forced|) tokens, and num_kept says so
    assert (selection.keep.sum(-1) == selection.num_kept).all()
    assert selection.num_kept == min(s, max(p, sel.num_forced(s)))
    idx = selection.indices()
    assert idx.shape == (b, h, selection.num_kept)
    assert (idx.diff(dim=-1) > 0).all(), "indices ascend"


@given(sel=selectors, s=st.integers(1, 40), p=st.integers(0, 40))
def test_forced_tokens_always_kept(sel: TopKSelector, s: int, p: int) -> None:
    p = min(p, s)
    # adversarial scores: forced positions score lowest, +inf elsewhere
    forced = sel.forced_mask(s)
    scores = torch.where(forced, -torch.inf, torch.inf).expand(2, 2, s).contiguous()
    selection = sel(scores, torch.full((2, 2), p, dtype=torch.int32))
    assert selection.keep[..., forced].all()
    assert int(forced.sum()) == sel.num_forced(s)
    recent = max(sel.recent_window, 1 if sel.keep_last else 0)
    pos = torch.arange(s)
    assert torch.equal(forced, (pos < sel.sink_tokens) | (pos >= s - recent))


def test_a_mask_first_built_under_inference_mode_serves_autograd() -> None:
    """A selection under inference_mode leaves nothing behind that a later selection on
    scores that require grad would trip over."""
    sel = TopKSelector(sink_tokens=3, recent_window=2)
    with torch.inference_mode():
        sel.keep_mask(torch.rand(1, 2, 37), torch.full((1, 2), 5))
    scores = torch.rand(1, 2, 37, requires_grad=True)
    keep = sel.keep_mask(scores, torch.full((1, 2), 5))
    assert (keep.sum(-1) == 5).all()
    (scores * sel._ranked(scores).isinf()).sum().backward()  # autograd through the mask
    assert scores.grad is not None


def test_layer_granularity_shares_one_set_per_batch_row() -> None:
    scores = random_scores(2, 3, 30, seed=3)
    sel = TopKSelector(granularity="layer", keep_last=False)(
        scores, torch.full((2, 3), 7, dtype=torch.int32)
    )
    assert (sel.keep == sel.keep[:, :1]).all()
    assert not torch.equal(sel.keep[0], sel.keep[1])
    top = scores.sum(1).topk(7, dim=-1).indices.sort(-1).values  # (B, 7)
    assert torch.equal(sel.indices()[:, 0], top)


def test_nan_scores_rank_last_in_keep_mask_and_inf_below_forced() -> None:
    scores = torch.tensor([[[float("nan"), 1.0, float("inf"), 0.5, -1.0]]])
    keep = TopKSelector(keep_last=True).keep_mask(scores, torch.tensor([[3]], dtype=torch.int32))
    assert keep[0, 0].tolist() == [False, True, True, False, True]
    # +inf alone is a legitimate score (SnapKV's window): accepted by __call__
    sel = TopKSelector()(scores.nan_to_num(nan=0.0), torch.tensor([[3]], dtype=torch.int32))
    assert sel.keep[0, 0].tolist() == [False, True, True, False, True]


def test_call_rejects_nan_scores_and_the_nonfinite_mass_sentinel() -> None:
    scores = torch.tensor([[[float("nan"), 1.0, float("inf"), 0.5, -1.0]]])
    with pytest.raises(ValueError, match="scores: expected no NaN"):
        TopKSelector()(scores, torch.tensor([[3]], dtype=torch.int32))
    sentinel = torch.full((1, 1), NONFINITE_MASS_BUDGET, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"budget: got -1, .*NaN or inf in the attention mass"):
        TopKSelector()(scores.nan_to_num(nan=0.0), sentinel)


def test_nonfinite_mass_raises_through_the_pipeline_instead_of_budget_one() -> None:
    # before: CumulativeMassAllocator counted NaN comparisons as "< tau" and gave p = min_keep
    q, k, _ = random_qkv(1, 2, 1, 16, 8)
    k[0, 0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf in the attention mass"):
        plan_tokens(q, k, scorer=ProbeScorer(impl="torch"))
    # a value-blind allocator passes the budget on; the selector catches the NaN scores on
    # its read, and a plan that knows the budget on the host (no read) carries them as a flag
    # that turns the sparse attention's output into NaN (tests/sparsity/test_plan_graph.py)
    budget = torch.full((1, 1), 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="scores: expected no NaN"):
        TopKSelector()(ProbeScorer(impl="torch")(q, k).normalized, budget)
    plan = plan_tokens(q, k, scorer=ProbeScorer(impl="torch"), allocator=FixedRatioAllocator(0.5))
    assert plan.selection.nan_flag is not None and plan.selection.nan_flag.item() == 1


def test_selector_result_is_checked_by_construction() -> None:
    scores = random_scores(2, 3, 20, seed=4)
    sel = TopKSelector(granularity="layer", sink_tokens=2)(
        scores, torch.full((2, 3), 6, dtype=torch.int32)
    )
    assert (sel.keep.sum(-1) == sel.num_kept).all()
    assert sel.check_counts() is sel


@FIXTURE_OK
@given(
    sel=selectors,
    s=st.integers(1, 48),
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    k=st.integers(-3, 52),
    seed=st.integers(0, 10_000),
    ties=st.booleans(),
    specials=st.booleans(),
)
def test_threshold_select_equals_the_sorted_reference(
    device: str,
    sel: TopKSelector,
    s: int,
    b: int,
    h: int,
    k: int,
    seed: int,
    ties: bool,
    specials: bool,
) -> None:
    """keep_mask_k (threshold select, no sort) == keep_mask (stable sort of every row), for
    budgets on both sides of Skv / 2 (the two topk directions), out of range, ties, NaN, inf."""
    scores = random_scores(b, h, s, seed=seed, ties=ties, device=device)
    if specials:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randint(0, 4, (b, h, s), generator=g).to(device)
        special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0], device=device)
        scores = torch.where(pick < 3, special[pick], scores)
    budget = torch.full((b, h), k, dtype=torch.int64, device=device)
    fast = sel.keep_mask_k(scores, k)
    assert torch.equal(fast, sel.keep_mask(scores, budget))
    assert (fast.sum(-1) == min(max(k, sel.num_forced(s)), s)).all()


@FIXTURE_OK
@given(s=st.integers(1, 40), p_frac=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_indices_are_the_kept_positions_in_order(device: str, s: int, p_frac: float,
                                                 seed: int) -> None:  # fmt: skip
    """Selection.indices (a running-count compaction) == the nonzero positions of every row."""
    g = torch.Generator().manual_seed(seed)
    p = round(p_frac * s)
    keep = torch.zeros(2, 3, s, dtype=torch.bool)
    for r in range(6):
        keep.view(6, s)[r, torch.randperm(s, generator=g)[:p]] = True
    sel = Selection(keep=keep.to(device), num_kept=p)
    ref = torch.stack([row.nonzero().flatten() for row in keep.view(6, s)]).view(2, 3, p)
    assert torch.equal(sel.indices().cpu(), ref)


def test_keep_mask_is_sync_free_and_matches_call() -> None:
    scores = random_scores(2, 2, 17, seed=1)
    budget = torch.full((2, 2), 5, dtype=torch.int32)
    s = TopKSelector(sink_tokens=1)
    assert torch.equal(s.keep_mask(scores, budget), s(scores, budget).keep)
    assert isinstance(s, Selector)


def test_budget_zero_keeps_only_forced_and_full_keeps_all() -> None:
    scores = random_scores(1, 2, 9)
    none = TopKSelector(keep_last=False)(scores, torch.zeros(1, 2, dtype=torch.int32))
    assert none.num_kept == 0 and not none.keep.any()
    assert none.indices().shape == (1, 2, 0)
    last = TopKSelector()(scores, torch.zeros(1, 2, dtype=torch.int32))
    assert last.num_kept == 1 and last.keep[..., -1].all()
    full = TopKSelector()(scores, torch.full((1, 2), 9, dtype=torch.int32))
    assert full.keep.all() and full.ratio == 1.0


def test_selector_validation_messages() -> None:
    scores = random_scores(1, 2, 8)
    with pytest.raises(ValueError, match="granularity: expected one of"):
        TopKSelector(granularity="head")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sink_tokens: expected an int >= 0, got -1"):
        TopKSelector(sink_tokens=-1)
    with pytest.raises(TypeError, match="recent_window: expected an int, got float"):
        TopKSelector(recent_window=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="budget: expected shape"):
        TopKSelector()(scores, torch.full((1, 3), 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="budget: expected one value shared"):
        TopKSelector()(scores, torch.tensor([[2, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"budget: expected values in \[0, Skv=8\], got 9"):
        TopKSelector()(scores, torch.full((1, 2), 9, dtype=torch.int32))
    with pytest.raises(ValueError, match="budget: expected an integer dtype"):
        TopKSelector()(scores, torch.full((1, 2), 2.0))
    with pytest.raises(ValueError, match="scores: expected a 3-D tensor"):
        TopKSelector()(scores[0], torch.full((1, 2), 2, dtype=torch.int32))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="scores on cuda"):
            TopKSelector()(scores.cuda(), torch.full((1, 2), 2, dtype=torch.int32))


def test_indices_stay_in_range_for_an_unchecked_selection() -> None:
    """Inside torch.compile the row counts are not checked: indices stay within [0, Skv) even
    when a row keeps more (or fewer) tokens than num_kept."""
    keep = torch.tensor([[[True, True, True, False]], [[False, False, False, False]]])
    sel = Selection(keep=keep, num_kept=1)
    object.__setattr__(sel, "_counts_checked", True)  # what torch.compile tracing amounts to
    idx = sel.indices()
    assert idx.shape == (2, 1, 1)
    assert bool(((idx >= 0) & (idx < 4)).all()), idx
    assert idx[0, 0, 0] == 0  # the first kept position of the over-full row
