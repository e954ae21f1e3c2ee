"""The one-launch page writer (``zipvl.cache.page_triton``) against the PyTorch page writer.

Both write paths must leave byte-identical stores: every live pool page (codes and parameters),
the page tables, the full-precision regions and the class bits, after a ragged prefill (own
kept count per row, left padding, sinks) and decode blocks that flush staged pages. On the CPU
the kernel runs under TRITON_INTERPRET=1 (conftest); on a GPU the same cases run on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zipvl.cache import PagedKVStore, PageFormat
from zipvl.cache.paged import HIGH, LOW
from zipvl.impl import Impl

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _kernel_runs(device: str) -> bool:
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _store(fmt, b, h, d, dtype, device, impl, sinks=0):
    return PagedKVStore(fmt, batch_size=b, num_heads=h, head_dim=d, dtype=dtype, device=device,
                        recompress_every=8, sink_tokens=sinks, write_impl=impl)  # fmt: skip


def _fill(store, *, seed, s, steps, pad, sinks, transposed, nonfinite_decode):
    """A ragged prefill then ``steps`` decode tokens with a block commit every 8."""
    b, h, d = store.batch_size, store.num_heads, store.head_dim
    dev, dtype = store.device, store.dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    if transposed:  # (B, S, H, D) memory, viewed as (B, H, S, D): what a model's k_proj gives
        k = torch.randn(b, s, h, d, generator=g).to(dev, dtype).transpose(1, 2)
        v = torch.randn(b, s, h, d, generator=g).to(dev, dtype).transpose(1, 2)
    else:
        k = torch.randn(b, h, s, d, generator=g).to(dev, dtype) * 3
        v = torch.randn(b, h, s, d, generator=g).to(dev, dtype) * 0.1
    keep = (torch.rand(b, h, s, generator=g) < torch.rand(b, h, 1, generator=g)).to(dev)
    valid = None
    if pad is not None:
        valid = torch.ones(b, s, dtype=torch.bool, device=dev)
        for i, n in enumerate(pad):
            valid[i, :n] = False
    store.write_prefill(k, v, keep, valid, sinks)
    for i in range(steps):
        kn = torch.randn(b, h, 1, d, generator=g).to(dev, dtype)
        vn = torch.randn(b, h, 1, d, generator=g).to(dev, dtype)
        if nonfinite_decode and i == 3:
            kn[0, 0, 0, 1] = float("nan")
            vn[-1, -1, 0, 2] = float("inf")
        store.append(kn, vn)
        if store.tail_length >= 8:
            store.commit_block((torch.rand(b, h, 8, generator=g) < 0.4).to(dev))


def _assert_same_store(a: PagedKVStore, b: PagedKVStore) -> None:
    for cls in (HIGH, LOW):
        used = int(a.page_used[cls])
        assert used == int(b.page_used[cls])
        for key in a.pools[cls]:  # page 0 is scratch: the PyTorch path writes dead pages there
            torch.testing.assert_close(
                a.pools[cls][key][1:used], b.pools[cls][key][1:used], rtol=0, atol=0,
                equal_nan=False, msg=lambda m, key=key, cls=cls: f"pool {cls} {key}: {m}",
            )  # fmt: skip
        assert torch.equal(a.num_pages[cls], b.num_pages[cls])
        cols = int(a.num_pages[cls].max()) if a.rows else 0
        live = torch.arange(cols, device=a.device)[None, :] < a.num_pages[cls][:, None]
        for t in ("page_table", "page_fill"):
            ta, tb = getattr(a, t)[cls][:, :cols], getattr(b, t)[cls][:, :cols]
            assert torch.equal(ta[live], tb[live]), t
        assert a.max_pages[cls] == b.max_pages[cls]
        assert a.pool_used[cls] == b.pool_used[cls]
    assert torch.equal(a.fp_count, b.fp_count)
    assert torch.equal(a.class_bits, b.class_bits)
    ka, va = a.dense_kv()
    kb, vb = b.dense_kv()
    # a non-finite decode token may still sit in the full-precision tail, the same in both
    torch.testing.assert_close(ka, kb, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(va, vb, rtol=0, atol=0, equal_nan=True)


# (B, H, D, prompt, decode steps, page, sinks, left padding)
CASES = [
    (2, 2, 64, 97, 23, 32, 0, None),
    (3, 2, 64, 150, 19, 16, 0, [0, 9, 30]),
    (1, 4, 128, 300, 30, 64, 4, None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    ("bits", "param_dtype", "dtype", "cst"),
    [
        ((4, 2), torch.float16, torch.bfloat16, True),
        ((8, 4), torch.bfloat16, torch.float16, True),
        ((2, 2), torch.float32, torch.float32, False),
    ],
)
def test_kernel_writes_the_same_bytes(case, bits, param_dtype, dtype, cst, device) -> None:
    if not _kernel_runs(device):
        pytest.skip("the page-write kernel runs on CUDA or under TRITON_INTERPRET=1")
    b, h, d, s, steps, page, sinks, pad = case
    fmt = PageFormat(high_bits=bits[0], low_bits=bits[1], page_size=page,
                     param_dtype=param_dtype, channel_separable=cst)  # fmt: skip
    stores = [_store(fmt, b, h, d, dtype, device, impl, sinks) for impl in ("reference", "triton")]
    assert [st_.write_impl for st_ in stores] == [Impl.REFERENCE, Impl.TRITON]
    for st_ in stores:
        _fill(st_, seed=s, s=s, steps=steps, pad=pad, sinks=sinks, transposed=case is CASES[0],
              nonfinite_decode=case is CASES[1])  # fmt: skip
    _assert_same_store(*stores)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    s=st.integers(1, 140),
    b=st.integers(1, 3),
    steps=st.integers(0, 20),
    scale=st.sampled_from([1e-6, 1.0, 300.0]),
)
def test_kernel_equals_pytorch_on_drawn_prompts(seed, s, b, steps, scale) -> None:
    """Drawn lengths (pages full, partial or none), batch sizes and magnitudes (down to
    parameters in fp16's subnormal range): the same bytes either way."""
    if not _kernel_runs("cpu"):
        pytest.skip("the page-write kernel runs on CUDA or under TRITON_INTERPRET=1")
    fmt = PageFormat(page_size=16)
    stores = [_store(fmt, b, 2, 64, torch.float32, "cpu", i) for i in ("reference", "triton")]
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, 2, s, 64, generator=g) * scale
    v = torch.randn(b, 2, s, 64, generator=g) * scale
    keep = torch.rand(b, 2, s, generator=g) < torch.rand(b, 2, 1, generator=g)
    for st_ in stores:
        st_.write_prefill(k, v, keep, None, 0)
        g2 = torch.Generator().manual_seed(seed + 1)
        for _ in range(steps):
            kn, vn = torch.randn(2, b, 2, 1, 64, generator=g2)
            st_.append(kn, vn)
            if st_.tail_length >= 8:
                st_.commit_block(torch.rand(b, 2, 8, generator=g2) < 0.5)
    _assert_same_store(*stores)


