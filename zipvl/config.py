"""``ZipVLConfig``: which components ZipVL runs with, per layer, and the paper's defaults.

ZipVL (He et al., arXiv 2410.08584 v1; docs/algorithm.md, docs/design.md#configuration) has
five swappable parts per attention layer:

* prefill: scorer (probe attention, Eq. 7) -> allocator (tau rule, Eq. 6) -> selector
  (top-p per KV head, Eqs. 8/9) -> token-sparse attention (``impl``, ``unkept``);
* KV cache: quantizer (4-bit important / 2-bit other tokens), re-compressed every
  ``recompress_every`` generated tokens.

The config only *combines* component instances (style C2): a component left at ``None`` is built
from the plain settings next to it (``tau``, probe fractions, bit widths, ...), one given
explicitly wins, and giving both an explicit component and a non-default value of a setting that
only feeds the default component raises (the setting would be silently ignored otherwise).
Per-layer overrides (``layers={idx: {"tau": 0.99}}``) replace settings or components for one
layer; ``dense_layers`` run plain causal attention in prefill and store every token as
important. ``for_layer(idx)`` resolves everything into a ``LayerConfig``.

Named presets (``ZipVLConfig.preset(name)``) come from the plain dict ``PRESETS``.

This module is transformers-free; building the cache lives in ``zipvl.models.attention``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch

from zipvl.checks import check_fraction, check_int
from zipvl.impl import (
    DECODE_IMPLS,
    PAGE_WRITE_IMPLS,
    PLAN_IMPLS,
    QUANT_IMPLS,
    SPARSE_ATTENTION_IMPLS,
    Impl,
    parse_impl,
)
from zipvl.quant import (
    IdentityKVQuantizer,
    KIVIKVQuantizer,
    KVQuantizer,
    MixedPrecisionKVQuantizer,
    PerTokenKVQuantizer,
    ZipCacheKVQuantizer,
)
from zipvl.quant.fragment import CODE_ORDERS
from zipvl.sparsity import (
    AccumulatedAttentionScorer,
    CumulativeMassAllocator,
    FixedRatioAllocator,
    KeyNormScorer,
    PerLayerSchedule,
    ProbeScorer,
    SnapKVScorer,
    TopKSelector,
)
from zipvl.sparsity.allocators import layer_allocator
from zipvl.types import Allocator, Scorer, Selector

__all__ = [
    "LAYER_OVERRIDE_FIELDS",
    "PRESETS",
    "SERIALIZABLE_COMPONENTS",
    "LayerConfig",
    "ZipVLConfig",
]

_BITS = (2, 4, 8, 16)
_UNKEPT = ("zero", "attend")

LAYER_OVERRIDE_FIELDS: frozenset[str] = frozenset(
    {
        "tau",
        "probe_recent_frac",
        "probe_random_frac",
        "probe_cap",
        "bits_high",
        "bits_low",
        "quant_impl",
        "sparse_prefill",
        "impl",
        "plan_impl",
        "unkept",
        "scorer",
        "allocator",
        "selector",
        "quantizer",
    }
)
"""Field names a per-layer override (``ZipVLConfig.layers[idx]``) may set."""


@dataclass(frozen=True)
class LayerConfig:
    """The resolved components of one layer (what the attention code reads).

    Attributes:
        layer_idx: the layer.
        dense: True for a dense layer (``dense_layers`` or ``sparse_prefill=False``): plain
            causal attention in prefill and every token committed as important.
        scorer: prefill importance scorer (``Scorer``).
        allocator: prefill budget rule (``Allocator``); also budgets the decode blocks. A
            ``PerLayerSchedule`` is resolved to this layer's entry.
        selector: prefill token selector (``Selector``).
        quantizer: the layer's ``KVQuantizer``.
        impl: ``sparse_attention`` implementation.
        unkept: what unselected queries get in prefill: ``"zero"`` (ZipVL) or ``"attend"``.
        plan_impl: ``plan_tokens`` implementation (eager or replayed from a CUDA graph).
    """

    layer_idx: int
    dense: bool
    scorer: Scorer
    allocator: Allocator
    selector: Selector
    quantizer: KVQuantizer
    impl: Impl
    unkept: Literal["zero", "attend"]
    plan_impl: Impl = Impl.AUTO


# which plain settings only feed which default component
_FEEDS: dict[str, tuple[str, ...]] = {
    "scorer": ("probe_recent_frac", "probe_random_frac", "probe_cap"),
    "allocator": ("tau",),
    "quantizer": ("bits_high", "bits_low", "quant_impl"),
}


def _check_callable(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name}: expected a callable component or None, got {value!r}")


def _default_quantizer(bits_high: int, bits_low: int, impl: Impl) -> KVQuantizer:
    def uniform(bits: int) -> KVQuantizer:
        if bits == 16:
            return IdentityKVQuantizer()
        return ZipCacheKVQuantizer(bits, token_wise_impl=impl)

    if bits_high == 16 and bits_low == 16:
        return IdentityKVQuantizer()
    return MixedPrecisionKVQuantizer(high=uniform(bits_high), low=uniform(bits_low))


@dataclass(frozen=True)
class ZipVLConfig:
    """ZipVL's components and settings, validated on construction. Defaults = the paper's.

    Example::

        cfg = ZipVLConfig()                                   # tau 0.975, 4/2-bit cache
        cfg = ZipVLConfig.preset("zipvl-fast")                # tau 0.96
        cfg = ZipVLConfig(allocator=FixedRatioAllocator(0.42), dense_layers={0, 1})
        cfg = ZipVLConfig(layers={0: {"tau": 0.99}, 5: {"bits_high": 8}})
        layer = cfg.for_layer(3)                              # LayerConfig with components

    Attributes:
        tau: retained attention-mass threshold of Eq. 6, in (0, 1] (paper: 0.96 / 0.975). Feeds
            the default allocator ``CumulativeMassAllocator(tau)``.
        probe_recent_frac: fraction of the prompt used as recent probe queries, in [0, 1]
            (ZipCache: 0.05). Feeds the default ``ProbeScorer``.
        probe_random_frac: fraction drawn at random as probe queries, in [0, 1] (ZipCache: 0.05).
        probe_cap: cap on each of the recent and random probe counts, >= 1, or None for the
            uncapped fractions (ZipCache). Default 64: from 1,280 tokens on, 64 + 64 probe
            rows, so that scoring stays within ~1-2 % of dense attention (uncapped, 10 % of the
            rows cost ~20 % of dense attention at 128k on an H200, more than the sparse
            attention they plan; not in the paper; docs/decisions.md#probe-cap).
        bits_high: bit width of important tokens in the cache, one of 2, 4, 8, 16 (paper: 4).
        bits_low: bit width of the other tokens, <= bits_high (paper: 2). 16/16 stores the cache
            unquantized (``IdentityKVQuantizer``).
        quant_impl: write path of the default quantizers' token-wise (value) quantization:
            ``Impl.REFERENCE`` (PyTorch, anywhere) or ``Impl.TRITON`` (fused kernel; CUDA, or the
            CPU under ``TRITON_INTERPRET=1``; raises elsewhere).
        recompress_every: decode block size: every this many generated tokens the newest block
            is split and quantized (paper: 100), >= 1.
        sink_tokens: leading prompt tokens always selected and stored at full precision, >= 0
            (not in the paper; default 0).
        dense_layers: layers that run dense prefill attention (not in the paper; default none).
        sparse_prefill: False runs every layer dense in prefill (quantization-only baselines).
        impl: ``sparse_attention`` implementation (``Impl.AUTO`` default: the sdpa path on the
            fastest SDPA backend measured per shape bucket; ``Impl.SDPA``, ``Impl.FLEX``,
            ``Impl.REFERENCE``).
        unkept: ``"zero"``: unselected queries get no attention output (ZipVL,
            docs/decisions.md#unkept-queries); ``"attend"``: they attend to the selected keys.
        scorer: explicit ``Scorer`` (None: ``ProbeScorer`` from the probe settings).
        allocator: explicit ``Allocator`` (None: ``CumulativeMassAllocator(tau)``).
        selector: explicit prefill ``Selector`` (None: ``TopKSelector(sink_tokens=...)``, which
            always keeps the last prompt token).
        quantizer: explicit ``KVQuantizer`` (None: mixed ZipCache quantizers at
            ``bits_high`` / ``bits_low``).
        decode_selector: selector of the decode blocks (None: the cache's default, a top-p
            selector without forced tokens, as in Algorithm 1).
        decode_impl: how decode reads paged cache layers, in ``ZipVLAttention``,
            ``zipvl_attention`` and transformers models under ``zipvl.enable`` alike:
            ``"triton"`` (``zipvl.decode``'s fused kernel over the pages: one launch per layer;
            raises where it cannot run: not CUDA, a multi-token step, a head dim it cannot
            read), ``"reference"`` (dequantize every page, attend in float32) or ``"auto"``
            (default: the fused kernel where it can run, the reference elsewhere). Layers
            whose quantizer has no paged layout (KIVI, per-token, 16-bit) are stored in chunks
            and read densely; ``cache.report()`` says which.
        plan_impl: how the prefill plan (score -> allocate -> select) runs: ``"graph"``
            replays it from a CUDA graph captured per prompt shape (one host read per layer,
            about one launch instead of sixty; raises where it cannot run: not CUDA, padded
            rows, a cross-process reduction), ``"torch"`` runs it eagerly, ``"auto"``
            (default) replays where ``zipvl.sparsity.plan_graph.graph_plan_problem`` allows it
            (prompts up to ``GRAPH_MAX_TOKENS``, the default components) and runs eagerly
            elsewhere.
        page_size: tokens per page of the paged cache (a multiple of 16): one quantization
            group of keys; tokens wait at full precision until their class fills a page.
        code_order: how the paged cache lays out a page's codes (``PageFormat.code_order``):
            ``"auto"`` (default; the fragment order of the fastest decode kernel where the head
            dim and page size are 128 and the bits 4/2, "slice" elsewhere), ``"slice"`` or
            ``"fragment"`` (raises where it does not apply, when the cache is built).
        page_write_impl: how the paged cache quantizes and writes pages (the prompt commit and
            every decode block): ``"triton"`` (one launch per precision class,
            ``zipvl.cache.page_triton``; raises where it cannot run: not CUDA, a page size or
            head dim that is not a power of two), ``"reference"`` (PyTorch, about 130 small
            operations per class) or ``"auto"`` (default: Triton for CUDA stores it can
            write, PyTorch elsewhere). Both store the same bytes.
        layers: per-layer overrides ``{layer_idx: {field: value}}``; fields from
            ``LAYER_OVERRIDE_FIELDS``. Stored read-only.
    """

    tau: float = 0.975
    probe_recent_frac: float = 0.05
    probe_random_frac: float = 0.05
    probe_cap: int | None = 64
    bits_high: int = 4
    bits_low: int = 2
    quant_impl: Impl = Impl.REFERENCE
    recompress_every: int = 100
    sink_tokens: int = 0
    dense_layers: frozenset[int] = frozenset()
    sparse_prefill: bool = True
    impl: Impl = Impl.AUTO
    unkept: Literal["zero", "attend"] = "zero"
    scorer: Scorer | None = None
    allocator: Allocator | None = None
    selector: Selector | None = None
    quantizer: KVQuantizer | None = None
    decode_selector: Selector | None = None
    decode_impl: Impl = Impl.AUTO
    plan_impl: Impl = Impl.AUTO
    page_size: int = 128
    code_order: str = "auto"
    page_write_impl: Impl = Impl.AUTO
    layers: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate_settings()
        dense = self.dense_layers
        if isinstance(dense, (str, bytes)) or not isinstance(dense, Iterable):
            raise TypeError(
                f"dense_layers: expected a set of layer indices, got {type(dense).__name__}"
            )
        dense = frozenset(dense)
        for i in dense:
            check_int("dense_layers entry", i, 0)
        object.__setattr__(self, "dense_layers", dense)
        if not isinstance(self.layers, Mapping):
            raise TypeError(
                "layers: expected a mapping {layer_idx: {field: value}}, "
                f"got {type(self.layers).__name__}"
            )
        frozen: dict[int, Mapping[str, Any]] = {}
        for idx, override in self.layers.items():
            check_int("layers key", idx, 0)
            if not isinstance(override, Mapping):
                raise TypeError(
                    f"layers[{idx}]: expected a mapping of field overrides, "
                    f"got {type(override).__name__}"
                )
            unknown = sorted(set(override) - LAYER_OVERRIDE_FIELDS)
            if unknown:
                raise ValueError(
                    f"layers[{idx}]: unknown override field(s) {unknown}; expected fields from "
                    f"{sorted(LAYER_OVERRIDE_FIELDS)}"
                )
            frozen[idx] = MappingProxyType(dict(override))
        object.__setattr__(self, "layers", MappingProxyType(frozen))
        # resolve every overridden layer once so that a bad override fails here, not mid-forward
        for idx in frozen:
            try:
                self.for_layer(idx)
            except (TypeError, ValueError) as err:
                raise type(err)(f"layers[{idx}]: {err}") from err

    def _validate_settings(self) -> None:
        check_fraction("tau", self.tau)
        check_fraction("probe_recent_frac", self.probe_recent_frac, low_open=False)
        check_fraction("probe_random_frac", self.probe_random_frac, low_open=False)
        if self.probe_recent_frac + self.probe_random_frac == 0 and self.scorer is None:
            raise ValueError(
                "probe_recent_frac, probe_random_frac: expected at least one > 0 so that the "
                "default ProbeScorer has probes, got 0 and 0"
            )
        check_int("probe_cap", self.probe_cap, 1, optional=True)
        for name in ("bits_high", "bits_low"):
            bits = getattr(self, name)
            if isinstance(bits, bool) or bits not in _BITS:
                raise ValueError(f"{name}: expected one of {_BITS}, got {bits!r}")
        if self.bits_low > self.bits_high:
            raise ValueError(
                f"bits_low: expected <= bits_high ({self.bits_high}), got {self.bits_low}"
            )
        check_int("recompress_every", self.recompress_every, 1)
        check_int("sink_tokens", self.sink_tokens, 0)
        if not isinstance(self.sparse_prefill, bool):
            raise TypeError(
                f"sparse_prefill: expected a bool, got {type(self.sparse_prefill).__name__}"
            )
        for name, allowed in (
            ("impl", SPARSE_ATTENTION_IMPLS),
            ("quant_impl", QUANT_IMPLS),
            ("decode_impl", DECODE_IMPLS),
            ("plan_impl", PLAN_IMPLS),
            ("page_write_impl", PAGE_WRITE_IMPLS),
        ):
            object.__setattr__(self, name, parse_impl(name, getattr(self, name), allowed))
        if self.unkept not in _UNKEPT:
            raise ValueError(f"unkept: expected one of {_UNKEPT}, got {self.unkept!r}")
        check_int("page_size", self.page_size, 16)
        if self.page_size % 16:
            raise ValueError(f"page_size: expected a multiple of 16, got {self.page_size}")
        if self.code_order not in CODE_ORDERS:
            raise ValueError(f"code_order: expected one of {CODE_ORDERS}, got {self.code_order!r}")
        for name in ("scorer", "allocator", "selector", "decode_selector"):
            _check_callable(name, getattr(self, name))
        if self.quantizer is not None and not isinstance(self.quantizer, KVQuantizer):
            raise TypeError(
                "quantizer: expected a KVQuantizer (quantize / dequantize / bytes_per_token), "
                f"got {type(self.quantizer).__name__}"
            )
        defaults = _DEFAULTS
        for component, settings in _FEEDS.items():
            if getattr(self, component) is None:
                continue
            for s in settings:
                if getattr(self, s) != defaults[s]:
                    raise ValueError(
                        f"{s}: only feeds the default {component}, but {component} is given "
                        f"explicitly ({getattr(self, component)!r}); set it on the component "
                        f"instead, got {s}={getattr(self, s)!r}"
                    )

    # ------------------------------------------------------------------ resolution
    def for_layer(self, layer_idx: int) -> LayerConfig:
        """Resolve the components of one layer (per-layer overrides applied).

        Args:
            layer_idx: layer index, >= 0.

        Returns:
            The ``LayerConfig`` of that layer.

        Raises:
            ValueError: negative ``layer_idx`` or an invalid override value.

        Resolved once: the result is kept on this (immutable) config, so every forward of a
        layer reuses the same components.
        """
        check_int("layer_idx", layer_idx, 0)
        resolved: dict[int, LayerConfig] = self.__dict__.setdefault("_resolved", {})
        hit = resolved.get(layer_idx)
        if hit is not None:
            return hit
        resolved[layer_idx] = layer = self._resolve(layer_idx)
        return layer

    def _resolve(self, layer_idx: int) -> LayerConfig:
        cfg = self
        override = self.layers.get(layer_idx)
        if override:
            # an override of a setting replaces the global component built from it
            changes = dict(override)
            for component, settings in _FEEDS.items():
                if component not in changes:
                    if any(s in changes for s in settings):
                        changes[component] = None  # rebuilt from the overridden settings
                elif changes[component] is not None:
                    # an explicit per-layer component: the global settings no longer feed it
                    for s in settings:
                        changes.setdefault(s, _DEFAULTS[s])
            cfg = dataclasses.replace(self, layers={}, **changes)
        scorer = cfg.scorer
        if scorer is None:
            scorer = ProbeScorer(
                recent_frac=cfg.probe_recent_frac,
                random_frac=cfg.probe_random_frac,
                max_recent=cfg.probe_cap,
                max_random=cfg.probe_cap,
            )
        allocator = (
            cfg.allocator if cfg.allocator is not None else CumulativeMassAllocator(cfg.tau)
        )
        # a schedule is resolved here, once, to the layer's own allocator
        allocator = layer_allocator(allocator, layer_idx)
        selector = cfg.selector
        if selector is None:
            selector = TopKSelector(sink_tokens=cfg.sink_tokens)
        quantizer = cfg.quantizer
        if quantizer is None:
            quantizer = _default_quantizer(cfg.bits_high, cfg.bits_low, cfg.quant_impl)
        return LayerConfig(
            layer_idx=layer_idx,
            dense=(not cfg.sparse_prefill) or layer_idx in self.dense_layers,
            scorer=scorer,
            allocator=allocator,
            selector=selector,
            quantizer=quantizer,
            impl=cfg.impl,
            unkept=cfg.unkept,
            plan_impl=cfg.plan_impl,
        )

    def check_num_layers(self, num_layers: int) -> None:
        """Check that ``dense_layers`` and ``layers`` only name layers of a model.

        Args:
            num_layers: L, the model's attention layers.

        Raises:
            ValueError: a layer index >= ``num_layers``.
        """
        check_int("num_layers", num_layers, 1)
        for name, idxs in (("dense_layers", self.dense_layers), ("layers", self.layers.keys())):
            bad = sorted(i for i in idxs if i >= num_layers)
            if bad:
                raise ValueError(
                    f"{name}: expected layer indices < num_layers={num_layers}, got {bad}"
                )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible description: settings as values, components as
        ``{"type": ClassName, "fields": {...}}`` (style C3).

        Raises:
            TypeError: a component is not in ``SERIALIZABLE_COMPONENTS`` (e.g. a plain function).
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "layers":
                out["layers"] = {
                    str(i): {k: _encode(v, f"layers[{i}].{k}") for k, v in o.items()}
                    for i, o in sorted(value.items())
                }
            else:
                out[f.name] = _encode(value, f.name)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, components: Iterable[type] = ()) -> ZipVLConfig:
        """Rebuild a config written by ``to_dict``; class names resolve through
        ``SERIALIZABLE_COMPONENTS`` and the user's own ``components`` (no import paths).

        Args:
            data: what ``to_dict`` wrote.
            components: your own component classes (dataclasses) that ``data`` names.

        Raises:
            ValueError: an unknown field or component type.
        """
        extra = {c.__name__: c for c in components}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"data: unknown ZipVLConfig field(s) {unknown}")
        kwargs = {k: _decode(v, k, extra) for k, v in data.items() if k != "layers"}
        layers = data.get("layers", {})
        kwargs["layers"] = {
            int(i): {k: _decode(v, f"layers[{i}].{k}", extra) for k, v in o.items()}
            for i, o in layers.items()
        }
        return cls(**kwargs)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ZipVLConfig:
        """A named preset from ``PRESETS``, optionally with fields replaced.

        Args:
            name: one of ``PRESETS`` ("zipvl", "zipvl-fast", "fixed", "kivi", "dense").
            **overrides: fields to replace (``dataclasses.replace``), e.g. ``recompress_every``.

        Returns:
            The config.

        Raises:
            ValueError: unknown ``name`` (the message lists the presets) or a bad override.
        """
        if name not in PRESETS:
            raise ValueError(f"name: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        cfg = PRESETS[name]()
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    def describe(self) -> str:
        """One line naming the settings and components (for logs and the demo)."""
        layer = self.for_layer(0)
        parts = [
            f"tau={self.tau}" if self.allocator is None else f"allocator={layer.allocator!r}",
            f"kv={self.bits_high}/{self.bits_low}-bit"
            if self.quantizer is None
            else f"quantizer={type(layer.quantizer).__name__}",
            f"recompress_every={self.recompress_every}",
            f"impl={self.impl.value}",
        ]
        if not self.sparse_prefill:
            parts.append("dense prefill")
        if self.dense_layers:
            parts.append(f"dense_layers={sorted(self.dense_layers)}")
        if self.layers:
            parts.append(f"overrides for layers {sorted(self.layers)}")
        return ", ".join(parts)


_DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(ZipVLConfig)
    if f.default is not dataclasses.MISSING
}


PRESETS: Mapping[str, Callable[[], ZipVLConfig]] = MappingProxyType(
    {
        # the paper's accurate setting (video experiments): tau 0.975, 4/2-bit cache
        "zipvl": lambda: ZipVLConfig(),
        # the paper's faster setting
        "zipvl-fast": lambda: ZipVLConfig(tau=0.96),
        # Table 3's fixed-ratio ablation: the same kept ratio (42.1 %) for every layer and input
        "fixed": lambda: ZipVLConfig(allocator=FixedRatioAllocator(0.42)),
        # quantization only: dense prefill, KIVI 2-bit cache (group 32) with a 128-token
        # full-precision residual (the cache's tail, flushed in blocks of recompress_every)
        "kivi": lambda: ZipVLConfig(
            sparse_prefill=False, quantizer=KIVIKVQuantizer(2, 32), recompress_every=128
        ),
        # identity: tau 1 keeps every token, 16-bit storage; token-identical to the model
        "dense": lambda: ZipVLConfig(tau=1.0, bits_high=16, bits_low=16),
    }
)
"""Named presets: name -> constructor (style C3)."""


SERIALIZABLE_COMPONENTS: Mapping[str, type] = MappingProxyType(
    {
        cls.__name__: cls
        for cls in (
            ProbeScorer,
            AccumulatedAttentionScorer,
            SnapKVScorer,
            KeyNormScorer,
            CumulativeMassAllocator,
            FixedRatioAllocator,
            PerLayerSchedule,
            TopKSelector,
            IdentityKVQuantizer,
            ZipCacheKVQuantizer,
            KIVIKVQuantizer,
            PerTokenKVQuantizer,
            MixedPrecisionKVQuantizer,
        )
    }
)
"""The allow-list of component classes ``ZipVLConfig.from_dict`` may build."""

_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
)


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, Impl):  # before str: Impl is a str enum
        return {"type": "Impl", "value": value.value}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
        if name not in _DTYPES:
            raise TypeError(f"{where}: cannot serialise dtype {value}")
        return {"type": "dtype", "value": name}
    if isinstance(value, (frozenset, set)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    cls = type(value)
    # the project's components, and any user component that is a dataclass (rebuilt by
    # from_dict(components=...): class names, never import paths)
    registered = SERIALIZABLE_COMPONENTS.get(cls.__name__)
    if dataclasses.is_dataclass(value) and registered in (cls, None):
        fields = {
            f.name: _encode(getattr(value, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(value)
            if f.init
        }
        return {"type": cls.__name__, "fields": fields}
    raise TypeError(
        f"{where}: cannot serialise {value!r}; expected a setting value or a dataclass "
        f"component (the project's SERIALIZABLE_COMPONENTS or your own)"
    )


def _decode(value: Any, where: str, extra: Mapping[str, type] | None = None) -> Any:
    if isinstance(value, list):
        return [_decode(v, f"{where}[{i}]", extra) for i, v in enumerate(value)]
    if not isinstance(value, Mapping):
        return value
    kind = value.get("type")
    if kind == "Impl":
        return parse_impl(f"{where}.value", value.get("value"), tuple(Impl))
    if kind == "dtype":
        if value.get("value") not in _DTYPES:
            raise ValueError(f"{where}: unknown dtype {value.get('value')!r}")
        return _DTYPES[value["value"]]
    known = {**SERIALIZABLE_COMPONENTS, **(extra or {})}
    cls = known.get(str(kind))
    if cls is None:
        raise ValueError(
            f"{where}: unknown component type {kind!r}; expected one of {sorted(known)} (pass "
            f"your own classes as from_dict(data, components=[...]))"
        )
    fields = {k: _decode(v, f"{where}.{k}", extra) for k, v in value.get("fields", {}).items()}
    return cls(**fields)
