"""Property tests of QuantSpec and the pure primitives (choose_qparams / quantize / dequantize /
pack / unpack / bitmaps), against the float64 oracle of ``zipvl.testing.quant``."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zipvl.quant import (
    QuantSpec,
    choose_qparams,
    dequantize,
    grouped_view,
    pack,
    pack_bitmap,
    quantize,
    quantize_pack,
    unpack,
    unpack_bitmap,
)
from zipvl.testing.quant import fake_quantize, oracle_qparams, sqnr

EPS32 = 2.0**-23
PARAM_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def spec_and_x(draw: st.DrawFn) -> tuple[QuantSpec, torch.Tensor]:
    """A spec and a matching x (..., T, D): groups divide their axis, D packs at any width."""
    bits = draw(st.sampled_from([2, 4, 8]))
    axis = draw(st.sampled_from(["token", "channel"]))
    grouped = draw(st.booleans())
    g = draw(st.sampled_from([1, 2, 4, 8])) if grouped else None
    ngroups = draw(st.integers(1, 3))
    if axis == "token":
        t = (g or draw(st.integers(1, 6))) * ngroups
        d = 4 * draw(st.integers(1, 4))
    else:
        t = draw(st.integers(1, 5))
        d = (g or 4) * ngroups * (4 if (g or 4) < 4 else 1)
    spec = QuantSpec(
        bits,
        axis,  # type: ignore[arg-type]
        g,
        symmetric=draw(st.booleans()),
        param_dtype=draw(st.sampled_from(PARAM_DTYPES)),
    )
    lead = draw(st.sampled_from([(), (2,), (1, 2)]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    spread = 10.0 ** draw(st.floats(-3, 3))
    offset = spread * draw(st.floats(-10, 10))
    x = torch.randn(*lead, t, d, generator=gen, dtype=torch.float64) * spread + offset
    if draw(st.booleans()):  # a constant token row and a constant channel
        x[..., 0, :] = offset
        x[..., :, 0] = offset
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    if dtype == torch.float16 and x.abs().max() > 6e4:
        dtype = torch.float32
    return spec, x.to(dtype)


def _per_element(p: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Broadcast a grouped parameter back to x's shape."""
    return p.expand_as(grouped_view(x, spec)).reshape(x.shape)


# ----------------------------------------------------------------------------- QuantSpec


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 3, "axis": "token"}, "bits: expected one of"),
        ({"bits": 16, "axis": "token"}, "bits: expected one of"),
        ({"bits": True, "axis": "token"}, "bits: expected one of"),
        ({"bits": 4, "axis": "row"}, "axis: expected 'token' or 'channel'"),
        ({"bits": 4, "axis": "token", "group_size": 0}, "group_size: expected a positive int"),
        ({"bits": 4, "axis": "token", "group_size": 2.0}, "group_size: expected a positive int"),
        ({"bits": 4, "axis": "token", "param_dtype": torch.int8}, "param_dtype: expected"),
    ],
)
def test_spec_rejects_bad_fields(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_spec_is_frozen() -> None:
    spec = QuantSpec(4, "token")
    with pytest.raises(AttributeError):
        spec.bits = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("spec", "shape", "match"),
    [
        (QuantSpec(4, "token", 3), (2, 8, 16), "group_size: expected a divisor of the token"),
        (QuantSpec(4, "channel", 24), (2, 8, 16), "group_size: expected a divisor of the chan"),
    ],
)
def test_group_size_must_divide_at_quantize_time(
    spec: QuantSpec, shape: tuple, match: str
) -> None:
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=match):
        choose_qparams(x, spec)
    with pytest.raises(ValueError, match=match):
        quantize_pack(x, spec)


# ----------------------------------------------------------------------------- qparams, round trip


