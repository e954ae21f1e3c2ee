"""Decode of a transformers model eager and replayed from CUDA graphs, dense and ZipVL, one run.

A Qwen2 model with LongVA-7B shapes (random bf16 weights), one prompt per length. Variants:

* ``dense-flash``: ``DynamicCache``, eager steps, SDPA forced to flash (the fastest eager dense
  decode on the H200);
* ``dense-static-graph-<backend>``: transformers' ``StaticCache`` (capacity prompt + steps), the
  step recorded by ``GraphDecoder`` (the prompt's K/V copied in from a flash prefill), SDPA
  forced to ``efficient`` or ``cudnn`` (the static cache attends over its capacity with a mask,
  which flash cannot take);
* ``fixed``: ZipVL ``fixed`` preset (r = 0.42), eager steps;
* ``fixed-graph``: the same cache decoded by ``GraphDecoder`` (recorded step, host bookkeeping
  and the decode-block recompression between replays);
* ``fixed-graph-slice``: the same with pages in the slice code order
  (``ZipVLConfig(code_order="slice")``), read by the ``tile`` / ``pages`` kernels: the
  decode kernel before the fragment order, side by side;
* ``fixed-graph[<launch>]`` (``--launch``): the same with the fused kernel's launch settings of
  ``bench/gpu_decode.py``'s ``--sweep`` syntax (``variant=pages,splits=8``: splits in quarters
  of the default count) in every layer's workspace.

Per variant: ms per token over ``--steps`` greedy steps after ``--warmup`` steps (wall clock,
synchronised at both ends: the recompression every 100 tokens and any re-recording are
included), the agreement of ``fixed-graph``'s greedy tokens with ``fixed``'s over every step
(and the first steps' logit difference), the decoder's counters. Prints a table and one JSON
line.

Run:  python bench/gpu_hf_graph.py --lengths 32768 131072 --batch 1 8
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_hf
from common import env_info

import zipvl
from zipvl import ZipVLConfig
from zipvl.models import cache_argument, is_enabled
from zipvl.models.captured import GraphDecoder
from zipvl.testing.recorder import ReRunRecorder

VARIANTS = ("dense-flash", "dense-static-graph-efficient", "dense-static-graph-cudnn", "fixed",
            "fixed-graph", "fixed-graph-slice")  # fmt: skip


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _sdpa(backend: str) -> contextlib.AbstractContextManager[Any]:
    if not torch.cuda.is_available():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION}  # fmt: skip
    return sdpa_kernel([kinds[backend]])


def _static_from(model: Any, dyn: Any, capacity: int, batch: int) -> Any:
    """A StaticCache of ``capacity`` positions holding the DynamicCache's prompt."""
    from transformers import StaticCache

    static = StaticCache(config=model.config, max_cache_len=capacity)
    for i, layer in enumerate(dyn.layers):
        k, v = layer.keys, layer.values
        if k.shape[0] != batch:
            k, v = k.repeat_interleave(batch, 0), v.repeat_interleave(batch, 0)
        pos = torch.arange(k.shape[2], device=k.device)
        static.update(k, v, i, {"cache_position": pos})
    return static


@contextlib.contextmanager
def _launch(spec: str | None) -> Any:
    """Every fused-decode workspace made inside gets the launch settings ``spec``."""
    if spec is None:
        yield
        return
    import gpu_decode

    import zipvl.decode as zdec

    launch = gpu_decode.parse_launch(spec)
    made = zdec.workspace

    def patched(store: Any, hq: int) -> dict[str, Any]:
        fresh = getattr(store, "_decode_ws", None) is None or store._decode_ws["key"] != (
            store.batch_size, hq)  # fmt: skip
        ws = made(store, hq)
        if fresh:
            gpu_decode.set_launch(ws, launch, ws["splits"], store.batch_size, hq, store.head_dim)
        return ws

    zdec.workspace = patched  # type: ignore[assignment]
    try:
        yield
    finally:
        zdec.workspace = made  # type: ignore[assignment]


