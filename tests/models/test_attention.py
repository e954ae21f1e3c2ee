"""ZipVLAttention / zipvl_attention against float64 oracles; padding; cache life cycle.

Tolerances follow the 2x rule (``zipvl.testing.attention.assert_close_to_reference``): the
error of a path against the float64 oracle is at most twice the error of plain same-dtype
attention against it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from zipvl.cache import ZipVLCache
from zipvl.config import ZipVLConfig
from zipvl.models import (
    ZipVLAttention,
    decode_attention,
    make_cache,
    prefill_attention,
    retained_attention_mass,
    zipvl_attention,
)
from zipvl.models.llama import RotaryEmbedding
from zipvl.sparsity import (
    CumulativeMassAllocator,
    FixedRatioAllocator,
    ProbeScorer,
    TopKSelector,
)
from zipvl.testing.attention import assert_close_to_reference, dense_attention, max_abs_error
from zipvl.testing.inputs import planted_qkv, random_qkv
from zipvl.testing.models import FixedBudget, reference_decode, reference_prefill

# (B, Hq, Hkv, S, D): GQA and MHA, lengths off any tile size
SHAPES = [(2, 4, 2, 37, 16), (1, 3, 3, 20, 8)]


def _same_dtype_error(q, k, v, keep, key_valid=None) -> float:
    """Error of plain fp32 masked attention (the same semantics) against the fp64 oracle."""
    ref64 = reference_prefill(q, k, v, keep, key_valid=key_valid)
    s = k.shape[2]
    causal = torch.ones(s, s, dtype=torch.bool, device=k.device).tril()
    kk = keep if key_valid is None else keep & key_valid[:, None, :]
    mask = causal & kk[:, :, None, :] & kk[:, :, :, None]
    plain = dense_attention(q, k, v, mask, upcast=False)
    return max_abs_error(plain, ref64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["sdpa", "reference"])  # flex: compiled, tested in sparsity
def test_prefill_matches_oracle(device: str, shape: tuple[int, ...], impl: str) -> None:
    b, hq, hkv, s, d = shape
    q, k, v = random_qkv(b, hq, hkv, s, d, device=device, seed=1)
    cfg = ZipVLConfig(allocator=FixedRatioAllocator(0.5), impl=impl)  # type: ignore[arg-type]
    res = prefill_attention(q, k, v, layer=cfg.for_layer(0))
    assert res.keep is not None
    assert (res.keep.sum(-1) == res.kept_tokens[0]).all()
    assert res.kept_tokens[0] == -(-s // 2)  # ceil(0.5 * S), the last token forced among them
    assert res.keep[..., -1].all()
    ref64 = reference_prefill(q, k, v, res.keep)
    assert_close_to_reference(res.output, ref64, _same_dtype_error(q, k, v, res.keep))


def test_keep_everything_is_exactly_dense(device: str) -> None:
    q, k, v = random_qkv(2, 4, 2, 33, 16, device=device, seed=2)
    for cfg in (
        ZipVLConfig.preset("dense"),
        ZipVLConfig(dense_layers={0}),
        ZipVLConfig(allocator=FixedRatioAllocator(1.0)),
    ):
        res = prefill_attention(q, k, v, layer=cfg.for_layer(0))
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert res.keep is None and torch.equal(res.output, want)
        assert res.kept_ratio == 1.0


@pytest.mark.parametrize("seed", [0, 3])
def test_planted_keys_are_found(seed: int) -> None:
    """Probe scoring + tau sizes the kept set to a planted important set and finds it."""
    inp = planted_qkv(1, 4, 2, 128, 32, num_important=12, seed=seed)
    # default scorer: Eq. 6 budget = the planted count (the forced last token takes one slot)
    res = prefill_attention(inp.q, inp.k, inp.v, layer=ZipVLConfig().for_layer(0))
    assert 12 <= res.kept_tokens[0] <= 14
    # ZipCache's (n - j) denominator favours recent tokens (docs/decisions.md#denominator), so
    # some early planted keys can lose their slot; the probe-count denominator has no such bias
    assert retained_attention_mass(inp.q, inp.k, res.keep) > 0.8
    cfg = ZipVLConfig(scorer=ProbeScorer(denominator="probe_count"))
    res = prefill_attention(inp.q, inp.k, inp.v, layer=cfg.for_layer(0))
    assert res.keep is not None
    assert (res.keep[0][:, inp.important].sum(-1) >= 11).all()
    assert retained_attention_mass(inp.q, inp.k, res.keep) > 0.95


ALLOCATORS = {
    "fixed_budget": lambda: FixedBudget(9),
    # a share of the row's REAL length: ceil(0.5 * n_r), not of the padded S
    "fixed_ratio": lambda: FixedRatioAllocator(0.5),
    "tau": lambda: CumulativeMassAllocator(0.9),
}


@pytest.mark.parametrize("allocator", sorted(ALLOCATORS))
@pytest.mark.parametrize("pads", [(0, 5), (3, 0), (6, 2)])
def test_left_padded_batch_equals_rows_alone(
    device: str, pads: tuple[int, int], allocator: str
) -> None:
    """Each padded row is scored, budgeted and selected as if alone, padding never attended."""
    hq, hkv, s, d = 4, 2, 24, 16
    q, k, v = random_qkv(2, hq, hkv, s, d, device=device, seed=4)
    key_valid = torch.ones(2, s, dtype=torch.bool, device=device)
    for r, n_pad in enumerate(pads):
        key_valid[r, :n_pad] = False
        # garbage in the padding: must not leak into real rows
        q[r, :, :n_pad] = 1e3
        k[r, :, :n_pad] = -1e3
    cfg = ZipVLConfig(allocator=ALLOCATORS[allocator]())
    res = prefill_attention(q, k, v, layer=cfg.for_layer(0), key_valid=key_valid)
    assert res.keep is not None
    counts = res.keep.sum(-1)
    assert (counts == counts.flatten()[0]).all()  # equal counts for the cache
    for r, n_pad in enumerate(pads):
        alone = prefill_attention(
            q[r : r + 1, :, n_pad:],
            k[r : r + 1, :, n_pad:],
            v[r : r + 1, :, n_pad:],
            layer=cfg.for_layer(0),
        )
        torch.testing.assert_close(res.output[r : r + 1, :, n_pad:], alone.output)
        assert (res.output[r, :, :n_pad] == 0).all()
        assert alone.keep is not None
        assert torch.equal(res.keep[r : r + 1, :, n_pad:], alone.keep)
        assert res.kept_tokens[r] == alone.kept_tokens[0] and res.real_tokens[r] == s - n_pad
        if allocator == "fixed_budget":
            assert res.kept_tokens[r] == 9
        elif allocator == "fixed_ratio":
            assert res.kept_tokens[r] == -(-(s - n_pad) // 2)
    ref64 = reference_prefill(q, k, v, res.keep, key_valid=key_valid)
    err = _same_dtype_error(q, k, v, res.keep, key_valid)
    assert_close_to_reference(res.output, ref64, err)


def test_padding_is_selected_last() -> None:
    """A budget larger than a short row's real tokens keeps all of them, then padding."""
    q, k, v = random_qkv(2, 2, 1, 12, 8, seed=5)
    key_valid = torch.ones(2, 12, dtype=torch.bool)
    key_valid[1, :8] = False  # row 1 has 4 real tokens
    res = prefill_attention(
        q, k, v, layer=ZipVLConfig(allocator=FixedBudget(6)).for_layer(0), key_valid=key_valid
    )
    assert res.keep is not None and res.kept_tokens == (6, 4)
    assert res.keep[1, :, 8:].all() and res.keep[1].sum() == 6  # topped up with 2 pads


