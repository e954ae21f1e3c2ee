"""select_tokens / plan_tokens: planted structure is found and sized; defaults; composition."""

from __future__ import annotations

import pytest
import torch

from zipvl.sparsity import (
    AccumulatedAttentionScorer,
    CumulativeMassAllocator,
    FixedRatioAllocator,
    KeyNormScorer,
    PerLayerSchedule,
    ProbeScorer,
    SnapKVScorer,
    TokenPlan,
    TopKSelector,
    plan_tokens,
    select_tokens,
)
from zipvl.testing.inputs import planted_qkv, random_qkv


@pytest.mark.parametrize(("s", "n_imp"), [(400, 40), (1000, 150)])
@pytest.mark.parametrize("granularity", ["kv_head", "layer"])
def test_planted_subset_is_found_and_budget_sized_near_it(
    device: str, s: int, n_imp: int, granularity: str
) -> None:
    x = planted_qkv(2, 4, 2, s, 32, num_important=n_imp, seed=1, device=device)
    selector = TopKSelector(granularity=granularity)  # type: ignore[arg-type]
    plan = plan_tokens(x.q, x.k, allocator=CumulativeMassAllocator(0.975), selector=selector)
    assert isinstance(plan, TokenPlan)
    p = plan.selection.num_kept
    # tau = 0.975 of a mass that sits (almost) entirely on the planted set: p within 10 % of it
    # (the least-attended planted keys may fall in the last 2.5 %), plus the forced last token
    assert 0.9 * n_imp <= p <= n_imp + 1, p
    keep = plan.selection.keep  # (B, Hkv, S)
    forced = torch.zeros(s, dtype=torch.bool, device=device)
    forced[-1] = True
    # precision: every kept token is planted or forced
    assert not (keep & ~x.important & ~forced).any()
    # recall: at least 90 % of the planted set is kept in every row
    assert ((keep & x.important).sum(-1) >= 0.9 * n_imp).all()
    # a looser threshold keeps fewer tokens, a stricter one (nearly) all of the planted set
    p_loose = plan_tokens(x.q, x.k, allocator=CumulativeMassAllocator(0.8)).selection.num_kept
    p_strict = plan_tokens(x.q, x.k, allocator=CumulativeMassAllocator(0.9999)).selection.num_kept
    assert p_loose < p <= p_strict
    assert p_strict >= n_imp


def test_select_tokens_defaults_are_zipvl_and_equal_plan_selection(device: str) -> None:
    q, k, _ = random_qkv(1, 4, 2, 120, 16, device=device, seed=3)
    sel = select_tokens(q, k)
    plan = plan_tokens(q, k)
    assert torch.equal(sel.keep, plan.selection.keep) and sel.num_kept == plan.selection.num_kept
    manual = TopKSelector()(
        ProbeScorer()(q, k).normalized, CumulativeMassAllocator(0.975)(ProbeScorer()(q, k).mass)
    )
    assert torch.equal(sel.keep, manual.keep)
    assert plan.budget.shape == (1, 2) and plan.budget.dtype == torch.int32
    assert plan.scores.mass.shape == (1, 2, 120)
    assert sel.keep[..., -1].all(), "the last token is always kept"


@pytest.mark.parametrize(
    "scorer",
    [ProbeScorer(), AccumulatedAttentionScorer(), SnapKVScorer(window=8), KeyNormScorer()],
    ids=lambda s: type(s).__name__,
)
def test_every_scorer_composes_with_the_pipeline(scorer: object) -> None:
    q, k, _ = random_qkv(2, 4, 2, 64, 16, seed=4)
    sel = select_tokens(q, k, scorer=scorer, allocator=FixedRatioAllocator(0.25))  # type: ignore[arg-type]
    assert sel.num_kept == 16
    assert (sel.keep.sum(-1) == 16).all()


def test_snapkv_window_is_kept_when_the_budget_allows() -> None:
    q, k, _ = random_qkv(1, 4, 2, 64, 16, seed=5)
    sel = select_tokens(q, k, scorer=SnapKVScorer(window=8), allocator=FixedRatioAllocator(0.25))
    assert sel.keep[..., -8:].all()


def test_per_layer_schedule_needs_layer_idx() -> None:
    q, k, _ = random_qkv(1, 2, 1, 40, 16)
    sched = PerLayerSchedule([0.5, 0.25])
    assert select_tokens(q, k, allocator=sched, layer_idx=1).num_kept == 10
    with pytest.raises(ValueError, match="layer_idx"):
        select_tokens(q, k, allocator=sched)


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_padded_batch_plans_and_attends_as_rows_alone(pad_side: str) -> None:
    """plan_tokens + sparse_attention with key_valid: every row equals the row run alone (its
    own budget and kept set; padding never scored, never attended; padding rows are 0)."""
    import torch

    from zipvl.sparsity import CumulativeMassAllocator, ProbeScorer, TopKSelector
    from zipvl.sparsity import plan_tokens as plan
    from zipvl.sparsity import sparse_attention as attend

    torch.manual_seed(0)
    b, hq, hkv, s, d = 3, 4, 2, 48, 16
    q, k, v = torch.randn(b, hq, s, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    lens = [48, 31, 20]
    valid = torch.zeros(b, s, dtype=torch.bool)
    for i, n in enumerate(lens):
        if pad_side == "left":
            valid[i, s - n :] = True
        else:
            valid[i, :n] = True
    comps = {"scorer": ProbeScorer(), "allocator": CumulativeMassAllocator(0.8),
             "selector": TopKSelector()}  # fmt: skip
    p = plan(q, k, key_valid=valid, **comps)
    out = attend(q, k, v, p.selection, key_valid=valid)
    assert p.row_kept is not None and p.row_keep is not None
    assert not (p.row_keep & ~valid[:, None, :]).any()
    assert torch.equal(out[~valid[:, None, :, None].expand_as(out)].abs().sum(), torch.tensor(0.0))
    for i in range(b):
        span = valid[i].nonzero().flatten()
        sl = slice(int(span[0]), int(span[-1]) + 1)
        qi, ki, vi = q[i : i + 1, :, sl], k[i : i + 1, :, sl], v[i : i + 1, :, sl]
        alone = plan(qi, ki, **comps)
        assert alone.selection.num_kept == p.row_kept[i]
        assert torch.equal(alone.selection.keep[0], p.row_keep[i, :, sl])
        want = attend(qi, ki, vi, alone.selection)
        torch.testing.assert_close(out[i : i + 1, :, sl], want, rtol=0, atol=1e-6)
    # without key_valid the same batch attends to padding: the rows differ (what the mask fixes)
    naive = attend(q, k, v, plan(q, k, **comps).selection)
    assert (naive[1:] - out[1:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="key_valid"):
        plan(q, k, key_valid=valid[:, :10], **comps)
