"""Decode attention over a mixed 4/2-bit cache vs bf16 SDPA on the GPU (targets P4, P5, P6).

LongVA-7B shapes (28 query heads, 4 KV heads, head dim 128), one layer, one decoding query, a
cache of N tokens of which a fraction r (default 0.4) are important (4-bit) and the rest 2-bit
(ZipCache quantizers), plus a 50-token bf16 tail, as ZipVLCache stores it.

Variants, all in one process:
    bf16_sdpa      SDPA over the bf16 cache (the baseline; PyTorch picks its decode kernel)
                   (both it and the fused path are also timed as CUDA-graph replays)
    fused          zipvl.decode.decode_attention(impl="triton"): reads the packed codes
    dequant_sdpa   dequantize the chunk to bf16, then SDPA (what a dequantize-on-read cache does)

Floor: the bytes each variant must read over the measured copy bandwidth.

Run:  python bench/gpu_decode.py --batch 1 8 --tokens 32768 131072
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ceilings,
    env_info,
    markdown_table,
    median_ms,
    median_ms_graph,
    progress,
    write_result,
)

from zipvl.decode import decode_attention, decode_read_bytes
from zipvl.quant import MixedPrecisionKVQuantizer


def random_keep(b: int, h: int, n: int, ratio: float, device: str) -> torch.Tensor:
    """(B, Hkv, N) bool with exactly round(ratio * N) True per row."""
    kept = round(ratio * n)
    scores = torch.rand(b, h, n, device=device)
    idx = scores.topk(kept, dim=-1).indices
    return torch.zeros(b, h, n, dtype=torch.bool, device=device).scatter_(-1, idx, True)


def main() -> None:
    fmt = argparse.RawTextHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-t", type=int, nargs="+", default=[0, 64, 128], help="0 = autotuned")
    args = ap.parse_args()

    env = env_info()
    progress(f"device {env['device']}, torch {env['torch']}, commit {env['commit']}")
    ceil = ceilings()
    bw = ceil["copy_gbs"] * 1e9
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    quantizer = MixedPrecisionKVQuantizer()
    rows = []
    for b in args.batch:
        for n in args.tokens:
            progress(f"B = {b}, N = {n}")
            dev = "cuda"
            k = torch.randn(b, hkv, n, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn(b, hkv, n, d, device=dev, dtype=torch.bfloat16)
            tk = torch.randn(b, hkv, 50, d, device=dev, dtype=torch.bfloat16)
            tv = torch.randn(b, hkv, 50, d, device=dev, dtype=torch.bfloat16)
            q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
            chunk = quantizer.quantize(k, v, random_keep(b, hkv, n, args.ratio, dev))
            segs = [chunk, (tk, tv)]
            kf = torch.cat([k, tk], dim=2)  # (B, Hkv, N + 50, D) the bf16 cache
            vf = torch.cat([v, tv], dim=2)

            def bf16_sdpa():
                return F.scaled_dot_product_attention(q, kf, vf, enable_gqa=True)

            def dequant_sdpa():
                kd, vd = chunk.dequantize(torch.bfloat16)
                kd = torch.cat([kd, tk], dim=2)
                vd = torch.cat([vd, tv], dim=2)
                return F.scaled_dot_product_attention(q, kd, vd, enable_gqa=True)

            # correctness on these inputs: fused vs float32 attention over the same stored cache
            kd, vd = chunk.dequantize(torch.float32)
            ref = F.scaled_dot_product_attention(
                q.float(), torch.cat([kd, tk.float()], 2), torch.cat([vd, tv.float()], 2),
                enable_gqa=True,
            )  # fmt: skip
            t_base = median_ms(bf16_sdpa)
            t_deq = median_ms(dequant_sdpa)
            fused_ms: dict[int, float] = {}
            rel_err = 0.0
            for bt in args.block_t:
                tile = bt or None
                out = decode_attention(q, segs, impl="triton", block_t=tile)
                rel_err = max(rel_err, ((out.float() - ref).norm() / ref.norm()).item())
                fused_ms[bt] = median_ms(lambda tile=tile: decode_attention(q, segs, block_t=tile))
            best_bt = min(fused_ms, key=lambda x: fused_ms[x])
            t_fused = fused_ms[best_bt]
            # decode steps run from CUDA graphs in practice (no host sync in the step): the
            # graph replay removes the Python launch overhead of both paths
            t_base_g = median_ms_graph(bf16_sdpa)
            t_fused_g = median_ms_graph(lambda: decode_attention(q, segs, block_t=best_bt or None))
            bf16_bytes = kf.nbytes + vf.nbytes
            fused_bytes = decode_read_bytes(segs)
            rows.append(
                {
                    "B": b,
                    "N": n,
                    "bf16_sdpa_ms": t_base,
                    "fused_ms": t_fused,
                    "block_t": best_bt,
                    "dequant_sdpa_ms": t_deq,
                    "speedup_vs_bf16": t_base / t_fused,
                    "bf16_sdpa_graph_ms": t_base_g,
                    "fused_graph_ms": t_fused_g,
                    "speedup_graph": t_base_g / t_fused_g,
                    "fused_graph_frac_of_copy_bw": fused_bytes / (t_fused_g * 1e-3) / bw,
                    "dequant_slowdown": t_deq / t_base,
                    "bytes_ratio": fused_bytes / bf16_bytes,
                    "bf16_frac_of_copy_bw": bf16_bytes / (t_base * 1e-3) / bw,
                    "fused_frac_of_copy_bw": fused_bytes / (t_fused * 1e-3) / bw,
                    "fused_rel_err": rel_err,
                    **{f"fused_bt{bt}_ms": ms for bt, ms in fused_ms.items()},
                }
            )
            torch.cuda.empty_cache()

    print(f"# decode attention, one layer, Hq={hq} Hkv={hkv} D={d}, r={args.ratio} (4/2 bits)")
    print(f"# {env['device']} torch {env['torch']} triton {env['triton']} commit {env['commit']}")
    print(markdown_table(rows))
    write_result("gpu_decode", {"bench": "gpu_decode", "env": env, "ceilings": ceil, "rows": rows})


if __name__ == "__main__":
    main()
