"""One layer of ZipVL's cache over paged storage (``zipvl.cache.paged``): the fast decode path.

The layer is a state machine with three explicit states::

    EMPTY    --update(k, v)-->          PENDING  (the prompt K/V, held as given)
    PENDING  --compress_prefill(keep)--> DECODE  (sinks fp, kept tokens high bits, rest low)
    DECODE   --update(k, v)-->          DECODE  (new tokens appended to the fp tail)
    DECODE   --compress_tail(q, lse)--> DECODE  (every full block of R tokens scored, split,
                                                 staged and paged)

In DECODE, ``update`` appends and returns only the new K/V: attention reads the store itself
(``zipvl.decode.decode_attention``, one fused launch), so no dense K/V is ever materialised. A
decode block is scored from the step's log-sum-exp (returned by the decode kernel) and the
block's own full-precision keys: no key outside the block is read again.

Rows are independent: every batch row gets its own budget for every block (the allocator runs
on that row's mass alone), its own kept count and page count; padding is never stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from zipvl.cache.layer_base import CacheLayerBase
from zipvl.cache.paged import PagedKVStore, PageFormat
from zipvl.cache.scoring import check_key_valid, lse_block_mass
from zipvl.checks import check_int, check_scale, check_tensor
from zipvl.impl import PAGE_WRITE_IMPLS, Impl, parse_impl
from zipvl.sparsity.pipeline import plan_row_keep
from zipvl.types import Scores

if TYPE_CHECKING:
    from zipvl.quant import KVQuantizer
    from zipvl.types import Allocator, MassReduce, Selector

__all__ = ["DECODE", "EMPTY", "PENDING", "PagedCacheLayer"]

EMPTY, PENDING, DECODE = "empty", "pending", "decode"
_LOG2E = 1.4426950408889634


class PagedCacheLayer(CacheLayerBase):
    """Mixed-precision cache of one attention layer in pages (module docstring).

    Args:
        quantizer: a quantizer with a paged layout (``zipvl.cache.paged.page_format_problem``).
        allocator: decode-block budget from one batch row's block mass (Eq. 6).
        selector: decode-block keep mask from scores and per-row budgets (``keep_mask``).
        recompress_every: decode block size R, >= 1 (ZipVL: 100).
        sink_tokens: leading positions kept at full precision, >= 0.
        auto_commit_prefill: commit a pending prefill with every token kept when the next
            ``update`` arrives, instead of raising.
        layer_idx: index of this layer (used in messages).
        mass_reduce: optional cross-process sum of a decode block's head-summed mass (KV heads
            split over processes), called once per block (``zipvl.sparsity.plan_row_keep``).
        page_size: tokens per page (a multiple of 16).
        code_order: ``PageFormat.code_order`` of the pages (``"auto"``: the fragment order
            the fused decode's fastest kernel reads, where the head dim and page size allow).
        tail_slack: tail capacity beyond R (tokens one step may add past a full block).
        update_reads: what ``update`` returns in decode: ``"dense"`` (every position, the
            reference read any attention can use) or ``"none"`` (only the new K/V: for an
            attention that reads the store itself, such as the one ``zipvl.enable`` registers;
            an ``update`` whose K/V were not taken by it raises).

    Raises:
        ValueError: the quantizer has no paged layout, or an argument is out of range.
    """

    is_compileable = False
    is_croppable = True
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
        page_size: int = 128,
        code_order: str = "auto",
        tail_slack: int = 64,
        update_reads: str = "dense",
        write_impl: Impl | str = Impl.AUTO,
    ) -> None:
        super().__init__()
        if update_reads not in ("dense", "none"):
            raise ValueError(f"update_reads: expected 'dense' or 'none', got {update_reads!r}")
        self.update_reads = update_reads
        self.fmt = PageFormat.from_quantizer(
            quantizer, check_int("page_size", page_size, 16), code_order
        )
        self._init_settings(
            quantizer, allocator, selector, recompress_every, sink_tokens, auto_commit_prefill,
            layer_idx, mass_reduce,
        )  # fmt: skip
        self.tail_slack = check_int("tail_slack", tail_slack, 1)
        self.write_impl = parse_impl("write_impl", write_impl, PAGE_WRITE_IMPLS)
        self._clear()

    # ------------------------------------------------------------------ state
    def _clear(self) -> None:
        self.state = EMPTY
        self.store: PagedKVStore | None = None
        self.pending_keys: Tensor | None = None
        self.pending_values: Tensor | None = None
        self.pending_valid: Tensor | None = None
        self.prompt_tokens = 0
        self.kept_tokens = 0
        self.decode_blocks = 0
        self.decode_block_tokens = 0
        self._decode_kept = None  # device accumulator of kept block tokens (mean per row)
        self._unread: Tensor | None = None  # new K/V returned by update, not yet attended
        self.mask_checked = False
        # (q, lse2, scale) of a recorded decode step (zipvl.models.captured): the replayer
        # runs compress_tail from them after every replay
        self.step_inputs: tuple[Tensor, Tensor, float | None] | None = None

    @property
    def decode_kept_tokens(self) -> float:
        """Mean kept tokens per row over all decode blocks (one host read)."""
        return 0.0 if self._decode_kept is None else float(self._decode_kept.item())

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Record batch, heads, head dim, dtype and device; build the (empty) store."""
        b, h, _, d = key_states.shape
        self.dtype = key_states.dtype
        self.device = key_states.device
        self._batch_size, self.num_heads, self.head_dim = b, h, d
        try:
            self.store = self._new_store(key_states)
        except ValueError as err:
            if str(err).startswith("write_impl:"):  # the cache's name for the setting
                raise ValueError("page_write_impl:" + str(err)[len("write_impl:") :]) from None
            raise
        self.is_initialized = True

    def _new_store(self, key_states: Tensor) -> PagedKVStore:
        b, h, _, d = key_states.shape
        return PagedKVStore(
            self.fmt,
            batch_size=b,
            num_heads=h,
            head_dim=d,
            dtype=key_states.dtype,
            device=key_states.device,
            recompress_every=self.recompress_every,
            sink_tokens=self.sink_tokens,
            tail_slack=self.tail_slack,
            write_impl=self.write_impl,
        )

    def reset(self) -> None:
        """Drop every token and statistic; the next ``update`` is a prefill again."""
        self._clear()
        self.is_initialized = False

    @property
    def has_pending_prefill(self) -> bool:
        return self.state == PENDING

    @property
    def num_sinks(self) -> int:
        return 0 if self.store is None else self.store.num_sinks

    @property
    def tail_length(self) -> int:
        return 0 if self.store is None else self.store.tail_length

    def get_seq_length(self) -> int:
        """Number of cached positions (pending prefill and padding included)."""
        if self.state == PENDING:
            assert self.pending_keys is not None
            return self.pending_keys.shape[-2]
        return 0 if self.store is None or self.state == EMPTY else self.store.length

    # ------------------------------------------------------------------ write path
    def append(self, key_states: Tensor, value_states: Tensor) -> bool:
        """Store new K/V without reading anything back.

        Returns:
            True when the K/V became the pending prefill (the layer was empty).

        Raises:
            ValueError: shapes, dtype or device differ from the layer's, or the tail is full.
            RuntimeError: a pending prefill was never committed (and ``auto_commit_prefill``
                is off).
        """
        self._check_kv(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.state == PENDING:
            if not self.auto_commit_prefill:
                raise self._pending_error()
            self.compress_prefill(None)
        if self.state == EMPTY:
            self.pending_keys, self.pending_values = key_states, value_states
            self.state = PENDING
            return True
        assert self.store is not None
        self.store.append(key_states, value_states)
        return False

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Add new K/V and return what attention should read.

        Returns:
            On an empty layer (prefill): the inputs, held as the pending prefill. In decode:
            the dense K/V of all positions (the reference read, ``dense_kv``). transformers
            models enabled with ``zipvl.enable`` do not come here in decode: their cache
            appends and the attention function reads the pages directly.
        """
        if self.update_reads == "none" and self._unread is not None:
            raise RuntimeError(
                f"layer {self.layer_idx}: the K/V of the previous step were never read by "
                "ZipVL's attention: this cache returns only the new K/V in decode and must be "
                "used with the attention registered by zipvl.enable (or build it with "
                "update_reads='dense')"
            )
        if self.append(key_states, value_states):
            return key_states, value_states
        if self.update_reads == "none":
            self._unread = key_states
            return key_states, value_states
        return self.dense_kv()

    def take_unread(self, key: Tensor) -> bool:
        """Whether ``key`` is what the last decode ``update`` returned (and mark it read)."""
        ok = self._unread is key
        self._unread = None
        return ok

    def check_commit(self, keep: Tensor | None, key_valid: Tensor | None) -> None:
        """The checks of ``compress_prefill`` (state, ``keep`` and ``key_valid`` against the
        pending prefill), without committing.

        Raises:
            RuntimeError: no pending prefill.
            ValueError: bad ``keep`` / ``key_valid``.
        """
        if self.state != PENDING:
            raise RuntimeError(
                f"layer {self.layer_idx}: compress_prefill needs a pending prefill (an update on "
                f"an empty layer), but the layer is in state {self.state!r}"
            )
        assert self.pending_keys is not None
        k = self.pending_keys
        b, h, s = k.shape[:3]
        if keep is not None:
            check_tensor("keep", keep, ndim=3, dtype=torch.bool)
            if tuple(keep.shape) != (b, h, s) or keep.device != k.device:
                raise ValueError(
                    f"keep: expected shape (B, Hkv, S) = {(b, h, s)} on {k.device} like the "
                    f"pending prefill of layer {self.layer_idx}, got {tuple(keep.shape)} on "
                    f"{keep.device}"
                )
        if key_valid is not None:
            check_key_valid(key_valid, b, s, k.device)

    def compress_prefill(
        self,
        keep: Tensor | None,
        *,
        key_valid: Tensor | None = None,
        kept_rows: Sequence[int] | None = None,
        real_rows: Sequence[int] | None = None,
    ) -> None:
        """Commit the pending prefill: sinks fp, ``keep`` tokens high bits, the rest low.

        Rows are independent: ``keep`` may hold a different count in every (b, h) row, and
        padding (``key_valid`` False) is not stored at all. One host read, none when the
        caller knows the kept counts (``kept_rows``: what the attention of ``zipvl.enable``,
        ``zipvl_attention`` and ``ZipVLAttention`` pass from their plan's one read).

        Args:
            keep: (B, Hkv, S) bool over the pending prefill, True = important; None = all.
            key_valid: optional (B, S) bool, True = real token, False = padding.
            kept_rows: per batch row, the real tokens ``keep`` holds in each of its (b, h)
                rows (``PagedKVStore.write_prefill``: then nothing is read back and
                non-finite K/V are stored as 0 in their own token instead of raising).
            real_rows: per batch row, its real tokens (needed with ``key_valid``).

        Raises:
            RuntimeError: no pending prefill.
            ValueError: bad ``keep`` / ``key_valid``, or padding among the first
                ``sink_tokens`` positions of some row (sinks are positional).
        """
        self.check_commit(keep, key_valid)
        assert self.pending_keys is not None and self.pending_values is not None
        assert self.store is not None
        k, v = self.pending_keys, self.pending_values
        s = k.shape[2]
        ns = min(self.sink_tokens, s)
        stats = self.store.write_prefill(
            k, v, keep, key_valid, ns, kept_rows=kept_rows, real_rows=real_rows
        )
        self.pending_keys = self.pending_values = None
        self.state = DECODE
        self.prompt_tokens = s
        if keep is None:
            self.kept_tokens = s
        elif isinstance(stats["kept"], Tensor):  # no host read: counted when asked
            self._kept_counts = torch.stack(
                [stats["kept"], stats["real"], stats["over"].to(stats["kept"].dtype)]
            )
        else:
            self.kept_tokens = self._kept_ratio_tokens(stats["kept"], stats["real"])

    def _kept_ratio_tokens(self, kept: int, real: int) -> int:
        return round(self.prompt_tokens * kept / real) if real else 0

    @property
    def kept_tokens(self) -> int:
        """Prompt tokens kept at high precision (the kept share of the real compressible
        tokens, scaled to the prompt length); one host read the first time after a commit
        that read nothing."""
        if self._kept_counts is not None:
            kept, real, over = self._kept_counts.tolist()
            self._kept_counts = None
            if over:
                raise ValueError(
                    f"kept_rows: layer {self.layer_idx}'s prompt held more kept (or unkept) "
                    "tokens in some row than the counts passed to compress_prefill allow; "
                    "pages past the bounds were not stored. Pass the plan's own counts "
                    "(PrefillResult.kept_tokens with PrefillResult.commit_keep)"
                )
            self._kept_tokens = self._kept_ratio_tokens(kept, real)
        return self._kept_tokens

    @kept_tokens.setter
    def kept_tokens(self, value: int) -> None:
        self._kept_counts = None
        self._kept_tokens = value

    def compress_tail(
        self,
        query: Tensor,
        *,
        lse2: Tensor | None = None,
        keys: Tensor | None = None,
        scale: float | None = None,
        key_valid: Tensor | None = None,
    ) -> int:
        """Compress every full block of R tail tokens (ZipVL Algorithm 1, decode branch).

        A block's scores are the softmax probabilities of the step's last query row on the
        block's keys, summed over each GQA group: ``exp2(q2 . k - lse2)`` with ``lse2`` the
        step's log-sum-exp over ALL cached keys (from ``decode_attention``; computed from the
        dense keys when not given). ``zipvl.sparsity.plan_row_keep`` budgets each batch row on
        its own and the selector's ``keep_mask`` picks the tokens. No host sync.

        Args:
            query: (B, Hq, Sq, D) queries of the step, RoPE applied; the last row is used.
            lse2: optional (B, Hq) float32 log2-domain log-sum-exp of the last row.
            keys: ignored unless ``lse2`` is None: (B, Hkv, N, D) dense keys to compute it.
            scale: softmax scale of the model (None: 1 / sqrt(D)).
            key_valid: optional (B, N) bool over all cached positions (when ``lse2`` is None).

        Returns:
            Number of blocks compressed.
        """
        if self.state != DECODE or self.store is None:
            raise RuntimeError(
                f"layer {self.layer_idx}: compress_tail needs a committed prefill (state "
                f"{self.state!r})"
            )
        b, hq, d = self._check_query(query)
        r = self.recompress_every
        if self.store.tail_length < r:
            return 0
        sm = check_scale("scale", scale)
        sm = (sm if sm is not None else 1.0 / math.sqrt(d)) * _LOG2E
        h, g = self.num_heads, hq // self.num_heads
        q2 = query[:, :, -1].float().reshape(b, h, g, d) * sm  # (B, Hkv, G, D)
        if lse2 is None:
            dk, _ = self.dense_kv(torch.float32) if keys is None else (keys.float(), None)
            s_all = torch.einsum("bhgd,bhnd->bhgn", q2, dk)
            if key_valid is not None:
                s_all = s_all.masked_fill(~key_valid[:, None, None, :], float("-inf"))
            elif self.store.pad.any():
                pos = torch.arange(s_all.shape[-1], device=s_all.device)
                pad = pos[None, :] < self.store.pad[:, None]  # (B, N)
                s_all = s_all.masked_fill(pad[:, None, None, :], float("-inf"))
            lse2 = torch.logsumexp(s_all * math.log(2), -1) / math.log(2)  # (B, Hkv, G)
        else:
            check_tensor("lse2", lse2, ndim=2)
            if tuple(lse2.shape) != (b, hq):
                raise ValueError(
                    f"lse2: expected shape (B, Hq) = {(b, hq)}, got {tuple(lse2.shape)}"
                )
        lse = lse2.reshape(b, h, g).float()
        done = 0
        while self.store.tail_length >= r:
            bk, _ = self.store.tail_block()  # (B, Hkv, R, D)
            mass = lse_block_mass(q2, bk, lse)  # (B, Hkv, R)
            # every row on its own mass; the normalized score of one query row is the mass
            keep = plan_row_keep(
                Scores(mass=mass, normalized=mass),
                allocator=self.allocator,
                selector=self.selector,
                layer_idx=self.layer_idx,
                mass_reduce=self.mass_reduce,
            ).keep  # (B, Hkv, R)
            self.store.commit_block(keep)
            kept = keep.sum(-1, dtype=torch.float32).mean()
            self._decode_kept = kept if self._decode_kept is None else self._decode_kept + kept
            self.decode_blocks += 1
            self.decode_block_tokens += r
            done += 1
        return done

    # ------------------------------------------------------------------ read path
    def dense_kv(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """The reference read path: every position dequantized, in position order (padding
        positions hold zeros), (B, Hkv, N, D) each."""
        if not self.is_initialized or self.store is None:
            raise RuntimeError(f"layer {self.layer_idx}: dense_kv on a layer that holds nothing")
        dtype = self.dtype if dtype is None else dtype
        if self.state == PENDING:
            assert self.pending_keys is not None and self.pending_values is not None
            return self.pending_keys.to(dtype), self.pending_values.to(dtype)
        return self.store.dense_kv(dtype)

    def key_valid(self) -> Tensor | None:
        """(B, N) bool, False at the padding positions never stored; None without padding."""
        if self.store is None or self.state != DECODE:
            return None
        pos = torch.arange(self.store.length, device=self.device)
        return pos[None, :] >= self.store.pad[:, None]

    # ------------------------------------------------------------------ edits
    def crop_to(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions exactly (``0`` empties the layer). Pages are
        never re-quantized: a page the crop cuts only counts its live prefix from then on."""
        check_int("max_length", max_length, 0)
        n = self.get_seq_length()
        if max_length >= n:
            return
        if max_length == 0:
            self._clear()
            if self.store is not None or self.is_initialized:
                self.store = None
                self.is_initialized = False
            return
        if self.state == PENDING:
            assert self.pending_keys is not None and self.pending_values is not None
            self.pending_keys = self.pending_keys[:, :, :max_length]
            self.pending_values = self.pending_values[:, :, :max_length]
            return
        assert self.store is not None
        self.store.crop_to(max_length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder, repeat or select batch rows: row i becomes old row ``beam_idx[i]``."""
        if not self.is_initialized:
            return
        check_tensor("beam_idx", beam_idx, ndim=1, dtype=(torch.int64, torch.int32))
        idx = beam_idx.to(device=self.device, dtype=torch.int64)
        if self.state == PENDING:
            assert self.pending_keys is not None and self.pending_values is not None
            self.pending_keys = self.pending_keys.index_select(0, idx)
            self.pending_values = self.pending_values.index_select(0, idx)
        if self.store is not None:
            if self.state == PENDING:
                self.store.batch_size = idx.shape[0]
                self.store._alloc_empty()
            else:
                self.store.index_rows(idx)
        self._batch_size = idx.shape[0]

    # ------------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        """Bytes held: every tensor of the store (capacity included) plus a pending prefill."""
        total = 0 if self.store is None else self.store.nbytes()
        for t in (self.pending_keys, self.pending_values):
            if t is not None:
                total += t.nbytes
        return total

    def live_nbytes(self) -> int:
        """Bytes of live pages and fp tokens only (what a perfectly sized store holds)."""
        return 0 if self.store is None or self.state != DECODE else self.store.live_nbytes()

    def tokens_at_bits(self) -> dict[int, float]:
        """Bit width -> mean positions per row stored at it (16 = full precision)."""
        if self.state == PENDING:
            return {16: float(self.get_seq_length())}
        if self.store is None or self.state == EMPTY:
            return {}
        return self.store.tokens_at_bits()