@given(spec_and_x())
def test_qparams_are_exact_in_param_dtype_and_cover_the_group(case: tuple) -> None:
    spec, x = case
    scale, zero = choose_qparams(x, spec)
    assert scale.dtype == zero.dtype == torch.float32
    assert torch.equal(scale.to(spec.param_dtype).float(), scale)
    assert torch.equal(zero.to(spec.param_dtype).float(), zero)
    assert bool((scale > 0).all())
    xg = grouped_view(x, spec).double()
    dim = spec.reduce_dim
    lo = -xg.abs().amax(dim, keepdim=True) if spec.symmetric else xg.amin(dim, keepdim=True)
    hi = xg.abs().amax(dim, keepdim=True) if spec.symmetric else xg.amax(dim, keepdim=True)
    assert bool((zero.double() <= lo).all())
    # the top of the range is covered up to the float32 rounding of (max - zero) / levels
    band = 2 * EPS32 * (hi.abs() + zero.double().abs())
    assert bool((zero.double() + spec.levels * scale.double() >= hi - band).all())


@given(spec_and_x())
def test_round_trip_error_is_at_most_half_a_step(case: tuple) -> None:
    spec, x = case
    scale, zero = choose_qparams(x, spec)
    codes = quantize(x, spec, scale, zero)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert int(codes.max()) <= spec.levels
    x_hat = dequantize(codes, spec, scale, zero, torch.float32)
    s = _per_element(scale, x, spec).double()
    z = _per_element(zero, x, spec).double()
    err = (x_hat.double() - x.double()).abs()
    # float32 arithmetic band: (x - zero) / scale and code * scale + zero round a few times
    band = 4 * EPS32 * (x.double().abs() + z.abs() + spec.levels * s)
    assert bool((err <= s / 2 + band).all()), float((err - s / 2 - band).max())


@given(spec_and_x())
def test_requantizing_the_dequantized_codes_is_idempotent(case: tuple) -> None:
    spec, x = case
    scale, zero = choose_qparams(x, spec)
    codes = quantize(x, spec, scale, zero)
    again = quantize(dequantize(codes, spec, scale, zero, torch.float32), spec, scale, zero)
    assert torch.equal(again, codes)


@given(spec_and_x())
def test_reference_matches_the_float64_oracle_within_one_step(case: tuple) -> None:
    spec, x = case
    scale, zero = choose_qparams(x, spec)
    x_hat = dequantize(quantize(x, spec, scale, zero), spec, scale, zero, torch.float64)
    oracle = fake_quantize(x, spec)
    step, low = oracle_qparams(x, spec)
    s = _per_element(scale, x, spec).double()
    # both are within half their own step of x; the stored step is the oracle's rounded up
    band = 4 * EPS32 * (x.double().abs() + spec.levels * s)
    assert bool(((x_hat - oracle).abs() <= (s + step) / 2 + band).all())
    if spec.param_dtype == torch.float32:
        # same parameters up to float32 rounding: codes may only differ next to a rounding tie
        differ = (x_hat - oracle).abs() > band + 2 * EPS32 * s * spec.levels
        y = (x.double() - low) / torch.where(step > 0, step, 1.0)  # oracle's unrounded code
        near_tie = ((y - y.floor()) - 0.5).abs() < 1e-4
        assert bool((~differ | near_tie).all())


def test_constant_group_is_exact_and_does_not_divide_by_zero() -> None:
    x = torch.full((3, 8), 1.75)
    x[1] = 0.0
    for axis in ("token", "channel"):
        for pd in PARAM_DTYPES:
            spec = QuantSpec(2, axis, param_dtype=pd)  # type: ignore[arg-type]
            scale, zero = choose_qparams(x if axis == "channel" else x[:1], spec)
            assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    spec = QuantSpec(4, "channel")
    scale, zero = choose_qparams(x, spec)
    out = dequantize(quantize(x, spec, scale, zero), spec, scale, zero)
    assert torch.equal(out, x)


