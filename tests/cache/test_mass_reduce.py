"""A cache whose KV heads are split over processes (tensor parallelism) stores, on every
process, exactly what one process stores for those heads: ``mass_reduce`` is called once per
plan (the prefill and every decode block), on both storages."""

from __future__ import annotations

import threading

import pytest
import torch

from zipvl.cache import ZipVLCache
from zipvl.config import ZipVLConfig
from zipvl.models import make_cache, zipvl_attention
from zipvl.quant import KIVIKVQuantizer
from zipvl.testing.inputs import random_qkv


class ThreadAllReduce:
    """An all-reduce SUM between threads (one per fake process), with a call count per rank:
    a stand-in for ``AllReduceMass`` that needs no process group."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world

    def rank(self, r: int):
        def reduce(local: torch.Tensor) -> torch.Tensor:
            self.calls[r] += 1
            self.slots[r] = local
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0])  # same order on every rank
            self.barrier.wait()  # nobody overwrites a slot before all have read
            assert isinstance(total, torch.Tensor)
            return total

        return reduce


@pytest.mark.parametrize("storage", ["paged", "chunked"])
def test_cache_with_split_heads_compresses_like_one_process(storage: str) -> None:
    """Two threads, each a 'rank' with half of the KV heads of one layer, run prefill and
    decode through ``zipvl_attention`` with a cache holding a summing ``mass_reduce``: every
    prefill and decode-block plan calls it once, and each rank stores exactly what the
    single-process cache stores for its heads."""
    b, hq, hkv, s, d, r, steps = 2, 4, 2, 40, 16, 8, 17
    q, k, v = random_qkv(b, hq, hkv, s + steps, d, seed=5)
    config = ZipVLConfig(recompress_every=r, tau=0.9)
    if storage == "chunked":
        config = ZipVLConfig(recompress_every=r, tau=0.9, quantizer=KIVIKVQuantizer(2, 16))

    def run(heads: slice, reduce=None) -> ZipVLCache:
        g = hq // hkv
        qh = q[:, heads.start * g : heads.stop * g]
        kh, vh = k[:, heads], v[:, heads]
        cache = make_cache(config, 1, mass_reduce=reduce)
        zipvl_attention(qh[:, :, :s], kh[:, :, :s], vh[:, :, :s], config=config, cache=cache)
        for t in range(s, s + steps):
            sl = slice(t, t + 1)
            zipvl_attention(qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], config=config, cache=cache)
        return cache

    whole = run(slice(0, hkv))
    fake = ThreadAllReduce(2)
    caches: dict[int, ZipVLCache] = {}
    errors: list[BaseException] = []

    def rank(i: int) -> None:
        try:
            caches[i] = run(slice(i, i + 1), fake.rank(i))
        except BaseException as err:  # surfaced below
            fake.barrier.abort()
            errors.append(err)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    blocks = steps // r
    assert whole.layer(0).decode_blocks == blocks
    assert fake.calls == [1 + blocks, 1 + blocks]  # one per plan: the prefill and each block
    kw, vw = whole.layer(0).dense_kv()
    for i in range(2):
        layer = caches[i].layer(0)
        assert layer.decode_blocks == blocks
        assert layer.tokens_at_bits() == whole.layer(0).tokens_at_bits()
        ki, vi = layer.dense_kv()
        assert torch.equal(ki, kw[:, i : i + 1]) and torch.equal(vi, vw[:, i : i + 1])


def test_the_cache_hands_mass_reduce_to_every_layer() -> None:
    def reduce(m: torch.Tensor) -> torch.Tensor:
        return m

    config = ZipVLConfig(layers={1: {"bits_high": 16, "bits_low": 16}})  # a chunked layer
    cache = make_cache(config, 2, mass_reduce=reduce)
    assert cache.mass_reduce is reduce
    assert [cache.layer(i).mass_reduce for i in range(2)] == [reduce, reduce]
    assert {cache.report().layers[i].storage for i in range(2)} == {"paged", "chunked"}
    assert make_cache(config, 2).layer(0).mass_reduce is None
    with pytest.raises(TypeError, match=r"mass_reduce: expected None or a callable"):
        ZipVLCache(2, mass_reduce="sum")  # type: ignore[arg-type]