def test_kernel_path_never_runs_the_pytorch_quantizer(monkeypatch: pytest.MonkeyPatch) -> None:
    if not _kernel_runs("cpu"):
        pytest.skip("the page-write kernel runs on CUDA or under TRITON_INTERPRET=1")
    import zipvl.cache.paged as paged

    def boom(*a, **k):
        raise AssertionError("quantize_pages called on the kernel path")

    monkeypatch.setattr(paged, "quantize_pages", boom)
    store = _store(PageFormat(page_size=16), 2, 2, 64, torch.float32, "cpu", "triton")
    _fill(store, seed=0, s=70, steps=20, pad=None, sinks=0, transposed=False,
          nonfinite_decode=False)  # fmt: skip
    assert int(store.num_pages[HIGH].sum() + store.num_pages[LOW].sum()) > 0


def test_write_impl_choice_and_refusals() -> None:
    fmt = PageFormat(page_size=16)
    assert _store(fmt, 1, 1, 64, torch.float32, "cpu", "auto").write_impl is Impl.REFERENCE
    msg = "write_impl: expected one of 'auto', 'triton', 'reference'"
    with pytest.raises(ValueError, match=msg):
        _store(fmt, 1, 1, 64, torch.float32, "cpu", "torch")
    with pytest.raises(ValueError, match="write_impl: 'triton' needs a power-of-two page_size"):
        _store(PageFormat(page_size=48), 1, 1, 64, torch.float32, "cpu", "triton")
    with pytest.raises(ValueError, match="write_impl: 'triton' needs a power-of-two head_dim"):
        _store(fmt, 1, 1, 96, torch.float32, "cpu", "triton")
    if not _kernel_runs("cpu"):
        with pytest.raises(ValueError, match="write_impl: 'triton' needs CUDA tensors"):
            _store(fmt, 1, 1, 64, torch.float32, "cpu", "triton")
    if torch.cuda.is_available():
        # auto on a CUDA store it can write: the kernel; one it cannot: PyTorch
        assert _store(fmt, 1, 1, 64, torch.float16, "cuda", "auto").write_impl is Impl.TRITON
        odd = _store(PageFormat(page_size=48), 1, 1, 64, torch.float16, "cuda", "auto")
        assert odd.write_impl is Impl.REFERENCE
