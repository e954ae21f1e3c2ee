"""The README's Python snippets for the prefill pipeline and the cache run as written on a plain
CPU (no GPU, no Triton interpreter), with the documented defaults: ``sparse_attention`` runs
gathered SDPA without compiling FlexAttention, and ``decode_attention``'s ``"auto"`` reads the
float32 reference because the fused kernel cannot run there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the names the snippets leave to the reader: small CPU tensors of the documented shapes
PREAMBLE = """
import torch
torch.manual_seed(0)
B, Hq, Hkv, S, D = 1, 4, 2, 96, 64
q, k, v = torch.randn(B, Hq, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
layer_idx = 0
keep = torch.rand(B, Hkv, S) < 0.5
k1, v1, q1 = torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D), torch.randn(B, Hq, 1, D)
"""

CHECKS = """
import zipvl.decode
from zipvl.sparsity.attention import compiled_flex_attention
assert prefill_out.shape == (B, Hq, S, D), prefill_out.shape
assert compiled_flex_attention.cache_info().currsize == 0, "the default compiled FlexAttention"
problem = zipvl.decode.fused_decode_problem(q1, layer.store)
assert problem is not None and "CUDA" in problem, problem
ref, ref_lse = zipvl.decode_attention(q1, layer.store, impl="reference")
assert out.shape == (B, Hq, 1, D) and torch.equal(out, ref) and torch.equal(lse2, ref_lse)
print("README snippets ran")
"""


def _snippet(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"expected one README python block with {marker!r}"
    return found[0]


def test_readme_snippets_run_as_written_on_a_cpu() -> None:
    prefill = _snippet("plan_tokens(") + "prefill_out = out\n"
    cache = _snippet("zipvl.decode_attention(")
    code = textwrap.dedent(PREAMBLE) + prefill + cache + textwrap.dedent(CHECKS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0 and "README snippets ran" in res.stdout, res.stdout + res.stderr
