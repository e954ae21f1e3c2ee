"""CPU pytest-benchmark suite of ``zipvl.quant`` (host timings of the PyTorch reference paths).

What is timed, one ``group=`` per operation:

* ``quant.quantize_pack``: ``quantize_pack(x, QuantSpec(bits, "channel"))`` (the token-wise
  write path of values; choose_qparams + quantize + pack) at 2 and 4 bits.
* ``quant.dequantize``: ``unpack`` + ``dequantize`` of the same packed codes back to bf16.
* ``quant.mixed_quantize``: ``MixedPrecisionKVQuantizer().quantize(k, v, keep)`` with 40 % of
  the tokens kept (4-bit ZipCache) and the rest at 2 bits: split, two quantizers, bitmap.
* ``quant.mixed_dequantize``: ``QuantizedKV.dequantize()`` of that chunk (both parts and the
  scatter back to position order, the cache's reference read).

Shapes: one layer of the LongVA / Qwen2-7B cache of targets.md at CPU-friendly lengths:
B = 1, Hkv = 4, D = 128, T in {1024, 4096}, bf16. ``extra_info`` carries the bf16 input bytes
and the stored bytes, so a run can be turned into GB/s. These are host timings for regressions
on CPU, not GPU performance figures (the Triton write path is only timed on a GPU).

Run::

    python -m pytest bench/bench_quant.py --benchmark-enable -q
    python -m pytest bench/bench_quant.py --benchmark-enable --benchmark-json=out.json

(``--benchmark-disable`` is the repository default, under which each case runs once as a
smoke test.)
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from zipvl.quant import (
    MixedPrecisionKVQuantizer,
    QuantSpec,
    dequantize,
    quantize_pack,
    unpack,
)

B, HKV, D = 1, 4, 128
DTYPE = torch.bfloat16
RATIO = 0.4


@dataclass(frozen=True)
class Case:
    """One benchmark point: a chunk of ``tokens`` tokens."""

    tokens: int

    @property
    def id(self) -> str:
        return f"t{self.tokens}"


CASES = [Case(1024), Case(4096)]
BITS = [2, 4]


def _x(t: int) -> torch.Tensor:
    return torch.randn(B, HKV, t, D).to(DTYPE)  # (B, Hkv, T, D)


def _keep(t: int) -> torch.Tensor:
    p = round(RATIO * t)
    return torch.rand(B, HKV, t).argsort(dim=-1) < p  # (B, Hkv, T), p per row


def _info(benchmark, x: torch.Tensor, stored: int) -> None:
    benchmark.extra_info.update({"input_bytes": x.nbytes, "stored_bytes": stored})


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_quantize_pack(benchmark, case: Case, bits: int) -> None:
    benchmark.group = "quant.quantize_pack"
    x = _x(case.tokens)
    spec = QuantSpec(bits, "channel", param_dtype=torch.float16)
    packed, scale, _zero = benchmark.pedantic(
        lambda: quantize_pack(x, spec), rounds=10, warmup_rounds=1
    )
    assert packed.shape == (B, HKV, case.tokens, D * bits // 8)
    _info(benchmark, x, packed.nbytes + 2 * scale.to(torch.float16).nbytes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dequantize(benchmark, case: Case, bits: int) -> None:
    benchmark.group = "quant.dequantize"
    x = _x(case.tokens)
    spec = QuantSpec(bits, "channel", param_dtype=torch.float16)
    packed, scale, zero = quantize_pack(x, spec)

    def run() -> torch.Tensor:
        return dequantize(unpack(packed, bits), spec, scale, zero, DTYPE)

    out = benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    assert out.shape == x.shape
    _info(benchmark, x, packed.nbytes + 2 * scale.to(torch.float16).nbytes)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_mixed_quantize(benchmark, case: Case) -> None:
    benchmark.group = "quant.mixed_quantize"
    q = MixedPrecisionKVQuantizer()
    k, v, keep = _x(case.tokens), _x(case.tokens), _keep(case.tokens)
    qkv = benchmark.pedantic(lambda: q.quantize(k, v, keep), rounds=5, warmup_rounds=1)
    assert qkv.tokens_at_bits() == {
        4: round(RATIO * case.tokens),
        2: case.tokens - round(RATIO * case.tokens),
    }
    _info(benchmark, k, qkv.nbytes)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_mixed_dequantize(benchmark, case: Case) -> None:
    benchmark.group = "quant.mixed_dequantize"
    q = MixedPrecisionKVQuantizer()
    k, v = _x(case.tokens), _x(case.tokens)
    qkv = q.quantize(k, v, _keep(case.tokens))
    k_hat, _ = benchmark.pedantic(qkv.dequantize, rounds=10, warmup_rounds=1)
    assert k_hat.shape == k.shape and k_hat.dtype == DTYPE
    _info(benchmark, k, qkv.nbytes)
