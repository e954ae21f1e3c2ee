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


def _frag_keep(b, h, s, counts, g):
    """(B, H, S) keep whose row r = b H + h keeps exactly ``counts[r]`` tokens, drawn."""
    keep = torch.zeros(b * h, s, dtype=torch.bool)
    for r, n in enumerate(counts):
        keep[r, torch.randperm(s, generator=g)[:n]] = True
    return keep.reshape(b, h, s)


def _frag_fill(store, *, seed, s=400, high=(250, 150), transposed=False):
    """A prompt of ``s`` tokens whose row r keeps ``high[r]`` high tokens and the rest low
    (pages gathered through the prompt's token order, the partial pages staged), then two
    decode blocks of 8, all high then all low, that flush every staging they fill to a page
    (tokens in order, for the rows that fill one). Returns each class's expected pages."""
    b, h, d = store.batch_size, store.num_heads, store.head_dim
    dev, dtype, p = store.device, store.dtype, store.fmt.page_size
    g = torch.Generator().manual_seed(seed)
    if transposed:  # (B, S, H, D) memory, viewed as (B, H, S, D)
        k, v = (torch.randn(b, s, h, d, generator=g).transpose(1, 2) for _ in range(2))
    else:
        k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(2))
    k, v = (k * 3).to(dev, dtype), (v * 0.1).to(dev, dtype)
    keep = _frag_keep(b, h, s, high, g).to(dev)
    store.write_prefill(k, v, keep, None, 0)
    for hi in (True, False):
        for _ in range(8):
            kn, vn = (torch.randn(b, h, 1, d, generator=g).to(dev, dtype) for _ in range(2))
            store.append(kn, vn)
        store.commit_block(torch.full((b, h, 8), hi, dtype=torch.bool, device=dev))
    return [sum(n // p + (n % p + 8 >= p) for n in counts)
            for counts in (high, [s - n for n in high])]  # fmt: skip


# (B, H, prompt, high tokens of each row, transposed K/V, code bits, param dtype, CST): every
# row holds a full page of each class and one row of each class a staging of 122 tokens that
# a decode block flushes; the third: several pages a row, a row with no full page of a class
FRAG_CASES = [
    (1, 2, 400, (250, 150), False, (4, 2), torch.float16, True),
    (1, 2, 400, (250, 150), False, (2, 4), torch.bfloat16, False),
    (2, 2, 520, (250, 398, 390, 100), True, (4, 2), torch.float16, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", FRAG_CASES)
def test_kernel_writes_the_fragment_order(case, device) -> None:
    """Pages of 128 tokens at head dim 128 in the fragment order (keys token-major, values
    channel-major, the 2-bit row-pair interleave): the kernel stores the bytes of
    ``quantize_pages``, both classes, for prompt pages (gathered tokens, the partial page
    staged in the same launch) and decode flushes (tokens in order)."""
    if not _kernel_runs(device):
        pytest.skip("the page-write kernel runs on CUDA or under TRITON_INTERPRET=1")
    b, h, s, high, transposed, bits, param_dtype, cst = case
    fmt = PageFormat(high_bits=bits[0], low_bits=bits[1], page_size=128, param_dtype=param_dtype,
                     channel_separable=cst, code_order="fragment")  # fmt: skip
    stores = [_store(fmt, b, h, 128, torch.bfloat16, device, impl)
              for impl in ("reference", "triton")]  # fmt: skip
    for st_ in stores:
        assert st_.fmt.code_order == "fragment"
        pages = _frag_fill(st_, seed=s, s=s, high=high, transposed=transposed)
        for cls in (HIGH, LOW):
            assert int(st_.num_pages[cls].sum()) == pages[cls]
    _assert_same_store(*stores)


def test_fragment_store_written_by_the_kernel_reads_back_like_the_reference() -> None:
    """``dense_kv`` of a fragment-order store written by the kernel equals that of the same
    store written in PyTorch, and that of a slice-order store (the same codes and
    parameters in other places)."""
    if not _kernel_runs(KERNEL_DEVICE):
        pytest.skip("the page-write kernel runs on CUDA or under TRITON_INTERPRET=1")
    dense = []
    for order, impl in (("fragment", "triton"), ("fragment", "reference"), ("slice", "reference")):
        fmt = PageFormat(page_size=128, code_order=order)
        store = _store(fmt, 1, 2, 128, torch.float16, KERNEL_DEVICE, impl)
        assert store.fmt.code_order == order
        _frag_fill(store, seed=11)
        dense.append(store.dense_kv())
    for k, v in dense[1:]:
        torch.testing.assert_close(dense[0][0], k, rtol=0, atol=0)
        torch.testing.assert_close(dense[0][1], v, rtol=0, atol=0)


def test_kernel_refuses_the_fragment_order_where_it_does_not_apply() -> None:
    from zipvl.cache.page_triton import write_pages_triton

    store = _store(PageFormat(page_size=64, code_order="slice"), 1, 1, 128, torch.float32,
                   "cpu", "reference")  # fmt: skip
    k = torch.zeros(1, 1, 64, 128)
    args = (k, k, None, torch.ones(1, dtype=torch.int32), torch.ones(1, dtype=torch.int64),
            store.num_pages[HIGH], store.page_table[HIGH], store.page_fill[HIGH])  # fmt: skip
    kw = {"pages": 1, "levels": 15, "param_dtype": torch.float16, "channel_separable": True}
    msg = "frag: the fragment order needs pages of 128 tokens and head dim 128, got page size 64"
    with pytest.raises(ValueError, match=msg):
        write_pages_triton(*args, store._new_pool(HIGH, 2), bits=4, frag=True, **kw)
    store = _store(PageFormat(8, 4, page_size=128, code_order="slice"), 1, 1, 128,
                   torch.float32, "cpu", "reference")  # fmt: skip
    k = torch.zeros(1, 1, 128, 128)
    args = (k, k, *args[2:])
    msg = r"frag: the fragment order needs bits in \(2, 4\), got 8"
    with pytest.raises(ValueError, match=msg):
        write_pages_triton(*args, store._new_pool(HIGH, 2), bits=8, frag=True, **kw)


KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
    parameters in fp16's subnormal range): the same bytes either way (compiled on a GPU,
    interpreted on the CPU)."""
    dev = KERNEL_DEVICE
    if not _kernel_runs(dev):
        pytest.skip("the page-write kernel runs on CUDA or under TRITON_INTERPRET=1")
    fmt = PageFormat(page_size=16)
    stores = [_store(fmt, b, 2, 64, torch.float32, dev, i) for i in ("reference", "triton")]
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(b, 2, s, 64, generator=g) * scale).to(dev)
    v = (torch.randn(b, 2, s, 64, generator=g) * scale).to(dev)
    keep = (torch.rand(b, 2, s, generator=g) < torch.rand(b, 2, 1, generator=g)).to(dev)
    for st_ in stores:
        st_.write_prefill(k, v, keep, None, 0)
        g2 = torch.Generator().manual_seed(seed + 1)
        for _ in range(steps):
            kn, vn = torch.randn(2, b, 2, 1, 64, generator=g2).to(dev)
            st_.append(kn, vn)
            if st_.tail_length >= 8:
                st_.commit_block((torch.rand(b, 2, 8, generator=g2) < 0.5).to(dev))
    _assert_same_store(*stores)


def test_kernel_path_never_runs_the_pytorch_quantizer(monkeypatch: pytest.MonkeyPatch) -> None:
    if not _kernel_runs(KERNEL_DEVICE):
        pytest.skip("the page-write kernel runs on CUDA or under TRITON_INTERPRET=1")
    import zipvl.cache.paged as paged

    def boom(*a, **k):
        raise AssertionError("quantize_pages called on the kernel path")

    monkeypatch.setattr(paged, "quantize_pages", boom)
    store = _store(PageFormat(page_size=16), 2, 2, 64, torch.float32, KERNEL_DEVICE, "triton")
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
    import zipvl.cache.page_triton as pt

    with pytest.MonkeyPatch.context() as mp:  # a CPU store without the interpreter
        mp.setattr(pt, "INTERPRETED", False)
        with pytest.raises(ValueError, match="write_impl: 'triton' needs CUDA tensors"):
            _store(fmt, 1, 1, 64, torch.float32, "cpu", "triton")
    if torch.cuda.is_available():
        # auto on a CUDA store it can write: the kernel; one it cannot: PyTorch
        assert _store(fmt, 1, 1, 64, torch.float16, "cuda", "auto").write_impl is Impl.TRITON
        odd = _store(PageFormat(page_size=48), 1, 1, 64, torch.float16, "cuda", "auto")
        assert odd.write_impl is Impl.REFERENCE


# ----------------------------------------------------------------------------- no host read


def _exact_keep(b, h, s, kept, valid, g):
    """(B, H, S) keep holding exactly kept[b] real tokens in every (b, h) row."""
    keep = torch.zeros(b, h, s, dtype=torch.bool)
    for i in range(b):
        real = torch.arange(s) if valid is None else valid[i].nonzero().flatten()
        for j in range(h):
            pick = real[torch.randperm(real.numel(), generator=g)[: kept[i]]]
            keep[i, j, pick] = True
    return keep


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    s=st.integers(1, 120),
    b=st.integers(1, 3),
    sinks=st.sampled_from([0, 3]),
    padded=st.booleans(),
    dense=st.booleans(),
    kernel=st.booleans(),
)
def test_commit_from_plan_counts_reads_nothing_and_stores_the_same(
    seed, s, b, sinks, padded, dense, kernel
) -> None:
    """Given the plan's kept counts, the prompt commit reads nothing from the device and
    stores exactly what the commit with its own read stores (the host bounds of pools and
    tables may be larger, by at most one page per row and class)."""
    from tests.sparsity.host_reads import HostReads

    g = torch.Generator().manual_seed(seed)
    h, d = 2, 64
    valid = None
    if padded:
        valid = torch.ones(b, s, dtype=torch.bool)
        for i in range(b):
            valid[i, : int(torch.randint(0, s, (1,), generator=g))] = False  # left padding
    real = [s if valid is None else int(valid[i].sum()) for i in range(b)]
    kept = [int(torch.randint(0, r + 1, (1,), generator=g)) for r in real]
    keep = None if dense else _exact_keep(b, h, s, kept, valid, g)
    if dense:
        kept = real
    k = torch.randn(b, h, s, d, generator=g)
    v = torch.randn(b, h, s, d, generator=g)
    ns = 0 if padded and sinks else sinks  # sinks with left padding raise (tested elsewhere)
    fmt = PageFormat(page_size=16)
    impl = "triton" if kernel and _kernel_runs("cpu") else "reference"
    read = _store(fmt, b, h, d, torch.float32, "cpu", "reference", ns)
    hinted = _store(fmt, b, h, d, torch.float32, "cpu", impl, ns)
    want = read.write_prefill(k, v, keep, valid, ns)
    with pytest.MonkeyPatch.context() as mp:
        reads = HostReads(mp)
        got = hinted.write_prefill(k, v, keep, valid, ns, kept_rows=kept, real_rows=real)
        assert reads.count == 0, reads.where
    assert [int(got["kept"]), int(got["real"])] == [want["kept"], want["real"]]
    assert not bool(got["over"])
    for cls in (HIGH, LOW):
        assert hinted.pool_used[cls] >= read.pool_used[cls]
        assert hinted.pool_used[cls] - read.pool_used[cls] <= b * h
        assert hinted.max_pages[cls] >= read.max_pages[cls]
        hinted.pool_used[cls], hinted.max_pages[cls] = read.pool_used[cls], read.max_pages[cls]
    _assert_same_store(read, hinted)


def test_paged_prefill_through_zipvl_attention_reads_the_host_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The plan's read is the layer's only one: the prompt commit takes its counts."""
    from tests.sparsity.host_reads import HostReads
    from zipvl.config import ZipVLConfig
    from zipvl.models import make_cache, zipvl_attention

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, 150, 16, generator=g) for n in (8, 4, 4))
    cfg = ZipVLConfig(tau=0.9, sink_tokens=2)
    zipvl_attention(q, k, v, config=cfg, cache=make_cache(cfg, 1))  # warm-up
    cache = make_cache(cfg, 1)
    reads = HostReads(monkeypatch)
    zipvl_attention(q, k, v, config=cfg, cache=cache)
    assert reads.count == 1, reads.where
    monkeypatch.undo()
    layer = cache.layer(0)
    assert 0 < layer.kept_tokens < 150  # counted when asked
    # the same cache filled through the commit's own read reports the same
    other = make_cache(cfg, 1)
    other.update(k, v, 0)
    other.compress_prefill(0, cache.layer(0).store.class_bits[0, :, :150].reshape(2, 4, 150)
                           | _sinks(2, 4, 150, 2))  # fmt: skip
    assert other.layer(0).kept_tokens == layer.kept_tokens


