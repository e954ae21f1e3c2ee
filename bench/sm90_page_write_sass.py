"""The page-write kernel (``zipvl.cache.page_triton``) compiled for sm_90 on a machine without
a GPU: registers, stack (spills) and SASS instruction counts per variant, the proxy between GPU
runs (see ``bench/sm90_decode_sass.py`` for the decode kernel).

Run:  python bench/sm90_page_write_sass.py '{"warps": 4}' '{"warps": 8}'
      (each argument: "warps" and constexprs of the kernel as JSON)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from sm90_decode_sass import cubin_report
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zipvl.cache import page_triton as kernels

TYPES = {"k_ptr": "*bf16", "v_ptr": "*bf16", "idx_ptr": "*i64", "full_ptr": "*i32",
         "base_ptr": "*i64", "npages_ptr": "*i32", "table_ptr": "*i32", "fill_ptr": "*i32",
         "kcode_ptr": "*u8", "vcode_ptr": "*u8", "kscale_ptr": "*fp16", "kzero_ptr": "*fp16",
         "vscale_ptr": "*fp16", "vzero_ptr": "*fp16", "vcs_ptr": "*fp16", "fpk_ptr": "*bf16",
         "fpv_ptr": "*bf16", "n_ptr": "*i64", "fpcount_ptr": "*i32",
         "flag_ptr": "*i32"}  # fmt: skip
DEFAULTS = {"P": 128, "D": 128, "BITS": 2, "LEVELS": 3, "EMIN": -14, "MANT": 10, "PD": 1,
            "TINY_SCALE": 2.0**-126, "MIN_CS": 2.0**-14, "CST": True, "IDENTITY": False,
            "R": 32, "STAGE": True, "FRAG": False}  # fmt: skip


def compile_kernel(warps: int = 4, **consts):
    fn = kernels._write_pages_kernel
    names = fn.arg_names
    values = {**DEFAULTS, **consts}
    sig = {n: TYPES.get(n, "constexpr" if n in values else "i32") for n in names}
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(names.index(k),): v for k, v in values.items() if k in names},
    )
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("specs", nargs="+", type=json.loads)
    args = ap.parse_args(argv)
    for spec in args.specs:
        res, sass = cubin_report(compile_kernel(**spec))
        n = sum(1 for line in sass.splitlines() if ";" in line and "/*" in line)
        ldl = sass.count("LDL")
        stl = sass.count("STL")
        print(json.dumps(spec), res, f"| {n} SASS lines, LDL {ldl}, STL {stl}")


if __name__ == "__main__":
    main()
