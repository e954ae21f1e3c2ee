"""The fused decode over the paged cache against dense float64 attention, and the store's
properties (rows independent, crops, reorders, launch counts).

Tolerance (the 2x rule): the fused kernel's error against float64 attention over the same
dequantized cache is at most twice the error of the plain PyTorch path in the input dtype
(dequantize to that dtype, then SDPA), plus a float32 band. On the CPU the kernel runs under
TRITON_INTERPRET=1 (conftest); its dots are fp16 internally, which the interpreter models.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from zipvl.cache import PagedKVStore, PageFormat, ZipVLCache
from zipvl.cache.paged_layer import PagedCacheLayer
from zipvl.decode import decode_attention, decode_read_bytes, workspace
from zipvl.quant import KIVIKVQuantizer, MixedPrecisionKVQuantizer, ZipCacheKVQuantizer

# (B, Hq, Hkv, D, prompt, decode steps, page): GQA, batch > 1, lengths off the page and tile
CASES = [(2, 6, 2, 64, 97, 23, 32), (1, 4, 1, 64, 130, 9, 16), (3, 8, 2, 128, 70, 30, 64)]


def _triton_runs(device: str) -> bool:
    """Where the fused kernel runs: CUDA, or any device under TRITON_INTERPRET=1."""
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _filled_store(case, device, dtype, *, fmt=None, pad=None, seed=0):
    """A store after a ragged prefill (random keep per row, optional left padding) and decode
    steps that cross block and page boundaries; returns (store, all K, all V, valid)."""
    b, _, hkv, d, s, steps, page = case
    g = torch.Generator(device="cpu").manual_seed(seed)
    fmt = fmt or PageFormat(page_size=page)
    store = PagedKVStore(fmt, batch_size=b, num_heads=hkv, head_dim=d, dtype=dtype,
                         device=device, recompress_every=8, sink_tokens=0)  # fmt: skip
    k = torch.randn(b, hkv, s, d, generator=g).to(device, dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(device, dtype)
    keep = (torch.rand(b, hkv, s, generator=g) < torch.rand(b, hkv, 1, generator=g)).to(device)
    valid = torch.ones(b, s, dtype=torch.bool, device=device)
    if pad is not None:
        for i, n in enumerate(pad):
            valid[i, :n] = False
    store.write_prefill(k, v, keep, valid if pad is not None else None, 0)
    for _ in range(steps):
        kn = torch.randn(b, hkv, 1, d, generator=g).to(device, dtype)
        vn = torch.randn(b, hkv, 1, d, generator=g).to(device, dtype)
        store.append(kn, vn)
        k, v = torch.cat([k, kn], 2), torch.cat([v, vn], 2)
        valid = torch.cat([valid, torch.ones(b, 1, dtype=torch.bool, device=device)], 1)
        if store.tail_length >= 8:
            store.commit_block((torch.rand(b, hkv, 8, generator=g) < 0.4).to(device))
    return store, k, v, valid


def _converts(device: str, case: tuple) -> list[str]:
    """The kernel's code -> fp16 conversions to compare here, the default first. On CUDA all
    three (inline PTX only compiles there) for the first case, the default alone for the others
    (every conversion is another compile of the kernel); under the interpreter, cvt and magic."""
    from zipvl.paged_decode_triton import DEFAULT_CONVERT

    every = ["cvt", "magic", "asm"] if device == "cuda" else ["cvt", "magic"]
    if device == "cuda" and case != CASES[0]:
        every = []
    return [DEFAULT_CONVERT] + [c for c in every if c != DEFAULT_CONVERT]


@pytest.mark.parametrize("variant", ["tile", "pages", "pages-codes"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [(4, 2), (8, 4)])
def test_fused_decode_matches_dense(case, dtype, bits, variant, device: str) -> None:
    """Every kernel variant (the workspace's ``variant``: warps sharing a page, or each warp
    its own page, dequantized or in code space) against float64 attention, within the 2x
    rule."""
    b, hq, hkv, d = case[:4]
    fmt = PageFormat(bits[0], bits[1], page_size=case[-1])
    store, _, _, valid = _filled_store(case, device, dtype, fmt=fmt, pad=[3] + [0] * (b - 1))
    assert int(store.num_pages[0].max()) >= 1 and int(store.num_pages[1].max()) >= 1
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
    k, v = store.dense_kv(torch.float64)
    mask = valid[:, None, None, :]
    ref = F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask, enable_gqa=True)
    kd, vd = store.dense_kv(dtype)
    plain = F.scaled_dot_product_attention(q, kd, vd, attn_mask=mask, enable_gqa=True)
    if not _triton_runs(device):  # CPU tensors on a CUDA machine: the fast path must refuse
        with pytest.raises(ValueError, match="needs a CUDA tensor"):
            decode_attention(q, store, impl="triton")
        return
    oracle, lse_ref = decode_attention(q, store, impl="reference")
    plain_err = (plain.double() - ref).abs().max().item()
    ws = workspace(store, hq)
    ws["variant"] = variant
    outs = {}
    converts = _converts(device, case)
    for convert in converts:  # every conversion gives the same codes
        ws["convert"] = convert
        outs[convert] = decode_attention(q, store, impl="triton")
    fused, lse = outs[converts[0]]
    for convert, (out, _) in outs.items():
        torch.testing.assert_close(out, fused, rtol=0, atol=0, msg=convert)
    assert fused.shape == (b, hq, 1, d) and fused.dtype == dtype
    fused_err = (fused.double() - ref).abs().max().item()
    assert fused_err <= 2 * plain_err + 1e-4, (fused_err, plain_err)
    assert (oracle.double() - ref).abs().max().item() <= 2 * plain_err + 1e-4
    # the log-sum-exp both paths return: log2 of the softmax denominator
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double(), k.repeat_interleave(hq // hkv, 1))
    logits = (logits / d**0.5).masked_fill(~valid[:, None, :], float("-inf"))
    lse_true = torch.logsumexp(logits, -1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    assert (lse.double() - lse_true).abs().max().item() < 2e-2
    assert (lse_ref.double() - lse_true).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("seed", "variant"), [(0, "tile"), (1, "tile"), (2, "tile"), (0, "pages"), (1, "pages-codes")]
)
def test_rows_are_independent(seed: int, variant: str) -> None:
    """Row i of a batch (own kept count, own padding, own pages) reads exactly as row i alone
    (float32: the precise hi + lo dots)."""
    dev = "cpu"
    case = (3, 4, 2, 64, 75, 19, 16)
    store, _, _, _ = _filled_store(case, dev, torch.float32, pad=[0, 9, 30], seed=seed)
    q = torch.randn(3, 4, 1, 64)
    impl = "triton" if _triton_runs(dev) else "reference"
    workspace(store, 4)["variant"] = variant
    out, lse = decode_attention(q, store, impl=impl)
    for i in range(3):
        # the same data, then every other row dropped: what row i holds alone
        alone, *_ = _filled_store(case, dev, torch.float32, pad=[0, 9, 30], seed=seed)
        alone.index_rows(torch.tensor([i]))
        workspace(alone, 4)["variant"] = variant
        assert alone.rows == 2
        o1, l1 = decode_attention(q[i : i + 1], alone, impl=impl)
        # the same tokens; only the split of the pages over programs may differ with the
        # number of rows, i.e. the float32 summation order
        torch.testing.assert_close(o1, out[i : i + 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(l1, lse[i : i + 1], rtol=0, atol=1e-5)


@given(cut=st.integers(1, 119), seed=st.integers(0, 3))
def test_crop_keeps_exact_prefix(cut: int, seed: int) -> None:
    """crop_to(n) leaves exactly the first n positions (dense read equals the old prefix), and
    both decode paths agree on the cropped store, also when the crop cuts through pages."""
    case = (2, 4, 2, 64, 97, 23, 32)
    store, _, _, _ = _filled_store(case, "cpu", torch.float32, seed=seed)
    k0, v0 = store.dense_kv()
    store.crop_to(cut)
    k1, v1 = store.dense_kv()
    assert store.length == cut
    torch.testing.assert_close(k1, k0[:, :, :cut], rtol=0, atol=0)
    torch.testing.assert_close(v1, v0[:, :, :cut], rtol=0, atol=0)
    store.append(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
    q = torch.randn(2, 4, 1, 64)
    ref, _ = decode_attention(q, store, impl="reference")
    kd, vd = store.dense_kv()
    want = F.scaled_dot_product_attention(q, kd, vd, enable_gqa=True)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    if _triton_runs("cpu"):
        fused, _ = decode_attention(q, store, impl="triton")
        torch.testing.assert_close(fused, ref, rtol=0, atol=2e-2)


def test_reorder_shares_pages_and_repeats_rows() -> None:
    case = (2, 4, 2, 64, 97, 23, 32)
    store, _, _, _ = _filled_store(case, "cpu", torch.float32)
    k0, _ = store.dense_kv()
    used = [int(store.page_used[c]) for c in (0, 1)]
    store.index_rows(torch.tensor([1, 1, 0]))
    k1, _ = store.dense_kv()
    torch.testing.assert_close(k1, k0[[1, 1, 0]], rtol=0, atol=0)
    assert [int(store.page_used[c]) for c in (0, 1)] == used  # no page was copied


def test_own_pages_copies_shared_pages_and_keeps_every_row() -> None:
    case = (2, 4, 2, 64, 97, 23, 32)
    store, _, _, _ = _filled_store(case, "cpu", torch.float32)
    k0, v0 = store.dense_kv()
    q = torch.randn(3, 4, 1, 64)
    store.index_rows(torch.tensor([1, 1, 0]))
    before, _ = decode_attention(q, store, impl="reference")
    store.own_pages()
    k1, v1 = store.dense_kv()
    torch.testing.assert_close(k1, k0[[1, 1, 0]], rtol=0, atol=0)
    torch.testing.assert_close(v1, v0[[1, 1, 0]], rtol=0, atol=0)
    after, _ = decode_attention(q, store, impl="reference")
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    for c in (0, 1):  # one pool page per live table entry (+ the scratch page), none shared
        n = int(store.num_pages[c].sum())
        assert int(store.page_used[c]) == store.pool_used[c] == n + 1
        live = torch.arange(store.page_table[c].shape[1])[None] < store.num_pages[c][:, None]
        ids = store.page_table[c][live]
        assert ids.unique().numel() == n and int(ids.min()) >= 1
    # the store keeps working: a decode-block append after the copy
    store.append(torch.randn(3, 2, 1, 64), torch.randn(3, 2, 1, 64))
    assert decode_attention(q, store, impl="reference")[0].isfinite().all()


def test_read_bytes_and_accounting() -> None:
    case = (2, 6, 2, 64, 97, 23, 32)
    store, _, _, _ = _filled_store(case, "cpu", torch.bfloat16)
    fmt = store.fmt
    pages = [int(store.num_pages[c].sum()) for c in (0, 1)]
    fp = int(store.fp_count.sum())
    want = pages[0] * (fmt.page_bytes(0, 64) + 8) + pages[1] * (fmt.page_bytes(1, 64) + 8)
    assert decode_read_bytes(store) == want + fp * 2 * 64 * 2
    assert store.nbytes() >= store.live_nbytes() > 0
    # paged + staged + fp tokens cover every real position of every row
    bits = store.tokens_at_bits()
    assert sum(bits.values()) == pytest.approx(store.length)


def test_page_bytes_meet_the_budget() -> None:
    """Bytes of a 4/2-bit cache at r = 0.4 with every parameter counted, LongVA head dim:
    at most 0.20x bf16 for the default page of 128 tokens."""
    fmt = PageFormat()
    per_token = 0.4 * fmt.page_bytes(0, 128) + 0.6 * fmt.page_bytes(1, 128)
    ratio = per_token / fmt.page_size / (2 * 128 * 2)
    assert ratio <= 0.20, ratio
    # class maps: 2 bits per position and row
    assert ratio + 2 / 8 / (2 * 128 * 2) <= 0.20


@pytest.mark.parametrize("order", ["slice", "fragment"])
def test_launches_do_not_grow_with_generated_tokens(
    monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    """A decode step (append + fused read) is one launch with the same arguments shape and the
    same host operators at 10 and at 300 generated tokens, in both code orders (each its own
    kernel)."""
    from torch.profiler import ProfilerActivity, profile

    import zipvl.fragment_decode_triton as fragment
    import zipvl.paged_decode_triton as kernels

    launches: list[tuple[str, tuple]] = []

    class Counting:  # stands in for a jitted kernel: records grid and argument kinds
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **meta):
                kinds = tuple(type(a).__name__ for a in args)
                launches.append((self.name, (grid, kinds, tuple(sorted(meta.items())))))

            return launch

    monkeypatch.setattr(kernels, "_paged_decode_kernel", Counting("decode"))
    monkeypatch.setattr(fragment, "fragment_decode_kernel", Counting("decode"))
    monkeypatch.setattr(kernels, "INTERPRETED", True)
    d, page = (64, 16) if order == "slice" else (128, 128)
    case = (1, 4, 2, d, 40, 0, page)
    store, _, _, _ = _filled_store(case, "cpu", torch.float32)
    assert store.fmt.code_order == order
    q = torch.randn(1, 4, 1, d)
    # "convert": the default on a CUDA machine is inline PTX, which the interpreter refuses
    ws = {"splits": 3, "m": torch.empty(1, 4, 4), "l": torch.empty(1, 4, 4),
          "o": torch.empty(1, 4, 4, d), "convert": "magic"}  # fmt: skip
    if order == "fragment":
        ws["fp_splits"] = 1  # 3 page programs + 1 for the full-precision regions

    def decode() -> None:
        kernels.paged_decode_triton(q[:, :, 0].contiguous(), store, 0.125, ws)

    def step() -> tuple[int, list]:
        launches.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            store.append(torch.randn(1, 2, 1, d), torch.randn(1, 2, 1, d))
            decode()
        ops = sum(1 for e in prof.events() if e.name.startswith("aten::"))
        return ops, list(launches)

    step()  # warm-up: one-time buffers (the cached arange of the tail write, tickets, table)
    first = step()
    table = ws["table"]
    for _ in range(300 if order == "slice" else 600):
        store.append(torch.randn(1, 2, 1, d), torch.randn(1, 2, 1, d))
        if store.tail_length >= 8:
            store.commit_block(torch.rand(1, 2, 8) < 0.5)
    assert int(store.num_pages[0].sum() + store.num_pages[1].sum()) > 10 * 16 // page
    if store.tail_length >= 8:
        store.commit_block(torch.rand(1, 2, 8) < 0.5)
    decode()  # the pools grew: their address table is rebuilt once, here
    assert ws["table"].table is not table.table
    later = step()
    assert [name for name, _ in first[1]] == ["decode"]
    grid, kinds, _ = first[1][0][1]
    assert grid == (store.rows, 4) and len(kinds) <= 12, kinds
    assert later == first


def test_address_table_slots_and_reuse() -> None:
    """The address table holds the store's pointers in the kernel's slot order and its sizes;
    it is reused while the buffers stay and rebuilt when one is reallocated."""
    import zipvl.paged_decode_triton as kernels
    from zipvl.cache.paged import HIGH, LOW

    store, *_ = _filled_store((1, 4, 2, 64, 40, 0, 16), "cpu", torch.float32)
    entries = kernels.table_entries(store)
    assert len(entries) == kernels.TABLE_SLOTS
    for c, base in ((HIGH, kernels.H_POOL), (LOW, kernels.L_POOL)):
        for i, key in enumerate(kernels.POOL_FIELDS):
            assert entries[base + i] == store.pools[c][key].data_ptr(), (c, key)
    slots = {
        kernels.H_PT: store.page_table[HIGH],
        kernels.H_PF: store.page_fill[HIGH],
        kernels.H_NP: store.num_pages[HIGH],
        kernels.L_PT: store.page_table[LOW],
        kernels.L_PF: store.page_fill[LOW],
        kernels.L_NP: store.num_pages[LOW],
        kernels.FK: store.fp_k,
        kernels.FV: store.fp_v,
        kernels.FCNT: store.fp_count,
    }
    for slot, t in slots.items():
        assert entries[slot] == t.data_ptr(), slot
    assert entries[kernels.HCOLS] == store.page_table[HIGH].shape[1]
    assert entries[kernels.LCOLS] == store.page_table[LOW].shape[1]
    assert entries[kernels.FP_STRIDE] == store.fp_k.shape[1] == store.fp_cap + 1
    ws: dict = {}
    tab, aligned = kernels._address_table(store, store.device, ws)
    assert tab.tolist() == entries and tab.dtype == torch.int64 and aligned
    again, _ = kernels._address_table(store, store.device, {})  # another workspace: the cache
    assert again is tab and kernels._address_table(store, store.device, ws)[0] is tab
    store.reserve(HIGH, store.pools[HIGH]["kcode"].shape[0], 0)  # the high pool is copied
    grown, _ = kernels._address_table(store, store.device, ws)
    assert grown is not tab and grown.tolist() == kernels.table_entries(store)


def test_kernel_reads_no_module_globals() -> None:
    """Triton re-checks every module global a jitted kernel reads on every launch (the slots
    of the address table are literals in the kernel for that reason): the compiled kernel's
    list of such globals stays empty. Checked in a fresh interpreter without TRITON_INTERPRET
    (the interpreter's kernels do not record them)."""
    import subprocess
    import sys

    code = (
        "import zipvl.paged_decode_triton as k; f = k._paged_decode_kernel; f.cache_key; "
        "print(sorted(n for n, _ in f.used_global_vals))"
    )
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("variant", ["tile", "pages"])
def test_fused_decode_repeats_exactly_and_leaves_tickets_at_zero(variant: str) -> None:
    """The last program of a row merges and zeroes the row's ticket: a second call (and one
    after another store's call on the same tickets) equals the first bit for bit, and both
    equal the reference within the tolerance of the dense comparison above."""
    if not _triton_runs("cpu"):
        pytest.skip("the fused kernel runs on CUDA or under TRITON_INTERPRET=1")
    case = (2, 6, 2, 64, 97, 23, 32)
    store, *_ = _filled_store(case, "cpu", torch.bfloat16, seed=7)
    q = torch.randn(2, 6, 1, 64, dtype=torch.bfloat16)
    ws = workspace(store, 6)
    ws["variant"] = variant
    assert ws["ticket"].shape == (store.rows,) and not ws["ticket"].any()
    # 40 page splits, one warp: the merge reads the 41 states of a head in three tiles of 16
    ws.update(splits=40, warps=1, m=torch.empty(2, 6, 41), l=torch.empty(2, 6, 41),
              o=torch.empty(2, 6, 41, 64))  # fmt: skip
    out1, lse1 = decode_attention(q, store, impl="triton")
    assert not ws["ticket"].any()
    ws["m"].fill_(float("nan")), ws["l"].fill_(float("nan")), ws["o"].fill_(float("nan"))
    out2, lse2 = decode_attention(q, store, impl="triton")  # every state written anew
    assert not ws["ticket"].any()
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)
    torch.testing.assert_close(lse2, lse1, rtol=0, atol=0)
    ref, lse_ref = decode_attention(q, store, impl="reference")
    assert (out1.float() - ref.float()).abs().max().item() < 2e-2
    torch.testing.assert_close(lse1, lse_ref, rtol=0, atol=1e-3)
    # a ticket left behind would merge before the row's last state is written: the NaN states
    # would reach the output, which is how a missing reset would show
    ws["ticket"].fill_(1)
    ws["o"].fill_(float("nan"))
    bad, _ = decode_attention(q, store, impl="triton")
    assert bad.isnan().any() and bool((ws["ticket"] == 1).all())
    ws["ticket"].zero_()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("order", ["slice", "fragment"])
