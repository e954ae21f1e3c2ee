"""Where the fixed cost of a sparse prefill layer goes at short prompts (GPU): the plan
(score + allocate + select) and the sparse attention (gather + SDPA + scatter) of one layer,
profiled with torch.profiler (CPU + CUDA: kernel count, GPU busy time, host time per op) and
cProfile (Python time per function).

Run:  python bench/profile_prefill_plan.py --lengths 8192 32768
      (--scorer offset --parts plan: the plan of the better budget estimator,
      ProbeScorer.estimator_preset(128) with CumulativeMassAllocator(0.975); --allocator tau
      --parts plan: the paper's scorer with the adaptive budget, where the allocation's sort
      shows)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, progress

from zipvl.sparsity import (
    CumulativeMassAllocator,
    FixedRatioAllocator,
    ProbeScorer,
    TopKSelector,
    plan_tokens,
    sparse_attention,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--ratio", type=float, default=0.42)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--scorer", choices=["capped", "offset"], default="capped",
                    help="capped: 64 + 64 probes, fixed ratio; offset: estimator_preset(128), "
                    "CumulativeMassAllocator(0.975)")  # fmt: skip
    ap.add_argument("--allocator", choices=["fixed", "tau"], default=None,
                    help="the budget: fixed ratio (--ratio) or CumulativeMassAllocator(0.975); "
                    "default: fixed with the capped scorer, tau with offset")  # fmt: skip
    ap.add_argument("--parts", nargs="+", default=["plan", "plan_eager", "layer", "layer_sdpa"])
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    env = env_info()
    progress(f"device {env['device']}, torch {env['torch']}, commit {env['commit']}")
    hq, hkv, d = 28, 4, 128
    scorer = ProbeScorer(max_recent=64, max_random=64)
    alloc, sel = FixedRatioAllocator(args.ratio), TopKSelector()
    if args.scorer == "offset":
        scorer, alloc = ProbeScorer.estimator_preset(128), CumulativeMassAllocator(0.975)
    if args.allocator is not None:
        fixed = args.allocator == "fixed"
        alloc = FixedRatioAllocator(args.ratio) if fixed else CumulativeMassAllocator(0.975)
    for s in args.lengths:
        q = torch.randn(1, hq, s, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16)

        def plan():  # impl="auto": replayed from a CUDA graph at these lengths
            return plan_tokens(q, k, scorer=scorer, allocator=alloc, selector=sel)

        def plan_eager():
            return plan_tokens(q, k, scorer=scorer, allocator=alloc, selector=sel, impl="torch")

        def layer():
            return sparse_attention(q, k, v, plan().selection, impl="auto")

        def layer_sdpa():
            return sparse_attention(q, k, v, plan().selection, impl="sdpa")

        for _ in range(5):
            layer()
        torch.cuda.synchronize()
        named = (("plan", plan), ("plan_eager", plan_eager), ("layer", layer),
                 ("layer_sdpa", layer_sdpa))  # fmt: skip
        for name, fn in [(n, f) for n, f in named if n in args.parts]:
            for _ in range(3):  # host time per call (no sync: launches only), then wall
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    fn()
                host = (time.perf_counter() - t0) / args.reps * 1e3
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / args.reps * 1e3
                print(f"# S={s} {name}: host {host:.3f} ms/call (launch only), wall {wall:.3f}")
            t0 = time.perf_counter()
            for _ in range(args.reps):
                fn()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / args.reps * 1e3
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.reps):
                    fn()
                torch.cuda.synchronize()
            ev = prof.key_averages()
            kernels = sum(e.count for e in ev if e.device_type.name == "CUDA")
            gpu_us = sum(e.self_device_time_total for e in ev if e.device_type.name == "CUDA")
            print(
                f"\n## S={s} {name}: wall {wall:.3f} ms/call, {kernels / args.reps:.0f} GPU "
                f"kernels/call, GPU busy {gpu_us / args.reps / 1e3:.3f} ms/call"
            )
            print(ev.table(sort_by="self_cpu_time_total", row_limit=25))
            print(ev.table(sort_by="self_device_time_total", row_limit=15))
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(args.reps):
                fn()
            torch.cuda.synchronize()
            pr.disable()
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
            print(buf.getvalue())


if __name__ == "__main__":
    main()
