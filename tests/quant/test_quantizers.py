"""KV quantizers: byte accounting, error bounds per precision group, positions, oracle agreement,
container operations and input validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zipvl.quant import (
    IdentityKVQuantizer,
    KIVIKVQuantizer,
    KVPart,
    KVQuantizer,
    MixedPrecisionKVQuantizer,
    PerTokenKVQuantizer,
    QuantizedKV,
    QuantSpec,
    ZipCacheKVQuantizer,
)
from zipvl.testing.quant import fake_quantize_kv, oracle_qparams, sqnr

QUANTIZERS: list[KVQuantizer] = [
    IdentityKVQuantizer(),
    ZipCacheKVQuantizer(4),
    ZipCacheKVQuantizer(2),
    KIVIKVQuantizer(2),
    KIVIKVQuantizer(4, group_size=16),
    PerTokenKVQuantizer(4, 16),
    PerTokenKVQuantizer(2, None, param_dtype=torch.bfloat16),
    MixedPrecisionKVQuantizer(),
    MixedPrecisionKVQuantizer(KIVIKVQuantizer(4, 16), KIVIKVQuantizer(2, 16)),
]
IDS = [repr(q) for q in QUANTIZERS]


def _kv(b: int, h: int, t: int, d: int, *, seed: int = 0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, t, d, generator=gen) * 2 + 0.5
    v = torch.randn(b, h, t, d, generator=gen)
    return k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)


def _keep(b: int, h: int, t: int, p: int, *, seed: int = 0, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(b, h, t, generator=gen).argsort(dim=-1)  # (B, H, T)
    return (order < p).to(device)  # exactly p per row


# ----------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("q", QUANTIZERS, ids=IDS)
@pytest.mark.parametrize(("t", "p"), [(37, 15), (64, 0), (64, 64), (9, 4)])
def test_bytes_per_token_equals_nbytes_of_a_real_chunk(q: KVQuantizer, t: int, p: int) -> None:
    b, h, d = 2, 3, 32
    k, v = _kv(b, h, t, d, dtype=torch.bfloat16)
    qkv = q.quantize(k, v, _keep(b, h, t, p))
    assert qkv.nbytes == sum(x.nbytes for x in qkv.tensors())
    expected = q.bytes_per_token(h, d, kept_ratio=p / t, tokens=t, dtype=k.dtype)
    assert qkv.nbytes == pytest.approx(b * t * expected, rel=1e-12)
    # every tensor owns exactly its bytes (no view pinning a larger buffer)
    for x in qkv.tensors():
        assert x.untyped_storage().nbytes() == x.nbytes


def test_bytes_per_token_formulas_by_hand() -> None:
    h, d = 4, 128
    # Mixed 4/2 ZipCache, T = 1000, P = 400, float16 parameters (2 bytes), per KV head:
    #   4-bit: codes 2 * 400 * 64, key params 2 * 128 * 2, value params 2 * 400 * 2, CST 128 * 2
    #   2-bit: codes 2 * 600 * 32, key params 2 * 128 * 2, value params 2 * 600 * 2, CST 128 * 2
    #   keep bitmap ceil(1000 / 8)
    per_head = (51200 + 512 + 1600 + 256) + (38400 + 512 + 2400 + 256) + 125
    got = MixedPrecisionKVQuantizer().bytes_per_token(h, d, kept_ratio=0.4, tokens=1000)
    assert got == pytest.approx(h * per_head / 1000, rel=1e-12)
    # KIVI-2, G = 32, T = 100: keys 100 * 32 codes + 4 token groups * 128 * 2 params * 2 bytes,
    # values 100 * 32 codes + 100 * 4 channel groups * 2 params * 2 bytes
    per_head = (3200 + 2048) + (3200 + 1600)
    assert KIVIKVQuantizer(2).bytes_per_token(h, d, tokens=100) == pytest.approx(
        h * per_head / 100
    )
    # bf16 identity: 2 tensors * 128 * 2 bytes per head
    assert IdentityKVQuantizer().bytes_per_token(h, d) == 2 * h * d * 2


def test_p6_mixed_cache_is_at_most_a_fifth_of_bf16_at_r_04() -> None:
    """Target P6: at r = 0.4 with 4/2 bits, all metadata counted, <= 0.20x the bf16 bytes
    (LongVA-7B shapes: 4 KV heads, head dim 128; a 16k-token prefill chunk)."""
    bf16 = IdentityKVQuantizer().bytes_per_token(4, 128)
    mixed = MixedPrecisionKVQuantizer().bytes_per_token(4, 128, kept_ratio=0.4, tokens=16384)
    assert mixed / bf16 <= 0.20


# ----------------------------------------------------------------------------- accuracy


def _part_bound(x: torch.Tensor, q: KVQuantizer, which: str) -> torch.Tensor:
    """Half the ideal (float64) step of every element for a ZipCache quantizer, x (1,1,n,D)."""
    assert isinstance(q, ZipCacheKVQuantizer)
    if which == "key":
        step, _ = oracle_qparams(x, QuantSpec(q.bits, "token"))
        return step / 2
    s = x.double().abs().amax(dim=-2, keepdim=True).sqrt()  # CST divisor (float32 params)
    step, _ = oracle_qparams(x.double() / s, QuantSpec(q.bits, "channel"))
    return step * s / 2


@given(
    t=st.integers(2, 24),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_mixed_kept_tokens_get_the_high_bound_and_the_rest_the_low_bound(
    t: int, frac: float, seed: int
) -> None:
    b, h, d = 2, 2, 16
    hi = ZipCacheKVQuantizer(4, param_dtype=torch.float32)
    lo = ZipCacheKVQuantizer(2, param_dtype=torch.float32)
    q = MixedPrecisionKVQuantizer(hi, lo)
    p = round(frac * t)
    k, v = _kv(b, h, t, d, seed=seed)
    keep = _keep(b, h, t, p, seed=seed)
    k_hat, v_hat = q.dequantize(q.quantize(k, v, keep))
    assert k_hat.shape == k.shape and v_hat.dtype == v.dtype
    for bi in range(b):
        for hi_ in range(h):
            for sub, sel in ((hi, keep[bi, hi_]), (lo, ~keep[bi, hi_])):
                if not bool(sel.any()):
                    continue
                for which, x, x_hat in (("key", k, k_hat), ("value", v, v_hat)):
                    xs = x[bi, hi_][sel][None, None]  # (1, 1, n, D) in position order
                    err = (x_hat[bi, hi_][sel][None, None] - xs).double().abs()
                    bound = _part_bound(xs, sub, which)
                    band = 1e-5 * (xs.double().abs() + bound) + 1e-6
                    assert bool((err <= bound + band).all()), (which, sub.bits)


def test_mixed_restores_positions_exactly() -> None:
    """Each (b, h) row's kept tokens equal `high` applied to that row's kept tokens alone (and
    likewise for the rest), placed back at their original positions."""
    b, h, t, d = 2, 3, 23, 16
    q = MixedPrecisionKVQuantizer()
    k, v = _kv(b, h, t, d, dtype=torch.bfloat16)
    keep = _keep(b, h, t, 9)
    qkv = q.quantize(k, v, keep)
    assert qkv.tokens_at_bits() == {4: 9, 2: 14}
    k_hat, v_hat = q.dequantize(qkv)
    for bi in range(b):
        for hi in range(h):
            for sub, sel in ((q.high, keep[bi, hi]), (q.low, ~keep[bi, hi])):
                ref_k, ref_v = sub.dequantize(
                    sub.quantize(k[bi, hi][sel][None, None], v[bi, hi][sel][None, None])
                )
                assert torch.equal(k_hat[bi, hi][sel], ref_k[0, 0])
                assert torch.equal(v_hat[bi, hi][sel], ref_v[0, 0])


@pytest.mark.parametrize("q", QUANTIZERS, ids=IDS)
def test_quantizers_agree_with_the_float64_oracle(q: KVQuantizer) -> None:
    b, h, t, d = 2, 2, 45, 32
    k, v = _kv(b, h, t, d, seed=3)
    keep = _keep(b, h, t, 20, seed=3)
    k_hat, v_hat = q.dequantize(q.quantize(k, v, keep))
    k_or, v_or = fake_quantize_kv(q, k, v, keep)
    for x, x_hat, x_or in ((k, k_hat, k_or), (v, v_hat, v_or)):
        if math.isinf(sqnr(x, x_or)):
            assert torch.equal(x_hat, x)
            continue
        # measured: float16 / bfloat16 parameter storage costs <= 0.16 dB; one code flip at a
        # tie can move either way
        assert sqnr(x, x_hat) >= sqnr(x, x_or) - 0.25


# SQNR floors (dB) on N(0, 1) keys and values of shape (2, 4, 100, 128), min over K and V,
# default quantizers (float16 parameters). Measured once over seeds 0..9 (a loop over
# ``sqnr(k, k_hat)`` / ``sqnr(v, v_hat)``): ZipCache 2 / 4 / 8 bits min 6.09 / 20.10 / 44.70
# (mean 6.16 / 20.17 / 44.75); KIVI (G = 32) min 8.04 / 22.06 / 46.54 (mean 8.09 / 22.12 /
# 46.57). The float64 oracle scores 0.01-0.16 dB higher. Floors sit about 0.5 dB below the min.
KV_SQNR_FLOORS = [
    (ZipCacheKVQuantizer(2), 5.6),
    (ZipCacheKVQuantizer(4), 19.6),
    (ZipCacheKVQuantizer(8), 44.2),
    (KIVIKVQuantizer(2), 7.5),
    (KIVIKVQuantizer(4), 21.5),
    (KIVIKVQuantizer(8), 46.0),
]


@pytest.mark.parametrize(("q", "floor"), KV_SQNR_FLOORS, ids=[repr(q) for q, _ in KV_SQNR_FLOORS])
def test_kv_sqnr_floors_on_gaussian_data(q: KVQuantizer, floor: float) -> None:
    k, v = _kv(2, 4, 100, 128, seed=100)
    k, v = (k - 0.5) / 2, v  # back to N(0, 1)
    k_hat, v_hat = q.dequantize(q.quantize(k, v))
    assert min(sqnr(k, k_hat), sqnr(v, v_hat)) >= floor


def test_mixed_sqnr_lies_between_its_components() -> None:
    k, v = _kv(1, 4, 200, 64, seed=7)
    keep = _keep(1, 4, 200, 80, seed=7)
    vals = {}
    for name, q in (
        ("lo", ZipCacheKVQuantizer(2)),
        ("mix", MixedPrecisionKVQuantizer()),
        ("hi", ZipCacheKVQuantizer(4)),
    ):
        vals[name] = sqnr(k, q.dequantize(q.quantize(k, v, keep))[0])
    assert vals["lo"] < vals["mix"] < vals["hi"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_identity_quantizer_is_exact(device: str, dtype: torch.dtype) -> None:
    q = IdentityKVQuantizer()
    k, v = _kv(2, 2, 11, 8, dtype=dtype, device=device)
    qkv = q.quantize(k, v, _keep(2, 2, 11, 5, device=device))
    k_hat, v_hat = q.dequantize(qkv)
    assert torch.equal(k_hat, k) and torch.equal(v_hat, v) and k_hat.dtype == dtype
    assert qkv.tokens_at_bits() == {16: 11}
    assert qkv.parts[0].key.data.data_ptr() != k.data_ptr()  # owns a copy


def test_mixed_round_trip_on_device(device: str) -> None:
    q = MixedPrecisionKVQuantizer()
    k, v = _kv(1, 2, 40, 32, device=device, dtype=torch.bfloat16)
    keep = _keep(1, 2, 40, 16, device=device)
    qkv = q.quantize(k, v, keep)
    assert qkv.device.type == torch.device(device).type
    k_hat, v_hat = q.dequantize(qkv, torch.float32)
    assert k_hat.dtype == torch.float32 and k_hat.device.type == torch.device(device).type
    assert sqnr(k, k_hat) > 8 and sqnr(v, v_hat) > 8


def test_kivi_remainder_group_is_independent_of_the_full_groups() -> None:
    q = KIVIKVQuantizer(2, group_size=16)
    k, v = _kv(1, 2, 45, 32)
    k_hat, _ = q.dequantize(q.quantize(k, v))
    k_head, _ = q.dequantize(q.quantize(k[:, :, :32], v[:, :, :32]))
    assert torch.equal(k_hat[:, :, :32], k_head)  # groups start at token 0
    k_tail, _ = q.dequantize(q.quantize(k[:, :, 32:], v[:, :, 32:]))
    assert torch.equal(k_hat[:, :, 32:], k_tail)  # the partial group has its own parameters


# ----------------------------------------------------------------------------- containers


def test_tokens_at_bits() -> None:
    k, v = _kv(1, 2, 10, 16)
    mixed = MixedPrecisionKVQuantizer()
    assert mixed.quantize(k, v, _keep(1, 2, 10, 3)).tokens_at_bits() == {4: 3, 2: 7}
    assert mixed.quantize(k, v, _keep(1, 2, 10, 0)).tokens_at_bits() == {2: 10}
    assert mixed.quantize(k, v).tokens_at_bits() == {4: 10}
    same = MixedPrecisionKVQuantizer(ZipCacheKVQuantizer(4), ZipCacheKVQuantizer(4))
    assert same.quantize(k, v, _keep(1, 2, 10, 3)).tokens_at_bits() == {4: 10}
    assert KIVIKVQuantizer(2, 8).quantize(k, v).tokens_at_bits() == {2: 10}


def test_empty_chunk() -> None:
    k, v = _kv(2, 2, 0, 16)
    for q in (MixedPrecisionKVQuantizer(), ZipCacheKVQuantizer(2), IdentityKVQuantizer()):
        qkv = q.quantize(k, v)
        k_hat, v_hat = q.dequantize(qkv)
        assert k_hat.shape == k.shape and v_hat.shape == v.shape and qkv.num_tokens == 0


def test_index_select_batch_and_to() -> None:
    q = MixedPrecisionKVQuantizer()
    k, v = _kv(3, 2, 20, 16)
    qkv = q.quantize(k, v, _keep(3, 2, 20, 8))
    idx = torch.tensor([2, 0, 0])
    sel = qkv.index_select_batch(idx)
    k_hat, v_hat = qkv.dequantize()
    k_sel, v_sel = sel.dequantize()
    assert torch.equal(k_sel, k_hat[idx]) and torch.equal(v_sel, v_hat[idx])
    assert sel.batch_size == 3 and sel.num_tokens == 20
    moved = qkv.to("cpu")
    assert torch.equal(moved.dequantize()[0], k_hat) and moved.nbytes == qkv.nbytes
    with pytest.raises(ValueError, match="idx: expected a 1-D int64 tensor"):
        qkv.index_select_batch(torch.tensor([[0]]))


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda k, v: (k, v, torch.ones(2, 3, 7, dtype=torch.bool)), r"keep: expected shape"),
        (lambda k, v: (k, v, torch.ones(2, 3, 8, dtype=torch.int64)), r"keep: expected dtype"),
        (lambda k, v: (k, v, torch.ones(2, 3, 8, device="meta").bool()), r"keep: expected device"),
        (
            lambda k, v: (k, v, torch.arange(8).expand(2, 3, 8) < torch.arange(6).view(2, 3, 1)),
            r"keep: expected the same number of kept tokens in every \(b, h\) row",
        ),
        (lambda k, v: (k, v[:, :, :4], None), r"v: expected shape \(B, Hkv, T, D\)"),
        (lambda k, v: (k, v.double(), None), r"v: expected dtype torch.float32 like k"),
        (lambda k, v: (k[0], v[0], None), r"k: expected a 4-D tensor"),
        (lambda k, v: (k.int(), v, None), r"k: expected a floating-point tensor"),
    ],
)
def test_quantize_rejects_bad_input(make, match: str) -> None:
    k, v = _kv(2, 3, 8, 16)
    k, v, keep = make(k, v)
    for q in (MixedPrecisionKVQuantizer(), ZipCacheKVQuantizer(4), IdentityKVQuantizer()):
        with pytest.raises(ValueError, match=match):
            q.quantize(k, v, keep)


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: ZipCacheKVQuantizer(3), ValueError, r"bits: expected one of \(2, 4, 8\), got 3"),
        (lambda: KIVIKVQuantizer(2, group_size=0), ValueError, "group_size: expected a positive"),
        (lambda: PerTokenKVQuantizer(4, 2.5), ValueError, "group_size: expected a positive"),  # type: ignore[arg-type]
        (lambda: KIVIKVQuantizer(param_dtype=torch.int8), ValueError, "param_dtype: expected"),
        (lambda: ZipCacheKVQuantizer(token_wise_impl="flex"), ValueError, "token_wise_impl"),  # type: ignore[arg-type]
        (lambda: ZipCacheKVQuantizer(token_wise_impl="cuda"), ValueError, "token_wise_impl"),  # type: ignore[arg-type]
        (
            lambda: MixedPrecisionKVQuantizer(high=MixedPrecisionKVQuantizer()),
            TypeError,
            "high: expected a uniform KVQuantizer",
        ),
        (lambda: MixedPrecisionKVQuantizer(low=object()), TypeError, "low: expected a uniform"),  # type: ignore[arg-type]
        (
            lambda: QuantizedKV(parts=(), num_tokens=0, dtype=torch.float32),
            ValueError,
            "parts: expected 1 or 2 parts",
        ),
    ],
)
def test_bad_configs_raise(make, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


def test_group_sizes_that_do_not_divide_the_head_dim_raise() -> None:
    k, v = _kv(1, 2, 32, 48)
    with pytest.raises(ValueError, match="group_size: expected a divisor of the channel axis"):
        KIVIKVQuantizer(2, 32).quantize(k, v)
    with pytest.raises(ValueError, match="group_size: expected a divisor of head_dim 48"):
        KIVIKVQuantizer(2, 32).bytes_per_token(2, 48)
    with pytest.raises(ValueError, match="group_size: expected a divisor of head_dim 48"):
        PerTokenKVQuantizer(2, 32).bytes_per_token(2, 48)


def test_bytes_per_token_rejects_bad_arguments() -> None:
    q = MixedPrecisionKVQuantizer()
    with pytest.raises(ValueError, match="kept_ratio: expected a value in"):
        q.bytes_per_token(4, 128, kept_ratio=1.5)
    with pytest.raises(ValueError, match="tokens: expected a positive int, got 0"):
        q.bytes_per_token(4, 128, tokens=0)
    with pytest.raises(ValueError, match="num_kv_heads: expected a positive int"):
        q.bytes_per_token(0, 128)


def test_dequantize_and_containers_reject_wrong_types() -> None:
    with pytest.raises(TypeError, match="qkv: expected a QuantizedKV, got tuple"):
        ZipCacheKVQuantizer().dequantize((1, 2))  # type: ignore[arg-type]
    k, v = _kv(1, 1, 4, 8)
    part = ZipCacheKVQuantizer().quantize(k, v).parts[0]
    with pytest.raises(ValueError, match="num_tokens: expected the parts' total 4, got 5"):
        QuantizedKV(parts=(part,), num_tokens=5, dtype=torch.float32)
    with pytest.raises(ValueError, match="keep: expected a packed bitmap"):
        QuantizedKV(parts=(part, part), num_tokens=8, dtype=torch.float32)
    short = ZipCacheKVQuantizer().quantize(k[:, :, :2], v[:, :, :2]).parts[0]
    with pytest.raises(ValueError, match="value: expected 4 tokens like key, got 2"):
        KVPart(part.key, short.value)


def test_quantizers_satisfy_the_protocol() -> None:
    for q in QUANTIZERS:
        assert isinstance(q, KVQuantizer)


# ----------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_mixed_dequantize_compiles_fullgraph_without_host_syncs() -> None:
    """The read path (bitmap unpack, order, scatter, dequantize) is capture-safe."""
    q = MixedPrecisionKVQuantizer()
    k, v = _kv(1, 2, 24, 32, dtype=torch.bfloat16)
    qkv = q.quantize(k, v, _keep(1, 2, 24, 10))
    compiled = torch.compile(lambda c: c.dequantize(torch.float32), fullgraph=True)
    k_c, v_c = compiled(qkv)
    k_e, v_e = qkv.dequantize(torch.float32)
    # inductor may fuse code * scale + zero (FMA): float32 rounding only
    assert torch.allclose(k_c, k_e, rtol=1e-6, atol=1e-6)
    assert torch.allclose(v_c, v_e, rtol=1e-6, atol=1e-6)


def test_non_finite_value_stays_in_its_own_token() -> None:
    """One NaN in a value row used to turn half the chunk into NaN through the channel divisor;
    now it is stored as 0 in its own token and every other token is unchanged."""
    from zipvl.quant import MixedPrecisionKVQuantizer

    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64)
    keep = torch.zeros(1, 2, 64, dtype=torch.bool)
    keep[..., ::3] = True
    q = MixedPrecisionKVQuantizer()
    k0, v0 = q.dequantize(q.quantize(k, v, keep))
    v_bad = v.clone()
    v_bad[0, 1, 10, 5] = float("nan")
    k1, v1 = q.dequantize(q.quantize(k, v_bad, keep))
    assert torch.isfinite(v1).all()
    mask = torch.ones(64, dtype=torch.bool)
    mask[10] = False
    torch.testing.assert_close(v1[:, :, mask], v0[:, :, mask], rtol=0, atol=0)
    torch.testing.assert_close(k1, k0, rtol=0, atol=0)
