"""The user's path end to end: transformers ``Qwen2ForCausalLM`` with and without ``zipvl.enable``.

What: prefill time, decode time per token after 0 / 1000 / 4000 generated tokens, peak GPU memory
and (``--capacity``) the largest batch of 128k-token prompts that fits, for

    dense-flash   transformers SDPA attention + ``DynamicCache``, SDPA forced to flash attention
    dense-cudnn   the same, SDPA forced to cuDNN attention
    zipvl         ``zipvl.enable(model, ZipVLConfig.preset("zipvl"))`` (tau 0.975, 4/2-bit cache)
    fixed         preset "fixed": FixedRatioAllocator(0.42), the same 4/2-bit cache
    fixed-auto    the same, nothing forced: ``impl="auto"`` runs its gathered prefill attention
                  on the SDPA backend it measured fastest per shape (recorded as
                  ``sdpa_choices``); transformers' own SDPA calls use PyTorch's dispatch; the
                  prompt commit is not deferred (``defer_commit=False``)
    fixed-auto-deferred  the same with ``defer_commit=True`` (layer i's prompt commit at layer
                  i+1's cache update): what ``zipvl.enable`` builds, nothing forced around it
    kivi          preset "kivi": dense prefill, KIVI 2-bit cache with a 128-token fp residual
    dense-noattn  the dense model with every attention call replaced by zeros (the cache still
                  filled): what the model costs without attention, for the Amdahl bound below

all in one process, one model. The ZipVL variants run their dense SDPA calls (dense layers, decode
attention over the dequantized cache, and the gathered causal SDPA of the sparse prefill) under
the flash backend too; the table names the backend of each row. A case that fails under the forced
backend (no kernel of it for some call, e.g.) is run again with the memory-efficient kernel allowed
as a fallback, for the rest of that variant (the backend column then says so).

Model: LongVA-7B / Qwen2-7B shapes (hidden 3584, 28 query heads, 4 KV heads, head dim 128, MLP
18944), ``--layers`` (default 28), bf16, eval mode, built directly on the device with a cheap
random init (matrices normal with std 0.02, norms 1, biases 0). The vocabulary is cut to
``--vocab`` (default 32000 instead of 152064) to save memory; it only changes the embedding and
LM head (the LM head runs on the last position only). Random weights give nearly flat attention:
the tau rule of the "zipvl" preset then keeps most tokens (its kept ratio is reported), while
"fixed" keeps 42 % whatever the input.

How: prompts are random token ids (``--lengths`` x ``--batch``). Each variant is warmed up once
at a short length. Prefill = one ``model(input_ids, cache=cache, use_cache=True,
logits_to_keep=1)`` call between CUDA syncs (what ``generate`` does first). Decode = a manual loop
of ``model(next_token, cache=cache)`` (greedy); at each ``--decode-points`` value a
window of ``--window`` steps is timed with CUDA events and the median ms per token is reported.
Between points the cache is advanced untimed by ``--ff-chunk``-token forward calls (default 512)
for dense caches, and one token a step for ZipVL caches (a ZipVL cache refuses several new tokens
at once on a decoding layer: that is a new prompt on a cache compressed for the old one), so the
ZipVL cache reaches each point exactly as generation does. These untimed calls run without
the forced backend (they need a mask, which flash does not take) and outside the peak-memory
windows: peak memory (``torch.cuda.max_memory_allocated``) covers prefill and the timed decode
windows.
``--replicate``: a single forward of 8 x 128k tokens does not fit the H200 (its MLP
activations alone are ~80 GB), so each case prefills one row and repeats that row's cache to the
batch (``cache.batch_repeat_interleave``, what beam search uses; a ZipVL cache then copies the
shared pages with ``PagedKVStore.own_pages``, so each row reads and holds its own, as dense rows
do): the decode rows are copies, the
"prefill ms" is one row's (``prefill_rows`` in the JSON), and capacity counts the sequences whose
caches fit, as a server that prefills one request at a time holds them.
Out-of-memory cases are reported as OOM and skipped. ``--capacity``: per variant, bytes per
sequence from a batch-1 run at ``--capacity-length`` give an estimate, which is verified by runs
(up, then bisection) of prefill + ``--capacity-steps`` decode steps; decode tokens/s at that
batch is reported. The whole prompt is prefilled in one forward (the path ``generate`` takes), so
prefill activations, not the KV cache, usually set that limit.

Ratios: "prefill x" and "decode x" are speed-ups, fastest dense time / variant time, at the
same length and batch (and decode point): > 1 is faster than the best dense backend.

Amdahl bound (with ``dense-noattn`` in the run): the attention share of the fastest dense prefill
is f = 1 - noattn / dense; sparse prefill makes attention r^2 as costly at kept ratio r, so no
variant can beat 1 / ((1 - f) + f r^2). "of bound" is prefill x over that bound.

Compiles: torch._dynamo's counters (graphs compiled, recompiles, frames) are read after each
variant's warm-up and after its cases; "compiles after warm-up" is the difference (target 0).

Transformers >= 5.24 renames the cache argument of ``generate`` and ``forward`` from
``past_key_values=`` to ``cache=`` (the old name warns); the forward calls pass the cache under
the name ``zipvl.cache_kwargs`` gives for the installed ``forward`` (5.17 - 5.23:
``past_key_values``), recorded as ``cache_argument`` in the JSON.

Run:  python bench/gpu_hf.py --quick
      python bench/gpu_hf.py --capacity --plot
      python bench/gpu_hf.py --device cpu --tiny    (CPU smoke run; no backend forcing, no memory)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# large, varying allocations (prefill activations, OOM retries): avoid fragmentation
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, markdown_table, progress, write_result

import zipvl
from zipvl import ZipVLConfig
from zipvl.models import cache_argument, is_enabled

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "h200" / "gpu_hf.json"
VARIANTS = ("dense-flash", "dense-cudnn", "zipvl", "fixed", "fixed-uncapped", "fixed-torchwrite",
            "fixed-deferred", "fixed-auto", "fixed-auto-deferred", "kivi",
            "dense-noattn")  # fmt: skip
# variants whose cache runs layer i's prompt commit at layer i+1's update
# (ZipVLCache(defer_commit=True)): the host launches it while the GPU runs layer i's MLP
DEFERRED = frozenset({"fixed-deferred", "fixed-auto-deferred"})
PRESET_OF = {"zipvl": "zipvl", "fixed": "fixed", "fixed-uncapped": "fixed", "fixed-auto": "fixed",
             "fixed-auto-deferred": "fixed",
             "fixed-torchwrite": "fixed", "fixed-deferred": "fixed", "kivi": "kivi"}  # fmt: skip
# settings on top of the preset: fixed-uncapped scores with the paper's 5 % + 5 % probe rows
# (13k rows at 128k, ~20 % of dense attention) instead of ZipVLConfig's default 64 + 64;
# fixed-torchwrite writes the cache's pages in PyTorch (~130 small ops per class) instead of
# the one-launch Triton writer
OVERRIDES_OF: dict[str, dict[str, Any]] = {
    "fixed-uncapped": {"probe_cap": None},
    "fixed-torchwrite": {"page_write_impl": "reference"},
}
BACKEND_OF = {
    "dense-flash": "flash",
    "dense-cudnn": "cudnn",
    "zipvl": "flash",
    "fixed": "flash",
    "fixed-uncapped": "flash",
    "fixed-torchwrite": "flash",
    "fixed-deferred": "flash",
    "fixed-auto": "auto",  # nothing forced: impl="auto" measures its SDPA backend per shape
    "fixed-auto-deferred": "auto",
    "kivi": "flash",
    "dense-noattn": "flash",
}
NULL_ATTENTION = "zipvl_bench_noattn"


def _null_attention(module: Any, query: torch.Tensor, key: Any, value: Any, attention_mask: Any,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """An attention function that attends to nothing: zeros of the output shape (B, S, H, D)."""
    b, h, s, d = query.shape
    return query.new_zeros(b, s, h, d), None


def _no_attention(model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """Every attention call of ``model`` returns zeros while inside (the cache is still filled)."""
    from zipvl.cache.hf_compat import attention_function

    return attention_function(model, NULL_ATTENTION, _null_attention)


def compile_counters() -> dict[str, int]:
    """torch._dynamo's running totals: graphs compiled, recompiles, frames."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "recompiles": int(sum(counters["recompiles"].values())),
        "frames_ok": int(counters["frames"].get("ok", 0)),
    }


