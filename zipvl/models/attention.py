"""ZipVL attention for custom stacks: ``ZipVLAttention`` and the functional ``zipvl_attention``.

ZipVL (He et al., arXiv 2410.08584 v1, Algorithm 1; docs/algorithm.md), per layer:

* **prefill** (the layer's cache is empty): the scorer rates every key from a few probe queries,
  the allocator turns the attention mass into one budget p per layer (Eq. 6), the selector keeps
  the p best keys per KV head (Eqs. 7-9), ``sparse_attention`` runs causal attention among the
  kept tokens only (unkept queries get a zero output), and ``cache.compress_prefill`` stores
  the kept tokens at high and the others at low precision;
* **decode** (the layer already holds tokens): dense attention of the new queries over the
  cache's dequantized K/V (SDPA, the reference read path), then ``cache.compress_tail``, which
  quantizes each full block of ``recompress_every`` generated tokens.

Every component comes from ``ZipVLConfig.for_layer(layer_idx)`` and can be swapped there.
Dense layers (``config.dense_layers``) run plain causal SDPA in prefill and commit every token
as important.

Padding. ``key_valid`` (B, Skv) bool marks real tokens (the 2-D attention mask of
transformers). In prefill every row must hold one contiguous run of real tokens (left or right
padding). Each padded row is scored, budgeted (allocator) and selected on its real tokens
only, exactly as if it ran alone, attention runs per row on the real tokens, and padding rows
of the output are zero. The cache still needs the same kept count in every
row, so short rows are topped up with padding positions (stored as "kept", never attended).

Plain PyTorch around the components; the plan step reads the kept count (and, with padding,
the row spans) back to the host once per layer, the decode step does not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zipvl.cache import PagedCacheLayer, ZipVLCache
from zipvl.cache.graph_step import graph_step
from zipvl.checks import check_qkv, check_tensor
from zipvl.config import LayerConfig, ZipVLConfig
from zipvl.decode import decode_attention as paged_decode_attention
from zipvl.decode import fused_decode_problem
from zipvl.impl import Impl
from zipvl.sparsity import sparse_attention
from zipvl.sparsity.pipeline import padded_spans, plan_tokens, row_spans
from zipvl.sparsity.sdpa_backend import sdpa
from zipvl.types import MassReduce

__all__ = [
    "DenseAttention",
    "PrefillResult",
    "RotaryFn",
    "ZipVLAttention",
    "decode_attention",
    "dense_causal_attention",
    "make_cache",
    "prefill_attention",
    "retained_attention_mass",
    "row_spans",
    "zipvl_attention",
]

RotaryFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""Rotary hook: (q (B, Hq, S, D), k (B, Hkv, S, D), positions (B, S) int64) -> (q, k)."""

DenseAttention = Callable[[Tensor, Tensor, Tensor], Tensor]
"""Dense causal prefill attention: (q (B, Hq, S, D), k, v (B, Hkv, S, D)) -> (B, Hq, S, D)."""


# --------------------------------------------------------------------------------------------
# cache construction
# --------------------------------------------------------------------------------------------


def make_cache(
    config: ZipVLConfig,
    num_layers: int,
    *,
    update_reads: str = "dense",
    mass_reduce: MassReduce | None = None,
    defer_commit: bool = False,
) -> ZipVLCache:
    """A ``ZipVLCache`` whose per-layer quantizers and decode budgets follow ``config``.

    Args:
        config: the ZipVL configuration.
        num_layers: L, the model's attention layers.
        update_reads: what paged layers return in decode (``ZipVLCache``).
        mass_reduce: cross-process sum of the attention mass when the KV heads are split over
            processes (``ZipVLCache``); the prefill plans of the attention code take it from
            the cache too.
        defer_commit: run layer i's prompt commit at the next call that reaches the cache
            (``ZipVLCache(defer_commit=)``; the last layer commits at once). ``zipvl.enable``
            turns it on for its caches.

    Returns:
        A fresh cache with ``num_layers`` layers. Layers with overrides get their own quantizer
        and decode-block allocator (``ZipVLCache(layer_quantizers=, layer_allocators=)``).

    Raises:
        ValueError: ``config`` names layers >= ``num_layers``.
    """
    config.check_num_layers(num_layers)
    base = dataclasses.replace(config, layers={}).for_layer(0)
    layers = [config.for_layer(i) for i in range(num_layers)]
    layer_quantizers = {
        lc.layer_idx: lc.quantizer for lc in layers if lc.quantizer != base.quantizer
    }
    # the per-layer components come from the config's one resolution (for_layer), not from a
    # second schedule object
    layer_allocators = {
        lc.layer_idx: lc.allocator for lc in layers if lc.allocator != base.allocator
    }
    return ZipVLCache(
        num_layers,
        quantizer=base.quantizer,
        recompress_every=config.recompress_every,
        page_size=config.page_size,
        code_order=config.code_order,
        page_write_impl=config.page_write_impl,
        sink_tokens=config.sink_tokens,
        allocator=base.allocator,
        layer_allocators=layer_allocators,
        selector=config.decode_selector,
        layer_quantizers=layer_quantizers,
        update_reads=update_reads,
        mass_reduce=mass_reduce,
        defer_commit=defer_commit,
    )


