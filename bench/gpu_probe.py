"""Fused probe scoring on the GPU: launch settings of the two kernels against their FLOP floor.

Reference workload: LongVA-7B shapes (28 query heads, 4 KV heads, head dim 128, bf16), batch 1,
Sq = Skv = S, the probe rows of the prefill plan (``ProbeScorer(max_recent=64, max_random=64)``:
64 recent + 64 random rows, ascending).

Variants, all in one process:
    baseline    the kernels before the packed, pipelined rewrite (probe_triton_baseline.py here)
    <name>      ``probe_mass_triton`` with the ``ProbeKernelConfig`` of that name (CANDIDATES;
                ``default`` is the library's default)
Each is timed as a whole call (``ms``: eager, launches included; ``graph_ms``: a CUDA-graph
replay), and per kernel by the CUDA profiler (``lse_ms``: the row pass, ``col_ms``: the column
pass, ``other_ms``: everything else the call launches, e.g. the baseline's host-side merge).

Floor: each kernel computes the logits of every probe row against every key, 2·Hq·M·S·D FLOPs
(the causally empty part is not subtracted; ``visible`` is the fraction of (row, key) pairs that
are causally visible, the work left once the empty tiles are skipped), at the measured bf16
matmul rate. ``lse_floor`` and ``col_floor`` are that floor over the kernel's time, ``floor`` twice
the floor over ``graph_ms``.

Accuracy: against the float64 column mass of the eager path (``_probe_mass`` in float64):
``err_max`` = max |got - ref| / max ref, ``err_l1`` = sum |got - ref| / sum ref; ``ok`` when
``err_max`` <= 1e-3 and the total mass is B·Hq·M to 1e-4.

Run:  python bench/gpu_probe.py --lengths 8192 32768 131072
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

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
from probe_triton_baseline import probe_mass_triton_baseline

from zipvl.sparsity import ProbeScorer
from zipvl.sparsity.probe_triton import ProbeKernelConfig, probe_mass_triton
from zipvl.sparsity.scorers import _probe_mass

DEVICE = "cuda"
C = ProbeKernelConfig
# few settings: every one is two kernel compiles
CANDIDATES: dict[str, ProbeKernelConfig] = {
    "default": C(),
    "stages2": C(lse_stages=2, col_stages=2),
    "warps4": C(lse_block_m=64, lse_warps=4, col_block_n=64, col_warps=4),
    "wide": C(lse_block_n=128, lse_stages=2, col_block_m=128, col_stages=2),
    "colkeys256": C(col_block_n=256, col_stages=2),
}


def describe(cfg: ProbeKernelConfig) -> str:
    """``lse BMxBN/warps/stages col BNxBM/warps/stages``."""
    return (
        f"lse {cfg.lse_block_m}x{cfg.lse_block_n}/{cfg.lse_warps}w/{cfg.lse_stages}s "
        f"col {cfg.col_block_n}x{cfg.col_block_m}/{cfg.col_warps}w/{cfg.col_stages}s"
    )


def kernel_ms(fn: Callable[[], object], reps: int = 20) -> dict[str, float]:
    """Mean device time per call of the row pass, the column pass and the rest (CUDA profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {"lse_ms": 0.0, "col_ms": 0.0, "other_ms": 0.0}
    for evt in prof.key_averages():
        us = float(getattr(evt, "device_time_total", 0.0) or getattr(evt, "cuda_time_total", 0.0))
        if us <= 0.0:
            continue
        key = "lse_ms" if "lse_kernel" in evt.key else "col_ms" if "colsum" in evt.key else None
        out[key or "other_ms"] += us / 1e3 / reps
    return out


def main() -> None:
    fmt = argparse.RawTextHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--probes", type=int, default=64, help="recent and random probe caps, each")
    ap.add_argument(
        "--configs",
        nargs="+",
        default=list(CANDIDATES),
        choices=list(CANDIDATES),
        help="candidate settings to time beside the baseline",
    )
    ap.add_argument(
        "--key-splits", type=int, default=None, help="row-pass key splits (None: auto)"
    )
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    args = ap.parse_args()

    env = env_info()
    progress(f"device {env['device']}, torch {env['torch']}, commit {env['commit']}")
    ceil = ceilings(DEVICE)
    progress(f"ceilings: copy {ceil['copy_gbs']:.0f} GB/s, {ceil['matmul_tflops']:.0f} TFLOP/s")
    rate = ceil["matmul_tflops"] * 1e12

    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    scorer = ProbeScorer(max_recent=args.probes, max_random=args.probes)
    variants: dict[str, ProbeKernelConfig | None] = {"baseline": None}
    variants.update({name: CANDIDATES[name] for name in args.configs})
    rows_out: list[dict[str, Any]] = []
    for s in args.lengths:
        progress(f"S = {s}")
        gen = torch.Generator(device=DEVICE).manual_seed(s)
        q = torch.randn(1, hq, s, d, device=DEVICE, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, hkv, s, d, device=DEVICE, dtype=torch.bfloat16, generator=gen)
        rows = scorer.probe_rows(s, device=DEVICE)  # (M,) ascending
        m = rows.numel()
        scale = d**-0.5
        ref = _probe_mass(q.double(), k.double(), rows, scale=scale, heads_per_chunk=1)
        floor_ms = 2.0 * hq * m * s * d / rate * 1e3  # one kernel's FLOPs
        visible = float((rows + 1).sum()) / (m * s)  # Sq = Skv: row r sees r + 1 keys
        base_ms = None
        for name, cfg in variants.items():

            def call(cfg: ProbeKernelConfig | None = cfg) -> torch.Tensor:
                if cfg is None:
                    return probe_mass_triton_baseline(
                        q, k, rows, scale=scale, key_splits=args.key_splits
                    )
                return probe_mass_triton(
                    q, k, rows, scale=scale, key_splits=args.key_splits, config=cfg
                )

            row: dict[str, Any] = {
                "S": s,
                "variant": name,
                "config": "before the rewrite" if cfg is None else describe(cfg),
            }
            try:
                got = call()  # compiles
                torch.cuda.synchronize(DEVICE)
            except Exception as exc:  # e.g. a setting that needs more shared memory than exists
                progress(f"  {name}: failed ({type(exc).__name__}: {str(exc)[:120]})")
                rows_out.append({**row, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            err = (got.double() - ref).abs()
            total = float(got.double().sum())
            err_max = float(err.max() / ref.max())
            row["ms"] = median_ms(call)
            if not args.no_graph:
                row["graph_ms"] = median_ms_graph(call)
            row.update(kernel_ms(call))
            base_ms = row["ms"] if cfg is None else base_ms
            best = row.get("graph_ms", row["ms"])
            row.update(
                {
                    "floor_ms": floor_ms,
                    "lse_floor": floor_ms / row["lse_ms"] if row["lse_ms"] else 0.0,
                    "col_floor": floor_ms / row["col_ms"] if row["col_ms"] else 0.0,
                    "floor": 2 * floor_ms / best,
                    "speedup": (base_ms / row["ms"]) if base_ms else float("nan"),
                    "visible": visible,
                    "err_max": err_max,
                    "err_l1": float(err.sum() / ref.sum()),
                    "ok": err_max <= 1e-3 and abs(total / (hq * m) - 1.0) <= 1e-4,
                }
            )
            progress(
                f"  {name}: {row['ms']:.3f} ms (lse {row['lse_ms']:.3f}, col {row['col_ms']:.3f}"
                f", other {row['other_ms']:.3f}), err {err_max:.1e}"
            )
            rows_out.append(row)

    print(f"# probe scoring, Hq={hq} Hkv={hkv} D={d} bf16, M={2 * args.probes} probe rows")
    print(f"# {env['device']} torch {env['torch']} triton {env['triton']} commit {env['commit']}")
    cols = ["S", "variant", "ms", "graph_ms", "lse_ms", "col_ms", "other_ms", "floor_ms"]
    cols += ["lse_floor", "col_floor", "floor", "speedup", "err_max", "ok", "config"]
    print(markdown_table(rows_out, [c for c in cols if not (c == "graph_ms" and args.no_graph)]))
    payload = {
        "bench": "gpu_probe",
        "env": env,
        "ceilings": ceil,
        "candidates": {n: dataclasses.asdict(c) for n, c in CANDIDATES.items()},
        "rows": rows_out,
    }
    write_result("gpu_probe", payload)


if __name__ == "__main__":
    main()
