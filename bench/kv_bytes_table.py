"""KV-cache bytes per token of LongVA-7B shapes: bf16 vs ZipVL's mixed 4/2-bit cache vs KIVI.

LongVA-7B's language model (Qwen2-7B, targets.md): 28 layers, 4 KV heads, head dim 128. For each
quantizer the bytes come from its own analytic ``bytes_per_token`` (codes + scales + zero points
+ CST channel divisors + the packed keep bitmap: every byte the cache holds), times 28 layers,
for important-token ratios r = 0.3 / 0.4 / 0.42 / 0.7 and two chunk lengths: a 16384-token
prefill chunk and a 100-token decode block (per-chunk parameters amortise over the chunk).
Each configuration is cross-checked against the ``nbytes`` of a real quantized chunk (one
layer, 2048 tokens). Target P6: at r = 0.4 with 4/2 bits, at most 0.20x the bf16 bytes.

Run (CPU, a few seconds)::

    python bench/kv_bytes_table.py

Prints a header, a GitHub-markdown table and, as the last line, one JSON document.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, markdown_table, write_result

from zipvl.quant import (
    IdentityKVQuantizer,
    KIVIKVQuantizer,
    KVQuantizer,
    MixedPrecisionKVQuantizer,
)

LAYERS, HKV, D = 28, 4, 128
RATIOS = (0.3, 0.4, 0.42, 0.7)
CHUNKS = (16384, 100)
P6_RATIO, P6_CHUNK, P6_TARGET = 0.4, 16384, 0.20


@dataclass(frozen=True)
class Case:
    """One table row: a quantizer at a kept ratio and chunk length."""

    name: str
    quantizer: KVQuantizer
    ratio: float | None  # None: the quantizer ignores the keep mask
    tokens: int


@dataclass(frozen=True)
class Result:
    case: Case
    bytes_per_token: float  # all layers
    vs_bf16: float
    bits_only: float  # ratio from the code widths alone, no metadata

    def row(self) -> dict[str, object]:
        return {
            "method": self.case.name,
            "r": "-" if self.case.ratio is None else self.case.ratio,
            "chunk tokens": self.case.tokens,
            "bytes/token (28 layers)": round(self.bytes_per_token, 1),
            "KiB/token": self.bytes_per_token / 1024,
            "vs bf16": self.vs_bf16,
            "compression": 1 / self.vs_bf16,
            "codes only vs bf16": self.bits_only,
        }


def _bf16_bytes() -> float:
    return LAYERS * IdentityKVQuantizer().bytes_per_token(HKV, D, dtype=torch.bfloat16)


def _verify(case: Case) -> None:
    """Analytic bytes must equal a real chunk's nbytes (one layer, 2048 tokens, batch 1)."""
    t = 2048
    r = 1.0 if case.ratio is None else case.ratio
    p = round(r * t)
    k = torch.randn(1, HKV, t, D, dtype=torch.bfloat16)
    v = torch.randn(1, HKV, t, D, dtype=torch.bfloat16)
    keep = torch.rand(1, HKV, t).argsort(dim=-1) < p  # (1, Hkv, T), p per row
    real = case.quantizer.quantize(k, v, keep).nbytes
    analytic = case.quantizer.bytes_per_token(HKV, D, kept_ratio=r, tokens=t) * t
    if abs(real - analytic) > 1e-6 * real:
        raise AssertionError(f"{case.name} r={r}: analytic {analytic} B != real {real} B")


def run(case: Case) -> Result:
    r = 1.0 if case.ratio is None else case.ratio
    per_layer = case.quantizer.bytes_per_token(HKV, D, kept_ratio=r, tokens=case.tokens)
    total = LAYERS * per_layer
    q = case.quantizer
    if isinstance(q, MixedPrecisionKVQuantizer):
        bits = r * getattr(q.high, "bits", 16) + (1 - r) * getattr(q.low, "bits", 16)
    else:
        bits = float(getattr(q, "bits", 16))
    return Result(case, total, total / _bf16_bytes(), bits / 16)


def main() -> None:
    cases: list[Case] = []
    for tokens in CHUNKS:
        cases.append(Case("bf16", IdentityKVQuantizer(), None, tokens))
        for r in RATIOS:
            cases.append(
                Case("ZipVL mixed 4/2 (ZipCache)", MixedPrecisionKVQuantizer(), r, tokens)
            )
        cases.append(Case("KIVI-4 (G=32)", KIVIKVQuantizer(4, 32), None, tokens))
        cases.append(Case("KIVI-2 (G=32)", KIVIKVQuantizer(2, 32), None, tokens))
    verified = {(c.name, c.ratio) for c in cases}
    for name, ratio in sorted(verified, key=str):
        _verify(next(c for c in cases if (c.name, c.ratio) == (name, ratio)))
    results = [run(c) for c in cases]
    env = env_info()
    print(f"# KV bytes per token, LongVA-7B shapes (L={LAYERS}, Hkv={HKV}, D={D})")
    print(f"# torch {env.get('torch')}, commit {env.get('commit')}; float16 parameters")
    print(f"# bf16 reference: {_bf16_bytes():.0f} B/token = {_bf16_bytes() / 1024:.0f} KiB/token")
    print(markdown_table([r.row() for r in results]))
    p6 = next(
        r
        for r in results
        if isinstance(r.case.quantizer, MixedPrecisionKVQuantizer)
        and r.case.ratio == P6_RATIO
        and r.case.tokens == P6_CHUNK
    )
    p6_decode = next(
        r
        for r in results
        if isinstance(r.case.quantizer, MixedPrecisionKVQuantizer)
        and r.case.ratio == P6_RATIO
        and r.case.tokens == 100
    )
    print(
        f"\nP6 (r = {P6_RATIO}, 4/2 bits, {P6_CHUNK}-token chunk, all metadata): "
        f"{p6.vs_bf16:.4f}x bf16 (target <= {P6_TARGET}): "
        f"{'PASS' if p6.vs_bf16 <= P6_TARGET else 'FAIL'}; "
        f"100-token decode blocks: {p6_decode.vs_bf16:.4f}x"
    )
    write_result(
        "kv_bytes_table",
        {
            "name": "kv_bytes_table",
            "env": env,
            "shape": {"layers": LAYERS, "kv_heads": HKV, "head_dim": D},
            "rows": [r.row() for r in results],
            "p6": {
                "ratio": P6_RATIO,
                "chunk_tokens": P6_CHUNK,
                "vs_bf16": p6.vs_bf16,
                "decode_block_vs_bf16": p6_decode.vs_bf16,
                "target": P6_TARGET,
                "pass": p6.vs_bf16 <= P6_TARGET,
            },
            "repro": "python bench/kv_bytes_table.py",
        },
    )


if __name__ == "__main__":
    main()