# --------------------------------------------------------------------------------------------
# prefill
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillResult:
    """What one layer's prefill produced.

    Attributes:
        output: (B, Hq, S, Dv) attention output; rows of unkept queries (and padding) are zero
            in ``unkept="zero"`` mode.
        keep: (B, Hkv, S) bool to commit with ``compress_prefill`` (every row the same count;
            short padded rows are topped up with padding positions), or None when every token
            was kept (dense layers, tau = 1).
        kept_tokens: real tokens kept per (b, h) row, one entry per batch row.
        real_tokens: real (non-padding) tokens per batch row.
        row_keep: with padding, ``keep`` without the top-up (every row its own count, padding
            False): what a paged cache commits; None otherwise (then ``keep`` is already so).
    """

    output: Tensor
    keep: Tensor | None
    kept_tokens: tuple[int, ...]
    real_tokens: tuple[int, ...]
    row_keep: Tensor | None = None

    @property
    def commit_keep(self) -> Tensor | None:
        """The keep mask for a cache that takes ragged rows (``row_keep`` or ``keep``)."""
        return self.row_keep if self.row_keep is not None else self.keep

    @property
    def kept_ratio(self) -> float:
        """Kept real tokens over real tokens, over the batch."""
        return sum(self.kept_tokens) / max(sum(self.real_tokens), 1)


def dense_causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_valid: Tensor | None = None,
    scale: float | None = None,
    tuned: bool = False,
) -> Tensor:
    """Plain causal SDPA (what a dense layer runs), padding-aware.

    Args:
        q: (B, Hq, S, D).
        k: (B, Hkv, S, D).
        v: (B, Hkv, S, Dv).
        key_valid: optional (B, S) bool; padded keys are masked out and padded query rows are 0.
        scale: softmax scale (None: 1 / sqrt(D)).
        tuned: run on the SDPA backend measured fastest for the shape
            (``zipvl.sparsity.sdpa_backend``; what ``impl="auto"`` layers do), else on
            PyTorch's own dispatch.

    Returns:
        (B, Hq, S, Dv).
    """
    gqa = q.shape[1] != k.shape[1]
    backend = "auto" if tuned else None  # the measured SDPA backend, or PyTorch's dispatch
    if key_valid is None:
        return sdpa(q, k, v, backend=backend, is_causal=True, scale=scale, enable_gqa=gqa)
    s = q.shape[-2]
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()  # (S, S)
    mask = causal & key_valid[:, None, None, :]  # (B, 1, S, S)
    out = sdpa(q, k, v, backend=backend, attn_mask=mask, scale=scale, enable_gqa=gqa)
    # padded query rows see no key: define their output as 0 (SDPA may give NaN there)
    return out.masked_fill(~key_valid[:, None, :, None], 0.0)