def test_symmetric_range_is_centred() -> None:
    x = torch.tensor([[-1.0, 0.25, 0.5, 2.0]])
    spec = QuantSpec(4, "channel", symmetric=True)
    scale, zero = choose_qparams(x, spec)
    assert float(zero) == -2.0
    assert float(scale) == pytest.approx(4.0 / 15)


# ----------------------------------------------------------------------------- packing


@given(
    bits=st.sampled_from([2, 4, 8]),
    lead=st.sampled_from([(), (3,), (2, 1)]),
    m=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_and_unpack_are_inverses(bits: int, lead: tuple, m: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    per = 8 // bits
    codes = torch.randint(0, 1 << bits, (*lead, m * per), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, m)
    assert torch.equal(unpack(packed, bits), codes)
    raw = torch.randint(0, 256, (*lead, m), generator=gen, dtype=torch.uint8)
    assert torch.equal(pack(unpack(raw, bits), bits), raw)


def test_pack_layout_is_contiguous_slices() -> None:
    # 2-bit, n = 8 -> m = 2 bytes; byte j holds elements j, j+2, j+4, j+6 at bits 0, 2, 4, 6
    codes = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0], dtype=torch.uint8)
    packed = pack(codes, 2)
    expected = [0 | 2 << 2 | 3 << 4 | 1 << 6, 1 | 3 << 2 | 2 << 4 | 0 << 6]
    assert packed.tolist() == expected
    assert pack(torch.tensor([5, 10], dtype=torch.uint8), 4).tolist() == [5 | 10 << 4]


@pytest.mark.parametrize(
    ("codes", "bits", "match"),
    [
        (torch.zeros(5, dtype=torch.uint8), 4, r"codes: expected a last dim divisible by 2"),
        (torch.zeros(6, dtype=torch.uint8), 2, r"codes: expected a last dim divisible by 4"),
        (torch.zeros(8, dtype=torch.int32), 2, r"codes: expected dtype torch.uint8"),
        (torch.zeros(8, dtype=torch.uint8), 3, r"bits: expected one of \(2, 4, 8\), got 3"),
    ],
)
def test_pack_rejects_bad_input(codes: torch.Tensor, bits: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pack(codes, bits)


@given(lead=st.sampled_from([(), (2,), (2, 3)]), t=st.integers(1, 40), seed=st.integers(0, 999))
def test_bitmap_round_trip(lead: tuple, t: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(*lead, t, generator=gen) < 0.4
    packed = pack_bitmap(mask)
    assert packed.shape == (*lead, math.ceil(t / 8)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bitmap(packed, t), mask)


def test_bitmap_layout_and_length_check() -> None:
    mask = torch.tensor([True, False, False, True, False, False, False, False, True])
    assert pack_bitmap(mask).tolist() == [1 | 1 << 3, 1]
    with pytest.raises(ValueError, match=r"length: expected 9\.\.16"):
        unpack_bitmap(pack_bitmap(mask), 17)


# ----------------------------------------------------------------------------- SQNR

# SQNR floors on N(0, 1) data, x of shape (2, 4, 64, 128), per-token groups of 32 channels
# (QuantSpec(bits, "channel", 32), float32 parameters). Measured once over seeds 0..9 with this
# module's ``_gaussian_sqnr`` (same numbers as ``zipvl.testing.quant.fake_quantize``, the ideal
# float64 quantizer): 2 bits min 8.07 / mean 8.13 dB, 4 bits min 22.09 / mean 22.14 dB,
# 8 bits min 46.70 / mean 46.75 dB. The floors sit about 0.5 dB below the minimum.
SQNR_FLOORS_DB = {2: 7.5, 4: 21.5, 8: 46.0}


def _gaussian_sqnr(bits: int, seed: int, spec_kw: dict | None = None) -> float:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 64, 128, generator=gen)
    spec = QuantSpec(bits, "channel", 32, **(spec_kw or {}))
    scale, zero = choose_qparams(x, spec)
    return sqnr(x, dequantize(quantize(x, spec, scale, zero), spec, scale, zero))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sqnr_floor_on_gaussian_data(bits: int) -> None:
    for seed in (100, 101):
        assert _gaussian_sqnr(bits, seed) >= SQNR_FLOORS_DB[bits]


@given(seed=st.integers(0, 2**31 - 1), axis=st.sampled_from(["token", "channel"]))
def test_sqnr_grows_with_bits(seed: int, axis: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, 64, generator=gen) * 3 + 1
    values = []
    for bits in (2, 4, 8):
        spec = QuantSpec(bits, axis, 16, param_dtype=torch.float16)  # type: ignore[arg-type]
        scale, zero = choose_qparams(x, spec)
        values.append(sqnr(x, dequantize(quantize(x, spec, scale, zero), spec, scale, zero)))
    # each doubling of the width adds about 6 dB per extra bit; 5 dB per step is a safe floor
    assert values[0] + 5 < values[1] < values[2] - 5


def test_sqnr_helper() -> None:
    x = torch.tensor([3.0, 4.0])
    assert sqnr(x, x) == math.inf
    assert sqnr(x, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25.0))
    with pytest.raises(ValueError, match="x_hat: expected shape"):
        sqnr(x, x[:1])


