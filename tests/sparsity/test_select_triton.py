"""The one-launch keep mask + kept positions (``TopKSelector.keep_and_indices(impl="triton")``,
``zipvl.sparsity.select_triton``) against the sort reference ``keep_mask``: hypothesis-drawn
rows with ties, NaN, +-inf, negative and signed-zero scores, forced tokens, per-head and
per-layer budgets from 0 to Skv. On the CPU the kernel runs under TRITON_INTERPRET=1 (set by
conftest)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from zipvl.sparsity import TopKSelector
from zipvl.sparsity.selectors import SELECT_TRITON_MAX_TOKENS
from zipvl.types import kept_positions

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="the select kernel runs on CUDA or under TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@st.composite
def cases(draw: st.DrawFn) -> tuple[TopKSelector, torch.Tensor, torch.Tensor]:
    b, h, s = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 200))
    sel = TopKSelector(
        granularity=draw(st.sampled_from(["kv_head", "layer"])),
        keep_last=draw(st.booleans()),
        sink_tokens=draw(st.integers(0, 3)),
        recent_window=draw(st.integers(0, 3)),
    )
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    levels = draw(st.sampled_from([2, 8, 1024]))  # few levels: many ties
    scores = torch.randint(-levels, levels, (b, h, s), generator=g).float() / levels
    special = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0]
    for value in draw(st.lists(st.sampled_from(special), max_size=3)):
        at = torch.randint(0, s, (max(1, s // 7),), generator=g)
        scores[..., at] = value
    if draw(st.booleans()):  # one budget per layer, as the allocators give
        budget = torch.full((b, h), draw(st.integers(0, s)), dtype=torch.int32)
    else:
        budget = torch.randint(0, s + 1, (b, h), generator=g, dtype=torch.int32)
    return sel, scores.to(DEVICE), budget.to(DEVICE)


@settings(max_examples=30, deadline=None)
@given(case=cases())
def test_one_launch_equals_the_sort_reference(case) -> None:
    sel, scores, budget = case
    want_keep = sel.keep_mask(scores, budget)
    keep, idx = sel.keep_and_indices(scores, budget, impl="triton")
    assert torch.equal(keep, want_keep)
    assert torch.equal(idx, kept_positions(want_keep))
    keep_t, idx_t = sel.keep_and_indices(scores, budget, impl="torch")
    assert torch.equal(keep_t, want_keep) and torch.equal(idx_t, idx)
    # written in place over stale contents (the captured plan's output buffer): every slot,
    # the zero tail of idx included
    for impl in ("triton", "torch"):
        out = (torch.rand(scores.shape, device=DEVICE) < 0.5,
               torch.full(scores.shape, -7, dtype=torch.int64, device=DEVICE))  # fmt: skip
        got = sel.keep_and_indices(scores, budget, impl=impl, out=out)
        assert got[0] is out[0] and got[1] is out[1]
        assert torch.equal(out[0], want_keep) and torch.equal(out[1], idx), impl


def test_long_rows_cross_several_blocks() -> None:
    """More positions than one block of the passes (1024), ties across block boundaries."""
    sel = TopKSelector()
    g = torch.Generator().manual_seed(0)
    scores = (torch.randint(0, 16, (1, 2, 2500), generator=g).float() / 16).to(DEVICE)
    for p in (0, 1, 777, 1024, 2499, 2500):
        budget = torch.full((1, 2), p, dtype=torch.int32, device=DEVICE)
        keep, idx = sel.keep_and_indices(scores, budget, impl="triton")
        want = sel.keep_mask(scores, budget)
        assert torch.equal(keep, want) and torch.equal(idx, kept_positions(want))


# the lengths impl="auto" sends to the kernels since SELECT_TRITON_MAX_TOKENS became 128k, on
# CUDA (above the old 16k limit, 32k, the limit itself); under the CPU interpreter (about 40 s
# per call at 20k) a shorter row of several blocks stands in
_LONG = [20000, 32768, SELECT_TRITON_MAX_TOKENS] if torch.cuda.is_available() else [5000]


@pytest.mark.parametrize("s", _LONG)
def test_auto_rows_up_to_the_limit_equal_the_sort_path(
    s: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernels (impl="auto" on CUDA, which must pick them up to SELECT_TRITON_MAX_TOKENS;
    impl="triton" under the CPU interpreter) against impl="torch" on rows of the lengths "auto"
    now serves: many ties, a few NaN, budgets at the ends and in between."""
    from zipvl.sparsity import select_triton

    calls = []
    kernel = select_triton.keep_and_indices_triton
    monkeypatch.setattr(select_triton, "keep_and_indices_triton",
                        lambda *a, **k: calls.append(1) or kernel(*a, **k))  # fmt: skip
    impl = "auto" if torch.cuda.is_available() else "triton"
    sel = TopKSelector(sink_tokens=2, recent_window=3)
    g = torch.Generator().manual_seed(s)
    scores = torch.randint(0, 64, (1, 2, s), generator=g).float() / 64
    scores[..., torch.randint(0, s, (s // 1000,), generator=g)] = float("nan")
    scores = scores.to(DEVICE)
    budgets = (0, 5, int(0.42 * s), s - 1, s) if torch.cuda.is_available() else (5, 2100, s - 1)
    for p in budgets:
        budget = torch.tensor([[p, max(0, p - 7)]], dtype=torch.int32, device=DEVICE)
        keep, idx = sel.keep_and_indices(scores, budget, impl=impl)
        keep_t, idx_t = sel.keep_and_indices(scores, budget, impl="torch")
        assert torch.equal(keep, keep_t) and torch.equal(idx, idx_t)
        assert torch.equal(keep, sel.keep_mask(scores, budget))
    assert len(calls) == len(budgets)  # every call above ran the kernels


def test_bad_input_raises_naming_the_argument() -> None:
    from zipvl.sparsity.select_triton import keep_and_indices_triton

    sel = TopKSelector()
    scores = torch.rand(1, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"impl: expected one of"):
        sel.keep_and_indices(scores, torch.ones(1, 2, dtype=torch.int32), impl="sdpa")
    with pytest.raises(ValueError, match=r"budget: expected shape \(B, Hkv\)"):
        keep_and_indices_triton(scores, torch.ones(1, 3, dtype=torch.int32, device=DEVICE), 1, 2)
    with pytest.raises(ValueError, match=r"ranked: expected float32"):
        keep_and_indices_triton(scores.half(), torch.ones(1, 2, dtype=torch.int32), 1, 2)
    with pytest.raises(ValueError, match=r"out: idx: expected a contiguous \(1, 2, 16\) int64"):
        keep_and_indices_triton(
            scores, torch.ones(1, 2, dtype=torch.int32, device=DEVICE), 1, 2,
            out=(torch.empty(1, 2, 16, dtype=torch.bool, device=DEVICE),
                 torch.empty(1, 2, 16, dtype=torch.int32, device=DEVICE)),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"forced: expected \(sinks, recent\) >= 0"):
        keep_and_indices_triton(
            scores, torch.ones(1, 2, dtype=torch.int32, device=DEVICE), 1, 2, forced=(-1, 2)
        )
