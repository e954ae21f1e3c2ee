"""Stratified probe rows and the offset-corrected estimator of ``ProbeScorer``."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from zipvl import ZipVLConfig
from zipvl.impl import Impl
from zipvl.sparsity import (
    AccumulatedAttentionScorer,
    CumulativeMassAllocator,
    ProbeScorer,
    Scores,
    probe_positions,
)
from zipvl.sparsity.pipeline import plan_tokens
from zipvl.testing.inputs import random_qkv
from zipvl.types import Scorer


@given(
    sq=st.integers(1, 500),
    recent=st.floats(0.0, 0.5),
    rand=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**20),
)
def test_stratified_rows_take_one_row_per_stratum(
    sq: int, recent: float, rand: float, seed: int
) -> None:
    scorer = ProbeScorer(recent_frac=recent, random_frac=rand, sampling="stratified", seed=seed)
    rows = scorer.probe_rows(sq)
    uniform = probe_positions(sq, recent_frac=recent, random_frac=rand, seed=seed)
    assert rows.shape == uniform.shape  # same counts as the uniform draw
    assert torch.equal(rows, rows.unique())  # ascending, distinct
    weights = scorer.probe_weights(sq)
    assert weights.shape == rows.shape
    m_recent, m_random = scorer._counts(sq)
    # inverse inclusion probabilities: with random rows, the probes stand for all Sq rows
    # (without, the rows before the recent window are not sampled at all)
    assert float(weights.sum()) == pytest.approx(sq if m_random else m_recent)
    assert torch.equal(rows[m_random:], torch.arange(sq - m_recent, sq))
    n_rest = sq - m_recent
    if m_random:
        edges = [(t * n_rest) // m_random for t in range(m_random + 1)]
        for t, r in enumerate(rows[:m_random].tolist()):
            assert edges[t] <= r < edges[t + 1]


@given(
    s=st.integers(1, 96),
    extra=st.integers(0, 24),
    hkv=st.sampled_from([1, 2]),
    g=st.sampled_from([1, 3]),
    recent=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_offset_estimator_with_every_row_as_a_probe_is_the_full_column_mass(
    s: int, extra: int, hkv: int, g: int, recent: float, seed: int
) -> None:
    # all query rows are probes (recent + stratified covering the rest): W = 1 and every column
    # has its own row at offset 0, so the estimate is the full map's column sum
    skv = s + extra
    q, k, _ = random_qkv(1, hkv * g, hkv, skv, 16, sq=s, seed=seed)
    scorer = ProbeScorer(
        recent_frac=recent, random_frac=1.0, sampling="stratified", estimator="offset"
    )
    assert scorer.probe_rows(s).numel() == s
    assert scorer.band_width(s) == 1
    got = scorer(q, k)
    want = AccumulatedAttentionScorer()(q, k)
    torch.testing.assert_close(got.mass, want.mass, rtol=1e-5, atol=1e-6)


def test_offset_estimator_keeps_the_scorer_contract() -> None:
    scorer = ProbeScorer.estimator_preset(32)
    assert isinstance(scorer, Scorer)
    assert scorer.sampling == "stratified" and scorer.estimator == "offset"
    q, k, _ = random_qkv(2, 6, 2, 300, 32, seed=3)
    out = scorer(q, k)
    assert isinstance(out, Scores)
    for t in (out.mass, out.normalized):
        assert t.shape == (2, 2, 300) and t.dtype == torch.float32
        assert torch.isfinite(t).all() and (t >= 0).all()
    # the estimate stands for all 300 rows x 6 heads: its total is close to their mass
    assert float(out.mass.sum()) == pytest.approx(2 * 6 * 300, rel=0.2)
    # chunking over KV heads changes nothing
    chunked = ProbeScorer.estimator_preset(32, heads_per_chunk=2)(q, k)
    torch.testing.assert_close(chunked.mass, out.mass)
    # it plans like any scorer
    plan = plan_tokens(q, k, scorer=scorer)
    assert plan.selection.keep.shape == (2, 2, 300)
    # on the CPU "auto" resolves to plain PyTorch (on CUDA to the fused kernels)
    assert scorer.impl_for(q) is Impl.TORCH


@pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="the fused probe kernels run on CUDA or under TRITON_INTERPRET=1",
)
@pytest.mark.parametrize(
    ("shape", "kw"),
    [((1, 4, 2, 300, 300, 16), {"num_probes": 16}),
     ((2, 6, 2, 200, 260, 32), {"num_probes": 24}),  # chunked prefill: Sq < Skv
     ((1, 4, 1, 257, 257, 16), {"num_probes": 8, "recent_frac": 0.05})],  # recent rows too
)  # fmt: skip
def test_the_fused_offset_estimator_equals_the_plain_one(shape, kw) -> None:
    """impl="triton": the weighted column mass from the kernels (each row's weight as a shift
    of its log-sum-exp) and the band from the kernels' log-sum-exp give the plain estimate."""
    b, hq, hkv, sq, skv, d = shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, _ = random_qkv(b, hq, hkv, skv, d, sq=sq, seed=sq, device=device)
    num = kw.pop("num_probes")
    fused = ProbeScorer.estimator_preset(num, impl="triton", **kw)(q, k)
    plain = ProbeScorer.estimator_preset(num, impl="torch", **kw)(q.double(), k.double())
    for got, want in ((fused.mass, plain.mass), (fused.normalized, plain.normalized)):
        assert got.dtype == torch.float32 and got.shape == (b, hkv, skv)
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 1e-5, err  # float32 logits (TF32-free: fp32 inputs run IEEE products)


def test_offset_estimator_accepts_chunked_prefill_queries() -> None:
    q, k, _ = random_qkv(1, 4, 2, 200, 16, sq=120, seed=5)
    out = ProbeScorer.estimator_preset(16)(q, k)
    assert out.mass.shape == (1, 2, 200)
    assert torch.isfinite(out.mass).all() and (out.mass >= 0).all()


def test_new_options_round_trip_through_the_config() -> None:
    cfg = ZipVLConfig(scorer=ProbeScorer.estimator_preset(64, seed=7))
    back = ZipVLConfig.from_dict(cfg.to_dict())
    assert back.scorer == cfg.scorer


def test_new_options_are_validated() -> None:
    with pytest.raises(ValueError, match="sampling"):
        ProbeScorer(sampling="sobol")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="estimator"):
        ProbeScorer(estimator="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="denominator"):
        ProbeScorer(estimator="offset", denominator="probe_count")
    with pytest.raises(ValueError, match="num_probes"):
        ProbeScorer.estimator_preset(0)
    with pytest.raises(ValueError, match="sampling"):
        probe_positions(10, sampling="grid")  # type: ignore[arg-type]


def test_defaults_are_unchanged() -> None:
    scorer = ProbeScorer()
    assert (scorer.sampling, scorer.estimator) == ("uniform", "sum")
    assert torch.equal(scorer.probe_rows(1000), probe_positions(1000))


@pytest.mark.slow
def test_offset_estimator_compiles_fullgraph() -> None:
    """Fixed shapes and no host read: the corrected scorer and the budget trace as one graph."""
    scorer = ProbeScorer.estimator_preset(32)
    allocator = CumulativeMassAllocator(0.9)

    def budget(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mass = scorer(q, k).mass
        return mass, allocator(mass)

    q, k, _ = random_qkv(1, 4, 2, 400, 32, seed=4)
    mass, p = torch.compile(budget, fullgraph=True)(q, k)
    mass_e, p_e = budget(q, k)
    torch.testing.assert_close(mass, mass_e, rtol=1e-4, atol=1e-5)
    assert torch.equal(p, p_e)
