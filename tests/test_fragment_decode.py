"""The fragment code order (``zipvl.quant.fragment``) and the ``"fragment"`` decode kernel that
reads it, against the bit-level definition and dense float64 attention.

Tolerance (the 2x rule, as in tests/test_decode.py): the kernel's error against float64
attention over the same dequantized cache is at most twice the error of the plain PyTorch path in
the input dtype, plus a float32 band. On the CPU the kernel runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from zipvl.cache import PagedKVStore, PageFormat
from zipvl.decode import decode_attention, launch_choice, workspace
from zipvl.quant.fragment import fragment_mu, pack_fragment, unpack_fragment


def _triton_runs(device: str) -> bool:
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _need_kernel(device: str) -> None:
    if not _triton_runs(device):
        pytest.skip("the kernel runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1")


def _words(packed: torch.Tensor) -> torch.Tensor:
    """(R, 4 W) bytes -> (R, W) int64 words, little-endian."""
    b = packed.long().view(packed.shape[0], -1, 4)
    return b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24


def _field(words: torch.Tensor, word: int, shift: int, bits: int) -> torch.Tensor:
    return (words[:, word] >> shift) & ((1 << bits) - 1)


@pytest.mark.parametrize("bits", [4, 2])
def test_fragment_order_follows_its_definition(bits: int) -> None:
    """Every code sits in the word and bit field the docstring names (the MMA operand order
    the kernel's loads assume), column by column, row by row."""
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (128, 128), generator=g, dtype=torch.uint8)
    words = _words(pack_fragment(codes, bits))
    if bits == 4:
        assert words.shape == (128, 16)
        for t in range(4):
            for w in range(4):
                for h in range(2):
                    for b in range(2):
                        for e in range(2):
                            col = 32 * w + 16 * h + 4 * t + 2 * b + e
                            got = _field(words, 4 * t + w, 4 * ((2 * h + b) + 4 * e), 4)
                            assert torch.equal(got, codes[:, col].long()), col
    else:
        assert words.shape == (128, 8)
        # undo the row pairs: stored word 16 g + 4 t + 2 half + j of a 16-row block holds word
        # 2 t + j of row 8 half + g
        rows = words.view(8, 8, 4, 2, 2).permute(0, 3, 1, 2, 4).reshape(128, 8)
        for t in range(4):
            for j in range(2):
                for i in range(2):
                    for h in range(2):
                        for b in range(2):
                            for e in range(2):
                                col = 32 * (2 * j + i) + 16 * h + 4 * t + 2 * b + e
                                shift = 2 * ((2 * h + b) + 4 * i) + 16 * e
                                got = _field(rows, 2 * t + j, shift, 2)
                                assert torch.equal(got, codes[:, col].long()), col


@given(bits=st.sampled_from([2, 4]), lead=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_fragment_pack_roundtrips(bits: int, lead: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (lead, 128, 128), generator=g, dtype=torch.uint8)
    packed = pack_fragment(codes, bits)
    assert packed.shape == (lead, 128, 16 * bits) and packed.dtype == torch.uint8
    assert torch.equal(unpack_fragment(packed, bits), codes)
    assert torch.equal(packed[-1], pack_fragment(codes[-1], bits))  # pages are independent


@pytest.mark.parametrize("bits", [4, 2])
def test_fragment_mu_is_the_conversion_multiplier(bits: int) -> None:
    """For every column, the kernel's conversion of the code's field is exactly 1024 + mu *
    code with the mu of ``fragment_mu``: it moves the field's byte to the low byte of a 16-bit
    half (the word itself, or the word >> 8), masks the field in place within that byte and
    ors 0x6400, so the field's bit position within its byte is the power of two."""
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (16, 128), generator=g, dtype=torch.uint8)
    full = torch.cat([codes, torch.zeros(112, 128, dtype=torch.uint8)])  # a page of 128 rows
    words = _words(pack_fragment(full, bits))
    if bits == 2:  # undo the row pairs (see test_fragment_order_follows_its_definition)
        words = words.view(8, 8, 4, 2, 2).permute(0, 3, 1, 2, 4).reshape(128, 8)
    mu = fragment_mu(bits)
    for col in range(128):
        if bits == 4:
            w, t, h, b, e = col // 32, (col // 4) % 4, (col // 16) % 2, (col // 2) % 2, col % 2
            word, field_shift = 4 * t + w, 4 * ((2 * h + b) + 4 * e)
        else:
            q, t, h, b, e = col // 32, (col // 4) % 4, (col // 16) % 2, (col // 2) % 2, col % 2
            j, i = q // 2, q % 2
            word, field_shift = 2 * t + j, 2 * ((2 * h + b) + 4 * i) + 16 * e
        field = (words[:16, word] >> field_shift) & ((1 << bits) - 1)
        half = (field << (field_shift % 8)) | 0x6400
        x = half.to(torch.int16).view(torch.float16).float()
        want = 1024 + mu[col] * codes[:, col].float()
        assert torch.equal(x, want), col


