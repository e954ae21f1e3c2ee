"""One vocabulary of implementations: every public entry point that takes an impl accepts each of
its allowed spellings (the string and the ``Impl`` member) and rejects every other value with a
``ValueError`` that names the argument and lists the allowed values; ``"auto"`` says what it
picks."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import zipvl.decode
import zipvl.impl
from zipvl.cache import PagedKVStore, PageFormat
from zipvl.config import ZipVLConfig
from zipvl.decode import decode_attention
from zipvl.demo import check_demo_args
from zipvl.impl import (
    COPY_IMPLS,
    DECODE_IMPLS,
    PLAN_IMPLS,
    QUANT_IMPLS,
    SCORER_IMPLS,
    SPARSE_ATTENTION_IMPLS,
    Impl,
    parse_impl,
)
from zipvl.quant import (
    KIVIKVQuantizer,
    PerTokenKVQuantizer,
    QuantSpec,
    ZipCacheKVQuantizer,
)
from zipvl.quant.ops import quantize_pack
from zipvl.quant.quantizers import quantize_tensor
from zipvl.sparsity import ProbeScorer, plan_tokens, sparse_attention
from zipvl.types import Selection

# ----------------------------------------------------------------------------- the entry points


def _qkv(hq: int = 4, hkv: int = 2, s: int = 16, d: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, hq, s, d, generator=g)
    k = torch.randn(1, hkv, s, d, generator=g)
    v = torch.randn(1, hkv, s, d, generator=g)
    return q, k, v


def _sparse_attention(impl: Any) -> object:
    q, k, v = _qkv()
    keep = torch.zeros(1, 2, 16, dtype=torch.bool)
    keep[..., ::2] = True
    sel = Selection(keep=keep, num_kept=8)
    return sparse_attention(q, k, v, sel, impl=impl, compile=False)


def _sparse_attention_copy(impl: Any) -> object:
    q, k, v = _qkv()
    keep = torch.zeros(1, 2, 16, dtype=torch.bool)
    keep[..., 1::3] = True
    sel = Selection(keep=keep, num_kept=5)
    from zipvl.sparsity.attention import triton_copy_problem

    if parse_impl("copy_impl", impl, COPY_IMPLS) is Impl.TRITON and triton_copy_problem(q):
        # accepted, and it says why it cannot run here instead of copying in PyTorch
        with pytest.raises(ValueError, match=r"copy_impl: 'triton' cannot run: it needs a CUDA"):
            sparse_attention(q, k, v, sel, impl="sdpa", copy_impl=impl)
        return None
    return sparse_attention(q, k, v, sel, impl="sdpa", copy_impl=impl)


def _plan_tokens(impl: Any) -> object:
    q, k, _ = _qkv()
    if parse_impl("impl", impl, PLAN_IMPLS) is Impl.GRAPH and not torch.cuda.is_available():
        # accepted, and it says why it cannot run here instead of planning eagerly
        with pytest.raises(ValueError, match=r"impl: 'graph' cannot run: q: .*CUDA"):
            plan_tokens(q, k, impl=impl)
        return None
    return plan_tokens(q, k, impl=impl)


def _probe_scorer(impl: Any) -> object:
    q, k, _ = _qkv()
    scorer = ProbeScorer(impl=impl)
    assert isinstance(scorer.impl, Impl)
    return scorer(q, k)


def _quantize_pack(impl: Any) -> object:
    return quantize_pack(torch.randn(1, 1, 4, 32), QuantSpec(4, "channel"), impl=impl)


def _quantize_tensor(impl: Any) -> object:
    return quantize_tensor(torch.randn(1, 1, 4, 32), QuantSpec(4, "channel"), impl=impl)


def _quantizer(cls: Callable[..., Any]) -> Callable[[Any], object]:
    def make(impl: Any) -> object:
        quantizer = cls(token_wise_impl=impl)
        assert isinstance(quantizer.token_wise_impl, Impl)
        return quantizer

    return make


def _config(field: str, *, layer: bool = False) -> Callable[[Any], object]:
    def make(impl: Any) -> object:
        cfg = ZipVLConfig(layers={0: {field: impl}}) if layer else ZipVLConfig(**{field: impl})
        if layer:
            resolved = cfg.for_layer(0)
            if field == "impl":
                assert isinstance(resolved.impl, Impl)
        else:
            assert isinstance(getattr(cfg, field), Impl)
        return cfg

    return make


def _store() -> PagedKVStore:
    store = PagedKVStore(PageFormat(page_size=16), batch_size=1, num_heads=2, head_dim=64,
                         dtype=torch.float32, device="cpu", recompress_every=8,
                         sink_tokens=0)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, 2, 40, 64, generator=g)
    store.write_prefill(k, v, torch.rand(1, 2, 40, generator=g) < 0.5, None, 0)
    return store


def _decode_attention(impl: Any) -> object:
    return decode_attention(torch.randn(1, 4, 1, 64), _store(), impl=impl)


def _demo(impl: Any, tmp_path: Path) -> object:
    return check_demo_args(quant_impl=impl, out_dir=tmp_path)


# (id, argument name in the message, allowed, call)
ENTRY_POINTS: list[tuple[str, str, Collection[Impl], Callable[..., object]]] = [
    ("sparse_attention", "impl", SPARSE_ATTENTION_IMPLS, _sparse_attention),
    ("sparse_attention.copy_impl", "copy_impl", COPY_IMPLS, _sparse_attention_copy),
    ("ProbeScorer", "impl", SCORER_IMPLS, _probe_scorer),
    ("quantize_pack", "impl", QUANT_IMPLS, _quantize_pack),
    ("quantize_tensor", "impl", QUANT_IMPLS, _quantize_tensor),
    ("ZipCacheKVQuantizer", "token_wise_impl", QUANT_IMPLS, _quantizer(
        lambda **kw: ZipCacheKVQuantizer(4, **kw))),
    ("KIVIKVQuantizer", "token_wise_impl", QUANT_IMPLS, _quantizer(
        lambda **kw: KIVIKVQuantizer(2, 32, **kw))),
    ("PerTokenKVQuantizer", "token_wise_impl", QUANT_IMPLS, _quantizer(
        lambda **kw: PerTokenKVQuantizer(4, **kw))),
    ("ZipVLConfig.impl", "impl", SPARSE_ATTENTION_IMPLS, _config("impl")),
    ("ZipVLConfig.quant_impl", "quant_impl", QUANT_IMPLS, _config("quant_impl")),
    ("ZipVLConfig.decode_impl", "decode_impl", DECODE_IMPLS, _config("decode_impl")),
    ("ZipVLConfig.layers.impl", "layers[0]: impl", SPARSE_ATTENTION_IMPLS,
     _config("impl", layer=True)),
    ("ZipVLConfig.layers.quant_impl", "layers[0]: quant_impl", QUANT_IMPLS,
     _config("quant_impl", layer=True)),
    ("decode_attention", "impl", DECODE_IMPLS, _decode_attention),
    ("plan_tokens", "impl", PLAN_IMPLS, _plan_tokens),
    ("ZipVLConfig.plan_impl", "plan_impl", PLAN_IMPLS, _config("plan_impl")),
    ("check_demo_args", "quant_impl", QUANT_IMPLS, _demo),
]  # fmt: skip

_IDS = [e[0] for e in ENTRY_POINTS]
_OTHER_BAD = ["cuda", "SDPA", "", " auto", None, 3]


def _call(fn: Callable[..., object], impl: Any, tmp_path: Path) -> object:
    return fn(impl, tmp_path) if fn is _demo else fn(impl)


def _allowed_cases() -> list[Any]:
    cases = []
    for ident, _, allowed, fn in ENTRY_POINTS:
        for impl in allowed:
            for spelling in (impl.value, impl):
                kind = "str" if isinstance(spelling, str) and type(spelling) is str else "enum"
                cases.append(pytest.param(fn, spelling, id=f"{ident}-{impl.value}-{kind}"))
    return cases


def _rejected_cases() -> list[Any]:
    cases = []
    for ident, name, allowed, fn in ENTRY_POINTS:
        bad: list[Any] = [i for i in Impl if i not in allowed] + _OTHER_BAD
        if fn is _demo:
            bad.remove(None)  # the demo's "use the preset's quantizer"
        for value in bad:
            shown = value.value if isinstance(value, Impl) else repr(value)
            cases.append(pytest.param(fn, name, allowed, value, id=f"{ident}-{shown}"))
    return cases


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(("fn", "spelling"), _allowed_cases())
def test_every_allowed_spelling_works(fn, spelling, tmp_path: Path) -> None:
    _call(fn, spelling, tmp_path)


@pytest.mark.parametrize(("fn", "name", "allowed", "value"), _rejected_cases())
def test_other_values_raise_naming_the_argument(fn, name, allowed, value, tmp_path) -> None:
    listed = ", ".join(repr(i.value) for i in allowed)
    got = value.value if isinstance(value, Impl) else value
    pattern = re.escape(f"{name}: expected one of {listed}, got {got!r}")
    with pytest.raises(ValueError, match=pattern):
        _call(fn, value, tmp_path)


def test_every_impl_is_accepted_somewhere_and_the_lists_agree() -> None:
    used = set(SPARSE_ATTENTION_IMPLS) | set(SCORER_IMPLS) | set(QUANT_IMPLS) | set(DECODE_IMPLS)
    used |= set(PLAN_IMPLS) | set(COPY_IMPLS)
    assert used == set(Impl)
    assert [i.value for i in DECODE_IMPLS] == list(zipvl.decode.DECODE_IMPLS)
    # each list's first entry is the default of its operations
    assert ZipVLConfig().impl is SPARSE_ATTENTION_IMPLS[0]
    assert ZipVLConfig().quant_impl is QUANT_IMPLS[0]
    assert ZipVLConfig().decode_impl is DECODE_IMPLS[0]
    assert ZipVLConfig().plan_impl is PLAN_IMPLS[0]
    assert ProbeScorer().impl is SCORER_IMPLS[0]
    assert ZipCacheKVQuantizer(4).token_wise_impl is QUANT_IMPLS[0]


def test_config_round_trips_its_impls() -> None:
    cfg = ZipVLConfig(impl="flex", quant_impl="triton", decode_impl="reference",  # type: ignore[arg-type]
                      scorer=ProbeScorer(impl="torch"))  # fmt: skip
    again = ZipVLConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert (again.impl, again.quant_impl, again.decode_impl) == (
        Impl.FLEX,
        Impl.TRITON,
        Impl.REFERENCE,
    )


def test_cli_quant_impl_choices(capsys: pytest.CaptureFixture[str]) -> None:
    from zipvl.cli import _parsers

    parser, _ = _parsers()
    for impl in QUANT_IMPLS:
        assert parser.parse_args(["demo", "--quant-impl", impl.value]).quant_impl == impl
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--quant-impl", "flex"])
    assert "argument --quant-impl: invalid choice: 'flex'" in capsys.readouterr().err


@given(st.one_of(st.text(max_size=12), st.sampled_from([i.value for i in Impl])))
def test_parse_impl_accepts_exactly_the_allowed_spellings(text: str) -> None:
    for allowed in (SPARSE_ATTENTION_IMPLS, SCORER_IMPLS, QUANT_IMPLS, DECODE_IMPLS):
        if text in {i.value for i in allowed}:
            impl = parse_impl("arg", text, allowed)
            assert impl == text and impl in allowed and isinstance(impl, Impl)
        else:
            with pytest.raises(ValueError, match=r"^arg: expected one of .*, got "):
                parse_impl("arg", text, allowed)


def test_impl_prints_as_its_value() -> None:
    assert f"{Impl.SDPA}" == str(Impl.SDPA) == "sdpa"
    assert zipvl.impl.Impl is zipvl.types.Impl and zipvl.types.parse_impl is parse_impl


# ----------------------------------------------------------------------------- what "auto" picks


def test_probe_scorer_auto_names_its_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, _ = _qkv()
    assert ProbeScorer().impl_for(q) is Impl.TORCH  # a CPU tensor: plain PyTorch
    assert ProbeScorer(impl="triton").impl_for(q) is Impl.TRITON
    assert ProbeScorer(impl="torch").impl_for(q) is Impl.TORCH
    # the call runs what impl_for names
    import zipvl.sparsity.probe_triton as probe_triton

    calls: list[str] = []

    def fake(q, k, rows, *, scale, **kw):
        calls.append("triton")
        return torch.ones(k.shape[:3])

    monkeypatch.setattr(probe_triton, "probe_mass_triton", fake)
    ProbeScorer()(q, k)
    assert calls == []
    monkeypatch.setattr(ProbeScorer, "impl_for", lambda self, q: Impl.TRITON)
    ProbeScorer()(q, k)
    assert calls == ["triton"]


def test_sparse_attention_default_is_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    import zipvl.sparsity.attention as attention

    q, k, v = _qkv()
    keep = torch.zeros(1, 2, 16, dtype=torch.bool)
    keep[..., 3::3] = True
    sel = Selection(keep=keep, num_kept=5)
    want = sparse_attention(q, k, v, sel, impl="sdpa")

    def no_flex(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the default ran FlexAttention")

    monkeypatch.setattr(attention, "_flex_sparse", no_flex)
    assert torch.equal(sparse_attention(q, k, v, sel), want)