def prefill_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    layer: LayerConfig,
    key_valid: Tensor | None = None,
    scale: float | None = None,
    dense: DenseAttention | None = None,
    mass_reduce: MassReduce | None = None,
) -> PrefillResult:
    """ZipVL's token-sparse prefill attention of one layer (no cache access).

    Pipeline: ``layer.scorer`` -> ``layer.allocator`` -> ``layer.selector`` ->
    ``sparse_attention(impl=layer.impl, unkept=layer.unkept)``. When the selection keeps every
    real token (tau = 1, or a budget >= S) the result is exactly dense causal attention, so the
    ``dense`` callable runs instead of gathering everything (bit-identical to the model's own
    attention when ``dense`` is that attention). Dense layers skip scoring.

    Args:
        q: (B, Hq, S, D) queries with RoPE applied.
        k: (B, Hkv, S, D) keys with RoPE applied.
        v: (B, Hkv, S, Dv) values.
        layer: the resolved layer config (``ZipVLConfig.for_layer``).
        key_valid: optional (B, S) bool, True = real token; each row one contiguous run.
        scale: softmax scale of the model (None: 1 / sqrt(D)).
        dense: dense causal attention to use for dense layers and keep-everything selections
            (None: ``dense_causal_attention``).
        mass_reduce: cross-process sum of the attention mass when the KV heads are split over
            processes (``zipvl.sparsity.plan_scores``); the cache's ``mass_reduce`` in
            ``zipvl_attention`` and ``zipvl.enable``.

    Returns:
        ``PrefillResult`` (output (B, Hq, S, Dv), keep to commit, kept counts).

    Raises:
        ValueError: bad shapes, non-contiguous padding, or ``Sq != Skv``.
    """
    b, _, _ = check_qkv(q, k, v)
    s = q.shape[-2]
    if k.shape[-2] != s:
        raise ValueError(f"k: expected Skv = Sq = {s} in prefill, got shape {tuple(k.shape)}")
    spans = None if key_valid is None else padded_spans(key_valid, b, s)
    if spans is None:
        key_valid = None  # no padding (after all)
    real = tuple((end - start) for start, end in spans) if spans else (s,) * b

    def run_dense() -> Tensor:
        if dense is not None:
            return dense(q, k, v)
        return dense_causal_attention(
            q, k, v, key_valid=key_valid, scale=scale, tuned=layer.impl is Impl.AUTO
        )

    if layer.dense:
        return PrefillResult(run_dense(), None, real, real)
    plan = plan_tokens(
        q, k, scorer=layer.scorer, allocator=layer.allocator, selector=layer.selector,
        layer_idx=layer.layer_idx, key_valid=key_valid if spans is not None else None,
        mass_reduce=mass_reduce, impl=layer.plan_impl,
    )  # fmt: skip
    sel = plan.selection
    if spans is None:
        if sel.num_kept >= s:
            return PrefillResult(run_dense(), None, real, real)
        out = sparse_attention(q, k, v, sel, impl=layer.impl, unkept=layer.unkept, scale=scale)
        return PrefillResult(out, sel.keep, (sel.num_kept,) * b, real)
    assert plan.row_kept is not None and key_valid is not None
    kept = plan.row_kept
    if all(n >= r for n, r in zip(kept, real, strict=True)):
        return PrefillResult(run_dense(), None, real, real)
    out = sparse_attention(
        q, k, v, sel, impl=layer.impl, unkept=layer.unkept, scale=scale, key_valid=key_valid
    )  # padding rows stay 0
    return PrefillResult(out, sel.keep, kept, real, row_keep=plan.row_keep)