def test_last_program_merge_is_stable_over_many_launches(order: str) -> None:
    """On the GPU the programs of a row finish in any order and on different SMs: 300 launches
    (64 page splits, the merge tiles of the default launch; the fragment kernel with its 4
    fp-region programs and 4 pages a program) all give the first one's output bit for bit,
    within the tolerance of the reference, and leave the tickets at zero. A missing release /
    acquire would show as an occasional merge of a stale or half-written state."""
    case = (2, 28, 4, 128, 3000, 40, 128)
    fmt = PageFormat(page_size=128, code_order=order)
    store, *_ = _filled_store(case, "cuda", torch.bfloat16, fmt=fmt, seed=11)
    q = torch.randn(2, 28, 1, 128, device="cuda", dtype=torch.bfloat16)
    ws = workspace(store, 28)
    n = 64 + ws.get("fp_splits", 1)
    ws.update(splits=64, m=torch.empty(2, 28, n, device="cuda"),
              l=torch.empty(2, 28, n, device="cuda"),
              o=torch.empty(2, 28, n, 128, device="cuda"))  # fmt: skip
    if order == "fragment":
        ws["min_pages"] = 4
    first, first_lse = decode_attention(q, store, impl="triton")
    outs = [decode_attention(q, store, impl="triton") for _ in range(300)]
    for out, lse in outs:
        torch.testing.assert_close(out, first, rtol=0, atol=0)
        torch.testing.assert_close(lse, first_lse, rtol=0, atol=0)
    assert not ws["ticket"].any()
    ref, lse_ref = decode_attention(q, store, impl="reference")
    assert (first.float() - ref.float()).abs().max().item() < 2e-2
    assert (first_lse - lse_ref).abs().max().item() < 2e-2  # as the dense comparison


