"""The fused Triton probe scorer against the eager float64 column mass.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest), at small shapes; the
interpreter's bf16 ``tl.dot`` is not faithful, so bf16 is checked on CUDA only.
"""

from __future__ import annotations

import pytest
import torch

from zipvl.sparsity import ProbeScorer
from zipvl.sparsity.probe_triton import probe_mass_triton, triton_probe_available
from zipvl.sparsity.scorers import _probe_mass, probe_positions

# (B, Hq, Hkv, Sq, Skv, D): GQA, Sq < Skv, lengths that are not multiples of the 64-wide blocks
SHAPES = [(2, 4, 2, 37, 37, 16), (1, 6, 2, 50, 70, 32), (1, 4, 1, 130, 130, 16)]


def _dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.parametrize("shape", SHAPES)
def test_probe_mass_matches_float64(shape: tuple[int, ...], device: str) -> None:
    b, hq, hkv, sq, skv, d = shape
    rows = probe_positions(sq, recent_frac=0.2, random_frac=0.2, device=device)
    if not triton_probe_available(torch.device(device)):
        # CPU tensors on a CUDA machine (no interpreter): the fast path must refuse, not fall back
        q = torch.randn(b, hq, sq, d, device=device)
        with pytest.raises(ValueError, match="needs a CUDA tensor"):
            probe_mass_triton(q, q[:, :hkv], rows, scale=1.0)
        return
    for dtype in _dtypes(device):
        q = torch.randn(b, hq, sq, d, device=device, dtype=dtype)
        k = torch.randn(b, hkv, skv, d, device=device, dtype=dtype)
        ref = _probe_mass(q.double(), k.double(), rows, scale=d**-0.5, heads_per_chunk=1)
        eager = _probe_mass(q, k, rows, scale=d**-0.5, heads_per_chunk=1)
        got = probe_mass_triton(q, k, rows, scale=d**-0.5)
        split = probe_mass_triton(q, k, rows, scale=d**-0.5, key_splits=3)
        torch.testing.assert_close(split, got, rtol=1e-5, atol=1e-5)
        assert got.shape == (b, hkv, skv) and got.dtype == torch.float32
        err = (got.double() - ref).abs().max().item()
        eager_err = (eager.double() - ref).abs().max().item()
        # the 2x rule with a float32 rounding band (the fused path keeps fp32 logits)
        assert err <= 2 * eager_err + 1e-5, (dtype, err, eager_err)
        # each probe row's softmax sums to one: total mass = B * Hq * M
        total = got.sum().item()
        assert total == pytest.approx(b * hq * rows.numel(), rel=1e-4)


def test_probe_scorer_triton_impl_equals_torch_impl(device: str) -> None:
    if not triton_probe_available(torch.device(device)):
        with pytest.raises(ValueError, match="needs a CUDA tensor"):
            ProbeScorer(impl="triton")(torch.randn(1, 4, 45, 16), torch.randn(1, 2, 45, 16))
        return
    q = torch.randn(1, 4, 45, 16, device=device)
    k = torch.randn(1, 2, 45, 16, device=device)
    fast = ProbeScorer(recent_frac=0.1, random_frac=0.1, impl="triton")(q, k)
    slow = ProbeScorer(recent_frac=0.1, random_frac=0.1, impl="torch")(q, k)
    torch.testing.assert_close(fast.mass, slow.mass, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.normalized, slow.normalized, rtol=1e-5, atol=1e-5)


def test_probe_mass_triton_rejects_odd_head_dim() -> None:
    q = torch.randn(1, 2, 8, 12)
    k = torch.randn(1, 2, 8, 12)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        probe_mass_triton(q, k, torch.arange(8), scale=1.0)


def test_probe_scorer_rejects_unknown_impl() -> None:
    with pytest.raises(ValueError, match="impl"):
        ProbeScorer(impl="cuda-magic")  # type: ignore[arg-type]


def test_probe_scorer_auto_dispatch(device: str) -> None:
    """impl='auto' picks the fused kernel for eager CUDA inputs and PyTorch elsewhere; both
    give the same scores within the fp32 band."""
    q = torch.randn(1, 4, 45, 16, device=device)
    k = torch.randn(1, 2, 45, 16, device=device)
    auto = ProbeScorer(recent_frac=0.1, random_frac=0.1)(q, k)
    slow = ProbeScorer(recent_frac=0.1, random_frac=0.1, impl="torch")(q, k)
    torch.testing.assert_close(auto.mass, slow.mass, rtol=1e-5, atol=1e-5)