# --------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_valid: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Dense attention of the newest Sq queries over all N cached positions (reference path).

    Query row ``i`` sits at position ``N - Sq + i`` and sees keys ``j <= N - Sq + i``
    (bottom-right aligned); Sq = 2, N = 4::

        key j      0 1 2 3
        query 0    1 1 1 0
        query 1    1 1 1 1

    Args:
        q: (B, Hq, Sq, D) new queries (RoPE applied).
        k: (B, Hkv, N, D) all keys in position order (dequantized cache + new tokens).
        v: (B, Hkv, N, Dv).
        key_valid: optional (B, N) bool, False = padding (masked out).
        scale: softmax scale (None: 1 / sqrt(D)).

    Returns:
        (B, Hq, Sq, Dv).
    """
    check_qkv(q, k, v)
    sq, n = q.shape[-2], k.shape[-2]
    if sq > n:
        raise ValueError(f"q: expected Sq <= N = {n} cached positions, got Sq = {sq}")
    mask = None
    if sq > 1:
        qpos = torch.arange(n - sq, n, device=q.device)[:, None]  # (Sq, 1)
        mask = torch.arange(n, device=q.device)[None, :] <= qpos  # (Sq, N)
    if key_valid is not None:
        check_tensor("key_valid", key_valid, ndim=2, dtype=torch.bool)
        if tuple(key_valid.shape) != (q.shape[0], n):
            raise ValueError(
                f"key_valid: expected shape (B, N) = {(q.shape[0], n)}, got "
                f"{tuple(key_valid.shape)}"
            )
        pad = key_valid[:, None, None, :]  # (B, 1, 1, N)
        mask = pad if mask is None else mask & pad  # (B, 1, Sq, N)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def paged_decode(
    decode_impl: str,
    q: Tensor,
    layer: PagedCacheLayer,
    *,
    key_valid: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """One decode step over a paged layer whose new K/V are already appended.

    One query per row: ``zipvl.decode.decode_attention`` (``decode_impl``: ``"auto"`` runs the
    fused kernel on CUDA and the float32 reference elsewhere; ``"triton"`` raises where the
    kernel cannot run), then the block re-compression from the step's log-sum-exp. Several
    queries per row (a multi-token step, e.g. assisted decoding): the dense reference read with
    a causal mask among the new tokens (``decode_impl="triton"`` raises for it).

    Args:
        decode_impl: ``"auto"``, ``"triton"`` or ``"reference"``.
        q: (B, Hq, Sq, D) the step's queries.
        layer: the paged cache layer (state DECODE).
        key_valid: optional (B, N) bool over all positions: must agree with the padding the
            layer stored (padding is never stored, so nothing else can be masked).
        scale: softmax scale (None: 1 / sqrt(D)).

    Returns:
        (B, Hq, Sq, D).
    """
    assert layer.store is not None
    if key_valid is not None:
        stored = layer.key_valid()
        n = layer.get_seq_length()
        want = torch.ones_like(key_valid) if stored is None else stored
        if tuple(key_valid.shape) != (q.shape[0], n) or not bool((key_valid == want).all()):
            raise ValueError(
                "key_valid: a paged cache attends to every stored token; the decode mask must "
                "mark exactly the prompt padding the cache was committed with (shape "
                f"(B, N) = {(q.shape[0], n)}), got a different mask"
            )
    if q.shape[-2] == 1:
        out, lse2 = paged_decode_attention(q, layer.store, scale=scale, impl=decode_impl)
        if graph_step():
            # a recorded step: the replayer compresses full blocks on the host after each
            # replay, from this step's query and log-sum-exp (static tensors of the step)
            layer.step_inputs = (q, lse2, scale)
        else:
            layer.compress_tail(q, lse2=lse2, scale=scale)
        return out
    if graph_step():
        raise ValueError(
            f"query: a recorded decode step reads one query per row, got Sq = {q.shape[-2]}"
        )
    if decode_impl == "triton":
        raise ValueError(
            f"decode_impl: 'triton' reads one query per step, got Sq = {q.shape[-2]}; use "
            "'auto' (multi-token steps read the cache densely) or 'reference'"
        )
    keys, values = layer.dense_kv()
    valid = layer.key_valid()
    out = decode_attention(q, keys, values, key_valid=valid, scale=scale)
    layer.compress_tail(q, keys=keys, scale=scale, key_valid=valid)
    return out


# --------------------------------------------------------------------------------------------
# functional form
# --------------------------------------------------------------------------------------------


def commit_prefill(
    cache: ZipVLCache, layer_idx: int, res: PrefillResult, key_valid: Tensor | None
) -> None:
    """Commit a layer's prefill to the cache: a paged layer takes every row's own kept set
    and the plan's counts (no host read); chunked layers need equal counts (``res.keep``)."""
    paged = isinstance(cache.layer(layer_idx), PagedCacheLayer)
    keep = res.commit_keep if paged else res.keep
    cache.compress_prefill(
        layer_idx, keep, key_valid=key_valid, kept_rows=res.kept_tokens,
        real_rows=res.real_tokens,
    )  # fmt: skip


