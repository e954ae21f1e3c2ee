"""ZipVLCache driven without a model: prefill, decode across re-compression boundaries, accounting.

Small shapes on every device: B = 2, Hkv = 2, G = 2 (GQA), D = 16.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.cache.helpers import (
    check_layout,
    dense,
    make_kv,
    random_keep,
    reference_block_mass,
    storage_bytes,
    walked_bytes,
    zipcache_error_bound,
)
from zipvl.cache import ZipVLCache
from zipvl.quant import (
    IdentityKVQuantizer,
    KIVIKVQuantizer,
    MixedPrecisionKVQuantizer,
    ZipCacheKVQuantizer,
    unpack_bitmap,
)
from zipvl.sparsity import CumulativeMassAllocator, TopKSelector

# these tests cover the chunked storage (any KVQuantizer); the paged storage of the
# ZipCache layouts has its own tests in tests/test_decode.py
ChunkedCache = functools.partial(ZipVLCache, storage="chunked")

B, HKV, G, D = 2, 2, 2, 16
BF16 = torch.bfloat16


def _query(device: str, dtype: torch.dtype = BF16, sq: int = 1) -> torch.Tensor:
    return torch.randn(B, HKV * G, sq, D, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("sink_tokens", "dtype"), [(0, BF16), (3, BF16), (3, torch.float32)], ids=str
)
def test_identity_storage_is_exact_across_boundaries(
    device: str, sink_tokens: int, dtype: torch.dtype
) -> None:
    r, s, steps = 8, 13, 30  # 3 decode blocks: boundaries after 8, 16, 24 decode tokens
    cache = ChunkedCache(
        1,
        quantizer=IdentityKVQuantizer(),
        recompress_every=r,
        sink_tokens=sink_tokens,
        allocator=CumulativeMassAllocator(1.0),
    )
    k, v = make_kv(B, HKV, s, D, device, dtype)
    out_k, out_v = cache.prefill(0, k, v, torch.ones(B, HKV, s, dtype=torch.bool, device=device))
    assert out_k is k and out_v is v  # prefill attention reads its own inputs
    ks, vs = [k], [v]
    for t in range(steps):
        assert cache.get_mask_sizes(1, 0) == (s + t + 1, 0)
        k1, v1 = make_kv(B, HKV, 1, D, device, dtype)
        ks.append(k1)
        vs.append(v1)
        got_k, got_v = cache.decode_step(0, _query(device, dtype), k1, v1)
        assert got_k.dtype == dtype
        assert torch.equal(got_k, torch.cat(ks, dim=-2))
        assert torch.equal(got_v, torch.cat(vs, dim=-2))
        assert cache.get_seq_length(0) == s + t + 1
    layer = cache.layers[0]
    check_layout(layer)
    assert layer.chunk_starts == [sink_tokens, s, s + r, s + 2 * r]
    assert layer.num_sinks == sink_tokens and layer.tail_length == steps - 3 * r
    assert layer.decode_blocks == 3 and layer.decode_kept_tokens == 3 * r  # tau = 1 keeps all
    assert torch.equal(cache.dense_kv(0)[0], torch.cat(ks, dim=-2))
    assert layer.tokens_at_bits() == {16: float(s + steps)}


def test_update_then_compress_prefill_is_the_model_flow(device: str) -> None:
    cache = ChunkedCache(2, quantizer=IdentityKVQuantizer(), recompress_every=4)
    k, v = make_kv(B, HKV, 6, D, device)
    assert cache.update(k, v, 1)[0] is k  # pending, unchanged
    assert cache.get_seq_length(1) == 6 and cache.get_seq_length(0) == 0
    assert cache.layers[1].has_pending_prefill
    k1, v1 = make_kv(B, HKV, 1, D, device)
    with pytest.raises(RuntimeError, match="compress_prefill"):
        cache.update(k1, v1, 1)
    cache.compress_prefill(1, random_keep(B, HKV, 6, 2, device))
    got_k, _ = cache.update(k1, v1, 1)
    assert torch.equal(got_k, torch.cat([k, k1], dim=-2))
    with pytest.raises(RuntimeError, match="pending"):
        cache.compress_prefill(1, None)  # nothing pending any more


def test_auto_commit_prefill_keeps_everything(device: str) -> None:
    cache = ChunkedCache(quantizer=MixedPrecisionKVQuantizer(), auto_commit_prefill=True)
    k, v = make_kv(B, HKV, 10, D, device)
    cache.update(k, v, 0)
    cache.update(*make_kv(B, HKV, 1, D, device), 0)
    rep = cache.report().layers[0]
    assert (rep.prompt_tokens, rep.kept_tokens, rep.kept_ratio) == (10, 10, 1.0)
    assert rep.tokens_at_bits == {16: 1.0, 4: 10.0}


def test_later_prefill_chunk_is_compressed_block_by_block(device: str) -> None:
    r = 8
    cache = ChunkedCache(quantizer=IdentityKVQuantizer(), recompress_every=r)
    k0, v0 = make_kv(B, HKV, 10, D, device)
    cache.prefill(0, k0, v0, None)
    k1, v1 = make_kv(B, HKV, 20, D, device)  # a second prompt chunk
    got_k, _ = cache.update(k1, v1, 0)
    assert torch.equal(got_k, torch.cat([k0, k1], dim=-2))
    assert cache.compress_tail(0, _query(device, sq=20), keys=got_k) == 2
    layer = cache.layers[0]
    assert layer.chunk_starts == [0, 10, 18] and layer.tail_length == 4
    check_layout(layer)
    assert cache.compress_tail(0, _query(device)) == 0  # no full block: no work


# ----------------------------------------------------------------------------- mixed precision


def _check_chunk(chunk, k, v, keep, quantizer) -> None:
    """A chunk holds exactly what the quantizer makes of (k, v, keep), kept tokens at 4 bits
    and the others at 2 bits, each within ZipCache's error bound."""
    assert chunk.keep is not None
    assert torch.equal(unpack_bitmap(chunk.keep, chunk.num_tokens), keep)
    ref_k, ref_v = quantizer.dequantize(quantizer.quantize(k, v, keep=keep), torch.float32)
    got_k, got_v = quantizer.dequantize(chunk, torch.float32)
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
    want = {4: int(keep[0, 0].sum()), 2: int((~keep[0, 0]).sum())}
    assert chunk.tokens_at_bits() == {b: n for b, n in want.items() if n}
    for x, got, is_v in ((k.float(), got_k, False), (v.float(), got_v, True)):
        err = (got - x).abs()  # (B, Hkv, T, D)
        for group, bits in ((keep, 4), (~keep, 2)):
            bound = zipcache_error_bound(x, group, bits, values=is_v)
            # parameters are stored in float16, rounded outward: the step grows by ~2^-10
            # relative and the range by ~2^-10 |x| (a one-token group has range 0)
            slack = bound * 1e-2 + x.abs().amax() * 2.0**-9 + 1e-6
            assert bool((err <= bound + slack)[group].all()), (bits, is_v)


