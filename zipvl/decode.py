"""Decode attention over the paged mixed-precision KV cache (``zipvl.cache.paged``).

ZipVL decodes densely over every cached token, the unimportant ones at low precision. Reading a
4/2-bit cache by first dequantizing it to bf16 moves more bytes than the bf16 cache itself, so
the fast path never materialises K or V. Per page (ZipCache's layout):

* keys are quantized per channel over the page, k_tc = code_tc * s_c + z_c, so
  q . k_t = sum_c (q_c s_c) code_tc + sum_c q_c z_c: the kernel scales q once per page and dots
  it with the raw codes;
* values are quantized per token after a per-channel divisor, v_tc = (code_tc a_t + b_t) cs_c,
  so sum_t p_t v_tc = cs_c (sum_t (p_t a_t) code_tc + sum_t p_t b_t): the kernel accumulates in
  code space and applies the page's divisor once.

Token order does not matter for one decoding query and padding is never stored, so every
stored token of a row is attended to. ``impl="triton"`` is one launch over all pages of both
precisions and the full-precision regions (split-K), whose last program per KV head merges the
partial states (``zipvl.paged_decode_triton``); ``impl="reference"`` dequantizes every page and
attends in float32: the oracle. Both return the log-sum-exp as well, from which the cache scores
a decode block without reading any key again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .cache.paged import HIGH, LOW, SINK, TAIL, PagedKVStore
from .checks import check_scale, check_tensor
from .impl import DECODE_IMPLS, parse_impl

__all__ = [
    "DECODE_IMPLS",
    "decode_attention",
    "decode_read_bytes",
    "fused_decode_problem",
]

_LOG2E = 1.4426950408889634


def fused_decode_problem(q: Tensor, store: PagedKVStore) -> str | None:
    """Why ``impl="triton"`` cannot run this step, or None when it can."""
    if q.shape[-2] != 1:
        return f"one query per step (got Sq = {q.shape[-2]})"
    d = store.head_dim
    if d & (d - 1) or d < 64:
        return (
            f"a power-of-two head_dim >= 64 (each quarter of the channels is a matrix-multiply "
            f"operand of >= 16), got {d}"
        )
    try:
        from zipvl import paged_decode_triton
    except ImportError as exc:  # pragma: no cover - triton ships with torch on Linux
        return f"the triton package ({exc})"
    if paged_decode_triton.INTERPRETED:
        if q.device.type != "cpu":
            return (
                f"CPU tensors under TRITON_INTERPRET=1 (the interpreted kernel reads the raw host "
                f"addresses of its address table), got device {q.device}"
            )
    elif not q.is_cuda:
        return (
            f"a CUDA tensor (or TRITON_INTERPRET=1 set before the kernels are imported), got "
            f"device {q.device}"
        )
    return None


_POOL_KEYS: tuple[str, ...] = ("kcode", "vcode", "kscale", "kzero", "vscale", "vzero", "vcs")


@dataclass(frozen=True)
class _Format:
    page_size: int
    high_bits: int
    low_bits: int
    code_order: str


@dataclass(frozen=True)
class _StoreView:
    """What the fused kernel reads of a ``PagedKVStore``, rebuilt from plain operands (a custom
    op takes tensors and numbers, not the store object)."""

    pools: tuple[dict[str, Tensor], dict[str, Tensor]]
    page_table: tuple[Tensor, Tensor]
    page_fill: tuple[Tensor, Tensor]
    num_pages: tuple[Tensor, Tensor]
    fp_k: Tensor
    fp_v: Tensor
    fp_count: Tensor
    region_base: tuple[int, ...]
    num_heads: int
    rows: int
    fmt: _Format


def _operands(store: PagedKVStore) -> tuple[list[Tensor], list[int]]:
    """The tensors and numbers the fused kernel reads, in ``_StoreView`` order."""
    tensors = [store.pools[c][key] for c in (HIGH, LOW) for key in _POOL_KEYS]
    for c in (HIGH, LOW):
        tensors += [store.page_table[c], store.page_fill[c], store.num_pages[c]]
    tensors += [store.fp_k, store.fp_v, store.fp_count]
    f = store.fmt
    ints = [store.num_heads, store.rows, f.page_size, f.high_bits, f.low_bits,
            int(f.code_order == "fragment"), *store.region_base]  # fmt: skip
    return tensors, ints


def _view(tensors: list[Tensor], ints: list[int]) -> _StoreView:
    n = len(_POOL_KEYS)
    pools = (dict(zip(_POOL_KEYS, tensors[:n], strict=True)),
             dict(zip(_POOL_KEYS, tensors[n : 2 * n], strict=True)))  # fmt: skip
    t = tensors[2 * n :]
    return _StoreView(
        pools=pools, page_table=(t[0], t[3]), page_fill=(t[1], t[4]), num_pages=(t[2], t[5]),
        fp_k=t[6], fp_v=t[7], fp_count=t[8], region_base=tuple(ints[6:]), num_heads=ints[0],
        rows=ints[1], fmt=_Format(ints[2], ints[3], ints[4], "fragment" if ints[5] else "slice"),
    )  # fmt: skip


_SETTINGS = ("warps", "stages", "precise", "block_t", "fp_block", "maxnreg", "fp_splits", "offset",
             "min_pages")  # fmt: skip


def _settings(store: PagedKVStore, ws: dict[str, Any] | None) -> list[int]:
    """The launch settings of ``ws``, the store's workspace for this batch (-1: the kernel's
    default), so a compiled step launches exactly as an eager one: ``_SETTINGS``, then the
    indices of ``variant`` and ``convert``."""
    if ws is None:  # no eager call yet: the launch an eager call would choose
        ws = launch_choice(store, store.device)[1]
    out = [int(ws[key]) if ws.get(key) is not None else -1 for key in _SETTINGS]
    variant = convert = -1
    if ws.get("variant") is not None or ws.get("convert") is not None:  # (triton imported
        # only where a key names it)
        from zipvl.paged_decode_triton import CONVERTS, VARIANTS

        for key, allowed in (("variant", VARIANTS), ("convert", CONVERTS)):
            if ws.get(key) is not None and ws[key] not in allowed:
                raise ValueError(f"workspace[{key!r}]: expected one of {allowed}, got {ws[key]!r}")
        variant = VARIANTS.index(ws["variant"]) if ws.get("variant") is not None else -1
        convert = CONVERTS.index(ws["convert"]) if ws.get("convert") is not None else -1
    return [*out, variant, convert]


@torch.library.custom_op("zipvl::paged_decode", mutates_args=())
def _paged_decode_op(
    q: Tensor,
    tensors: list[Tensor],
    ints: list[int],
    scale: float,
    splits: int,
    settings: list[int],
) -> tuple[Tensor, Tensor]:
    """The fused decode as an opaque operator, so ``torch.compile`` traces around it (a
    compiled decode step: ``append_device`` + this)."""
    from zipvl.paged_decode_triton import paged_decode_triton

    b, hq, d = q.shape
    f32 = {"dtype": torch.float32, "device": q.device}
    from zipvl.paged_decode_triton import CONVERTS, VARIANTS

    states = splits + max(1, settings[_SETTINGS.index("fp_splits")])
    ws: dict[str, Any] = {
        "splits": splits,
        "m": torch.empty(b, hq, states, **f32),
        "l": torch.empty(b, hq, states, **f32),
        "o": torch.empty(b, hq, states, d, **f32),
        # fresh, zeroed tickets: the operator keeps no state between calls (its address
        # tables come from the kernel module's cache)
        "ticket": torch.zeros(ints[1], dtype=torch.int32, device=q.device),
        "keep_table": False,
    }
    ws.update({key: val for key, val in zip(_SETTINGS, settings, strict=False) if val >= 0})
    if settings[-2] >= 0:
        ws["variant"] = VARIANTS[settings[-2]]
    if settings[-1] >= 0:
        ws["convert"] = CONVERTS[settings[-1]]
    return paged_decode_triton(q, _view(tensors, ints), scale, ws)  # fresh outputs


@_paged_decode_op.register_fake
def _(q: Tensor, tensors: list[Tensor], ints: list[int], scale: float, splits: int,
      settings: list[int]):  # fmt: skip
    b, hq, d = q.shape
    return q.new_empty(b, hq, d), q.new_empty(b, hq, dtype=torch.float32)


def _splits(store: PagedKVStore, device: torch.device) -> int:
    """Page splits per row: about 4 programs per SM over the whole grid, at most 64 (H200,
    B = 1, 128k tokens: 64 splits 0.108 ms, 128 splits 0.145 ms, 256 splits 0.164 ms)."""
    cuda = device.type == "cuda"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 1
    return max(1, min(64, -(-4 * sms // store.rows)))


FRAGMENT_PROGRAMS_PER_SM = 3
"""Programs per SM of the ``"fragment"`` variant's grid at most (``launch_choice``)."""
FRAGMENT_FP_SPLITS = 4
"""Programs per row of the ``"fragment"`` variant that share the full-precision regions."""
FRAGMENT_MIN_PAGES = 32
"""Pages per page program of the ``"fragment"`` variant at least: the kernel applies it to
each row's live page count at every step (workspace key ``min_pages``)."""