@dataclass
class Variant:
    """One measured configuration: dense (``preset`` None) or a ZipVL preset, and its backend."""

    name: str
    backend: str  # "flash" | "cudnn" | "auto" | "cpu"
    preset: str | None
    fallback: bool = False  # memory-efficient SDPA allowed where the forced kernel has none
    config: ZipVLConfig | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        if self.backend == "cpu":
            return "cpu default (not forced)"
        if self.backend == "auto":
            return "auto (measured per shape)"
        return f"{self.backend} + efficient fallback" if self.fallback else self.backend


def _backends(v: Variant) -> contextlib.AbstractContextManager[Any]:
    """The forced SDPA backend(s) of ``v`` (nothing on the CPU or for "auto")."""
    if v.backend in ("cpu", "auto"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[v.backend]
    if not v.fallback:
        return sdpa_kernel([first])
    return sdpa_kernel([first, SDPBackend.EFFICIENT_ATTENTION], set_priority=True)


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """Qwen2ForCausalLM with LongVA-7B shapes (or the tiny test shapes), random bf16 weights."""
    import transformers

    if args.tiny:
        shapes = dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,  # KIVI groups of 32; packed 2-bit rows of >= 16 bytes
            intermediate_size=128,
            num_hidden_layers=2,
            vocab_size=min(args.vocab, 512),
        )
    else:
        shapes = dict(
            hidden_size=3584,
            num_attention_heads=28,
            num_key_value_heads=4,
            head_dim=128,
            intermediate_size=18944,
            num_hidden_layers=args.layers,
            vocab_size=args.vocab,
        )
    longest = max([*args.lengths, args.capacity_length if args.capacity else 0])
    cfg = transformers.Qwen2Config(
        **shapes,
        max_position_embeddings=longest + max(args.decode_points) + 2 * args.window + 1024,
        tie_word_embeddings=False,
        use_cache=True,
        attn_implementation="sdpa",
    )
    dtype = torch.bfloat16
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):  # built on the device, in bf16
            model = transformers.Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to(dtype).eval()
    # explicit cheap init (transformers may leave weights built this way uninitialised):
    # matrices normal(0, 0.02), norm weights 1, biases 0
    gen = torch.Generator(device=args.device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, cfg.initializer_range, generator=gen)
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.zero_()
    return model