def zipvl_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    config: ZipVLConfig,
    cache: ZipVLCache | None = None,
    layer_idx: int = 0,
    key_valid: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """ZipVL attention for people who bring their own projections.

    Without a cache this is one prefill (sparse attention, nothing stored). With a cache:
    on an empty layer, prefill + ``compress_prefill``; otherwise decode over the cache +
    ``compress_tail``.

    Args:
        q: (B, Hq, Sq, D) queries, RoPE applied.
        k: (B, Hkv, Sq, D) the new keys, RoPE applied.
        v: (B, Hkv, Sq, Dv) the new values.
        config: ZipVL configuration (layer ``layer_idx`` is resolved from it).
        cache: optional ``ZipVLCache`` (e.g. from ``make_cache``).
        layer_idx: this layer's index (per-layer config and cache layer).
        key_valid: optional bool padding mask, True = real token: (B, Sq) in prefill, (B, N)
            over all cached positions plus the new ones in decode.
        scale: softmax scale (None: 1 / sqrt(D)).

    Returns:
        (B, Hq, Sq, Dv) attention output (before the output projection).

    Raises:
        TypeError: ``config`` is not a ``ZipVLConfig`` or ``cache`` not a ``ZipVLCache``.
    """
    if not isinstance(config, ZipVLConfig):
        raise TypeError(f"config: expected a ZipVLConfig, got {type(config).__name__}")
    layer = config.for_layer(layer_idx)
    if cache is None:
        return prefill_attention(q, k, v, layer=layer, key_valid=key_valid, scale=scale).output
    if not isinstance(cache, ZipVLCache):
        raise TypeError(
            f"cache: expected a ZipVLCache (see zipvl.models.make_cache), got "
            f"{type(cache).__name__}"
        )
    prefill = cache.get_seq_length(layer_idx) == 0
    target = cache.layer(layer_idx)
    if not prefill and isinstance(target, PagedCacheLayer):
        if config.decode_impl == "triton" and target.store is not None:
            problem = fused_decode_problem(q, target.store)
            if problem is not None:  # refused before anything is stored
                raise ValueError(
                    f"decode_impl: 'triton' needs {problem}; use 'auto' or 'reference'"
                )
        cache.append(k, v, layer_idx)
        return paged_decode(config.decode_impl, q, target, key_valid=key_valid, scale=scale)
    if not prefill and config.decode_impl == "triton":
        raise ValueError(
            "decode_impl: 'triton' reads paged storage, but layer "
            f"{layer_idx} stores chunks (its quantizer has no paged layout: "
            f"{type(target.quantizer).__name__}); use 'auto' or 'reference'"
        )
    keys, values = cache.update(k, v, layer_idx)
    if prefill:
        res = prefill_attention(
            q, keys, values, layer=layer, key_valid=key_valid, scale=scale,
            mass_reduce=cache.mass_reduce,
        )  # fmt: skip
        commit_prefill(cache, layer_idx, res, key_valid)
        return res.output
    out = decode_attention(q, keys, values, key_valid=key_valid, scale=scale)
    cache.compress_tail(layer_idx, q, keys=keys, scale=scale, key_valid=key_valid)
    return out


# --------------------------------------------------------------------------------------------
# module form
# --------------------------------------------------------------------------------------------


