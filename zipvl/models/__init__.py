"""ZipVL in models: the attention layer, a reference decoder and the transformers integration.

* ``ZipVLAttention`` / ``zipvl_attention`` / ``make_cache`` (``attention.py``): for custom stacks;
* ``llama.py``: a single-file reference decoder (gpt-fast style) built on ``ZipVLAttention``;
* ``enable`` / ``disable`` / ``new_cache`` (``hf.py``): transformers models through the public
  ``AttentionInterface`` and ``AttentionMaskInterface``;
* ``GraphDecoder`` / ``cuda_graph_decode`` (``captured.py``): a transformers model's decode step
  recorded once in a CUDA graph and replayed (ZipVL's cache or transformers' StaticCache);
* ``cache_kwargs`` (``cache_arg.py``): the keyword (``cache=`` or ``past_key_values=``) under
  which the installed transformers' ``generate`` / ``forward`` take a cache.

The tiny models built in code for tests and the demo are in ``zipvl.testing.lvlm`` and
``zipvl.testing.demo_lvlm``.
"""

from __future__ import annotations

from zipvl.models.attention import (
    PrefillResult,
    ZipVLAttention,
    decode_attention,
    dense_causal_attention,
    make_cache,
    prefill_attention,
    retained_attention_mass,
    zipvl_attention,
)
from zipvl.models.cache_arg import cache_argument, cache_kwargs
from zipvl.models.captured import GraphDecoder, cuda_graph_decode
from zipvl.models.hf import (
    SUPPORTED_MODELS,
    disable,
    enable,
    is_enabled,
    new_cache,
    recording,
)

__all__ = [
    "SUPPORTED_MODELS",
    "GraphDecoder",
    "PrefillResult",
    "ZipVLAttention",
    "cache_argument",
    "cache_kwargs",
    "cuda_graph_decode",
    "decode_attention",
    "dense_causal_attention",
    "disable",
    "enable",
    "is_enabled",
    "make_cache",
    "new_cache",
    "prefill_attention",
    "recording",
    "retained_attention_mass",
    "zipvl_attention",
]