def test_non_contiguous_padding_raises() -> None:
    q, k, v = random_qkv(1, 2, 1, 6, 8)
    bad = torch.tensor([[True, False, True, True, True, True]])
    with pytest.raises(ValueError, match=r"key_valid: expected one contiguous run"):
        prefill_attention(q, k, v, layer=ZipVLConfig().for_layer(0), key_valid=bad)


@pytest.mark.parametrize("sq", [1, 3])
def test_decode_attention_matches_oracle(device: str, sq: int) -> None:
    q, k, v = random_qkv(2, 4, 2, 19, 16, sq=sq, device=device, seed=6)
    key_valid = torch.ones(2, 19, dtype=torch.bool, device=device)
    key_valid[1, :4] = False
    out = decode_attention(q, k, v, key_valid=key_valid)
    ref64 = reference_decode(q, k, v, key_valid=key_valid)
    qpos = torch.arange(19 - sq, 19, device=device)
    mask = (torch.arange(19, device=device)[None] <= qpos[:, None])[None, None] & key_valid[
        :, None, None, :
    ]
    plain = dense_attention(q, k, v, mask.expand(2, 2, sq, 19), upcast=False)
    assert_close_to_reference(out, ref64, max_abs_error(plain, ref64))


def _module(cfg: ZipVLConfig, seed: int = 0) -> ZipVLAttention:
    torch.manual_seed(seed)
    return ZipVLAttention(32, 4, 2, layer_idx=0, config=cfg, rotary=RotaryEmbedding(8)).eval()