def _fragment_splits(store: PagedKVStore, device: torch.device) -> int:
    """Page programs per row of the ``"fragment"`` variant: at most ``FRAGMENT_PROGRAMS_PER_SM``
    programs per SM over the grid, at most 128 (the merge reads every state written). The kernel
    itself gives each program at least ``FRAGMENT_MIN_PAGES`` of the row's pages at every step
    (the row's live page count, on the device), so a short row runs fewer programs and the rest
    return at once: the grid depends on the batch alone, never on the prompt or the tokens
    generated. H200, LongVA heads, r = 0.4, CUDA-graph replays (``bench/gpu_decode.py``, 335c1f8
    and 0d5b0ea): 3 programs per SM were fastest at batch 8 x 128k (13 splits, ~79 pages a
    program: 0.227 ms; 6 splits 0.259, 26 splits 0.267); where that left a program ~10-20 pages,
    fewer were faster (batch 1 x 128k: 99 splits 0.084 ms, 49 splits 0.066, 32 splits 0.061;
    batch 8 x 32k: 13 splits 0.108, 6 splits 0.084; batch 1 x 32k: 64 splits 0.051, 8 splits
    0.046), hence the 32-page floor (not measured between those points)."""
    cuda = device.type == "cuda"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 1
    return max(1, min(128, -(-FRAGMENT_PROGRAMS_PER_SM * sms // store.rows)))


PAGES_VARIANT_MIN_PAGES = 24
"""Pages per program (at the default splits) from which the fused kernel runs its ``"pages"``
variant with 3 pipeline stages (``launch_choice``)."""

LONG_TILE_MIN_PAGES = 12
"""Pages per program (at the default splits) from which the ``"tile"`` variant reads 128
tokens per step instead of 64 (``launch_choice``)."""


def launch_choice(store: PagedKVStore, device: torch.device) -> tuple[int, dict[str, Any]]:
    """Page splits per row and the fused kernel's launch settings ({}: its defaults, the
    ``"tile"`` variant with 64-token steps and 2 stages).

    Measured on an H200, one layer at 128k tokens, CUDA-graph replays, twice at each shape
    (``bench/gpu_decode.py --sweep``, commits c066593 and eb67c24; ``bench/notes/
    decode_kernel.md``):

    * where a program walks >= ``PAGES_VARIANT_MIN_PAGES`` pages at the default splits (batch
      4: ~31, batch 8: ~60), ``"pages"`` (each warp its own page) with 3 pipeline stages at the
      default splits: batch 8 0.50 ms against 0.60 for "pages" at twice the splits with 2
      stages (the rule before), 0.52 with 3; batch 4 0.29 against 0.32 for "tile";
    * where it walks >= ``LONG_TILE_MIN_PAGES`` and the grid holds at most 2 programs per SM
      (batch 1: ~16 pages, 256 programs), ``"tile"`` with 128-token steps (pages of a multiple
      of 128 tokens: a step never straddles a page): 0.089 against 0.098 ms. At batch 4 x
      32k (~8 pages, 528 programs) 128-token steps were 13 % slower, at batch 4 x 128k (528
      programs) even;
    * elsewhere (32k prompts: ~4-15 pages a program) the defaults, which the earlier sweeps
      found fastest there.

    The thresholds between the measured shapes are not measured. Decided once per workspace,
    from the store's host bound of pages per row, so a recorded step keeps its launch; CUDA
    only (the interpreter's CPU runs keep the defaults).
    """
    pages = store.max_pages[0] + store.max_pages[1]  # host bound, both classes
    if store.fmt.code_order == "fragment":
        return _fragment_splits(store, device), {
            "fp_splits": FRAGMENT_FP_SPLITS,
            "min_pages": FRAGMENT_MIN_PAGES,
        }
    ns = _splits(store, device)
    if device.type != "cuda":
        return ns, {}
    if pages >= PAGES_VARIANT_MIN_PAGES * ns:
        return ns, {"variant": "pages", "stages": 3}
    few = store.rows * ns <= 2 * torch.cuda.get_device_properties(device).multi_processor_count
    if pages >= LONG_TILE_MIN_PAGES * ns and few and store.fmt.page_size % 128 == 0:
        return ns, {"block_t": 128}
    return ns, {}


def workspace(store: PagedKVStore, hq: int) -> dict[str, Any]:
    """The partial-state buffers and per-row tickets of the fused kernel, cached on the store
    per (B, Hq)."""
    key = (store.batch_size, hq)
    ws = getattr(store, "_decode_ws", None)
    if ws is None or ws["key"] != key:
        if store.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "paged decode: the kernel's workspace (zeroed tickets) is made by an eager "
                f"call; run one decode step with batch {store.batch_size} and {hq} query heads "
                "before capturing it in a CUDA graph"
            )
        ns, launch = launch_choice(store, store.device)
        b, d = store.batch_size, store.head_dim
        f32 = {"dtype": torch.float32, "device": store.device}
        states = ns + launch.get("fp_splits", 1)  # partial states per query head
        ws = {
            "key": key,
            "splits": ns,
            "m": torch.empty(b, hq, states, **f32),
            "l": torch.empty(b, hq, states, **f32),
            "o": torch.empty(b, hq, states, d, **f32),
            # per row: how many of its programs have published their partial state; the
            # last one merges and zeroes it again, so it is zero between launches
            "ticket": torch.zeros(store.rows, dtype=torch.int32, device=store.device),
        }
        ws.update(launch)
        store._decode_ws = ws  # type: ignore[attr-defined]
    return ws


def decode_attention(
    q: Tensor,
    store: PagedKVStore,
    *,
    scale: float | None = None,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Attention of one decoding query per row over everything a ``PagedKVStore`` holds.

    Args:
        q: (B, Hq, 1, D) query (RoPE applied), Hq a multiple of the store's Hkv.
        store: the layer's paged storage (the new token already appended).
        scale: softmax scale; None = 1 / sqrt(D).
        impl: ``"auto"`` (the fused kernel where it can run: CUDA, or the Triton interpreter;
            the reference otherwise), ``"triton"`` (the fused kernel; raises where it cannot
            run) or ``"reference"`` (dequantize, float32).

    Returns:
        (out (B, Hq, 1, D) in q's dtype, lse2 (B, Hq) float32: log2 of the softmax denominator
        of the logits scaled by ``scale * log2(e)``).

    Raises:
        ValueError: bad shapes, an unknown impl, or ``impl="triton"`` where it cannot run.
    """
    check_tensor("q", q, ndim=4, floating=True)
    if not isinstance(store, PagedKVStore):
        raise TypeError(f"store: expected a PagedKVStore, got {type(store).__name__}")
    b, hq, sq, d = q.shape
    if sq != 1:
        raise ValueError(f"q: expected one decoding query (B, Hq, 1, D), got {tuple(q.shape)}")
    if b != store.batch_size or d != store.head_dim or hq % store.num_heads:
        raise ValueError(
            f"q: expected (B={store.batch_size}, Hq a multiple of {store.num_heads}, 1, "
            f"D={store.head_dim}) like the store, got {tuple(q.shape)}"
        )
    impl = parse_impl("impl", impl, DECODE_IMPLS)
    sm = check_scale("scale", scale)
    sm = sm if sm is not None else 1.0 / math.sqrt(d)
    if impl != "reference":
        problem = fused_decode_problem(q, store)
        if problem is None:
            q1 = q[:, :, 0].contiguous()
            if torch.compiler.is_compiling():  # traced: the kernel as an opaque operator
                tensors, ints = _operands(store)
                ws = getattr(store, "_decode_ws", None)
                if ws is not None and ws["key"] != (store.batch_size, hq):
                    ws = None  # made for another batch: eager would make a new one
                ns = ws["splits"] if ws is not None else launch_choice(store, store.device)[0]
                out, lse = _paged_decode_op(q1, tensors, ints, sm, ns, _settings(store, ws))
                return out.unsqueeze(2), lse
            from zipvl.paged_decode_triton import paged_decode_triton

            out, lse = paged_decode_triton(q1, store, sm, workspace(store, hq))
            return out.unsqueeze(2), lse
        if impl == "triton":
            raise ValueError(f"impl: 'triton' needs {problem}; use 'auto' or 'reference'")
    return reference_decode(q, store, sm)


def stored_tokens(store: PagedKVStore) -> tuple[Tensor, Tensor, Tensor]:
    """Every token a row holds, float32, in storage order: K, V (rows, M, D), live (rows, M)."""
    ks, vs, lives = [], [], []
    for cls in (HIGH, LOW):
        k, v, live = store.class_tokens(cls)
        ks.append(k)
        vs.append(v)
        lives.append(live)
    ar = torch.arange(store.fp_cap, device=store.device)
    for region in (SINK, TAIL):
        k, v = store.region(region)
        ks.append(k.float())
        vs.append(v.float())
        lives.append(ar[None, : k.shape[1]] < store.fp_count[:, region, None])
    return torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(lives, 1)


def reference_decode(q: Tensor, store: PagedKVStore, scale: float) -> tuple[Tensor, Tensor]:
    """The oracle of ``decode_attention``: dequantize every stored token, attend in float32."""
    b, hq, _, d = q.shape
    h = store.num_heads
    g = hq // h
    k, v, live = stored_tokens(store)  # (rows, M, D), (rows, M)
    q2 = q[:, :, 0].float().reshape(b * h, g, d) * (scale * _LOG2E)  # (rows, G, D)
    s = torch.einsum("rgd,rmd->rgm", q2, k)  # (rows, G, M)
    s = s.masked_fill(~live[:, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp2(s - m)
    den = p.sum(-1)  # (rows, G)
    out = torch.einsum("rgm,rmd->rgd", p, v) / den[..., None]
    lse = (m[..., 0] + torch.log2(den)).reshape(b, hq)
    return out.reshape(b, hq, 1, d).to(q.dtype), lse


def decode_read_bytes(store: PagedKVStore) -> int:
    """Bytes the fused decode must read: live pages whole (codes and parameters), live fp
    tokens, page tables and counts (one host read)."""
    d = store.head_dim
    esz = torch.empty((), dtype=store.dtype).element_size()
    high, low, fp = store.live_counts()
    return (
        high * (store.fmt.page_bytes(HIGH, d) + 8)
        + low * (store.fmt.page_bytes(LOW, d) + 8)
        + fp * 2 * d * esz
    )