def test_failed_launch_zeroes_the_tickets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch that raises after some programs took their tickets (the interpreter runs them
    one by one) leaves the tickets at zero for the next call."""
    import zipvl.paged_decode_triton as kernels

    class Failing:
        def __getitem__(self, grid):
            def launch(q, tab, m, lsum, o, ticket, *args, **meta):
                ticket += 1  # some programs published, then the launch failed
                raise RuntimeError("launch failed")

            return launch

    monkeypatch.setattr(kernels, "_paged_decode_kernel", Failing())
    monkeypatch.setattr(kernels, "INTERPRETED", True)
    store, *_ = _filled_store((1, 4, 2, 64, 40, 0, 16), "cpu", torch.float32)
    ws = workspace(store, 4)
    ws["convert"] = "magic"
    with pytest.raises(RuntimeError, match="launch failed"):
        kernels.paged_decode_triton(torch.randn(1, 4, 64), store, 0.125, ws)
    assert not ws["ticket"].any()


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="page_size"):
        PageFormat(page_size=40)
    with pytest.raises(ValueError, match="high_bits"):
        PageFormat(high_bits=3)
    with pytest.raises(ValueError, match="head_dim"):
        PagedKVStore(PageFormat(), batch_size=1, num_heads=1, head_dim=6, dtype=torch.float32,
                     device="cpu", recompress_every=8, sink_tokens=0)  # fmt: skip
    case = (1, 4, 2, 64, 40, 0, 16)
    store, _, _, _ = _filled_store(case, "cpu", torch.float32)
    with pytest.raises(ValueError, match="one decoding query"):
        decode_attention(torch.randn(1, 4, 2, 64), store)
    with pytest.raises(ValueError, match="impl"):
        decode_attention(torch.randn(1, 4, 1, 64), store, impl="cuda")
    with pytest.raises(ValueError, match="D=64"):
        decode_attention(torch.randn(1, 4, 1, 32), store)
    with pytest.raises(ValueError, match="scale"):
        decode_attention(torch.randn(1, 4, 1, 64), store, scale=-1.0)
    with pytest.raises(ValueError, match="tail"):
        store.append(torch.randn(1, 2, 200, 64), torch.randn(1, 2, 200, 64))
    # a head dim the kernel cannot read: 'triton' raises, 'auto' reads the reference
    small = PagedKVStore(
        PageFormat(page_size=16),
        batch_size=1,
        num_heads=1,
        head_dim=16,
        dtype=torch.float32,
        device="cpu",
        recompress_every=8,
        sink_tokens=0,
    )
    small.write_prefill(torch.randn(1, 1, 20, 16), torch.randn(1, 1, 20, 16), None, None, 0)
    with pytest.raises(ValueError, match="head_dim >= 64"):
        decode_attention(torch.randn(1, 2, 1, 16), small, impl="triton")
    decode_attention(torch.randn(1, 2, 1, 16), small, impl="auto")
    with pytest.raises(ValueError, match="storage"):
        ZipVLCache(1, storage="paged", quantizer=KIVIKVQuantizer(2, 16)).layer(0)
    with pytest.raises(ValueError, match="storage"):
        ZipVLCache(1, storage="pages")


def test_cache_picks_storage_and_reports_it() -> None:
    cache = ZipVLCache(2, layer_quantizers={1: KIVIKVQuantizer(2, 16)})
    assert isinstance(cache.layer(0), PagedCacheLayer)
    assert not isinstance(cache.layer(1), PagedCacheLayer)
    kv = torch.randn(1, 2, 40, 64)
    for i in (0, 1):
        cache.prefill(i, kv, kv, None)
    rep = cache.report()
    assert rep.layers[0].storage == "paged" and rep.layers[0].decode_read == "fused"
    assert rep.layers[1].storage == "chunked"
    assert rep.layers[1].decode_read.startswith("dense: KIVIKVQuantizer has no paged layout")
    assert rep.dense_read_layers == (1,)
    assert "dense: KIVIKVQuantizer" in rep.to_markdown()
    mixed8 = MixedPrecisionKVQuantizer(ZipCacheKVQuantizer(8), ZipCacheKVQuantizer(4))
    assert isinstance(ZipVLCache(1, quantizer=mixed8).layer(0), PagedCacheLayer)


def _decoder_logits(decode_impl: str, device: str, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Teacher-forced decode of the reference decoder: logits of every step."""
    from zipvl import ZipVLConfig
    from zipvl.models.llama import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny", dim=256, n_head=4, n_local_heads=2)  # head dim 64
    model = Transformer(args).to(device).eval()
    cfg = ZipVLConfig(recompress_every=8, decode_impl=decode_impl, page_size=16)  # type: ignore[arg-type]
    cache = model.new_cache(cfg)
    out = []
    with torch.no_grad():
        model(tokens[:, :40], cache=cache, config=cfg)
        for i in range(40, tokens.shape[1]):  # crosses two recompression boundaries
            out.append(model(tokens[:, i : i + 1], cache=cache, config=cfg)[:, -1])
    assert cache.layer(0).decode_blocks == 2
    return out


