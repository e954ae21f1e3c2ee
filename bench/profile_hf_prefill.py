"""Where a transformers model's prefill time goes with ZipVL on (GPU kernel time per stage).

The stages are labelled from outside the library (``record_function`` wrappers put around
the attention function's pieces by this script), so the library's own path runs unchanged.
Prints the wall time of one prefill per preset, the GPU time of each stage summed over the
layers, and the top kernels; one JSON line last.

Run:  python bench/profile_hf_prefill.py --layers 4 --lengths 32768 131072
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_hf
from common import env_info

import zipvl
import zipvl.models.hf as zhf
from zipvl import ZipVLConfig
from zipvl.cache.cache import ZipVLCache
from zipvl.models.cache_arg import cache_argument

STAGES = ("zipvl.cache_update", "zipvl.prefill_attention", "zipvl.compress_prefill")


def _labelled(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def labels() -> Iterator[None]:
    """Wrap the cache update, the sparse prefill attention and the cache compression."""
    saved = (ZipVLCache.update, zhf.prefill_attention, ZipVLCache.compress_prefill)
    ZipVLCache.update = _labelled(STAGES[0], saved[0])  # type: ignore[method-assign]
    zhf.prefill_attention = _labelled(STAGES[1], saved[1])  # type: ignore[assignment]
    ZipVLCache.compress_prefill = _labelled(STAGES[2], saved[2])  # type: ignore[method-assign]
    try:
        yield
    finally:
        ZipVLCache.update, zhf.prefill_attention, ZipVLCache.compress_prefill = saved  # type: ignore[method-assign,assignment]


def stage_kernels(prof: Any, stage: str, top: int) -> list[tuple[str, float, int]]:
    """The device kernels launched under ``stage``, summed by name: (name, ms, calls)."""
    ms: dict[str, float] = {}
    calls: dict[str, int] = {}
    for root in prof.events():
        if root.name != stage:
            continue
        stack = [root]
        while stack:
            ev = stack.pop()
            for k in ev.kernels:
                ms[k.name] = ms.get(k.name, 0.0) + k.duration / 1e3
                calls[k.name] = calls.get(k.name, 0) + 1
            stack.extend(ev.cpu_children)
    order = sorted(ms, key=lambda n: ms[n], reverse=True)[:top]
    return [(n, ms[n], calls[n]) for n in order]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768])
    ap.add_argument("--presets", nargs="+", default=["fixed"])
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument(
        "--probe-cap",
        type=int,
        default=None,
        help="ZipVLConfig.probe_cap (default: the config's own, 64; 0: uncapped, the paper's)",
    )
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    args = gpu_hf.parse_args(
        ["--layers", str(a.layers), "--lengths", *map(str, a.lengths), "--device", a.device]
        + (["--tiny"] if a.device == "cpu" else [])
    )
    model = gpu_hf.build_model(args)
    kw = cache_argument(model.forward)
    cuda = a.device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    results: list[dict[str, Any]] = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    @torch.no_grad()
    def prefill(ids: torch.Tensor, cache: Any) -> None:
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})

    for preset in [None, *a.presets]:
        name = preset or "dense"
        if preset is not None:
            cap = {} if a.probe_cap is None else {"probe_cap": a.probe_cap or None}
            zipvl.enable(model, ZipVLConfig.preset(preset, **cap))
        for n in a.lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, n), device=a.device)

            def new_cache() -> Any:
                if preset is None:
                    from transformers import DynamicCache

                    return DynamicCache(config=model.config)
                return zipvl.new_cache(model)

            for _ in range(2):  # warm-up: compiles, the captured plan's capture
                prefill(ids, new_cache())
            sync()
            t0 = time.perf_counter()
            prefill(ids, new_cache())
            sync()
            wall = (time.perf_counter() - t0) * 1e3
            with labels(), profile(activities=acts) as prof:
                prefill(ids, new_cache())
                sync()
            ev = prof.key_averages()
            dev = "device_time_total" if cuda else "cpu_time_total"
            stage_ms = {e.key: getattr(e, dev) / 1e3 for e in ev if e.key in STAGES}
            self_t = "self_device_time_total" if cuda else "self_cpu_time_total"
            kernels = sorted(
                (e for e in ev if (e.device_type.name == "CUDA") == cuda and e.key not in STAGES),
                key=lambda e: getattr(e, self_t),
                reverse=True,
            )[: a.top]
            busy = sum(
                getattr(e, self_t) for e in ev
                if (e.device_type.name == "CUDA") == cuda and e.key not in STAGES
            ) / 1e3  # fmt: skip
            share = f"{busy / wall:.0%}"
            print(f"\n## {name}, S={n}, {a.layers} layers: one prefill {wall:.1f} ms "
                  f"(unprofiled); kernels {busy:.1f} ms ({share} of the wall time)")  # fmt: skip
            inside: dict[str, list[tuple[str, float, int]]] = {}
            for k, v in stage_ms.items():
                print(f"  stage {k}: {v:.2f} ms GPU ({v / a.layers:.3f} per layer)")
                inside[k] = stage_kernels(prof, k, 8) if cuda else []
                for kn, kms, kc in inside[k]:
                    print(f"      {kms:9.3f} {kc:6d}  {kn[:100]}")
            print("  top kernels (self GPU ms, calls):")
            top = []
            for e in kernels:
                t = getattr(e, self_t) / 1e3
                top.append({"kernel": e.key[:120], "ms": round(t, 3), "calls": e.count})
                print(f"    {t:9.3f} {e.count:6d}  {e.key[:110]}")
            results.append(
                {
                    "preset": name,
                    "S": n,
                    "wall_ms": wall,
                    "kernels_ms": busy,
                    "stages_ms": stage_ms,
                    "stage_kernels": inside,
                    "top": top,
                }
            )
        if preset is not None:
            zipvl.disable(model)
    print(
        json.dumps(
            {"bench": "profile_hf_prefill", "layers": a.layers, "env": env_info(), "rows": results}
        )
    )


if __name__ == "__main__":
    main()
