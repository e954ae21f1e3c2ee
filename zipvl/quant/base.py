"""The `KVQuantizer` protocol and the compressed-chunk containers (`QuantizedKV`).

ZipVL (arXiv 2410.08584 v1, Algorithm 1; docs/algorithm.md#mixed-precision-quantization) compresses
the KV cache chunk by chunk (the prompt at prefill, then every 100 generated tokens): important
tokens at b_h bits, the others at b_l bits. A chunk is quantized exactly once; what is stored are
the packed codes and their parameters, never re-quantized (style G3).

Containers:
    * ``QuantizedTensor``: one quantized (B, Hkv, T, D) tensor (packed codes + parameters), or
      the raw tensor for 16-bit storage.
    * ``KVPart``: the keys and values of the tokens stored at one precision.
    * ``QuantizedKV``: one chunk: one part (uniform quantizers), or two parts plus a packed keep
      bitmap (mixed precision: part 0 = kept tokens, part 1 = the others, each in ascending
      position order).

Dequantization is generic (the containers carry their specs), so a cache can dequantize any
chunk without knowing which quantizer produced it; ``KVQuantizer.dequantize`` delegates here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .primitives import dequantize as dequantize_codes
from .primitives import unpack, unpack_bitmap
from .spec import QuantSpec

__all__ = [
    "KVPart",
    "KVQuantizer",
    "QuantizedKV",
    "QuantizedTensor",
    "keep_order",
    "keep_permutation",
]


def keep_permutation(keep: Tensor) -> Tensor:
    """Positions of the kept tokens, then of the others, each group in ascending order.

    Args:
        keep: (B, Hkv, T) bool.

    Returns:
        (B, Hkv, T) int64 permutation of each row (one stable sort, no host sync).
    """
    # stable descending sort of the flags: True first, ties (same flag) in position order
    return torch.sort(keep, dim=-1, descending=True, stable=True).indices


def keep_order(keep: Tensor, num_kept: int) -> tuple[Tensor, Tensor]:
    """Positions of the kept and of the other tokens, each in ascending order.

    Args:
        keep: (B, Hkv, T) bool with exactly ``num_kept`` True entries per row.
        num_kept: P, the kept count per row (a host int: no sync here).

    Returns:
        (idx_keep (B, Hkv, P), idx_rest (B, Hkv, T - P)), int64.
    """
    order = keep_permutation(keep)  # (B, Hkv, T)
    return order[..., :num_kept], order[..., num_kept:]


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized (B, Hkv, T, D) tensor.

    Attributes:
        data: packed codes (B, Hkv, T, D * bits // 8) uint8 (layout: ``primitives.pack``);
            for ``bits == 16`` the unquantized (B, Hkv, T, D) tensor in its own dtype.
        bits: 2, 4, 8, or 16 (stored unquantized).
        head_dim: D (the packed last dim hides it).
        spec: the ``QuantSpec`` the codes were made with (None for 16 bits).
        scale: parameters in ``spec.param_dtype``, broadcastable against the grouped view:
            (B, Hkv, ceil(T / G), 1, D) for ``axis="token"`` (the last token group may be a
            partial one, see ``KIVIKVQuantizer``), (B, Hkv, T, D // G, 1) for ``"channel"``;
            None for 16 bits or T == 0.
        zero: zero points, same shape/dtype as ``scale``.
        channel_scale: (B, Hkv, 1, D) divisor of channel-separable token-wise quantization
            (ZipCache's CST: x_hat = dequant(codes) * channel_scale), or None.
    """

    data: Tensor
    bits: int
    head_dim: int
    spec: QuantSpec | None = None
    scale: Tensor | None = None
    zero: Tensor | None = None
    channel_scale: Tensor | None = None

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8, 16):
            raise ValueError(f"bits: expected one of (2, 4, 8, 16), got {self.bits!r}")
        if (self.bits == 16) != (self.spec is None):
            raise ValueError(f"spec: expected a QuantSpec iff bits < 16, got {self.spec!r}")
        if self.spec is not None and self.spec.bits != self.bits:
            raise ValueError(f"spec: expected bits={self.bits}, got {self.spec.bits}")

    @property
    def num_tokens(self) -> int:
        """T, the number of tokens stored."""
        return self.data.shape[-2]

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor held (for byte accounting and device moves)."""
        ts = (self.data, self.scale, self.zero, self.channel_scale)
        return tuple(t for t in ts if t is not None)

    @property
    def nbytes(self) -> int:
        """Exact bytes held: the sum of ``.nbytes`` of every tensor."""
        return sum(t.nbytes for t in self.tensors())

    def map(self, fn: Callable[[Tensor], Tensor]) -> QuantizedTensor:
        """A copy with ``fn`` applied to every tensor (device moves, batch selection)."""

        def opt(t: Tensor | None) -> Tensor | None:
            return None if t is None else fn(t)

        return QuantizedTensor(
            data=fn(self.data),
            bits=self.bits,
            head_dim=self.head_dim,
            spec=self.spec,
            scale=opt(self.scale),
            zero=opt(self.zero),
            channel_scale=opt(self.channel_scale),
        )

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """Reconstruct the (B, Hkv, T, D) tensor in ``dtype``."""
        if self.spec is None:
            return self.data.to(dtype)
        lead, n, d = self.data.shape[:-2], self.num_tokens, self.head_dim
        if n == 0 or self.scale is None or self.zero is None:
            return torch.empty(*lead, 0, d, dtype=dtype, device=self.data.device)
        codes = unpack(self.data, self.bits)  # (B, Hkv, T, D)
        spec = self.spec
        pad = 0
        if spec.axis == "token" and spec.group_size is not None and n % spec.group_size:
            # partial last token group (KIVI keys): pad codes to the grouped length, slice back
            pad = spec.group_size - n % spec.group_size
            codes = torch.cat([codes, codes.new_zeros(*lead, pad, d)], dim=-2)  # (B,Hkv,T',D)
        work = torch.float32 if self.channel_scale is not None else dtype
        x = dequantize_codes(codes, spec, self.scale.float(), self.zero.float(), work)
        if pad:
            x = x[..., :n, :]  # (B, Hkv, T, D)
        if self.channel_scale is not None:
            x = (x * self.channel_scale.float()).to(dtype)
        return x


@dataclass(frozen=True)
class KVPart:
    """Keys and values of the tokens stored at one precision (same token order for both)."""

    key: QuantizedTensor
    value: QuantizedTensor

    def __post_init__(self) -> None:
        if self.key.num_tokens != self.value.num_tokens:
            raise ValueError(
                f"value: expected {self.key.num_tokens} tokens like key, "
                f"got {self.value.num_tokens}"
            )

    @property
    def bits(self) -> int:
        """Bit-width of this part (the wider of key and value)."""
        return max(self.key.bits, self.value.bits)

    @property
    def num_tokens(self) -> int:
        """Tokens per (b, h) row in this part."""
        return self.key.num_tokens

    @property
    def nbytes(self) -> int:
        """Exact bytes held by keys and values."""
        return self.key.nbytes + self.value.nbytes

    def map(self, fn: Callable[[Tensor], Tensor]) -> KVPart:
        """A copy with ``fn`` applied to every tensor."""
        return KVPart(self.key.map(fn), self.value.map(fn))


@dataclass(frozen=True)
class QuantizedKV:
    """One compressed chunk of T tokens of one layer (never re-quantized).

    Attributes:
        parts: one ``KVPart`` (every token at one precision, in position order) or two
            (``parts[0]`` the kept tokens, ``parts[1]`` the others, each in ascending
            position order).
        num_tokens: T.
        dtype: dtype of the original k / v (the default dequantization dtype).
        keep: for two parts, the packed keep bitmap (B, Hkv, ceil(T / 8)) uint8 (token t is
            bit t % 8 of byte t // 8, 1 = in ``parts[0]``); None for one part.
    """

    parts: tuple[KVPart, ...]
    num_tokens: int
    dtype: torch.dtype
    keep: Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.parts) not in (1, 2):
            raise ValueError(f"parts: expected 1 or 2 parts, got {len(self.parts)}")
        if (len(self.parts) == 2) != (self.keep is not None):
            raise ValueError("keep: expected a packed bitmap exactly when there are two parts")
        total = sum(p.num_tokens for p in self.parts)
        if total != self.num_tokens:
            raise ValueError(
                f"num_tokens: expected the parts' total {total}, got {self.num_tokens}"
            )

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor held."""
        ts = [t for p in self.parts for qt in (p.key, p.value) for t in qt.tensors()]
        if self.keep is not None:
            ts.append(self.keep)
        return tuple(ts)

    @property
    def nbytes(self) -> int:
        """Exact bytes held: the sum of ``.nbytes`` of every tensor (codes, scales, zero
        points, channel scales, keep bitmap)."""
        return sum(t.nbytes for t in self.tensors())

    @property
    def device(self) -> torch.device:
        """Device of the stored tensors."""
        return self.parts[0].key.data.device

    @property
    def batch_size(self) -> int:
        """B."""
        return self.parts[0].key.data.shape[0]

    @property
    def num_kv_heads(self) -> int:
        """Hkv."""
        return self.parts[0].key.data.shape[1]

    @property
    def head_dim(self) -> int:
        """D."""
        return self.parts[0].key.head_dim

    def tokens_at_bits(self) -> dict[int, int]:
        """Tokens per (b, h) row at each bit-width (16 = unquantized), e.g. {4: 40, 2: 60}.

        A part with zero tokens is left out; two parts at the same width are summed.
        """
        out: dict[int, int] = {}
        for p in self.parts:
            if p.num_tokens:
                out[p.bits] = out.get(p.bits, 0) + p.num_tokens
        return out

    def _map(self, fn: Callable[[Tensor], Tensor]) -> QuantizedKV:
        return QuantizedKV(
            parts=tuple(p.map(fn) for p in self.parts),
            num_tokens=self.num_tokens,
            dtype=self.dtype,
            keep=None if self.keep is None else fn(self.keep),
        )

    def index_select_batch(self, idx: Tensor) -> QuantizedKV:
        """Reorder / select batch rows (beam search), returning a new chunk.

        Args:
            idx: (B',) int64 batch indices (on the chunk's device, or moved there).
        """
        if idx.ndim != 1 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"idx: expected a 1-D int64 tensor, got shape {tuple(idx.shape)} {idx.dtype}"
            )
        idx = idx.to(self.device)
        return self._map(lambda t: t.index_select(0, idx))

    def to(self, device: torch.device | str) -> QuantizedKV:
        """The chunk on ``device`` (no-op copies are skipped by ``Tensor.to``)."""
        return self._map(lambda t: t.to(device))

    def dequantize(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Reconstruct keys and values in the original position order.

        Args:
            dtype: output dtype; None = the dtype of the original k / v.

        Returns:
            (k_hat, v_hat), each (B, Hkv, T, D). No host sync (the part sizes are static).
        """
        dtype = self.dtype if dtype is None else dtype
        if len(self.parts) == 1:
            p = self.parts[0]
            return p.key.dequantize(dtype), p.value.dequantize(dtype)
        assert self.keep is not None  # invariant of __post_init__
        hi, lo = self.parts
        keep = unpack_bitmap(self.keep, self.num_tokens)  # (B, Hkv, T)
        idx_hi, idx_lo = keep_order(keep, hi.num_tokens)  # (B, Hkv, P), (B, Hkv, T-P)
        b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
        outs = []
        for qh, ql in ((hi.key, lo.key), (hi.value, lo.value)):
            out = torch.empty(b, h, self.num_tokens, d, dtype=dtype, device=self.device)
            out.scatter_(2, idx_hi.unsqueeze(-1).expand(-1, -1, -1, d), qh.dequantize(dtype))
            out.scatter_(2, idx_lo.unsqueeze(-1).expand(-1, -1, -1, d), ql.dequantize(dtype))
            outs.append(out)  # (B, Hkv, T, D)
        return outs[0], outs[1]


@runtime_checkable
class KVQuantizer(Protocol):
    """Compresses one chunk of keys and values; reports its own cost.

    Implementations are frozen dataclasses (their fields are the config).
    """

    def quantize(
        self, k: Tensor, v: Tensor, keep: Tensor | None = None, *, num_kept: int | None = None
    ) -> QuantizedKV:
        """Quantize one chunk.

        Args:
            k: (B, Hkv, T, D) keys (RoPE applied).
            v: (B, Hkv, T, D) values, same dtype / device as k.
            keep: (B, Hkv, T) bool, True = important; every row has the same count. None means
                "all important". Uniform quantizers validate it and store every token alike.
            num_kept: the per-row count of ``keep`` when the caller has already verified it
                (``ZipVLCacheLayer`` does, with its one read per commit): the quantizer then
                reads nothing back and trusts it (only its range is checked). Ignored when
                ``keep`` is None.

        Returns:
            The chunk as a ``QuantizedKV``.
        """
        ...

    def dequantize(
        self, qkv: QuantizedKV, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """(k_hat, v_hat), each (B, Hkv, T, D), in the original position order."""
        ...

    def bytes_per_token(
        self,
        num_kv_heads: int,
        head_dim: int,
        kept_ratio: float = 1.0,
        tokens: int = 4096,
        *,
        dtype: torch.dtype = torch.bfloat16,
    ) -> float:
        """Exact K+V bytes per token of one layer (one batch row), metadata included, for a
        chunk of ``tokens`` tokens of which round(kept_ratio * tokens) are kept; per-chunk
        metadata (per-channel parameters, channel scales) is amortised over the chunk.
        ``dtype`` is the input dtype (it only matters for 16-bit storage)."""
        ...
