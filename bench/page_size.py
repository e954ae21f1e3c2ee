"""Page size: bytes against accuracy of the paged 4/2-bit cache (CPU, no GPU needed).

For LongVA-7B head dim 128 and r = 0.4, every page size in --pages: the bytes per token with
every parameter counted (``PageFormat.page_bytes`` + 2 bits of class maps) over bf16, and the
SQNR (dB) of keys and values round-tripped through ``PagedKVStore`` on synthetic K/V with the
structure real caches have (a few outlier key channels, heavy-tailed values), and the relative
error of one decode query's attention output against float64 attention over the unquantized
K/V. Larger pages share key parameters and channel divisors over more tokens: fewer bytes, a
coarser grid.

Run:  python bench/page_size.py --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, markdown_table, progress, write_result

from zipvl.cache import PagedKVStore, PageFormat
from zipvl.decode import decode_attention


def synthetic_kv(b: int, h: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with outlier channels (per-channel scale spread, as RoPE'd keys have) and
    heavy-tailed values (Student-t, 4 degrees of freedom)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(d)
    scale[torch.randperm(d, generator=g)[: d // 16]] = 8.0
    k = torch.randn(b, h, n, d, generator=g) * scale
    t = torch.distributions.StudentT(4.0)
    torch.manual_seed(seed)
    v = t.sample((b, h, n, d))
    return k, v


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum()))


def main(argv: list[str] | None = None) -> dict:
    fmt_cls = argparse.RawTextHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=fmt_cls)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--pages", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    b, h, d, n = 1, 4, 128, args.tokens
    k, v = synthetic_kv(b, h, n, d, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    keep = torch.rand(b, h, n, generator=g) < args.ratio
    q = torch.randn(b, 28, 1, d, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), enable_gqa=True
    )
    rows = []
    for page in args.pages:
        progress(f"page {page}")
        fmt = PageFormat(page_size=page)
        store = PagedKVStore(fmt, batch_size=b, num_heads=h, head_dim=d, dtype=torch.float32,
                             device="cpu", recompress_every=100, sink_tokens=0)  # fmt: skip
        store.write_prefill(k, v, keep, None, 0)
        dk, dv = store.dense_kv()
        out, _ = decode_attention(q, store, impl="reference")
        per_token = args.ratio * fmt.page_bytes(0, d) + (1 - args.ratio) * fmt.page_bytes(1, d)
        bytes_ratio = (per_token / page + 2 / 8) / (2 * d * 2)
        rows.append(
            {
                "page": page,
                "bytes_vs_bf16": bytes_ratio,
                "key_sqnr_db": sqnr_db(k, dk),
                "value_sqnr_db": sqnr_db(v, dv),
                "attn_out_rel_err": float((out.double() - ref).norm() / ref.norm()),
                "fp_staged_tokens_per_row_max": 2 * (page - 1),
            }
        )
    print(f"# page size: bytes vs accuracy, D={d}, r={args.ratio}, {n} tokens, synthetic K/V")
    print(markdown_table(rows))
    payload = {"bench": "page_size", "env": env_info(), "rows": rows, "args": vars(args)}
    write_result("page_size", payload)
    return payload


if __name__ == "__main__":
    out = main()
    Path("bench/results/cpu").mkdir(parents=True, exist_ok=True)
    Path("bench/results/cpu/page_size.json").write_text(json.dumps(out, sort_keys=True) + "\n")