def test_mixed_precision_prefill_and_decode_blocks(device: str) -> None:
    """Default 4/2-bit ZipCache quantizer, default allocator (tau = 0.975) and selector: every
    chunk is the quantizer's output for the expected keep mask; the decode keep masks follow
    the reference scores; sinks and tail are exact."""
    r, s, p, sinks, steps = 8, 24, 8, 2, 26
    quantizer = MixedPrecisionKVQuantizer()
    cache = ChunkedCache(1, recompress_every=r, sink_tokens=sinks)
    k, v = make_kv(B, HKV, s, D, device)
    # sinks kept in every row: the quantized part keeps p - sinks per row
    rest = random_keep(B, HKV, s - sinks, p - sinks, device)
    keep = torch.cat([torch.ones_like(rest[..., :sinks]), rest], dim=-1)  # (B, Hkv, S)
    cache.prefill(0, k, v, keep)
    ks, vs = [k], [v]
    expected_keeps = [keep[..., sinks:]]
    allocator, selector = CumulativeMassAllocator(0.975), TopKSelector(keep_last=False)
    for _ in range(steps):
        q = _query(device) * 4  # peaky attention: the blocks keep fewer than all tokens
        k1, v1 = make_kv(B, HKV, 1, D, device)
        ks.append(k1)
        vs.append(v1)
        got_k, _ = cache.decode_step(0, q, k1, v1)
        layer = cache.layers[0]
        if layer.tail_length == 0:  # this step closed a block: recompute its selection
            n = got_k.shape[-2]
            mass = reference_block_mass(q, got_k)[..., n - r :]  # (B, Hkv, R)
            expected_keeps.append(selector(mass, allocator(mass)).keep)
    layer = cache.layers[0]
    assert len(layer.chunks) == 4 and layer.decode_blocks == 3
    assert 3 <= layer.decode_kept_tokens < 3 * r  # the blocks do split into 4 and 2 bits
    assert layer.tail_length == steps - 3 * r
    check_layout(layer)
    all_k, all_v = torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)
    for chunk, start, keep_c in zip(layer.chunks, layer.chunk_starts, expected_keeps, strict=True):
        sl = slice(start, start + chunk.num_tokens)
        _check_chunk(chunk, all_k[:, :, sl], all_v[:, :, sl], keep_c, quantizer)
    got_k, got_v = dense(cache)
    fp = torch.cat([torch.arange(sinks), torch.arange(s + 3 * r, s + steps)])
    assert torch.equal(got_k[:, :, fp], all_k[:, :, fp].float())  # sinks and tail exact
    assert torch.equal(got_v[:, :, fp], all_v[:, :, fp].float())
    rep = cache.report().layers[0]
    assert rep.kept_tokens == p and rep.prompt_tokens == s
    assert rep.tokens_at_bits[16] == sinks + steps - 3 * r
    assert sum(rep.tokens_at_bits.values()) == s + steps


