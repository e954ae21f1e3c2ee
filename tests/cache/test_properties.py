"""Hypothesis properties of the cache bookkeeping: crop, reorder, positions (CPU, tiny shapes).

The default 4/2-bit quantizer is used throughout, so crops really cut through quantized chunks;
the properties are exact (``torch.equal``) because crop and reorder never re-quantize.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.cache.helpers import check_layout, random_keep, reference_block_mass, walked_bytes
from zipvl.cache import ZipVLCache, last_query_mass
from zipvl.quant import IdentityKVQuantizer
from zipvl.types import equalize_keep_counts

# these tests cover the chunked storage (any KVQuantizer); the paged storage of the
# ZipCache layouts has its own tests in tests/test_decode.py
ChunkedCache = functools.partial(ZipVLCache, storage="chunked")

HKV, G, D = 2, 2, 8


@dataclass(frozen=True)
class Run:
    batch: int
    prompt: int
    steps: int
    recompress_every: int
    sink_tokens: int
    seed: int

    @property
    def total(self) -> int:
        return self.prompt + self.steps


runs = st.builds(
    Run,
    batch=st.integers(1, 3),
    prompt=st.integers(1, 12),
    steps=st.integers(0, 14),
    recompress_every=st.integers(1, 6),
    sink_tokens=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)


def build(run: Run) -> ZipVLCache:
    """Prefill with a random keep mask, then ``steps`` decode steps."""
    torch.manual_seed(run.seed)
    cache = ChunkedCache(1, recompress_every=run.recompress_every, sink_tokens=run.sink_tokens)
    b = run.batch
    k = torch.randn(b, HKV, run.prompt, D, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cache.prefill(0, k, v, random_keep(b, HKV, run.prompt, run.prompt // 2, "cpu", run.seed))
    for _ in range(run.steps):
        q = torch.randn(b, HKV * G, 1, D, dtype=torch.bfloat16)
        k1, v1 = torch.randn(2, b, HKV, 1, D, dtype=torch.bfloat16)
        cache.decode_step(0, q, k1, v1)
    return cache


@given(run=runs, data=st.data())
def test_crop_keeps_an_exact_prefix(run: Run, data: st.DataObject) -> None:
    cache = build(run)
    before_k, before_v = cache.dense_kv(0)
    n = data.draw(st.integers(1, run.total), label="n")
    if data.draw(st.booleans(), label="negative"):
        cache.crop(n - run.total)  # transformers' convention: remove the last positions
    else:
        cache.crop(n)  # legacy absolute length
    layer = cache.layers[0]
    assert cache.get_seq_length(0) == n
    got_k, got_v = cache.dense_kv(0)
    assert torch.equal(got_k, before_k[:, :, :n]) and torch.equal(got_v, before_v[:, :, :n])
    check_layout(layer)
    assert sum(layer.tokens_at_bits().values()) == n
    assert cache.nbytes() == walked_bytes(layer)
    # new tokens continue at position n
    k1, v1 = torch.randn(2, run.batch, HKV, 1, D, dtype=torch.bfloat16)
    got_k, _ = cache.update(k1, v1, 0)
    assert torch.equal(got_k, torch.cat([before_k[:, :, :n], k1], dim=-2))


@given(run=runs)
def test_crop_zero_is_a_noop_and_crop_to_zero_empties(run: Run) -> None:
    cache = build(run)
    before_k, _ = cache.dense_kv(0)
    cache.crop(0)  # transformers >= 5.17: remove nothing
    assert torch.equal(cache.dense_kv(0)[0], before_k)
    cache.crop_to(0)
    assert cache.get_seq_length(0) == 0 and cache.nbytes() == 0
    k, v = torch.randn(2, run.batch, HKV, 3, D, dtype=torch.bfloat16)
    assert cache.update(k, v, 0)[0] is k  # a new prefill
    assert cache.layers[0].has_pending_prefill


@given(run=runs, data=st.data())
def test_reorder_then_inverse_is_identity(run: Run, data: st.DataObject) -> None:
    cache = build(run)
    before_k, before_v = cache.dense_kv(0)
    perm = torch.tensor(data.draw(st.permutations(range(run.batch)), label="perm"))
    cache.reorder_cache(perm)  # type: ignore[arg-type]
    got_k, got_v = cache.dense_kv(0)
    assert torch.equal(got_k, before_k[perm]) and torch.equal(got_v, before_v[perm])
    cache.reorder_cache(perm.argsort())  # type: ignore[arg-type]
    got_k, got_v = cache.dense_kv(0)
    assert torch.equal(got_k, before_k) and torch.equal(got_v, before_v)
    assert cache.nbytes() == walked_bytes(cache.layers[0])


@given(run=runs, data=st.data())
def test_beam_expansion_and_selection(run: Run, data: st.DataObject) -> None:
    cache = build(run)
    before_k, _ = cache.dense_kv(0)
    repeats = data.draw(st.integers(1, 3), label="repeats")
    cache.batch_repeat_interleave(repeats)
    assert cache.batch_size == run.batch * repeats
    assert torch.equal(cache.dense_kv(0)[0], before_k.repeat_interleave(repeats, dim=0))
    mask = torch.tensor(
        data.draw(
            st.lists(st.booleans(), min_size=run.batch * repeats, max_size=run.batch * repeats)
        )
    )
    if not mask.any():
        mask[0] = True
    cache.batch_select_indices(mask)
    expected = before_k.repeat_interleave(repeats, dim=0)[mask]
    assert torch.equal(cache.dense_kv(0)[0], expected)
    # decoding goes on with the new batch
    b = int(mask.sum())
    q = torch.randn(b, HKV * G, 1, D, dtype=torch.bfloat16)
    k1, v1 = torch.randn(2, b, HKV, 1, D, dtype=torch.bfloat16)
    assert cache.decode_step(0, q, k1, v1)[0].shape == (b, HKV, run.total + 1, D)


@given(
    prompt=st.integers(1, 10),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=8),
    r=st.integers(1, 7),
    sinks=st.integers(0, 5),
)
def test_positions_bookkeeping(prompt: int, sizes: list[int], r: int, sinks: int) -> None:
    """Any sequence of update sizes: lengths, mask sizes, contiguous layout, block count."""
    cache = ChunkedCache(quantizer=IdentityKVQuantizer(), recompress_every=r, sink_tokens=sinks)
    k, v = torch.randn(2, 1, HKV, prompt, D)
    cache.prefill(0, k, v, None)
    ks, n = [k], prompt
    for size in sizes:
        assert cache.get_mask_sizes(size, 0) == (n + size, 0)
        k1, v1 = torch.randn(2, 1, HKV, size, D)
        ks.append(k1)
        got_k, _ = cache.update(k1, v1, 0)
        n += size
        assert got_k.shape[-2] == n == cache.get_seq_length(0)
        cache.compress_tail(0, torch.randn(1, HKV * G, size, D), keys=got_k)
        check_layout(cache.layers[0])
        assert cache.layers[0].tail_length < r
    layer = cache.layers[0]
    to_tail = n - max(prompt, min(sinks, n))  # decode tokens not absorbed by the sinks
    assert layer.decode_blocks == to_tail // r and layer.tail_length == to_tail % r
    assert torch.equal(cache.dense_kv(0)[0], torch.cat(ks, dim=-2))


@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 12)),
    seed=st.integers(0, 2**16),
    density=st.floats(0.0, 1.0),
)
def test_equalize_counts_only_promotes_the_latest_unkept(
    shape: tuple[int, int, int], seed: int, density: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) < density
    out = equalize_keep_counts(keep)
    counts = out.sum(-1)
    assert bool((counts == keep.sum(-1).max()).all())  # rectangular, at the largest count
    assert bool((out | ~keep).all())  # a superset: nothing is demoted
    promoted = out & ~keep
    # every promoted position lies after every unkept position that was not promoted
    pos = torch.arange(shape[-1]).expand(shape)
    last_left = torch.where(~keep & ~out, pos, -1).amax(-1)
    first_promoted = torch.where(promoted, pos, shape[-1]).amin(-1)
    assert bool((first_promoted > last_left).all())


@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 3),
    g=st.integers(1, 3),
    n=st.integers(1, 20),
    temp=st.floats(0.1, 8.0),
    seed=st.integers(0, 2**16),
)
def test_last_query_mass_matches_reference(
    b: int, hkv: int, g: int, n: int, temp: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, 2, D, generator=gen) * temp
    k = torch.randn(b, hkv, n, D, generator=gen)
    got = last_query_mass(q, k)
    assert got.shape == (b, hkv, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference_block_mass(q, k), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.full((b, hkv), float(g)))
    perm = torch.randperm(n, generator=gen)
    torch.testing.assert_close(last_query_mass(q, k[:, :, perm]), got[:, :, perm])