def _sinks(b, h, s, n):
    m = torch.zeros(b, h, s, dtype=torch.bool)
    m[..., :n] = True
    return m


@pytest.mark.parametrize("allocator", ["tau", "fixed"])
def test_transformers_prefill_reads_the_host_at_most_once_per_layer(
    monkeypatch: pytest.MonkeyPatch, allocator: str
):
    """A transformers model under zipvl.enable: each layer's plan read is the prefill's only
    host read in ZipVL's code (the prompt commit takes the plan's counts); with a fixed ratio
    the plan knows its budget on the host and the prefill reads nothing at all."""
    import transformers

    from tests.sparsity.host_reads import HostReads
    from zipvl.config import ZipVLConfig
    from zipvl.models import cache_kwargs, enable, new_cache

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, vocab_size=256, attn_implementation="sdpa",
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    from zipvl.sparsity import FixedRatioAllocator

    alloc = {"tau": 0.9} if allocator == "tau" else {"allocator": FixedRatioAllocator(0.4)}
    enable(model, ZipVLConfig(page_size=16, **alloc))
    ids = torch.randint(0, 256, (1, 200))
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **cache_kwargs(model, new_cache(model)))  # warm-up
        cache = new_cache(model)
        reads = HostReads(monkeypatch)
        model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
    ours = [w for w in reads.where if "/zipvl/" in w]
    assert len(ours) == (3 if allocator == "tau" else 0), reads.where
    monkeypatch.undo()
    assert all(0 < layer.kept_tokens < 200 for layer in cache.layers)


