"""Decode attention over the paged 4/2-bit cache vs bf16 SDPA on the GPU (one layer).

LongVA-7B shapes (28 query heads, 4 KV heads, head dim 128), one decoding query per row, a cache
of N prompt tokens of which a fraction r (default 0.4) is important (4-bit pages) and the rest
2-bit pages (pages of 128 tokens, ZipCache's layout per page), plus 50 generated tokens in the
full-precision tail, exactly as ``PagedCacheLayer`` stores them.

Variants, all in one process, eager and as CUDA-graph replays:
    sdpa-<backend>  SDPA over the bf16 cache of the same N + 50 tokens, forced to one backend
                    (flash, cudnn, efficient; a backend that cannot run the call says "n/a")
    fused           zipvl.decode.decode_attention(impl="triton") with the launch
                    ``zipvl.decode.launch_choice`` picks (column "launch"; what users get): one
                    launch over all pages and the fp regions (its last program per KV head
                    merges the partial states); its
                    kernel variants (workspace ``variant``: "tile", the default, the warps of
                    a program split each page; "pages", each warp owns a page) are timed
                    side by side in the launch sweep: columns tile_graph_ms, pages_graph_ms,
                    pages_speedup (tile / pages)
``--code-orders``: the stores' ``PageFormat.code_order`` (auto = fragment at pages of 128 and
head dim 128: the ``"fragment"`` kernel; slice: the ``"tile"`` / ``"pages"`` kernels), each
timed in the same run with its own sweep (``--fragment-sweep`` for the fragment kernel: splits,
``offset``, ``fp_splits``, ``maxnreg``); the relative error of every launch of a sweep is
recorded beside its time. Every ratio is against the fastest dense backend of the same row.
Floor: the bytes the variant must read (``decode_read_bytes``; bf16 K and V for SDPA) over the
measured copy bandwidth.

Run:  python bench/gpu_decode.py --batch 1 8 --tokens 32768 131072
      (add --variants to time only the kernel variants: "tile" against "pages" and a few
      "pages" settings, about a minute per row)
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
    median_ms_graph,
    progress,
    write_result,
)

from zipvl.cache import PagedKVStore, PageFormat
from zipvl.decode import decode_attention, decode_read_bytes
from zipvl.paged_decode_triton import default_variant

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def random_keep(b: int, h: int, n: int, ratio: float, device: str) -> torch.Tensor:
    """(B, Hkv, N) bool with exactly round(ratio * N) True per row."""
    kept = round(ratio * n)
    idx = torch.rand(b, h, n, device=device).topk(kept, dim=-1).indices
    return torch.zeros(b, h, n, dtype=torch.bool, device=device).scatter_(-1, idx, True)


def build(b: int, n: int, hkv: int, d: int, ratio: float, page: int, tail: int,
          code_order: str = "auto"):  # fmt: skip
    """A store of N prompt tokens + ``tail`` generated ones, and the same tokens in bf16."""
    dev = "cuda"
    k = torch.randn(b, hkv, n, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, hkv, n, d, device=dev, dtype=torch.bfloat16)
    fmt = PageFormat(page_size=page, code_order=code_order)
    store = PagedKVStore(fmt, batch_size=b, num_heads=hkv, head_dim=d,
                         dtype=torch.bfloat16, device=dev, recompress_every=100,
                         sink_tokens=0)  # fmt: skip
    store.write_prefill(k, v, random_keep(b, hkv, n, ratio, dev), None, 0)
    tk = torch.randn(b, hkv, tail, d, device=dev, dtype=torch.bfloat16)
    tv = torch.randn(b, hkv, tail, d, device=dev, dtype=torch.bfloat16)
    store.append(tk, tv)
    return store, torch.cat([k, tk], 2), torch.cat([v, tv], 2)


LAUNCH_KEYS = {"warps": int, "stages": int, "splits": int, "precise": int, "convert": str,
               "block_t": int, "maxnreg": int, "variant": str, "offset": int, "min_pages": int,
               "fp_splits": int}  # fmt: skip
# block_t 0: the kernel's default for the variant (64 for "tile", 16 for "pages")
LAUNCH_DEFAULTS = {"warps": 4, "stages": 2, "splits": 4, "precise": 0, "block_t": 0,
                   "maxnreg": 0}  # fmt: skip
# the "fragment" kernel (pages in the fragment code order): split counts and its conversion
FRAGMENT_SWEEP = [
    {"splits": 2},
    {"splits": 8},
    {"convert": "magic"},
    {"maxnreg": 168},
    {"offset": 0},
    {"offset": 1},
]
# the kernel variants side by side first ("tile": the warps split each page's tokens; "pages":
# each warp owns a page), then the older launch settings of the "tile" kernel
# ("pages-codes": each warp its page, in code space; stages=1: the page tiles by plain loads and
# conversions through shared memory instead of cp.async)
VARIANT_SWEEP = [
    {"variant": "tile"}, {"variant": "pages"}, {"variant": "pages-codes"},
    {"variant": "pages", "splits": 2}, {"variant": "pages", "splits": 8},
    {"variant": "pages", "block_t": 32}, {"variant": "pages", "stages": 1},
    {"variant": "pages", "stages": 3},
]  # fmt: skip
DEFAULT_SWEEP = [
    *VARIANT_SWEEP,
    {"convert": "cvt"}, {"convert": "magic"}, {"convert": "asm"},
    {"convert": "asm", "precise": 0}, {"convert": "asm", "block_t": 128},
    {"convert": "asm", "warps": 8}, {"convert": "asm", "stages": 3},
    {"convert": "asm", "splits": 8},
]  # fmt: skip


def parse_launch(text: str) -> dict:
    """'convert=asm,warps=8' -> {'convert': 'asm', 'warps': 8}."""
    out = {}
    for item in text.split(","):
        key, _, val = item.partition("=")
        if key not in LAUNCH_KEYS or not val:
            raise argparse.ArgumentTypeError(
                f"--sweep: expected key=value pairs over {sorted(LAUNCH_KEYS)}, got {item!r}"
            )
        out[key] = LAUNCH_KEYS[key](val)
    return out


def launch_name(launch: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in launch.items()) or "default"


def set_launch(ws: dict, launch: dict, default_splits: int, b: int, hq: int, d: int) -> None:
    """Point the kernel's workspace at one launch setting (defaults for the keys not given)."""
    from zipvl.paged_decode_triton import DEFAULT_CONVERT

    full = {**LAUNCH_DEFAULTS, "convert": DEFAULT_CONVERT, "variant": ws["variant0"], **launch}
    ns = max(1, default_splits * full["splits"] // 4)
    frag = full["variant"] == "fragment"
    if full["block_t"] and not frag:  # the fragment kernel has no block_t / stages
        ws["block_t"] = full["block_t"]
    else:
        ws.pop("block_t", None)
    nf = int(full.get("fp_splits", ws.get("fp_splits", 1)))
    if full["variant"] == "fragment":
        ws["fp_splits"] = nf
    if "min_pages" in full:
        ws["min_pages"] = full["min_pages"]
    if "offset" in full:
        ws["offset"] = full["offset"]
    else:
        ws.pop("offset", None)
    if frag:
        ws.pop("stages", None)
    else:
        ws["stages"] = full["stages"]
    ws.update(warps=full["warps"], splits=ns,
              precise=bool(full["precise"]), convert=full["convert"], variant=full["variant"],
              maxnreg=full["maxnreg"],
              m=torch.empty(b, hq, ns + nf, device="cuda"),
              l=torch.empty(b, hq, ns + nf, device="cuda"),
              o=torch.empty(b, hq, ns + nf, d, device="cuda"))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    fmt = argparse.RawTextHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=128)
    ap.add_argument(
        "--sweep", type=parse_launch, nargs="*", default=DEFAULT_SWEEP,
        help="launch settings to time besides the default, each 'key=value,...' over "
        f"{sorted(LAUNCH_KEYS)} (splits in quarters of the default count; convert one of "
        "cvt / magic / asm; variant tile, pages or pages-codes); the default sweep of 16 "
        "settings took more than 600 s over batch 1, 4 and 8 on an H200: '--sweep' with "
        "nothing after it times the default launch only (stores in the slice code order)",
    )  # fmt: skip
    ap.add_argument(
        "--fragment-sweep", type=parse_launch, nargs="*", default=FRAGMENT_SWEEP,
        help="the launch settings to time for stores in the fragment code order (variant "
        "'fragment'; keys splits, offset, fp_splits, min_pages, convert (magic / asm), maxnreg, "
        "warps)",
    )  # fmt: skip
    ap.add_argument(
        "--code-orders", nargs="+", default=["auto"], choices=["auto", "slice", "fragment"],
        help="PageFormat.code_order of the stores, each timed in the same run (auto: fragment "
        "at pages of 128 and head dim 128, the default users get; slice: the tile / pages "
        "kernels)",
    )  # fmt: skip
    ap.add_argument(
        "--variants", action="store_true",
        help="time only the kernel variants (tile vs pages and a few pages settings), not "
        "the older launch sweep: one short run that compares the two kernels",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.variants:
        args.sweep = VARIANT_SWEEP

    env = env_info()
    progress(f"device {env['device']}, torch {env['torch']}, commit {env['commit']}")
    ceil = ceilings()
    bw = ceil["copy_gbs"] * 1e9
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    rows = []
    for b in args.batch:
        for n in args.tokens:
            for order in args.code_orders:
                progress(f"B = {b}, N = {n}, code order {order}")
                store, kf, vf = build(b, n, hkv, d, args.ratio, args.page, 50, order)
                frag = store.fmt.code_order == "fragment"
                q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
                # correctness on these inputs: fused vs the float32 reference of the same store
                out, _ = decode_attention(q, store, impl="triton")
                ref, _ = decode_attention(q, store, impl="reference")
                rel_err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                row: dict = {"B": b, "N": n, "code_order": store.fmt.code_order}
                chosen = dict(store._decode_ws)  # type: ignore[attr-defined]  # launch_choice's
                chosen["variant0"] = default_variant(store.fmt.code_order)
                if not frag:
                    store._decode_ws["variant"] = "pages"  # type: ignore[attr-defined]
                    out, _ = decode_attention(q, store, impl="triton")
                    row["pages_rel_err_vs_fp32_ref"] = (
                        (out.float() - ref.float()).norm() / ref.float().norm()
                    ).item()
                store._decode_ws = dict(chosen)  # type: ignore[attr-defined]
                dense: dict[str, tuple[float, float]] = {}
                for name, backend in BACKENDS.items():

                    def sdpa(backend=backend):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(q, kf, vf, enable_gqa=True)

                    try:
                        sdpa()
                        dense[name] = (median_ms(sdpa), median_ms_graph(sdpa))
                    except RuntimeError as err:  # no kernel of this backend for the call
                        progress(f"  sdpa-{name}: n/a ({str(err).splitlines()[0][:80]})")
                        continue
                    row[f"sdpa_{name}_ms"], row[f"sdpa_{name}_graph_ms"] = dense[name]

                def fused():
                    return decode_attention(q, store, impl="triton")

                # launch settings of the fused kernel; the default (what users get) is timed last
                ws = store._decode_ws  # type: ignore[attr-defined]
                default = {k: ws[k] for k in ("splits",)}
                tried, tried_err = {}, {}
                for launch in args.fragment_sweep if frag else args.sweep:
                    set_launch(ws, launch, default["splits"], b, hq, d)
                    o = fused()[0].float()
                    tried_err[launch_name(launch)] = ((o - ref.float()).norm()
                                                      / ref.float().norm()).item()  # fmt: skip
                    tried[launch_name(launch)] = median_ms_graph(fused, rep_ms=100)
                # back to what users get: zipvl.decode.launch_choice's launch
                store._decode_ws = dict(chosen)  # type: ignore[attr-defined]
                keys = ("variant", "stages", "block_t", "splits")
                row["launch"] = ",".join(f"{k}={chosen[k]}" for k in keys if k in chosen)
                row["launch"] = row["launch"] if "variant" in chosen else (
                    f"variant={chosen['variant0']}," + row["launch"])  # fmt: skip
                row["launch_sweep"] = tried
                row["launch_sweep_rel_err"] = tried_err
                for variant in ("tile", "pages"):  # the two kernels at their defaults
                    if f"variant={variant}" in tried:
                        row[f"{variant}_graph_ms"] = tried[f"variant={variant}"]
                if "tile_graph_ms" in row and "pages_graph_ms" in row:
                    row["pages_speedup"] = row["tile_graph_ms"] / row["pages_graph_ms"]
                fastest = min(tried, key=lambda c: tried[c]) if tried else "default"
                row["best_launch"] = f"{fastest} {tried.get(fastest, float('nan')):.3g} ms"
                t_fused, t_fused_g = median_ms(fused), median_ms_graph(fused)
                best = min(dense, key=lambda k: dense[k][1])
                t_base, t_base_g = dense[best]
                bf16_bytes = kf.nbytes + vf.nbytes
                fused_bytes = decode_read_bytes(store)
                row.update(
                    {
                        "fastest_dense": best,
                        "fused_ms": t_fused,
                        "fused_graph_ms": t_fused_g,
                        "speedup_eager": t_base / t_fused,
                        "speedup_graph": t_base_g / t_fused_g,
                        "eager_over_graph": t_fused / t_fused_g,
                        "bytes_ratio": fused_bytes / bf16_bytes,
                        "fused_frac_of_copy_bw": fused_bytes / (t_fused_g * 1e-3) / bw,
                        "dense_frac_of_copy_bw": bf16_bytes / (t_base_g * 1e-3) / bw,
                        "fused_rel_err_vs_fp32_ref": rel_err,
                        "splits": store._decode_ws["splits"],  # type: ignore[attr-defined]
                    }
                )
                rows.append(row)
                progress(f"  fused {t_fused_g:.4g} ms (graph) vs {best} {t_base_g:.4g} ms: "
                         f"{t_base_g / t_fused_g:.3g}x; sweep {row['launch_sweep']}")  # fmt: skip
                store = kf = vf = None  # free before the next case
                torch.cuda.empty_cache()

    cols = ["B", "N", "code_order", "fastest_dense", "sdpa_flash_graph_ms", "sdpa_cudnn_graph_ms",
            "sdpa_efficient_graph_ms", "launch", "fused_graph_ms", "fused_ms", "tile_graph_ms",
            "pages_graph_ms", "pages_speedup", "best_launch",
            "speedup_graph",
            "speedup_eager", "eager_over_graph", "bytes_ratio", "fused_frac_of_copy_bw",
            "dense_frac_of_copy_bw", "fused_rel_err_vs_fp32_ref",
            "pages_rel_err_vs_fp32_ref"]  # fmt: skip
    print(f"# decode attention, one layer, Hq={hq} Hkv={hkv} D={d}, r={args.ratio} (4/2 bits), "
          f"pages of {args.page}; graph = CUDA-graph replay")  # fmt: skip
    print(f"# {env['device']} torch {env['torch']} triton {env['triton']} commit {env['commit']}")
    print(markdown_table(rows, [c for c in cols if any(c in r for r in rows)]))
    write_result("gpu_decode", {"bench": "gpu_decode", "env": env, "ceilings": ceil, "rows": rows})


if __name__ == "__main__":
    main()
