"""sparse_attention: every impl vs a float64 oracle under the 2x rule; compile; validation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tests.sparsity.host_reads import HostReads
from zipvl.sparsity import (
    CumulativeMassAllocator,
    FixedRatioAllocator,
    ProbeScorer,
    Selection,
    TopKSelector,
    plan_tokens,
    sparse_attention,
)
from zipvl.testing.attention import (
    assert_close_to_reference,
    dense_attention,
    dense_selection_mask,
    max_abs_error,
)
from zipvl.testing.inputs import random_qkv, random_scores

# eager FlexAttention (compile=False) warns that it is unfused; that is the point of those cases
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@dataclass(frozen=True)
class Case:
    b: int
    hq: int
    hkv: int
    s: int
    d: int
    frac: float
    block: int

    def __str__(self) -> str:
        return f"B{self.b}-H{self.hq}/{self.hkv}-S{self.s}-D{self.d}-r{self.frac}-blk{self.block}"


CASES = [
    Case(2, 4, 2, 45, 16, 0.5, 16),  # GQA, batch > 1, S not a multiple of the block
    Case(1, 6, 2, 70, 32, 0.3, 32),  # G = 3
    Case(2, 2, 2, 1, 16, 1.0, 16),  # S = 1
    Case(1, 4, 1, 33, 16, 1.0, 16),  # MQA, everything kept
]
IMPLS = ["reference", "sdpa", "flex"]
DTYPES = [torch.float32, torch.bfloat16]


def make_selection(case: Case, device: str, seed: int = 0) -> Selection:
    scores = random_scores(case.b, case.hkv, case.s, seed=seed, device=device)
    p = max(1, round(case.frac * case.s))
    budget = torch.full((case.b, case.hkv), p, dtype=torch.int32, device=device)
    return TopKSelector(keep_last=False)(scores, budget)


def check_against_oracle(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    """2x rule: error vs float64 <= 2 x error of plain attention in the inputs' dtype + band."""
    ref64 = dense_attention(q, k, v, mask, upcast=True)
    plain = dense_attention(q, k, v, mask, upcast=False)
    assert out.dtype == q.dtype
    assert_close_to_reference(out, ref64, max_abs_error(plain, ref64))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("unkept", ["zero", "attend"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_attention_matches_oracle(
    device: str, case: Case, impl: str, unkept: str, dtype: torch.dtype
) -> None:
    q, k, v = random_qkv(case.b, case.hq, case.hkv, case.s, case.d, dtype=dtype, device=device)
    sel = make_selection(case, device)
    out = sparse_attention(
        q,
        k,
        v,
        sel,
        impl=impl,
        unkept=unkept,
        block_size=case.block,
        compile=False,  # type: ignore[arg-type]
    )
    assert out.shape == q.shape
    check_against_oracle(out, q, k, v, dense_selection_mask(sel.keep, unkept=unkept))  # type: ignore[arg-type]
    if unkept == "zero":
        # queries outside the selection get exactly zero output
        unkept_rows = ~sel.keep.repeat_interleave(case.hq // case.hkv, dim=1)
        assert (out[unkept_rows] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tau_one_equals_causal_attention(device: str, impl: str, dtype: torch.dtype) -> None:
    q, k, v = random_qkv(2, 4, 2, 53, 16, dtype=dtype, device=device, seed=7)
    plan = plan_tokens(q, k, allocator=CumulativeMassAllocator(1.0))
    assert plan.selection.keep.all() and plan.selection.num_kept == 53
    out = sparse_attention(q, k, v, plan.selection, impl=impl, block_size=16, compile=False)
    causal = torch.ones(53, 53, dtype=torch.bool, device=device).tril().expand(2, 2, 53, 53)
    ref64 = dense_attention(q, k, v, causal, upcast=True)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    # the same bar as plain causal SDPA in this dtype
    assert_close_to_reference(out, ref64, max_abs_error(sdpa, ref64))


def test_zero_kept_tokens_give_zero_output(device: str) -> None:
    q, k, v = random_qkv(1, 2, 1, 9, 8, device=device)
    sel = TopKSelector(keep_last=False)(
        random_scores(1, 1, 9, device=device), torch.zeros(1, 1, dtype=torch.int32, device=device)
    )
    for impl in IMPLS:
        for unkept in ("zero", "attend"):
            out = sparse_attention(q, k, v, sel, impl=impl, unkept=unkept, compile=False)  # type: ignore[arg-type]
            assert out.shape == q.shape and not out.any()


def test_value_head_dim_may_differ(device: str) -> None:
    q, k, v = random_qkv(1, 4, 2, 20, 16, dv=8, device=device)
    sel = make_selection(Case(1, 4, 2, 20, 16, 0.5, 16), device)
    mask = dense_selection_mask(sel.keep)
    for impl in ("sdpa", "flex"):
        out = sparse_attention(q, k, v, sel, impl=impl, block_size=16, compile=False)
        assert out.shape == (1, 4, 20, 8)
        check_against_oracle(out, q, k, v, mask)


def test_planted_selection_then_attention_end_to_end(device: str) -> None:
    q, k, v = random_qkv(1, 4, 2, 64, 16, device=device, seed=9)
    plan = plan_tokens(
        q, k, scorer=ProbeScorer(recent_frac=0.1), allocator=FixedRatioAllocator(0.4)
    )
    assert plan.selection.num_kept == 26
    ref = sparse_attention(q, k, v, plan.selection, impl="reference")
    out = sparse_attention(q, k, v, plan.selection, impl="sdpa")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("unkept", "dtype"), [("zero", torch.float32), ("attend", torch.bfloat16)]
)
def test_compiled_flex_serves_many_padded_lengths(
    device: str, unkept: str, dtype: torch.dtype
) -> None:
    """Compiled flex matches the oracle, and new padded lengths stop recompiling after two."""
    import torch._dynamo

    q, k, v = random_qkv(1, 4, 2, 300, 32, dtype=dtype, device=device, seed=1)
    budgets = [150, 100, 290, 40]  # padded to 256, 128, 384, 128 with block 128
    for i, p in enumerate(budgets):
        sel = TopKSelector()(
            random_scores(1, 2, 300, seed=i, device=device),
            torch.full((1, 2), p, dtype=torch.int32, device=device),
        )
        # one static + one dynamic compile are allowed for the first two lengths; none after
        strict = i >= 2
        with torch._dynamo.config.patch(error_on_recompile=strict), warnings.catch_warnings():
            # a silent fallback to the unfused path would warn like eager flex does
            warnings.filterwarnings("error", message=".*called without torch.compile")
            out = sparse_attention(q, k, v, sel, impl="flex", unkept=unkept)  # type: ignore[arg-type]
        check_against_oracle(out, q, k, v, dense_selection_mask(sel.keep, unkept=unkept))  # type: ignore[arg-type]


@pytest.mark.slow
def test_hot_path_compiles_fullgraph_without_host_sync(device: str) -> None:
    """Scoring + allocation + keep mask in one fullgraph region; then attention given the plan."""
    scorer = ProbeScorer(recent_frac=0.1, random_frac=0.1)
    allocator = CumulativeMassAllocator(0.9)
    selector = TopKSelector(sink_tokens=2)

    def plan(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = scorer(q, k)
        budget = allocator(scores.mass)
        return budget, selector.keep_mask(scores.normalized, budget)

    q, k, v = random_qkv(1, 4, 2, 96, 32, device=device, seed=2)
    budget, keep = torch.compile(plan, fullgraph=True)(q, k)
    budget_e, keep_e = plan(q, k)
    assert torch.equal(budget, budget_e) and torch.equal(keep, keep_e)

    sel = selector(scorer(q, k).normalized, budget_e)
    attend = torch.compile(
        lambda q, k, v: sparse_attention(q, k, v, sel, impl="flex", block_size=128),
        fullgraph=True,
    )
    out = attend(q, k, v)
    check_against_oracle(out, q, k, v, dense_selection_mask(sel.keep))


def test_bad_inputs_raise_naming_the_argument(device: str) -> None:
    q, k, v = random_qkv(1, 4, 2, 8, 8, device=device)
    sel = make_selection(Case(1, 4, 2, 8, 8, 0.5, 16), device)
    listed = "'auto', 'sdpa', 'flex', 'reference'"
    with pytest.raises(ValueError, match=f"impl: expected one of {listed}, got 'cuda'"):
        sparse_attention(q, k, v, sel, impl="cuda")
    with pytest.raises(ValueError, match=f"impl: expected one of {listed}, got 'triton'"):
        sparse_attention(q, k, v, sel, impl="triton")
    with pytest.raises(ValueError, match="q: expected a 4-D tensor"):
        sparse_attention(q[0], k, v, sel)
    with pytest.raises(ValueError, match=r"k: the number of KV heads \(3\) must divide"):
        k3 = torch.randn(1, 3, 8, 8, device=device)
        sparse_attention(q, k3, k3, sel)
    with pytest.raises(ValueError, match=r"v: expected dtype torch\.float32 like k"):
        sparse_attention(q, k, v.double(), sel)
    with pytest.raises(ValueError, match=r"k: expected dtype torch\.float32 like q"):
        sparse_attention(q, k.double(), v.double(), sel)
    with pytest.raises(ValueError, match="q: expected Sq = Skv = 8"):
        sparse_attention(q[:, :, :4], k, v, sel)
    with pytest.raises(ValueError, match=r"selection\.keep: expected shape \(B, Hkv, S\)"):
        sparse_attention(q, k, v, Selection(sel.keep[:, :1], sel.num_kept))
    with pytest.raises(ValueError, match=r"Selection\.num_kept: expected an int in \[0, Skv=8\]"):
        sparse_attention(q, k, v, Selection(sel.keep, 9))
    with pytest.raises(TypeError, match="selection: expected a Selection"):
        sparse_attention(q, k, v, sel.keep)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unkept: expected 'zero' or 'attend'"):
        sparse_attention(q, k, v, sel, unkept="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size: expected an int >= 1, got 0"):
        sparse_attention(q, k, v, sel, block_size=0)
    with pytest.raises(TypeError, match=r"block_size: expected an int, got float 16\.0"):
        sparse_attention(q, k, v, sel, block_size=16.0)  # type: ignore[arg-type]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"scale: expected a positive float or None"):
            sparse_attention(q, k, v, sel, scale=bad)
    with pytest.raises(TypeError, match="scale: expected a positive float or None, got str"):
        sparse_attention(q, k, v, sel, scale="0.5")  # type: ignore[arg-type]
    if device == "cuda":
        with pytest.raises(ValueError, match="q on cuda:0, k on cpu"):
            sparse_attention(q, k.cpu(), v.cpu(), sel)
        with pytest.raises(ValueError, match=r"selection\.keep: expected device cuda:0 like q"):
            sparse_attention(q, k, v, Selection(sel.keep.cpu(), sel.num_kept))


@pytest.mark.parametrize("impl", IMPLS)
def test_selection_whose_rows_disagree_with_num_kept_raises(device: str, impl: str) -> None:
    # the review's case: 3 kept tokens, num_kept = 5; sdpa used to attend rows [0, 1, 2, 5, 7]
    q, k, v = random_qkv(1, 2, 1, 8, 8, device=device)
    keep = torch.zeros(1, 1, 8, dtype=torch.bool, device=device)
    keep[..., [1, 5, 7]] = True
    with pytest.raises(ValueError, match=r"Selection\.num_kept: expected 3, .* got 5"):
        sparse_attention(q, k, v, Selection(keep, 5), impl=impl, compile=False)
    with pytest.raises(ValueError, match=r"Selection\.num_kept: expected 3, .* got 0"):
        sparse_attention(q, k, v, Selection(keep, 0), impl=impl)  # not silently all zeros
    q2, k2, v2 = random_qkv(1, 4, 2, 8, 8, device=device)
    uneven = torch.zeros(1, 2, 8, dtype=torch.bool, device=device)
    uneven[0, 0, [1, 5, 7]] = True
    uneven[0, 1, [2, 7]] = True
    with pytest.raises(ValueError, match=r"same number of kept tokens .* from 2 to 3"):
        sparse_attention(q2, k2, v2, Selection(uneven, 3), impl=impl, compile=False)
    # a consistent hand-built selection passes and matches the oracle
    out = sparse_attention(q, k, v, Selection(keep, 3), impl=impl, compile=False)
    check_against_oracle(out, q, k, v, dense_selection_mask(keep))


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_row_count_check_costs_one_read_and_none_after_the_selector(
    monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    case = Case(1, 4, 2, 24, 16, 0.5, 16)
    q, k, v = random_qkv(case.b, case.hq, case.hkv, case.s, case.d)
    scores = random_scores(case.b, case.hkv, case.s)
    budget = torch.full((case.b, case.hkv), 9, dtype=torch.int32)
    reads = HostReads(monkeypatch)
    sel = TopKSelector()(scores, budget)
    assert reads.count == 1  # the selector's one read carries the budget and the row counts
    sparse_attention(q, k, v, sel, impl=impl)
    assert reads.count == 1  # already verified: no second read per layer
    by_hand = Selection(sel.keep.clone(), sel.num_kept)
    sparse_attention(q, k, v, by_hand, impl=impl)
    sparse_attention(q, k, v, by_hand, impl=impl)
    assert reads.count == 2  # one read for a hand-built selection, remembered afterwards


@pytest.mark.parametrize("rows_per_chunk", [1, 4, 7])
def test_sdpa_attend_runs_in_row_chunks(
    device: str, rows_per_chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``impl="sdpa", unkept="attend"`` builds its boolean mask in chunks of query rows: with a
    small chunk the loop runs many times (the last one partial) and must still equal the
    oracle, rows that see no kept key included."""
    import zipvl.sparsity.attention as attention_module

    case = Case(2, 4, 2, 45, 16, 0.3, 16)
    q, k, v = random_qkv(case.b, case.hq, case.hkv, case.s, case.d, device=device)
    sel = make_selection(case, device, seed=3)
    sel = Selection(sel.keep.clone(), sel.num_kept)
    assert not sel.keep[..., 0].all()  # some leading rows see no kept key yet
    p = sel.num_kept
    monkeypatch.setattr(
        attention_module, "_SDPA_ATTEND_CHUNK", case.b * case.hq * p * rows_per_chunk
    )
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    out = sparse_attention(q, k, v, sel, impl="sdpa", unkept="attend")
    chunks = -(-case.s // rows_per_chunk)
    assert len(calls) == chunks > 1
    check_against_oracle(out, q, k, v, dense_selection_mask(sel.keep, unkept="attend"))
    monkeypatch.undo()
    whole = sparse_attention(q, k, v, sel, impl="sdpa", unkept="attend")  # one chunk
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)