def test_kernel_commit_launch_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt commit of a paged layer with the page-write kernel and the plan's counts, at
    LongVA's layout (B=1, Hkv=4, D=128; S shrunk: the count does not depend on S), runs at
    most 50 kernel-running ops besides the kernel (48 now, 17 of them the fills of the first
    pools and tables; the PyTorch writer: 329 with its host read, 314 with the counts). On the
    GPU machine each costs the host microseconds while the GPU waits between the layer's
    attention and its MLP."""
    import zipvl.cache.page_triton as pt
    from tests.cache.helpers import count_kernel_ops

    launches = []
    monkeypatch.setattr(pt, "write_pages_triton", lambda *a, **k: launches.append(k))
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, 4, 512, 128, generator=g, dtype=torch.bfloat16)
    keep = torch.zeros(1, 4, 512, dtype=torch.bool)
    keep[..., torch.randperm(512, generator=g)[:215]] = True

    def fresh() -> PagedKVStore:
        store = PagedKVStore(PageFormat(), batch_size=1, num_heads=4, head_dim=128,
                             dtype=torch.bfloat16, device="cpu", recompress_every=100,
                             sink_tokens=0, write_impl="reference")  # fmt: skip
        store.write_impl = Impl.TRITON  # the kernel's host path, the launch itself stubbed
        return store

    fresh().write_prefill(k, v, keep, None, 0, kept_rows=[215])  # warm-up
    store = fresh()
    n = count_kernel_ops(lambda: store.write_prefill(k, v, keep, None, 0, kept_rows=[215]))
    assert len(launches) == 4  # one per class and call: pages and staging together
    assert all(kw["stage"] is not None for kw in launches)
    assert n <= 50, n


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_wrong_counts_are_flagged_and_write_nothing_out_of_bounds(impl: str) -> None:
    """kept_rows below the truth: pages past the bounds are not stored (never past the pool),
    the store flags it, and the layer's kept_tokens raises naming kept_rows."""
    if impl == "triton" and not _kernel_runs("cpu"):
        pytest.skip("the page-write kernel runs on CUDA or under TRITON_INTERPRET=1")
    from zipvl.cache import PagedCacheLayer
    from zipvl.quant import MixedPrecisionKVQuantizer
    from zipvl.sparsity import CumulativeMassAllocator, TopKSelector

    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 1, 2, 96, 64, generator=g)
    keep = torch.zeros(1, 2, 96, dtype=torch.bool)
    keep[..., :64] = True  # 64 kept per row
    store = _store(PageFormat(page_size=16), 1, 2, 64, torch.float32, "cpu", impl)
    out = store.write_prefill(k, v, keep, None, 0, kept_rows=[30])
    assert bool(out["over"])
    for cls in (HIGH, LOW):  # every table entry points inside the pool
        cols = int(store.num_pages[cls].max())
        assert int(store.page_table[cls][:, :cols].max()) < store.pools[cls]["kcode"].shape[0]
    layer = PagedCacheLayer(
        quantizer=MixedPrecisionKVQuantizer(), allocator=CumulativeMassAllocator(0.9),
        selector=TopKSelector(), recompress_every=8, sink_tokens=0, page_size=16,
        write_impl=impl,
    )  # fmt: skip
    layer.update(k, v)
    layer.compress_prefill(keep, kept_rows=[30])
    with pytest.raises(ValueError, match="kept_rows: layer 0's prompt held more"):
        _ = layer.kept_tokens