# ----------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_primitives_compile_fullgraph_and_match_eager() -> None:
    spec = QuantSpec(2, "channel", 32, param_dtype=torch.float16)

    def write_then_read(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        packed, scale, zero = quantize_pack(x, spec)
        return packed, dequantize(unpack(packed, spec.bits), spec, scale, zero, x.dtype)

    x = torch.randn(1, 2, 16, 64)
    compiled = torch.compile(write_then_read, fullgraph=True)
    packed_c, out_c = compiled(x)
    packed_e, out_e = write_then_read(x)
    assert torch.equal(packed_c, packed_e)
    scale, _ = choose_qparams(x, spec)
    # dequantization may be fused (FMA) by inductor: allow float32 rounding only
    assert torch.allclose(out_c, out_e, rtol=0, atol=float(scale.max()) * 1e-5 + 1e-6)


def test_triton_without_the_package_raises_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the lazy import fail as it does without triton installed
    monkeypatch.setitem(sys.modules, "zipvl.quant.triton_kernels", None)
    with pytest.raises(ValueError, match="impl: 'triton' needs the triton package"):
        quantize_pack(torch.randn(2, 32), QuantSpec(2, "channel"), impl="triton")


# ----------------------------------------------------------------------------- rounding of codes


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_codes_round_half_up(bits: int, axis: str, device: str) -> None:
    """Exact ties go up: ``floor(y + 0.5)``, not torch.round's half-to-even. Each group holds 0
    and the top level, so scale = 1 and zero = 0 exactly, and every k + 0.5 is a tie."""
    spec = QuantSpec(bits, axis)  # type: ignore[arg-type]
    levels = spec.levels
    ties = [k + 0.5 for k in range(levels)]
    vals = torch.tensor([0.0, float(levels), *ties], device=device)  # (T,)
    # the scale is shared along `axis`: lay the values out along it, 3 copies the other way
    x = vals[:, None].expand(-1, 3) if axis == "token" else vals[None, :].expand(3, -1)
    x = x[None].contiguous()  # (1, T, D)
    scale, zero = choose_qparams(x, spec)
    assert torch.all(scale == 1.0) and torch.all(zero == 0.0)
    codes = quantize(x, spec, scale, zero)
    got = codes[0, :, 0] if axis == "token" else codes[0, 0, :]
    expected = [0, levels, *range(1, levels + 1)]  # k + 0.5 -> k + 1
    assert got.tolist() == expected
    assert torch.round(torch.tensor(ties)).tolist() != expected[2:]  # half-to-even differs
    # just below a tie rounds down
    below = quantize(x - 1e-3 * (x % 1 == 0.5), spec, scale, zero)
    got_below = below[0, :, 0] if axis == "token" else below[0, 0, :]
    assert got_below.tolist() == [0, levels, *range(levels)]