def _kv_bytes(cache: Any) -> int:
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())  # ZipVLCache
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


class Clock:
    """Host-synchronised wall time and per-step event timing (perf_counter on the CPU)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def wall_ms(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3, out

    def steps_ms(self, step: Callable[[], None], n: int) -> list[float]:
        """Time ``n`` calls of ``step`` one by one (CUDA events: no sync between steps)."""
        if not self.cuda:
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
            return times
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(n)
        ]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else 0


def replicate(cache: Any, tok: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat a one-row cache (and its next token) to ``batch`` rows. ZipVL rows would share
    the repeated pages: they get their own copies, so every row holds and reads its own bytes,
    as dense rows do."""
    cache.batch_repeat_interleave(batch)
    for layer in getattr(cache, "layers", []):
        store = getattr(layer, "store", None)
        if store is not None:
            store.own_pages()
    return tok.repeat_interleave(batch, dim=0)


def free_memory(model: torch.nn.Module, v: Variant) -> None:
    """Drop everything a case left behind (the enabled model's cache too)."""
    if v.preset is not None and is_enabled(model):
        zipvl.new_cache(model)  # the attention function holds the last cache
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Session:
    """One model; runs cases of a variant (prefill, decode windows, peak memory)."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace) -> None:
        self.model = model
        self.args = args
        self.clock = Clock(args.device)
        self.vocab = model.config.vocab_size
        self.gen = torch.Generator(device=args.device).manual_seed(0)
        self.cache_kw = cache_argument(model.forward)

    # -- one forward ------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        kw = {self.cache_kw: cache}
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
        if getattr(cache, "defer_commit", False):  # the last layer's commit belongs to the call
            cache.commit_pending()
        return out.logits[:, -1:].argmax(-1)  # (B, 1) greedy next token

    def new_cache(self, v: Variant) -> Any:
        if v.preset is None:
            from transformers import DynamicCache

            return DynamicCache(config=self.model.config)
        cache = zipvl.new_cache(self.model)
        cache.defer_commit = v.name in DEFERRED  # the prompt commit one layer late
        return cache

    def random_ids(self, batch: int, length: int) -> torch.Tensor:
        return torch.randint(
            0, self.vocab, (batch, length), device=self.args.device, generator=self.gen
        )

    def fast_forward(self, v: Variant, cache: Any, batch: int, n: int) -> None:
        """Advance the cache by ``n`` tokens, untimed, in chunks of ``--ff-chunk`` (default SDPA
        dispatch: chunks need a mask); a ZipVL cache one token a call, as generation does."""
        chunk = 1 if v.preset is not None else self.args.ff_chunk
        while n > 0:
            c = min(n, chunk)
            self.forward(self.random_ids(batch, c), cache)
            n -= c

    # -- one case ---------------------------------------------------------------------------------
    @torch.no_grad()
    def case(
        self,
        v: Variant,
        length: int,
        batch: int,
        points: Sequence[int],
        window: int,
    ) -> dict[str, Any]:
        """Prefill ``batch`` x ``length`` random ids, then decode windows at ``points``."""
        clock = self.clock
        rows = 1 if self.args.replicate else batch  # rows prefilled in the one forward
        ids = self.random_ids(rows, length)
        repeat_ms = []  # --prefill-reps: the earlier calls at this length, each on its own cache
        for _ in range(self.args.prefill_reps - 1):
            fresh = self.new_cache(v)
            with _backends(v):
                ms, _ = clock.wall_ms(lambda c=fresh: self.forward(ids, c))
            repeat_ms.append(ms)
        fresh = None
        first_ms = repeat_ms.pop(0) if repeat_ms else None
        cache = self.new_cache(v)
        gc.collect()  # the earlier calls' caches: the peak is the last prefill's alone
        clock.reset_peak()
        with _backends(v):
            prefill_ms, tok = clock.wall_ms(lambda: self.forward(ids, cache))
        if first_ms is not None:  # the reported prefill is the median of the calls after the first
            prefill_ms = statistics.median([*repeat_ms, prefill_ms])
        if rows < batch:  # --replicate: the batch decodes copies of the prefilled row
            tok = replicate(cache, tok, batch)
        peak = clock.peak_bytes()
        generated = 0  # tokens fed back into the cache after the prompt
        decode: dict[str, dict[str, float]] = {}
        state = {"tok": tok}

        def step() -> None:
            state["tok"] = self.forward(state["tok"], cache)

        for p in points:
            if p > generated:
                self.fast_forward(v, cache, batch, p - generated)
                generated = p
            clock.reset_peak()
            with _backends(v):
                times = clock.steps_ms(step, window)
            peak = max(peak, clock.peak_bytes())
            decode[str(p)] = {
                "start": generated,
                "median_ms": statistics.median(times),
                "mean_ms": statistics.fmean(times),
                "max_ms": max(times),
            }
            generated += window
        row: dict[str, Any] = {
            "prefill_ms": prefill_ms,
            "prefill_first_ms": first_ms,
            "prefill_rows": rows,
            "decode": decode,
            "peak_gib": peak / 2**30 if clock.cuda else None,
            "kv_gib": _kv_bytes(cache) / 2**30,
            "generated": generated,
        }
        if v.preset is not None:
            with contextlib.suppress(AttributeError, NotImplementedError):
                row["kept_ratio"] = cache.report().kept_ratio
        if v.backend == "auto":  # what impl="auto" chose, per shape bucket
            from zipvl.sparsity.sdpa_backend import choices

            row["sdpa_choices"] = {name: c.backend for name, c in choices().items()}
        return row

    def guarded(self, v: Variant, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn``. Out of memory: {"status": "OOM"}. Another RuntimeError under the forced
        backend (no kernel of it, e.g.): run again with the memory-efficient fallback allowed (for
        the rest of the variant). Any other error, or one with the fallback too:
        {"status": "error"}, logged, so that one case does not end a long run."""
        while True:
            why, retry = "", False  # no exception kept: it would keep the case's tensors alive
            try:
                row = fn()
                row["status"] = "ok"
                return row
            except torch.OutOfMemoryError:
                status = "OOM"
            except Exception as e:  # one failing case must not end a long run
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                retry = isinstance(e, RuntimeError)  # kernel dispatch errors are RuntimeErrors
                status = "error"
            finally:
                free_memory(self.model, v)
            if status == "OOM":
                return {"status": "OOM"}
            if not retry or v.fallback or v.backend == "cpu":
                progress(f"  {v.name}: {why}")
                return {"status": "error", "error": why}
            progress(f"  {v.name} under {v.backend}: {why}; again with the efficient fallback")
            v.fallback = True


