"""Importance scorers against a dense float64 attention map; probe-row properties; validation."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from hypothesis import given

from zipvl.sparsity import (
    AccumulatedAttentionScorer,
    KeyNormScorer,
    ProbeScorer,
    Scores,
    SnapKVScorer,
    probe_positions,
)
from zipvl.testing.inputs import random_qkv, with_outlier_channel
from zipvl.types import Scorer


def dense_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal softmax in float64, queries at the last Sq positions: (B, Hkv, G, Sq, Skv)."""
    hkv, sq, skv = k.shape[1], q.shape[2], k.shape[2]
    g = q.shape[1] // hkv
    kr = repeat(k.double(), "b h s d -> b (h g) s d", g=g)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), kr) * q.shape[-1] ** -0.5
    qpos = torch.arange(sq, device=q.device) + (skv - sq)
    hidden = torch.arange(skv, device=q.device)[None, :] > qpos[:, None]
    probs = logits.masked_fill(hidden, float("-inf")).softmax(-1)
    return rearrange(probs, "b (h g) q k -> b h g q k", g=g)


@given(
    sq=st.integers(1, 400),
    recent=st.floats(0.0, 0.5),
    rand=st.floats(0.0, 0.5),
    max_recent=st.none() | st.integers(0, 20),
    max_random=st.none() | st.integers(0, 20),
    min_probes=st.integers(1, 8),
    seed=st.integers(0, 2**20),
)
def test_probe_positions_properties(
    sq: int,
    recent: float,
    rand: float,
    max_recent: int | None,
    max_random: int | None,
    min_probes: int,
    seed: int,
) -> None:
    kw = dict(
        recent_frac=recent,
        random_frac=rand,
        max_recent=max_recent,
        max_random=max_random,
        min_probes=min_probes,
    )
    rows = probe_positions(sq, seed=seed, **kw)  # type: ignore[arg-type]
    assert rows.dtype == torch.int64 and rows.ndim == 1
    assert (rows.diff() > 0).all(), "sorted and distinct"
    assert int(rows.min()) >= 0 and int(rows.max()) < sq
    m = rows.numel()
    assert m >= min(min_probes, sq)
    n_recent = (
        int(recent * sq + 1e-9) if max_recent is None else min(int(recent * sq + 1e-9), max_recent)
    )
    n_random = (
        int(rand * sq + 1e-9) if max_random is None else min(int(rand * sq + 1e-9), max_random)
    )
    assert m == max(min(n_recent + n_random, sq), min(min_probes, sq))
    # the last row is a probe whenever there is a recent probe
    if n_recent > 0 or m > n_random:
        assert int(rows[-1]) == sq - 1
    assert torch.equal(rows, probe_positions(sq, seed=seed, **kw)), "deterministic"  # type: ignore[arg-type]


def test_probe_positions_random_part_is_spread_and_seeded() -> None:
    a = probe_positions(10_000, seed=0)
    b = probe_positions(10_000, seed=1)
    assert a.numel() == 1000 and not torch.equal(a, b)
    drawn = a[:500].double()  # random probes over [0, 9500)
    # uniform draw: mean ~ 4750, and every tenth of the range gets some probes
    assert abs(drawn.mean().item() - 4750) < 400
    assert torch.histc(drawn, bins=10, min=0, max=9500).min() >= 25


_HASH_MULS = (0x2C1B3C6D, 0x297A2D39, 0x1B873593)


def _hash31(x: int) -> int:
    for mul in _HASH_MULS:
        x = ((x ^ (x >> 16)) * mul) & 0x7FFFFFFF
    return x ^ (x >> 16)


def _reference_probe_positions(sq: int, recent: float, random: float, seed: int) -> list[int]:
    """The documented draw in plain Python integers (no tensor, so no device): the last
    floor(recent * sq) rows, plus the floor(random * sq) rows of the rest with the smallest
    keys hash(row ^ hash(seed)) * n_rest + row."""
    m_recent = int(recent * sq + 1e-9)
    n_rest = sq - m_recent
    m_random = min(int(random * sq + 1e-9), n_rest)
    key = _hash31(seed & 0x7FFFFFFF)
    drawn = sorted(range(n_rest), key=lambda r: _hash31(r ^ key) * n_rest + r)[:m_random]
    return sorted(drawn) + list(range(n_rest, sq))


