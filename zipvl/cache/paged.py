"""Paged mixed-precision KV storage of one attention layer (the decode half of ZipVL).

What it stores, per sequence row r = (b, kv_head):

* **pages** of ``page_size`` tokens in two pools, one per precision class (high = important
  tokens, low = the others). A page is one quantization group with ZipCache's layout: keys per
  channel over the page's tokens, values per token over the head dim after a per-channel divisor
  (channel-separable token-wise quantization). Parameters are stored once, when the page is
  written, in the layout the decode kernel reads (``param_dtype``). A page is never modified
  again; sequences may share pages (beam search reorders page tables, not pages).
* a **page table** per class: ``page_table[c][r, j]`` is the pool index of the j-th page of row
  r and ``page_fill[c][r, j]`` how many of its slots are live (``page_size`` except after a crop).
* one **full-precision buffer** per row, in four regions of static capacity: the sinks (the first
  ``sink_tokens`` positions), the high and the low *staging* regions (tokens selected for a class
  that do not fill a page yet), and the **tail** (generated tokens not scored yet: a static buffer
  of capacity ``recompress_every + tail_slack``). ``fp_count[r]`` holds the live length of each.

Within a class, a row's tokens are kept in position order: its pages (in table order), then its
staging region. Which class each position went to is a 1-bit-per-position map per class
(``class_bits``), from which positions are recovered (``dense_kv``) and crops are resolved.

Rows are independent: every row has its own kept counts, page counts and staging lengths, and
left padding is never stored (a padded row simply holds fewer tokens). All counts the decode
kernel reads are device tensors: appending a token and reading the cache need no host sync.

The store knows nothing about scoring: ``zipvl.cache.paged_layer.PagedCacheLayer`` decides which
tokens are important and calls ``write_prefill`` / ``append`` / ``commit_block``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from zipvl.cache.graph_step import graph_step
from zipvl.cache.scoring import sink_padding_error
from zipvl.checks import check_int
from zipvl.impl import PAGE_WRITE_IMPLS, Impl, parse_impl
from zipvl.quant.fragment import (
    CODE_ORDERS,
    FRAGMENT_BITS,
    FRAGMENT_SIZE,
    pack_fragment,
    unpack_fragment,
)
from zipvl.quant.primitives import choose_qparams, dequantize, pack, quantize, round_param, unpack
from zipvl.quant.spec import PARAM_DTYPES, QuantSpec

__all__ = ["CODE_ORDERS", "HIGH", "LOW", "PageFormat", "PagedKVStore", "page_format_problem"]

HIGH, LOW = 0, 1
"""Precision classes: important tokens and the others."""

# full-precision regions of the per-row buffer
SINK, STAGE_HIGH, STAGE_LOW, TAIL = 0, 1, 2, 3
_MIN_CHANNEL_SCALE = 2.0**-14  # the CST divisor floor of zipvl.quant (fp16's smallest normal)


@dataclass(frozen=True)
class PageFormat:
    """How pages are quantized.

    Attributes:
        high_bits: code width of important tokens (2, 4 or 8).
        low_bits: code width of the others (2, 4 or 8).
        page_size: tokens per page, a multiple of 16 (one quantization group of keys).
        param_dtype: storage dtype of scales, zero points and channel divisors.
        channel_separable: divide values by sqrt(max |v|) per channel of the page before
            token-wise quantization (ZipCache's CST).
        code_order: how a page's codes are laid out in its bytes. ``"slice"``: rows of
            contiguous slices (``zipvl.quant.primitives.pack``), keys and values token-major,
            any page size and head dim; ``"fragment"``: the matrix-multiply operand order of
            ``zipvl.quant.fragment`` (keys token-major, values channel-major), read by the
            fused decode's ``"fragment"`` kernel, for 128-token pages of head dim 128 at 4 and
            2 bits only; ``"auto"`` (the default): ``"fragment"`` where it applies, ``"slice"``
            elsewhere (the store resolves it, ``resolved``). Both orders hold the same codes
            and parameters in the same number of bytes.
    """

    high_bits: int = 4
    low_bits: int = 2
    page_size: int = 128
    param_dtype: torch.dtype = torch.float16
    channel_separable: bool = True
    code_order: str = "auto"

    def __post_init__(self) -> None:
        for name in ("high_bits", "low_bits"):
            bits = getattr(self, name)
            if isinstance(bits, bool) or bits not in (2, 4, 8):
                raise ValueError(f"{name}: expected one of (2, 4, 8), got {bits!r}")
        p = check_int("page_size", self.page_size, 16)
        if p % 16:
            raise ValueError(f"page_size: expected a multiple of 16, got {p}")
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(
                f"param_dtype: expected one of {PARAM_DTYPES}, got {self.param_dtype}"
            )
        if self.code_order not in CODE_ORDERS:
            raise ValueError(f"code_order: expected one of {CODE_ORDERS}, got {self.code_order!r}")

    def fragment_problem(self, head_dim: int) -> str | None:
        """Why pages of this format and ``head_dim`` cannot take the fragment order, or None."""
        bits = (self.high_bits, self.low_bits)
        if self.page_size != FRAGMENT_SIZE or head_dim != FRAGMENT_SIZE:
            return (f"page_size and head_dim of {FRAGMENT_SIZE}, got page_size "
                    f"{self.page_size} and head_dim {head_dim}")  # fmt: skip
        if any(b not in FRAGMENT_BITS for b in bits):
            return f"codes of {FRAGMENT_BITS} bits, got high_bits, low_bits = {bits}"
        return None

    def resolved(self, head_dim: int) -> PageFormat:
        """This format with ``code_order`` decided for ``head_dim`` ("auto" -> "fragment"
        where it applies, else "slice").

        Raises:
            ValueError: ``code_order="fragment"`` where it does not apply.
        """
        problem = self.fragment_problem(head_dim)
        if self.code_order == "auto":
            return replace(self, code_order="slice" if problem else "fragment")
        if self.code_order == "fragment" and problem is not None:
            raise ValueError(f"code_order: 'fragment' needs {problem}; use 'auto' or 'slice'")
        return self

    def bits(self, cls: int) -> int:
        """Code width of class ``cls`` (``HIGH`` or ``LOW``)."""
        return self.high_bits if cls == HIGH else self.low_bits

    def key_spec(self, cls: int) -> QuantSpec:
        return QuantSpec(self.bits(cls), "token", None, param_dtype=self.param_dtype)

    def value_spec(self, cls: int) -> QuantSpec:
        return QuantSpec(self.bits(cls), "channel", None, param_dtype=self.param_dtype)

    def page_bytes(self, cls: int, head_dim: int) -> int:
        """Bytes of one page of one row, keys and values, every parameter counted."""
        pb = torch.empty((), dtype=self.param_dtype).element_size()
        codes = 2 * self.page_size * head_dim * self.bits(cls) // 8
        key_params = 2 * head_dim * pb  # scale and zero per channel
        value_params = 2 * self.page_size * pb  # scale and zero per token
        divisor = head_dim * pb  # CST divisor per channel (stored as ones without CST)
        return codes + key_params + value_params + divisor

    @classmethod
    def from_quantizer(
        cls, quantizer: object, page_size: int = 128, code_order: str = "auto"
    ) -> PageFormat:
        """The page format that stores what ``quantizer`` would, page by page.

        Raises:
            ValueError: the quantizer has no paged form (``page_format_problem`` says why).
        """
        problem = page_format_problem(quantizer)
        if problem is not None:
            raise ValueError(f"quantizer: {problem}")
        from zipvl.quant import MixedPrecisionKVQuantizer

        if isinstance(quantizer, MixedPrecisionKVQuantizer):
            hi, lo = quantizer.high, quantizer.low
        else:
            hi = lo = quantizer
        return cls(
            high_bits=hi.bits,  # type: ignore[attr-defined]
            low_bits=lo.bits,  # type: ignore[attr-defined]
            page_size=page_size,
            param_dtype=hi.param_dtype,  # type: ignore[attr-defined]
            channel_separable=True,
            code_order=code_order,
        )


def page_format_problem(quantizer: object) -> str | None:
    """Why ``quantizer`` cannot be stored in pages (and read by the fused decode), or None.

    Pages hold ZipCache's layout: ``ZipCacheKVQuantizer`` alone, or a
    ``MixedPrecisionKVQuantizer`` of two of them with the same ``param_dtype``.
    """
    from zipvl.quant import MixedPrecisionKVQuantizer, ZipCacheKVQuantizer

    parts = (
        (quantizer.high, quantizer.low)
        if isinstance(quantizer, MixedPrecisionKVQuantizer)
        else (quantizer,)
    )
    for q in parts:
        if not isinstance(q, ZipCacheKVQuantizer):
            return (
                f"{type(q).__name__} has no paged layout (pages store ZipCache's layout: "
                "keys per channel over a page, values per token with a channel divisor); "
                "use ZipCacheKVQuantizer or a MixedPrecisionKVQuantizer of two of them"
            )
    if len({q.param_dtype for q in parts}) != 1:  # type: ignore[attr-defined]
        return "the high and low quantizers store parameters in different dtypes"
    return None


def _first_valid_fill(x: Tensor, valid: Tensor) -> Tensor:
    """x (N, P, D) with every invalid slot replaced by the first valid slot of its page
    (min / max of the page unchanged). valid (N, P) bool, at least one True per page, or
    pages of no valid slot keep their own data."""
    n, p, d = x.shape
    pos = torch.arange(p, device=x.device)
    first = torch.where(valid, pos, p).amin(-1, keepdim=True)  # (N, 1)
    first = torch.where(first < p, first, 0)
    src = torch.where(valid, pos, first)  # (N, P)
    return x.gather(1, src[..., None].expand(n, p, d))


def quantize_pages(
    fmt: PageFormat, cls: int, k: Tensor, v: Tensor, valid: Tensor | None = None
) -> dict[str, Tensor]:
    """Quantize N pages of keys and values (ZipCache's quantizers, one group per page).

    Args:
        fmt: the page format.
        cls: ``HIGH`` or ``LOW`` (the code width).
        k: (N, P, D) keys of the pages.
        v: (N, P, D) values.
        valid: optional (N, P) bool, False = an empty slot (left out of every statistic).

    Returns:
        Pool rows: ``kcode`` / ``vcode`` (N, P, D * bits / 8) uint8 (in the fragment order,
        ``vcode`` is (N, D, P * bits / 8): values channel-major), ``kscale`` / ``kzero`` /
        ``vcs`` (N, D) and ``vscale`` / ``vzero`` (N, P) in ``fmt.param_dtype``.
    """
    fmt = fmt.resolved(k.shape[-1])
    frag = fmt.code_order == "fragment"
    if valid is not None:
        k, v = _first_valid_fill(k, valid), _first_valid_fill(v, valid)
    # a NaN or infinity must not reach the page's statistics (it would spread to every token
    # of the page through the key scale and the channel divisor): it is stored as 0 instead,
    # in its own token only (the prompt commit raises before getting here)
    k = torch.nan_to_num(k.float(), nan=0.0, posinf=0.0, neginf=0.0)
    v = torch.nan_to_num(v.float(), nan=0.0, posinf=0.0, neginf=0.0)
    bits = fmt.bits(cls)
    pd = fmt.param_dtype
    kf = k.float()
    kspec = fmt.key_spec(cls)
    ks, kz = choose_qparams(kf, kspec)  # (N, 1, D) each
    kq = quantize(kf, kspec, ks, kz)
    kcode = pack_fragment(kq, bits) if frag else pack(kq, bits)
    vf = v.float()
    if fmt.channel_separable:
        amax = vf.abs().amax(dim=-2, keepdim=True)  # (N, 1, D)
        cs = round_param(torch.sqrt(amax).clamp_min(_MIN_CHANNEL_SCALE), pd, up=False)
    else:
        cs = torch.ones_like(vf[:, :1])
    vq = vf / cs
    vspec = fmt.value_spec(cls)
    vs, vz = choose_qparams(vq, vspec)  # (N, P, 1, 1) each
    vqc = quantize(vq, vspec, vs, vz)
    vcode = pack_fragment(vqc.transpose(-1, -2), bits) if frag else pack(vqc, bits)
    n, p, _ = k.shape
    return {
        "kcode": kcode,
        "vcode": vcode,
        "kscale": ks.reshape(n, -1).to(pd),
        "kzero": kz.reshape(n, -1).to(pd),
        "vscale": vs.reshape(n, p).to(pd),
        "vzero": vz.reshape(n, p).to(pd),
        "vcs": cs.reshape(n, -1).to(pd),
    }


def dequantize_pages(
    fmt: PageFormat, cls: int, pool: dict[str, Tensor], pages: Tensor
) -> tuple[Tensor, Tensor]:
    """Float32 keys and values of pool pages ``pages`` (any int shape S): (*S, P, D) each."""
    bits = fmt.bits(cls)
    fmt = fmt.resolved(pool["kscale"].shape[-1])  # "auto": the order quantize_pages wrote
    flat = pages.reshape(-1).long()
    if fmt.code_order == "fragment":
        kc = unpack_fragment(pool["kcode"][flat], bits)  # (M, P, D)
        vc = unpack_fragment(pool["vcode"][flat], bits).transpose(-1, -2)  # stored (M, D, P)
    else:
        kc = unpack(pool["kcode"][flat], bits)  # (M, P, D)
        vc = unpack(pool["vcode"][flat], bits)
    kspec, vspec = fmt.key_spec(cls), fmt.value_spec(cls)
    ks = pool["kscale"][flat].float()[:, None, None, :]  # (M, 1, 1, D)
    kz = pool["kzero"][flat].float()[:, None, None, :]
    k = dequantize(kc, kspec, ks, kz, dtype=torch.float32)
    vs = pool["vscale"][flat].float()[:, :, None, None]  # (M, P, 1, 1)
    vz = pool["vzero"][flat].float()[:, :, None, None]
    v = dequantize(vc, vspec, vs, vz, dtype=torch.float32) * pool["vcs"][flat].float()[:, None]
    shape = (*pages.shape, *k.shape[1:])
    return k.reshape(shape), v.reshape(shape)


class PagedKVStore:
    """The compressed KV of one layer in pages (module docstring for the layout).

    Args:
        fmt: page format.
        batch_size: B.
        num_heads: Hkv.
        head_dim: D, a multiple of the codes per byte (the fused decode also needs a power of
            two >= 64: each quarter of the channels is a matrix operand of >= 16).
        dtype: dtype of the full-precision regions (the model's K/V dtype).
        device: where everything lives.
        recompress_every: R, tokens per decode block.
        sink_tokens: leading positions kept at full precision.
        tail_slack: tail capacity beyond R (tokens a step may add past a full block).
        reserve_tokens: generated tokens per row the pools grow by when they are full, at most
            (an eighth of the sequence below that): a larger value copies the pools less often
            and holds more unused pages.
        write_impl: how pages are quantized and written: ``"triton"`` (one launch per
            precision class, ``zipvl.cache.page_triton``; raises where it cannot run),
            ``"reference"`` (PyTorch) or ``"auto"`` (Triton for CUDA stores it can write,
            PyTorch otherwise). Both store the same bytes.

    Raises:
        ValueError: an argument out of range (the message names it).
    """

    def __init__(
        self,
        fmt: PageFormat,
        *,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        recompress_every: int,
        sink_tokens: int,
        tail_slack: int = 64,
        reserve_tokens: int = 1024,
        write_impl: Impl | str = Impl.AUTO,
    ) -> None:
        if not isinstance(fmt, PageFormat):
            raise TypeError(f"fmt: expected a PageFormat, got {type(fmt).__name__}")
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.num_heads = check_int("num_heads", num_heads, 1)
        self.head_dim = check_int("head_dim", head_dim, 1)
        self.fmt = fmt = fmt.resolved(head_dim)  # code_order decided once, here
        per = 8 // min(fmt.high_bits, fmt.low_bits)
        if head_dim % per:
            raise ValueError(
                f"head_dim: expected a multiple of {per} (codes per byte at "
                f"{min(fmt.high_bits, fmt.low_bits)} bits), got {head_dim}"
            )
        self.dtype = dtype
        self.device = torch.device(device)
        self.recompress_every = check_int("recompress_every", recompress_every, 1)
        self.sink_tokens = check_int("sink_tokens", sink_tokens, 0)
        self.tail_slack = check_int("tail_slack", tail_slack, 1)
        self.reserve_tokens = check_int("reserve_tokens", reserve_tokens, 1)
        self.step_tokens = 0  # tokens appended by a recorded decode step (zipvl.models.captured)
        self.write_impl = self._resolve_write_impl(parse_impl("write_impl", write_impl,
                                                              PAGE_WRITE_IMPLS))  # fmt: skip
        p, r = fmt.page_size, self.recompress_every
        # region capacities of the full-precision buffer; staging holds < P before a block and
        # gains at most R, so P + R slots always suffice
        self.stage_cap = p + r
        self.tail_cap = r + self.tail_slack
        self.region_base = (
            0,
            self.sink_tokens,
            self.sink_tokens + self.stage_cap,
            self.sink_tokens + 2 * self.stage_cap,
        )
        self.fp_cap = self.region_base[TAIL] + self.tail_cap
        self._alloc_empty()

    def _resolve_write_impl(self, impl: Impl) -> Impl:
        if impl is Impl.REFERENCE:
            return impl
        if impl is Impl.AUTO and self.device.type != "cuda":
            return Impl.REFERENCE  # the interpreter's CPU runs only when asked for
        from zipvl.cache.page_triton import page_write_problem

        problem = page_write_problem(self.fmt.page_size, self.head_dim, self.device)
        if problem is None:
            return Impl.TRITON
        if impl is Impl.TRITON:
            raise ValueError(f"write_impl: 'triton' needs {problem}; use 'auto' or 'reference'")
        return Impl.REFERENCE

    # ------------------------------------------------------------------ allocation
    @property
    def rows(self) -> int:
        """B * Hkv sequence rows."""
        return self.batch_size * self.num_heads

    def _alloc_empty(self) -> None:
        rows, d, dev = self.rows, self.head_dim, self.device
        # + 1 trailing scratch slot: masked scatters write there
        self.fp_k = torch.zeros(rows, self.fp_cap + 1, d, dtype=self.dtype, device=dev)
        self.fp_v = torch.zeros_like(self.fp_k)
        self.fp_count = torch.zeros(rows, 4, dtype=torch.int32, device=dev)
        self.pools: list[dict[str, Tensor]] = [self._new_pool(c, 1) for c in (HIGH, LOW)]
        self.pool_used = [1, 1]  # host upper bound of allocated pages (page 0 is scratch)
        self.page_used = [torch.ones((), dtype=torch.int64, device=dev) for _ in (HIGH, LOW)]
        self.page_table = [torch.zeros(rows, 1, dtype=torch.int32, device=dev) for _ in "hl"]
        self.page_fill = [torch.zeros(rows, 1, dtype=torch.int32, device=dev) for _ in "hl"]
        self.num_pages = [torch.zeros(rows, dtype=torch.int32, device=dev) for _ in "hl"]
        self.max_pages = [0, 0]  # host upper bound of any row's page count
        # 1 bit per position and class: which class each compressed position went to
        self.class_bits = torch.zeros(2, rows, 0, dtype=torch.bool, device=dev)
        self.length = 0  # positions held (host int; equal for every row, padding included)
        self.num_sinks = 0  # host int, the same for every row
        self.tail_length = 0  # host int, the same for every row
        self._ar = torch.arange(16, device=self.device)
        self.pad = torch.zeros(self.batch_size, dtype=torch.int64, device=dev)  # left padding
        # set by the page writer when counts exceed the host bounds (pages were not stored)
        self.overflow = torch.zeros(1, dtype=torch.int32, device=dev)

    def _new_pool(self, cls: int, pages: int) -> dict[str, Tensor]:
        p, d, dev, pd = self.fmt.page_size, self.head_dim, self.device, self.fmt.param_dtype
        row = d * self.fmt.bits(cls) // 8
        # the fragment order stores values channel-major: (D, P * bits / 8), the same shape
        # as (P, D * bits / 8) since it needs P == D
        return {
            "kcode": torch.zeros(pages, p, row, dtype=torch.uint8, device=dev),
            "vcode": torch.zeros(pages, p, row, dtype=torch.uint8, device=dev),
            "kscale": torch.ones(pages, d, dtype=pd, device=dev),
            "kzero": torch.zeros(pages, d, dtype=pd, device=dev),
            "vscale": torch.ones(pages, p, dtype=pd, device=dev),
            "vzero": torch.zeros(pages, p, dtype=pd, device=dev),
            "vcs": torch.ones(pages, d, dtype=pd, device=dev),
        }

    def reserve(self, cls: int, pages: int, per_row: int) -> None:
        """Make room for ``pages`` more pool pages and ``per_row`` more table columns per row
        (host-side bounds, no sync; a full pool grows by ``reserve_tokens`` worth of pages per
        row, so the copy is amortized over that many generated tokens)."""
        need = self.pool_used[cls] + pages
        have = self.pools[cls]["kcode"].shape[0]
        if need > have:
            # headroom: reserve_tokens, or an eighth of the length for short sequences
            ahead = min(self.reserve_tokens, max(self.fmt.page_size, self.length // 8))
            grow = max(need - have, self.rows * -(-ahead // self.fmt.page_size))
            if self.pool_used[cls] == 1 and have == 1:  # only the scratch page: no copy
                self.pools[cls] = self._new_pool(cls, have + grow)
            else:
                extra = self._new_pool(cls, grow)
                pool = self.pools[cls]
                self.pools[cls] = {k: torch.cat([t, extra[k]]) for k, t in pool.items()}
        cols = self.max_pages[cls] + per_row
        have_cols = self.page_table[cls].shape[1]
        if cols > have_cols:
            grow = max(cols - have_cols, have_cols // 2)
            if self.max_pages[cls] == 0:  # nothing in the tables yet: fresh ones, no copy
                # a width of a multiple of 4 keeps the fill table (the second half) 16-byte
                # aligned, as the decode kernel's aligned loads want
                width = -(-(have_cols + grow) // 4) * 4
                fresh = torch.zeros(2, self.rows, width, dtype=torch.int32, device=self.device)
                self.page_table[cls], self.page_fill[cls] = fresh[0], fresh[1]
            else:
                pad = torch.zeros(self.rows, grow, dtype=torch.int32, device=self.device)
                self.page_table[cls] = torch.cat([self.page_table[cls], pad], dim=1)
                self.page_fill[cls] = torch.cat([self.page_fill[cls], pad], dim=1)

    def _reserve_positions(self, n: int) -> None:
        have = self.class_bits.shape[-1]
        if n > have:
            grow = max(n - have, have // 2, 1024)
            pad = torch.zeros(2, self.rows, have + grow if have == 0 else grow, dtype=torch.bool,
                              device=self.device)  # fmt: skip
            self.class_bits = pad if have == 0 else torch.cat([self.class_bits, pad], dim=-1)

    def _write_pages(self, cls: int, k: Tensor, v: Tensor, idx: Tensor | None, full: Tensor,
                     m: int, n_live: int, counts: Tensor | None = None) -> None:  # fmt: skip
        """Quantize pages and append them to each row's table in order. No host sync.

        Row r = b H + h takes its ``full[r]`` pages (<= ``m``) from the tokens
        ``idx[r, :full[r] P]`` of ``k`` / ``v`` (B, H, S, D), P tokens a page in that order
        (``idx`` None: tokens 0, 1, ...). ``n_live`` is a host upper bound of ``full.sum()``.
        With ``counts`` (the kernel only: each row's tokens of this class in ``idx``), the
        rest of each row (``counts[r] - full[r] P`` tokens) goes to the class's empty staging
        region in the same launch.
        """
        p, d = self.fmt.page_size, self.head_dim
        rows = self.rows
        if m == 0 and counts is None:
            return
        self.reserve(cls, n_live, m)
        full = full.to(torch.int32)
        if self.write_impl is Impl.TRITON:
            from zipvl.cache.page_triton import write_pages_triton

            stage = None
            if counts is not None:
                region = STAGE_HIGH if cls == HIGH else STAGE_LOW
                stage = (self.fp_k, self.fp_v, counts, self.fp_count, region,
                         self.region_base[region])  # fmt: skip
            base = self.page_used[cls] + torch.cumsum(full, 0) - full  # (rows,) int64
            write_pages_triton(
                k, v, idx, full, base, self.num_pages[cls], self.page_table[cls],
                self.page_fill[cls], self.pools[cls], pages=m, bits=self.fmt.bits(cls),
                levels=self.fmt.key_spec(cls).levels, param_dtype=self.fmt.param_dtype,
                channel_separable=self.fmt.channel_separable, stage=stage, flag=self.overflow,
                frag=self.fmt.code_order == "fragment",
            )  # fmt: skip
            self.page_used[cls] = self.page_used[cls] + full.sum()
            self.pool_used[cls] += n_live
            self.num_pages[cls] += full
            self.max_pages[cls] += m
            return
        full = full.clamp(max=m)  # a row past its bound loses pages (flagged by the caller)
        kf = k.reshape(rows, k.shape[2], d)
        vf = v.reshape(rows, v.shape[2], d)
        if idx is None:
            pk, pv = kf[:, : m * p], vf[:, : m * p]
        else:
            gi = idx[:, : m * p, None].expand(rows, m * p, d)
            pk, pv = kf.gather(1, gi), vf.gather(1, gi)
        live = torch.arange(m, device=self.device)[None, :] < full[:, None]  # (rows, M)
        q = quantize_pages(self.fmt, cls, pk.reshape(rows * m, p, d), pv.reshape(rows * m, p, d))
        flat_live = live.reshape(-1)
        dest = self.page_used[cls] + torch.cumsum(flat_live, 0) - 1  # (rows * M,)
        dest = torch.where(flat_live, dest, 0)  # dead candidates go to scratch page 0
        pool = self.pools[cls]
        for key, t in q.items():
            pool[key].index_copy_(0, dest, t)
        self.page_used[cls] = self.page_used[cls] + flat_live.sum()
        self.pool_used[cls] += n_live
        # table columns: live page j of row r goes to column num_pages[r] + j
        col = self.num_pages[cls][:, None].long() + torch.arange(m, device=self.device)
        col = torch.where(live, col, self.page_table[cls].shape[1] - 1)  # (rows, M)
        old_t = self.page_table[cls].gather(1, col)
        old_f = self.page_fill[cls].gather(1, col)
        self.page_table[cls].scatter_(1, col, torch.where(live, dest.view(rows, m).int(), old_t))
        self.page_fill[cls].scatter_(1, col, torch.where(live, p, old_f).int())
        self.num_pages[cls] += full
        self.max_pages[cls] += m

    # ------------------------------------------------------------------ fp regions
    def _fp_write(self, region: int, k: Tensor, v: Tensor, start: Tensor, live: Tensor) -> None:
        """Write tokens (rows, T, D) at per-row slots ``start[r] + t`` of ``region`` where
        ``live`` (rows, T); other tokens go to the scratch slot."""
        rows, t, d = k.shape
        slot = self.region_base[region] + start[:, None].long() + torch.arange(t, device=k.device)
        slot = torch.where(live, slot, self.fp_cap)  # (rows, T)
        idx = slot[..., None].expand(rows, t, d)
        self.fp_k.scatter_(1, idx, k.to(self.dtype))
        self.fp_v.scatter_(1, idx, v.to(self.dtype))

    def region(self, region: int) -> tuple[Tensor, Tensor]:
        """Full-precision K, V of one region over its capacity (rows, cap, D) (views)."""
        lo = self.region_base[region]
        hi = lo + (self.region_base[region + 1] - lo if region < TAIL else self.tail_cap)
        return self.fp_k[:, lo:hi], self.fp_v[:, lo:hi]

    # ------------------------------------------------------------------ write path
    def write_prefill(self, k: Tensor, v: Tensor, keep: Tensor | None, valid: Tensor | None,
                      num_sinks: int, *, kept_rows: Sequence[int] | None = None,
                      real_rows: Sequence[int] | None = None) -> dict[str, Any]:  # fmt: skip
        """Store a prompt: sinks at full precision, the rest split by ``keep`` into pages.

        Args:
            k: (B, Hkv, S, D) keys, v: values.
            keep: (B, Hkv, S) bool, True = high precision (any count per row); None = all.
            valid: (B, S) bool, False = padding (never stored); None = no padding.
            num_sinks: positions [0, num_sinks) go to the sink region (must be real tokens).
            kept_rows: optional, per batch row, how many real tokens ``keep`` holds in each
                of its (b, h) rows, known on the host (the plan's kept counts,
                ``PrefillResult.kept_tokens``; the real count for ``keep=None``). With it the
                commit reads nothing from the device (except with sinks and padding, where the
                sink check needs the read): pools and tables are sized from these counts (at
                most one spare page per row and class), and non-finite keys or values are
                stored as 0 in their own token, as in decode blocks (the prompt's attention,
                which ran on them, is where they show). Counts must go with this ``keep``
                (``PrefillResult.commit_keep``): a row past its bound loses the pages beyond
                it (never written past the pools) and sets ``overflow``, which
                ``PagedCacheLayer.kept_tokens`` (and so ``report()``) raises on.
            real_rows: per batch row, its real (non-padding) tokens; with ``kept_rows``.

        Returns:
            ``kept`` (high tokens summed over rows) and ``real`` (real compressible tokens
            summed over rows): host ints after the one host read, or 0-dim device tensors on
            the path without a read (``kept_rows`` given), which adds ``over`` (0-dim int32:
            nonzero when the counts exceeded their bounds).

        Raises:
            ValueError: the keys or values hold NaN or infinity, or a row has padding among the
                sinks (checked on the same read, before anything is stored; ``kept_rows`` skips
                the read and the non-finite check, not the sink check: with sinks and padding
                the read is made).
        """
        b, h, s, d = k.shape
        rows, p, dev = self.rows, self.fmt.page_size, k.device
        ns = min(num_sinks, s)  # a prompt shorter than the sinks is all sinks
        pos = torch.arange(s, device=dev)
        real = torch.ones(b, s, dtype=torch.bool, device=dev) if valid is None else valid
        compress = (real & (pos >= ns))[:, None, :].expand(b, h, s)  # (B, Hkv, S)
        hi = compress if keep is None else compress & keep
        lo = compress & ~hi
        cls_mask = torch.stack([hi, lo]).reshape(2, rows, s)  # (2, rows, S)
        counts = cls_mask.sum(-1)  # (2, rows)
        pages = counts // p  # (2, rows)
        hinted = kept_rows is not None and not (ns and valid is not None)
        if hinted:
            assert kept_rows is not None
            bounds = self._page_bounds(kept_rows, real_rows, b, s, ns, valid is not None,
                                       every=keep is None)  # fmt: skip
            (pmax_h, psum_h), (pmax_l, psum_l) = bounds
            # counts beyond the bounds (a wrong kept_rows) lose tokens: flagged on the device
            # (by the page writer itself on the Triton path), raised when the counts are read
            # (PagedCacheLayer.kept_tokens, report())
            if self.write_impl is not Impl.TRITON:
                over = torch.stack([
                    (pages[0] > pmax_h).any() | (pages[0].sum() > psum_h),
                    (pages[1] > pmax_l).any() | (pages[1].sum() > psum_l),
                ]).any()  # fmt: skip
                self.overflow |= over.to(torch.int32)
            sums = counts.sum(1)  # (2,) on the device: read only if someone asks
            kept, other = sums[0], sums[1]
        else:
            fin = torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)  # (B, Hkv, S)
            finite = (fin.all(1) | ~real).all().to(torch.int64)  # padding may hold anything
            real_sinks = real[:, :ns].all().to(torch.int64)  # sinks are positional: no padding
            per_class = torch.stack([pages.amax(1), pages.sum(1), counts.sum(1)]).reshape(-1)
            stats = torch.cat([per_class, finite.reshape(1), real_sinks.reshape(1)])
            pmax_h, pmax_l, psum_h, psum_l, kept, other, ok, sinks_ok = stats.tolist()  # one read
            if not sinks_ok:
                raise sink_padding_error(ns)
            if not ok:
                raise ValueError(
                    "key_states: the prompt's keys or values hold NaN or infinity; they would "
                    "poison the quantization parameters of every token that shares a page"
                )
        if self.write_impl is Impl.TRITON:  # the kernel reads rows of contiguous channels
            k = k if k.stride(-1) == 1 else k.contiguous()
            v = v if v.stride(-1) == 1 else v.contiguous()
        self.length = s  # from here on the prompt is stored (the pools' headroom reads it)
        # sinks
        if ns:
            live = torch.ones(rows, ns, dtype=torch.bool, device=dev)
            zero = torch.zeros(rows, dtype=torch.int32, device=dev)
            sk, sv = k[:, :, :ns].reshape(rows, ns, d), v[:, :, :ns].reshape(rows, ns, d)
            self._fp_write(SINK, sk, sv, zero, live)
            self.fp_count[:, SINK] = ns
            self.num_sinks = ns
        for cls, pmax, psum in ((HIGH, pmax_h, psum_h), (LOW, pmax_l, psum_l)):
            mask = cls_mask[cls]  # (rows, S)
            # positions of this class in ascending order first (stable sort of the flags)
            order = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices
            n = counts[cls]  # (rows,)
            full = pages[cls]  # (rows,)
            if self.write_impl is Impl.TRITON:  # pages and the remainder in one launch
                self._write_pages(cls, k, v, order, full, pmax, psum, counts=n)
                continue
            if pmax:
                self._write_pages(cls, k, v, order, full, pmax, psum)
            # the remainder (< P tokens per row) goes to staging
            rem = n - full * p  # (rows,)
            if p <= s:
                off = (full * p)[:, None] + torch.arange(p, device=dev)  # (rows, P)
                live = torch.arange(p, device=dev)[None, :] < rem[:, None]
                src = order.gather(1, off.clamp(max=s - 1))  # (rows, P)
            else:
                src = order
                live = torch.arange(s, device=dev)[None, :] < rem[:, None]
            gi = src[..., None].expand(*src.shape, d)
            region = STAGE_HIGH if cls == HIGH else STAGE_LOW
            zero = torch.zeros(rows, dtype=torch.int32, device=dev)
            kf, vf = k.reshape(rows, s, d), v.reshape(rows, s, d)
            self._fp_write(region, kf.gather(1, gi), vf.gather(1, gi), zero, live)
            self.fp_count[:, region] = rem.int()
        self._reserve_positions(s)
        self.class_bits[:, :, :s] = cls_mask
        self.pad = (~real).sum(-1) if valid is not None else self.pad.zero_()
        out: dict[str, Any] = {"kept": kept, "real": kept + other}
        if hinted:
            out["over"] = self.overflow[0]
        return out

    def _page_bounds(
        self,
        kept_rows: Sequence[int],
        real_rows: Sequence[int] | None,
        b: int,
        s: int,
        ns: int,
        padded: bool,
        every: bool = False,
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """Host bounds (most full pages of a row, full pages in all) of each class from the
        plan's kept counts: a (b, h) row keeps kept_b real tokens, of which up to ``ns``
        (sinks) are not paged, so its high class holds kept_b - ns .. kept_b of them."""
        if len(kept_rows) != b:
            raise ValueError(
                f"kept_rows: expected {b} counts (one per batch row), got {len(kept_rows)}"
            )
        kept_rows = [check_int(f"kept_rows[{i}]", n, 0) for i, n in enumerate(kept_rows)]
        if real_rows is None:
            if padded:
                raise ValueError(
                    "real_rows: expected the real tokens per batch row with a padding mask"
                )
            real_rows = (s,) * b
        if len(real_rows) != b:
            raise ValueError(
                f"real_rows: expected {b} counts (one per batch row), got {len(real_rows)}"
            )
        real_rows = [check_int(f"real_rows[{i}]", n, 0) for i, n in enumerate(real_rows)]
        if every:  # keep=None: every real token is kept, whatever kept_rows says
            kept_rows = real_rows
        p, h = self.fmt.page_size, self.num_heads
        hi_pages, lo_pages = [], []
        for kept, real in zip(kept_rows, real_rows, strict=True):
            comp = max(real - ns, 0)  # real tokens that are paged or staged
            hi_pages.append(min(kept, comp) // p)
            lo_pages.append((comp - max(min(kept, real) - ns, 0)) // p)
        return (max(hi_pages), h * sum(hi_pages)), (max(lo_pages), h * sum(lo_pages))

    def append(self, k: Tensor, v: Tensor) -> None:
        """Append T new tokens (B, Hkv, T, D) of every row to the tail (no host sync):
        ``append_device`` then ``advance``.

        Raises:
            ValueError: the tail would exceed its capacity (``recompress_every + tail_slack``).
        """
        t = k.shape[2]
        if graph_step():
            # a recorded decode step: the device half only; the replayer advances the host
            # count by ``step_tokens`` after every replay
            self.append_device(k, v)
            self.step_tokens += t
            return
        if k.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "append: inside a CUDA-graph capture call append_device (the captured half) "
                "and advance(T) after every replay; append would advance the host count once, "
                "at capture time"
            )
        if self.tail_length + t > self.tail_cap:
            self.append_device(k, v)  # raises: the tail is full
        else:
            # eager: every row's tail holds ``tail_length`` tokens (the host knows the slot), so
            # two slice copies and one count update instead of the device-count scatter
            s0 = self.region_base[TAIL] + self.tail_length
            d = k.shape[3]
            self.fp_k[:, s0 : s0 + t].copy_(k.reshape(self.rows, t, d))
            self.fp_v[:, s0 : s0 + t].copy_(v.reshape(self.rows, t, d))
            self.fp_count[:, TAIL] += t
        self.advance(t)

    def append_device(self, k: Tensor, v: Tensor) -> None:
        """The device half of ``append``: write the tokens at the device-side tail count and
        bump it. Nothing here reads a host counter that changes per step, so a decode step
        (``append_device`` + ``decode_attention``) can be captured in a CUDA graph and replayed;
        call ``advance(T)`` after every replay to keep the host bookkeeping in step.

        Raises:
            ValueError: the tail would exceed its capacity (``recompress_every + tail_slack``).
        """
        t, d = k.shape[2], k.shape[3]
        if self.tail_length + t > self.tail_cap:
            raise ValueError(
                f"key_states: {t} new tokens do not fit the full-precision tail "
                f"({self.tail_length} of {self.tail_cap} held; capacity = recompress_every + "
                f"tail_slack): commit full blocks first or raise tail_slack"
            )
        ar = self._arange(t)
        slot = self.region_base[TAIL] + self.fp_count[:, TAIL : TAIL + 1].long() + ar  # (rows, T)
        idx = slot[..., None].expand(self.rows, t, d)
        self.fp_k.scatter_(1, idx, k.reshape(self.rows, t, d).to(self.dtype))
        self.fp_v.scatter_(1, idx, v.reshape(self.rows, t, d).to(self.dtype))
        self.fp_count[:, TAIL] += t

    def advance(self, t: int) -> None:
        """The host half of ``append``: ``t`` more positions in the tail."""
        self.tail_length += t
        self.length += t

    def _arange(self, t: int) -> Tensor:
        cached = self._ar  # made in __init__: a traced step sees the same attributes every time
        if cached.shape[0] < t:
            cached = self._ar = torch.arange(t, device=self.device)
        return cached[:t]

    def tail_block(self) -> tuple[Tensor, Tensor]:
        """The oldest R tail tokens (B, Hkv, R, D) each (views)."""
        r = self.recompress_every
        base = self.region_base[TAIL]
        shape = (self.batch_size, self.num_heads, r, self.head_dim)
        return self.fp_k[:, base : base + r].view(shape), self.fp_v[:, base : base + r].view(shape)

    def commit_block(self, keep: Tensor) -> None:
        """Move the oldest R tail tokens into the classes: ``keep`` (B, Hkv, R) bool, True =
        high. Each class's tokens join its staging region in position order; every staging
        region that reaches a page is quantized into one (no host sync).

        Raises:
            RuntimeError: fewer than R tokens in the tail.
        """
        r, p, d = self.recompress_every, self.fmt.page_size, self.head_dim
        if self.tail_length < r:
            raise RuntimeError(f"commit_block: the tail holds {self.tail_length} < {r} tokens")
        rows, dev = self.rows, self.device
        bk, bv = self.tail_block()
        bk, bv = bk.reshape(rows, r, d), bv.reshape(rows, r, d)
        hi = keep.reshape(rows, r)
        start_pos = self.length - self.tail_length
        self._reserve_positions(start_pos + r)
        for cls, mask in ((HIGH, hi), (LOW, ~hi)):
            order = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices
            n = mask.sum(-1, dtype=torch.int32)  # (rows,)
            live = torch.arange(r, device=dev)[None, :] < n[:, None]
            gi = order[..., None].expand(rows, r, d)
            region = STAGE_HIGH if cls == HIGH else STAGE_LOW
            self._fp_write(region, bk.gather(1, gi), bv.gather(1, gi), self.fp_count[:, region],
                           live)  # fmt: skip
            self.fp_count[:, region] += n
            self.class_bits[cls, :, start_pos : start_pos + r] = mask
            # staging < P before and gains <= R: at most ceil(R / P) pages to flush
            for _ in range(-(-r // p)):
                self._flush(cls)
        # shift the rest of the tail to the front (at most tail_slack tokens)
        rest = self.tail_length - r
        base = self.region_base[TAIL]
        if rest:
            self.fp_k[:, base : base + rest] = self.fp_k[:, base + r : base + r + rest].clone()
            self.fp_v[:, base : base + rest] = self.fp_v[:, base + r : base + r + rest].clone()
        self.tail_length = rest
        self.fp_count[:, TAIL] -= r

    def _flush(self, cls: int) -> None:
        """Quantize the first P staged tokens of every row whose staging holds >= P."""
        p = self.fmt.page_size
        region = STAGE_HIGH if cls == HIGH else STAGE_LOW
        sk, sv = self.region(region)  # (rows, P + R, D)
        full = self.fp_count[:, region] >= p  # (rows,)
        self._write_pages(cls, sk[:, None], sv[:, None], None, full, 1, self.rows)
        # shift what is left of every flushed row to the front
        rest_k = sk[:, p:].clone()
        rest_v = sv[:, p:].clone()
        n = rest_k.shape[1]
        sel = full[:, None, None]
        sk[:, :n] = torch.where(sel, rest_k, sk[:, :n])
        sv[:, :n] = torch.where(sel, rest_v, sv[:, :n])
        self.fp_count[:, region] -= (full * p).int()

    # ------------------------------------------------------------------ read path
    def class_tokens(self, cls: int) -> tuple[Tensor, Tensor, Tensor]:
        """Every stored token of one class per row, dequantized to float32, in position order:
        (K, V) (rows, M, D) and live (rows, M) bool, M = pages * P + staging capacity."""
        fmt = self.fmt
        p, d, rows = fmt.page_size, self.head_dim, self.rows
        cols = max(1, self.max_pages[cls])
        pt = self.page_table[cls][:, :cols]
        pk, pv = dequantize_pages(fmt, cls, self.pools[cls], pt)  # (rows, cols, P, D)
        slot = torch.arange(p, device=self.device)
        fill = self.page_fill[cls][:, :cols]
        used = torch.arange(cols, device=self.device)[None, :] < self.num_pages[cls][:, None]
        live_p = (slot[None, None, :] < fill[..., None]) & used[..., None]  # (rows, cols, P)
        region = STAGE_HIGH if cls == HIGH else STAGE_LOW
        sk, sv = self.region(region)
        live_s = (
            torch.arange(sk.shape[1], device=self.device)[None, :] < self.fp_count[:, region, None]
        )
        # pages in table order, then staging: compact the live ones to the front of each row
        k = torch.cat([pk.reshape(rows, cols * p, d), sk.float()], 1)
        v = torch.cat([pv.reshape(rows, cols * p, d), sv.float()], 1)
        live = torch.cat([live_p.reshape(rows, cols * p), live_s], 1)
        order = torch.sort(live.to(torch.int8), dim=-1, descending=True, stable=True).indices
        gi = order[..., None].expand_as(k)
        return k.gather(1, gi), v.gather(1, gi), live.gather(1, order)

    def dense_kv(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """The reference read: every position in order, (B, Hkv, N, D) each; padding positions
        hold zeros (callers mask them)."""
        dtype = self.dtype if dtype is None else dtype
        n, d, rows, dev = self.length, self.head_dim, self.rows, self.device
        out_k = torch.zeros(rows, n + 1, d, dtype=torch.float32, device=dev)  # + scratch
        out_v = torch.zeros_like(out_k)
        ns, nt = self.num_sinks, self.tail_length
        if ns:
            sk, sv = self.region(SINK)
            out_k[:, :ns], out_v[:, :ns] = sk[:, :ns].float(), sv[:, :ns].float()
        c_end = n - nt
        for cls in (HIGH, LOW):
            k, v, live = self.class_tokens(cls)
            bits = self.class_bits[cls, :, :c_end]  # (rows, c_end)
            # the j-th token of the class sits at the j-th set position
            where = torch.sort(bits.to(torch.int8), dim=-1, descending=True, stable=True)
            posn = where.indices  # (rows, c_end)
            m = min(k.shape[1], c_end)
            j_live = live[:, :m] & (torch.arange(m, device=dev)[None, :] < bits.sum(-1)[:, None])
            dst = torch.where(j_live, posn[:, :m], n)  # (rows, m)
            out_k.scatter_(1, dst[..., None].expand(rows, m, d), k[:, :m])
            out_v.scatter_(1, dst[..., None].expand(rows, m, d), v[:, :m])
        if nt:
            tk, tv = self.region(TAIL)
            out_k[:, c_end:n], out_v[:, c_end:n] = tk[:, :nt].float(), tv[:, :nt].float()
        shape = (self.batch_size, self.num_heads, n, d)
        return out_k[:, :n].reshape(shape).to(dtype), out_v[:, :n].reshape(shape).to(dtype)

    # ------------------------------------------------------------------ edits
    def crop_to(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions (one host read when the crop reaches the
        compressed tokens). Pages are never re-quantized: a page the crop cuts keeps its
        codes and its table entry only counts the live prefix."""
        n = self.length
        if max_length >= n:
            return
        if max_length == 0:
            self._alloc_empty()
            return
        ns, nt = self.num_sinks, self.tail_length
        c_end = n - nt
        if max_length >= c_end:  # only the tail
            drop = n - max_length
            self.tail_length -= drop
            self.fp_count[:, TAIL] -= drop
            self.length = max_length
            return
        self.tail_length = 0
        self.fp_count[:, TAIL] = 0
        if max_length <= ns:
            self.num_sinks = max_length
            self.fp_count[:, SINK] = max_length
            for cls in (HIGH, LOW):
                self.num_pages[cls].zero_()
                region = STAGE_HIGH if cls == HIGH else STAGE_LOW
                self.fp_count[:, region] = 0
            self.class_bits.zero_()
            self.length = max_length
            return
        p = self.fmt.page_size
        for cls in (HIGH, LOW):
            keep_n = self.class_bits[cls, :, :max_length].sum(-1)  # (rows,) tokens kept
            cols = max(1, self.max_pages[cls])
            fill = self.page_fill[cls][:, :cols].long()
            used = torch.arange(cols, device=self.device)[None, :] < self.num_pages[cls][:, None]
            fill = torch.where(used, fill, 0)
            before = torch.cumsum(fill, 1) - fill  # tokens in earlier pages
            new_fill = (keep_n[:, None] - before).clamp(0, p)
            new_fill = torch.minimum(new_fill, fill)
            self.page_fill[cls][:, :cols] = new_fill.int()
            self.num_pages[cls] = (new_fill > 0).sum(1, dtype=torch.int32)
            region = STAGE_HIGH if cls == HIGH else STAGE_LOW
            in_pages = fill.sum(1)
            self.fp_count[:, region] = (keep_n - in_pages).clamp(min=0).int()
        self.class_bits[:, :, max_length:] = False
        self.length = max_length

    def index_rows(self, batch_idx: Tensor) -> None:
        """Select / reorder / repeat batch rows: row b' takes old row ``batch_idx[b']``. Page
        tables are reordered, pages are shared (they are never written again)."""
        b_new = batch_idx.shape[0]
        h = self.num_heads
        ridx = (batch_idx[:, None] * h + torch.arange(h, device=self.device)).reshape(-1)
        self.fp_k, self.fp_v = self.fp_k[ridx], self.fp_v[ridx]
        self.fp_count = self.fp_count[ridx]
        for cls in (HIGH, LOW):
            self.page_table[cls] = self.page_table[cls][ridx]
            self.page_fill[cls] = self.page_fill[cls][ridx]
            self.num_pages[cls] = self.num_pages[cls][ridx]
        self.class_bits = self.class_bits[:, ridx]
        self.pad = self.pad[batch_idx]
        self.batch_size = b_new

    def own_pages(self) -> None:
        """Give every row its own copy of each page it references. ``index_rows`` shares the
        pages of a repeated row (beam search: they are never written again); after this the
        pools hold what the same rows written one by one would (benchmarks that replicate one
        prefilled row measure memory and bandwidth per row). One host read (the live count)."""
        ar = torch.arange
        for cls in (HIGH, LOW):
            pt, n = self.page_table[cls], self.num_pages[cls]
            live = ar(pt.shape[1], device=self.device)[None, :] < n[:, None]  # (rows, cols)
            src = pt[live].long()  # (N,) every live reference, row by row
            total = src.numel()
            pool = self._new_pool(cls, total + 1)  # page 0: the scratch page
            for key, t in self.pools[cls].items():
                pool[key][1:] = t[src]
            table = torch.zeros_like(pt)
            table[live] = ar(1, total + 1, device=self.device, dtype=pt.dtype)
            self.pools[cls], self.page_table[cls] = pool, table
            self.pool_used[cls] = total + 1
            self.page_used[cls] = torch.full((), total + 1, dtype=torch.int64, device=self.device)

    # ------------------------------------------------------------------ accounting
    def tensors(self) -> list[Tensor]:
        """Every tensor held (pools, tables, fp buffer, class maps)."""
        out = [self.fp_k, self.fp_v, self.fp_count, self.class_bits, self.pad]
        for cls in (HIGH, LOW):
            out += list(self.pools[cls].values())
            out += [self.page_table[cls], self.page_fill[cls], self.num_pages[cls]]
        return out

    def nbytes(self) -> int:
        """Bytes held by every tensor (capacity included: what the GPU really holds; the class
        maps count as 1 bit per position, the bool tensors' packed size)."""
        total = sum(t.nbytes for t in self.tensors() if t is not self.class_bits)
        return total + self.class_bits.numel() // 8

    def live_counts(self) -> tuple[int, int, int]:
        """(live high pages, live low pages, live full-precision tokens) over all rows (one
        host read)."""
        counts = torch.stack([self.num_pages[HIGH].sum(), self.num_pages[LOW].sum(),
                              self.fp_count.sum()]).tolist()  # fmt: skip
        return counts[0], counts[1], counts[2]

    def live_nbytes(self) -> int:
        """Bytes of the live pages and fp tokens (what a perfectly sized store would hold)."""
        d = self.head_dim
        esz = torch.empty((), dtype=self.dtype).element_size()
        high, low, fp = self.live_counts()
        return (
            high * self.fmt.page_bytes(HIGH, d)
            + low * self.fmt.page_bytes(LOW, d)
            + fp * 2 * d * esz
            + 2 * self.rows * self.length // 8
        )

    def tokens_at_bits(self) -> dict[int, float]:
        """Bit width -> mean positions per row stored at it (16 = full precision: sinks, tail
        and the tokens staged until their class fills a page; padding is not stored, so it is
        not counted). One host read."""
        pages_live = [self.page_fill[c][:, : max(1, self.max_pages[c])] for c in (HIGH, LOW)]
        used = [
            torch.arange(t.shape[1], device=self.device)[None, :] < self.num_pages[c][:, None]
            for c, t in zip((HIGH, LOW), pages_live, strict=True)
        ]
        # staged tokens wait at full precision until their class fills a page
        vals = torch.stack(
            [(pages_live[HIGH] * used[HIGH]).sum(), (pages_live[LOW] * used[LOW]).sum(),
             self.fp_count.sum()]
        ).tolist()  # fmt: skip
        rows = self.rows
        out: dict[int, float] = {}
        fmt = self.fmt
        for bits, v in ((16, vals[2]), (fmt.high_bits, vals[0]), (fmt.low_bits, vals[1])):
            if v:
                out[bits] = out.get(bits, 0.0) + v / rows
        return dict(sorted(out.items(), reverse=True))