@torch.no_grad()
def run_variant(model: Any, name: str, ids: torch.Tensor, batch: int, steps: int, warmup: int,
                record_logits: int, points: Sequence[int] = (0,)) -> dict[str, Any]:  # fmt: skip
    """Prefill, ``warmup`` steps, then a timed window of ``steps`` at each of ``points``
    (tokens generated after the warm-up; untimed steps of the same kind in between)."""
    kw_name = cache_argument(model.forward)
    s = ids.shape[1]
    zip_on = name.startswith("fixed")
    graph = "graph" in name
    backend = "flash" if not graph or zip_on else name.rsplit("-", 1)[1]
    if zip_on:
        cache = zipvl.new_cache(model)
    else:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    with _sdpa("flash"):
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw_name: cache})
    tok = out.logits[:, -1:].argmax(-1)
    del out
    if batch > 1:
        tok = gpu_hf.replicate(cache, tok, batch) if zip_on else tok.repeat_interleave(batch, 0)
    if not zip_on and graph:
        dyn = cache
        cache = _static_from(model, dyn, s + warmup + max(points) + steps + 8, batch)
        del dyn
    elif not zip_on and batch > 1:
        cache.batch_repeat_interleave(batch)
    gc.collect()
    torch.cuda.empty_cache()
    cuda = ids.is_cuda
    recorder = None if cuda else ReRunRecorder()  # CPU smoke runs: the stand-in
    decoder = GraphDecoder(model, cache, recorder=recorder) if graph else None
    n = s

    tokens: list[torch.Tensor] = []  # every greedy token (device tensors: no sync per step)

    def step(t: torch.Tensor) -> torch.Tensor:
        nonlocal n
        if decoder is not None:
            logits = decoder(t)  # positions: the cache length (a StaticCache: on the device)
        else:
            logits = model(input_ids=t, use_cache=True, **{kw_name: cache}).logits[:, -1:]
        n += 1
        tokens.append(logits.argmax(-1))
        return logits

    kept: list[torch.Tensor] = []
    with _sdpa(backend):
        for i in range(warmup):
            logits = step(tok)
            if i < record_logits:
                kept.append(logits.float().cpu())
            tok = logits.argmax(-1)
        at: dict[str, float] = {}
        done = 0  # tokens generated after the warm-up
        for p in sorted(points):
            while done < p:  # untimed advance
                tok = step(tok).argmax(-1)
                done += 1
            _sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = step(tok).argmax(-1)
            _sync()
            at[str(p)] = (time.perf_counter() - t0) * 1e3 / steps
            done += steps
            progress(f"  {name} @{p}: {at[str(p)]:.2f} ms/token")
        ms = at[str(min(points))]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    row: dict[str, Any] = {"variant": name, "S": s, "B": batch, "backend": backend,
                           "ms_per_token": ms, "ms_at": at, "steps": steps,
                           "peak_gib": peak}  # fmt: skip
    if decoder is not None:
        row["stats"] = dict(decoder.stats)
    row["_logits"] = kept
    row["_tokens"] = torch.cat(tokens, 1).cpu()
    if zip_on:
        zipvl.new_cache(model)  # drop the attention function's reference
    gc.collect()
    torch.cuda.empty_cache()
    return row


