"""One layer of ZipVL's mixed-precision KV cache (arXiv 2410.08584 v1, Algorithm 1;
docs/algorithm.md#decoding).

The layer only stores and routes (style G5): scores come from ``zipvl.cache.scoring``, budget and
keep mask from the planning pipeline (``zipvl.sparsity.plan_scores``: the layer's allocator, then
its selector) and all bit-level work from a ``KVQuantizer``.

Storage, in position order (every region is contiguous in positions)::

    positions  0 .. Ns-1 | Ns ..                       | .. N-1
               sinks     | chunk 0 | chunk 1 | ...      | fp tail
               16-bit    | prefill | decode blocks      | 16-bit, newest tokens

* ``sink_keys`` / ``sink_values`` (B, Hkv, Ns, D): the first ``sink_tokens`` positions, kept at
  full precision (Ns <= sink_tokens; ``None`` when Ns = 0).
* ``chunks``: append-only list of ``QuantizedKV``; ``chunk_starts[i]`` is the position of the
  first token of ``chunks[i]`` and ``chunk_lengths[i]`` the number of its tokens that are still
  part of the sequence (smaller than ``chunks[i].num_tokens`` only after ``crop``). A chunk is
  never modified or re-quantized once written.
* ``tail_keys`` / ``tail_values`` (B, Hkv, Nt, D): full-precision tokens not compressed yet
  (``None`` when empty); ``compress_tail`` moves the oldest ``recompress_every`` of them into a
  new chunk.
* ``pending_keys`` / ``pending_values``: the prefill K/V between ``update`` and
  ``compress_prefill`` (the whole layer then, ``None`` otherwise).

Life cycle of a layer::

    update(k, v)          empty layer    -> pending = (k, v), returns (k, v) unchanged
    compress_prefill(keep)               -> sinks + one quantized prefill chunk
    update(k, v)          non-empty      -> appended to sinks (positions < sink_tokens) / tail,
                                            returns the dense K/V of all positions
    compress_tail(q)      after attention -> while tail >= recompress_every: score, plan,
                                            quantize the oldest block, append a chunk

Everything is plain PyTorch on the device of the first ``update``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from zipvl.cache.layer_base import CacheLayerBase
from zipvl.cache.scoring import check_key_valid, last_query_mass, sink_padding_error
from zipvl.checks import check_tensor
from zipvl.sparsity.pipeline import plan_scores
from zipvl.types import Scores, equalize_keep_counts

if TYPE_CHECKING:
    from zipvl.quant import KVQuantizer, QuantizedKV
    from zipvl.types import Allocator, MassReduce, Selector

__all__ = ["ZipVLCacheLayer"]

_FULL_PRECISION_BITS = 16


class ZipVLCacheLayer(CacheLayerBase):
    """Mixed-precision cache of one attention layer: fp sinks, quantized chunks, fp tail.

    Args:
        quantizer: compresses the prefill and every decode block (``KVQuantizer``).
        allocator: decode-block budget from the block's attention mass (Eq. 6).
        selector: decode-block keep mask from scores and budget (Eqs. 8/9).
        recompress_every: decode block size, >= 1 (ZipVL: 100).
        sink_tokens: leading positions kept at full precision, >= 0.
        auto_commit_prefill: commit a pending prefill with every token kept when the next
            ``update`` arrives, instead of raising.
        layer_idx: index of this layer, >= 0 (passed to the allocator, used in messages).
        mass_reduce: optional cross-process sum of a decode block's head-summed mass (KV heads
            split over processes), called once per block (``zipvl.sparsity.plan_scores``).

    Raises:
        TypeError: an argument of the wrong type (the message names it).
        ValueError: ``recompress_every`` < 1, ``sink_tokens`` < 0 or ``layer_idx`` < 0.

    Attributes (read by fused kernels; see the module docstring for the layout):
        sink_keys, sink_values, chunks, chunk_starts, chunk_lengths, tail_keys, tail_values,
        pending_keys, pending_values.
    """

    is_compileable = False
    # crop() truncates compressed chunks without restoring the fp tail they were built from, so a
    # rollback is not traceless (the transformers meaning of is_croppable).
    is_croppable = False
    is_sliding = False

    def __init__(
        self,
        *,
        quantizer: KVQuantizer,
        allocator: Allocator,
        selector: Selector,
        recompress_every: int,
        sink_tokens: int,
        auto_commit_prefill: bool = False,
        layer_idx: int = 0,
        mass_reduce: MassReduce | None = None,
    ) -> None:
        super().__init__()
        _check_quantizer("quantizer", quantizer)
        self._init_settings(
            quantizer, allocator, selector, recompress_every, sink_tokens, auto_commit_prefill,
            layer_idx, mass_reduce,
        )  # fmt: skip
        self._clear()

    # ------------------------------------------------------------------ state
    def _clear(self) -> None:
        self.sink_keys: Tensor | None = None
        self.sink_values: Tensor | None = None
        self.chunks: list[QuantizedKV] = []
        self.chunk_starts: list[int] = []
        self.chunk_lengths: list[int] = []
        self.tail_keys: Tensor | None = None
        self.tail_values: Tensor | None = None
        self.pending_keys: Tensor | None = None
        self.pending_values: Tensor | None = None
        # prefill selection stats (host ints, read back once in compress_prefill)
        self.prompt_tokens = 0
        self.kept_tokens = 0
        # decode-block stats: blocks, tokens per row, kept tokens per row
        self.decode_blocks = 0
        self.decode_block_tokens = 0
        self.decode_kept_tokens = 0
        # per-row bit counts of partially cropped chunks, {chunk index: {bits: mean tokens}}
        self._cropped_bits: dict[int, dict[int, float]] = {}

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Record batch, heads, head dim, dtype and device from the first K/V seen.

        Args:
            key_states: (B, Hkv, S, D) (S may be 0, as in ``Cache.early_initialization``).
            value_states: (B, Hkv, S, D).

        Raises:
            ValueError: the quantizer cannot handle this head dim (for example a group size
                that does not divide D).
        """
        b, h, _, d = key_states.shape
        _check_quantizer_fits(self.quantizer, h, d, self.layer_idx)
        self.dtype = key_states.dtype
        self.device = key_states.device
        self._batch_size, self.num_heads, self.head_dim = b, h, d
        self.is_initialized = True

    def reset(self) -> None:
        """Drop every token and statistic; the next ``update`` is a prefill again."""
        self._clear()
        self.is_initialized = False

    # ------------------------------------------------------------------ sizes
    @property
    def num_sinks(self) -> int:
        """Ns, positions held in the full-precision sink region."""
        return 0 if self.sink_keys is None else self.sink_keys.shape[-2]

    @property
    def tail_length(self) -> int:
        """Nt, positions held in the full-precision tail."""
        return 0 if self.tail_keys is None else self.tail_keys.shape[-2]

    @property
    def has_pending_prefill(self) -> bool:
        """True between a prefill ``update`` and its ``compress_prefill``."""
        return self.pending_keys is not None

    def get_seq_length(self) -> int:
        """Number of cached positions (pending prefill included)."""
        if self.pending_keys is not None:
            return self.pending_keys.shape[-2]
        return self.num_sinks + sum(self.chunk_lengths) + self.tail_length

    # ------------------------------------------------------------------ write path
    def append(self, key_states: Tensor, value_states: Tensor) -> bool:
        """Store new K/V without reading anything back.

        Fused decode kernels (``zipvl.decode``) read the stored runs themselves, so they append
        and skip the dense read of ``update``.

        Args:
            key_states: (B, Hkv, S, D) new keys (RoPE applied), S >= 1.
            value_states: (B, Hkv, S, D) new values.

        Returns:
            True when the K/V became the pending prefill (the layer was empty).

        Raises:
            ValueError: shapes, dtype or device differ from the layer's.
            RuntimeError: a pending prefill was never committed by ``compress_prefill`` (and
                ``auto_commit_prefill`` is off).
        """
        self._check_kv(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending_keys is not None:
            if not self.auto_commit_prefill:
                raise self._pending_error()
            self.compress_prefill(None)
        if self.get_seq_length() == 0:
            self.pending_keys, self.pending_values = key_states, value_states
            return True
        # positions < sink_tokens (a short prompt or a crop into the sinks) go to the sinks
        n_sink = min(max(self.sink_tokens - self.get_seq_length(), 0), key_states.shape[-2])
        if n_sink > 0:
            self.sink_keys = _cat(self.sink_keys, key_states[:, :, :n_sink])
            self.sink_values = _cat(self.sink_values, value_states[:, :, :n_sink])
        if n_sink < key_states.shape[-2]:
            self.tail_keys = _cat(self.tail_keys, key_states[:, :, n_sink:])
            self.tail_values = _cat(self.tail_values, value_states[:, :, n_sink:])
        return False

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Add new K/V and return what attention should read.

        Args:
            key_states: (B, Hkv, S, D) new keys (RoPE applied), S >= 1.
            value_states: (B, Hkv, S, D) new values.
            *args, **kwargs: ignored (transformers passes ``cache_kwargs``).

        Returns:
            On an empty layer (prefill): ``(key_states, value_states)`` unchanged, held as the
            pending prefill. Otherwise the dense ``(K, V)`` of all positions in position order,
            (B, Hkv, N, D) each, in the cache dtype.

        Raises:
            ValueError: shapes, dtype or device differ from the layer's.
            RuntimeError: a pending prefill was never committed by ``compress_prefill`` (and
                ``auto_commit_prefill`` is off).
        """
        if self.append(key_states, value_states):
            return key_states, value_states
        return self.dense_kv()

    def compress_prefill(self, keep: Tensor | None, *, key_valid: Tensor | None = None) -> None:
        """Commit the pending prefill: sinks stay fp, the rest becomes one quantized chunk.

        Tokens of a keep row that fall in the sink region are stored at 16 bits anyway. So that
        the quantized part still has the same number of kept tokens in every row (the
        ``KVQuantizer`` contract), rows that lost kept tokens to the sinks get their latest
        unkept tokens promoted to high precision: precision is only ever raised, never lowered.

        Padding (``key_valid``): padding positions are stored like every position (the layout
        and the accounting do not change), but their K/V never enter the quantization
        statistics: before quantizing, each padding position takes the K/V of a real token of
        the same (b, h) row stored at the same precision (or any real token of the row when that
        precision holds none), which leaves every per-part min / max unchanged. The real
        tokens of a padded row are therefore quantized exactly as if the row were alone.

        Host syncs: one read of a few integers (row counts, and the sink check with
        ``key_valid``), none with ``keep=None`` and ``key_valid=None``.

        Args:
            keep: (B, Hkv, S) bool over the pending prefill, True = important (high bits), the
                same count in every row; ``None`` keeps every token.
            key_valid: optional (B, S) bool, True = real token, False = padding.

        Raises:
            RuntimeError: no pending prefill in this layer.
            ValueError: ``keep`` / ``key_valid`` have the wrong shape, dtype or device, ``keep``
                has unequal row counts, or ``sink_tokens > 0`` while some row has padding among
                its first ``sink_tokens`` positions (left padding: the full-precision sinks
                would be padding; build the cache with ``sink_tokens=0`` for such batches).
        """
        if self.pending_keys is None or self.pending_values is None:
            raise RuntimeError(
                f"layer {self.layer_idx}: compress_prefill needs a pending prefill (an update on "
                f"an empty layer), but the layer holds {self.get_seq_length()} committed positions"
            )
        k, v = self.pending_keys, self.pending_values  # (B, Hkv, S, D)
        b, h, s = k.shape[:3]
        ns = min(self.sink_tokens, s)
        if keep is not None:
            check_tensor("keep", keep, ndim=3, dtype=torch.bool)
            if tuple(keep.shape) != (b, h, s):
                raise ValueError(
                    f"keep: expected shape (B, Hkv, S) = {(b, h, s)} like the pending prefill of "
                    f"layer {self.layer_idx}, got {tuple(keep.shape)}"
                )
            if keep.device != k.device:
                raise ValueError(f"keep: expected device {k.device}, got {keep.device}")
        if key_valid is not None:
            check_key_valid(key_valid, b, s, k.device)
        rest_keep = None
        if keep is not None and ns < s:
            # without sinks the counts are those of keep, checked below: nothing to equalize
            rest_keep = equalize_keep_counts(keep[:, :, ns:]) if ns else keep
        kept, rest_kept = s, None
        # the one host read of the prefill commit: validation, stats, the quantizer's count
        reads: dict[str, Tensor] = {}
        if keep is not None:
            reads["lo"], reads["hi"] = torch.aminmax(keep.sum(-1))  # row counts
            if rest_keep is not None and ns:
                reads["rest"] = rest_keep[0, 0].sum()  # rows are equal after equalize_keep_counts
        fin = torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)  # (B, Hkv, S)
        real = fin.all(1) if key_valid is None else fin.all(1) | ~key_valid
        reads["finite"] = real.all()  # padding may hold anything
        if key_valid is not None:
            reads["all_real"] = key_valid.all()
            if ns > 0:
                reads["real_sinks"] = key_valid[:, :ns].all()
        host: dict[str, int] = {}
        if reads:
            vals = torch.stack([t.to(torch.int64) for t in reads.values()]).tolist()
            host = dict(zip(reads, vals, strict=True))
        if keep is not None:
            if host["lo"] != host["hi"]:
                raise ValueError(
                    "keep: expected the same number of kept tokens in every (b, h) row, got "
                    f"counts from {host['lo']} to {host['hi']}"
                )
            kept = host["lo"]
            rest_kept = host.get("rest", kept)
        if not host["finite"]:
            raise ValueError(
                "key_states: the prompt's keys or values hold NaN or infinity; they would "
                "poison the quantization parameters of every token that shares a chunk"
            )
        if not host.get("real_sinks", 1):
            raise sink_padding_error(ns)
        if ns > 0:
            # clone: a slice would keep the whole prefill storage alive behind the sinks
            self.sink_keys, self.sink_values = k[:, :, :ns].clone(), v[:, :, :ns].clone()
        if ns < s:
            rk, rv = k[:, :, ns:], v[:, :, ns:]  # (B, Hkv, S - Ns, D)
            # the quantizer gets the count read above and reads nothing back itself
            if key_valid is not None and not host["all_real"]:
                src = _padding_sources(key_valid[:, ns:], rest_keep, h)  # (B, Hkv, S - Ns)
                gi = src.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])  # (B, Hkv, S - Ns, D)
                rk, rv = rk.gather(2, gi), rv.gather(2, gi)
            chunk = self.quantizer.quantize(rk, rv, keep=rest_keep, num_kept=rest_kept)
            self._append_chunk(chunk, start=ns, length=s - ns)
        self.pending_keys = self.pending_values = None
        self.prompt_tokens, self.kept_tokens = s, kept

    def compress_tail(
        self,
        query: Tensor,
        *,
        keys: Tensor | None = None,
        scale: float | None = None,
        key_valid: Tensor | None = None,
    ) -> int:
        """Compress full blocks of the fp tail (ZipVL Algorithm 1, decode branch).

        While the tail holds at least ``recompress_every`` tokens, its oldest ``recompress_every``
        tokens form a block: scored by the softmax of the last query row over ALL cached keys
        (float32, summed over each GQA group), budgeted by the allocator (``tau`` x the block's
        total mass), selected by the selector and quantized into a new chunk. Call it AFTER the
        step's attention. Without a full block it returns at once (no work, no sync).

        Host syncs per compressed block: those of the allocator and the selector (the kept
        count); the quantizer gets that count and reads nothing back.

        Args:
            query: (B, Hq, Sq, D) queries of the step, RoPE applied; the last row is used.
            keys: optional (B, Hkv, N, D) dense keys of all N cached positions in position order
                (what ``update`` just returned), to skip a second dequantization.
            scale: softmax scale of the model (``None``: 1 / sqrt(D)).
            key_valid: optional (B, N) bool over all N cached positions, True = real token:
                padding keys get zero probability in the block scores (the softmax runs over
                each row's real keys only). ``None``: every position is real.

        Returns:
            Number of blocks compressed.

        Raises:
            RuntimeError: the layer is empty or its prefill is still pending.
            ValueError: ``query`` / ``keys`` / ``key_valid`` shapes do not match the cache
                (checked on every call, also when there is no full block).
        """
        if not self.is_initialized:
            raise RuntimeError(
                f"layer {self.layer_idx}: compress_tail on a layer that holds nothing"
            )
        if self.pending_keys is not None:
            raise RuntimeError(
                f"layer {self.layer_idx}: compress_tail called while the prefill is still "
                "pending: call compress_prefill(layer_idx, keep) first"
            )
        self._check_query(query)
        if keys is not None:
            check_tensor("keys", keys, ndim=4, floating=True)
            want = (self.batch_size, self.num_heads, self.get_seq_length(), self.head_dim)
            if tuple(keys.shape) != want:
                raise ValueError(
                    f"keys: expected the dense keys of layer {self.layer_idx}, shape {want}, "
                    f"got {tuple(keys.shape)}"
                )
        if key_valid is not None:
            check_key_valid(key_valid, self.batch_size, self.get_seq_length(), self.device)
        r = self.recompress_every
        if self.tail_length < r:
            return 0
        if keys is None:
            keys = self.dense_kv()[0]
        mass = last_query_mass(query, keys, scale=scale, key_valid=key_valid)  # (B, Hkv, N)
        done = 0
        while self.tail_length >= r:
            assert self.tail_keys is not None and self.tail_values is not None
            start = self.get_seq_length() - self.tail_length
            block_mass = mass[:, :, start : start + r]  # (B, Hkv, R)
            # one decode query row: the normalized score of Eq. 7 is the raw mass
            selection = plan_scores(
                Scores(mass=block_mass, normalized=block_mass),
                allocator=self.allocator,
                selector=self.selector,
                layer_idx=self.layer_idx,
                mass_reduce=self.mass_reduce,
            ).selection
            chunk = self.quantizer.quantize(
                self.tail_keys[:, :, :r],
                self.tail_values[:, :, :r],
                keep=selection.keep,
                num_kept=selection.num_kept,
            )
            self._append_chunk(chunk, start=start, length=r)
            # clone: a slice would keep the whole old tail storage alive behind a smaller view
            rest = self.tail_length - r
            self.tail_keys = self.tail_keys[:, :, r:].clone() if rest else None
            self.tail_values = self.tail_values[:, :, r:].clone() if rest else None
            self.decode_blocks += 1
            self.decode_block_tokens += r
            self.decode_kept_tokens += selection.num_kept
            done += 1
        return done

    def _append_chunk(self, chunk: QuantizedKV, *, start: int, length: int) -> None:
        if chunk.num_tokens != length:
            raise RuntimeError(
                f"quantizer: returned a chunk of {chunk.num_tokens} tokens for {length} inputs"
            )
        self.chunks.append(chunk)
        self.chunk_starts.append(start)
        self.chunk_lengths.append(length)

    # ------------------------------------------------------------------ read path
    def dense_kv(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """The reference read path: every cached position, dequantized, in position order.

        Args:
            dtype: output dtype (default: the cache dtype, i.e. the dtype of the inputs).

        Returns:
            (K, V) with shapes (B, Hkv, N, D) each, N = ``get_seq_length()``.

        Raises:
            RuntimeError: the layer was never initialized.
        """
        if not self.is_initialized:
            raise RuntimeError(f"layer {self.layer_idx}: dense_kv on a layer that holds nothing")
        dtype = self.dtype if dtype is None else dtype
        if self.pending_keys is not None and self.pending_values is not None:
            return self.pending_keys.to(dtype), self.pending_values.to(dtype)
        ks: list[Tensor] = []
        vs: list[Tensor] = []
        if self.sink_keys is not None and self.sink_values is not None:
            ks.append(self.sink_keys)
            vs.append(self.sink_values)
        for chunk, length in zip(self.chunks, self.chunk_lengths, strict=True):
            ck, cv = self.quantizer.dequantize(chunk, dtype=dtype)  # (B, Hkv, T, D)
            ks.append(ck[:, :, :length])
            vs.append(cv[:, :, :length])
        if self.tail_keys is not None and self.tail_values is not None:
            ks.append(self.tail_keys)
            vs.append(self.tail_values)
        if not ks:
            b, h = self.batch_size, self.num_heads
            empty = torch.empty(b, h, 0, self.head_dim, dtype=dtype, device=self.device)
            return empty, empty.clone()
        keys = torch.cat([t.to(dtype) for t in ks], dim=-2)  # (B, Hkv, N, D)
        values = torch.cat([t.to(dtype) for t in vs], dim=-2)  # (B, Hkv, N, D)
        return keys, values

    # ------------------------------------------------------------------ edits
    def crop_to(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions exactly (``0`` empties the layer).

        Full-precision regions (pending prefill, sinks, tail) are sliced and copied, so their
        memory is freed. Chunks that start at or after ``max_length`` are dropped. A chunk that
        straddles ``max_length`` is kept whole (never re-quantized) and only its first
        ``max_length - start`` tokens are read and counted from then on: its bytes stay held
        until the layer is reset. Tokens appended later go to the tail at the right positions.

        Args:
            max_length: positions to keep, >= 0; values >= the current length are a no-op.
        """
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 0:
            raise ValueError(f"max_length: expected an int >= 0, got {max_length!r}")
        n = self.get_seq_length()
        if max_length >= n:
            return
        if max_length == 0:
            self._clear()  # the layer stays initialized: shapes and dtype are unchanged
            return
        if self.pending_keys is not None and self.pending_values is not None:
            self.pending_keys = self.pending_keys[:, :, :max_length].clone()
            self.pending_values = self.pending_values[:, :, :max_length].clone()
            return
        ns = self.num_sinks
        if max_length < ns and self.sink_keys is not None and self.sink_values is not None:
            self.sink_keys = self.sink_keys[:, :, :max_length].clone()
            self.sink_values = self.sink_values[:, :, :max_length].clone()
        keep_chunks = 0
        spans = zip(self.chunk_starts, self.chunk_lengths, strict=True)
        for i, (start, length) in enumerate(spans):
            if start >= max_length:
                break
            keep_chunks = i + 1
            if start + length > max_length:
                self.chunk_lengths[i] = max_length - start
                self._cropped_bits[i] = _prefix_tokens_at_bits(
                    self.chunks[i], self.chunk_lengths[i]
                )
        del self.chunks[keep_chunks:], self.chunk_starts[keep_chunks:]
        del self.chunk_lengths[keep_chunks:]
        self._cropped_bits = {i: c for i, c in self._cropped_bits.items() if i < keep_chunks}
        tail_start = n - self.tail_length
        if self.tail_keys is not None and self.tail_values is not None:
            if max_length <= tail_start:
                self.tail_keys = self.tail_values = None
            else:
                self.tail_keys = self.tail_keys[:, :, : max_length - tail_start].clone()
                self.tail_values = self.tail_values[:, :, : max_length - tail_start].clone()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder (or repeat, or select) the batch rows of every region: ``x = x[beam_idx]``.

        Args:
            beam_idx: (B',) int64 batch indices into the current batch.
        """
        if not self.is_initialized:
            return
        check_tensor("beam_idx", beam_idx, ndim=1, dtype=(torch.int64, torch.int32))
        idx = beam_idx.to(device=self.device, dtype=torch.int64)  # (B',)

        def sel(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.index_select(0, idx)

        self.sink_keys, self.sink_values = sel(self.sink_keys), sel(self.sink_values)
        self.tail_keys, self.tail_values = sel(self.tail_keys), sel(self.tail_values)
        self.pending_keys, self.pending_values = sel(self.pending_keys), sel(self.pending_values)
        self.chunks = [c.index_select_batch(idx) for c in self.chunks]
        self._batch_size = idx.shape[0]
        if self._cropped_bits:
            # per-row counts of cropped chunks depend on which rows remain
            self._cropped_bits = {
                i: _prefix_tokens_at_bits(self.chunks[i], self.chunk_lengths[i])
                for i in self._cropped_bits
            }

    # ------------------------------------------------------------------ accounting
    def tensors(self) -> list[Tensor]:
        """Every fp tensor the layer holds itself (sinks, tail, pending), chunks excluded."""
        return [
            t
            for t in (
                self.sink_keys,
                self.sink_values,
                self.tail_keys,
                self.tail_values,
                self.pending_keys,
                self.pending_values,
            )
            if t is not None
        ]

    def nbytes(self) -> int:
        """Bytes held: fp regions plus the exact ``nbytes`` of every chunk (cropped ones whole)."""
        return sum(t.nbytes for t in self.tensors()) + sum(c.nbytes for c in self.chunks)

    def tokens_at_bits(self) -> dict[int, float]:
        """Bit width -> mean positions per (b, h) row stored at that width (16 = full precision).

        Values sum to ``get_seq_length()``.
        """
        out: dict[int, float] = {}
        fp = self.num_sinks + self.tail_length
        if self.pending_keys is not None:
            fp += self.pending_keys.shape[-2]
        if fp:
            out[_FULL_PRECISION_BITS] = float(fp)
        for i, chunk in enumerate(self.chunks):
            counts = self._cropped_bits.get(i)
            if counts is None:
                counts = {b: float(n) for b, n in chunk.tokens_at_bits().items()}
            for bits, n in counts.items():
                if n:
                    out[bits] = out.get(bits, 0.0) + n
        return dict(sorted(out.items(), reverse=True))


def _check_quantizer(name: str, quantizer: object) -> None:
    for method in ("quantize", "dequantize"):
        if not callable(getattr(quantizer, method, None)):
            raise TypeError(
                f"{name}: expected a KVQuantizer with quantize() and dequantize(), got "
                f"{type(quantizer).__name__} without {method}()"
            )


def _cat(old: Tensor | None, new: Tensor) -> Tensor:
    # cat always copies, so the cache never aliases the caller's tensor
    return new.clone() if old is None else torch.cat([old, new], dim=-2)


def _padding_sources(valid: Tensor, keep: Tensor | None, num_heads: int) -> Tensor:
    """Where each position takes its K/V from before quantizing: itself when it is a real
    token; for padding, the first real token of the same (b, h) row and the same part (kept /
    not kept), else the first real token of the row, else itself (a row of padding only).

    Args:
        valid: (B, T) bool, True = real token.
        keep: (B, Hkv, T) bool parts of the chunk, or None (one part).
        num_heads: Hkv.

    Returns:
        (B, Hkv, T) int64 source positions (no host sync).
    """
    b, t = valid.shape
    pos = torch.arange(t, device=valid.device)  # (T,)
    vb = valid[:, None, :].expand(b, num_heads, t)  # (B, Hkv, T)
    none = torch.full((), t, device=valid.device)

    def first(mask: Tensor) -> Tensor:  # (B, Hkv, T) -> (B, Hkv, 1), t where mask is empty
        return torch.where(mask, pos, none).amin(-1, keepdim=True)

    any_real = first(vb)  # (B, Hkv, 1)
    if keep is None:
        fill = any_real
    else:
        hi, lo = first(vb & keep), first(vb & ~keep)  # (B, Hkv, 1) each
        fill = torch.where(keep, hi, lo)  # (B, Hkv, T)
        fill = torch.where(fill < t, fill, any_real)
    fill = torch.where(fill < t, fill, pos)  # a row of padding only keeps its own K/V
    return torch.where(vb, pos, fill)  # (B, Hkv, T)


def _prefix_tokens_at_bits(chunk: QuantizedKV, length: int) -> dict[int, float]:
    """Mean per-row count of each bit width among the first ``length`` tokens of ``chunk``.

    Reads the chunk's own layout: one part stores every token at its width; two parts store
    the tokens flagged in the packed ``keep`` bitmap in ``parts[0]`` and the others in
    ``parts[1]``. One host read (only after a crop cuts through a chunk).
    """
    if len(chunk.parts) == 1:
        return {chunk.parts[0].bits: float(length)}
    from zipvl.quant import unpack_bitmap

    assert chunk.keep is not None  # QuantizedKV invariant: two parts come with a bitmap
    keep = unpack_bitmap(chunk.keep, chunk.num_tokens)[:, :, :length]  # (B, Hkv, length)
    rows = keep.shape[0] * keep.shape[1]
    hi = float(keep.sum().item()) / rows if rows else 0.0
    out: dict[int, float] = {}
    for bits, n in ((chunk.parts[0].bits, hi), (chunk.parts[1].bits, length - hi)):
        out[bits] = out.get(bits, 0.0) + n
    return out


def _check_quantizer_fits(
    quantizer: KVQuantizer, num_heads: int, head_dim: int, layer: int
) -> None:
    """Ask the quantizer for its cost at this head dim: it raises for a group size that does
    not divide D (the ``KVQuantizer.bytes_per_token`` contract), before any data is stored."""
    try:
        for ratio in (0.0, 1.0):  # a mixed quantizer checks its high and its low part
            quantizer.bytes_per_token(num_heads, head_dim, ratio, 2)
    except ValueError as err:
        raise ValueError(
            f"quantizer: {type(quantizer).__name__} cannot store head dim {head_dim} of layer "
            f"{layer}: {err}"
        ) from err