def test_reference_decoder_fused_decode_matches_reference(device: str) -> None:
    tokens = torch.randint(0, 256, (2, 58), device=device)
    if not _triton_runs(device):
        with pytest.raises(ValueError, match="needs a CUDA tensor"):
            _decoder_logits("triton", device, tokens)
        return
    fused = _decoder_logits("triton", device, tokens)
    ref = _decoder_logits("reference", device, tokens)
    for step, (a, b) in enumerate(zip(fused, ref, strict=True)):
        # same stored cache, read two ways: fp16 operands in the kernel vs fp32 dequantization
        err = (a - b).abs().max().item()
        assert err <= 5e-4 * b.abs().max().item(), (step, err)


def test_fused_decode_request_that_cannot_run_raises() -> None:
    from zipvl import ZipVLConfig, zipvl_attention
    from zipvl.models import make_cache

    cfg = ZipVLConfig(decode_impl="triton")
    cache = make_cache(cfg, 1)
    q = torch.randn(1, 4, 20, 64)
    k = torch.randn(1, 2, 20, 64)
    zipvl_attention(q, k, k, config=cfg, cache=cache)  # prefill
    with pytest.raises(ValueError, match="decode_impl: 'triton' needs one query per step"):
        zipvl_attention(q[:, :, :2], k[:, :, :2], k[:, :, :2], config=cfg, cache=cache)
    assert cache.get_seq_length(0) == 20  # the refused step stored nothing
    kivi = ZipVLConfig(decode_impl="triton", quantizer=KIVIKVQuantizer(2, 16))
    kc = make_cache(kivi, 1)
    zipvl_attention(q, k, k, config=kivi, cache=kc)
    with pytest.raises(ValueError, match="decode_impl: 'triton' reads paged storage"):
        zipvl_attention(q[:, :, :1], k[:, :, :1], k[:, :, :1], config=kivi, cache=kc)
    with pytest.raises(ValueError, match="decode_impl"):
        ZipVLConfig(decode_impl="cuda")  # type: ignore[arg-type]


