"""The decode side of ZipVL: a mixed-precision KV cache usable as a transformers ``Cache``.

* ``ZipVLCache``: per-layer ``ZipVLCacheLayer`` objects (fp sinks, append-only quantized chunks,
  fp tail), the prefill commit (``compress_prefill``) and the decode-time re-compression
  (``compress_tail``) of ZipVL's Algorithm 1.
* ``CacheReport`` / ``LayerReport``: kept ratio, attention-FLOP reduction and memory.
* ``last_query_mass``: the decode-block importance score.

``hf_compat`` is the only module of zipvl that imports transformers.
"""

from __future__ import annotations

from zipvl.cache.cache import ZipVLCache
from zipvl.cache.layer import ZipVLCacheLayer
from zipvl.cache.paged import PagedKVStore, PageFormat
from zipvl.cache.paged_layer import PagedCacheLayer
from zipvl.cache.report import CacheReport, LayerReport
from zipvl.cache.scoring import last_query_mass

__all__ = [
    "CacheReport",
    "LayerReport",
    "PageFormat",
    "PagedCacheLayer",
    "PagedKVStore",
    "ZipVLCache",
    "ZipVLCacheLayer",
    "last_query_mass",
]
