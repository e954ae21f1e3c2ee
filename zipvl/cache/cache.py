"""``ZipVLCache``: ZipVL's mixed-precision KV cache as a transformers ``Cache``.

ZipVL (He et al., arXiv 2410.08584 v1, Algorithm 1; docs/algorithm.md#decoding,
docs/decisions.md#append-only-chunks) stores the prompt's important tokens at high precision and
the rest at low precision (4 / 2 bits by default), keeps newly generated tokens in a full-precision
tail and, every ``recompress_every`` (100) tokens, scores the oldest tail block with the current
query, splits it with the same adaptive rule (Eq. 6, tau x block mass) and quantizes it as a new
append-only chunk. Earlier chunks are never re-quantized (unlike ZipCache's streaming code, section
7.4).

This class is thin (style G5): a list of ``ZipVLCacheLayer`` plus the calls the model side
makes. The call sequence of one attention layer::

    prefill   K, V = cache.update(k, v, i)              # pending fp, returned unchanged
              ... sparse attention, selection keep (B, Hkv, S) ...
              cache.compress_prefill(i, keep)           # sinks fp, kept -> 4 bit, rest -> 2 bit
    decode    K, V = cache.update(k, v, i)              # dense K/V of all positions
              ... attention of q over K, V ...
              cache.compress_tail(i, q)                 # only works on full blocks

Plain PyTorch, device-agnostic; ``is_compileable`` is False (the cache grows by concatenation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from zipvl.cache.hf_compat import Cache
from zipvl.cache.layer import ZipVLCacheLayer, _check_quantizer
from zipvl.cache.layer_base import check_mass_reduce
from zipvl.cache.paged import CODE_ORDERS, page_format_problem
from zipvl.cache.paged_layer import PagedCacheLayer
from zipvl.cache.report import CacheReport, LayerReport
from zipvl.checks import check_int
from zipvl.impl import PAGE_WRITE_IMPLS, Impl, parse_impl
from zipvl.sparsity.allocators import layer_allocator

CacheLayer = ZipVLCacheLayer | PagedCacheLayer
STORAGES = ("auto", "paged", "chunked")

if TYPE_CHECKING:
    from zipvl.quant import KVQuantizer
    from zipvl.types import Allocator, MassReduce, Selector

__all__ = ["ZipVLCache"]


class ZipVLCache(Cache):
    """Mixed-precision KV cache with ZipVL's prefill commit and decode-time re-compression.

    Args:
        num_layers: number of attention layers; ``None`` creates layers lazily on first use.
        quantizer: ``KVQuantizer`` of every layer (default: ``MixedPrecisionKVQuantizer()``,
            ZipCache 4-bit important / 2-bit other tokens).
        recompress_every: decode block size, >= 1 (ZipVL: 100).
        sink_tokens: leading positions kept at full precision, >= 0 (attention sinks).
        allocator: decode-block budget (default ``CumulativeMassAllocator(0.975)``).
        selector: decode-block keep mask (default ``TopKSelector(keep_last=False)``).
        layer_quantizers: per-layer overrides ``{layer_idx: KVQuantizer}``.
        layer_allocators: per-layer decode-block allocators ``{layer_idx: Allocator}``.
        storage: ``"auto"`` (paged storage for every layer whose quantizer has a paged layout,
            ``zipvl.cache.paged.page_format_problem``; append-only chunks otherwise),
            ``"paged"`` (raises for a quantizer without a paged layout) or ``"chunked"``.
            Only paged layers are read by the fused decode kernel; ``report()`` names the
            storage of every layer.
        page_size: tokens per page of paged layers (a multiple of 16; 128 by default).
        code_order: how paged layers lay out a page's codes (``PageFormat.code_order``:
            ``"auto"``, the default, takes the fragment order the fastest decode kernel reads
            where the head dim and page size allow it (128 and 128, 4/2 bits), ``"slice"``
            elsewhere; ``"slice"`` or ``"fragment"`` force one).
        page_write_impl: how paged layers write pages (``PagedKVStore(write_impl=)``:
            ``"auto"``, ``"triton"`` or ``"reference"``).
        update_reads: what ``update`` returns in decode on paged layers: ``"dense"`` (every
            position, usable by any attention) or ``"none"`` (the new K/V only, for an
            attention that reads the pages itself: what ``zipvl.enable`` builds).
        auto_commit_prefill: when True, a pending prefill is committed with EVERY token kept at
            high precision when the next ``update`` of that layer arrives. It lets a model whose
            attention never calls ``compress_prefill`` (e.g. stock transformers attention) run
            with this cache. Off by default: then a missing ``compress_prefill`` raises.
        defer_commit: when True, ``compress_prefill`` of a paged layer only checks its
            arguments and queues the commit; the queue runs (``commit_pending``) at the next
            call that reaches a layer (``update`` of the next layer, ``append``, ``layer``,
            ``report``, crops, reorders). In a model's prefill this runs layer i's commit after
            the host has queued layer i's MLP, so the GPU works while the host launches it.
            The last layer (``num_layers - 1``, when ``num_layers`` is given) commits at once,
            with everything still queued, so after a prefill through every layer nothing is
            pending. Off by default; the caches of ``zipvl.enable`` / ``zipvl.new_cache`` turn
            it on. With ``num_layers=None``, code that reads ``cache.layers`` directly calls
            ``commit_pending()`` first.
        mass_reduce: for KV heads split over processes (tensor parallelism): a
            ``zipvl.types.MassReduce`` that sums a (B, 1, Skv) head-summed attention mass over
            the processes (e.g. ``zipvl.sparsity.AllReduceMass(group)``), so that every process
            budgets the same number of tokens. Every layer's decode-block plan calls it once per
            block, and the prefill attention of ``zipvl_attention`` / ``ZipVLAttention`` /
            ``zipvl.enable`` takes it from here for the prefill plan. None: one process.

    Raises:
        TypeError / ValueError: a bad argument (the message names it).

    Example::

        cache = ZipVLCache(num_layers=2, recompress_every=8)
        k_all, v_all = cache.prefill(0, k, v, keep)             # (B, Hkv, S, D), keep (B, Hkv, S)
        k_all, v_all = cache.decode_step(0, q, k1, v1)           # q (B, Hq, 1, D)
        print(cache.report().to_markdown())
    """

    # narrowed from transformers' declaration: this cache only holds its own layer types
    layers: list[CacheLayer]  # type: ignore[assignment]

    def __init__(
        self,
        num_layers: int | None = None,
        *,
        quantizer: KVQuantizer | None = None,
        recompress_every: int = 100,
        sink_tokens: int = 0,
        allocator: Allocator | None = None,
        selector: Selector | None = None,
        layer_quantizers: Mapping[int, KVQuantizer] | None = None,
        layer_allocators: Mapping[int, Allocator] | None = None,
        auto_commit_prefill: bool = False,
        storage: str = "auto",
        page_size: int = 128,
        code_order: str = "auto",
        page_write_impl: Impl | str = Impl.AUTO,
        update_reads: str = "dense",
        mass_reduce: MassReduce | None = None,
        defer_commit: bool = False,
    ) -> None:
        check_mass_reduce(mass_reduce)
        if not isinstance(defer_commit, bool):
            raise TypeError(f"defer_commit: expected a bool, got {type(defer_commit).__name__}")
        self.defer_commit = defer_commit
        # (layer_idx, compress_prefill keyword arguments) of commits not yet run
        self._deferred: list[tuple[int, dict[str, Any]]] = []
        self.mass_reduce = mass_reduce
        if update_reads not in ("dense", "none"):
            raise ValueError(f"update_reads: expected 'dense' or 'none', got {update_reads!r}")
        self.update_reads = update_reads
        if storage not in STORAGES:
            raise ValueError(f"storage: expected one of {STORAGES}, got {storage!r}")
        self.storage = storage
        self.page_size = check_int("page_size", page_size, 16)
        if code_order not in CODE_ORDERS:
            raise ValueError(f"code_order: expected one of {CODE_ORDERS}, got {code_order!r}")
        self.code_order = code_order
        self.page_write_impl = parse_impl("page_write_impl", page_write_impl, PAGE_WRITE_IMPLS)
        if num_layers is not None:
            check_int("num_layers", num_layers, 1)
        self.recompress_every = check_int("recompress_every", recompress_every, 1)
        self.sink_tokens = check_int("sink_tokens", sink_tokens, 0)
        if not isinstance(auto_commit_prefill, bool):
            raise TypeError(
                f"auto_commit_prefill: expected a bool, got {type(auto_commit_prefill).__name__}"
            )
        self.auto_commit_prefill = auto_commit_prefill
        if quantizer is None:
            # lazy: quant is only imported when the default is needed (no import cycle)
            from zipvl.quant import MixedPrecisionKVQuantizer

            quantizer = MixedPrecisionKVQuantizer()
        _check_quantizer("quantizer", quantizer)
        self.quantizer: KVQuantizer = quantizer
        self.layer_quantizers: dict[int, KVQuantizer] = _layer_overrides(
            "layer_quantizers", layer_quantizers, num_layers, _check_quantizer
        )
        if allocator is None:
            from zipvl.sparsity import CumulativeMassAllocator

            allocator = CumulativeMassAllocator(0.975)
        _check_allocator("allocator", allocator)
        self.allocator: Allocator = allocator
        self.layer_allocators: dict[int, Allocator] = _layer_overrides(
            "layer_allocators", layer_allocators, num_layers, _check_allocator
        )
        if selector is None:
            from zipvl.sparsity import TopKSelector

            selector = TopKSelector(keep_last=False)
        if not callable(selector):
            raise TypeError(f"selector: expected a callable Selector, got {selector!r}")
        self.selector: Selector = selector
        self.num_layers = num_layers
        layers = [] if num_layers is None else [self._new_layer(i) for i in range(num_layers)]
        super().__init__(layers=layers)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ layers
    def storage_problem(self, layer_idx: int) -> str | None:
        """Why layer ``layer_idx`` cannot use paged storage (and the fused decode), or None."""
        if self.storage == "chunked":
            return "the cache was built with storage='chunked'"
        return page_format_problem(self.layer_quantizers.get(layer_idx, self.quantizer))

    def _decode_read(self, layer_idx: int) -> str:
        problem = self.storage_problem(layer_idx)
        return "fused" if problem is None else f"dense: {problem}"

    def _new_layer(self, layer_idx: int) -> CacheLayer:
        quantizer = self.layer_quantizers.get(layer_idx, self.quantizer)
        problem = self.storage_problem(layer_idx)
        if self.storage == "paged" and problem is not None:
            raise ValueError(f"storage: 'paged' for layer {layer_idx}, but {problem}")
        if self.page_write_impl is Impl.TRITON and problem is not None:
            raise ValueError(
                f"page_write_impl: 'triton' writes pages, but layer {layer_idx} stores chunks "
                f"({problem}); use 'auto' or 'reference'"
            )
        if self.code_order != "auto" and problem is not None:
            raise ValueError(
                f"code_order: {self.code_order!r} lays out pages, but layer {layer_idx} stores "
                f"chunks ({problem}); use 'auto'"
            )
        common = {
            "quantizer": quantizer,
            # resolved once per layer: no forward looks a schedule up again
            "allocator": layer_allocator(
                self.layer_allocators.get(layer_idx, self.allocator), layer_idx
            ),
            "selector": self.selector,
            "recompress_every": self.recompress_every,
            "sink_tokens": self.sink_tokens,
            "auto_commit_prefill": self.auto_commit_prefill,
            "layer_idx": layer_idx,
            "mass_reduce": self.mass_reduce,
        }
        if problem is None:
            return PagedCacheLayer(
                **common,
                page_size=self.page_size,
                code_order=self.code_order,
                update_reads=self.update_reads,
                write_impl=self.page_write_impl,
            )
        return ZipVLCacheLayer(**common)

    def layer(self, layer_idx: int) -> CacheLayer:
        """The layer ``layer_idx``, created (with all lower ones) when layers are lazy.

        Raises:
            ValueError: ``layer_idx`` is negative or >= ``num_layers``.
        """
        check_int("layer_idx", layer_idx, 0)
        self.commit_pending()
        if self.num_layers is not None and layer_idx >= self.num_layers:
            raise ValueError(
                f"layer_idx: expected 0 <= layer_idx < num_layers={self.num_layers}, "
                f"got {layer_idx}"
            )
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        layer = self.layers[layer_idx]
        assert isinstance(layer, (ZipVLCacheLayer, PagedCacheLayer))
        return layer

    def commit_pending(self) -> None:
        """Run the prompt commits ``defer_commit`` queued, in order (a no-op when none)."""
        while self._deferred:
            idx, kwargs = self._deferred.pop(0)
            layer = self.layers[idx]
            assert isinstance(layer, PagedCacheLayer)
            layer.compress_prefill(**kwargs)

    def _existing(self, layer_idx: int) -> CacheLayer:
        check_int("layer_idx", layer_idx, 0)
        self.commit_pending()
        if layer_idx >= len(self.layers):
            raise ValueError(
                f"layer_idx: layer {layer_idx} holds nothing yet (the cache has "
                f"{len(self.layers)} layers with data); call update/prefill first"
            )
        layer = self.layers[layer_idx]
        assert isinstance(layer, (ZipVLCacheLayer, PagedCacheLayer))
        return layer

    # ------------------------------------------------------------------ transformers API
    def update(  # type: ignore[override]
        self,
        key_states: Tensor,
        value_states: Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Store new K/V of ``layer_idx`` and return what attention reads.

        Args:
            key_states: (B, Hkv, S, D) new keys, RoPE applied.
            value_states: (B, Hkv, S, D) new values.
            layer_idx: attention layer index.
            cache_kwargs: ignored (transformers' extra data such as RoPE sin/cos).

        Returns:
            Prefill (empty layer): the inputs unchanged, held as pending full precision until
            ``compress_prefill``. Otherwise the dense (K, V) of all positions in position order
            (dequantized chunks, sinks and tail), (B, Hkv, N, D), in the input dtype.

        Raises:
            RuntimeError: the layer's prefill is still pending (``compress_prefill`` was not
                called) and ``auto_commit_prefill`` is off.
            ValueError: shapes, dtype or device differ from the layer's.
        """
        return self.layer(layer_idx).update(key_states, value_states)

    def append(self, key_states: Tensor, value_states: Tensor, layer_idx: int) -> bool:
        """Store new K/V of ``layer_idx`` without the dense read of ``update``.

        For attention that reads the stored runs itself (``zipvl.decode_attention`` over
        the pages of ``cache.layer(i).store``).

        Returns:
            True when the K/V became the layer's pending prefill (the layer was empty).
        """
        return self.layer(layer_idx).append(key_states, value_states)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop trailing positions of every layer, following transformers' convention.

        Args:
            tokens_to_remove: ``-n`` removes the last ``n`` positions (what ``generate`` and
                assisted decoding call); a positive ``m`` keeps the first ``m`` positions (the
                legacy ``crop(max_length)``); ``0`` is a no-op, as in transformers >= 5.17 (use
                ``crop_to(0)`` or ``reset()`` to empty the cache).

        Positions are exact, also inside compressed chunks; see ``crop_to`` for the memory
        semantics.
        """
        self.commit_pending()
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows (beam search), after any queued commit."""
        self.commit_pending()
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times, after any queued commit."""
        self.commit_pending()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep the batch rows ``indices``, after any queued commit."""
        self.commit_pending()
        super().batch_select_indices(indices)

    def reset(self) -> None:
        """Empty every layer; queued commits are dropped with what they would commit."""
        self._deferred.clear()
        super().reset()

    def crop_to(self, max_length: int) -> None:
        """Keep exactly the first ``max_length`` positions of every layer (0 empties it).

        Full-precision regions are sliced and their memory freed. A compressed chunk cut by
        ``max_length`` is kept whole (never re-quantized) but only its positions below
        ``max_length`` are read or counted in ``report()`` token counts; its bytes stay held,
        and ``nbytes()`` says so. Later tokens are appended at position ``max_length``.

        Args:
            max_length: positions to keep, >= 0.
        """
        self.commit_pending()
        check_int("max_length", max_length, 0)
        for layer in self.layers:
            layer.crop_to(max_length)

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        """Always False: the cache grows by concatenation and has data-dependent chunks."""
        return False

    # ------------------------------------------------------------------ ZipVL API
    def compress_prefill(
        self,
        layer_idx: int,
        keep: Tensor | None,
        *,
        key_valid: Tensor | None = None,
        kept_rows: Sequence[int] | None = None,
        real_rows: Sequence[int] | None = None,
    ) -> None:
        """Commit the pending prefill of ``layer_idx``: kept tokens high bits, the rest low.

        The first ``sink_tokens`` positions stay full precision. Records the prefill selection
        stats (prompt tokens, kept tokens) for ``report()``. One host read of a few integers
        (row counts, sink check), none with ``keep=None`` and ``key_valid=None``, and none on a
        paged layer given ``kept_rows``; the quantizer is handed the count and reads nothing
        back.

        Args:
            layer_idx: attention layer index.
            keep: (B, Hkv, S) bool over the pending prefill, the same count of True in every
                row; ``None`` keeps every token.
            key_valid: optional (B, S) bool, True = real token. Padding positions are stored
                (layout and accounting unchanged) but their K/V never enter the quantization
                statistics: real tokens of a padded row are quantized as if the row were alone
                (see ``ZipVLCacheLayer.compress_prefill``).
            kept_rows: optional, per batch row, the real tokens ``keep`` holds in each of its
                (b, h) rows, known on the host (``PrefillResult.kept_tokens``, with
                ``PrefillResult.commit_keep`` as ``keep``). A paged layer
                then commits without reading the device (``PagedCacheLayer.compress_prefill``);
                chunked layers do not use it.
            real_rows: per batch row, its real tokens (``PrefillResult.real_tokens``).

        Raises:
            RuntimeError: the layer has no pending prefill.
            ValueError: ``keep`` / ``key_valid`` have the wrong shape / dtype / device, ``keep``
                has unequal row counts, or ``sink_tokens > 0`` with padding among the first
                ``sink_tokens`` positions of some row (left padding).
        """
        layer = self._existing(layer_idx)  # runs the commit queued before this one
        if isinstance(layer, PagedCacheLayer):
            kwargs = {"keep": keep, "key_valid": key_valid, "kept_rows": kept_rows,
                      "real_rows": real_rows}  # fmt: skip
            last = self.num_layers is not None and layer_idx == self.num_layers - 1
            if self.defer_commit and not last:  # checked now, run at the next call that needs it
                layer.check_commit(keep, key_valid)
                self._deferred.append((layer_idx, kwargs))
                return
            layer.compress_prefill(**kwargs)
        else:
            layer.compress_prefill(keep, key_valid=key_valid)

    def compress_tail(
        self,
        layer_idx: int,
        query: Tensor,
        *,
        keys: Tensor | None = None,
        scale: float | None = None,
        key_valid: Tensor | None = None,
    ) -> int:
        """Re-compress full blocks of the fp tail of ``layer_idx`` (call AFTER attention).

        While the tail holds >= ``recompress_every`` tokens, the oldest block is scored with
        the softmax of the last query row over ALL cached keys (float32, summed over each GQA
        group), budgeted by the allocator, split by the selector and quantized as a new chunk.
        Host syncs: none on a step without a full block; per compressed block, those of the
        allocator and selector (the selector reads the kept count back); the quantizer is
        handed that count and reads nothing back.

        Args:
            layer_idx: attention layer index.
            query: (B, Hq, Sq, D) the step's queries with RoPE applied (last row used).
            keys: optional (B, Hkv, N, D) dense keys just returned by ``update`` (saves a
                dequantization).
            scale: the model's softmax scale (``None``: 1 / sqrt(D)).
            key_valid: optional (B, N) bool over all N cached positions (True = real token):
                padding keys get zero probability in the block scores.

        Returns:
            Number of blocks compressed (0 on most steps).
        """
        return self._existing(layer_idx).compress_tail(
            query, keys=keys, scale=scale, key_valid=key_valid
        )

    def prefill(
        self,
        layer_idx: int,
        key_states: Tensor,
        value_states: Tensor,
        keep: Tensor | None,
        *,
        key_valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``update`` on an empty layer followed by ``compress_prefill`` (drives tests/benches).

        Args:
            layer_idx: attention layer index (must be empty).
            key_states: (B, Hkv, S, D) prompt keys.
            value_states: (B, Hkv, S, D) prompt values.
            keep: (B, Hkv, S) bool, equal row counts; ``None`` keeps all.
            key_valid: optional (B, S) bool, True = real token (see ``compress_prefill``).

        Returns:
            The inputs, unchanged (what prefill attention reads).

        Raises:
            RuntimeError: the layer is not empty.
        """
        layer = self.layer(layer_idx)
        if layer.get_seq_length() > 0:
            raise RuntimeError(
                f"layer {layer_idx}: prefill needs an empty layer, it holds "
                f"{layer.get_seq_length()} positions (use update for later chunks)"
            )
        out = layer.update(key_states, value_states)
        layer.compress_prefill(keep, key_valid=key_valid)
        return out

    def decode_step(
        self,
        layer_idx: int,
        query: Tensor,
        key_states: Tensor,
        value_states: Tensor,
        *,
        scale: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One decode step of ``layer_idx`` without a model: ``update`` then ``compress_tail``.

        Order: the dense K/V of the step (all positions including the new ones, the fp tail
        not yet compressed) are read first and returned, as attention would read them; then
        the tail is re-compressed with ``query``, so the effect shows from the next step on.

        Args:
            layer_idx: attention layer index (its prefill must be committed).
            query: (B, Hq, Sq, D) the step's queries, RoPE applied.
            key_states: (B, Hkv, Sq, D) the step's keys.
            value_states: (B, Hkv, Sq, D) the step's values.
            scale: softmax scale for the block scores (``None``: 1 / sqrt(D)).

        Returns:
            (K, V), (B, Hkv, N, D) dense, in position order, before this step's compression.
        """
        layer = self._existing(layer_idx)
        keys, values = layer.update(key_states, value_states)
        layer.compress_tail(query, keys=keys, scale=scale)
        return keys, values

    def dense_kv(self, layer_idx: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """All positions of ``layer_idx`` dequantized, in position order (the reference read).

        Returns:
            (K, V), (B, Hkv, N, D) each, in ``dtype`` (default: the input dtype).
        """
        return self._existing(layer_idx).dense_kv(dtype)

    # ------------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        """Bytes held by all layers (exact: sum of ``nbytes`` of every tensor)."""
        self.commit_pending()
        return sum(layer.nbytes() for layer in self.layers)

    @property
    def world_size(self) -> int | None:
        """The processes this cache's KV heads are split over: 1 without ``mass_reduce``, the
        ``world_size`` of a ``mass_reduce`` over a process group (``AllReduceMass``), None
        for a plain ``mass_reduce`` callable (unknown)."""
        if self.mass_reduce is None:
            return 1
        size = getattr(self.mass_reduce, "world_size", None)
        return size if isinstance(size, int) else None

    def report(self, *, gather: bool = True) -> CacheReport:
        """Per-layer kept ratio, attention-FLOP reduction, precision mix and memory.

        KV heads split over processes (a ``mass_reduce`` over a group of several ranks, such
        as ``AllReduceMass``, the one ``zipvl.enable`` builds on a tensor-parallel model): this
        cache holds this rank's heads only. With ``gather`` (the default) every rank's figures
        are gathered (one ``all_gather_object`` of a few numbers per layer: a collective, so
        every rank must call ``report()``) and the report is the whole model's
        (``CacheReport.merge``: bytes summed over the ranks, per-row token counts averaged),
        with each rank's own report in ``ranks``. ``gather=False`` (or a plain ``mass_reduce``
        callable, which cannot gather) reports this rank alone, without a collective.
        """
        self.commit_pending()
        rank = getattr(self.mass_reduce, "rank", 0)
        local = self._local_report(rank if isinstance(rank, int) else 0)
        gather_fn = getattr(self.mass_reduce, "gather", None)
        size = self.world_size
        if not gather or gather_fn is None or size is None or size <= 1:
            return local
        return CacheReport.merge(tuple(gather_fn(local)), rank=local.rank)

    def _local_report(self, rank: int) -> CacheReport:
        rows = []
        for i, layer in enumerate(self.layers):
            ratio = layer.kept_tokens / layer.prompt_tokens if layer.prompt_tokens else 1.0
            rows.append(
                LayerReport(
                    layer=i,
                    prompt_tokens=layer.prompt_tokens,
                    kept_tokens=layer.kept_tokens,
                    kept_ratio=ratio,
                    attn_flop_reduction=1.0 - ratio**2,
                    seq_length=layer.get_seq_length(),
                    tokens_at_bits=layer.tokens_at_bits(),
                    decode_blocks=layer.decode_blocks,
                    decode_block_tokens=layer.decode_block_tokens,
                    decode_kept_tokens=layer.decode_kept_tokens,
                    bytes=layer.nbytes(),
                    bf16_bytes=layer.bf16_bytes(),
                    live_bytes=layer.live_nbytes()
                    if isinstance(layer, PagedCacheLayer)
                    else layer.nbytes(),
                    storage="paged" if isinstance(layer, PagedCacheLayer) else "chunked",
                    decode_read=self._decode_read(i),
                )
            )
        return CacheReport(layers=tuple(rows), rank=rank)

    # transformers' generate marks a cache the caller passed in by setting this attribute at the
    # start of every call (5.24; versions that do not set it are covered by the attention
    # function's check of the first step). A cache that already holds a generation refuses
    # there, before any model code runs on a prompt it was not compressed for.
    @property
    def _is_user_defined(self) -> bool:
        return bool(self.__dict__.get("_user_defined", False))

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        held = self.get_seq_length() if value and self.layers else 0
        if held:
            raise RuntimeError(
                f"zipvl: this cache already holds a generation ({held} positions): a ZipVLCache "
                "serves one generation, compressed for its own prompt. Start every generate() "
                "with a fresh cache, zipvl.models.new_cache(model)"
            )
        self.__dict__["_user_defined"] = value

    def __repr__(self) -> str:
        return (
            f"ZipVLCache(num_layers={self.num_layers}, layers={len(self.layers)}, "
            f"quantizer={self.quantizer!r}, recompress_every={self.recompress_every}, "
            f"sink_tokens={self.sink_tokens})"
        )


def _check_allocator(name: str, allocator: object) -> None:
    if not callable(allocator):
        raise TypeError(f"{name}: expected a callable Allocator, got {allocator!r}")


def _layer_overrides(
    name: str,
    overrides: Mapping[int, Any] | None,
    num_layers: int | None,
    check: Callable[[str, Any], None],
) -> dict[int, Any]:
    """A validated copy of a per-layer override mapping ``{layer_idx: component}``."""
    out = dict(overrides or {})
    for idx, component in out.items():
        check_int(f"{name} key", idx, 0)
        if num_layers is not None and idx >= num_layers:
            raise ValueError(
                f"{name}: expected layer indices < num_layers={num_layers}, got {idx}"
            )
        check(f"{name}[{idx}]", component)
    return out
