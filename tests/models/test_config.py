"""ZipVLConfig: paper defaults, presets, per-layer resolution, validation messages."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zipvl.config import LAYER_OVERRIDE_FIELDS, PRESETS, ZipVLConfig
from zipvl.quant import (
    IdentityKVQuantizer,
    KIVIKVQuantizer,
    MixedPrecisionKVQuantizer,
    ZipCacheKVQuantizer,
)
from zipvl.sparsity import (
    CumulativeMassAllocator,
    FixedRatioAllocator,
    KeyNormScorer,
    PerLayerSchedule,
    ProbeScorer,
    Selection,
    TopKSelector,
    sparse_attention,
)
from zipvl.types import Impl


def test_defaults_are_the_papers() -> None:
    """The paper's (ZipCache's) settings, with the probe counts capped at 64 + 64 (the one
    default that is not the paper's: docs/decisions.md#probe-cap)."""
    cfg = ZipVLConfig()
    layer = cfg.for_layer(0)
    assert layer.allocator == CumulativeMassAllocator(0.975)
    assert layer.scorer == ProbeScorer(
        recent_frac=0.05, random_frac=0.05, max_recent=64, max_random=64
    )
    assert ZipVLConfig(probe_cap=None).for_layer(0).scorer == ProbeScorer(
        recent_frac=0.05, random_frac=0.05
    )
    assert layer.quantizer == MixedPrecisionKVQuantizer(
        ZipCacheKVQuantizer(4), ZipCacheKVQuantizer(2)
    )
    assert isinstance(layer.selector, TopKSelector) and layer.selector.keep_last
    assert (cfg.recompress_every, layer.unkept, layer.dense) == (100, "zero", False)


def test_presets() -> None:
    assert sorted(PRESETS) == ["dense", "fixed", "kivi", "zipvl", "zipvl-fast"]
    assert ZipVLConfig.preset("zipvl") == ZipVLConfig()
    assert ZipVLConfig.preset("zipvl-fast").for_layer(0).allocator == CumulativeMassAllocator(0.96)
    fixed = ZipVLConfig.preset("fixed").for_layer(3)
    assert fixed.allocator == FixedRatioAllocator(0.42)
    kivi = ZipVLConfig.preset("kivi").for_layer(0)
    assert kivi.dense and kivi.quantizer == KIVIKVQuantizer(2, 32)
    dense = ZipVLConfig.preset("dense").for_layer(0)
    assert dense.allocator == CumulativeMassAllocator(1.0)
    assert dense.quantizer == IdentityKVQuantizer()
    assert ZipVLConfig.preset("zipvl", recompress_every=8).recompress_every == 8


def test_unknown_preset_lists_names() -> None:
    with pytest.raises(ValueError, match=r"unknown preset 'h2o'.*'dense'.*'zipvl-fast'"):
        ZipVLConfig.preset("h2o")


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(tau=0.0), ValueError, r"tau: expected a value in \(0, 1\], got 0.0"),
        (dict(tau=1.5), ValueError, r"tau: expected a value in \(0, 1\], got 1.5"),
        (dict(bits_high=3), ValueError, r"bits_high: expected one of \(2, 4, 8, 16\), got 3"),
        (dict(bits_high=4, bits_low=8), ValueError, r"bits_low: expected <= bits_high \(4\)"),
        (dict(recompress_every=0), ValueError, r"recompress_every: expected an int >= 1, got 0"),
        (dict(sink_tokens=-1), ValueError, r"sink_tokens: expected an int >= 0, got -1"),
        (dict(probe_cap=0), ValueError, r"probe_cap: expected an int >= 1, got 0"),
        (dict(probe_recent_frac=0.0, probe_random_frac=0.0), ValueError, r"at least one > 0"),
        (dict(impl="cuda"), ValueError, r"impl: expected one of .*'sdpa'.*got 'cuda'"),
        (dict(impl="triton"), ValueError, r"impl: expected one of 'auto', 'sdpa', .*'triton'"),
        (
            dict(layers={2: {"impl": "triton"}}),
            ValueError,
            r"layers\[2\]: impl: expected one of 'auto', 'sdpa', 'flex', 'reference', got "
            r"'triton'",
        ),
        (dict(quant_impl="flex"), ValueError, r"quant_impl: expected one of .*, got 'flex'"),
        (
            dict(quantizer=IdentityKVQuantizer(), quant_impl="triton"),
            ValueError,
            r"quant_impl: only feeds the default quantizer",
        ),
        (dict(unkept="drop"), ValueError, r"unkept: expected one of \('zero', 'attend'\)"),
        (dict(dense_layers={-1}), ValueError, r"dense_layers entry: expected an int >= 0"),
        (dict(dense_layers=3), TypeError, r"dense_layers: expected a set of layer indices"),
        (dict(scorer=3), TypeError, r"scorer: expected a callable component or None, got 3"),
        (dict(quantizer="int4"), TypeError, r"quantizer: expected a KVQuantizer"),
        (dict(sparse_prefill=1), TypeError, r"sparse_prefill: expected a bool"),
        (
            dict(allocator=FixedRatioAllocator(0.5), tau=0.9),
            ValueError,
            r"tau: only feeds the default allocator, but allocator is given explicitly",
        ),
        (
            dict(quantizer=IdentityKVQuantizer(), bits_high=8),
            ValueError,
            r"bits_high: only feeds the default quantizer",
        ),
        (dict(layers={0: {"taus": 0.9}}), ValueError, r"layers\[0\]: unknown override field"),
        (dict(layers={1: {"tau": 2.0}}), ValueError, r"layers\[1\]: tau: expected a value in"),
        (dict(layers={-2: {"tau": 0.9}}), ValueError, r"layers key: expected an int >= 0"),
        (dict(layers={0: 0.9}), TypeError, r"layers\[0\]: expected a mapping"),
    ],
)
def test_bad_values_raise(kwargs: dict, err: type[Exception], match: str) -> None:
    with pytest.raises(err, match=match):
        ZipVLConfig(**kwargs)


