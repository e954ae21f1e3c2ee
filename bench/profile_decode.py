"""One launch of the fused paged decode kernel at LongVA shapes, for Nsight Compute.

Run:  ncu --clock-control none --kernel-name regex:_paged_decode_kernel --launch-skip 2 \\
          --launch-count 1 --section SpeedOfLight --section WarpStateStats --section Occupancy \\
          --section LaunchStats python bench/profile_decode.py --batch 8 --tokens 131072
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import build

from zipvl.decode import decode_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--page", type=int, default=128)
    args = ap.parse_args()
    store, _, _ = build(args.batch, args.tokens, 4, 128, 0.4, args.page, 50)
    q = torch.randn(args.batch, 28, 1, 128, device="cuda", dtype=torch.bfloat16)
    for _ in range(4):
        decode_attention(q, store, impl="triton")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
