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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    "attention_function",
    "check_transformers_version",
    "local_kv_heads",
    "tensor_parallel",
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
    "attention_function",
    "check_transformers_version",
    "local_kv_heads",
    "tensor_parallel",
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


def tensor_parallel(model: Any) -> tuple[int, Any] | None:
    """The tensor-parallel degree and process group of a model transformers sharded, or None.

    ``from_pretrained(tp_plan="auto")`` (or ``distributed_config=DistributedConfig(...)``) sets,
    on the model it returns, ``tp_size`` (a property over ``_tp_size``) and ``_device_mesh``:
    in 5.17 the 1-D tensor-parallel mesh, in 5.24 the (pp, fsdp, tp) mesh whose ``"tp"``
    dimension is the tensor-parallel one (both versions name it ``"tp"`` when the mesh has
    several dimensions). A model that was not sharded has ``tp_size`` None (or 1).

    Args:
        model: a transformers model (the one ``from_pretrained`` returned: its language model
            does not carry the attributes).

    Returns:
        (tp_size, group): the degree and the ``torch.distributed`` group of the ranks that
        share the model's heads; None when the model is not tensor-parallel.

    Raises:
        ValueError: ``tp_size`` > 1 but no device mesh with a tensor-parallel dimension.
    """
    size = getattr(model, "tp_size", None)
    if not isinstance(size, int) or size <= 1:
        return None
    mesh = getattr(model, "_device_mesh", None)
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if mesh is not None and "tp" in names:
        mesh = mesh["tp"]
    elif mesh is None or mesh.ndim != 1:
        raise ValueError(
            f"model: expected a tensor-parallel device mesh (a 1-D mesh or one with a 'tp' "
            f"dimension) on a model with tp_size={size}, got {mesh!r}"
        )
    return size, mesh.get_group()


def local_kv_heads(decoder: Any) -> dict[int, int]:
    """The KV heads this process holds, per layer, read from the key projections.

    A transformers attention module has ``layer_idx``, ``head_dim`` and a ``k_proj`` linear
    whose output is the keys of its KV heads. Under tensor parallelism the weight is a
    ``DTensor`` sharded over the heads (rows); its local shard holds this process's heads.

    Args:
        decoder: the language model (``get_decoder()``).

    Returns:
        {layer_idx: local KV heads}; empty when no attention module has that layout (then only
        the check at the first forward applies).
    """
    heads: dict[int, int] = {}
    for module in decoder.modules():
        layer_idx = getattr(module, "layer_idx", None)
        head_dim = getattr(module, "head_dim", None)
        weight = getattr(getattr(module, "k_proj", None), "weight", None)
        if not isinstance(layer_idx, int) or not isinstance(head_dim, int) or weight is None:
            continue
        local = weight.to_local() if hasattr(weight, "to_local") else weight  # DTensor shard
        heads[layer_idx] = int(local.shape[0]) // head_dim
    return heads


@contextmanager
def attention_function(model: Any, name: str, fn: Callable[..., Any]) -> Iterator[None]:
    """Run ``model``'s attention through ``fn`` (registered as ``name``, with SDPA's mask
    function) while inside; on exit the model's own implementation is back and ``name`` maps
    to SDPA again, so the global registry holds no reference to ``fn``."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, AttentionMaskInterface()["sdpa"])
    original = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(original)
        AttentionInterface.register(name, AttentionInterface()["sdpa"])
