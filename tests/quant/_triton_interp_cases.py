"""Triton kernel cases, run by ``test_triton_kernels.py`` in a subprocess with TRITON_INTERPRET=1
(triton reads it when the kernel is decorated, so it must be set before the first import).

Not collected by the normal run (the file name does not start with ``test_``).
"""

from __future__ import annotations

import os

import pytest
import torch

from zipvl.quant import (
    KIVIKVQuantizer,
    MixedPrecisionKVQuantizer,
    PerTokenKVQuantizer,
    QuantSpec,
    ZipCacheKVQuantizer,
    quantize_pack,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="run through test_triton_kernels.py"
)


def _rows(dtype: torch.dtype) -> torch.Tensor:
    """(2, 3, 5, 32): 30 rows (not a multiple of the 16-row block), with edge rows."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 32, generator=gen) * 3 + 1
    x[0, 0, 0] = 2.0  # constant row
    x[0, 0, 1] = 0.0  # zero row
    x[1, 2, 4] = 1000.0 + torch.randn(32, generator=gen) * 1e-2  # narrow range, large offset
    x[1, 1, 3, :16] = -5.0  # constant half row (one constant channel group)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_kernel_is_bit_exact_with_the_reference(
    dtype: torch.dtype,
    bits: int,
    group_size: int | None,
    param_dtype: torch.dtype,
    symmetric: bool,
) -> None:
    spec = QuantSpec(bits, "channel", group_size, symmetric, param_dtype)
    x = _rows(dtype)
    packed_t, scale_t, zero_t = quantize_pack(x, spec, impl="triton")
    packed_r, scale_r, zero_r = quantize_pack(x, spec, impl="reference")
    assert packed_t.shape == packed_r.shape and packed_t.dtype == torch.uint8
    assert scale_t.shape == scale_r.shape and zero_t.shape == zero_r.shape
    assert torch.equal(packed_t, packed_r)
    assert torch.equal(scale_t, scale_r)
    assert torch.equal(zero_t, zero_r)


@pytest.mark.parametrize(
    ("ref", "fast"),
    [
        (ZipCacheKVQuantizer(2), ZipCacheKVQuantizer(2, token_wise_impl="triton")),  # type: ignore[arg-type]
        (KIVIKVQuantizer(4, 16), KIVIKVQuantizer(4, 16, token_wise_impl="triton")),  # type: ignore[arg-type]
        (PerTokenKVQuantizer(2, 8), PerTokenKVQuantizer(2, 8, token_wise_impl="triton")),  # type: ignore[arg-type]
        (
            MixedPrecisionKVQuantizer(),
            MixedPrecisionKVQuantizer(
                ZipCacheKVQuantizer(4, token_wise_impl="triton"),  # type: ignore[arg-type]
                ZipCacheKVQuantizer(2, token_wise_impl="triton"),  # type: ignore[arg-type]
            ),
        ),
    ],
    ids=["zipcache2", "kivi4", "pertoken2", "mixed"],
)
def test_quantizers_with_the_triton_write_path_store_identical_chunks(ref, fast) -> None:
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(2, 2, 21, 32, generator=gen).bfloat16()
    v = torch.randn(2, 2, 21, 32, generator=gen).bfloat16()
    keep = torch.rand(2, 2, 21, generator=gen).argsort(-1) < 8
    a, b = ref.quantize(k, v, keep), fast.quantize(k, v, keep)
    assert len(a.tensors()) == len(b.tensors())
    for ta, tb in zip(a.tensors(), b.tensors(), strict=True):
        assert ta.dtype == tb.dtype and torch.equal(ta, tb)


@pytest.mark.parametrize(
    ("x", "spec", "match"),
    [
        (torch.randn(4, 32), QuantSpec(2, "token"), "spec: impl='triton' implements the token"),
        (torch.randn(4, 48), QuantSpec(2, "channel"), "x: impl='triton' needs a power-of-two"),
        (torch.randn(4, 32).double(), QuantSpec(2, "channel"), "x: expected dtype in"),
        (torch.randn(4, 32), QuantSpec(2, "channel", 6), "group_size: expected a divisor"),
    ],
)
def test_kernel_rejects_what_it_cannot_run(x: torch.Tensor, spec: QuantSpec, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quantize_pack(x, spec, impl="triton")
