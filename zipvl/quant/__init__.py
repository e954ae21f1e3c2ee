"""KV-cache quantization: spec -> primitives -> quantizers (ZipVL's mixed 4/2-bit cache).

Public surface:
    * ``QuantSpec`` (one axis convention: the axis the scale is shared along);
    * pure primitives ``choose_qparams``, ``quantize``, ``dequantize``, ``pack``, ``unpack``,
      ``pack_bitmap``, ``unpack_bitmap`` and the fused write path ``quantize_pack(impl=)``;
    * the ``KVQuantizer`` protocol, the ``QuantizedKV`` chunk container and the quantizers
      ``IdentityKVQuantizer``, ``ZipCacheKVQuantizer``, ``KIVIKVQuantizer``,
      ``PerTokenKVQuantizer``, ``MixedPrecisionKVQuantizer``.
"""

from __future__ import annotations

from .base import KVPart, KVQuantizer, QuantizedKV, QuantizedTensor, keep_order
from .ops import quantize_pack
from .primitives import (
    choose_qparams,
    dequantize,
    grouped_view,
    pack,
    pack_bitmap,
    quantize,
    round_param,
    unpack,
    unpack_bitmap,
)
from .quantizers import (
    IdentityKVQuantizer,
    KIVIKVQuantizer,
    MixedPrecisionKVQuantizer,
    PerTokenKVQuantizer,
    ZipCacheKVQuantizer,
    quantize_tensor,
)
from .spec import PARAM_DTYPES, SUPPORTED_BITS, QuantSpec

__all__ = [
    "PARAM_DTYPES",
    "SUPPORTED_BITS",
    "IdentityKVQuantizer",
    "KIVIKVQuantizer",
    "KVPart",
    "KVQuantizer",
    "MixedPrecisionKVQuantizer",
    "PerTokenKVQuantizer",
    "QuantSpec",
    "QuantizedKV",
    "QuantizedTensor",
    "ZipCacheKVQuantizer",
    "choose_qparams",
    "dequantize",
    "grouped_view",
    "keep_order",
    "pack",
    "pack_bitmap",
    "quantize",
    "quantize_pack",
    "quantize_tensor",
    "round_param",
    "unpack",
    "unpack_bitmap",
]