class ZipVLAttention(nn.Module):
    """Multi-head attention (GQA) with ZipVL prefill and a ZipVL cache in decode.

    ``x -> q, k, v projections -> rotary(q, k, positions) -> zipvl_attention -> o_proj``.

    Args:
        dim: model width E.
        num_heads: Hq.
        num_kv_heads: Hkv (divides Hq).
        head_dim: D (default E // Hq).
        layer_idx: this layer's index (per-layer config and cache layer).
        config: default ZipVL configuration (None: ``ZipVLConfig()``); ``forward`` may pass
            another one per call.
        rotary: optional rotary hook ``(q, k, positions) -> (q, k)``.
        qkv_bias: biases on the q/k/v projections (Qwen2: True).

    Example::

        attn = ZipVLAttention(256, 8, 2, layer_idx=0)
        cache = make_cache(ZipVLConfig(), num_layers=1)
        y = attn(x, cache=cache)                       # prefill, x (B, S, 256)
        y1 = attn(x1, cache=cache)                     # decode step, x1 (B, 1, 256)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int | None = None,
        *,
        layer_idx: int = 0,
        config: ZipVLConfig | None = None,
        rotary: RotaryFn | None = None,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        for name, val in (("dim", dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {val!r}")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}"
            )
        head_dim = dim // num_heads if head_dim is None else head_dim
        if head_dim < 1:
            raise ValueError(f"head_dim: expected an int >= 1, got {head_dim}")
        if config is not None and not isinstance(config, ZipVLConfig):
            raise TypeError(f"config: expected a ZipVLConfig or None, got {type(config).__name__}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.config = config if config is not None else ZipVLConfig()
        self.rotary = rotary
        self.scale = 1.0 / math.sqrt(head_dim)
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False)

    def project(
        self, x: Tensor, positions: Tensor | None = None, *, offset: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Project and rotate: x (B, S, E) -> q (B, Hq, S, D), k, v (B, Hkv, S, D).

        Args:
            x: (B, S, E) hidden states.
            positions: (B, S) or (S,) int64 positions for the rotary hook (None:
                ``offset + arange(S)``).
            offset: first position when ``positions`` is None.
        """
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            if positions is None:
                positions = torch.arange(offset, offset + s, device=x.device)
            positions = positions.expand(b, s) if positions.ndim == 1 else positions  # (B, S)
            q, k = self.rotary(q, k, positions)
        return q, k, v  # (B, Hq, S, D), (B, Hkv, S, D), (B, Hkv, S, D)

    def forward(
        self,
        x: Tensor,
        *,
        cache: ZipVLCache | None = None,
        positions: Tensor | None = None,
        key_valid: Tensor | None = None,
        config: ZipVLConfig | None = None,
    ) -> Tensor:
        """One attention layer.

        Args:
            x: (B, S, E) hidden states.
            cache: optional ``ZipVLCache``; without one, a single prefill with nothing stored.
            positions: optional (B, S) or (S,) positions for the rotary hook (default: the
                cache length + arange(S)).
            key_valid: optional bool padding mask, True = real token ((B, S) in prefill,
                (B, N) over all positions in decode).
            config: per-call configuration (default: the module's).

        Returns:
            (B, S, E).
        """
        check_tensor("x", x, ndim=3, floating=True)
        offset = 0 if cache is None else cache.get_seq_length(self.layer_idx)
        q, k, v = self.project(x, positions, offset=offset)
        out = zipvl_attention(
            q,
            k,
            v,
            config=config if config is not None else self.config,
            cache=cache,
            layer_idx=self.layer_idx,
            key_valid=key_valid,
            scale=self.scale,
        )  # (B, Hq, S, D)
        b, s = x.shape[:2]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def retained_attention_mass(
    q: Tensor,
    k: Tensor,
    keep: Tensor | None,
    *,
    key_valid: Tensor | None = None,
    max_rows: int = 256,
    scale: float | None = None,
) -> float:
    """Fraction of the full causal attention mass that falls on the kept keys.

    For each query row ``i`` (real tokens only) and query head, ``sum_{j kept} A[i, j]``
    where ``A = softmax(q k^T * scale + causal + padding)`` in float32; averaged over rows and
    heads. 1.0 means the kept keys carry all the attention. Uses every row when S <= max_rows,
    else ``max_rows`` rows evenly spaced over the prompt (the last row included).

    Args:
        q: (B, Hq, S, D).
        k: (B, Hkv, S, D).
        keep: (B, Hkv, S) bool kept keys, or None (everything kept: returns 1.0).
        key_valid: optional (B, S) bool, True = real token.
        max_rows: rows measured at most.
        scale: softmax scale (None: 1 / sqrt(D)).

    Returns:
        The retained fraction in [0, 1].
    """
    if keep is None:
        return 1.0
    b, hq, hkv = check_qkv(q, k)
    s, d = k.shape[-2], k.shape[-1]
    g = hq // hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    rows = torch.arange(s, device=q.device)
    if s > max_rows:
        rows = torch.linspace(0, s - 1, max_rows, device=q.device).round().long().unique()
    qr = q.index_select(2, rows).float().view(b, hkv, g, rows.numel(), d)  # (B, Hkv, G, M, D)
    logits = torch.matmul(qr, k.float()[:, :, None].transpose(-1, -2)) * scale  # (B,Hkv,G,M,S)
    visible = torch.arange(s, device=q.device)[None, :] <= rows[:, None]  # (M, S)
    mask = visible[None, None, None]  # (1, 1, 1, M, S)
    row_ok = torch.ones(b, rows.numel(), dtype=torch.bool, device=q.device)  # (B, M)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, None, :]  # (B, 1, 1, M, S)
        row_ok = key_valid.index_select(1, rows)  # (B, M)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)  # (B,Hkv,G,M,S)
    kept = (probs * keep[:, :, None, None, :].float()).sum(-1)  # (B, Hkv, G, M)
    kept = torch.nan_to_num(kept, nan=0.0)
    weight = row_ok[:, None, None, :].float().expand_as(kept)  # (B, Hkv, G, M)
    return float((kept * weight).sum() / weight.sum().clamp(min=1.0))