def parse_batch_of(
    ap: argparse.ArgumentParser, specs: Sequence[str], variants: Sequence[str]
) -> dict[str, list[int]]:
    """``--batch-of VARIANT=B[,B...]`` -> {variant: [B, ...]} (errors through ``ap.error``)."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or name not in variants:
            ap.error(f"--batch-of: expected VARIANT=B[,B...] with VARIANT one of --variants "
                     f"{list(variants)}, got {spec!r}")  # fmt: skip
        try:
            out[name] = [int(v) for v in values.split(",")]
        except ValueError:
            ap.error(f"--batch-of: expected positive integer batches, got {spec!r}")
        if min(out[name]) < 1:
            ap.error(f"--batch-of: expected positive integer batches, got {spec!r}")
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--steps", type=int, default=200, help="timed steps (two decode blocks)")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument(
        "--points",
        type=int,
        nargs="+",
        default=[0],
        help="generated tokens (after the warm-up) at which a window is timed",
    )
    ap.add_argument(
        "--baseline-points",
        type=int,
        nargs="+",
        default=None,
        help="points for the dense variants (default: --points); dense per-token time only "
        "grows with length, so its first point is the conservative baseline",
    )
    ap.add_argument(
        "--launch",
        nargs="+",
        default=[],
        help="extra fixed-graph rows with these fused-kernel launch settings (gpu_decode's "
        "--sweep syntax, e.g. variant=pages,splits=8)",
    )
    ap.add_argument(
        "--batch-of",
        nargs="+",
        default=[],
        metavar="VARIANT=B[,B...]",
        help="batches of one variant instead of --batch (capacity: each variant at the largest "
        "batch of 128k prompts that fits it, e.g. dense-flash=17 fixed-graph=73); tokens/s is "
        "reported per row",
    )
    ap.add_argument("--agree", type=int, default=8, help="first steps compared, fixed vs graph")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    a = ap.parse_args(argv)
    batch_of = parse_batch_of(ap, a.batch_of, a.variants)
    env = env_info()
    progress(f"{env.get('device')} torch {env['torch']} transformers {env['transformers']} "
             f"commit {env['commit']}")  # fmt: skip
    margs = gpu_hf.parse_args(["--layers", str(a.layers), "--lengths", *map(str, a.lengths),
                               "--decode-points", str(a.steps + a.warmup + max(a.points)),
                               "--device", a.device]
                              + (["--tiny"] if a.tiny else []))  # fmt: skip
    torch.manual_seed(0)
    model = gpu_hf.build_model(margs)
    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device=a.device).manual_seed(0)
    if any(name.startswith("fixed") for name in a.variants) and not a.tiny:
        # one-time costs out of every timed window: Triton compiles the page writer and the
        # decode kernels on first use (the first decode block, 100 tokens in)
        progress("compile warm-up: fixed, 512 tokens, 110 eager steps")
        zipvl.enable(model, ZipVLConfig.preset("fixed"))
        short = torch.randint(0, model.config.vocab_size, (1, 512), device=a.device)
        run_variant(model, "fixed", short, 1, 110, 2, 0)
        zipvl.disable(model)
    batches = sorted({*a.batch, *(b for bs in batch_of.values() for b in bs)})
    for s in a.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, s), device=a.device, generator=gen)
        for b in batches:
            names = list(a.variants) + [f"fixed-graph[{spec}]" for spec in a.launch]
            for name in names:
                if b not in batch_of.get(name, a.batch):
                    continue
                if name.startswith("dense-static") and b > 1:
                    continue  # the static cache's prefill copy would hold B copies twice
                if name.startswith("fixed"):
                    extra = {} if a.device == "cuda" else {"decode_impl": "reference"}
                    if name == "fixed-graph-slice":
                        extra["code_order"] = "slice"
                    zipvl.enable(model, ZipVLConfig.preset("fixed", **extra))
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                progress(f"{name}: S={s} B={b}")
                try:
                    pts = a.points
                    if name.startswith("dense") and a.baseline_points is not None:
                        pts = a.baseline_points
                    spec = name[len("fixed-graph[") : -1] if name.endswith("]") else None
                    with _launch(spec):
                        row = run_variant(model, name, ids, b, a.steps, a.warmup, a.agree, pts)
                    row["status"] = "ok"
                except torch.OutOfMemoryError:
                    row = {"variant": name, "S": s, "B": b, "status": "OOM"}
                except Exception as e:  # one failing variant must not end the run
                    why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    progress(f"  {name}: {why}")
                    row = {"variant": name, "S": s, "B": b, "status": "error", "error": why}
                finally:
                    if is_enabled(model):
                        zipvl.disable(model)
                    gc.collect()
                    torch.cuda.empty_cache()
                if row.get("status") == "ok":
                    progress(f"  {row['ms_per_token']:.2f} ms/token {row.get('stats', '')}")
                rows.append(row)
    # agreement of the replayed ZipVL steps with the eager ones, and ratios
    for r in rows:
        if r.get("status") == "ok":
            r["tokens_per_s"] = r["B"] * 1e3 / r["ms_per_token"]
    for s in a.lengths:
        for b in batches:
            case = {r["variant"]: r for r in rows if r["S"] == s and r["B"] == b}
            eager, graph = case.get("fixed"), case.get("fixed-graph")
            if eager and graph and eager.get("_logits") and graph.get("_logits"):
                le, lg = torch.cat(eager["_logits"], 1), torch.cat(graph["_logits"], 1)
                graph["max_logit_diff_first"] = float((le - lg).abs().max())
            if eager and graph and "_tokens" in eager and "_tokens" in graph:
                te, tg = eager["_tokens"], graph["_tokens"]
                m = min(te.shape[1], tg.shape[1])
                graph["agree_tokens"] = float((te[:, :m] == tg[:, :m]).float().mean())
                graph["agree_steps"] = m
            oks = [r for r in case.values() if r.get("status") == "ok"]
            dense = [r["ms_per_token"] for r in oks if r["variant"].startswith("dense")]
            eager_dense = [r["ms_per_token"] for r in oks if r["variant"] == "dense-flash"]
            for r in oks:
                if dense:
                    r["x_vs_fastest_dense"] = min(dense) / r["ms_per_token"]
                if eager_dense:
                    r["x_vs_dense_flash_eager"] = eager_dense[0] / r["ms_per_token"]
    for r in rows:
        r.pop("_logits", None)
        r.pop("_tokens", None)
    print(f"# transformers Qwen2ForCausalLM, LongVA-7B shapes, "
          f"{model.config.num_hidden_layers} layers, bf16, random "
          f"weights; {env.get('device')} torch {env['torch']} transformers "
          f"{env['transformers']} commit {env['commit']}")  # fmt: skip
    print(
        f"# ms per token over {a.steps} greedy steps after {a.warmup} (host included); x = "
        "fastest dense / variant; SDPA backend named per row"
    )
    pts = " / ".join(f"@{p}" for p in sorted(a.points))
    if a.baseline_points is not None:
        pts += " (dense: " + " / ".join(f"@{p}" for p in sorted(a.baseline_points)) + ")"
    print(
        f"| variant | SDPA backend | length | batch | ms/token {pts} | x vs fastest dense | "
        "x vs dense flash eager | tokens/s | spread over points | peak GiB | "
        "replays / records / eager | tokens as eager |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("status") != "ok":
            print(f"| {r['variant']} | - | {r['S']} | {r['B']} | {r['status']} |" + " |" * 7)
            continue
        st = r.get("stats")
        sts = f"{st['replays']} / {st['records']} / {st['eager']}" if st else "-"
        at = list(r["ms_at"].values())
        spread = f"{max(at) / min(at) - 1:+.0%}" if len(at) > 1 else "-"
        print(f"| {r['variant']} | {r['backend']} | {r['S']} | {r['B']} | "
              f"{' / '.join(f'{v:.2f}' for v in at)} | "
              f"{r.get('x_vs_fastest_dense', float('nan')):.2f} | "
              f"{r.get('x_vs_dense_flash_eager', float('nan')):.2f} | "
              f"{r['tokens_per_s']:.0f} | {spread} | "
              f"{r['peak_gib']:.1f} | {sts} | {r.get('agree_tokens', '-')} |")  # fmt: skip
    payload = {"bench": "gpu_hf_graph", "env": env, "layers": a.layers, "rows": rows}
    print(json.dumps(payload))
    out = Path(os.environ["OUT"]) / "gpu_hf_graph.json" if os.environ.get("OUT") else None
    if out is not None:
        out.write_text(json.dumps(payload) + "\n")
    return payload


if __name__ == "__main__":
    main()
