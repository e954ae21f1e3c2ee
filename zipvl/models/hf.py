"""ZipVL inside transformers models: ``enable(model, config) -> ZipVLCache`` and ``disable``.

How it plugs in (public APIs only, style A4 -- no hooks, no patched globals, no attributes added
to the user's modules):

* an attention function is registered with ``AttentionInterface.register`` under a per-model
  name (``zipvl_<n>``) and the language model is switched to it with
  ``set_attn_implementation`` (vision towers keep their own attention). transformers' registry
  is global and has no public unregister, so ``disable`` -- or the model being garbage-collected
  (a ``weakref.finalize`` on the language model) -- rebinds the name to a raising stub: the
  function, its config and its cache do not outlive the model;
* a mask function is registered under the same name with ``AttentionMaskInterface.register``
  (transformers' own SDPA mask). Without it transformers would pass ``attention_mask=None``
  and silently drop causal and padding masking;
* transformers does not hand the cache to attention functions, so the registered
  function is a small callable object that holds the per-model state: the config and the
  ``ZipVLCache`` returned by ``enable`` (never the model itself). It checks on every call that
  the K/V it receives came from that cache (a ``DynamicCache`` or a missing cache raises a
  clear error).

Per layer, the function runs ZipVL prefill when the cache layer holds the freshly stored prompt
(query length == key length, pending commit): probe scoring with the padding mask respected,
Eq. 6 budget, selection, token-sparse attention, ``cache.compress_prefill`` (told which
positions are padding). Otherwise it runs dense SDPA over the returned K/V with transformers'
mask (padding included) and then ``cache.compress_tail`` with the same padding mask. Whenever
the selection keeps everything (tau = 1, dense layers), the exact SDPA call transformers itself
makes is used, so the "dense" preset is token-identical.

Supported: ``SUPPORTED_MODELS`` (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL,
Llama and Qwen2 text models); transformers 5.17 - 5.x.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from zipvl.cache import PagedCacheLayer, ZipVLCache
from zipvl.cache.hf_compat import (
    AttentionInterface,
    AttentionMaskInterface,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
    Qwen2VLForConditionalGeneration,
    local_kv_heads,
    tensor_parallel,
)
from zipvl.cache.paged_layer import DECODE
from zipvl.config import LayerConfig, ZipVLConfig
from zipvl.models.attention import (
    commit_prefill,
    make_cache,
    paged_decode,
    prefill_attention,
    retained_attention_mass,
)
from zipvl.models.cache_arg import cache_argument
from zipvl.sparsity.pipeline import AllReduceMass
from zipvl.types import MassReduce

__all__ = [
    "SUPPORTED_MODELS",
    "ForcedRun",
    "LayerTrace",
    "disable",
    "enable",
    "forced_generate",
    "is_enabled",
    "new_cache",
    "recording",
]

SUPPORTED_MODELS: tuple[type[PreTrainedModel], ...] = (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    LlamaForCausalLM,
    Qwen2ForCausalLM,
)
"""Architectures ``enable`` accepts (checked with ``isinstance``)."""

_PREFIX = "zipvl_"
_NAME_IDS = itertools.count()


@dataclass(frozen=True)
class LayerTrace:
    """What one layer's prefill did (recorded inside ``recording``).

    Attributes:
        layer_idx: the layer.
        kept_ratio: kept real tokens / real tokens.
        retained_mass: fraction of the full attention mass carried by the kept keys
            (``retained_attention_mass``), 1.0 for dense layers.
    """

    layer_idx: int
    kept_ratio: float
    retained_mass: float


@dataclass(frozen=True)
class HeadSplit:
    """How a model's KV heads are split over processes (tensor parallelism).

    Attributes:
        world_size: processes holding the heads of every layer (1: all heads are here).
        kv_heads: the model's KV heads per layer (``num_key_value_heads``).
        mass_reduce: the cross-process sum of the attention mass every cache of the model
            gets (None with one process).
    """

    world_size: int
    kv_heads: int
    mass_reduce: MassReduce | None = None

    @property
    def local_kv_heads(self) -> int:
        """KV heads per process."""
        return self.kv_heads // self.world_size


class _ZipVLAttentionFunction:
    """The attention function registered for one model; holds that model's ZipVL state."""

    def __init__(
        self,
        name: str,
        config: ZipVLConfig,
        num_layers: int,
        original: str,
        *,
        split: HeadSplit | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.num_layers = num_layers
        self.original = original
        self.split = split
        # every cache of this model gets it (new_cache too)
        self.mass_reduce = None if split is None else split.mass_reduce
        # every layer's components, resolved once here: a forward only indexes this tuple
        self.layers: tuple[LayerConfig, ...] = tuple(
            config.for_layer(i) for i in range(num_layers)
        )
        self.cache: ZipVLCache = self.new_cache()
        self.recorder: list[LayerTrace] | None = None
        self.retained_rows = 256
        sdpa = AttentionInterface()["sdpa"]
        self._sdpa: Callable[..., tuple[Tensor, Any]] = sdpa

    def new_cache(self) -> ZipVLCache:
        """A fresh cache for this model (its config, its ``mass_reduce``), with the prompt
        commit deferred by one layer (measured on an H200 with a 28-layer model: 0.89 against
        0.82 of the prefill's Amdahl bound at 8k, within 0.01 at 32k and 128k); the last
        layer commits at once, so nothing is pending when the forward returns."""
        return make_cache(
            self.config, self.num_layers, update_reads="none", mass_reduce=self.mass_reduce,
            defer_commit=True,
        )  # fmt: skip

    def __call__(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        """transformers' attention-function contract.

        Args:
            module: the attention module (its ``layer_idx`` picks the config and cache layer).
            query: (B, Hq, Sq, D) with RoPE applied.
            key: (B, Hkv, N, D), as returned by ``ZipVLCache.update``.
            value: (B, Hkv, N, Dv).
            attention_mask: None (causal, no padding) or (B, 1, Sq, N) bool, from the SDPA
                mask function registered alongside.
            dropout: must be 0 (inference only).
            scaling: the model's softmax scale.
            **kwargs: passed on to transformers' SDPA function on dense paths.

        Returns:
            ((B, Sq, Hq, Dv) attention output, None).
        """
        if module.training and dropout > 0:
            raise RuntimeError(
                "zipvl: ZipVL attention is inference-only; call model.eval() (got a module in "
                f"training mode with dropout={dropout})"
            )
        if kwargs.get("sliding_window") is not None:
            raise RuntimeError(
                f"zipvl: sliding-window attention layers are not supported, got "
                f"sliding_window={kwargs['sliding_window']}"
            )
        if kwargs.get("output_attentions", False):
            raise RuntimeError("zipvl: output_attentions=True is not supported by ZipVL attention")
        layer_idx = getattr(module, "layer_idx", None)
        if not isinstance(layer_idx, int):
            raise RuntimeError(
                f"zipvl: attention module {type(module).__name__} has no integer layer_idx"
            )
        cache = self.cache
        layer = cache.layer(layer_idx)
        if isinstance(layer, PagedCacheLayer) and layer.state == DECODE:
            # the cache appended the new K/V and returned them alone (``update_reads="none"``)
            if not layer.take_unread(key):
                raise RuntimeError(
                    f"zipvl: layer {layer_idx} received K/V that did not come from the "
                    "ZipVLCache bound to this model. While ZipVL is enabled, pass the cache "
                    "returned by zipvl.enable(model) (or zipvl.models.new_cache(model)) to "
                    f"generate() / forward as {cache_argument()}= (zipvl.cache_kwargs(model, "
                    "cache)); a DynamicCache, another cache or use_cache=False cannot be used."
                )
            _refuse_multi_token_step(query, layer.get_seq_length() - query.shape[-2])
            valid = None
            if layer_idx == 0 and not layer.mask_checked:
                # once per generation: the mask may only hide the prompt padding
                valid = _decode_key_valid(attention_mask, layer.get_seq_length())
                layer.mask_checked = True
            out = paged_decode(
                self.config.decode_impl, query, layer, key_valid=valid, scale=scaling
            )  # (B, Hq, Sq, D)
            return out.transpose(1, 2), None
        n_cached, n_in = layer.get_seq_length(), key.shape[-2]
        prefill = layer.has_pending_prefill and n_cached == n_in and query.shape[-2] == n_in
        # a decode step reads more positions than it brings (the layer held tokens before)
        decode = not layer.has_pending_prefill and n_cached == n_in > query.shape[-2]
        if not (prefill or decode):
            raise RuntimeError(
                f"zipvl: layer {layer_idx} received K/V of {n_in} positions that did not come "
                f"from the ZipVLCache bound to this model (it holds {n_cached}). While ZipVL is "
                "enabled, pass the cache returned by zipvl.enable(model) (or "
                "zipvl.models.new_cache(model) for a new conversation) to generate() / forward "
                f"as {cache_argument()}= (zipvl.cache_kwargs(model, cache)); a DynamicCache, "
                "another cache or use_cache=False cannot be used."
            )

        def dense(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            out, _ = self._sdpa(
                module, q, k, v, attention_mask, dropout=0.0, scaling=scaling, **kwargs
            )
            return out.transpose(1, 2)  # (B, Hq, S, Dv)

        if decode:
            _refuse_multi_token_step(query, n_in - query.shape[-2])
            out, _ = self._sdpa(
                module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs
            )  # (B, Sq, Hq, Dv)
            valid = _decode_key_valid(attention_mask, n_in)
            cache.compress_tail(layer_idx, query, keys=key, scale=scaling, key_valid=valid)
            return out, None

        if self.split is not None:
            _check_split(self.split, cache, key, layer_idx)
        key_valid = _key_valid_from_mask(attention_mask, query.shape[-2])
        lc = self.layers[layer_idx]
        res = prefill_attention(
            query, key, value, layer=lc, key_valid=key_valid, scale=scaling, dense=dense,
            mass_reduce=cache.mass_reduce,
        )  # fmt: skip
        if self.recorder is not None:
            retained = retained_attention_mass(
                query,
                key,
                res.keep,
                key_valid=key_valid,
                scale=scaling,
                max_rows=self.retained_rows,
            )
            self.recorder.append(LayerTrace(layer_idx, res.kept_ratio, retained))
        commit_prefill(cache, layer_idx, res, key_valid)
        return res.output.transpose(1, 2).contiguous(), None  # (B, S, Hq, Dv)


def _check_split(split: HeadSplit, cache: ZipVLCache, key: Tensor, layer_idx: int) -> None:
    """A prefill on a model whose heads are split: the K/V hold this process's share of the
    heads, and the cache was made for the same number of processes (shapes only, no sync).

    Raises:
        ValueError: either does not match.
    """
    if key.shape[1] != split.local_kv_heads:
        raise ValueError(
            f"model: expected K/V with {split.local_kv_heads} KV heads per process in layer "
            f"{layer_idx} (num_key_value_heads={split.kv_heads} split over {split.world_size} "
            f"processes), got {key.shape[1]}: the model is not sharded as zipvl.enable found it"
        )
    size = cache.world_size
    if size is not None and size != split.world_size:
        raise ValueError(
            f"cache: expected a ZipVLCache for KV heads split over {split.world_size} "
            f"processes (this model's tensor-parallel size), got one for {size}; get the "
            "model's cache from zipvl.enable(model) or zipvl.models.new_cache(model)"
        )


def _refuse_multi_token_step(query: Tensor, held: int) -> None:
    """A step of several queries on a layer that already decodes is a new prompt on a cache
    that holds a generation (``generate`` called again with the same cache, or a multi-turn
    continuation): ZipVL compressed that cache for the old prompt, so it refuses."""
    if query.shape[-2] > 1:
        raise RuntimeError(
            f"zipvl: this cache already holds a generation ({held} positions) and received "
            f"{query.shape[-2]} new positions at once: a ZipVLCache serves one generation, "
            "compressed for its own prompt. Start every generate() with a fresh cache, "
            "zipvl.models.new_cache(model) (continuing on a compressed cache, assisted and "
            "prompt-lookup decoding are not supported)"
        )


def _decode_key_valid(mask: Tensor | None, n: int) -> Tensor | None:
    """The (B, N) padding mask of a decode step: the last query row of the (B, 1, Sq, N) bool
    mask sees every real key (None: no mask, no padding).

    Raises:
        RuntimeError: the mask is not a bool (B, 1, Sq, N) mask.
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[-1] != n:
        raise RuntimeError(
            f"zipvl: expected a (B, 1, Sq, N={n}) bool decode mask from the SDPA mask function, "
            f"got {tuple(mask.shape)} {mask.dtype}"
        )
    return mask[:, 0, -1, :]  # (B, N)


def _key_valid_from_mask(mask: Tensor | None, s: int) -> Tensor | None:
    """The (B, S) padding mask behind a (B, 1, S, S) causal+padding bool mask (None: none).

    Raises:
        RuntimeError: the mask is not causal AND key padding (e.g. bidirectional image blocks),
            which ZipVL's causal sparse prefill cannot honour.
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[-1] != s or mask.shape[-2] != s:
        raise RuntimeError(
            f"zipvl: expected a (B, 1, S, S) bool prefill mask from the SDPA mask function, got "
            f"{tuple(mask.shape)} {mask.dtype}"
        )
    key_valid = mask[:, 0, -1, :]  # (B, S): the last row sees every real key
    causal = torch.ones(s, s, dtype=torch.bool, device=mask.device).tril()  # (S, S)
    expected = causal & key_valid[:, None, :]  # (B, S, S)
    rows = key_valid[:, :, None]  # (B, S, 1): rows of real tokens must match exactly
    if not bool(((mask[:, 0] == expected) | ~rows).all()):
        raise RuntimeError(
            "zipvl: the prefill attention mask is not a causal mask with key padding (custom "
            "masks such as bidirectional image attention are not supported)"
        )
    return key_valid


# --------------------------------------------------------------------------------------------
# enable / disable
# --------------------------------------------------------------------------------------------


def _text_model(model: nn.Module) -> PreTrainedModel:
    if not isinstance(model, SUPPORTED_MODELS):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_MODELS)
        raise ValueError(
            f"model: {type(model).__name__} is not supported by zipvl.enable; supported "
            f"architectures: {names}"
        )
    decoder = model.get_decoder()
    if not isinstance(decoder, PreTrainedModel):
        raise ValueError(
            f"model: expected get_decoder() to return the language model, got "
            f"{type(decoder).__name__}"
        )
    return decoder


def _function_of(decoder: PreTrainedModel) -> _ZipVLAttentionFunction | None:
    name = decoder.config._attn_implementation
    if not isinstance(name, str) or not name.startswith(_PREFIX):
        return None
    fn = AttentionInterface().get(name)
    return fn if isinstance(fn, _ZipVLAttentionFunction) else None


def is_enabled(model: nn.Module) -> bool:
    """Whether ZipVL is currently enabled on ``model`` (a supported transformers model)."""
    return _function_of(_text_model(model)) is not None


def enable(
    model: nn.Module,
    config: ZipVLConfig | None = None,
    *,
    process_group: Any = None,
    mass_reduce: MassReduce | None = None,
) -> ZipVLCache:
    """Switch a transformers model's language-model attention to ZipVL.

    Enabling an already enabled model replaces its config (and cache).

    Tensor parallelism (a model loaded with ``tp_plan="auto"`` under ``torchrun``): every rank
    calls ``enable`` and holds, in its cache, only its own KV heads. Eq. 6 budgets the mass of
    ALL heads, so the head-summed mass is all-reduced over the tensor-parallel group before
    the budget is chosen (``AllReduceMass``, one collective per layer plan); every rank then
    keeps the same number of tokens, the budget one process would choose. Selection stays per
    KV head and local. The group is found on the model (``hf_compat.tensor_parallel``);
    ``process_group`` or ``mass_reduce`` replace it.

    Args:
        model: one of ``SUPPORTED_MODELS`` (in eval mode).
        config: ZipVL configuration (None: ``ZipVLConfig()``, the paper's defaults).
        process_group: the ``torch.distributed`` group the model's heads are split over
            (None: the model's tensor-parallel group, or none for a model that is not
            sharded). Must have the model's ``tp_size`` ranks, the ranks of its mesh.
        mass_reduce: instead of ``process_group``, the ``zipvl.types.MassReduce`` every cache
            of the model gets (a reduction with a ``world_size`` must match ``tp_size``).

    Returns:
        The ``ZipVLCache`` to pass to ``generate`` / ``forward``, as ``cache=`` (transformers
        >= 5.24) or ``past_key_values=`` (5.17 - 5.23): ``**cache_kwargs(model, cache)``
        picks the installed one. One cache serves one generation; get a fresh one with
        ``new_cache(model)``.

    Raises:
        ValueError: unsupported architecture (the message lists the supported ones), sliding-
            window layers, a config that names layers the model does not have, a
            ``process_group`` / ``mass_reduce`` that does not match the model's tensor-parallel
            group, or KV heads that are not split evenly over it.
        TypeError: ``config`` is not a ``ZipVLConfig``, or ``mass_reduce`` is not callable.

    Example::

        cache = zipvl.enable(model, ZipVLConfig(tau=0.975))
        out = model.generate(**inputs, **zipvl.cache_kwargs(model, cache), max_new_tokens=64)
        print(cache.report().to_markdown())
        zipvl.disable(model)
    """
    config = ZipVLConfig() if config is None else config
    if not isinstance(config, ZipVLConfig):
        raise TypeError(f"config: expected a ZipVLConfig or None, got {type(config).__name__}")
    decoder = _text_model(model)
    text_cfg = decoder.config
    layer_types = getattr(text_cfg, "layer_types", None) or ()
    sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
    if sliding:
        raise ValueError(
            f"model: ZipVL supports full-attention layers only, got layer types "
            f"{sorted(set(layer_types))} (layers {sliding})"
        )
    num_layers = int(text_cfg.num_hidden_layers)
    config.check_num_layers(num_layers)
    current = _function_of(decoder)
    original = current.original if current is not None else text_cfg._attn_implementation
    if not isinstance(original, str):
        raise ValueError(
            f"model: expected a named attention implementation on the language model, got "
            f"{original!r}"
        )
    # a fresh name per model (a counter: ids are reused after garbage collection); re-enabling
    # rebinds the model's current name
    name = current.name if current is not None else f"{_PREFIX}{next(_NAME_IDS)}"
    split = _head_split(model, decoder, process_group, mass_reduce)
    fn = _ZipVLAttentionFunction(name, config, num_layers, original, split=split)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, AttentionMaskInterface()["sdpa"])
    if current is None:
        # The registry is global and has no public unregister: when the model is garbage-
        # collected, rebind its name to a raising stub so the function and its cache go too.
        # The finalizer holds only the name (nothing here references the model).
        release = weakref.finalize(decoder, _release, name)
        release.atexit = False
    decoder.set_attn_implementation(name)
    if decoder.config._attn_implementation != name:
        raise RuntimeError(
            f"zipvl: could not switch {type(decoder).__name__} to the ZipVL attention "
            f"(its attn implementation is still {decoder.config._attn_implementation!r})"
        )
    return fn.cache


def _group_ranks(group: Any) -> list[int]:
    import torch.distributed as dist

    return dist.get_process_group_ranks(dist.group.WORLD if group is None else group)


def _head_split(
    model: nn.Module,
    decoder: PreTrainedModel,
    process_group: Any,
    mass_reduce: MassReduce | None,
) -> HeadSplit | None:
    """The model's head split and the reduction of its caches (None: one process, none).

    Raises:
        ValueError / TypeError: see ``enable``.
    """
    if process_group is not None and mass_reduce is not None:
        raise ValueError(
            "process_group, mass_reduce: expected at most one of them (mass_reduce replaces "
            "the all-reduce over process_group)"
        )
    if mass_reduce is not None and not callable(mass_reduce):
        raise TypeError(
            "mass_reduce: expected None or a callable (B, 1, Skv) -> (B, 1, Skv) that sums "
            f"over processes, got {type(mass_reduce).__name__}"
        )
    tp = tensor_parallel(model) or tensor_parallel(decoder)
    tp_size = 1 if tp is None else tp[0]
    if process_group is not None:
        import torch.distributed as dist

        size = dist.get_world_size(process_group)
        if size != tp_size:
            raise ValueError(
                f"process_group: expected a group of {tp_size} ranks (the model's "
                f"tensor-parallel size tp_size={tp_size}), got one of {size} ranks"
            )
        mass_reduce = AllReduceMass(process_group) if tp_size > 1 else None
    elif mass_reduce is None and tp is not None:
        mass_reduce = AllReduceMass(tp[1])
    elif mass_reduce is not None:
        size = getattr(mass_reduce, "world_size", None)
        if isinstance(size, int) and size != tp_size:
            raise ValueError(
                f"mass_reduce: expected a reduction over {tp_size} ranks (the model's "
                f"tensor-parallel size tp_size={tp_size}), got one over {size} ranks"
            )
    if tp is not None and isinstance(mass_reduce, AllReduceMass):
        want, got = _group_ranks(tp[1]), _group_ranks(mass_reduce.group)
        if got != want:
            name = "process_group" if process_group is not None else "mass_reduce"
            raise ValueError(
                f"{name}: expected the ranks {want} of the model's tensor-parallel group (the "
                f"processes that share its heads), got a group of ranks {got}"
            )
    text_cfg = decoder.config
    kv_heads = getattr(text_cfg, "num_key_value_heads", None) or text_cfg.num_attention_heads
    kv_heads = int(kv_heads)
    if kv_heads % tp_size:
        raise ValueError(
            f"model: expected num_key_value_heads={kv_heads} to split evenly over "
            f"tp_size={tp_size} processes"
        )
    for layer_idx, heads in sorted(local_kv_heads(decoder).items()):
        if heads * tp_size != kv_heads:
            raise ValueError(
                f"model: expected {kv_heads // tp_size} KV heads per process in every layer "
                f"(num_key_value_heads={kv_heads} over tp_size={tp_size}), layer {layer_idx} "
                f"holds {heads}: its key projection is not sharded over the tensor-parallel "
                "group"
            )
    if tp_size == 1 and mass_reduce is None:
        return None
    return HeadSplit(world_size=tp_size, kv_heads=kv_heads, mass_reduce=mass_reduce)


def new_cache(model: nn.Module) -> ZipVLCache:
    """A fresh ``ZipVLCache`` for the next generation, bound to the enabled model.

    Raises:
        RuntimeError: ZipVL is not enabled on ``model``.
    """
    fn = _function_of(_text_model(model))
    if fn is None:
        raise RuntimeError("model: ZipVL is not enabled on this model; call zipvl.enable first")
    fn.cache = fn.new_cache()
    return fn.cache


def bound_cache(model: nn.Module) -> ZipVLCache | None:
    """The ``ZipVLCache`` the enabled model's attention reads (None: ZipVL is not enabled)."""
    fn = _function_of(_text_model(model))
    return None if fn is None else fn.cache


def disable(model: nn.Module) -> None:
    """Restore the attention implementation the model had before ``enable``.

    The registered names stay in transformers' interfaces (there is no public unregister) but
    are rebound to a function that raises, which also drops the cache it held.

    Raises:
        RuntimeError: ZipVL is not enabled on ``model``.
    """
    decoder = _text_model(model)
    fn = _function_of(decoder)
    if fn is None:
        raise RuntimeError("model: ZipVL is not enabled on this model; nothing to disable")
    decoder.set_attn_implementation(fn.original)
    _release(fn.name)


def _release(name: str) -> None:
    """Rebind ``name`` to a raising stub, dropping the function (and the cache) it held."""
    AttentionInterface.register(name, _disabled(name))


def _disabled(name: str) -> Callable[..., Any]:
    def attention(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"zipvl: attention {name!r} was disabled; call zipvl.enable again")

    return attention


# --------------------------------------------------------------------------------------------
# measurement helpers (used by zipvl.eval)
# --------------------------------------------------------------------------------------------


class recording:
    """Record a ``LayerTrace`` per prefill layer while ZipVL is enabled on ``model``.

    Example::

        with recording(model) as traces:
            model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=1)
        [t.retained_mass for t in traces]

    Args:
        model: a model with ZipVL enabled.
        max_rows: query rows used to measure the retained attention mass.
    """

    def __init__(self, model: nn.Module, *, max_rows: int = 256) -> None:
        fn = _function_of(_text_model(model))
        if fn is None:
            raise RuntimeError("model: ZipVL is not enabled on this model; call zipvl.enable")
        self._fn = fn
        self._max_rows = max_rows
        self.traces: list[LayerTrace] = []

    def __enter__(self) -> list[LayerTrace]:
        self._fn.recorder = self.traces
        self._fn.retained_rows = self._max_rows
        return self.traces

    def __exit__(self, *exc: object) -> None:
        self._fn.recorder = None


class _ForceTokens(LogitsProcessor):
    """Record the model's own argmax (and first-step logits), then force the given token."""

    def __init__(self, tokens: Tensor, prompt_len: int) -> None:
        self.tokens = tokens  # (B, T)
        self.prompt_len = prompt_len
        self.argmax: list[Tensor] = []
        self.first_logits: Tensor | None = None

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor
    ) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        if self.first_logits is None:
            self.first_logits = scores.detach().float().clone()
        self.argmax.append(scores.argmax(-1))
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, self.tokens[:, step : step + 1].to(scores.device), 0.0)
        return forced  # type: ignore[return-value]