def test_code_order_is_resolved_and_checked() -> None:
    assert PageFormat().resolved(128).code_order == "fragment"
    assert PageFormat().resolved(64).code_order == "slice"
    assert PageFormat(page_size=64).resolved(128).code_order == "slice"
    assert PageFormat(8, 4).resolved(128).code_order == "slice"
    with pytest.raises(ValueError, match="code_order"):
        PageFormat(code_order="rows")
    with pytest.raises(ValueError, match="code_order: 'fragment' needs page_size"):
        PagedKVStore(PageFormat(page_size=64, code_order="fragment"), batch_size=1,
                     num_heads=1, head_dim=128, dtype=torch.float32, device="cpu",
                     recompress_every=8, sink_tokens=0)  # fmt: skip
    with pytest.raises(ValueError, match="code_order: 'fragment' needs codes of"):
        PageFormat(8, 4, code_order="fragment").resolved(128)


def _store(b, hkv, dtype, device, *, order="auto", bits=(4, 2), sinks=0, pad=None, seed=0,
           prompt=700, steps=13):  # fmt: skip
    """A ragged prefill (random keep per row, optional left padding) and decode steps across
    block boundaries, pages of 128, head dim 128; returns (store, valid)."""
    g = torch.Generator().manual_seed(seed)
    d = 128
    fmt = PageFormat(bits[0], bits[1], code_order=order)
    store = PagedKVStore(fmt, batch_size=b, num_heads=hkv, head_dim=d, dtype=dtype,
                         device=device, recompress_every=8, sink_tokens=sinks)  # fmt: skip
    k = torch.randn(b, hkv, prompt, d, generator=g) * 1.5 + torch.randn(d, generator=g)
    v = torch.randn(b, hkv, prompt, d, generator=g)
    keep = torch.rand(b, hkv, prompt, generator=g) < 0.3 + 0.3 * torch.rand(b, hkv, 1, generator=g)
    valid = torch.ones(b, prompt, dtype=torch.bool)
    for i, n in enumerate(pad or []):
        valid[i, :n] = False
    store.write_prefill(k.to(device, dtype), v.to(device, dtype), keep.to(device),
                        valid.to(device) if pad else None, sinks)  # fmt: skip
    for _ in range(steps):
        store.append(torch.randn(b, hkv, 1, d, generator=g).to(device, dtype),
                     torch.randn(b, hkv, 1, d, generator=g).to(device, dtype))  # fmt: skip
        valid = torch.cat([valid, torch.ones(b, 1, dtype=torch.bool)], 1)
        if store.tail_length >= 8:
            store.commit_block((torch.rand(b, hkv, 8, generator=g) < 0.4).to(device))
    return store, valid.to(device)


