"""One-layer sparse prefill vs dense attention on the GPU (targets P1, P2, P8).

Reference workload: LongVA-7B shapes (28 query heads, 4 KV heads, head dim 128, bf16), batch 1.
The kept ratio is fixed (``--ratio``, default 0.42, behind the paper's 82.3 % attention-FLOP
reduction) so that random inputs do not decide it; a tau-driven plan is timed beside it.

Variants, all in one process:
    dense_<b>       causal SDPA over all S tokens forced to backend b (cudnn, flash, efficient;
                    "n/a" where it has no kernel); the fastest is the baseline ("dense_best")
    dense_flex      compiled FlexAttention, causal BlockMask
    plan            probe scoring + ratio allocation + top-k selection (ProbeScorer 64+64 probes),
                    plan_tokens(impl="auto"): replayed from a CUDA graph up to GRAPH_MAX_TOKENS
                    ("plan_graph" says whether it was), eager above
    plan_tau        the same with CumulativeMassAllocator(tau=0.975)
    plan_offset_tau the same with the better budget estimator (ProbeScorer.estimator_preset(128):
                    128 stratified rows, offset-corrected; fused kernels, "plan_offset_torch":
                    its plain PyTorch scorer)
    plan_eager      plan_tokens(impl="torch"): the eager plan (and plan_tau_eager)
    select_<impl>   TopKSelector.keep_and_indices with the select kernels / the sort path
    plan_sel_<path> the captured plan with the select kernels ("triton") or the sort path
                    ("sort") inside its graph (SELECT_TRITON_MAX_TOKENS's decision), up to
                    GRAPH_MAX_TOKENS
    zipvl_sdpa      plan + gather + causal SDPA (PyTorch's dispatch) on the kept tokens + scatter
    zipvl_auto      the same with impl="auto": the SDPA backend measured fastest for the shape
                    (its choice is printed as "auto_backend"), after the "auto" plan
    zipvl_auto_read the same with one host read after the plan (what the plan did before a
                    fixed ratio's budget was known on the host: the layer then waits for it)
    zipvl_auto_eager_plan   the same after the eager plan
    zipvl_flex      plan + gather + compiled FlexAttention on the kept tokens + scatter
    attn_only_*     sparse_attention alone on a fixed selection: impl "sdpa" and "flex" (copies
                    as "auto" picks them: Triton on CUDA), and impl "sdpa" with each copy impl
                    (attn_only_copy_triton / attn_only_copy_torch, copy_impl="triton"|"torch")
    copies_*        the copies alone at the same P: gather of q, k, v + scatter of a (B, Hq, P,
                    D) output, Triton (zipvl.sparsity.gather_triton, two launches) vs PyTorch
                    (four gathers, a zero fill, a scatter_); copies_floor_ms is their bytes
                    (kept rows read + written, the output written once) at the copy ceiling
Every speed-up is against dense_best, the fastest dense backend of the same length.

Floors: dense causal attention FLOPs (4·S²/2·D·Hq) and the ideal token-sparse FLOPs (× r²) over the
measured bf16 matmul rate.

Run:  python bench/gpu_prefill.py --lengths 8192 32768 65536 131072
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ceilings,
    env_info,
    markdown_table,
    median_ms,
    progress,
    random_qkv,
    write_result,
)

from zipvl.sparsity import (
    CumulativeMassAllocator,
    FixedRatioAllocator,
    ProbeScorer,
    TopKSelector,
    compacted_causal_block_mask,
    plan_tokens,
    sdpa_backend,
    sparse_attention,
)
from zipvl.sparsity.attention import _gather_kv, _gather_q, _scatter_rows
from zipvl.sparsity.gather_triton import gather_qkv_triton, scatter_rows_triton
from zipvl.sparsity.plan_graph import GRAPH_MAX_TOKENS
from zipvl.sparsity.probe_triton import probe_mass_triton
from zipvl.sparsity.scorers import _probe_mass


def _gathered_sdpa(q, k, v, idx) -> dict[str, float]:
    """The causal SDPA call of the gathered path alone, on its own kept rows: forced to each
    backend, on PyTorch's dispatch ("default"), through ``sdpa_auto`` ("auto", the measured
    choice, printed with its measurement), and the host time of ``fastest_backend``'s lookup
    (us per call, no GPU work): where ``impl="auto"`` and ``impl="sdpa"`` part."""
    import time

    qg, kg, vg = gather_qkv_triton(q, k, v, idx)
    kw = {"is_causal": True, "enable_gqa": True}
    out: dict[str, float] = {}
    for name in ("cudnn", "flash"):
        try:
            out[f"gathered_{name}"] = median_ms(
                lambda name=name: sdpa_backend.sdpa(qg, kg, vg, backend=name, **kw)
            )
        except RuntimeError as err:
            progress(f"  gathered {name}: n/a ({str(err).splitlines()[0][:80]})")
    out["gathered_default"] = median_ms(lambda: F.scaled_dot_product_attention(qg, kg, vg, **kw))
    out["gathered_auto"] = median_ms(lambda: sdpa_backend.sdpa_auto(qg, kg, vg, **kw))
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        sdpa_backend.fastest_backend(qg, kg, vg, **kw)
    out["gathered_lookup_us"] = (time.perf_counter() - t0) / n * 1e6
    for bucket, choice in sdpa_backend.choices().items():
        if f"Sq<={1 << (qg.shape[-2] - 1).bit_length()} " in bucket and "causal" in bucket:
            progress(f"  auto choice {bucket}: {choice.backend} {choice.times_ms} ({choice.why})")
    return out


def _plan_with_select_limit(q, k, scorer, allocator, selector, limit: int) -> float:
    """Median ms of a fresh captured plan whose selection ran the select kernels (``limit`` >=
    the length) or the sort path (``limit`` 0) when it was captured: the
    ``SELECT_TRITON_MAX_TOKENS`` decision, measured inside the graph."""
    from zipvl.sparsity import selectors
    from zipvl.sparsity.plan_graph import PlanGraph

    old = selectors.SELECT_TRITON_MAX_TOKENS
    selectors.SELECT_TRITON_MAX_TOKENS = limit
    try:
        planner = PlanGraph(scorer, allocator, selector)
        planner(q, k)  # captured here, with the limit in force
        ms = median_ms(lambda: planner(q, k))
        if planner.replays == 0:
            raise RuntimeError("plan_sel: the plan was not replayed from its graph")
        return ms
    finally:
        selectors.SELECT_TRITON_MAX_TOKENS = old


def _replayed(plan, scorer, allocator, selector) -> bool:
    """Whether ``plan()`` was served by a replay of the captured plan."""
    from zipvl.sparsity.plan_graph import graph_planner

    planner = graph_planner(scorer, allocator, selector)
    before = planner.replays
    plan()
    return planner.replays > before


def _select(selector: TopKSelector, scores: torch.Tensor, budget: torch.Tensor, impl: str):
    return selector.keep_and_indices(scores, budget, impl=impl)


def causal_flops(s: int, hq: int, d: int) -> float:
    """FLOPs of causal attention (QK^T and PV, half the square)."""
    return 4.0 * s * s / 2 * d * hq


def main() -> None:
    fmt = argparse.RawTextHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    ap.add_argument("--ratio", type=float, default=0.42)
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--probes", type=int, default=64, help="recent and random probe caps, each")
    args = ap.parse_args()

    from torch.nn.attention.flex_attention import flex_attention

    env = env_info()
    progress(f"device {env['device']}, torch {env['torch']}, commit {env['commit']}")
    ceil = ceilings()
    progress(f"ceilings: copy {ceil['copy_gbs']:.0f} GB/s, {ceil['matmul_tflops']:.0f} TFLOP/s")
    flex_c = torch.compile(flex_attention, dynamic=False)

    hq, hkv, d, r = args.heads, args.kv_heads, args.head_dim, args.ratio
    scorer = ProbeScorer(max_recent=args.probes, max_random=args.probes)
    fixed = FixedRatioAllocator(r)
    adaptive = CumulativeMassAllocator(0.975)
    selector = TopKSelector()
    rows = []
    for s in args.lengths:
        progress(f"S = {s}")
        q, k, v = random_qkv(s, hq, hkv, d, seed=s)

        # built from block indices: create_block_mask over an S x S predicate needs S^2 bytes
        bm = compacted_causal_block_mask(s, -(-s // 128) * 128, 128, device="cuda")

        def plan_fixed(impl="auto"):
            return plan_tokens(q, k, scorer=scorer, allocator=fixed, selector=selector, impl=impl)

        def plan_tau(impl="auto"):
            return plan_tokens(q, k, scorer=scorer, allocator=adaptive, selector=selector,
                               impl=impl)  # fmt: skip

        def plan_offset(scorer_impl="auto"):
            est = ProbeScorer.estimator_preset(128, impl=scorer_impl)
            return plan_tokens(q, k, scorer=est, allocator=adaptive, selector=selector)

        sel = plan_fixed().selection
        sc0 = torch.rand(1, hkv, s, device="cuda")  # the keep mask + positions of one plan
        bud0 = torch.full((1, hkv), sel.num_kept, dtype=torch.int32, device="cuda")
        rows_p = scorer.probe_rows(s, device="cuda")
        idx = sel.indices()  # (1, Hkv, P)
        out_kept = torch.randn(1, hq, sel.num_kept, d, device="cuda", dtype=torch.bfloat16)

        def copies_triton():
            gather_qkv_triton(q, k, v, idx)
            return scatter_rows_triton(out_kept, idx, sel.keep, s)

        def copies_torch():
            _gather_q(q, idx)
            _gather_kv(k, v, idx)
            return _scatter_rows(out_kept, idx, s)

        t = {
            "score_torch": median_ms(
                lambda: _probe_mass(q, k, rows_p, scale=d**-0.5, heads_per_chunk=1)
            ),
            "score_triton": median_ms(lambda: probe_mass_triton(q, k, rows_p, scale=d**-0.5)),
            "dense_flex": median_ms(lambda: flex_c(q, k, v, block_mask=bm, enable_gqa=True)),
            "plan": median_ms(plan_fixed),  # "auto": replayed from a CUDA graph up to 64k
            "plan_tau": median_ms(plan_tau),
            "plan_offset_tau": median_ms(plan_offset),
            "plan_offset_torch": median_ms(lambda: plan_offset("torch")),
            "plan_eager": median_ms(lambda: plan_fixed("torch")),
            "select_triton": median_ms(lambda: _select(selector, sc0, bud0, "triton")),
            "select_torch": median_ms(lambda: _select(selector, sc0, bud0, "torch")),
            "plan_tau_eager": median_ms(lambda: plan_tau("torch")),
            "attn_sdpa": median_ms(lambda: sparse_attention(q, k, v, sel, impl="sdpa")),
            "attn_flex": median_ms(lambda: sparse_attention(q, k, v, sel, impl="flex")),
            "attn_copy_triton": median_ms(
                lambda: sparse_attention(q, k, v, sel, impl="sdpa", copy_impl="triton")
            ),
            "attn_copy_torch": median_ms(
                lambda: sparse_attention(q, k, v, sel, impl="sdpa", copy_impl="torch")
            ),
            "copies_triton": median_ms(copies_triton),
            "copies_torch": median_ms(copies_torch),
        }
        t |= _gathered_sdpa(q, k, v, idx)
        t["attn_auto"] = median_ms(lambda: sparse_attention(q, k, v, sel, impl="auto"))
        if s <= GRAPH_MAX_TOKENS:  # the captured plan with each selection path inside it
            t |= {f"plan_sel_{n}": _plan_with_select_limit(q, k, scorer, fixed, selector, lim)
                  for n, lim in (("sort", 0), ("triton", s))}  # fmt: skip
        dense = {}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("flash", SDPBackend.FLASH_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):  # fmt: skip

            def run(backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            try:
                run()
                dense[name] = median_ms(run)
            except RuntimeError as err:  # no kernel of this backend for the call
                progress(f"  dense {name}: n/a ({str(err).splitlines()[0][:80]})")
        best_dense = min(dense, key=lambda n: dense[n])
        t["dense_sdpa"] = dense[best_dense]
        t["zipvl_auto"] = median_ms(
            lambda: sparse_attention(q, k, v, plan_fixed().selection, impl="auto")
        )

        def with_read():  # the same layer with the plan's former host read put back
            sel_r = plan_fixed().selection
            assert sel_r.nan_flag is not None
            if sel_r.nan_flag.item():
                raise RuntimeError("NaN scores")
            return sparse_attention(q, k, v, sel_r, impl="auto")

        t["zipvl_auto_read"] = median_ms(with_read)
        t["zipvl_auto_eager_plan"] = median_ms(
            lambda: sparse_attention(q, k, v, plan_fixed("torch").selection, impl="auto")
        )
        p = sel.num_kept  # the gathered call's shape: its bucket's choice (measured above)
        auto_backend = sdpa_backend.fastest_backend(
            q[:, :, :p], k[:, :, :p], v[:, :, :p], is_causal=True, enable_gqa=True
        )
        t["zipvl_sdpa"] = median_ms(
            lambda: sparse_attention(q, k, v, plan_fixed().selection, impl="sdpa")
        )
        t["zipvl_flex"] = median_ms(
            lambda: sparse_attention(q, k, v, plan_fixed().selection, impl="flex")
        )
        rate = ceil["matmul_tflops"] * 1e12
        dense_floor_ms = causal_flops(s, hq, d) / rate * 1e3
        sparse_floor_ms = dense_floor_ms * sel.ratio**2
        # bytes of the copies: kept rows of q, k, v read and written; the output written once
        # and its kept rows read (bf16)
        p_kept = sel.num_kept
        copy_bytes = 2 * (2 * p_kept * (hq + 2 * hkv) * d + (s + p_kept) * hq * d)
        copies_floor_ms = copy_bytes / (ceil["copy_gbs"] * 1e9) * 1e3
        best = min(t["zipvl_sdpa"], t["zipvl_flex"], t["zipvl_auto"])
        rows.append(
            {
                "S": s,
                "kept": sel.ratio,
                "dense_best": best_dense,
                **{f"dense_{n}_ms": ms for n, ms in dense.items()},
                "dense_best_ms": t["dense_sdpa"],
                "dense_flex_ms": t["dense_flex"],
                "plan_ms": t["plan"],
                "plan_tau_ms": t["plan_tau"],
                "plan_offset_tau_ms": t["plan_offset_tau"],
                "plan_offset_%_of_dense": 100 * t["plan_offset_tau"] / t["dense_sdpa"],
                "plan_offset_torch_ms": t["plan_offset_torch"],
                "plan_%_of_dense": 100 * t["plan"] / t["dense_sdpa"],
                "plan_eager_ms": t["plan_eager"],
                "select_triton_ms": t["select_triton"],
                "select_torch_ms": t["select_torch"],
                "plan_tau_eager_ms": t["plan_tau_eager"],
                "plan_eager_%_of_dense": 100 * t["plan_eager"] / t["dense_sdpa"],
                "plan_graph": _replayed(lambda: plan_fixed(), scorer, fixed, selector),
                "plan_sel_sort_ms": t.get("plan_sel_sort"),
                "plan_sel_triton_ms": t.get("plan_sel_triton"),
                "score_torch_ms": t["score_torch"],
                "score_triton_ms": t["score_triton"],
                "zipvl_sdpa_ms": t["zipvl_sdpa"],
                "zipvl_flex_ms": t["zipvl_flex"],
                "zipvl_auto_ms": t["zipvl_auto"],
                "auto_backend": auto_backend,
                "speedup_auto": t["dense_sdpa"] / t["zipvl_auto"],
                "zipvl_auto_read_ms": t["zipvl_auto_read"],
                "speedup_auto_read": t["dense_sdpa"] / t["zipvl_auto_read"],
                "zipvl_auto_eager_plan_ms": t["zipvl_auto_eager_plan"],
                "speedup_auto_eager_plan": t["dense_sdpa"] / t["zipvl_auto_eager_plan"],
                "speedup_sdpa": t["dense_sdpa"] / t["zipvl_sdpa"],
                "speedup_flex": t["dense_sdpa"] / t["zipvl_flex"],
                "ideal_1/r2": 1 / sel.ratio**2,
                "dense_frac_of_floor": dense_floor_ms / t["dense_sdpa"],
                "zipvl_frac_of_floor": sparse_floor_ms / best,
                "attn_only_sdpa_ms": t["attn_sdpa"],
                "attn_only_auto_ms": t["attn_auto"],
                **{
                    n if n.endswith("_us") else f"{n}_ms": ms
                    for n, ms in t.items()
                    if n.startswith("gathered_")
                },
                "attn_only_flex_ms": t["attn_flex"],
                "attn_only_copy_triton_ms": t["attn_copy_triton"],
                "attn_only_copy_torch_ms": t["attn_copy_torch"],
                "copies_triton_ms": t["copies_triton"],
                "copies_torch_ms": t["copies_torch"],
                "copies_floor_ms": copies_floor_ms,
            }
        )
        torch.cuda.empty_cache()

    print(f"# sparse prefill, one layer, Hq={hq} Hkv={hkv} D={d} bf16, r={r}")
    print(f"# {env['device']} torch {env['torch']} triton {env['triton']} commit {env['commit']}")
    print(markdown_table(rows))
    payload = {"bench": "gpu_prefill", "env": env, "ceilings": ceil, "rows": rows}
    write_result("gpu_prefill", payload)


if __name__ == "__main__":
    main()