@pytest.mark.parametrize(
    ("sq", "recent", "random", "seed"),
    [(777, 0.05, 0.05, 5), (100, 0.1, 0.3, 0), (9, 0.0, 1.0, 123456789), (50, 0.5, 0.5, 2**40)],
)
def test_probe_positions_equal_a_device_free_reference(
    sq: int, recent: float, random: float, seed: int, device: str
) -> None:
    """Every device computes the same draw: the device's result equals a pure-Python reference
    of the keyed hash, which involves no device at all."""
    got = probe_positions(sq, recent_frac=recent, random_frac=random, seed=seed, device=device)
    assert got.device.type == torch.device(device).type
    assert got.tolist() == _reference_probe_positions(sq, recent, random, seed)


@pytest.mark.parametrize(
    ("b", "hq", "hkv", "sq", "skv"),
    [(2, 4, 2, 40, 40), (1, 6, 2, 23, 50), (1, 2, 2, 1, 9)],
)
@pytest.mark.parametrize("denominator", ["causal", "probe_count"])
def test_probe_scorer_matches_dense_probe_rows(
    device: str, b: int, hq: int, hkv: int, sq: int, skv: int, denominator: str
) -> None:
    q, k, _ = random_qkv(b, hq, hkv, skv, 16, sq=sq, device=device, seed=11)
    scorer = ProbeScorer(recent_frac=0.1, random_frac=0.2, denominator=denominator)  # type: ignore[arg-type]
    scores = scorer(q, k)
    assert isinstance(scores, Scores)
    for t in (scores.mass, scores.normalized):
        assert t.shape == (b, hkv, skv) and t.dtype == torch.float32 and t.device == q.device
    rows = scorer.probe_rows(sq, device=device)
    probs = dense_probs(q, k)[:, :, :, rows]  # (B, Hkv, G, M, Skv)
    mass = probs.sum(dim=(2, 3))
    torch.testing.assert_close(scores.mass.double(), mass, atol=1e-5, rtol=1e-5)
    j = torch.arange(skv, device=device)
    if denominator == "causal":
        den = (skv - torch.clamp(j, min=skv - sq)).double()
    else:
        qpos = rows + (skv - sq)
        den = (qpos[:, None] >= j[None, :]).sum(0).double() * (hq // hkv)
    expected = torch.where(den > 0, mass / den.clamp(min=1), 0.0)
    torch.testing.assert_close(scores.normalized.double(), expected, atol=1e-6, rtol=1e-5)
    # each probe row's softmax sums to one: total mass = G * M per (b, h)
    total = torch.full((b, hkv), float(rows.numel() * (hq // hkv)), device=device)
    torch.testing.assert_close(scores.mass.sum(-1), total, atol=1e-3, rtol=1e-5)


def test_probe_scorer_chunking_does_not_change_the_result() -> None:
    q, k, _ = random_qkv(2, 8, 4, 60, 16, seed=2)
    a = ProbeScorer(heads_per_chunk=1)(q, k)
    b = ProbeScorer(heads_per_chunk=3)(q, k)
    torch.testing.assert_close(a.mass, b.mass)
    torch.testing.assert_close(a.normalized, b.normalized)


def test_probe_scorer_bf16_close_to_fp32() -> None:
    q, k, _ = random_qkv(1, 4, 2, 64, 32, seed=4)
    s32 = ProbeScorer()(q, k)
    s16 = ProbeScorer()(q.bfloat16(), k.bfloat16())
    assert s16.mass.dtype == torch.float32
    torch.testing.assert_close(s16.mass, s32.mass, atol=0.05, rtol=0.05)


def test_accumulated_attention_is_the_full_column_sum(device: str) -> None:
    q, k, _ = random_qkv(2, 4, 2, 37, 16, sq=30, device=device, seed=3)
    scores = AccumulatedAttentionScorer(rows_per_chunk=8)(q, k)
    mass = dense_probs(q, k).sum(dim=(2, 3))
    torch.testing.assert_close(scores.mass.double(), mass, atol=1e-5, rtol=1e-5)
    visible = (37 - torch.clamp(torch.arange(37, device=device), min=7)).double() * 2
    torch.testing.assert_close(scores.normalized.double(), mass / visible, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_window_pooling_and_always_kept_window(device: str, pooling: str) -> None:
    q, k, _ = random_qkv(1, 4, 2, 50, 16, device=device, seed=5)
    scorer = SnapKVScorer(window=8, kernel=5, pooling=pooling)  # type: ignore[arg-type]
    scores = scorer(q, k)
    mass = dense_probs(q, k)[:, :, :, -8:].sum(dim=(2, 3)).float()  # (B, Hkv, S)
    torch.testing.assert_close(scores.mass, mass, atol=1e-5, rtol=1e-5)
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    pooled = pool(mass.view(2, 1, 50), 5, stride=1, padding=2).view(1, 2, 50)
    torch.testing.assert_close(scores.normalized[..., :-8], pooled[..., :-8], atol=1e-5, rtol=1e-5)
    assert torch.isposinf(scores.normalized[..., -8:]).all()


def test_key_norm_scorer_prefers_small_keys(device: str) -> None:
    q, k, _ = random_qkv(1, 2, 1, 6, 8, device=device)
    k = F.normalize(k, dim=-1) * torch.arange(1, 7, device=device).view(1, 1, 6, 1)  # norm = j+1
    scores = KeyNormScorer()(q, k)
    torch.testing.assert_close(scores.normalized, -k.norm(dim=-1))
    assert (scores.normalized.diff(dim=-1) < 0).all()
    torch.testing.assert_close(scores.mass.sum(-1), torch.ones(1, 1, device=device))


@pytest.mark.parametrize(
    "scorer",
    [ProbeScorer(), AccumulatedAttentionScorer(), SnapKVScorer(), KeyNormScorer()],
    ids=lambda s: type(s).__name__,
)
def test_scorers_satisfy_protocol_and_validate_inputs(scorer: Scorer) -> None:
    assert isinstance(scorer, Scorer)
    q, k, _ = random_qkv(1, 4, 2, 10, 8)
    with pytest.raises(ValueError, match="q: expected a 4-D tensor"):
        scorer(q[0], k)
    with pytest.raises(ValueError, match=r"k: the number of KV heads \(3\) must divide"):
        scorer(q, torch.randn(1, 3, 10, 8))
    with pytest.raises(ValueError, match="q: expected 1 <= Sq <= Skv = 5"):
        scorer(q, k[:, :, :5])
    with pytest.raises(ValueError, match=r"k: expected dtype torch\.float32 like q"):
        scorer(q, k.double())


def test_scorer_field_validation_messages() -> None:
    with pytest.raises(ValueError, match=r"recent_frac: expected a value in \[0, 1\]"):
        ProbeScorer(recent_frac=1.5)
    with pytest.raises(ValueError, match="denominator: expected 'causal' or 'probe_count'"):
        ProbeScorer(denominator="rows")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_probes: expected an int >= 1, got 0"):
        ProbeScorer(min_probes=0)
    with pytest.raises(ValueError, match="kernel: expected an odd pooling kernel, got 4"):
        SnapKVScorer(kernel=4)
    with pytest.raises(ValueError, match="scale: expected a positive float or None"):
        AccumulatedAttentionScorer(scale=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scorer_rejects_mixed_devices() -> None:
    q, k, _ = random_qkv(1, 2, 1, 8, 8)
    with pytest.raises(ValueError, match="q on cpu, k on cuda"):
        ProbeScorer()(q, k.cuda())


@pytest.mark.parametrize(
    "scorer",
    [
        ProbeScorer(recent_frac=0.25, random_frac=0.25, impl="torch"),
        AccumulatedAttentionScorer(rows_per_chunk=16),
        SnapKVScorer(window=8),
    ],
    ids=["probe", "accumulated", "snapkv"],
)
def test_fp16_outlier_channel_does_not_overflow_the_logits(scorer: Scorer) -> None:
    # raw q.k ~ 9e4 > 65504: the old fp16 matmul gave inf logits, NaN mass and (through the
    # allocator) a silent budget of 1. Oracle: the same fp16 values scored from float64 inputs.
    q, k, _ = random_qkv(1, 4, 2, 48, 64)
    q16, k16 = (t.half() for t in with_outlier_channel(q, k, 300.0))
    got = scorer(q16, k16)
    want = scorer(q16.double(), k16.double())
    assert got.mass.dtype == torch.float32 and got.mass.isfinite().all()
    # fp32 accumulation of q.k terms up to 9e4: ~sqrt(D) * 6e-8 * 9e4 / 8 ~ 5e-3 logit error, so
    # probabilities carry ~5e-3 relative error (measured: <= 2e-3 relative to the largest mass)
    torch.testing.assert_close(got.mass, want.mass, rtol=1e-2, atol=1e-4)
    finite = want.normalized.isfinite()  # SnapKV's window is +inf by design
    assert torch.equal(finite, got.normalized.isfinite())
    torch.testing.assert_close(
        got.normalized[finite], want.normalized[finite], rtol=1e-2, atol=1e-4
    )


def test_probe_positions_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="sq: expected an int >= 1, got 0"):
        probe_positions(0)
    with pytest.raises(TypeError, match="sq: expected an int, got float"):
        probe_positions(8.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"random_frac: expected a value in \[0, 1\]"):
        probe_positions(8, random_frac=2.0)
    with pytest.raises(ValueError, match="max_recent: expected an int >= 0, got -1"):
        probe_positions(8, max_recent=-1)
    with pytest.raises(ValueError, match="seed: expected an int >= 0, got -2"):
        probe_positions(8, seed=-2)
