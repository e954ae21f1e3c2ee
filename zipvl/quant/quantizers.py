"""KV quantizers: identity (16-bit), ZipCache, KIVI, per-token, and the mixed-precision composer.

ZipVL (arXiv 2410.08584 v1, Algorithm 1, docs/algorithm.md#mixed-precision-quantization,
docs/decisions.md#bit-widths) stores important tokens at b_h = 4 bits and the others at b_l = 2
bits with ZipCache's quantizers:

* keys: channel-wise asymmetric min/max over the chunk's tokens, per (b, h, channel);
* values: channel-separable token-wise (CST): per-channel divisor s_c = sqrt(max_t |v_tc|),
  then token-wise asymmetric min/max of v / s per (b, h, token) over the D channels.

Differences from ZipCache's code, on purpose (docs/decisions.md#bit-widths):
    * parameters are per KV head: ZipCache flattens heads into channels, so its "token row"
      mixes the i-th selected token of every head (different positions per head); here a
      token-wise range is the range of one (b, h, t) row. Costs 2 more parameters per token
      per extra head, and gives the fused decode kernel one scale per (b, h, t).
    * in the mixed quantizer each precision group computes its own CST channel divisor over
      its own tokens (ZipCache: one divisor over all tokens, shared by both groups): this is
      what makes mixed precision a plain composition of two quantizers (style G4); it costs D
      extra parameters per (b, h) per chunk.

Baselines: KIVI (Liu et al. 2024: keys per channel in groups of G tokens, values per token in
groups of G channels) and a per-token group-wise quantizer. The full-precision residual window
of KIVI is the cache's business, not the quantizer's.

All quantizers store parameters in ``param_dtype`` (float16 by default, like KIVI / ZipCache:
|x| must stay below 65504; choose bfloat16 or float32 otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..checks import check_fraction, check_same_device, check_tensor
from ..impl import QUANT_IMPLS, Impl, parse_impl
from .base import KVPart, KVQuantizer, QuantizedKV, QuantizedTensor, keep_permutation
from .ops import quantize_pack
from .primitives import pack_bitmap, round_param
from .spec import PARAM_DTYPES, SUPPORTED_BITS, QuantSpec

__all__ = [
    "IdentityKVQuantizer",
    "KIVIKVQuantizer",
    "MixedPrecisionKVQuantizer",
    "PerTokenKVQuantizer",
    "ZipCacheKVQuantizer",
    "quantize_tensor",
]

# Floor of the CST channel divisor (smallest normal float16): a channel of zeros gets divisor
# 2^-14 instead of 0, so v / s never divides by zero and the divisor is exact in every dtype.
_MIN_CHANNEL_SCALE = 2.0**-14


# ----------------------------------------------------------------------------- validation


def _check_kv(k: Tensor, v: Tensor) -> tuple[int, int, int, int]:
    """k, v (B, Hkv, T, D), same shape / dtype / device. Returns (B, Hkv, T, D)."""
    check_tensor("k", k, ndim=4, floating=True)
    check_tensor("v", v, ndim=4, floating=True)
    if v.shape != k.shape:
        raise ValueError(
            f"v: expected shape (B, Hkv, T, D) = {tuple(k.shape)} like k, got {tuple(v.shape)}"
        )
    if v.dtype != k.dtype:
        raise ValueError(f"v: expected dtype {k.dtype} like k, got {v.dtype}")
    check_same_device(k=k, v=v)
    b, h, t, d = k.shape
    return b, h, t, d


def _check_keep(keep: Tensor, k: Tensor, num_kept: int | None = None) -> int:
    """keep (B, Hkv, T) bool on k's device, every row with the same count; returns it.

    Without ``num_kept`` the row counts are read back to the host once (one ``aminmax``: a
    plan-time sync that sizes the gathered parts). With ``num_kept`` (a count the caller has
    already verified, e.g. the cache's one read per commit) nothing is read back and the count
    is trusted: only its range is checked. A wrong count gives a wrong chunk, so pass it only
    from a verified source; the default (``None``) always verifies.
    """
    check_tensor("keep", keep, ndim=3, dtype=torch.bool)
    if keep.shape != k.shape[:3]:
        raise ValueError(
            f"keep: expected shape (B, Hkv, T) = {tuple(k.shape[:3])}, got {tuple(keep.shape)}"
        )
    if keep.device != k.device:
        raise ValueError(f"keep: expected device {k.device} like k, got {keep.device}")
    if num_kept is not None:
        t = keep.shape[-1]
        if isinstance(num_kept, bool) or not isinstance(num_kept, int) or not 0 <= num_kept <= t:
            raise ValueError(f"num_kept: expected an int in [0, T={t}], got {num_kept!r}")
    if keep.numel() == 0:
        return 0 if num_kept is None else num_kept
    if num_kept is not None:
        # A count the caller has already verified (the cache's one host read per commit, or a
        # Selection's checked num_kept) is trusted, not re-checked: a device-side assertion
        # would poison the CUDA context of the whole process on failure, and a host read is
        # what passing the count avoids.
        return num_kept
    counts = keep.sum(dim=-1)  # (B, Hkv)
    lo, hi = torch.stack(torch.aminmax(counts)).tolist()  # the one host read
    if lo != hi:
        raise ValueError(
            f"keep: expected the same number of kept tokens in every (b, h) row, "
            f"got counts from {lo} to {hi}"
        )
    return lo


def _check_bits(bits: int, allowed: tuple[int, ...] = SUPPORTED_BITS) -> None:
    if isinstance(bits, bool) or bits not in allowed:
        raise ValueError(f"bits: expected one of {allowed}, got {bits!r}")


def _check_param_dtype(dtype: torch.dtype) -> None:
    if dtype not in PARAM_DTYPES:
        raise ValueError(f"param_dtype: expected one of {PARAM_DTYPES}, got {dtype}")


def _check_impl(obj: object, name: str) -> None:
    object.__setattr__(obj, name, parse_impl(name, getattr(obj, name), QUANT_IMPLS))


def _check_group(group_size: int | None, *, optional: bool) -> None:
    if group_size is None and optional:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")


def _check_bytes_args(num_kv_heads: int, head_dim: int, kept_ratio: float, tokens: int) -> None:
    for name, val in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("tokens", tokens)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    check_fraction("kept_ratio", kept_ratio, low_open=False)


# ----------------------------------------------------------------------------- one tensor


def quantize_tensor(
    x: Tensor,
    spec: QuantSpec,
    *,
    channel_separable: bool = False,
    pad_remainder: bool = False,
    impl: Impl | str = Impl.REFERENCE,
) -> QuantizedTensor:
    """Quantize and pack one (B, Hkv, T, D) tensor.

    Args:
        x: (B, Hkv, T, D) floating tensor (T may be 0).
        spec: the quantizer.
        channel_separable: ZipCache's CST: divide by s_c = sqrt(max_t |x_tc|) per (b, h, c)
            (rounded to ``spec.param_dtype``, floored at 2^-14) before quantizing; dequantized
            values are multiplied back.
        pad_remainder: for ``axis="token"`` with a ``group_size`` that does not divide T, the
            last partial token group gets its own parameters (computed over its real tokens:
            the chunk is padded by repeating its last token, which leaves min/max unchanged).
            False: such a T raises ValueError naming ``group_size``.
        impl: ``quantize_pack`` implementation.

    Returns:
        ``QuantizedTensor`` holding packed codes (B, Hkv, T, D * bits // 8) and parameters in
        ``spec.param_dtype``.
    """
    b, h, n, d = x.shape
    pd = spec.param_dtype
    # NaN or infinity would reach the shared parameters and spread to every token of the group
    # (and through the channel divisor to every token of the chunk): stored as 0 instead, in
    # its own token only (docs/decisions.md#non-finite-values)
    if x.is_floating_point():
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    if n == 0:
        data = torch.empty(b, h, 0, d * spec.bits // 8, dtype=torch.uint8, device=x.device)
        return QuantizedTensor(data=data, bits=spec.bits, head_dim=d, spec=spec)
    cs = None
    xq = x
    if channel_separable:
        xf = x.float()  # (B, Hkv, T, D), converted once
        amax = xf.abs().amax(dim=-2, keepdim=True)  # (B, Hkv, 1, D)
        # rounded onto pd's grid first, so the stored divisor is exactly the one divided by
        cs = round_param(torch.sqrt(amax).clamp_min(_MIN_CHANNEL_SCALE), pd, up=False)
        xq = xf / cs  # (B, Hkv, T, D)
    pad = 0
    if pad_remainder and spec.axis == "token" and spec.group_size and n % spec.group_size:
        pad = spec.group_size - n % spec.group_size
        tail = xq[..., -1:, :].expand(b, h, pad, d)  # (B, Hkv, pad, D)
        xq = torch.cat([xq, tail], dim=-2)  # (B, Hkv, T', D)
    packed, scale, zero = quantize_pack(xq, spec, impl=impl)
    if pad:
        packed = packed[..., :n, :].clone()  # own exactly T rows (nbytes must be exact)
    return QuantizedTensor(
        data=packed,
        bits=spec.bits,
        head_dim=d,
        spec=spec,
        scale=scale.to(pd),  # exact: parameters are representable in pd
        zero=zero.to(pd),
        channel_scale=None if cs is None else cs.to(pd),  # exact
    )


def _tensor_bytes(spec: QuantSpec, tokens: int, head_dim: int, channel_separable: bool) -> int:
    """Bytes of one (b, h) row of ``quantize_tensor``'s output for a chunk of ``tokens``."""
    if tokens == 0:
        return 0
    pbytes = torch.empty((), dtype=spec.param_dtype).element_size()
    codes = tokens * head_dim * spec.bits // 8
    params = 2 * spec.num_params(tokens, head_dim) * pbytes
    channel = head_dim * pbytes if channel_separable else 0
    return codes + params + channel


# ----------------------------------------------------------------------------- quantizers


@dataclass(frozen=True)
class IdentityKVQuantizer:
    """Stores k / v unchanged (16-bit, or whatever dtype they come in). Dequantize returns the
    input exactly. The tensors are cloned so the chunk owns exactly the bytes it reports."""

    @property
    def bits(self) -> int:
        """16: unquantized."""
        return 16

    def quantize(
        self, k: Tensor, v: Tensor, keep: Tensor | None = None, *, num_kept: int | None = None
    ) -> QuantizedKV:
        """See ``KVQuantizer.quantize``; ``keep`` is validated, every token is stored as is."""
        _, _, t, d = _check_kv(k, v)
        if keep is not None:
            _check_keep(keep, k, num_kept)
        part = KVPart(QuantizedTensor(k.clone(), 16, d), QuantizedTensor(v.clone(), 16, d))
        return QuantizedKV(parts=(part,), num_tokens=t, dtype=k.dtype)

    def dequantize(
        self, qkv: QuantizedKV, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """See ``KVQuantizer.dequantize``."""
        return _dequantize(qkv, dtype)

    def bytes_per_token(
        self,
        num_kv_heads: int,
        head_dim: int,
        kept_ratio: float = 1.0,
        tokens: int = 4096,
        *,
        dtype: torch.dtype = torch.bfloat16,
    ) -> float:
        """2 * Hkv * D * itemsize(dtype): no metadata."""
        _check_bytes_args(num_kv_heads, head_dim, kept_ratio, tokens)
        return float(2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size())


def _dequantize(qkv: QuantizedKV, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    if not isinstance(qkv, QuantizedKV):
        raise TypeError(f"qkv: expected a QuantizedKV, got {type(qkv).__name__}")
    return qkv.dequantize(dtype)


class _UniformKV:
    """Shared body of the uniform (one precision for every token) quantizers."""

    # set by subclasses
    param_dtype: torch.dtype
    token_wise_impl: Impl

    @property
    def key_spec(self) -> QuantSpec:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def value_spec(self) -> QuantSpec:  # pragma: no cover - overridden
        raise NotImplementedError

    # per-quantizer choices
    _key_pad_remainder = False
    _value_channel_separable = False

    def _impl_for(self, spec: QuantSpec) -> Impl:
        # token_wise_impl applies to the per-token (axis="channel") write path, the only one
        # the Triton kernel covers; per-channel keys always use the reference primitives.
        return self.token_wise_impl if spec.axis == "channel" else Impl.REFERENCE

    def quantize(
        self, k: Tensor, v: Tensor, keep: Tensor | None = None, *, num_kept: int | None = None
    ) -> QuantizedKV:
        """See ``KVQuantizer.quantize``; ``keep`` is validated, every token gets the same
        precision."""
        _, _, t, _ = _check_kv(k, v)
        if keep is not None:
            _check_keep(keep, k, num_kept)
        ks, vs = self.key_spec, self.value_spec
        kq = quantize_tensor(k, ks, pad_remainder=self._key_pad_remainder, impl=self._impl_for(ks))
        vq = quantize_tensor(
            v, vs, channel_separable=self._value_channel_separable, impl=self._impl_for(vs)
        )
        return QuantizedKV(parts=(KVPart(kq, vq),), num_tokens=t, dtype=k.dtype)

    def dequantize(
        self, qkv: QuantizedKV, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """See ``KVQuantizer.dequantize``."""
        return _dequantize(qkv, dtype)

    def _chunk_bytes(self, tokens: int, head_dim: int) -> int:
        """K + V bytes of one (b, h) row for a chunk of ``tokens`` tokens."""
        vs = self.value_spec
        if vs.group_size is not None and head_dim % vs.group_size:
            raise ValueError(
                f"group_size: expected a divisor of head_dim {head_dim}, got {vs.group_size}"
            )
        if tokens and not self._key_pad_remainder:
            self.key_spec.group_length(tokens)  # raises for a token group that does not divide
        return _tensor_bytes(self.key_spec, tokens, head_dim, False) + _tensor_bytes(
            vs, tokens, head_dim, self._value_channel_separable
        )

    def bytes_per_token(
        self,
        num_kv_heads: int,
        head_dim: int,
        kept_ratio: float = 1.0,
        tokens: int = 4096,
        *,
        dtype: torch.dtype = torch.bfloat16,
    ) -> float:
        """Exact K+V bytes per token of one layer for a chunk of ``tokens`` tokens: codes,
        scales and zero points (and CST channel divisors), per-chunk parameters amortised over
        the chunk. ``kept_ratio`` and ``dtype`` do not matter for a uniform quantizer."""
        _check_bytes_args(num_kv_heads, head_dim, kept_ratio, tokens)
        return num_kv_heads * self._chunk_bytes(tokens, head_dim) / tokens


@dataclass(frozen=True)
class ZipCacheKVQuantizer(_UniformKV):
    """ZipCache's quantizers at one bit-width (docs/algorithm.md#mixed-precision-quantization).

    Keys: channel-wise asymmetric over the chunk's tokens, one (scale, zero) per (b, h, channel)
    (``key_spec = QuantSpec(bits, "token")``). Values: channel-separable token-wise (CST):
    s_c = sqrt(max_t |v_tc|) per (b, h, channel), then one (scale, zero) per (b, h, token) over
    the D channels of v / s (``value_spec = QuantSpec(bits, "channel")``).

    Per (b, h), a chunk of T tokens holds T * D * bits / 8 bytes of codes per tensor, 2 * D key
    parameters, D channel divisors and 2 * T value parameters.

    Attributes:
        bits: 2, 4 or 8.
        param_dtype: storage dtype of scales / zero points / divisors.
        token_wise_impl: implementation of the value (token-wise) write path.
    """

    bits: int = 4
    param_dtype: torch.dtype = torch.float16
    token_wise_impl: Impl = Impl.REFERENCE

    _value_channel_separable = True

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        _check_param_dtype(self.param_dtype)
        _check_impl(self, "token_wise_impl")

    @property
    def key_spec(self) -> QuantSpec:
        """Per-channel keys: scale shared along the chunk's tokens."""
        return QuantSpec(self.bits, "token", None, param_dtype=self.param_dtype)

    @property
    def value_spec(self) -> QuantSpec:
        """Per-token values (after the CST channel divisor)."""
        return QuantSpec(self.bits, "channel", None, param_dtype=self.param_dtype)


@dataclass(frozen=True)
class KIVIKVQuantizer(_UniformKV):
    """KIVI (Liu et al. 2024): keys per channel in groups of ``group_size``
    tokens, values per token in groups of ``group_size`` channels, asymmetric.

    Remainder: a chunk whose length is not a multiple of ``group_size`` is handled explicitly:
    the last partial key group gets its own parameters over its real tokens (KIVI itself keeps
    such tokens in its fp16 residual; here the cache decides what to flush). The head dim must
    be a multiple of ``group_size`` (ValueError naming ``group_size`` otherwise).

    Attributes:
        bits: 2, 4 or 8.
        group_size: tokens per key group and channels per value group (KIVI: 32).
        param_dtype: storage dtype of scales / zero points.
        token_wise_impl: implementation of the value (token-wise) write path.
    """

    bits: int = 2
    group_size: int = 32
    param_dtype: torch.dtype = torch.float16
    token_wise_impl: Impl = Impl.REFERENCE

    _key_pad_remainder = True

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        _check_group(self.group_size, optional=False)
        _check_param_dtype(self.param_dtype)
        _check_impl(self, "token_wise_impl")

    @property
    def key_spec(self) -> QuantSpec:
        """Per-channel keys in groups of ``group_size`` tokens."""
        return QuantSpec(self.bits, "token", self.group_size, param_dtype=self.param_dtype)

    @property
    def value_spec(self) -> QuantSpec:
        """Per-token values in groups of ``group_size`` channels."""
        return QuantSpec(self.bits, "channel", self.group_size, param_dtype=self.param_dtype)


@dataclass(frozen=True)
class PerTokenKVQuantizer(_UniformKV):
    """Keys and values both per token, in groups of ``group_size`` channels (None = the whole
    head dim), asymmetric. The head dim must be a multiple of ``group_size``.

    Attributes:
        bits: 2, 4 or 8.
        group_size: channels per group, or None.
        param_dtype: storage dtype of scales / zero points.
        token_wise_impl: implementation of the write path (both tensors are token-wise).
    """

    bits: int = 4
    group_size: int | None = 32
    param_dtype: torch.dtype = torch.float16
    token_wise_impl: Impl = Impl.REFERENCE

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        _check_group(self.group_size, optional=True)
        _check_param_dtype(self.param_dtype)
        _check_impl(self, "token_wise_impl")

    @property
    def key_spec(self) -> QuantSpec:
        """Per-token keys."""
        return QuantSpec(self.bits, "channel", self.group_size, param_dtype=self.param_dtype)

    @property
    def value_spec(self) -> QuantSpec:
        """Per-token values."""
        return QuantSpec(self.bits, "channel", self.group_size, param_dtype=self.param_dtype)

    def _chunk_bytes(self, tokens: int, head_dim: int) -> int:
        gs = self.group_size
        if gs is not None and head_dim % gs:
            raise ValueError(f"group_size: expected a divisor of head_dim {head_dim}, got {gs}")
        return 2 * _tensor_bytes(self.value_spec, tokens, head_dim, False)


def _default_high() -> KVQuantizer:
    return ZipCacheKVQuantizer(4)


def _default_low() -> KVQuantizer:
    return ZipCacheKVQuantizer(2)


@dataclass(frozen=True)
class MixedPrecisionKVQuantizer:
    """ZipVL's mixed-precision KV: kept tokens through ``high``, the others through ``low``.

    Composition, not a new primitive (style G4): the chunk is split by the keep mask into the
    kept tokens (ascending positions) and the others, each quantized by its uniform quantizer;
    which token went where is stored as a packed keep bitmap (1 bit per (b, h, t), counted in
    ``nbytes``), from which dequantization restores the original order.

    Defaults: ZipCache quantizers at b_h = 4 / b_l = 2 bits (docs/decisions.md#bit-widths).

    Attributes:
        high: uniform quantizer of the kept (important) tokens.
        low: uniform quantizer of the other tokens.
    """

    high: KVQuantizer = field(default_factory=_default_high)
    low: KVQuantizer = field(default_factory=_default_low)

    def __post_init__(self) -> None:
        for name in ("high", "low"):
            q = getattr(self, name)
            if isinstance(q, MixedPrecisionKVQuantizer) or not isinstance(q, KVQuantizer):
                raise TypeError(
                    f"{name}: expected a uniform KVQuantizer (not mixed), got {type(q).__name__}"
                )

    def quantize(
        self, k: Tensor, v: Tensor, keep: Tensor | None = None, *, num_kept: int | None = None
    ) -> QuantizedKV:
        """See ``KVQuantizer.quantize``. keep=None stores every token through ``high``.

        Host syncs: one read of the kept count P (it sizes the two parts), none when the
        caller passes ``num_kept`` (see ``_check_keep``) or ``keep`` is None.
        """
        b, h, t, d = _check_kv(k, v)
        if keep is None:
            keep = torch.ones(b, h, t, dtype=torch.bool, device=k.device)
            p = t
        else:
            p = _check_keep(keep, k, num_kept)
        if p in (0, t):
            sk, sv = k, v  # one part holds every token in position order: nothing to move
        else:
            order = keep_permutation(keep)  # (B, Hkv, T): the P kept positions first
            gi = order.unsqueeze(-1).expand(-1, -1, -1, d)  # (B, Hkv, T, D)
            sk, sv = k.gather(2, gi), v.gather(2, gi)  # one gather per tensor for both parts
        parts = []
        for q, lo, hi in ((self.high, 0, p), (self.low, p, t)):
            sub = q.quantize(sk[:, :, lo:hi], sv[:, :, lo:hi])
            if len(sub.parts) != 1:
                raise TypeError(f"expected a one-part chunk from {type(q).__name__}")
            parts.append(sub.parts[0])
        return QuantizedKV(parts=tuple(parts), num_tokens=t, dtype=k.dtype, keep=pack_bitmap(keep))

    def dequantize(
        self, qkv: QuantizedKV, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """See ``KVQuantizer.dequantize``."""
        return _dequantize(qkv, dtype)

    def bytes_per_token(
        self,
        num_kv_heads: int,
        head_dim: int,
        kept_ratio: float = 1.0,
        tokens: int = 4096,
        *,
        dtype: torch.dtype = torch.bfloat16,
    ) -> float:
        """Exact K+V bytes per token of one layer for a chunk of ``tokens`` tokens of which
        P = round(kept_ratio * tokens) are kept: ``high``'s bytes for P tokens + ``low``'s for
        T - P (each with its per-chunk parameters) + the keep bitmap, ceil(T / 8) bytes per
        KV head, all divided by T."""
        _check_bytes_args(num_kv_heads, head_dim, kept_ratio, tokens)
        p = round(kept_ratio * tokens)
        total = num_kv_heads * -(-tokens // 8)  # keep bitmap
        for q, n in ((self.high, p), (self.low, tokens - p)):
            if n:
                # bytes of a sub-chunk are an integer: round away the float division
                total += round(q.bytes_per_token(num_kv_heads, head_dim, 1.0, n, dtype=dtype) * n)
        return total / tokens
