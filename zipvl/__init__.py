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
"""

from __future__ import annotations

from zipvl.cache import CacheReport, LayerReport, ZipVLCache, ZipVLCacheLayer
from zipvl.config import ZipVLConfig
from zipvl.decode import decode_attention
from zipvl.models import ZipVLAttention, disable, enable, new_cache, zipvl_attention
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

__all__ = [
    "AccumulatedAttentionScorer",
    "CacheReport",
    "CumulativeMassAllocator",
    "FixedRatioAllocator",
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
    "decode_attention",
    "disable",
    "enable",
    "new_cache",
    "plan_tokens",
    "select_tokens",
    "sparse_attention",
    "zipvl_attention",
]
