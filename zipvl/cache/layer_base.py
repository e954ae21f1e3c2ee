"""What both cache layers share (``ZipVLCacheLayer``, chunks; ``PagedCacheLayer``, pages):
input checks, transformers' size queries, the crop convention, batch selection, accounting."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from zipvl.cache.hf_compat import CacheLayerMixin
from zipvl.checks import check_int, check_tensor

__all__ = ["CacheLayerBase", "check_mass_reduce"]


def check_mass_reduce(mass_reduce: object) -> None:
    """``mass_reduce``: None or a callable (``zipvl.types.MassReduce``)."""
    if mass_reduce is not None and not callable(mass_reduce):
        raise TypeError(
            "mass_reduce: expected None or a callable (B, 1, Skv) -> (B, 1, Skv) that sums the "
            f"attention mass over processes (e.g. zipvl.sparsity.AllReduceMass), got "
            f"{type(mass_reduce).__name__}"
        )


class CacheLayerBase(CacheLayerMixin):
    """Shared behaviour of the cache layers. Subclasses define ``get_seq_length``,
    ``crop_to``, ``reorder_cache``, ``nbytes`` and set ``layer_idx``, ``dtype``, ``device``,
    ``num_heads``, ``head_dim`` and ``_batch_size`` on their first update."""

    layer_idx: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    _batch_size: int

    def _init_settings(
        self,
        quantizer: object,
        allocator: object,
        selector: object,
        recompress_every: int,
        sink_tokens: int,
        auto_commit_prefill: bool,
        layer_idx: int,
        mass_reduce: object = None,
    ) -> None:
        """Validate and store the settings both layers take (the quantizer is checked by the
        subclass, which knows what it can store)."""
        for name, fn in (("allocator", allocator), ("selector", selector)):
            if not callable(fn):
                raise TypeError(f"{name}: expected a callable {name.title()}, got {fn!r}")
        check_mass_reduce(mass_reduce)
        if not isinstance(auto_commit_prefill, bool):
            raise TypeError(
                f"auto_commit_prefill: expected a bool, got {type(auto_commit_prefill).__name__}"
            )
        self.quantizer: Any = quantizer
        self.allocator: Any = allocator
        self.selector: Any = selector
        self.recompress_every = check_int("recompress_every", recompress_every, 1)
        self.sink_tokens = check_int("sink_tokens", sink_tokens, 0)
        self.auto_commit_prefill = auto_commit_prefill
        self.layer_idx = check_int("layer_idx", layer_idx, 0)
        self.mass_reduce: Any = mass_reduce

    def _pending_error(self) -> RuntimeError:
        return RuntimeError(
            f"layer {self.layer_idx}: a new update arrived while the prefill K/V of this "
            "layer are still pending: call compress_prefill(layer_idx, keep) after the "
            "prefill attention (or build the cache with auto_commit_prefill=True to keep "
            "every prefill token at high precision)"
        )

    def _check_query(self, query: Tensor) -> tuple[int, int, int]:
        """Check a step's (B, Hq, Sq, D) queries against the layer; returns (B, Hq, D)."""
        check_tensor("query", query, ndim=4, floating=True)
        b, hq, _, d = query.shape
        if b != self.batch_size or d != self.head_dim or hq % self.num_heads:
            raise ValueError(
                f"query: expected (B, Hq, Sq, D) with B={self.batch_size}, D={self.head_dim} and "
                f"Hq a multiple of Hkv={self.num_heads} (layer {self.layer_idx}), "
                f"got shape {tuple(query.shape)}"
            )
        return b, hq, d

    def crop_to(self, max_length: int) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def nbytes(self) -> int:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        """Batch size B (an AttributeError before the first update, as transformers expects)."""
        if not self.is_initialized:
            raise AttributeError("batch_size: the layer is not initialized yet")
        return self._batch_size

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the next attention call: all positions, offset 0."""
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        """-1: the cache grows without bound."""
        return -1

    def _check_kv(self, key_states: Tensor, value_states: Tensor) -> None:
        check_tensor("key_states", key_states, ndim=4, floating=True)
        check_tensor("value_states", value_states, ndim=4, floating=True)
        if value_states.shape != key_states.shape:
            raise ValueError(
                f"value_states: expected shape (B, Hkv, S, D) = {tuple(key_states.shape)} like "
                f"key_states (the KV quantizers need equal head dims), "
                f"got {tuple(value_states.shape)}"
            )
        if value_states.dtype != key_states.dtype or value_states.device != key_states.device:
            raise ValueError(
                f"value_states: expected dtype {key_states.dtype} on {key_states.device} like "
                f"key_states, got {value_states.dtype} on {value_states.device}"
            )
        if not self.is_initialized:
            return
        want = (self.batch_size, self.num_heads, self.head_dim)
        got = (key_states.shape[0], key_states.shape[1], key_states.shape[3])
        if got != want:
            raise ValueError(
                f"key_states: expected (B, Hkv, *, D) = {want} like the cache of layer "
                f"{self.layer_idx}, got shape {tuple(key_states.shape)}"
            )
        if key_states.dtype != self.dtype or key_states.device != self.device:
            raise ValueError(
                f"key_states: expected dtype {self.dtype} on {self.device} like the cache of "
                f"layer {self.layer_idx}, got {key_states.dtype} on {key_states.device}"
            )

    def crop(self, tokens_to_remove: int) -> None:
        """Drop trailing positions (transformers' convention, see ``ZipVLCache.crop``).

        Args:
            tokens_to_remove: ``< 0``: remove ``-tokens_to_remove`` trailing positions;
                ``> 0``: keep the first ``tokens_to_remove`` positions (legacy absolute length);
                ``0``: no-op.
        """
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
            raise TypeError(
                f"tokens_to_remove: expected an int, got {type(tokens_to_remove).__name__}"
            )
        n = self.get_seq_length()
        if tokens_to_remove == 0 or n == 0:
            return
        keep_len = max(n + tokens_to_remove, 0) if tokens_to_remove < 0 else tokens_to_remove
        self.crop_to(keep_len)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times in place (contrastive search, beams)."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats: expected an int >= 1, got {repeats!r}")
        if not self.is_initialized:
            return
        idx = torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats)
        self.reorder_cache(idx)  # type: ignore[arg-type]

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only the batch rows ``indices`` (int indices or a (B,) bool mask)."""
        if not self.is_initialized:
            return
        check_tensor("indices", indices, ndim=1)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self.reorder_cache(indices)  # type: ignore[arg-type]

    def offload(self) -> None:
        """Not supported: build the cache without ``offloading``."""
        raise NotImplementedError("this cache layer does not support offloading")

    def prefetch(self) -> None:
        """Not supported: build the cache without ``offloading``."""
        raise NotImplementedError("this cache layer does not support offloading")

    def bf16_bytes(self) -> int:
        """Bytes a bf16 cache of the same positions would hold."""
        if not self.is_initialized:
            return 0
        per_pos = self.batch_size * self.num_heads * (2 * self.head_dim) * 2
        return self.get_seq_length() * per_pos

    def bytes_per_token(self) -> float:
        """Held bytes per cached position (all batch rows and heads; 0.0 when empty)."""
        n = self.get_seq_length()
        return self.nbytes() / n if n else 0.0
