"""What the better budget estimator costs on the GPU, against dense attention (target P2).

The offset-corrected estimator (``ProbeScorer.estimator_preset(128)``: 128 stratified probe rows,
the weighted column mass and the band from the fused kernels, the correction in PyTorch) against
the paper's scorer as the plan runs it (``ProbeScorer(max_recent=64, max_random=64)``), at
LongVA-7B shapes (28 query heads, 4 KV heads, head dim 128, bf16, batch 1).

Columns, all in one process, per prompt length S:
    dense_ms            causal SDPA over all S tokens on cuDNN (the fastest dense backend here)
    score_<e>_ms        the scorer alone, eager (launches included)
    score_<e>_graph_ms  the same replayed from a CUDA graph (its GPU time)
    plan_<e>_fixed_ms   plan_tokens(impl="auto") with FixedRatioAllocator(0.42): what P2 counts
                        (scoring + ratio allocation + selection; captured up to 64k)
    plan_<e>_tau_ms     the same with CumulativeMassAllocator(0.975), where the estimator matters
    <col>_%             that time as a percentage of dense_ms (P2: <= 2 % from 32k)
with <e> = sum (the paper's probes, plain sum) and offset (the better estimator).

Run:  python bench/gpu_estimator_cost.py --lengths 32768 131072
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    env_info,
    markdown_table,
    median_ms,
    median_ms_graph,
    progress,
    random_qkv,
    write_result,
)

from zipvl.sparsity import (
    CumulativeMassAllocator,
    FixedRatioAllocator,
    ProbeScorer,
    TopKSelector,
    plan_tokens,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    args = ap.parse_args()
    env = env_info()
    progress(f"device {env['device']}, torch {env['torch']}, commit {env['commit']}")
    hq, hkv, d = 28, 4, 128
    scorers = {"sum": ProbeScorer(max_recent=64, max_random=64),
               "offset": ProbeScorer.estimator_preset(128)}  # fmt: skip
    allocators = {"fixed": FixedRatioAllocator(0.42), "tau": CumulativeMassAllocator(0.975)}
    sel = TopKSelector()
    rows: list[dict[str, Any]] = []
    for s in args.lengths:
        progress(f"S = {s}")
        q, k, v = random_qkv(s, hq, hkv, d, seed=s)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense = median_ms(lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True))  # fmt: skip
        row: dict[str, Any] = {"S": s, "dense_backend": "cudnn", "dense_ms": dense}
        for e, sc in scorers.items():
            row[f"score_{e}_ms"] = median_ms(lambda sc=sc: sc(q, k))
            row[f"score_{e}_graph_ms"] = median_ms_graph(lambda sc=sc: sc(q, k))
            for a, alloc in allocators.items():

                def plan(sc: ProbeScorer = sc, alloc: Any = alloc) -> object:
                    return plan_tokens(q, k, scorer=sc, allocator=alloc, selector=sel)

                row[f"plan_{e}_{a}_ms"] = median_ms(plan)
            progress(
                f"  {e}: score {row[f'score_{e}_ms']:.3f} ms (graph "
                f"{row[f'score_{e}_graph_ms']:.3f}), plan fixed {row[f'plan_{e}_fixed_ms']:.3f}, "
                f"tau {row[f'plan_{e}_tau_ms']:.3f}"
            )
        for key in [c for c in row if c.startswith(("score_", "plan_"))]:
            row[key.replace("_ms", "_%")] = 100 * row[key] / dense
        rows.append(row)
    print("# estimator cost, Hq=28 Hkv=4 D=128 bf16, batch 1; % = of dense cuDNN attention")
    print(f"# {env['device']} torch {env['torch']} triton {env['triton']} commit {env['commit']}")
    parts = (("score", "_ms"), ("score", "_graph_%"), ("plan", "_fixed_%"), ("plan", "_tau_%"))
    cols = ["S", "dense_ms"] + [f"{p}_{e}{x}" for e in scorers for p, x in parts]
    print(markdown_table(rows, cols))
    write_result("gpu_estimator_cost", {"bench": "gpu_estimator_cost", "env": env, "rows": rows})


if __name__ == "__main__":
    main()
