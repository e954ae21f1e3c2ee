"""CPU pytest-benchmark suite of ``ZipVLCache`` (host timings of the reference paths).

What is timed, one ``group=`` per operation:

* ``cache.prefill_compress``: ``update`` + ``compress_prefill`` of an S-token prompt with 42 % of
  the tokens kept (the ratio behind the paper's 82.3 % attention-FLOP reduction): 4-bit kept,
  2-bit others (ZipCache quantizers).
* ``cache.decode_append``: one decode ``update`` (append to the fp tail and the dense read of
  all positions) at context N, no compression.
* ``cache.compress_block``: ``compress_tail`` of one full block of ``recompress_every`` = 100
  tokens at context N (score over all keys, Eq. 6 budget, top-k, quantize).
* ``cache.dense_read``: ``dense_kv`` at context N (dequantize every chunk, the reference read).

Shapes follow one KV-head group of the LongVA / Qwen2-7B layer of targets.md at CPU-friendly
sizes: B = 1, Hkv = 4, G = 7, D = 128, bf16. Each result carries the cache's bytes and its
compression against bf16 in ``extra_info``. These are host timings of the plain PyTorch
reference path, for regressions on CPU, not GPU performance figures.

Run::

    python -m pytest bench/bench_cache.py --benchmark-enable -q
    python -m pytest bench/bench_cache.py --benchmark-enable --benchmark-json=out.json

(``--benchmark-disable`` is the repository default, under which each case runs once as a
smoke test.)
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from zipvl.cache import ZipVLCache

B, HKV, G, D = 1, 4, 7, 128
DTYPE = torch.bfloat16
RATIO = 0.42
BLOCK = 100


@dataclass(frozen=True)
class Case:
    """One benchmark point: S prompt tokens (prefill) or N cached tokens (decode)."""

    tokens: int

    @property
    def id(self) -> str:
        return f"n{self.tokens}"


CASES = [Case(1024), Case(4096)]


def _kv(s: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(B, HKV, s, D, dtype=DTYPE), torch.randn(B, HKV, s, D, dtype=DTYPE)


def _keep(s: int) -> torch.Tensor:
    p = max(1, round(RATIO * s))
    order = torch.rand(B, HKV, s).argsort(dim=-1)  # (B, Hkv, S)
    return order < p


def _filled(case: Case, tail: int = 0) -> ZipVLCache:
    """A cache holding ``case.tokens`` positions: the prompt plus ``tail`` fp tail tokens."""
    cache = ZipVLCache(1, recompress_every=BLOCK)
    s = case.tokens - tail
    k, v = _kv(s)
    cache.prefill(0, k, v, _keep(s))
    if tail:
        cache.update(*_kv(tail), 0)
    return cache


def _info(benchmark: pytest.FixtureRequest, cache: ZipVLCache) -> None:
    rep = cache.report()
    benchmark.extra_info.update(  # type: ignore[attr-defined]
        {"bytes": rep.bytes, "bf16_bytes": rep.bf16_bytes, "compression": rep.compression}
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_prefill_compress(benchmark, case: Case) -> None:
    benchmark.group = "cache.prefill_compress"
    k, v = _kv(case.tokens)
    keep = _keep(case.tokens)

    def run() -> ZipVLCache:
        cache = ZipVLCache(1)
        cache.prefill(0, k, v, keep)
        return cache

    cache = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    _info(benchmark, cache)
    assert cache.get_seq_length(0) == case.tokens


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_decode_append(benchmark, case: Case) -> None:
    benchmark.group = "cache.decode_append"
    k1, v1 = _kv(1)

    def setup() -> tuple[tuple[ZipVLCache], dict[str, object]]:
        return (_filled(case, tail=BLOCK // 2),), {}

    def run(cache: ZipVLCache) -> torch.Tensor:
        return cache.update(k1, v1, 0)[0]

    out = benchmark.pedantic(run, setup=setup, rounds=10, warmup_rounds=1)
    assert out.shape[-2] == case.tokens + 1
    _info(benchmark, _filled(case, tail=BLOCK // 2))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_compress_block(benchmark, case: Case) -> None:
    benchmark.group = "cache.compress_block"
    q = torch.randn(B, HKV * G, 1, D, dtype=DTYPE)

    def setup() -> tuple[tuple[ZipVLCache], dict[str, object]]:
        return (_filled(case, tail=BLOCK),), {}

    def run(cache: ZipVLCache) -> ZipVLCache:
        assert cache.compress_tail(0, q) == 1
        return cache

    cache = benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)
    _info(benchmark, cache)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dense_read(benchmark, case: Case) -> None:
    benchmark.group = "cache.dense_read"
    cache = _filled(case, tail=BLOCK // 2)
    keys, _ = benchmark.pedantic(lambda: cache.dense_kv(0), rounds=10, warmup_rounds=1)
    assert keys.shape[-2] == case.tokens
    _info(benchmark, cache)