def test_per_layer_overrides_resolve() -> None:
    cfg = ZipVLConfig(
        tau=0.96,
        dense_layers={0},
        layers={
            1: {"tau": 0.99},
            2: {"allocator": FixedRatioAllocator(0.3), "bits_high": 8},
            3: {"scorer": KeyNormScorer(), "impl": "reference", "unkept": "attend"},
        },
    )
    assert cfg.for_layer(0).dense and not cfg.for_layer(1).dense
    assert cfg.for_layer(1).allocator == CumulativeMassAllocator(0.99)
    two = cfg.for_layer(2)
    assert two.allocator == FixedRatioAllocator(0.3)
    assert two.quantizer == MixedPrecisionKVQuantizer(
        ZipCacheKVQuantizer(8), ZipCacheKVQuantizer(2)
    )
    three = cfg.for_layer(3)
    assert three.scorer == KeyNormScorer() and three.impl is Impl.REFERENCE
    assert three.unkept == "attend"
    assert cfg.for_layer(4).allocator == CumulativeMassAllocator(0.96)  # no override
    with pytest.raises(TypeError):
        cfg.layers[1]["tau"] = 0.5  # type: ignore[index]  # read-only


def test_quant_impl_feeds_the_default_quantizers() -> None:
    q = ZipVLConfig(quant_impl="triton").for_layer(0).quantizer  # type: ignore[arg-type]
    assert q == MixedPrecisionKVQuantizer(
        ZipCacheKVQuantizer(4, token_wise_impl=Impl.TRITON),
        ZipCacheKVQuantizer(2, token_wise_impl=Impl.TRITON),
    )


def test_check_num_layers() -> None:
    ZipVLConfig(dense_layers={1}, layers={1: {"tau": 0.9}}).check_num_layers(2)
    with pytest.raises(ValueError, match=r"dense_layers: expected layer indices < num_layers=2"):
        ZipVLConfig(dense_layers={2}).check_num_layers(2)
    with pytest.raises(
        ValueError, match=r"layers: expected layer indices < num_layers=4, got \[7"
    ):
        ZipVLConfig(layers={7: {"tau": 0.9}}).check_num_layers(4)


def test_frozen_and_replace() -> None:
    cfg = ZipVLConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tau = 0.5  # type: ignore[misc]
    assert dataclasses.replace(cfg, tau=0.9).for_layer(0).allocator == CumulativeMassAllocator(0.9)
    explicit = ZipVLConfig(allocator=FixedRatioAllocator(0.5))
    # replace() keeps the explicit component and still validates
    assert dataclasses.replace(explicit, recompress_every=7).for_layer(0).allocator == (
        FixedRatioAllocator(0.5)
    )


@given(
    tau=st.floats(0.01, 1.0),
    bits=st.sampled_from([(2, 2), (4, 2), (8, 4), (16, 2), (16, 16), (8, 8)]),
    layer=st.integers(0, 40),
    override_tau=st.one_of(st.none(), st.floats(0.01, 1.0)),
)
def test_resolution_properties(
    tau: float, bits: tuple[int, int], layer: int, override_tau: float | None
) -> None:
    layers = {} if override_tau is None else {layer: {"tau": override_tau}}
    cfg = ZipVLConfig(tau=tau, bits_high=bits[0], bits_low=bits[1], layers=layers)
    resolved = cfg.for_layer(layer)
    want_tau = tau if override_tau is None else override_tau
    assert resolved.allocator == CumulativeMassAllocator(want_tau)
    q = resolved.quantizer
    if bits == (16, 16):
        assert q == IdentityKVQuantizer()
    else:
        assert isinstance(q, MixedPrecisionKVQuantizer)
        hi, lo = bits
        assert q.high == (IdentityKVQuantizer() if hi == 16 else ZipCacheKVQuantizer(hi))
        assert q.low == ZipCacheKVQuantizer(lo)
    assert cfg.for_layer(layer + 1).allocator == CumulativeMassAllocator(tau)
    assert set(cfg.layers.get(layer, {})) <= LAYER_OVERRIDE_FIELDS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_json(name: str) -> None:
    cfg = ZipVLConfig.preset(name)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ZipVLConfig.from_dict(data) == cfg


