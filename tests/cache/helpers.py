"""Shared helpers of the cache tests: inputs, an independent byte walk, reference scores."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange, reduce
from torch import Tensor

from zipvl.cache import ZipVLCache, ZipVLCacheLayer


def make_kv(
    b: int, h: int, s: int, d: int, device: str, dtype: torch.dtype = torch.bfloat16
) -> tuple[Tensor, Tensor]:
    """Fresh random keys and values (B, Hkv, S, D), each with its own storage."""
    return (
        torch.randn(b, h, s, d, device=device, dtype=dtype),
        torch.randn(b, h, s, d, device=device, dtype=dtype),
    )


def random_keep(b: int, h: int, s: int, p: int, device: str, seed: int = 0) -> Tensor:
    """(B, Hkv, S) bool with exactly ``p`` random True entries in every row."""
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(b, h, s, generator=g).argsort(dim=-1)  # (B, Hkv, S)
    return (order < p).to(device)


def held_tensors(obj: object) -> list[Tensor]:
    """Every tensor reachable from ``obj`` through attributes, containers and dataclass fields
    (each counted once), found without asking the cache or the chunks for their sizes."""
    seen: set[int] = set()
    found: list[Tensor] = []

    def walk(x: object) -> None:
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, Tensor):
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                walk(v)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name))
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            for v in vars(x).values():
                walk(v)

    walk(obj)
    return found


def walked_bytes(obj: object) -> int:
    """Sum of ``nbytes`` over ``held_tensors(obj)``."""
    return sum(t.nbytes for t in held_tensors(obj))


def storage_bytes(obj: object) -> int:
    """Bytes of the distinct storages behind ``held_tensors(obj)`` (catches hidden views)."""
    storages = {}
    for t in held_tensors(obj):
        st = t.untyped_storage()
        storages[(st.device, st.data_ptr())] = st.nbytes()
    return sum(storages.values())


def reference_block_mass(query: Tensor, keys: Tensor) -> Tensor:
    """ZipVL decode scores written independently: float64 softmax of the last query row over
    all keys, summed over the G query heads of each KV head -> (B, Hkv, N) float32."""
    hkv = keys.shape[1]
    q = rearrange(query[:, :, -1].double(), "b (h g) d -> b h g d", h=hkv)
    logits = torch.einsum("bhgd,bhnd->bhgn", q, keys.double()) / keys.shape[-1] ** 0.5
    return reduce(logits.softmax(-1), "b h g n -> b h n", "sum").float()


def check_layout(layer: ZipVLCacheLayer) -> None:
    """Positions are contiguous: sinks, then each chunk, then the tail, ending at seq_length."""
    if layer.has_pending_prefill:
        assert not layer.chunks and layer.num_sinks == 0 and layer.tail_length == 0
        return
    pos = layer.num_sinks
    for start, length, chunk in zip(
        layer.chunk_starts, layer.chunk_lengths, layer.chunks, strict=True
    ):
        assert start == pos
        assert 1 <= length <= chunk.num_tokens
        pos += length
    assert pos + layer.tail_length == layer.get_seq_length()


def dense(cache: ZipVLCache, layer_idx: int = 0) -> tuple[Tensor, Tensor]:
    """``cache.dense_kv`` in float32."""
    return cache.dense_kv(layer_idx, dtype=torch.float32)


def zipcache_error_bound(x: Tensor, group: Tensor, bits: int, *, values: bool) -> Tensor:
    """Worst-case |x - dequant(quant(x))| of ZipCache's quantizers
    (docs/algorithm.md#mixed-precision-quantization) for the tokens of ``group``, quantized
    together: half a step of an asymmetric b-bit quantizer.

    Keys: one range per (b, h, channel) over the group's tokens. Values (channel-separable
    token-wise): divide by s_c = sqrt(max |x_tc|) over the group's tokens, one range per token
    over the channels, multiply back by s_c.

    Args:
        x: (B, Hkv, T, D) float32 originals of one chunk.
        group: (B, Hkv, T) bool, the tokens quantized together at ``bits``.
        bits: bit width of the group.
        values: True for the value rule, False for the key rule.

    Returns:
        (B, Hkv, T, D) float32 bound (meaningful where ``group`` is True).
    """
    levels = 2**bits - 1
    m = group[..., None]  # (B, Hkv, T, 1)
    inf = torch.tensor(float("inf"), device=x.device)
    if not values:
        hi = torch.where(m, x, -inf).amax(dim=-2, keepdim=True)  # (B, Hkv, 1, D)
        lo = torch.where(m, x, inf).amin(dim=-2, keepdim=True)  # (B, Hkv, 1, D)
        return ((hi - lo) / (2 * levels)).expand_as(x)  # (B, Hkv, T, D)
    s = torch.where(m, x.abs(), 0.0).amax(dim=-2, keepdim=True).sqrt().clamp_min(2.0**-14)
    xb = x / s  # (B, Hkv, T, D)
    rng = xb.amax(dim=-1, keepdim=True) - xb.amin(dim=-1, keepdim=True)  # (B, Hkv, T, 1)
    return s * rng / (2 * levels)  # (B, Hkv, T, D)


# aten ops that launch no kernel on a GPU (views, metadata, allocation, dtype no-ops)
_NO_KERNEL = frozenset(
    "aten::" + n
    for n in [
        "view",
        "alias",
        "reshape",
        "_reshape_alias",
        "_unsafe_view",
        "select",
        "slice",
        "unsqueeze",
        "squeeze",
        "expand",
        "as_strided",
        "t",
        "transpose",
        "permute",
        "unbind",
        "split",
        "narrow",
        "flatten",
        "detach",
        "detach_",
        "lift_fresh",
        "resolve_conj",
        "resolve_neg",
        "empty",
        "empty_strided",
        "empty_like",
        "result_type",
        "contiguous",
        "to",
        "_to_copy",
    ]
)


def count_kernel_ops(fn: Callable[[], object]) -> int:
    """Outermost aten ops that ``fn`` runs on the CPU and that would launch at least one GPU
    kernel (torch.profiler): views and allocations are not counted, casts and contiguous
    copies only when they copy."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def copies(e: Any) -> bool:
        return any(
            c.name in ("aten::copy_", "aten::_to_copy") or copies(c) for c in e.cpu_children
        )

    n = 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        if e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"):
            continue  # counted with its outermost aten op
        if e.name not in _NO_KERNEL or (e.name in ("aten::to", "aten::contiguous") and copies(e)):
            n += 1
    return n
