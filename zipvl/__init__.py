"""zipvl: adaptive token-sparse prefill and mixed-precision KV caches for vision-language models.

Implements ZipVL (He et al., arXiv 2410.08584 v1) as composable PyTorch components:

* ``zipvl.sparsity``: importance scorers -> ratio allocators -> token selectors -> BlockMasks
  -> token-sparse attention (prefill);
* ``zipvl.quant``: quantization spec, primitives and KV quantizers (4/2-bit mixed precision);
* ``zipvl.cache``: ``ZipVLCache``, a transformers ``Cache`` with append-only packed chunks;
* ``zipvl.decode``: decode attention that reads the packed cache directly (fused Triton);
* ``zipvl.models``: ``ZipVLAttention`` for custom stacks, a reference decoder, and
  ``enable`` / ``disable`` for transformers LVLMs.

Only the names in ``__all__`` are public API.

Importing ``zipvl`` is cheap: the public names and the subpackages (``zipvl.eval``,
``zipvl.sparsity``, ...) load on first use (PEP 562), so that ``import zipvl.sparsity`` or
``import zipvl.quant`` never imports transformers, and the transformers integration is loaded
only when one of its names (``enable``, ``ZipVLCache``, ...) is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the static view of the lazy names below
    from zipvl.cache import CacheReport, LayerReport, ZipVLCache, ZipVLCacheLayer
    from zipvl.config import ZipVLConfig
    from zipvl.decode import decode_attention
    from zipvl.models import (
        GraphDecoder,
        ZipVLAttention,
        cache_kwargs,
        cuda_graph_decode,
        disable,
        enable,
        new_cache,
        zipvl_attention,
    )
    from zipvl.quant import (
        IdentityKVQuantizer,
        KIVIKVQuantizer,
        KVQuantizer,
        MixedPrecisionKVQuantizer,
        PerTokenKVQuantizer,
        QuantizedKV,
        QuantSpec,
        ZipCacheKVQuantizer,
    )
    from zipvl.sparsity import (
        AccumulatedAttentionScorer,
        CumulativeMassAllocator,
        FixedRatioAllocator,
        KeyNormScorer,
        PerLayerSchedule,
        ProbeScorer,
        Selection,
        SnapKVScorer,
        TopKSelector,
        plan_tokens,
        select_tokens,
        sparse_attention,
    )

__version__ = "0.1.0"

_LAZY: dict[str, tuple[str, ...]] = {
    "zipvl.cache": ("CacheReport", "LayerReport", "ZipVLCache", "ZipVLCacheLayer"),
    "zipvl.config": ("ZipVLConfig",),
    "zipvl.decode": ("decode_attention",),
    "zipvl.models": (
        "GraphDecoder",
        "ZipVLAttention",
        "cache_kwargs",
        "cuda_graph_decode",
        "disable",
        "enable",
        "new_cache",
        "zipvl_attention",
    ),
    "zipvl.quant": (
        "IdentityKVQuantizer",
        "KIVIKVQuantizer",
        "KVQuantizer",
        "MixedPrecisionKVQuantizer",
        "PerTokenKVQuantizer",
        "QuantizedKV",
        "QuantSpec",
        "ZipCacheKVQuantizer",
    ),
    "zipvl.sparsity": (
        "AccumulatedAttentionScorer",
        "CumulativeMassAllocator",
        "FixedRatioAllocator",
        "KeyNormScorer",
        "PerLayerSchedule",
        "ProbeScorer",
        "Selection",
        "SnapKVScorer",
        "TopKSelector",
        "plan_tokens",
        "select_tokens",
        "sparse_attention",
    ),
}
_ATTR_MODULE: dict[str, str] = {name: mod for mod, names in _LAZY.items() for name in names}

SUBMODULES = frozenset(
    {
        "cache",
        "checks",
        "cli",
        "config",
        "decode",
        "demo",
        "demo_args",
        "eval",
        "impl",
        "models",
        "paged_decode_triton",
        "plotting",
        "quant",
        "sparsity",
        "testing",
        "types",
    }
)
"""Subpackages and modules reachable as attributes after a bare ``import zipvl``."""


def __getattr__(name: str) -> Any:
    """Load a public name or a submodule on first use (PEP 562)."""
    module = _ATTR_MODULE.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in SUBMODULES:
        return importlib.import_module(f"zipvl.{name}")  # the import binds it on the package
    raise AttributeError(f"module 'zipvl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_ATTR_MODULE, *SUBMODULES})


__all__ = [
    "AccumulatedAttentionScorer",
    "CacheReport",
    "CumulativeMassAllocator",
    "FixedRatioAllocator",
    "GraphDecoder",
    "IdentityKVQuantizer",
    "KIVIKVQuantizer",
    "KVQuantizer",
    "KeyNormScorer",
    "LayerReport",
    "MixedPrecisionKVQuantizer",
    "PerLayerSchedule",
    "PerTokenKVQuantizer",
    "ProbeScorer",
    "QuantSpec",
    "QuantizedKV",
    "Selection",
    "SnapKVScorer",
    "TopKSelector",
    "ZipCacheKVQuantizer",
    "ZipVLAttention",
    "ZipVLCache",
    "ZipVLCacheLayer",
    "ZipVLConfig",
    "__version__",
    "cache_kwargs",
    "cuda_graph_decode",
    "decode_attention",
    "disable",
    "enable",
    "new_cache",
    "plan_tokens",
    "select_tokens",
    "sparse_attention",
    "zipvl_attention",
]
