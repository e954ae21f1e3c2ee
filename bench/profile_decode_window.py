"""Where a transformers decode step's time goes, at several points of a generation (GPU).

Why: at batch 8 x 128k the ZipVL step took 45, 39 and 30 ms at 0, 1,000 and 4,000 generated
tokens while dense stayed at 51-53 ms (``bench/results/h200/hf/``). This script profiles one
window of steps at each point with torch.profiler (CPU + CUDA) and prints, per point: wall ms
per step, GPU busy ms per step (the sum of kernel times), kernels per step, the ten costliest
kernels and the ten costliest host operators. A GPU-side cause shows as a kernel whose time
changes between points; a host-side one as wall time far above GPU busy time.

The model is ``bench/gpu_hf.py``'s (LongVA-7B shapes, random weights); one row of ``--length``
tokens is prefilled and repeated to ``--batch`` rows (ZipVL rows then own their pages, as in
``gpu_hf.py --replicate``). Between points the cache advances one token a step, untimed.

Run:  python bench/profile_decode_window.py --batch 8 --length 131072 --points 0 200 1000 4000
      python bench/profile_decode_window.py --device cpu --tiny --length 300 --points 0 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_hf
from common import env_info, progress, write_result

import zipvl
from zipvl import ZipVLConfig
from zipvl.models.cache_arg import cache_argument


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    fmt = argparse.RawTextHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--points", type=int, nargs="+", default=[0, 200, 1000, 4000])
    ap.add_argument("--window", type=int, default=8, help="profiled steps per point")
    ap.add_argument("--preset", default="fixed", help="ZipVL preset; 'dense' for DynamicCache")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    return ap.parse_args(argv)


def _table(events: Any, device: bool, steps: int, n: int = 10) -> list[dict[str, Any]]:
    rows = []
    for e in events:
        on_device = e.device_type.name == "CUDA"
        if on_device != device:
            continue
        t = e.self_device_time_total if device else e.self_cpu_time_total
        rows.append({"name": e.key[:90], "ms_per_step": t / 1e3 / steps,
                     "calls_per_step": e.count / steps})  # fmt: skip
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows[:n]


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    a = parse_args(argv)
    cuda = a.device.startswith("cuda")
    args = gpu_hf.parse_args(["--layers", str(a.layers), "--lengths", str(a.length),
                              "--device", a.device] + (["--tiny"] if a.tiny else []))  # fmt: skip
    env = env_info()
    progress(f"device {env['device']}, torch {env['torch']}, commit {env['commit']}")
    model = gpu_hf.build_model(args)
    kw = cache_argument(model.forward)
    if a.preset == "dense":
        from transformers import DynamicCache

        cache: Any = DynamicCache(config=model.config)
    else:
        extra = {} if cuda else {"decode_impl": "reference"}
        zipvl.enable(model, ZipVLConfig.preset(a.preset, **extra))
        cache = zipvl.new_cache(model)
    gen = torch.Generator(device=a.device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, a.length), device=a.device, generator=gen)

    def step(tok: torch.Tensor) -> torch.Tensor:
        return (
            model(input_ids=tok, use_cache=True, logits_to_keep=1, **{kw: cache})
            .logits[:, -1:]
            .argmax(-1)
        )

    progress(f"prefill 1 x {a.length}, repeated to {a.batch} rows")
    tok = step(ids)
    if a.batch > 1:
        tok = gpu_hf.replicate(cache, tok, a.batch)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    done, points = 0, []
    for p in sorted(a.points):
        while done < p:  # one token a step, as generation does
            tok = step(tok)
            done += 1
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(a.window):
                tok = step(tok)
            if cuda:
                torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / a.window * 1e3  # profiler overhead included
        done += a.window
        ev = prof.key_averages()
        kernels = [e for e in ev if e.device_type.name == "CUDA"]
        busy = sum(e.self_device_time_total for e in kernels) / 1e3 / a.window
        point = {
            "point": p,
            "wall_ms_per_step": wall,
            "gpu_busy_ms_per_step": busy,
            "kernels_per_step": sum(e.count for e in kernels) / a.window,
            "top_kernels": _table(ev, True, a.window),
            "top_host_ops": _table(ev, False, a.window),
        }
        points.append(point)
        progress(f"@{p}: wall {wall:.2f} ms/step (profiled), GPU busy "
                 f"{point['gpu_busy_ms_per_step']:.2f} ms/step, "
                 f"{point['kernels_per_step']:.0f} kernels/step")  # fmt: skip
    for point in points:
        print(f"\n## @{point['point']}: wall {point['wall_ms_per_step']:.2f} ms/step, GPU busy "
              f"{point['gpu_busy_ms_per_step']:.2f} ms/step, "
              f"{point['kernels_per_step']:.0f} kernels/step")  # fmt: skip
        for kind in ("top_kernels", "top_host_ops"):
            print(f"{kind}:")
            for r in point[kind]:
                print(f"  {r['ms_per_step']:8.3f} ms/step  {r['calls_per_step']:7.1f}/step  "
                      f"{r['name']}")  # fmt: skip
    payload = {"bench": "profile_decode_window", "env": env, "args": vars(a), "points": points}
    write_result("profile_decode_window", payload)
    return payload


if __name__ == "__main__":
    main()