def test_sinks_promote_latest_unkept_tokens(device: str) -> None:
    """Rows that keep a sink position lose a kept token to the sinks; the latest unkept tokens
    of those rows are promoted to 4 bits so that every row stays rectangular."""
    s, sinks = 12, 3
    cache = ChunkedCache(sink_tokens=sinks)
    k, v = make_kv(1, 2, s, D, device)
    keep = torch.zeros(1, 2, s, dtype=torch.bool, device=device)
    keep[0, 0, [0, 1, 5, 6]] = True  # two kept sinks
    keep[0, 1, [4, 5, 6, 7]] = True  # none
    cache.prefill(0, k, v, keep)
    chunk = cache.layers[0].chunks[0]
    assert chunk.keep is not None  # a two-part (mixed-precision) chunk
    got = unpack_bitmap(chunk.keep, chunk.num_tokens)  # over positions 3 .. 11
    want = torch.zeros(1, 2, s - sinks, dtype=torch.bool, device=device)
    want[0, 0, [5 - 3, 6 - 3, 10 - 3, 11 - 3]] = True  # promoted: 10 and 11
    want[0, 1, [4 - 3, 5 - 3, 6 - 3, 7 - 3]] = True
    assert torch.equal(got, want)
    sink_keys = cache.layers[0].sink_keys
    assert sink_keys is not None and torch.equal(sink_keys, k[:, :, :sinks])
    assert cache.report().layers[0].kept_tokens == 4


def test_short_prompt_fills_sinks_first(device: str) -> None:
    cache = ChunkedCache(quantizer=IdentityKVQuantizer(), sink_tokens=4, recompress_every=4)
    k, v = make_kv(B, HKV, 2, D, device)
    cache.prefill(0, k, v, None)
    ks = [k]
    for _ in range(5):
        k1, v1 = make_kv(B, HKV, 1, D, device)
        ks.append(k1)
        cache.decode_step(0, _query(device), k1, v1)
    layer = cache.layers[0]
    assert layer.num_sinks == 4 and layer.chunk_starts == [] and layer.tail_length == 3
    check_layout(layer)
    assert torch.equal(cache.dense_kv(0)[0], torch.cat(ks, dim=-2))
    cache.decode_step(0, _query(device), *make_kv(B, HKV, 1, D, device))
    assert layer.chunk_starts == [4] and layer.tail_length == 0


def test_default_recompress_every_is_100(device: str) -> None:
    cache = ChunkedCache(1, sink_tokens=1)
    s, steps = 16, 205
    k, v = make_kv(1, 2, s, D, device)
    cache.prefill(0, k, v, random_keep(1, 2, s, 5, device))
    ks = [k]
    for t in range(steps):
        k1, v1 = make_kv(1, 2, 1, D, device)
        ks.append(k1)
        q = torch.randn(1, 4, 1, D, device=device, dtype=BF16)
        got_k, _ = cache.decode_step(0, q, k1, v1)
        assert got_k.shape[-2] == s + t + 1
    layer = cache.layers[0]
    assert layer.chunk_starts == [1, s, s + 100] and layer.tail_length == 5
    assert layer.decode_blocks == 2 and 2 <= layer.decode_kept_tokens <= 200
    check_layout(layer)
    all_k = torch.cat(ks, dim=-2)
    got_k = cache.dense_kv(0)[0]
    assert torch.equal(got_k[:, :, -5:], all_k[:, :, -5:]) and torch.equal(
        got_k[:, :, :1], k[:, :, :1]
    )


