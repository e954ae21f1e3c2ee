"""Where a replayed decode step's time goes (GraphDecoder, a transformers model, one GPU).

Prefill one prompt, let the decoder record its step, then profile ``--steps`` replays with
torch's profiler: wall ms per step, GPU-busy ms per step (the sum of kernel times), the host's
share of each step (the decoder's bookkeeping between replays), and the top kernels per step.
Prints a table and one JSON line.

Run:  python bench/profile_graph_step.py --layers 28 --length 32768 --batch 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_hf
from common import env_info

import zipvl
from zipvl import ZipVLConfig
from zipvl.models import cache_argument
from zipvl.models.captured import GraphDecoder
from zipvl.testing.recorder import ReRunRecorder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--preset", default="fixed")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    args = gpu_hf.parse_args(["--layers", str(a.layers), "--lengths", str(a.length),
                              "--device", a.device] + ([] if cuda else ["--tiny"]))  # fmt: skip
    model = gpu_hf.build_model(args)
    extra = {} if cuda else {"decode_impl": "reference"}
    cache = zipvl.enable(model, ZipVLConfig.preset(a.preset, **extra))
    kw = {cache_argument(model.forward): cache}
    ids = torch.randint(0, model.config.vocab_size, (1, a.length), device=a.device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad():
        tok = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw).logits[:, -1:]
        tok = tok.argmax(-1)
        if a.batch > 1:
            tok = gpu_hf.replicate(cache, tok, a.batch)
        dec = GraphDecoder(model, cache, recorder=None if cuda else ReRunRecorder())
        for _ in range(4):  # eager, record, replays
            tok = dec(tok).argmax(-1)
        sync()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            tok = dec(tok).argmax(-1)
        sync()
        wall = (time.perf_counter() - t0) * 1e3 / a.steps
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(a.steps):
                tok = dec(tok).argmax(-1)
            sync()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    ev = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda]
    busy = sum(getattr(e, attr) for e in ev) / 1e3 / a.steps
    top = sorted(ev, key=lambda e: getattr(e, attr), reverse=True)[: a.top]
    env = env_info()
    print(f"# {env.get('device')} torch {env['torch']} commit {env['commit']}; {a.layers} layers, "
          f"S={a.length}, B={a.batch}, preset {a.preset}, {a.steps} replayed steps; "
          f"decoder stats {dec.stats}")  # fmt: skip
    print(f"wall {wall:.2f} ms/step (unprofiled); GPU busy {busy:.2f} ms/step "
          f"({busy / wall:.0%} of wall)")  # fmt: skip
    print("| kernel | ms per step | calls per step |")
    print("|---|---|---|")
    rows: list[dict[str, Any]] = []
    for e in top:
        ms = getattr(e, attr) / 1e3 / a.steps
        per = e.count / a.steps
        rows.append({"kernel": e.key[:120], "ms_per_step": ms, "calls_per_step": per})
        print(f"| {e.key[:90]} | {ms:.3f} | {e.count / a.steps:.1f} |")
    print(json.dumps({"bench": "profile_graph_step", "env": env, "wall_ms": wall,
                      "busy_ms": busy, "stats": dec.stats, "top": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