@torch.no_grad()
def test_functional_equals_module() -> None:
    """forward == o_proj(zipvl_attention(project(x))) through prefill and decode steps."""
    cfg = ZipVLConfig(recompress_every=3)
    attn = _module(cfg)
    x = torch.randn(2, 21, 32)
    cache_a, cache_b = make_cache(cfg, 1), make_cache(cfg, 1)
    steps = [x] + [torch.randn(2, 1, 32) for _ in range(7)]
    for xs in steps:
        offset = cache_b.get_seq_length(0)
        got = attn(xs, cache=cache_a)
        q, k, v = attn.project(xs, offset=offset)
        o = zipvl_attention(q, k, v, config=cfg, cache=cache_b, scale=attn.scale)
        want = attn.o_proj(o.transpose(1, 2).reshape(xs.shape[0], xs.shape[1], -1))
        assert torch.equal(got, want)
    assert cache_a.report() == cache_b.report()
    assert cache_a.report().layers[0].decode_blocks == 2  # 7 decode tokens, blocks of 3


@torch.no_grad()
def test_dense_preset_module_matches_dense_attention(device: str) -> None:
    """With the dense preset, prefill + decode equal plain causal attention over all tokens."""
    attn = _module(ZipVLConfig.preset("dense", recompress_every=2)).to(device)
    x = torch.randn(1, 30, 32, device=device)
    cache = make_cache(attn.config, 1)
    y = [attn(x[:, :25], cache=cache)] + [
        attn(x[:, i : i + 1], cache=cache) for i in range(25, 30)
    ]
    got = torch.cat(y, dim=1)
    q, k, v = attn.project(x)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    want = attn.o_proj(ref.transpose(1, 2).reshape(1, 30, -1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cache.report().layers[0].tokens_at_bits == {16: 30.0}


@torch.no_grad()
def test_module_runs_past_recompression_boundaries() -> None:
    cfg = ZipVLConfig(recompress_every=4, page_size=16)
    attn = _module(cfg)
    cache = make_cache(cfg, 1)
    attn(torch.randn(2, 40, 32), cache=cache)
    for _ in range(13):
        out = attn(torch.randn(2, 1, 32), cache=cache)
        assert out.shape == (2, 1, 32) and torch.isfinite(out).all()
    rep = cache.report().layers[0]
    assert rep.decode_blocks == 3 and rep.seq_length == 53
    assert sum(rep.tokens_at_bits.values()) == 53
    assert cache.layer(0).tail_length == 1  # the fp tail: 13 tokens, 3 blocks of 4 compressed
    # full precision: the tail and, per class, fewer than one page of 16 staged tokens
    assert 1 <= rep.tokens_at_bits[16] < 1 + 2 * 16
    assert rep.bytes == cache.nbytes() and rep.live_bytes < rep.bf16_bytes


def test_make_cache_follows_config() -> None:
    cfg = ZipVLConfig(
        recompress_every=7, sink_tokens=2, layers={1: {"bits_high": 16, "bits_low": 16}}
    )
    cache = make_cache(cfg, 3)
    assert isinstance(cache, ZipVLCache)
    assert (cache.recompress_every, cache.sink_tokens) == (7, 2)
    assert cache.layer_quantizers == {1: cfg.for_layer(1).quantizer}
    assert cache.layer_allocators == {}
    per_layer = ZipVLConfig(layers={2: {"tau": 0.9}})
    cache = make_cache(per_layer, 3)
    # the layer's decode allocator is the very object the config resolved: one source
    assert cache.layer_allocators == {2: per_layer.for_layer(2).allocator}
    assert cache.layer(2).allocator is per_layer.for_layer(2).allocator
    assert cache.layer(0).allocator == per_layer.for_layer(0).allocator
    with pytest.raises(ValueError, match=r"num_layers=3"):
        make_cache(ZipVLConfig(dense_layers={3}), 3)


def test_bad_arguments() -> None:
    q, k, v = random_qkv(1, 2, 1, 5, 8)
    with pytest.raises(TypeError, match=r"config: expected a ZipVLConfig"):
        zipvl_attention(q, k, v, config="zipvl")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"cache: expected a ZipVLCache"):
        zipvl_attention(q, k, v, config=ZipVLConfig(), cache=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_kv_heads: expected a divisor of num_heads=4"):
        ZipVLAttention(32, 4, 3)
    with pytest.raises(ValueError, match=r"k: expected Skv = Sq = 5"):
        prefill_attention(q, k[:, :, :4], v[:, :, :4], layer=ZipVLConfig().for_layer(0))


@settings(max_examples=25)
@given(
    s=st.integers(2, 24),
    seed=st.integers(0, 10_000),
    frac=st.floats(0.0, 1.0),
)
def test_retained_mass_properties(s: int, seed: int, frac: float) -> None:
    q, k, _ = random_qkv(1, 4, 2, s, 8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(1, 2, s, generator=g) < frac  # (B, Hkv, S)
    more = keep | (torch.rand(1, 2, s, generator=g) < 0.5)
    r, r_more = retained_attention_mass(q, k, keep), retained_attention_mass(q, k, more)
    assert 0.0 <= r <= r_more + 1e-6 <= 1.0 + 1e-6  # monotone in the kept set
    assert retained_attention_mass(q, k, torch.ones_like(keep)) == pytest.approx(1.0)
    assert retained_attention_mass(q, k, torch.zeros_like(keep)) == 0.0
    assert retained_attention_mass(q, k, None) == 1.0


def test_selector_sinks_and_scale_pass_through() -> None:
    """A custom selector from the config is used as given (sinks always kept)."""
    q, k, v = random_qkv(1, 4, 2, 30, 16, seed=7)
    cfg = ZipVLConfig(
        allocator=FixedRatioAllocator(0.2), selector=TopKSelector(sink_tokens=3, recent_window=2)
    )
    res = prefill_attention(q, k, v, layer=cfg.for_layer(0), scale=0.1)
    assert res.keep is not None and res.keep[..., :3].all() and res.keep[..., -2:].all()
    ref64 = reference_prefill(q, k, v, res.keep, scale=0.1)
    assert max_abs_error(res.output, ref64) < 1e-5


@torch.no_grad()
def test_fused_decode_reads_pages_cropped_part_way() -> None:
    """A crop through a page leaves the page's codes and counts only its live prefix: the
    fused kernel and the reference read exactly the cropped positions."""
    # CUDA where present, else the CPU under the Triton interpreter that conftest enables
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(dev) for t in random_qkv(1, 4, 2, 40, 64, seed=8))  # D 64: 2-bit fields fit
    q1, k1, v1 = (t.to(dev) for t in random_qkv(1, 4, 2, 20, 64, sq=1, seed=9))
    k1, v1 = k1[:, :, :1], v1[:, :, :1]
    triton_cfg = ZipVLConfig(decode_impl="triton", page_size=16)
    ref_cfg = ZipVLConfig(decode_impl="reference", page_size=16)

    def filled() -> ZipVLCache:
        cache = make_cache(ref_cfg, 1)
        zipvl_attention(q, k, v, config=ref_cfg, cache=cache)  # prefill: pages of 16
        cache.crop(-13)  # 27 positions left: the crop cuts through pages of both classes
        return cache

    fused = zipvl_attention(q1, k1, v1, config=triton_cfg, cache=filled())
    cropped = filled()
    got = zipvl_attention(q1, k1, v1, config=ref_cfg, cache=cropped)
    keys, values = cropped.dense_kv(0)  # 27 kept positions + the new token
    assert keys.shape[-2] == 28
    want = reference_decode(q1, keys, values)
    assert max_abs_error(got, want) < 1e-5
    assert max_abs_error(fused, got) < 1e-3