# ----------------------------------------------------------------------------- accounting


def test_memory_report_equals_held_bytes(device: str) -> None:
    cache = ChunkedCache(2, recompress_every=4, sink_tokens=2)
    for layer_idx in range(2):
        k, v = make_kv(B, HKV, 9, D, device)
        cache.prefill(layer_idx, k, v, random_keep(B, HKV, 9, 3 + layer_idx, device))
        for _ in range(10):
            cache.decode_step(layer_idx, _query(device), *make_kv(B, HKV, 1, D, device))
    # 19 positions: sinks [0, 2), chunks [2, 9), [9, 13), [13, 17), tail [17, 19)
    cache.crop(15)  # cuts through the chunk [13, 17) of both layers: its bytes stay held
    rep = cache.report()
    for layer, row in zip(cache.layers, rep.layers, strict=True):
        assert row.bytes == walked_bytes(layer) == storage_bytes(layer) == layer.nbytes()
        assert layer.chunk_lengths == [7, 4, 2] and layer.tail_length == 0
        assert row.bf16_bytes == 15 * B * HKV * D * 2 * 2
        assert row.compression == row.bf16_bytes / row.bytes
        assert sum(row.tokens_at_bits.values()) == pytest.approx(15)
    assert rep.bytes == cache.nbytes() == walked_bytes(cache) == storage_bytes(cache)
    assert rep.layers[0].kept_ratio == 3 / 9 and rep.layers[1].kept_ratio == 4 / 9
    assert rep.kept_ratio == pytest.approx((3 / 9 + 4 / 9) / 2)
    assert rep.attn_flop_reduction == pytest.approx(1 - ((3 / 9) ** 2 + (4 / 9) ** 2) / 2)


