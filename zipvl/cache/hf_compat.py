"""The one module of zipvl that imports transformers (style rule A3).

transformers restructured ``cache_utils`` twice in 2025 (per-layer ``CacheLayerMixin`` objects,
then the ``crop(-n)`` convention and ``get_max_cache_shape`` -> ``get_max_length``). This module
checks the installed version against the range zipvl is tested with and re-exports every
transformers name zipvl uses, so that no other module imports transformers itself and a future
break is fixed here only (``tests/test_layering.py`` enforces it):

* the cache and attention API (``Cache``, ``CacheLayerMixin``, ``DynamicCache``,
  ``AttentionInterface``, ``AttentionMaskInterface``), imported with this module;
* the model, config, processor and generation classes (``LlavaForConditionalGeneration``,
  ``Qwen2Config``, ``AutoProcessor``, ``LogitsProcessor``, ...), loaded on first use (PEP 562)
  so that importing the cache does not load every supported architecture's modeling code.

Tested range: transformers >= 5.17, < 6 (CI: the newest 5.x, and 5.17 for the transformers tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import transformers
from packaging.version import Version
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

if TYPE_CHECKING:  # the static view of the lazy names below
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaProcessor,
        LogitsProcessor,
        LogitsProcessorList,
        PreTrainedModel,
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        SiglipVisionConfig,
    )


__all__ = [
    "MAX_VERSION",
    "MIN_VERSION",
    "TRANSFORMERS_VERSION",
    "AttentionInterface",
    "AttentionMaskInterface",
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoProcessor",
    "AutoTokenizer",
    "CLIPImageProcessor",
    "CLIPVisionConfig",
    "Cache",
    "CacheLayerMixin",
    "DynamicCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlavaConfig",
    "LlavaForConditionalGeneration",
    "LlavaNextConfig",
    "LlavaNextForConditionalGeneration",
    "LlavaOnevisionConfig",
    "LlavaOnevisionForConditionalGeneration",
    "LlavaProcessor",
    "LogitsProcessor",
    "LogitsProcessorList",
    "PreTrainedModel",
    "PreTrainedTokenizerFast",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "Qwen2VLConfig",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLConfig",
    "Qwen2_5_VLForConditionalGeneration",
    "SiglipVisionConfig",
    "check_transformers_version",
]
_EAGER = (
    "MAX_VERSION",
    "MIN_VERSION",
    "TRANSFORMERS_VERSION",
    "AttentionInterface",
    "AttentionMaskInterface",
    "Cache",
    "CacheLayerMixin",
    "DynamicCache",
    "check_transformers_version",
)
LAZY_NAMES: frozenset[str] = frozenset(__all__) - frozenset(_EAGER)
"""transformers' top-level names re-exported here on first use."""


def __getattr__(name: str) -> Any:
    """Load a model, config, processor or generation class of transformers on first use."""
    if name in LAZY_NAMES:
        value = getattr(transformers, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MIN_VERSION = Version("5.17")
MAX_VERSION = Version("6")  # exclusive


def check_transformers_version(version: str) -> Version:
    """Parse ``version`` and check it lies in ``[MIN_VERSION, MAX_VERSION)``.

    Args:
        version: a transformers version string, e.g. ``"5.23.0"`` or ``"5.18.0.dev0"``.

    Returns:
        The parsed version.

    Raises:
        ImportError: the version is outside the supported range (the Cache API differs there).
    """
    parsed = Version(version)
    # compare the release tuple so that 5.17.0.dev0 (a pre-release of a supported API) passes
    release = Version(".".join(str(p) for p in parsed.release))
    if not (MIN_VERSION <= release < MAX_VERSION):
        raise ImportError(
            f"zipvl.cache: transformers version must be >= {MIN_VERSION} and < {MAX_VERSION} "
            f"(the per-layer Cache API zipvl is written against), got {version}"
        )
    return parsed


TRANSFORMERS_VERSION: Version = check_transformers_version(transformers.__version__)
