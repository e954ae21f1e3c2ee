"""One launch of the fused decode kernel at LongVA shapes, for Nsight Compute.

Run:  ncu --kernel-name regex:_qkv_part_kernel --launch-skip 2 --launch-count 2 \\
          --section SpeedOfLight --section WarpStateStats --section Occupancy \\
          --section LaunchStats python bench/profile_decode.py --batch 8 --tokens 131072
"""

from __future__ import annotations

import argparse

import torch

from zipvl.decode import decode_attention
from zipvl.quant import MixedPrecisionKVQuantizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--block-t", type=int, default=64)
    args = ap.parse_args()
    b, hq, hkv, d, n = args.batch, 28, 4, 128, args.tokens
    k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    scores = torch.rand(b, hkv, n, device="cuda")
    idx = scores.topk(round(0.4 * n), dim=-1).indices
    keep = torch.zeros(b, hkv, n, dtype=torch.bool, device="cuda").scatter_(-1, idx, True)
    chunk = MixedPrecisionKVQuantizer().quantize(k, v, keep)
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):  # launches 0-1: compile/warm-up; the profiler skips them
        decode_attention(q, [chunk], block_t=args.block_t)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
