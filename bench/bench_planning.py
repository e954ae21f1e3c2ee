"""CPU pytest-benchmark suite of the prefill plan: score -> allocate -> select -> BlockMask.

What is timed, one ``group=`` per component, at S = 1k, 4k and 16k tokens:

* ``plan.score``: ``ProbeScorer`` with 64 recent + 64 random probes (the GPU bench's cap), plain
  PyTorch path, fp32 probe softmax and column sums.
* ``plan.allocate``: ``CumulativeMassAllocator(0.975)`` (sort + cumsum of the layer vector).
* ``plan.select``: ``TopKSelector()`` (stable sort ranks, keep mask, one budget read-back).
* ``plan.whole``: ``plan_tokens(impl="torch")`` (the eager plan, threshold select after the one
  read) against ``PlanGraph(capture=False)`` (the fixed-shape function a CUDA graph replays,
  run eagerly: device budget, sort-ranked keep mask, running-count positions, outputs packed).
* ``plan.block_mask``: ``compacted_causal_block_mask`` for P = 0.42 S (cache cleared each round),
  ``compacted_prefix_block_mask`` (``unkept="attend"``) and ``selection_block_mask`` over the
  original layout, block 128.

Shapes: B = 1, Hq = 8, Hkv = 2 (G = 4), D = 64, fp32: small head counts so the 16k cases stay
quick on a 2-core CI machine. These are host timings for regressions of the planning code on
CPU, not GPU figures (``bench/gpu_prefill.py`` measures those).

Run::

    python -m pytest bench/bench_planning.py --benchmark-enable --benchmark-only -q

(``--benchmark-disable`` is the repository default, under which each case runs once as a smoke
test.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from zipvl.sparsity import (
    CumulativeMassAllocator,
    PlanGraph,
    ProbeScorer,
    Selection,
    TopKSelector,
    compacted_causal_block_mask,
    compacted_prefix_block_mask,
    plan_tokens,
    selection_block_mask,
)
from zipvl.sparsity.block_mask import _compacted_causal_cached
from zipvl.testing.inputs import random_qkv

B, HQ, HKV, D = 1, 8, 2, 64
RATIO = 0.42
BLOCK = 128


@dataclass(frozen=True)
class Case:
    """One benchmark point: an S-token prompt."""

    tokens: int

    @property
    def id(self) -> str:
        return f"s{self.tokens}"


CASES = [Case(1024), Case(4096), Case(16384)]


@dataclass(frozen=True)
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    mass: torch.Tensor
    normalized: torch.Tensor
    budget: torch.Tensor
    selection: Selection


_SCORER = ProbeScorer(max_recent=64, max_random=64)
_ALLOCATOR = CumulativeMassAllocator(0.975)
_SELECTOR = TopKSelector()


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def inputs(request: pytest.FixtureRequest) -> Inputs:
    s = request.param.tokens
    q, k, _ = random_qkv(B, HQ, HKV, s, D, seed=s)
    scores = _SCORER(q, k)
    p = round(RATIO * s)
    budget = torch.full((B, HKV), p, dtype=torch.int32)
    selection = _SELECTOR(scores.normalized, budget)
    return Inputs(q, k, scores.mass, scores.normalized, budget, selection)


def _run(benchmark: Any, group: str, fn: Callable[[], object], **info: object) -> None:
    benchmark.group = group
    benchmark.extra_info.update(info)
    benchmark(fn)


def test_score(benchmark: Any, inputs: Inputs) -> None:
    _run(benchmark, "plan.score", lambda: _SCORER(inputs.q, inputs.k), probes=128)


def test_allocate(benchmark: Any, inputs: Inputs) -> None:
    _run(benchmark, "plan.allocate", lambda: _ALLOCATOR(inputs.mass))


def test_select(benchmark: Any, inputs: Inputs) -> None:
    _run(benchmark, "plan.select", lambda: _SELECTOR(inputs.normalized, inputs.budget))


def test_plan_eager(benchmark: Any, inputs: Inputs) -> None:
    comps = {"scorer": _SCORER, "allocator": _ALLOCATOR, "selector": _SELECTOR}
    _run(benchmark, "plan.whole", lambda: plan_tokens(inputs.q, inputs.k, **comps, impl="torch"),
         kind="eager")  # fmt: skip


def test_plan_fixed_shape(benchmark: Any, inputs: Inputs) -> None:
    planner = PlanGraph(_SCORER, _ALLOCATOR, _SELECTOR, capture=False)
    _run(benchmark, "plan.whole", lambda: planner(inputs.q, inputs.k), kind="fixed_shape")


def test_block_mask_compacted_causal(benchmark: Any, inputs: Inputs) -> None:
    p = inputs.selection.num_kept
    padded = -(-p // BLOCK) * BLOCK
    benchmark.group = "plan.block_mask"
    benchmark.extra_info.update(kind="compacted_causal", num_kept=p)
    # clear the per-(P, length) cache each round so that construction is what is timed
    benchmark.pedantic(
        lambda: compacted_causal_block_mask(p, padded, BLOCK),
        setup=_compacted_causal_cached.cache_clear,
        rounds=20,
        warmup_rounds=1,
    )


def test_block_mask_compacted_prefix(benchmark: Any, inputs: Inputs) -> None:
    p = inputs.selection.num_kept
    padded = -(-p // BLOCK) * BLOCK
    visible = inputs.selection.keep.cumsum(-1, dtype=torch.int32)
    _run(
        benchmark,
        "plan.block_mask",
        lambda: compacted_prefix_block_mask(visible, padded, BLOCK, group_size=HQ // HKV),
        kind="compacted_prefix",
    )


def test_block_mask_selection(benchmark: Any, inputs: Inputs) -> None:
    _run(
        benchmark,
        "plan.block_mask",
        lambda: selection_block_mask(inputs.selection, BLOCK, group_size=HQ // HKV),
        kind="selection_original_layout",
    )