def _check_against_dense(store, valid, q, splits=None) -> None:
    b, hq, _, d = q.shape
    dtype = q.dtype
    k, v = store.dense_kv(torch.float64)
    mask = valid[:, None, None, :]
    ref = F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask, enable_gqa=True)
    kd, vd = store.dense_kv(dtype)
    plain = F.scaled_dot_product_attention(q, kd, vd, attn_mask=mask, enable_gqa=True)
    plain_err = (plain.double() - ref).abs().max().item()
    ws = workspace(store, hq)
    assert ws.get("variant") is None  # the store's order picks the kernel
    if splits is not None:  # more programs than the launch rule gives on one SM, 4 pages each
        n = splits + ws["fp_splits"]
        ws.update(splits=splits, min_pages=4, m=ws["m"].new_empty(b, hq, n),
                  l=ws["l"].new_empty(b, hq, n), o=ws["o"].new_empty(b, hq, n, d))  # fmt: skip
    out, lse = decode_attention(q, store, impl="triton")
    assert out.shape == (b, hq, 1, d) and out.dtype == dtype
    err = (out.double() - ref).abs().max().item()
    # float32 queries: float32-grade dots (the slice kernels' 1.5e-6 here), not fp16's
    band = 5e-6 if dtype == torch.float32 else 1e-4
    assert err <= 2 * plain_err + band, (err, plain_err)
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double(),
                          k.repeat_interleave(hq // store.num_heads, 1)) / d**0.5  # fmt: skip
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    lse_true = torch.logsumexp(logits, -1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    assert (lse.double() - lse_true).abs().max().item() < 2e-2


@pytest.mark.skipif(not _triton_runs("cpu") and not torch.cuda.is_available(),
                    reason="the kernel runs on CUDA or under TRITON_INTERPRET=1")  # fmt: skip
@pytest.mark.parametrize(
    ("dtype", "bits", "splits"),
    [(torch.bfloat16, (4, 2), None), (torch.float16, (4, 2), 3), (torch.float32, (4, 2), None),
     (torch.bfloat16, (2, 4), 2), (torch.bfloat16, (2, 2), None)],
)  # fmt: skip
def test_fragment_decode_matches_dense(dtype, bits, splits, device: str) -> None:
    """Both precision classes, partial slot groups, pages split over programs across the class
    boundary, left padding, the full-precision regions: within the 2x rule of plain SDPA (float32
    queries: the hi + lo operands)."""
    if not _triton_runs(device):
        pytest.skip("CPU tensors on a CUDA machine: the interpreter is off")
    store, valid = _store(2, 2, dtype, device, bits=bits, pad=[37, 0])
    assert store.fmt.code_order == "fragment"
    assert int(store.num_pages[0].min()) >= 1 and int(store.num_pages[1].min()) >= 1
    q = torch.randn(2, 14, 1, 128, device=device, dtype=dtype)
    _check_against_dense(store, valid, q, splits)


@pytest.mark.parametrize(("group", "settings"), [
    (1, {}), (16, {}), (7, {"offset": 0}), (7, {"offset": 1, "fp_splits": 1}),
    (3, {"fp_splits": 2, "min_pages": 4}),
])  # fmt: skip
def test_fragment_decode_group_sizes_and_settings(group: int, settings: dict, device: str) -> None:
    """Query heads per KV head other than 7 (MMA N of 8 and 16), the offset forms kept for
    measurement, other fp-region and page splits: the dense answer within the 2x rule."""
    _need_kernel(device)
    store, valid = _store(2, 2, torch.bfloat16, device, prompt=400, steps=9, pad=[0, 21])
    q = torch.randn(2, 2 * group, 1, 128, dtype=torch.bfloat16, device=device)
    workspace(store, 2 * group).update(settings)
    _check_against_dense(store, valid, q)


def test_fragment_launch_settings_are_checked(device: str) -> None:
    """A setting the fragment kernel cannot honour raises, naming the key."""
    _need_kernel(device)
    store, _ = _store(1, 1, torch.bfloat16, device, prompt=300, steps=0)
    q = torch.randn(1, 7, 1, 128, dtype=torch.bfloat16, device=device)
    ws = workspace(store, 7)
    cases = [
        ("fp_splits", 0, "fp_splits'\\]: expected an int >= 1"),
        ("offset", 3, "offset'\\]: expected 0, 1 or 2"),
        ("min_pages", -1, "min_pages"),
        ("stages", 3, "stages"),
        ("block_t", 64, "block_t"),
        ("convert", "cvt", "convert"),
    ]
    for key, value, match in cases:
        saved = ws.get(key)
        ws[key] = value
        with pytest.raises(ValueError, match=match):
            decode_attention(q, store, impl="triton")
        if saved is None:
            del ws[key]
        else:
            ws[key] = saved
    ws["fp_splits"] = 64  # more states than the buffers hold
    with pytest.raises(ValueError, match=r"workspace\['m'\]: holds"):
        decode_attention(q, store, impl="triton")


def test_pages_roundtrip_in_the_default_format_and_orders_only_on_pages() -> None:
    """quantize_pages / dequantize_pages with an unresolved "auto" format agree on the order;
    a forced code order on a layer that stores chunks raises."""
    from zipvl.cache import ZipVLCache
    from zipvl.cache.paged import HIGH, dequantize_pages, quantize_pages
    from zipvl.quant import KIVIKVQuantizer

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 128, 128, generator=g), torch.randn(2, 128, 128, generator=g)
    fmt = PageFormat()
    pool = quantize_pages(fmt, HIGH, k, v)
    kd, vd = dequantize_pages(fmt, HIGH, pool, torch.arange(2))
    pool_s = quantize_pages(PageFormat(code_order="slice"), HIGH, k, v)
    ks, vs = dequantize_pages(PageFormat(code_order="slice"), HIGH, pool_s, torch.arange(2))
    assert not torch.equal(pool["kcode"], pool_s["kcode"])  # another byte order ...
    torch.testing.assert_close(kd, ks, rtol=0, atol=0)  # ... of the same codes
    torch.testing.assert_close(vd, vs, rtol=0, atol=0)
    assert (kd - k).abs().max() < 0.5
    with pytest.raises(ValueError, match="code_order: 'fragment' lays out pages"):
        ZipVLCache(1, storage="chunked", code_order="fragment").layer(0)
    with pytest.raises(ValueError, match="code_order"):
        ZipVLCache(1, code_order="rows")
    ZipVLCache(1, quantizer=KIVIKVQuantizer(2, 16)).layer(0)  # "auto" on chunks: nothing to do


def test_fragment_decode_reads_sinks_crops_and_reorders(device: str) -> None:
    """Sinks, a crop inside a page (fills below 128), and a beam reorder: still the dense
    answer."""
    _need_kernel(device)
    store, valid = _store(2, 1, torch.bfloat16, device, sinks=4, prompt=600, steps=9)
    q = torch.randn(2, 7, 1, 128, dtype=torch.bfloat16, device=device)
    _check_against_dense(store, valid, q)
    store.crop_to(store.length - 150)  # cuts into the last pages of both classes
    valid = valid[:, : store.length]
    fills = [store.page_fill[c][torch.arange(store.page_fill[c].shape[1])
                                < store.num_pages[c][:, None]] for c in (0, 1)]  # fmt: skip
    assert min(int(f.min()) for f in fills) < 128  # a partial page is read
    _check_against_dense(store, valid, q)
    store.index_rows(torch.tensor([1, 1], device=device))
    _check_against_dense(store, valid[[1, 1]], q)


def test_fragment_rows_are_independent(device: str) -> None:
    """Row i of a batch reads exactly as row i alone (float32 queries)."""
    _need_kernel(device)
    store, _ = _store(3, 1, torch.float32, device, pad=[0, 9, 100], prompt=500, steps=5)
    q = torch.randn(3, 7, 1, 128, device=device)
    out, lse = decode_attention(q, store, impl="triton")
    for i in range(3):
        alone, _ = _store(3, 1, torch.float32, device, pad=[0, 9, 100], prompt=500, steps=5)
        alone.index_rows(torch.tensor([i], device=device))
        o1, l1 = decode_attention(q[i : i + 1], alone, impl="triton")
        torch.testing.assert_close(o1, out[i : i + 1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(l1, lse[i : i + 1], rtol=1e-6, atol=1e-6)


def test_variant_must_match_the_code_order(device: str) -> None:
    _need_kernel(device)
    frag, _ = _store(1, 1, torch.bfloat16, device, prompt=300, steps=0)
    q = torch.randn(1, 7, 1, 128, dtype=torch.bfloat16, device=device)
    workspace(frag, 7)["variant"] = "tile"
    with pytest.raises(ValueError, match=r"workspace\['variant'\]: 'tile' cannot read pages"):
        decode_attention(q, frag, impl="triton")
    sliced, _ = _store(1, 1, torch.bfloat16, device, order="slice", prompt=300, steps=0)
    workspace(sliced, 7)["variant"] = "fragment"
    with pytest.raises(ValueError, match="expected one of"):
        decode_attention(q, sliced, impl="triton")
    # the reference reads both orders the same way
    a, _ = decode_attention(q, frag, impl="reference")
    b, _ = decode_attention(q, sliced, impl="reference")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fragment_launch_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """3 programs per SM over the grid, at most 128 page programs a row, from the batch alone
    (the prompt's pages do not fix it: the kernel gives each program >= 32 of a row's live
    pages at every step), and 4 programs for the full-precision regions."""
    import types

    props = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda = torch.device("cuda")
    for b, (hi, lo), want in [(1, (410, 614), 99), (8, (410, 614), 13), (1, (2, 3), 99),
                              (1, (4000, 6000), 99), (16, (10, 10), 7), (8, (102, 154), 13),
                              (4, (1600, 2400), 25), (1, (0, 0), 99)]:  # fmt: skip
        store = PagedKVStore(PageFormat(), batch_size=b, num_heads=4, head_dim=128,
                             dtype=torch.bfloat16, device="cpu", recompress_every=8,
                             sink_tokens=0)  # fmt: skip
        store.max_pages = [hi, lo]
        assert launch_choice(store, cuda) == (want, {"fp_splits": 4, "min_pages": 32}), (b, hi, lo)


def test_fragment_decode_repeats_exactly_and_leaves_tickets_at_zero(device: str) -> None:
    """The last program of a row merges the states written and zeroes the row's ticket: a call
    after the state buffers were filled with NaN equals the first bit for bit (states beyond
    the row's live programs are never read), with 40 page programs of 4 pages at most."""
    _need_kernel(device)
    store, _ = _store(2, 2, torch.bfloat16, device, prompt=700, steps=9)
    q = torch.randn(2, 14, 1, 128, dtype=torch.bfloat16, device=device)
    ws = workspace(store, 14)
    n = 40 + ws["fp_splits"]
    ws.update(splits=40, min_pages=1, m=ws["m"].new_empty(2, 14, n),
              l=ws["l"].new_empty(2, 14, n), o=ws["o"].new_empty(2, 14, n, 128))  # fmt: skip
    out1, lse1 = decode_attention(q, store, impl="triton")
    assert not ws["ticket"].any()
    ws["m"].fill_(float("nan")), ws["l"].fill_(float("nan")), ws["o"].fill_(float("nan"))
    out2, lse2 = decode_attention(q, store, impl="triton")
    assert not ws["ticket"].any()
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)
    torch.testing.assert_close(lse2, lse1, rtol=0, atol=0)
    ref, lse_ref = decode_attention(q, store, impl="reference")
    assert (out1.float() - ref.float()).abs().max().item() < 2e-2
    assert (lse1 - lse_ref).abs().max().item() < 2e-2  # as the dense comparison