def test_layer_and_cache_name_page_write_impl() -> None:
    from zipvl.cache import ZipVLCache
    from zipvl.quant import KIVIKVQuantizer

    cache = ZipVLCache(1, page_size=48, page_write_impl="triton")
    k = torch.randn(1, 2, 50, 64)
    with pytest.raises(ValueError, match="page_write_impl: 'triton' needs a power-of-two page"):
        cache.update(k, k, 0)
    with pytest.raises(ValueError, match="page_write_impl: 'triton' writes pages, but layer 0"):
        ZipVLCache(1, quantizer=KIVIKVQuantizer(), page_write_impl="triton").update(k, k, 0)


def test_kernel_takes_channels_that_are_not_contiguous() -> None:
    """K/V whose channels are strided (a slice of a wider buffer) are stored like contiguous
    ones by either writer."""
    if not _kernel_runs("cpu"):
        pytest.skip("the page-write kernel runs on CUDA or under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(2, 1, 2, 70, 128, generator=g)
    k, v = wide[0, ..., ::2], wide[1, ..., ::2]  # (1, 2, 70, 64), channel stride 2
    keep = torch.rand(1, 2, 70, generator=g) < 0.4
    stores = [_store(PageFormat(page_size=16), 1, 2, 64, torch.float32, "cpu", i)
              for i in ("reference", "triton")]  # fmt: skip
    for st_ in stores:
        st_.write_prefill(k, v, keep, None, 0)
    _assert_same_store(*stores)


# ----------------------------------------------------------------------------- deferred commit


def _tiny_qwen2(layers: int = 3):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, vocab_size=256, attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("beams", [1, 2])
def test_deferred_commit_generates_and_stores_the_same(beams: int) -> None:
    """defer_commit=True runs layer i's prompt commit at layer i+1's update: the same tokens
    (greedy and beam search, whose reorder follows the prefill at once) and the same stores."""
    from zipvl.config import ZipVLConfig
    from zipvl.models import cache_kwargs, enable, new_cache

    model = _tiny_qwen2()
    enable(model, ZipVLConfig(tau=0.9, page_size=16, recompress_every=8, decode_impl="reference"))
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(3))
    outs, caches = [], []
    for defer in (False, True):
        cache = new_cache(model)
        cache.defer_commit = defer
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, num_beams=beams,
                                 **cache_kwargs(model, cache))  # fmt: skip
        outs.append(out)
        caches.append(cache)
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
        _assert_same_store(a.store, b.store)
        assert a.kept_tokens == b.kept_tokens


