"""Host time of one fused decode call's launch path, without a GPU.

``zipvl.paged_decode_triton.paged_decode_triton`` runs as it does on the GPU, except that each
kernel launch is replaced by what Triton's ``JITFunction.run`` does before the driver call: the
binder (argument specialisation), the kernel cache key and the launcher's ``data_ptr`` read of
every tensor argument. Not counted: the fixed costs of a launch (device and stream queries,
launch metadata, hooks, ``cuLaunchKernel``). One layer of LongVA / Qwen2-VL-7B at batch 1
(28 query heads, 4 KV heads, head dim 128, the page splits of the launch rule on an H200), in
both page code orders (``--code-orders``). Uses Triton
internals (``create_function_from_signature``, ``compute_cache_key``: Triton 3.6 - 3.9).

Run:  python bench/launch_host.py            (not under TRITON_INTERPRET=1)
Compare two trees by running it with PYTHONPATH at each.
"""

from __future__ import annotations

import argparse
import os
import timeit

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000, help="calls per timing")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--code-orders", nargs="+", default=["slice", "fragment"],
                    choices=["slice", "fragment"],
                    help="the store's page code order, each timed: slice (the tile / pages "
                    "kernel) or fragment (zipvl.fragment_decode_triton)")  # fmt: skip
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the compiled launch path is timed")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime import jit

    import zipvl.fragment_decode_triton as fragment
    import zipvl.paged_decode_triton as kernels
    from zipvl.cache import PagedKVStore, PageFormat

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    seen = {"count": False, "launches": 0, "specialised": 0, "tensors": 0}

    class Launch:  # a jitted kernel up to the driver call
        def __init__(self, fn) -> None:
            self.binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
            self.cache: dict = {}
            self.specialised = sum(1 for p in fn.params if not p.is_constexpr)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                bound, spec, options = self.binder(*args, **kwargs)
                jit.compute_cache_key(self.cache, spec, options)
                ptrs = [x.data_ptr() for x in bound.values() if isinstance(x, torch.Tensor)]
                if seen["count"]:
                    seen["launches"] += 1
                    seen["specialised"] += self.specialised  # specialize_impl calls
                    seen["tensors"] += len(ptrs)

            return launch

    for name in ("_paged_decode_kernel", "_merge_kernel"):  # the merge: before it was folded in
        if hasattr(kernels, name):
            setattr(kernels, name, Launch(getattr(kernels, name)))
    fragment.fragment_decode_kernel = Launch(fragment.fragment_decode_kernel)
    kernels.INTERPRETED = False  # CPU tensors stand in for CUDA ones: nothing is dereferenced
    for order in a.code_orders:
        fmt = PageFormat(page_size=128, code_order=order)
        store = PagedKVStore(fmt, batch_size=1, num_heads=4, head_dim=128,
                             dtype=torch.bfloat16, device="cpu", recompress_every=32,
                             sink_tokens=4)  # fmt: skip
        q = torch.randn(1, 28, 128, dtype=torch.bfloat16)
        ns = 64 if order == "slice" else 99  # as the launch rule picks on an H200 at batch 1
        n = ns + (1 if order == "slice" else 4)
        ws = {"splits": ns, "m": torch.empty(1, 28, n), "l": torch.empty(1, 28, n),
              "o": torch.empty(1, 28, n, 128), "convert": "asm"}  # fmt: skip
        if order == "fragment":
            ws.update(fp_splits=4, min_pages=32)

        def call(store=store, q=q, ws=ws) -> None:
            kernels.paged_decode_triton(q, store, 0.088, ws)

        call()  # one-time work: tickets, address table
        seen.update(count=True, launches=0, specialised=0, tensors=0)
        call()
        seen["count"] = False
        times = sorted(timeit.repeat(call, number=a.calls, repeat=a.repeat))
        best, median = times[0] / a.calls * 1e6, times[len(times) // 2] / a.calls * 1e6
        print(f"triton {triton.__version__}, {order} order: {best:.1f} us per call (median "
              f"{median:.1f}); {seen['launches']} launch(es), {seen['specialised']} specialised "
              f"arguments, {seen['tensors']} tensor arguments")  # fmt: skip


if __name__ == "__main__":
    main()
