"""Outside anchor: FlashInfer's paged decode (bf16 and fp8-e4m3 KV) beside SDPA and zipvl's kernel.

One layer of LongVA-7B decode (28 query heads, 4 KV heads, head dim 128), one query per row, a
cache of N prompt tokens + 50 generated ones (the same tokens for every variant, built by
``bench/gpu_decode.py``'s ``build``):

    sdpa-<backend>       SDPA over the bf16 cache, forced to one backend (flash, cudnn,
                         efficient; "n/a" where the backend cannot run the call), GQA by
                         ``enable_gqa=True``
    flashinfer-fa2-bf16  ``flashinfer.BatchDecodeWithPagedKVCacheWrapper`` with
                         ``use_tensor_cores=True`` over a paged bf16 cache (pages of 16 tokens,
                         NHD layout as vLLM/SGLang keep it, page table shuffled)
    flashinfer-fa2-e4m3  the same over the cache cast to float8_e4m3fn (scale 1: the randn
                         values fit e4m3's range, so no k_scale/v_scale and no extra kernel)
    zipvl-fused          ``zipvl.decode.decode_attention(impl="triton")`` over the 4/2-bit paged
                         store at r = 0.4 (the default launch users get)

FlashInfer's CUDA-core decode kernel dispatches GQA group sizes 1, 2, 3, 4 and 8 only; LongVA's
group is 7, so the tensor-core path (its prefill kernel, FA2 template, any group size) is the
one that runs (``--cuda-core`` tries the other anyway). FA3 needs an fp8 query for fp8 KV, so
``--fi-backends fa3`` times bf16 only.

Every variant is timed eagerly and as a CUDA-graph replay (``triton.testing.do_bench`` /
``do_bench_cudagraph``, medians); ratios are against the fastest bf16 SDPA backend of the same
row (graph times), floors are the bytes each variant must read over the device-to-device copy
bandwidth measured in this run. Graph replays run back to back without an L2 flush (as in
``gpu_decode.py``): a working set under the H200's ~50 MB L2 (fp8 or zipvl at B = 1, 32k) may
be read partly from L2 there; the eager timer flushes L2 before every call. A frac_copy_bw
slightly above 1 at large working sets (bf16 at B = 8) is not L2: a kernel that only reads
streams faster than the read + write copy that sets the ceiling. Outputs are checked against
a float32 attention over the very cache each variant reads (fp8: the dequantized cache;
zipvl: ``impl="reference"``); a relative error above ``--tol``, or a failure of the project's
fused kernel, makes the script exit non-zero (2 without a CUDA device). SDPA and zipvl run
first (all rows), FlashInfer after, so a FlashInfer failure (import, JIT, a CUDA
error) costs only its own rows: it is printed with the exception text.

Run:  python bench/gpu_flashinfer_anchor.py --batch 1 8 --tokens 32768 131072
      (FlashInfer JIT-compiles one module per KV dtype on first use, under
      $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer; CUDA_HOME is found when unset)
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import inspect
import math
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

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
from gpu_decode import BACKENDS, build

from zipvl.decode import decode_attention, decode_read_bytes

KV_DTYPES = {"bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn}
TAIL = 50  # generated tokens in the fp tail, as in gpu_decode
WORKSPACE_BYTES = 256 << 20
CUDA_CORE_GROUPS = (1, 2, 3, 4, 8)  # DISPATCH_GQA_GROUP_SIZE of FlashInfer's decode kernel


def short(err: BaseException, limit: int = 4000) -> str:
    """The exception's type and text, the tail kept (ninja puts the nvcc error last)."""
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def gist(text: str, lines: int = 6) -> str:
    """The error lines of a long message (nvcc's "error:" lines in ninja's output), else its
    first line."""
    hits = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
    return " ; ".join(hits[-lines:])[:1500] if hits else text.splitlines()[0][:300]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().reshape(ref.shape), ref.float()
    return ((out - ref).norm() / ref.norm()).item()


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float32 attention of q (B, Hq, D) over k, v (B, Hkv, T, D) of any dtype, row by row."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    outs = []
    for i in range(b):
        qi = q[i].float().reshape(hkv, hq // hkv, d) / math.sqrt(d)
        s = torch.einsum("hgd,htd->hgt", qi, k[i].float())
        outs.append(torch.einsum("hgt,htd->hgd", s.softmax(-1), v[i].float()).reshape(hq, d))
    return torch.stack(outs)


# ---------------------------------------------------------------------------------------------
# FlashInfer: environment for its JIT, import, paged cache, wrappers


def _toolkit_candidates() -> list[Path]:
    out = [Path(os.environ[e]) for e in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(e)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        out.append(Path(nvcc).resolve().parent.parent)
        # a wrapper script ("exec /usr/local/cuda-13.0/bin/nvcc ...") names the real toolkit
        with contextlib.suppress(OSError), open(nvcc, "rb") as fh:
            for word in fh.read(2000).decode(errors="ignore").split():
                if word.endswith("/bin/nvcc") and word.startswith("/"):
                    out.append(Path(word).parent.parent)
    out.append(Path("/usr/local/cuda"))
    out += [Path(p) for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    with contextlib.suppress(ImportError):
        import nvidia  # the cuda-toolkit wheels: site-packages/nvidia/cu13/{bin,include,lib}

        for root in nvidia.__path__:
            out += [Path(p) for p in sorted(glob.glob(os.path.join(root, "cu1*")), reverse=True)]
    return out


def _loaded_library(prefix: str) -> str | None:
    """Path of a shared library this process has mapped (torch maps libcuda, libcudart)."""
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith(prefix) and os.path.exists(path):
                return path
    return None


def prepare_flashinfer_env() -> dict[str, str]:
    """CUDA_HOME with nvcc and libcudart, a link directory for -lcuda/-lcudart, ninja on PATH.

    FlashInfer's JIT takes CUDA_HOME, else ``dirname(dirname(which nvcc))`` (a wrapper in
    /usr/local/bin gives /usr/local, with no libcudart to link), and links ``-lcudart -lcuda``
    from $CUDA_HOME/lib64 and lib64/stubs; a container's driver often ships libcuda.so.1 only.
    Call after CUDA is initialised (so libcuda and libcudart are mapped), before the JIT.
    """
    done: dict[str, str] = {}
    if not os.environ.get("CUDA_HOME"):
        for cand in _toolkit_candidates():
            libs = [cand / lib / "libcudart.so" for lib in ("lib64", "lib")]
            if (cand / "bin" / "nvcc").exists() and any(p.exists() for p in libs):
                os.environ["CUDA_HOME"] = str(cand)
                break
    done["CUDA_HOME"] = os.environ.get("CUDA_HOME", "(not found)")
    link_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"zipvl_flashinfer_ld_{os.getuid()}"
    link_dir.mkdir(parents=True, exist_ok=True)
    for name, prefix in (("libcuda.so", "libcuda.so"), ("libcudart.so", "libcudart.so")):
        real = _loaded_library(prefix)
        if real:
            link = link_dir / name
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(real)
            done[name] = real
    flag = f"-L{link_dir}"  # after -L$CUDA_HOME/lib64 on the link line: the toolkit's first
    extra = os.environ.get("FLASHINFER_EXTRA_LDFLAGS", "")
    if flag not in extra.split():
        os.environ["FLASHINFER_EXTRA_LDFLAGS"] = f"{extra} {flag}".strip()
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError, AttributeError):
            import ninja

            os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ['PATH']}"
    done["ninja"] = shutil.which("ninja") or "(not found)"
    home = Path.home()
    if not os.environ.get("FLASHINFER_WORKSPACE_BASE") and not os.access(home, os.W_OK):
        os.environ["FLASHINFER_WORKSPACE_BASE"] = os.environ.get("TMPDIR", "/tmp")
    done["workspace"] = os.environ.get("FLASHINFER_WORKSPACE_BASE", str(home))
    return done


def import_flashinfer() -> tuple[Any, str | None]:
    try:
        import flashinfer
    except Exception as err:
        return None, short(err) + "\n" + "".join(traceback.format_exc(limit=-6))
    return flashinfer, None


def prebuild(fi: Any, kv_names: list[str], backends: list[str], d: int) -> dict[str, str]:
    """JIT-compile the tensor-core decode modules in parallel threads (each one a ninja run over
    ten nvcc jobs) instead of one after another inside ``plan``. Internal API: any failure here
    is only reported; ``plan`` compiles (or fails, with the error) by itself."""
    try:
        from flashinfer.jit.attention import gen_batch_prefill_module
    except Exception as err:
        return {"prebuild": f"skipped ({short(err, 200)})"}
    specs = []
    for be in backends:
        for name in kv_names:
            if be == "auto" or (be == "fa3" and name != "bf16"):
                continue  # "auto" is resolved by plan()
            args = (be, torch.bfloat16, KV_DTYPES[name], torch.bfloat16, torch.int32, d, d,
                    0, False, False, False)  # fmt: skip
            specs.append((f"{be}-{name}", args))
    status: dict[str, str] = {}

    def one(key: str, args: tuple) -> None:
        t0 = time.perf_counter()
        try:
            gen_batch_prefill_module(*args).build()
            status[key] = f"built in {time.perf_counter() - t0:.0f} s"
        except Exception as err:
            status[key] = f"failed after {time.perf_counter() - t0:.0f} s: {short(err)}"

    threads = [threading.Thread(target=one, args=s) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return status


def paged_cache(x: torch.Tensor, page: int, layout: str, slots: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> FlashInfer's page pool, logical page j of row b at slot slots[b*P + j]:
    NHD (pages, page, H, D) or HND (pages, H, page, D). The last page is zero-padded."""
    b, h, t, d = x.shape
    p = -(-t // page)
    x = F.pad(x, (0, 0, 0, p * page - t)).view(b, h, p, page, d)
    x = x.permute(0, 2, 3, 1, 4) if layout == "NHD" else x.permute(0, 2, 1, 3, 4)
    pages = x.reshape(b * p, *x.shape[2:])
    pool = torch.empty_like(pages)
    pool[slots] = pages
    return pool


class FlashInferDecode:
    """One planned ``BatchDecodeWithPagedKVCacheWrapper`` over one cache (bf16 or e4m3)."""

    def __init__(self, fi: Any, backend: str, tensor_cores: bool, layout: str, page: int,
                 hq: int, hkv: int, d: int, b: int, t: int, kv_dtype: torch.dtype,
                 slots: torch.Tensor, workspace: torch.Tensor):  # fmt: skip
        cls = fi.BatchDecodeWithPagedKVCacheWrapper
        kwargs: dict[str, Any] = {"use_tensor_cores": tensor_cores}
        if "backend" in inspect.signature(cls.__init__).parameters:
            kwargs["backend"] = backend
        self.wrapper = cls(workspace, layout, **kwargs)
        p = -(-t // page)
        dev = workspace.device
        indptr = torch.arange(b + 1, dtype=torch.int32, device=dev) * p
        last = torch.full((b,), t - (p - 1) * page, dtype=torch.int32, device=dev)
        t0 = time.perf_counter()
        self.wrapper.plan(indptr, slots.to(torch.int32), last, hq, hkv, d, page,
                          pos_encoding_mode="NONE", q_data_type=torch.bfloat16,
                          kv_data_type=kv_dtype)  # fmt: skip
        self.first_plan_s = time.perf_counter() - t0  # includes the JIT build on first use
        t0 = time.perf_counter()
        self.wrapper.plan(indptr, slots.to(torch.int32), last, hq, hkv, d, page,
                          pos_encoding_mode="NONE", q_data_type=torch.bfloat16,
                          kv_data_type=kv_dtype)  # fmt: skip
        self.plan_ms = (time.perf_counter() - t0) * 1e3
        self.backend = getattr(self.wrapper, "_backend", backend)

    def run(self, q: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
            out: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return self.wrapper.run(q, cache, out=out)


# ---------------------------------------------------------------------------------------------


def floor_fields(row: dict, prefix: str, nbytes: int, graph_ms: float, bw: float) -> None:
    row[f"{prefix}bytes_read_mb"] = nbytes / 1e6
    row[f"{prefix}frac_copy_bw"] = nbytes / (graph_ms * 1e-3) / bw


def time_both(fn) -> tuple[float, float | str]:
    """(eager median ms, graph median ms or the capture's error)."""
    eager = median_ms(fn)
    try:
        graph: float | str = median_ms_graph(fn)
    except Exception as err:  # capture refused: eager only
        graph = f"graph n/a: {gist(short(err))[:200]}"
    return eager, graph


def phase_dense_and_zipvl(args, cases, hq, hkv, d, bw, rows) -> None:
    for ci, (b, n) in enumerate(cases):
        progress(f"B = {b}, N = {n}: SDPA backends and zipvl's fused kernel")
        torch.manual_seed(args.seed + ci)
        store, kf, vf = build(b, n, hkv, d, args.ratio, args.zipvl_page, TAIL)
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        ref = reference(q[:, :, 0], kf, vf)
        t = kf.shape[2]
        dense_bytes = kf.nbytes + vf.nbytes
        for name, backend in BACKENDS.items():
            row: dict[str, Any] = {"B": b, "N": n, "T": t, "variant": f"sdpa-{name}",
                                   "kv": "bf16"}  # fmt: skip

            def sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, kf, vf, enable_gqa=True)

            try:
                out = sdpa()
            except RuntimeError as err:  # no kernel of this backend for the call
                row["note"] = f"n/a ({str(err).splitlines()[0][:80]})"
                progress(f"  sdpa-{name}: {row['note']}")
                rows.append(row)
                continue
            row["rel_err"] = rel_err(out, ref)
            row["eager_ms"], graph = time_both(sdpa)
            if isinstance(graph, float):
                row["graph_ms"] = graph
                floor_fields(row, "", dense_bytes, graph, bw)
            else:
                row["note"] = graph
            rows.append(row)
            progress(f"  sdpa-{name}: {row.get('graph_ms', float('nan')):.4g} ms (graph), "
                     f"rel err {row['rel_err']:.2e}")  # fmt: skip
        # zipvl: its own oracle (dequantized store, float32) and, for information, the bf16 one
        row = {"B": b, "N": n, "T": t, "variant": "zipvl-fused", "kv": f"4/2-bit r={args.ratio}"}

        def fused():
            return decode_attention(q, store, impl="triton")

        try:
            out, _ = fused()  # eager first: makes the kernel's workspace before any capture
            zref, _ = decode_attention(q, store, impl="reference")
            row["rel_err"] = rel_err(out, zref)
            row["rel_err_vs_bf16_ref"] = rel_err(out, ref)
            row["eager_ms"], graph = time_both(fused)
            if isinstance(graph, float):
                row["graph_ms"] = graph
                floor_fields(row, "", decode_read_bytes(store), graph, bw)
            else:
                row["note"] = graph
            ws = getattr(store, "_decode_ws", {})  # the launch decode_attention chose
            from zipvl.paged_decode_triton import default_variant

            variant = ws.get("variant") or default_variant(store.fmt.code_order)
            row["splits"], row["zipvl_variant"] = ws.get("splits"), variant
            progress(f"  zipvl-fused: {row.get('graph_ms', float('nan')):.4g} ms (graph), "
                     f"rel err {row['rel_err']:.2e}")  # fmt: skip
        except Exception as err:  # the project's own kernel failing fails the run (below)
            row["note"] = f"failed: {gist(short(err))[:300]}"
            row["failed"] = True
            progress(f"  zipvl-fused: {row['note']}")
        rows.append(row)
        store = kf = vf = ref = None  # free before the next case
        torch.cuda.empty_cache()


def phase_flashinfer(args, cases, hq, hkv, d, bw, rows, fi_info) -> None:
    fi = fi_info["module"]
    g = hq // hkv
    combos = []  # (backend, tensor_cores, kv name)
    for be in args.fi_backends:
        for name in args.kv:
            if be == "fa3" and name != "bf16":
                continue  # FA3 reads fp8 KV only with an fp8 query
            combos.append((be, True, name))
    if args.cuda_core:
        combos += [("auto", False, name) for name in args.kv]
    elif g not in CUDA_CORE_GROUPS:
        fi_info["cuda_core"] = (
            f"not run: the CUDA-core decode kernel dispatches group sizes {CUDA_CORE_GROUPS}, "
            f"this model's is {g} (--cuda-core tries)"
        )
    broken: dict[tuple, str] = {}  # (backend, tensor cores, kv, page) -> why it cannot run
    for be, tc, name in combos:  # a module whose prebuild failed would only fail again in plan
        status = fi_info.get("prebuild", {}).get(f"{be}-{name}", "")
        if tc and status.startswith("failed"):
            for page in args.page_size:
                broken[(be, tc, name, page)] = f"JIT {gist(status)[:300]}"
            fi_info["errors"].append(f"flashinfer-{be}-{name} JIT {status}")
    workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    for ci, (b, n) in enumerate(cases):
        torch.manual_seed(args.seed + ci)  # the same tokens as the first phase
        store, kf, vf = build(b, n, hkv, d, args.ratio, args.zipvl_page, TAIL)
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        del store
        q1 = q[:, :, 0].contiguous()
        t = kf.shape[2]
        for page in args.page_size:
            p = -(-t // page)
            slots = (torch.randperm(b * p, device="cuda") if args.page_order == "shuffled"
                     else torch.arange(b * p, device="cuda"))  # fmt: skip
            for name in args.kv:
                kvd = KV_DTYPES[name]
                kq, vq = kf.to(kvd), vf.to(kvd)  # scale 1: the dequantized cache is kq.float()
                ref = reference(q1, kq, vq)
                ref_bf16 = reference(q1, kf, vf) if name != "bf16" else ref
                cache = (paged_cache(kq, page, args.layout, slots),
                         paged_cache(vq, page, args.layout, slots))  # fmt: skip
                del kq, vq
                for be, tc, kvname in combos:
                    if kvname != name:
                        continue
                    label = f"flashinfer-{be if tc else 'cudacore'}-{name}"
                    row: dict[str, Any] = {"B": b, "N": n, "T": t, "variant": label, "kv": name,
                                           "page": page}  # fmt: skip
                    rows.append(row)
                    key = (be, tc, name, page)
                    if key in broken:
                        row["note"] = broken[key]
                        continue
                    try:
                        dec = FlashInferDecode(fi, be, tc, args.layout, page, hq, hkv, d, b, t,
                                               kvd, slots, workspace)  # fmt: skip
                        jit_key = f"{label}-p{page}"
                        fi_info["first_plan_s"].setdefault(jit_key, dec.first_plan_s)
                        row["plan_ms"] = dec.plan_ms
                        row["fi_backend"] = dec.backend
                        out = torch.empty(b, hq, d, device="cuda", dtype=torch.bfloat16)

                        def run(dec=dec, cache=cache, out=out):
                            return dec.run(q1, cache, out)

                        run()
                        torch.cuda.synchronize()
                        row["rel_err"] = rel_err(out, ref)
                        if name != "bf16":
                            row["rel_err_vs_bf16_ref"] = rel_err(out, ref_bf16)
                        row["eager_ms"], graph = time_both(run)
                    except Exception as err:
                        broken[key] = f"failed: {gist(short(err))[:300]}"
                        row["note"] = broken[key]
                        fi_info["errors"].append(f"{label} B={b} N={n}: {short(err)}")
                        progress(f"  {label}: FAILED\n{short(err)}")
                        continue
                    kv_bytes = sum(c.nbytes for c in cache) * t // (p * page)  # live tokens
                    if isinstance(graph, float):
                        row["graph_ms"] = graph
                        floor_fields(row, "", kv_bytes + 4 * b * p, graph, bw)
                    else:
                        row["note"] = graph
                    progress(f"  {label} (pages of {page}): "
                             f"{row.get('graph_ms', float('nan')):.4g} ms (graph), "
                             f"rel err {row['rel_err']:.2e}")  # fmt: skip
                del cache, ref, ref_bf16
                torch.cuda.empty_cache()
        del kf, vf
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072],
                    help="prompt tokens N (the cache holds N + 50)")  # fmt: skip
    ap.add_argument("--ratio", type=float, default=0.4, help="zipvl: 4-bit fraction")
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--zipvl-page", type=int, default=128, help="zipvl's page (tokens)")
    ap.add_argument("--page-size", type=int, nargs="+", default=[16],
                    help="FlashInfer page sizes (tokens; default 16, vLLM's block)")  # fmt: skip
    ap.add_argument("--layout", choices=["NHD", "HND"], default="NHD",
                    help="FlashInfer cache layout (NHD: vLLM/SGLang's)")  # fmt: skip
    ap.add_argument("--page-order", choices=["shuffled", "contiguous"], default="shuffled",
                    help="page table: a random permutation of the pool, or in order")  # fmt: skip
    ap.add_argument("--kv", choices=list(KV_DTYPES), nargs="+", default=list(KV_DTYPES),
                    help="FlashInfer KV dtypes")  # fmt: skip
    ap.add_argument("--fi-backends", choices=["fa2", "fa3", "auto"], nargs="+", default=["fa2"],
                    help="tensor-core decode backends (fa3: bf16 only; a longer JIT)")  # fmt: skip
    ap.add_argument("--cuda-core", action="store_true",
                    help="also try the CUDA-core kernel (use_tensor_cores=False)")  # fmt: skip
    ap.add_argument("--no-flashinfer", action="store_true", help="time SDPA and zipvl only")
    ap.add_argument("--no-prebuild", action="store_true",
                    help="let plan() JIT-compile the modules one after another")  # fmt: skip
    ap.add_argument("--tol", type=float, default=2e-2,
                    help="largest relative error against the float32 reference")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("gpu_flashinfer_anchor: needs a CUDA device", file=sys.stderr)
        return 2
    torch.cuda.init()
    try:
        env = env_info()
    except ImportError as err:  # transformers missing: the rest of the header by hand
        import triton

        props = torch.cuda.get_device_properties(0)
        env = {"torch": torch.__version__, "triton": triton.__version__, "device": props.name,
               "commit": os.environ.get("ZIPVL_COMMIT", "unknown"), "argv": " ".join(sys.argv),
               "env_info_error": str(err)}  # fmt: skip
    progress(f"device {env['device']}, torch {env['torch']}, commit {env['commit']}")
    ceil = ceilings()
    bw = ceil["copy_gbs"] * 1e9
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    cases = [(b, n) for b in args.batch for n in args.tokens]
    rows: list[dict[str, Any]] = []
    failures: list[str] = []

    # FlashInfer's import and JIT first (threads compile while nothing else runs), its timing last
    fi_info: dict[str, Any] = {"version": None, "error": None, "errors": [], "first_plan_s": {}}
    if not args.no_flashinfer:
        fi_info["jit_env"] = prepare_flashinfer_env()
        progress(f"FlashInfer JIT environment: {fi_info['jit_env']}")
        t0 = time.perf_counter()
        fi, err = import_flashinfer()
        fi_info["import_s"] = time.perf_counter() - t0
        if fi is None:
            fi_info["error"] = err
            progress(f"FlashInfer NOT AVAILABLE (import failed); timing the rest.\n{err}")
        else:
            fi_info["version"] = getattr(fi, "__version__", "unknown")
            fi_info["module"] = fi
            progress(f"flashinfer {fi_info['version']} imported in {fi_info['import_s']:.1f} s")
            if not args.no_prebuild:
                t0 = time.perf_counter()
                fi_info["prebuild"] = prebuild(fi, args.kv, args.fi_backends, d)
                fi_info["prebuild_s"] = time.perf_counter() - t0
                progress(f"FlashInfer JIT prebuild {fi_info['prebuild_s']:.0f} s: "
                         f"{fi_info['prebuild']}")  # fmt: skip
    env["flashinfer"] = fi_info["version"]

    phase_dense_and_zipvl(args, cases, hq, hkv, d, bw, rows)
    if fi_info.get("module") is not None:
        try:
            phase_flashinfer(args, cases, hq, hkv, d, bw, rows, fi_info)
        except Exception as err:  # anything outside one variant's try (e.g. a sticky CUDA error)
            fi_info["errors"].append(f"phase aborted: {short(err)}")
            progress(f"FlashInfer phase aborted: {short(err)}")
    fi_info.pop("module", None)

    # ratios against the fastest bf16 SDPA backend of the same (B, N), graph times
    for b, n in cases:
        same = [r for r in rows if r["B"] == b and r["N"] == n]
        dense = [r for r in same if r["variant"].startswith("sdpa-") and "graph_ms" in r]
        if not dense:
            continue
        best = min(dense, key=lambda r: r["graph_ms"])
        for r in same:
            r["fastest_sdpa"] = best["variant"]
            if "graph_ms" in r:
                r["speedup_vs_sdpa"] = best["graph_ms"] / r["graph_ms"]
    for r in rows:
        if r.get("failed"):
            failures.append(f"{r['variant']} B={r['B']} N={r['N']}: {r['note']}")
        elif r.get("rel_err", 0.0) > args.tol or r.get("rel_err") != r.get("rel_err"):
            failures.append(f"{r['variant']} B={r['B']} N={r['N']}: rel err {r['rel_err']:.3g}")

    cols = ["B", "N", "variant", "kv", "page", "graph_ms", "eager_ms", "speedup_vs_sdpa",
            "bytes_read_mb", "frac_copy_bw", "rel_err", "rel_err_vs_bf16_ref", "plan_ms",
            "note"]  # fmt: skip
    print(f"# decode attention, one layer, Hq={hq} Hkv={hkv} D={d}; cache N + {TAIL} tokens; "
          f"zipvl r={args.ratio} (4/2 bits, pages of {args.zipvl_page}); FlashInfer "
          f"{fi_info['version'] or 'n/a'} pages of {args.page_size} {args.layout} "
          f"{args.page_order}; graph = CUDA-graph replay; speedup = fastest bf16 SDPA / "
          f"variant; frac_copy_bw = bytes / graph time / {ceil['copy_gbs']:.0f} GB/s "
          f"(measured copy)")  # fmt: skip
    print(f"# {env['device']} torch {env['torch']} triton {env['triton']} "
          f"flashinfer {fi_info['version']} commit {env['commit']}")  # fmt: skip
    if fi_info["error"]:
        print(f"# FlashInfer unavailable: {gist(fi_info['error'])}")
    for e in fi_info["errors"]:
        print(f"# FlashInfer error: {gist(e)}")
    if fi_info["first_plan_s"]:
        print(f"# FlashInfer first plan (JIT build or cache load), s: {fi_info['first_plan_s']}")
    print(markdown_table(rows, [c for c in cols if any(c in r for r in rows)]))
    for f in failures:
        print(f"# WRONG RESULT: {f}")
    payload = {"bench": "gpu_flashinfer_anchor", "env": env, "ceilings": ceil,
               "flashinfer": fi_info, "rows": rows, "failures": failures,
               "settings": {k: v for k, v in vars(args).items()}}  # fmt: skip
    write_result("gpu_flashinfer_anchor", payload)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