def test_non_finite_prompt_raises_and_padding_may_hold_anything() -> None:
    fmt = PageFormat(page_size=16)
    k, v = torch.randn(2, 2, 40, 64), torch.randn(2, 2, 40, 64)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :5] = False
    k[1, 0, 2, 7] = float("nan")  # padding: never stored, never checked
    store = PagedKVStore(fmt, batch_size=2, num_heads=2, head_dim=64, dtype=torch.float32,
                         device="cpu", recompress_every=8, sink_tokens=0)  # fmt: skip
    store.write_prefill(k, v, None, valid, 0)
    for bad in (float("nan"), float("inf")):
        v2 = v.clone()
        v2[0, 1, 30, 3] = bad
        fresh = PagedKVStore(fmt, batch_size=2, num_heads=2, head_dim=64, dtype=torch.float32,
                             device="cpu", recompress_every=8, sink_tokens=0)  # fmt: skip
        with pytest.raises(ValueError, match="NaN or infinity"):
            fresh.write_prefill(k, v2, None, valid, 0)


def test_non_finite_decode_token_stays_in_its_own_token() -> None:
    """A NaN in a generated token changes that token's stored value only: every other token of
    its page dequantizes exactly as without it."""
    outs = []
    for poison in (False, True):
        torch.manual_seed(3)
        store = PagedKVStore(PageFormat(page_size=16), batch_size=1, num_heads=1, head_dim=64,
                             dtype=torch.float32, device="cpu", recompress_every=16,
                             sink_tokens=0)  # fmt: skip
        store.write_prefill(torch.randn(1, 1, 32, 64), torch.randn(1, 1, 32, 64), None, None, 0)
        kn, vn = torch.randn(1, 1, 16, 64), torch.randn(1, 1, 16, 64)
        if poison:
            vn[0, 0, 5, 9] = float("nan")
            kn[0, 0, 5, 0] = float("inf")
        store.append(kn, vn)
        store.commit_block(torch.ones(1, 1, 16, dtype=torch.bool))  # one full 4-bit page
        assert int(store.num_pages[0].sum()) == 3
        outs.append(store.dense_kv())
    (k0, v0), (k1, v1) = outs
    assert torch.isfinite(k1).all() and torch.isfinite(v1).all()
    other = torch.ones(48, dtype=torch.bool)
    other[32 + 5] = False
    torch.testing.assert_close(k1[:, :, other], k0[:, :, other], rtol=0, atol=0)
    torch.testing.assert_close(v1[:, :, other], v0[:, :, other], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("order", ["slice", "fragment"])
def test_decode_step_replays_from_a_cuda_graph(order: str) -> None:
    """append_device + decode_attention captured once, replayed for new tokens, equals the same
    steps run eagerly on a twin store (both code orders, each its own kernel)."""
    case = (2, 8, 2, 128, 300, 3, 64 if order == "slice" else 128)
    store, *_ = _filled_store(case, "cuda", torch.bfloat16, seed=5)
    twin, *_ = _filled_store(case, "cuda", torch.bfloat16, seed=5)
    sk = torch.randn(2, 2, 1, 128, device="cuda", dtype=torch.bfloat16)
    sv, sq = torch.randn_like(sk), torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    decode_attention(sq, store, impl="triton")  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        store.append_device(sk, sv)
        out, lse = decode_attention(sq, store, impl="triton")
    for _ in range(5):
        k1, v1 = torch.randn_like(sk), torch.randn_like(sv)
        q1 = torch.randn_like(sq)
        sk.copy_(k1), sv.copy_(v1), sq.copy_(q1)
        graph.replay()
        store.advance(1)
        twin.append(k1, v1)
        want, want_lse = decode_attention(q1, twin, impl="triton")
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    assert store.tail_length == twin.tail_length


def test_decode_block_budget_is_per_row() -> None:
    """A decode block is budgeted on each row's own mass: a row with peaked attention keeps few
    tokens, a row with flat attention many, exactly as each would alone."""
    from zipvl.quant import MixedPrecisionKVQuantizer
    from zipvl.sparsity import CumulativeMassAllocator, TopKSelector

    torch.manual_seed(0)
    q = torch.randn(2, 2, 1, 64)
    k = torch.randn(2, 1, 32, 64) * 0.1
    kb = torch.randn(2, 1, 16, 64) * 0.1
    kb[0, 0, :3] = q[0, :, 0].mean(0) * 3.0  # row 0: three keys dominate its block
    v, vb = torch.randn(2, 1, 32, 64), torch.randn(2, 1, 16, 64)

    def block_classes(rows: list[int]) -> torch.Tensor:
        layer = PagedCacheLayer(
            quantizer=MixedPrecisionKVQuantizer(), allocator=CumulativeMassAllocator(0.9),
            selector=TopKSelector(keep_last=False), recompress_every=16, sink_tokens=0,
            page_size=16,
        )  # fmt: skip
        layer.update(k[rows], v[rows])
        layer.compress_prefill(None)
        layer.append(kb[rows], vb[rows])
        assert layer.compress_tail(q[rows]) == 1
        assert layer.store is not None
        return layer.store.class_bits[0, :, 32:48]  # (rows, 16): high-precision flags

    both = block_classes([0, 1])
    counts = both.sum(-1).tolist()
    assert counts[0] < counts[1], counts  # the peaked row keeps fewer
    for i in (0, 1):
        assert torch.equal(both[i], block_classes([i])[0]), i


def test_sinks_stay_exact_and_are_read() -> None:
    """Sink positions are stored at full precision (exact in dense_kv), both decode paths read
    them, and a crop into the sinks keeps exactly the first positions."""
    torch.manual_seed(2)
    store = PagedKVStore(PageFormat(page_size=16), batch_size=2, num_heads=2, head_dim=64,
                         dtype=torch.float32, device="cpu", recompress_every=8,
                         sink_tokens=4)  # fmt: skip
    k, v = torch.randn(2, 2, 50, 64), torch.randn(2, 2, 50, 64)
    store.write_prefill(k, v, torch.rand(2, 2, 50) < 0.5, None, 4)
    for _ in range(9):
        store.append(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
        if store.tail_length >= 8:
            store.commit_block(torch.rand(2, 2, 8) < 0.5)
    dk, dv = store.dense_kv()
    assert torch.equal(dk[:, :, :4], k[:, :, :4]) and torch.equal(dv[:, :, :4], v[:, :, :4])
    assert store.tokens_at_bits()[16] >= 4
    q = torch.randn(2, 4, 1, 64)
    ref, _ = decode_attention(q, store, impl="reference")
    want = F.scaled_dot_product_attention(q, dk, dv, enable_gqa=True)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    if _triton_runs("cpu"):
        fused, _ = decode_attention(q, store, impl="triton")
        torch.testing.assert_close(fused, ref, rtol=0, atol=1e-4)
    store.crop_to(2)
    k2, _ = store.dense_kv()
    assert store.length == 2 and torch.equal(k2, k[:, :, :2])
    store.append(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
    assert store.dense_kv()[0].shape[2] == 3


def test_left_padding_under_sinks_raises_before_storing() -> None:
    store = PagedKVStore(PageFormat(page_size=16), batch_size=2, num_heads=1, head_dim=64,
                         dtype=torch.float32, device="cpu", recompress_every=8,
                         sink_tokens=4)  # fmt: skip
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :2] = False
    with pytest.raises(ValueError, match=r"padding among its first sink_tokens=4"):
        store.write_prefill(torch.randn(2, 1, 20, 64), torch.randn(2, 1, 20, 64), None, valid, 4)
    assert store.length == store.num_sinks == int(store.fp_count.sum()) == 0
    assert int(store.num_pages[0].sum() + store.num_pages[1].sum()) == 0


@pytest.mark.parametrize("order", ["slice", "fragment"])
def test_decode_step_compiles_whole(device: str, order: str) -> None:
    """append_device + decode_attention(impl="triton") under torch.compile(fullgraph=True): the
    fused kernel is an opaque operator (zipvl::paged_decode), the store's in-place append is
    traced, and the compiled step equals the eager one on a twin store, step after step, with
    one graph for all steps (the host bookkeeping, ``advance``, stays outside), in both code
    orders (the fragment kernel's launch settings travel through the operator too)."""
    if not _triton_runs(device):
        pytest.skip("the fused kernel runs on CUDA or under TRITON_INTERPRET=1")
    d = 64 if order == "slice" else 128
    case = (1, 4, 2, d, 70, 3, 16) if order == "slice" else (1, 4, 2, d, 300, 3, 128)
    store, *_ = _filled_store(case, device, torch.bfloat16, seed=3)
    twin, *_ = _filled_store(case, device, torch.bfloat16, seed=3)
    assert store.fmt.code_order == order

    def step(st: PagedKVStore, q, k, v):
        st.append_device(k, v)
        return decode_attention(q, st, impl="triton")

    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")  # counts this function's graphs only
    # dynamic=True: the tail count (a host int the capacity check reads) is symbolic from the
    # start instead of after one recompile
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    counts = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        k, v = (torch.randn(1, 2, 1, d, generator=g).to(device, torch.bfloat16) for _ in "kv")
        q = torch.randn(1, 4, 1, d, generator=g).to(device, torch.bfloat16)
        out, lse = compiled(store, q, k, v)
        store.advance(1)
        twin.append(k, v)
        want, want_lse = decode_attention(q, twin, impl="triton")
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
        counts.append(counter.frame_count)
    assert counts == [1, 1, 1], counts  # one graph, no recompile per step


@pytest.mark.parametrize("order", ["slice", "fragment"])
def test_compiled_step_keeps_the_launch_settings(order: str) -> None:
    """Settings put in the store's workspace (slice order: float32-grade dots for bf16, the cvt
    conversion, the "pages" variant; fragment order: the offset form, the fp-region programs,
    the page floor) reach the compiled step's operator, whose output equals the eager one."""
    if not _triton_runs("cpu"):
        pytest.skip("the fused kernel runs on CUDA or under TRITON_INTERPRET=1")
    from zipvl.decode import _SETTINGS, _settings

    d = 64 if order == "slice" else 128
    case = (1, 4, 2, d, 70, 3, 16) if order == "slice" else (1, 4, 2, d, 300, 3, 128)
    store, *_ = _filled_store(case, "cpu", torch.bfloat16, seed=4)
    assert store.fmt.code_order == order
    q = torch.randn(1, 4, 1, d, dtype=torch.bfloat16)
    ws = workspace(store, 4)
    if order == "slice":
        want = {"precise": True, "convert": "cvt", "variant": "pages"}
    else:
        want = {"offset": 0, "fp_splits": 2, "min_pages": 4, "convert": "magic"}
    ws.update(want)
    got = _settings(store, ws)
    if order == "slice":
        assert got[2] == 1 and got[-2:] == [1, 0]
    else:
        assert [got[_SETTINGS.index(k)] for k in ("offset", "fp_splits", "min_pages")] == [0, 2, 4]
    eager, _ = decode_attention(q, store, impl="triton")
    import zipvl.paged_decode_triton as kernels

    seen: list[dict] = []
    real = kernels.paged_decode_triton

    def spy(q, st, scale, ws):
        seen.append(dict(ws))
        return real(q, st, scale, ws)

    torch._dynamo.reset()
    compiled = torch.compile(lambda q: decode_attention(q, store, impl="triton"), fullgraph=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "paged_decode_triton", spy)
        out, _ = compiled(q)
    assert seen and all(seen[-1][k] == v for k, v in want.items()), seen[-1]
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


def test_append_inside_a_capture_raises() -> None:
    case = (1, 4, 2, 64, 40, 0, 16)
    store, *_ = _filled_store(case, "cpu", torch.float32)
    k = torch.randn(1, 2, 1, 64)
    with pytest.MonkeyPatch.context() as mp:  # a CUDA tensor inside a capture, simulated
        mp.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        mp.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        with pytest.raises(RuntimeError, match="append_device"):
            store.append(k, k)


def _small_store(seed: int) -> PagedKVStore:
    g = torch.Generator().manual_seed(seed)
    st = PagedKVStore(PageFormat(page_size=16), batch_size=1, num_heads=2, head_dim=64,
                      dtype=torch.float32, device="cpu", recompress_every=8,
                      sink_tokens=0)  # fmt: skip
    k, v = torch.randn(1, 2, 40, 64, generator=g), torch.randn(1, 2, 40, 64, generator=g)
    st.write_prefill(k, v, None, None, 0)
    return st


def test_address_tables_live_as_long_as_their_buffers() -> None:
    """The module cache of address tables (the custom operator's path) keeps a table while
    every buffer it points at lives, however many other stores come and go, and drops it once
    a buffer is gone (a count limit once freed the table of a live store, which a captured
    graph could still read)."""
    import gc
    import weakref

    pytest.importorskip("triton")
    import zipvl.paged_decode_triton as kernels

    a = _small_store(0)
    tab, _ = kernels._address_table(a, a.device, {"keep_table": False})
    alive = weakref.ref(tab)
    del tab
    for i in range(1, 300):  # many other stores, each built, used and dropped
        s = _small_store(i)
        kernels._address_table(s, s.device, {"keep_table": False})
    gc.collect()
    assert alive() is not None, "the table of a live, unchanged store was freed"
    before = len(kernels._TABLES)
    a.own_pages()  # new pools: the old table's buffers die
    gc.collect()
    assert alive() is None and len(kernels._TABLES) == before - 1


@pytest.mark.skipif(not _triton_runs("cpu"), reason="the kernel runs under TRITON_INTERPRET=1")
def test_unknown_launch_settings_raise_naming_the_key() -> None:
    case = (1, 4, 2, 64, 40, 0, 16)
    store, _, _, _ = _filled_store(case, "cpu", torch.float32)
    q = torch.randn(1, 4, 1, 64)
    for key in ("variant", "convert"):
        ws = workspace(store, 4)
        ws[key] = "bogus"
        with pytest.raises(ValueError, match=rf"workspace\['{key}'\]: expected one of"):
            decode_attention(q, store, impl="triton")
        ws[key] = None  # None is the default again
        decode_attention(q, store, impl="triton")
        del ws[key]


def test_launch_choice_follows_the_measured_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measured rule: "pages" with 3 stages once a program would walk >=
    PAGES_VARIANT_MIN_PAGES pages at the default splits, "tile" with 128-token steps from
    LONG_TILE_MIN_PAGES (pages of 128) in a grid of at most 2 programs per SM (132 SMs here),
    the defaults otherwise and off CUDA."""
    import types

    import zipvl.decode as zdec

    props = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)

    pages = {"variant": "pages", "stages": 3}
    cuda = torch.device("cuda")
    for page_size in (128, 64, 192, 256):
        long_tile = {"block_t": 128} if page_size % 128 == 0 else {}  # never straddles a page
        cases = [  # (batch, default splits, pages per row, expected)
            (8, 17, (410, 614), (17, pages)),  # batch 8, 128k tokens on an H200
            (4, 33, (410, 614), (33, pages)),  # batch 4, 128k: ~31 pages a program
            (8, 17, (102, 154), (17, {})),  # batch 8, 32k: ~15, 544 programs
            (1, 64, (410, 614), (64, long_tile)),  # batch 1, 128k: 16, 256 programs
            (1, 64, (100, 154), (64, {})),  # batch 1, 32k: ~4
            (8, 17, (204, 204), (17, pages)),  # exactly 24 pages a program
            (8, 17, (203, 204), (17, {})),
            (1, 64, (384, 384), (64, long_tile)),  # exactly 12
            (1, 64, (383, 384), (64, {})),
            (2, 33, (300, 300), (33, long_tile)),  # 264 programs: 2 per SM
            (2, 34, (300, 300), (34, {})),
        ]
        for b, ns, (hi, lo), want in cases:
            store = PagedKVStore(PageFormat(page_size=page_size), batch_size=b, num_heads=4,
                                 head_dim=64, dtype=torch.float32, device="cpu",
                                 recompress_every=8, sink_tokens=0)  # fmt: skip
            monkeypatch.setattr(zdec, "_splits", lambda store, device, ns=ns: ns)
            store.max_pages = [hi, lo]
            assert zdec.launch_choice(store, cuda) == want, (b, ns, hi, lo, page_size)
            assert zdec.launch_choice(store, torch.device("cpu")) == (ns, {})
