"""Host-side profile of transformers decode steps with and without ZipVL (where the per-layer
Python time goes; the GPU work of one B = 1 step is far smaller than its host work).

Run:  python bench/profile_hf_decode.py --layers 4 --length 8192 --steps 64
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
import gpu_hf

import zipvl
from zipvl import ZipVLConfig
from zipvl.models.cache_arg import cache_argument


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--preset", default="fixed")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    args = gpu_hf.parse_args(
        ["--layers", str(a.layers), "--lengths", str(a.length), "--device", a.device]
        + (["--tiny"] if a.device == "cpu" else [])
    )
    model = gpu_hf.build_model(args)
    kw = cache_argument(model.forward)
    ids = torch.randint(0, model.config.vocab_size, (1, a.length), device=a.device)

    @torch.no_grad()
    def run(cache, prof: bool) -> float:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(8):
            tok = model(input_ids=tok, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
        if a.device == "cuda":
            torch.cuda.synchronize()
        p = cProfile.Profile() if prof else None
        t0 = time.perf_counter()
        if p:
            p.enable()
        for _ in range(a.steps):
            tok = model(input_ids=tok, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
        if p:
            p.disable()
        if a.device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / a.steps * 1e3
        if p:
            s = io.StringIO()
            pstats.Stats(p, stream=s).sort_stats("tottime").print_stats(30)
            print(s.getvalue())
        return ms

    from transformers import DynamicCache

    dense = run(DynamicCache(config=model.config), False)
    dense_p = run(DynamicCache(config=model.config), True)
    zipvl.enable(model, ZipVLConfig.preset(a.preset))
    z = run(zipvl.new_cache(model), False)
    z_p = run(zipvl.new_cache(model), True)
    per_layer = (z - dense) / a.layers * 1e3
    print(f"dense {dense:.2f} ms/step (profiled {dense_p:.2f}); {a.preset} {z:.2f} ms/step "
          f"(profiled {z_p:.2f}); {per_layer:.0f} us per layer more")  # fmt: skip


if __name__ == "__main__":
    main()
