"""End-to-end prefill and decode of the reference decoder on the GPU (targets P3, P7).

The model is ``zipvl.models.llama.Transformer`` at LongVA-7B / Qwen2-7B shapes (28 layers, 28
query heads, 4 KV heads, head dim 128, hidden 3584, MLP 18944, bf16, random weights). Random
weights do not decide a meaningful ratio, so the sparse runs fix it (``--ratio``, default 0.42).

Variants, in one process on one GPU:
    dense    every layer dense causal SDPA in prefill; bf16 (identity) KV cache read by SDPA
    zipvl    probe scoring (64 + 64 probes) + fixed-ratio selection + gathered causal SDPA;
             mixed 4/2-bit KV cache (ZipCache quantizers) read by the fused decode kernel

Measured: prefill time of the 28 layers (the LM head is applied to the last position only), the
Amdahl bound of the speed-up (attention is the only part that gets faster: 1 / (f_other +
f_attn * r^2) with f measured on the dense run from a one-layer split), and the peak GPU memory of
prefill + ``--decode`` decode steps, with the KV bytes each cache holds.

Run:  python bench/gpu_e2e.py --lengths 32768 131072 --decode 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, markdown_table, median_ms, progress, write_result

from zipvl import FixedRatioAllocator, ZipVLConfig
from zipvl.models.llama import ModelArgs, Transformer


def prefill(model: Transformer, x: torch.Tensor, cache, cfg: ZipVLConfig) -> torch.Tensor:
    """All layers over embeddings x (B, S, E); logits of the last position only."""
    b, s = x.shape[:2]
    positions = torch.arange(s, device=x.device).expand(b, s)
    for layer in model.layers:
        x = layer(x, cache=cache, positions=positions, key_valid=None, config=cfg)
    return model.lm_head(model.norm(x[:, -1:]))  # (B, 1, V)


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    fmt = argparse.RawTextHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--ratio", type=float, default=0.42)
    ap.add_argument("--decode", type=int, default=256, help="decode steps for peak memory")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    env = env_info()
    progress(f"device {env['device']}, torch {env['torch']}, commit {env['commit']}")
    torch.manual_seed(0)
    margs = ModelArgs.from_name("longva-7b", n_layer=args.layers, max_positions=max(args.lengths))
    with torch.device("cuda"):
        model = Transformer(margs).to(torch.bfloat16).eval()
    weights = sum(p.nbytes for p in model.parameters())
    configs = {
        "dense": ZipVLConfig(
            sparse_prefill=False, bits_high=16, bits_low=16, decode_impl="reference"
        ),
        "zipvl": ZipVLConfig(allocator=FixedRatioAllocator(args.ratio), probe_cap=64),
    }
    hq, hkv, d = margs.n_head, margs.n_local_heads, margs.head_dim
    rows = []
    for s in args.lengths:
        x = torch.randn(1, s, margs.dim, device="cuda", dtype=torch.bfloat16) * 0.02
        # attention share of one dense layer, measured by splitting the block
        q = torch.randn(1, hq, s, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16)
        sdpa = F.scaled_dot_product_attention
        attn_ms = median_ms(lambda q=q, k=k: sdpa(q, k, k, is_causal=True, enable_gqa=True))
        del q, k
        row: dict[str, float | int] = {"S": s}
        for name, cfg in configs.items():
            progress(f"S = {s}: {name} prefill")
            times = []
            with torch.no_grad():
                for _ in range(args.repeats + 1):  # the first run warms up (compiles, tunes)
                    cache = model.new_cache(cfg)
                    times.append(timed(lambda cache=cache, cfg=cfg: prefill(model, x, cache, cfg)))
                    del cache
            row[f"{name}_prefill_ms"] = min(times[1:])
            progress(f"S = {s}: {name} prefill + {args.decode} decode steps (peak memory)")
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                cache = model.new_cache(cfg)
                logits = prefill(model, x, cache, cfg)
                tok = logits[:, -1].argmax(-1)[:, None]
                for _ in range(2):  # warm-up steps: kernel autotuning stays out of the timing
                    logits = model(tok, cache=cache, config=cfg)
                    tok = logits[:, -1].argmax(-1)[:, None]
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for i in range(args.decode):
                    logits = model(tok, cache=cache, config=cfg)
                    tok = logits[:, -1].argmax(-1)[:, None]
                    if (i + 1) % 64 == 0:
                        progress(f"  decode {i + 1}/{args.decode}")
                torch.cuda.synchronize()
                decode_ms = (time.perf_counter() - t0) * 1e3 / max(args.decode, 1)
            row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row[f"{name}_kv_gib"] = cache.nbytes() / 2**30
            row[f"{name}_decode_ms_per_tok"] = decode_ms
            del cache
            torch.cuda.empty_cache()
        other_ms = row["dense_prefill_ms"] / args.layers - attn_ms  # per layer
        f_attn = attn_ms / (attn_ms + other_ms)
        amdahl = 1.0 / ((1 - f_attn) + f_attn * args.ratio**2)
        speedup = row["dense_prefill_ms"] / row["zipvl_prefill_ms"]
        row.update(
            {
                "attn_share_dense": f_attn,
                "prefill_speedup": speedup,
                "amdahl_bound": amdahl,
                "frac_of_bound": speedup / amdahl,
                "peak_reduction": 1 - row["zipvl_peak_gib"] / row["dense_peak_gib"],
                "peak_reduction_ex_weights": 1
                - (row["zipvl_peak_gib"] - weights / 2**30)
                / (row["dense_peak_gib"] - weights / 2**30),
                "kv_ratio": row["zipvl_kv_gib"] / row["dense_kv_gib"],
            }
        )
        rows.append(row)
        torch.cuda.empty_cache()

    print(f"# end to end, longva-7b shapes, {args.layers} layers, bf16, r={args.ratio}")
    print(f"# {env['device']} torch {env['torch']} triton {env['triton']} commit {env['commit']}")
    print(f"# weights {weights / 2**30:.1f} GiB; decode steps {args.decode}")
    print(markdown_table(rows))
    payload = {"bench": "gpu_e2e", "env": env, "weights_gib": weights / 2**30, "rows": rows}
    write_result("gpu_e2e", payload)


if __name__ == "__main__":
    main()