def test_compression_of_a_long_prefill_matches_the_quantizer_cost(device: str) -> None:
    """At 4/2 bits with 25 % kept, the cache holds what the quantizer says it costs."""
    s, d = 256, 64
    quantizer = MixedPrecisionKVQuantizer()
    cache = ChunkedCache(quantizer=quantizer)
    k, v = make_kv(1, 2, s, d, device)
    cache.prefill(0, k, v, random_keep(1, 2, s, s // 4, device))
    row = cache.report().layers[0]
    assert row.bytes == pytest.approx(quantizer.bytes_per_token(2, d, 0.25, s) * s)
    assert row.tokens_at_bits == {4: s / 4, 2: 3 * s / 4}
    assert 4.0 < row.compression < 16 / (2 + 2 * 0.25)  # metadata costs a little


def test_report_markdown_and_plot(tmp_path, device: str) -> None:
    cache = ChunkedCache(3, quantizer=ZipCacheKVQuantizer(4), recompress_every=4)
    for i in range(2):  # layer 2 stays empty and does not count in the totals
        k, v = make_kv(1, 2, 10, D, device)
        cache.prefill(i, k, v, random_keep(1, 2, 10, 2 + 3 * i, device))
    rep = cache.report()
    assert [r.kept_ratio for r in rep.layers] == [0.2, 0.5, 1.0]
    assert rep.kept_ratio == pytest.approx(0.35)
    assert rep.layers[1].attn_flop_reduction == pytest.approx(0.75)
    md = rep.to_markdown().splitlines()
    assert len(md) == 2 + 3 + 1 and md[-1].startswith("| total")
    assert "4-bit tok" in md[0]
    path = rep.plot(tmp_path / "ratio.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- bad input


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="recompress_every"):
        ChunkedCache(recompress_every=0)
    with pytest.raises(ValueError, match="sink_tokens"):
        ChunkedCache(sink_tokens=-1)
    with pytest.raises(ValueError, match="num_layers"):
        ChunkedCache(0)
    with pytest.raises(TypeError, match="quantizer"):
        ChunkedCache(quantizer=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer_quantizers"):
        ChunkedCache(2, layer_quantizers={2: IdentityKVQuantizer()})
    with pytest.raises(TypeError, match="auto_commit_prefill"):
        ChunkedCache(auto_commit_prefill=1)  # type: ignore[arg-type]


def test_group_size_that_does_not_divide_head_dim(device: str) -> None:
    cache = ChunkedCache(2, layer_quantizers={1: KIVIKVQuantizer(2, group_size=32)})
    cache.update(*make_kv(1, 2, 4, D, device), 0)  # layer 0: default ZipCache, fine
    with pytest.raises(ValueError, match=r"quantizer: .*group_size"):
        cache.update(*make_kv(1, 2, 4, D, device), 1)
    assert cache.get_seq_length(1) == 0  # nothing was stored


def test_bad_keep_and_kv_shapes(device: str) -> None:
    cache = ChunkedCache(quantizer=IdentityKVQuantizer())
    k, v = make_kv(B, HKV, 6, D, device)
    cache.update(k, v, 0)
    ok = random_keep(B, HKV, 6, 2, device)
    with pytest.raises(ValueError, match="keep: expected shape"):
        cache.compress_prefill(0, ok[..., :5])
    with pytest.raises(ValueError, match="keep: expected dtype"):
        cache.compress_prefill(0, ok.float())
    unequal = ok.clone()
    unequal[0, 0] = True
    with pytest.raises(ValueError, match="keep: expected the same number"):
        cache.compress_prefill(0, unequal)
    cache.compress_prefill(0, ok)
    with pytest.raises(ValueError, match="key_states"):
        cache.update(*make_kv(B, HKV + 1, 1, D, device), 0)
    with pytest.raises(ValueError, match="key_states"):
        cache.update(*make_kv(B, HKV, 1, D, device, torch.float32), 0)
    with pytest.raises(ValueError, match="value_states"):
        cache.update(k[:, :, :1], v[:, :, :1, :8], 0)
    with pytest.raises(ValueError, match="layer_idx"):
        cache.compress_tail(3, _query(device))
    with pytest.raises(ValueError, match="keys"):
        cache.compress_tail(0, _query(device), keys=k[:, :, :5])
    with pytest.raises(ValueError, match="query"):
        cache.compress_tail(0, _query(device)[:, :3])


def test_transformers_surface() -> None:
    cache = ChunkedCache()
    assert cache.is_compileable is False
    assert cache.get_seq_length() == 0 and cache.get_mask_sizes(5, 0) == (5, 0)
    k, v = make_kv(1, 2, 3, D, "cpu")
    cache.update(k, v, 1)  # lazily creates layers 0 and 1
    assert len(cache) == 2 and cache.get_max_length() == -1
    assert cache.get_mask_sizes(1, 1) == (4, 0) and cache.batch_size == 1
    cache.reset()
    assert cache.get_seq_length(1) == 0 and not cache.layers[1].is_initialized


def test_report_shows_no_decode_ratio_before_the_first_block() -> None:
    """The "decode kept" column reads "-" until a decode block was compressed (not 100 %)."""
    cache = ChunkedCache(1, recompress_every=4)
    k = torch.randn(1, 2, 12, 16)
    keep = torch.zeros(1, 2, 12, dtype=torch.bool)
    keep[..., :6] = True
    cache.prefill(0, k, k, keep)

    def decode_cell() -> str:
        row = cache.report().to_markdown().splitlines()[2]  # header, rule, layer 0
        header = cache.report().to_markdown().splitlines()[0].split("|")
        return row.split("|")[header.index(" decode kept ")].strip()

    assert decode_cell() == "-"
    for _ in range(4):  # one full block
        x = torch.randn(1, 2, 1, 16)
        cache.decode_step(0, torch.randn(1, 4, 1, 16), x, x)
    assert cache.layer(0).decode_blocks == 1
    assert decode_cell().endswith("%")


def test_crop_through_a_chunk_then_reorder_recounts_bits() -> None:
    """After a crop cuts a chunk, the per-width token counts depend on which rows remain: a
    reorder that keeps row 0 twice must count like a cache of row 0 twice."""
    k, v = torch.randn(2, 1, 32, 64), torch.randn(2, 1, 32, 64)
    keep = torch.zeros(2, 1, 32, dtype=torch.bool)
    keep[0, :, :12] = True  # row 0 keeps its first 12 tokens at high precision
    keep[1, :, 20:] = True  # row 1 its last 12

    def built(rows: list[int]) -> ZipVLCache:
        cache = ChunkedCache(1)
        cache.prefill(0, k[rows], v[rows], keep[rows])
        cache.crop_to(16)  # through the chunk
        return cache

    both = built([0, 1])
    assert both.layer(0).tokens_at_bits() == {4: 6.0, 2: 10.0}  # mean of 12/4 and 0/16
    both.layer(0).reorder_cache(torch.tensor([0, 0]))
    assert (
        both.layer(0).tokens_at_bits()
        == built([0, 0]).layer(0).tokens_at_bits()
        == {
            4: 12.0,
            2: 4.0,
        }
    )