def test_custom_config_round_trips() -> None:
    cfg = ZipVLConfig(
        scorer=ProbeScorer(max_recent=64, max_random=64, denominator="probe_count"),
        allocator=PerLayerSchedule([CumulativeMassAllocator(0.99), 0.5]),
        quantizer=MixedPrecisionKVQuantizer(
            ZipCacheKVQuantizer(8, param_dtype=torch.bfloat16), KIVIKVQuantizer(2, 16)
        ),
        impl=Impl.REFERENCE,
        dense_layers={1, 0},
        layers={1: {"tau": 0.9, "selector": TopKSelector(granularity="layer", sink_tokens=4)}},
    )
    again = ZipVLConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.for_layer(1) == cfg.for_layer(1)
    with pytest.raises(ValueError, match=r"unknown component type 'os.system'"):
        ZipVLConfig.from_dict({"scorer": {"type": "os.system", "fields": {}}})
    with pytest.raises(ValueError, match=r"unknown ZipVLConfig field\(s\) \['taus'\]"):
        ZipVLConfig.from_dict({"taus": 0.9})
    with pytest.raises(TypeError, match=r"scorer: cannot serialise"):
        ZipVLConfig(scorer=lambda q, k: None).to_dict()  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize("impl", list(Impl))
def test_impl_accepted_iff_sparse_attention_implements_it(impl: Impl) -> None:
    """The config accepts exactly the impls sparse_attention runs (no failure at first prefill)."""
    q = torch.randn(1, 2, 4, 8)
    selection = Selection(torch.ones(1, 2, 4, dtype=torch.bool), 4)
    try:
        sparse_attention(q, q, q, selection, impl=impl, compile=False)
    except ValueError as err:
        assert "impl" in str(err)
        with pytest.raises(ValueError, match=rf"impl: expected one of .*got '{impl.value}'"):
            ZipVLConfig(impl=impl)
    else:
        assert ZipVLConfig(impl=impl).for_layer(0).impl is impl


def test_layers_are_resolved_once() -> None:
    """for_layer builds a layer's components once per config: every forward reuses them, and a
    replaced config resolves afresh."""
    import dataclasses

    cfg = ZipVLConfig(layers={2: {"tau": 0.9}})
    first = cfg.for_layer(2)
    assert cfg.for_layer(2) is first and cfg.for_layer(2).scorer is first.scorer
    assert cfg.for_layer(0) is not first and cfg.for_layer(0).allocator != first.allocator
    other = dataclasses.replace(cfg, tau=0.5)
    assert other.for_layer(0) is not cfg.for_layer(0)
    assert other.for_layer(0).allocator != cfg.for_layer(0).allocator
    assert cfg == ZipVLConfig(layers={2: {"tau": 0.9}})  # the cache is not part of equality


@dataclasses.dataclass(frozen=True)
class _TopHalf:
    """A user allocator: keep half of every row (a frozen dataclass, like the project's)."""

    floor: int = 1

    def __call__(self, mass: torch.Tensor, /, *, layer_idx: int | None = None) -> torch.Tensor:
        b, h, s = mass.shape
        return torch.full((b, h), max(self.floor, s // 2), dtype=torch.int32)


def test_from_dict_takes_user_components() -> None:
    cfg = ZipVLConfig(allocator=_TopHalf(3), layers={2: {"allocator": _TopHalf(5)}})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["allocator"] == {"type": "_TopHalf", "fields": {"floor": 3}}
    with pytest.raises(ValueError, match=r"unknown component type '_TopHalf'.*components="):
        ZipVLConfig.from_dict(data)
    again = ZipVLConfig.from_dict(data, components=[_TopHalf])
    assert again == cfg and again.for_layer(2).allocator == _TopHalf(5)


def test_a_schedule_resolves_to_the_layer_entry() -> None:
    """for_layer hands each layer its schedule entry (no per-forward lookup); the cache does the
    same for a schedule given to it directly."""
    from zipvl.cache import ZipVLCache

    sched = PerLayerSchedule([CumulativeMassAllocator(0.99), 0.5])
    cfg = ZipVLConfig(allocator=sched)
    assert cfg.for_layer(0).allocator is sched.schedule[0]
    assert cfg.for_layer(1).allocator == FixedRatioAllocator(0.5)
    with pytest.raises(ValueError, match=r"layer_idx: expected 0 <= layer_idx < 2"):
        cfg.for_layer(2)
    cache = ZipVLCache(2, allocator=sched)
    assert [cache.layer(i).allocator for i in range(2)] == list(sched.schedule)