def test_deferred_commit_waits_for_the_next_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """zipvl.enable's caches defer each layer's prompt commit to the next layer's update (seen
    from inside the forward); the last layer commits at once, with nothing left queued, and the
    model keeps no hook (it still pickles)."""
    import io

    from tests.sparsity.host_reads import HostReads
    from zipvl.config import ZipVLConfig
    from zipvl.models import cache_kwargs, enable, new_cache

    model = _tiny_qwen2()
    decoder = model.get_decoder()
    enable(model, ZipVLConfig(tau=0.9, page_size=16))
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(4))
    seen: list[list[bool]] = []  # pending flags of every layer, as each attention returns

    def look(module: torch.nn.Module, args: object, output: object) -> None:
        seen.append([layer.has_pending_prefill for layer in cache.layers])

    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **cache_kwargs(model, new_cache(model)))  # warm-up
        cache = new_cache(model)
        assert cache.defer_commit
        handles = [layer.self_attn.register_forward_hook(look) for layer in decoder.layers]
        reads = HostReads(monkeypatch)
        model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
        for h in handles:
            h.remove()
    assert len([w for w in reads.where if "/zipvl/" in w]) == 3, reads.where  # the plans'
    monkeypatch.undo()
    # layer i's commit is queued when its attention returns and runs at layer i + 1's update;
    # the last layer's runs at once
    assert seen == [[True, False, False], [False, True, False], [False, False, False]]
    assert not cache._deferred
    assert all(layer.kept_tokens > 0 for layer in cache.layers)
    torch.save(model, io.BytesIO())  # no hook or closure of zipvl's on the model


def test_deferred_commit_checks_now_and_reset_drops_it() -> None:
    from zipvl.cache import ZipVLCache

    cache = ZipVLCache(2, page_size=16, defer_commit=True)
    k = torch.randn(1, 2, 40, 64)
    cache.update(k, k, 0)
    with pytest.raises(ValueError, match="keep: expected shape"):
        cache.compress_prefill(0, torch.ones(1, 2, 41, dtype=torch.bool))
    cache.compress_prefill(0, torch.rand(1, 2, 40) < 0.5)
    assert cache.layers[0].has_pending_prefill  # queued
    cache.reset()
    cache.update(k, k, 0)  # a fresh prefill: nothing queued runs on it
    assert cache.layers[0].has_pending_prefill
    with pytest.raises(TypeError, match="defer_commit: expected a bool"):
        ZipVLCache(1, defer_commit=1)  # type: ignore[arg-type]