# ------------------------------------------------------------------------------------------------
# capacity
# ------------------------------------------------------------------------------------------------


def capacity(sess: Session, v: Variant) -> dict[str, Any]:
    """Largest batch of ``--capacity-length`` prompts whose prefill + a few decode steps fit."""
    args = sess.args
    length, steps = args.capacity_length, args.capacity_steps
    runs: dict[int, dict[str, Any]] = {}

    def attempt(b: int) -> bool:
        progress(f"  capacity {v.name}: batch {b} x {length}")
        base = torch.cuda.memory_allocated() if sess.clock.cuda else 0
        row = sess.guarded(v, lambda: sess.case(v, length, b, [0], steps))
        row["base_gib"] = base / 2**30
        runs[b] = row
        return row["status"] == "ok"

    if not attempt(1):
        return {"batch": 0, "tokens_per_s": None, "estimate": 0, "tries": _tries(runs)}
    one = runs[1]
    est = 1
    if sess.clock.cuda and one.get("peak_gib"):
        free, _ = torch.cuda.mem_get_info()
        if args.replicate:  # one row's prefill transient once, then the cache of every row
            kv = one["kv_gib"] * 2**30 * 1.05
            transient = (one["peak_gib"] - one["base_gib"]) * 2**30 - kv
            est = max(1, int((free * 0.97 - max(transient, 0)) // max(kv, 1)))
        else:
            per_seq = (one["peak_gib"] - one["base_gib"]) * 2**30
            est = max(1, int(free * 0.97 // max(per_seq, 1)))
    lo, hi, cand, step = 1, None, max(est, 2), 1
    for _ in range(args.capacity_tries):
        if cand <= lo or (hi is not None and cand >= hi):
            break
        if attempt(cand):
            lo = cand
            cand = lo + step if hi is None else (lo + hi) // 2
            step *= 2
        else:
            hi = cand
            cand = (lo + hi) // 2
    best = runs[lo]
    ms = best["decode"]["0"]["median_ms"]
    return {
        "batch": lo,
        "first_failure": hi,
        "estimate": est,
        "tokens_per_s": lo * 1e3 / ms,
        "decode_ms_per_step": ms,
        "peak_gib": best.get("peak_gib"),
        "tries": _tries(runs),
    }


def _tries(runs: dict[int, dict[str, Any]]) -> dict[str, str]:
    return {str(b): r["status"] for b, r in sorted(runs.items())}


# ------------------------------------------------------------------------------------------------
# table, plot
# ------------------------------------------------------------------------------------------------


def add_ratios(rows: list[dict[str, Any]], points: Sequence[int]) -> None:
    """Speed-ups vs the fastest dense variant at the same length, batch (and decode point), and
    the Amdahl bound of the prefill speed-up where ``dense-noattn`` ran at that length."""
    for r in rows:
        here = [d for d in rows if d["status"] == "ok" and (d["S"], d["B"]) == (r["S"], r["B"])]
        null = [d for d in here if d["variant"] == "dense-noattn"]
        same = [d for d in here if d["dense"] and d["variant"] != "dense-noattn"]
        r["amdahl_bound"] = r["frac_of_bound"] = r["attn_share"] = None
        if same and null and r["status"] == "ok":
            dense_ms = min(d["prefill_ms"] for d in same)
            f = max(0.0, 1.0 - null[0]["prefill_ms"] / dense_ms)
            r["attn_share"] = f
            kept = r.get("kept_ratio")
            if kept is not None and not r["dense"]:
                r["amdahl_bound"] = 1.0 / ((1.0 - f) + f * kept**2)
                r["frac_of_bound"] = dense_ms / r["prefill_ms"] / r["amdahl_bound"]
        r["prefill_x"] = None
        r["decode_x"] = {}
        if r["status"] != "ok" or not same:
            continue
        r["prefill_x"] = min(d["prefill_ms"] for d in same) / r["prefill_ms"]
        for p in map(str, points):
            best = min(d["decode"][p]["median_ms"] for d in same)
            r["decode_x"][p] = best / r["decode"][p]["median_ms"]


def table_rows(rows: list[dict[str, Any]], points: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        t: dict[str, Any] = {
            "variant": r["variant"],
            "SDPA backend": r["backend"],
            "length": r["S"],
            "batch": r["B"],
        }
        ok = r["status"] == "ok"
        t["prefill ms"] = r["prefill_ms"] if ok else r["status"]
        t["prefill x"] = r["prefill_x"] if r.get("prefill_x") is not None else "n/a"
        for p in map(str, points):
            t[f"decode ms/tok @{p}"] = r["decode"][p]["median_ms"] if ok else r["status"]
        for p in map(str, points):
            x = r.get("decode_x", {}).get(p)
            t[f"decode x @{p}"] = x if x is not None else "n/a"
        t["peak GiB"] = r["peak_gib"] if ok and r.get("peak_gib") is not None else "n/a"
        t["KV GiB"] = r["kv_gib"] if ok else "n/a"
        t["kept"] = r["kept_ratio"] if ok and "kept_ratio" in r else "-"
        if any(d.get("attn_share") is not None for d in rows):
            t["attn share"] = r["attn_share"] if r.get("attn_share") is not None else "-"
            t["Amdahl bound"] = r["amdahl_bound"] if r.get("amdahl_bound") is not None else "-"
            t["of bound"] = r["frac_of_bound"] if r.get("frac_of_bound") is not None else "-"
        out.append(t)
    return out


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def plot(payload: dict[str, Any], path: Path) -> Path | None:
    """Decode ms/token vs generated tokens per variant, and prefill speed-up per length (PNG)."""
    try:
        import matplotlib
    except ImportError:
        progress("matplotlib is not installed: no plot")
        return None
    matplotlib.use("Agg")  # headless; set here, in the script, never in the library
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r["status"] == "ok"]
    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax, ax2 = axes
    for r in rows:
        pts = sorted(r["decode"].items(), key=lambda kv: int(kv[0]))
        x = [v["start"] for _, v in pts]
        y = [v["median_ms"] for _, v in pts]
        ax.plot(x, y, marker="o", label=f"{r['variant']} S={_k(r['S'])} B={r['B']}")
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("decode ms / token (median)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lengths = sorted({r["S"] for r in rows})
    groups = [(s, b) for s in lengths for b in batches]
    width = 0.8 / max(len(variants), 1)
    for i, name in enumerate(variants):
        ys = []
        for s, b in groups:
            hit = [r for r in rows if (r["variant"], r["S"], r["B"]) == (name, s, b)]
            ys.append(hit[0]["prefill_x"] if hit and hit[0]["prefill_x"] else 0.0)
        ax2.bar([g + (i - (len(variants) - 1) / 2) * width for g in range(len(groups))], ys,
                width, label=name)  # fmt: skip
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xticks(range(len(groups)), [f"{_k(s)} B={b}" for s, b in groups])
    ax2.set_ylabel("prefill speed-up vs fastest dense")
    ax2.legend(fontsize=7)
    ax2.grid(True, axis="y", alpha=0.3)
    env = payload["env"]
    shapes = "tiny shapes" if payload.get("tiny") else "LongVA-7B shapes"
    fig.suptitle(
        f"transformers Qwen2 ({shapes}, {payload['layers']} layers), "
        f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"commit {env['commit']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    fmt = argparse.RawTextHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--decode-points", type=int, nargs="+", default=[0, 1000, 4000])
    ap.add_argument("--window", type=int, default=32, help="timed decode steps per point")
    ap.add_argument("--ff-chunk", type=int, default=512, help="tokens per untimed advance call")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--vocab", type=int, default=32000, help="cut vocabulary (memory)")
    ap.add_argument("--warmup-length", type=int, default=2048)
    ap.add_argument(
        "--prefill-reps", type=int, default=1,
        help="prefill calls per case (new cache each): with >= 2 the first call at the length is "
        "reported apart (prefill_first_ms) and prefill_ms is the median of the others",
    )  # fmt: skip
    ap.add_argument("--capacity", action="store_true", help="largest batch per variant")
    ap.add_argument("--capacity-only", action="store_true", help="skip the length x batch runs")
    ap.add_argument("--capacity-length", type=int, default=131072)
    ap.add_argument("--capacity-steps", type=int, default=8, help="decode steps per try")
    ap.add_argument("--capacity-tries", type=int, default=4, help="runs after the estimate")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 1, points 0 1000")
    ap.add_argument(
        "--replicate",
        action="store_true",
        help="prefill one row, then repeat its cache to the batch (batches whose single "
        "prefill forward does not fit; prefill ms is then one row's)",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU tests)")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT})")
    ap.add_argument("--plot", action="store_true", help="PNG next to the JSON")
    ap.add_argument("--plot-from", type=Path, default=None, help="only redraw from a JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch = [1]
        args.decode_points = [0, 1000]
        args.window = min(args.window, 16)
        args.capacity_steps = min(args.capacity_steps, 4)
    if args.capacity_only:
        args.capacity = True
    if args.tiny:
        args.warmup_length = min(args.warmup_length, 32)
        args.capacity_length = min(args.capacity_length, 128)
    args.decode_points = sorted(set(args.decode_points))
    if args.out is None:
        args.out = (
            Path(os.environ["OUT"]) / "gpu_hf.json" if os.environ.get("OUT") else DEFAULT_OUT
        )
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.plot_from is not None:
        payload = json.loads(args.plot_from.read_text().strip().splitlines()[-1])
        print(plot(payload, args.plot_from.with_suffix(".png")))
        return payload
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny for a smoke run")
    env = env_info()
    progress(f"device {env['device']}, torch {env['torch']}, transformers "
             f"{env['transformers']}, commit {env['commit']}")  # fmt: skip
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(args)
    weights = sum(p.nbytes for p in model.parameters())
    progress(f"model: {weights / 2**30:.1f} GiB of weights, built in "
             f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    sess = Session(model, args)
    cpu = not sess.clock.cuda
    variants = [
        Variant(name, "cpu" if cpu else BACKEND_OF[name], PRESET_OF.get(name))
        for name in args.variants
    ]
    cases = [] if args.capacity_only else [(s, b) for s in args.lengths for b in args.batch]
    rows: list[dict[str, Any]] = []
    caps: dict[str, Any] = {}
    compiles: dict[str, dict[str, int]] = {}  # per variant: dynamo counters after the warm-up
    for vi, v in enumerate(variants):
        if v.preset is not None:
            # on the CPU smoke run, decode reads the pages with the float32 reference (the fused
            # kernel would run under the Triton interpreter: correct, but minutes per run)
            extra = {"decode_impl": "reference"} if cpu else {}
            extra.update(OVERRIDES_OF.get(v.name, {}))
            v.config = ZipVLConfig.preset(v.preset, **extra)
            zipvl.enable(model, v.config)
        null = _no_attention(model) if v.name == "dense-noattn" else contextlib.nullcontext()
        try:
            null.__enter__()
            progress(f"[{vi + 1}/{len(variants)}] {v.name}: warm-up at {args.warmup_length}")
            warm = sess.guarded(
                v, lambda v=v: sess.case(v, args.warmup_length, 1, [0, 160], 4)
            )  # 160 > recompress_every: the block kernels run once too
            if warm["status"] != "ok":
                progress(f"  warm-up: {warm['status']}")
            before = compile_counters()
            for ci, (s, b) in enumerate(cases):
                progress(f"[{vi + 1}/{len(variants)}] {v.name} ({v.label}): S={s} B={b} "
                         f"({ci + 1}/{len(cases)})")  # fmt: skip
                row = sess.guarded(
                    v,
                    lambda v=v, s=s, b=b: sess.case(v, s, b, args.decode_points, args.window),
                )
                row.update(variant=v.name, backend=v.label, S=s, B=b, dense=v.preset is None)
                if row["status"] == "ok":
                    pts = ", ".join(f"@{p} {d['median_ms']:.2f}" for p, d in row["decode"].items())
                    progress(f"  prefill {row['prefill_ms']:.0f} ms; decode ms/tok {pts}")
                else:
                    progress(f"  {row['status']}")
                rows.append(row)
            after = compile_counters()
            compiles[v.name] = {k: after[k] - before[k] for k in after}
            if args.capacity:
                caps[v.name] = capacity(sess, v) | {"backend": v.label}
                progress(f"  capacity {v.name}: {caps[v.name]}")
        finally:
            null.__exit__(None, None, None)
            if v.preset is not None:
                zipvl.disable(model)
            free_memory(model, v)
    add_ratios(rows, args.decode_points)

    shapes = "tiny (2 layers, hidden 64)" if args.tiny else (
        f"LongVA-7B shapes, {args.layers} layers, vocab {model.config.vocab_size}"
    )  # fmt: skip
    print(f"# transformers Qwen2ForCausalLM, {shapes}, bf16, random weights")
    print(f"# {env['device']} torch {env['torch']} transformers {env['transformers']} "
          f"commit {env['commit']}")  # fmt: skip
    print(f"# weights {weights / 2**30:.2f} GiB; decode: median of {args.window} steps from "
          "each point; x = fastest dense time / variant time (> 1: faster)")  # fmt: skip
    if cpu:
        print("# CPU run: SDPA backends not forced (flash / cuDNN need CUDA), no peak memory")
    if caps:
        cap_rows = [
            {
                "variant": name,
                "SDPA backend": c["backend"],
                "length": args.capacity_length,
                "max batch": c["batch"],
                "estimate": c["estimate"],
                "decode tok/s": c["tokens_per_s"] if c["tokens_per_s"] else "n/a",
                "peak GiB": c.get("peak_gib") or "n/a",
                "tries": " ".join(f"{b}:{s}" for b, s in c["tries"].items()),
            }
            for name, c in caps.items()
        ]
        print("\n## capacity\n")
        print(markdown_table(cap_rows))
        print()
    print(markdown_table(table_rows(rows, args.decode_points)))
    if compiles:
        print("# compiles after warm-up (torch._dynamo counters): " + "; ".join(
            f"{n}: {c['unique_graphs']} graphs, {c['recompiles']} recompiles"
            for n, c in compiles.items()))  # fmt: skip
    payload = {
        "bench": "gpu_hf",
        "env": env,
        "model": "Qwen2ForCausalLM",
        "tiny": args.tiny,
        "layers": model.config.num_hidden_layers,
        "vocab": model.config.vocab_size,
        "weights_gib": weights / 2**30,
        "window": args.window,
        "ff_chunk": args.ff_chunk,
        "cache_argument": sess.cache_kw,
        "decode_points": args.decode_points,
        "rows": rows,
        "capacity": caps,
        "compiles_after_warmup": compiles,
    }
    # last stdout line: the JSON document, written to --out (write_result writes under $OUT)
    old = os.environ.get("OUT")
    os.environ["OUT"] = str(args.out.parent)
    try:
        write_result(args.out.stem, payload)
    finally:
        if old is None:
            del os.environ["OUT"]
        else:
            os.environ["OUT"] = old
    progress(f"result: {args.out}")
    if args.plot:
        png = plot(payload, args.out.with_suffix(".png"))
        if png:
            progress(f"plot: {png}")
    return payload


if __name__ == "__main__":
    main()
