"""The fused decode kernel compiled for sm_90 on a machine without a GPU: registers, stack and
per-loop SASS counts (the proxy between GPU runs, see bench/notes/decode_kernel.md).

Compiles ``zipvl.paged_decode_triton._paged_decode_kernel`` with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` (LongVA heads: Hkv 4, G 7, D 128, pages of 128, NS 64; bf16 q,
fp16 parameters), dumps the cubin's resource usage and SASS with the ``cuobjdump`` shipped in
Triton's NVIDIA backend, and counts instructions (HMMA, BAR, STS, LDS, SHFL, LDG, LDGSTS, LDL,
STL, MUFU) in every loop of more than 200 instructions (a loop is a backward branch and the
instructions between its target and it). Use the Triton of the target GPU (3.6 on the H200).

Run:  python bench/sm90_decode_sass.py '{"VARIANT": 0}' '{"VARIANT": 1, "BLOCK_T": 16}'
      python bench/sm90_decode_sass.py '{"kernel": "fragment", "stages": 1}'
      (each argument: constexprs of the kernel and "warps" / "stages" / "maxnreg" as JSON;
      --out DIR keeps the SASS and TTGIR of each as DIR/<n>.sass, DIR/<n>.ttgir)
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zipvl import paged_decode_triton as kernels

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
POINTERS = {"q_ptr": "*bf16", "tab": "*i64", "m_ptr": "*fp32", "l_ptr": "*fp32",
            "o_ptr": "*fp32", "ticket_ptr": "*i32", "out_ptr": "*bf16", "lse_ptr": "*fp32",
            "sm_scale": "fp32"}  # fmt: skip
DEFAULTS = {"HKV": 4, "GROUP": 7, "B1": 4, "B2": 200, "B3": 400, "NUM_SPLITS": 64,
            "HEAD_DIM": 128, "PAGE": 128, "HBITS": 4, "LBITS": 2, "GROUP_PAD": 16,
            "BLOCK_T": 64, "PRECISE": False, "CONVERT": 2, "FP_BLOCK": 16,
            "PARAM": tl.float16, "FP": tl.bfloat16, "ALIGNED": True, "NS_PAD": 128,
            "MERGE_GM": 8, "MERGE_SB": 4, "VARIANT": 0}  # fmt: skip
# the "fragment" variant's own kernel (zipvl.fragment_decode_triton): spec {"kernel": "fragment"}
FRAGMENT_DEFAULTS = {"HKV": 4, "GROUP": 7, "B1": 4, "B2": 200, "B3": 400, "NUM_SPLITS": 99,
                     "FP_SPLITS": 4, "MIN_PAGES": 32, "OFFSET": 2,
                     "HEAD_DIM": 128, "PAGE": 128, "HBITS": 4, "LBITS": 2, "GP": 8,
                     "GROUP_PAD": 16, "ASM": 1, "PRECISE": False, "FP_BLOCK": 16,
                     "PARAM": tl.float16, "FP": tl.bfloat16, "ALIGNED": True, "NS_PAD": 128,
                     "MERGE_GM": 8, "MERGE_SB": 4}  # fmt: skip
COUNTED = ("HMMA", "BAR", "STS", "LDS", "SHFL", "LDG", "LDGSTS", "LDL", "STL", "MUFU")


def compile_kernel(warps: int = 4, stages: int = 2, maxnreg: int = 0, kernel: str = "paged",
                   **consts):  # fmt: skip
    """The compiled kernel for sm_90 (NW follows the warps, STAGES the stages; ``kernel``
    "fragment": the fragment-order kernel, which has no STAGES and runs at 1 stage)."""
    if kernel == "fragment":
        from zipvl.fragment_decode_triton import fragment_decode_kernel

        fn = fragment_decode_kernel
        values = {**FRAGMENT_DEFAULTS, "NW": warps, **consts}
    else:
        fn = kernels._paged_decode_kernel
        values = {**DEFAULTS, "STAGES": stages, "NW": warps, **consts}
    names = fn.arg_names
    sig = {n: POINTERS.get(n, "constexpr") for n in names}
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(names.index(k),): v for k, v in values.items() if k in names},
    )
    options = {"num_warps": warps, "num_stages": stages}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def cubin_report(ck: Any) -> tuple[str, str]:
    """(the cubin's resource usage line: REG, STACK, SHARED, ...; its SASS), from the
    ``cuobjdump`` in Triton's NVIDIA backend."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        run: dict[str, Any] = {"capture_output": True, "text": True, "check": True}
        usage = subprocess.run([BIN / "cuobjdump", "--dump-resource-usage", cubin], **run)
        sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], **run).stdout
    return " ".join(x.strip() for x in usage.stdout.splitlines() if "REG" in x), sass


def loops(sass: str) -> tuple[list[str], list[tuple[int, int, list[str]]]]:
    """All instructions, and (start, end, instructions) of every loop."""
    ins = []
    for line in sass.splitlines():
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), re.sub(r"^@!?U?P\w+\s+", "", m.group(2))))
    found = []
    for addr, text in ins:
        m = re.match(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            found.append((start, addr, [t for a, t in ins if start <= a <= addr]))
    return [t for _, t in ins], found


def counts(ins: list[str]) -> str:
    ops = collections.Counter(x.split()[0].split(".")[0] for x in ins)
    ops["STS"] += ops["STSM"]
    ops["LDS"] += ops["LDSM"]
    return f"{len(ins)} instructions, " + ", ".join(f"{k} {ops[k]}" for k in COUNTED)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    ap.add_argument("specs", nargs="+", type=json.loads)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    for n, spec in enumerate(args.specs):
        ck = compile_kernel(**spec)
        res, sass = cubin_report(ck)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{n}.sass").write_text(sass)
            (args.out / f"{n}.ttgir").write_text(ck.asm["ttgir"])
        print(json.dumps(spec), res)
        every, found = loops(sass)
        for start, end, ins in found:
            if len(ins) > 200:
                print(f"  loop {start:#x}-{end:#x}: {counts(ins)}")
        print(f"  kernel: {counts(every)}")


if __name__ == "__main__":
    main()