@dataclass(frozen=True)
class ForcedRun:
    """A teacher-forced generation.

    Attributes:
        argmax: (B, T) the model's own greedy choice at each step, given the forced prefix.
        first_logits: (B, V) float32 logits of the first generated position.
    """

    argmax: Tensor
    first_logits: Tensor


@torch.no_grad()
def forced_generate(
    model: nn.Module,
    inputs: Mapping[str, Any],
    tokens: Tensor,
    **generate_kwargs: Any,
) -> ForcedRun:
    """Run ``generate`` while forcing ``tokens`` and recording the model's own argmax.

    Args:
        model: a transformers generation model (ZipVL enabled or not).
        inputs: the prompt inputs (``input_ids`` (B, S), masks, pixels).
        tokens: (B, T) tokens to force, e.g. a dense greedy continuation.
        **generate_kwargs: e.g. ``**cache_kwargs(model, cache)``.

    Returns:
        ``ForcedRun`` with the per-step argmax and the first-step logits.
    """
    prompt_len = int(inputs["input_ids"].shape[1])
    proc = _ForceTokens(tokens, prompt_len)
    gen: Any = model
    gen.generate(
        **inputs,
        max_new_tokens=tokens.shape[1],
        min_new_tokens=tokens.shape[1],
        do_sample=False,
        logits_processor=LogitsProcessorList([proc]),
        **generate_kwargs,
    )
    assert proc.first_logits is not None
    return ForcedRun(argmax=torch.stack(proc.argmax, dim=1).cpu(), first_logits=proc.first_logits)
