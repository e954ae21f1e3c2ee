"""The fused quantize-and-pack Triton kernel: bit-exact against the PyTorch primitives.

On the CPU the kernel runs under TRITON_INTERPRET=1 in a subprocess (triton reads the variable
when a kernel is decorated, i.e. at import, so this process's own setting cannot be changed
safely); the cases live in ``_triton_interp_cases.py``. On CUDA it runs directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zipvl.quant import QuantSpec, quantize_pack

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _env(interpret: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_interpreted_kernel_matches_the_reference_bit_for_bit() -> None:
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
        str(HERE / "_triton_interp_cases.py"),
    ]  # fmt: skip
    res = subprocess.run(
        cmd, cwd=ROOT, env=_env(True), capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout, res.stdout[-2000:]


def test_triton_on_a_cpu_tensor_without_the_interpreter_raises() -> None:
    code = (
        "import torch, pytest\n"
        "from zipvl.quant import QuantSpec, quantize_pack\n"
        "with pytest.raises(ValueError, match=r\"x: impl='triton' needs a CUDA tensor "
        '\\(or TRITON_INTERPRET=1"):\n'
        "    quantize_pack(torch.randn(2, 32), QuantSpec(2, 'channel'), impl='triton')\n"
        "print('raised')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(False), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0 and "raised" in res.stdout, res.stdout + res.stderr


def test_unknown_impl_raises() -> None:
    listed = "'reference', 'triton'"
    with pytest.raises(ValueError, match=f"impl: expected one of {listed}, got 'flex'"):
        quantize_pack(torch.randn(2, 32), QuantSpec(2, "channel"), impl="flex")
    with pytest.raises(ValueError, match=f"impl: expected one of {listed}, got 'cuda'"):
        quantize_pack(torch.randn(2, 32), QuantSpec(2, "channel"), impl="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_the_reference(
    bits: int, group_size: int | None, param_dtype: torch.dtype
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 4, 300, 128, device="cuda", generator=gen).bfloat16() * 3 + 1
    spec = QuantSpec(bits, "channel", group_size, param_dtype=param_dtype)
    got = quantize_pack(x, spec, impl="triton")
    ref = quantize_pack(x, spec, impl="reference")
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
