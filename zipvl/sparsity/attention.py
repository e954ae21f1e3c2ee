"""Token-level sparse prefill attention: ``sparse_attention(q, k, v, selection, impl=...)``.

ZipVL (He et al., arXiv 2410.08584 v1, Alg. 1): O[T] = FlashAttention(Q[T], K[T], V[T]) with the
causal flag, and zero output for the unimportant queries U (the residual carries them). Because
the kept tokens are gathered in ascending position order and RoPE was applied with the original
positions, causality over the compacted sequence equals causality over the original positions
restricted to T. The speed comes from compaction: a token keep-mask over the original layout
leaves almost every 128 x 128 tile partial, while the gathered sequence is dense and P/S shorter.

Implementations (``impl``), all with the same semantics:

* ``"reference"``: dense S x S masked softmax in fp32 (``zipvl.sparsity.reference``), the oracle.
* ``"sdpa"``: gather exactly P tokens and run ``scaled_dot_product_attention(is_causal=True,
  enable_gqa=True)`` (PyTorch's backend dispatch), scatter back. The fastest path measured
  (H200, 128k tokens: 5.49x over dense SDPA against Flex's 3.83x), and it needs no compilation.
* ``"auto"`` (default): the ``"sdpa"`` path with every SDPA call on the backend measured fastest
  for its shape bucket (``zipvl.sparsity.sdpa_backend``: cuDNN, flash, efficient or math; on
  the CPU, in ``torch.compile`` and in CUDA-graph capture, PyTorch's own dispatch).
* ``"flex"``: gather the kept q/k/v of each KV head (the G query heads of a KV head use
  its indices), pad to a multiple of ``block_size``, run FlexAttention with the compacted causal
  BlockMask and ``enable_gqa``, scatter back. FlexAttention is compiled lazily on first use (see
  ``compiled_flex_attention``); ``compile=False`` runs it eagerly (slow, materialises scores).

Copies (``copy_impl``): the ``"sdpa"``/``"auto"`` path with ``unkept="zero"`` gathers the kept
rows of q, k and v and scatters the P output rows back to the full length, either in PyTorch
(``"torch"``: four ``gather`` kernels, a zero fill and a ``scatter_``, the output written twice)
or in Triton (``"triton"``, ``zipvl.sparsity.gather_triton``: one launch for the three gathers,
one for the scatter, which writes every output element once; equal element for element).
``"auto"`` (default) picks ``"triton"`` exactly when ``triton_copy_problem`` finds nothing
against it and the tensors are on CUDA: eager calls (not inside ``torch.compile``, where the
PyTorch copies are traced with the rest; the kernels need no host read, so a CUDA-graph capture
after a first eager call, which compiles them, is fine), ``impl`` ``"sdpa"`` or ``"auto"``,
``unkept="zero"``; ``"torch"`` otherwise (the CPU included, also under ``TRITON_INTERPRET=1``,
whose interpreted kernels run only when asked for). ``copy_impl_for`` says what a call runs; an
explicit ``"triton"`` that cannot run raises ``ValueError``.

``unkept="attend"`` lets every query attend to the kept keys at positions <= its own (higher
fidelity, more work: S x P instead of P x P). In the compacted key order those keys are a prefix
of length ``cumsum(keep)[q]``, which the flex path encodes in its BlockMask and the sdpa path in
a boolean mask built in chunks of query rows.

Compilation and recompiles: padded lengths differ per layer and per input. The compiled function
is ``torch.compile(flex_attention, dynamic=True)`` and every call marks the length dimensions of
q/k/v and the BlockMask tensors as dynamic (``maybe_mark_dynamic``). The first call compiles one
dynamic kernel; FlexAttention's inner wrapper specialises the sequence length once more on the
second distinct length, after which every length reuses the same kernels (two compiles per
dtype / head layout / mask kind in all, never near the recompile limit of 8).

Inside an enclosing ``torch.compile`` region (a compiled decoder layer) FlexAttention is traced
with the rest of the graph instead. On the CPU, Inductor's C++ flex template then rejects mask
lookup tensors that it can constant-fold or that stay unrealised views; the ``unkept="zero"``
path is written to avoid both (checked by a ``fullgraph=True`` test), while ``unkept="attend"``
inside a compiled region on the CPU is known to fail in that template: compile it on CUDA, or call
``sparse_attention`` eagerly (its own FlexAttention call is still compiled).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from zipvl.checks import check_int, check_qkv, check_scale
from zipvl.impl import COPY_IMPLS, SPARSE_ATTENTION_IMPLS, Impl, parse_impl
from zipvl.sparsity.block_mask import compacted_causal_block_mask, compacted_prefix_block_mask
from zipvl.sparsity.pipeline import padded_spans
from zipvl.sparsity.reference import reference_sparse_attention
from zipvl.sparsity.sdpa_backend import sdpa
from zipvl.types import Selection

__all__ = [
    "compiled_flex_attention",
    "copy_impl_for",
    "sparse_attention",
    "triton_copy_problem",
]

# elements of one chunk of the boolean mask of sdpa's "attend" path (B * Hq * rows * P)
_SDPA_ATTEND_CHUNK = 1 << 26
# BlockMask index tensors whose trailing dims grow with the sequence length (torch >= 2.11)
_BLOCK_MASK_TENSORS = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)


@functools.cache
def compiled_flex_attention() -> Callable[..., Tensor]:
    """The process-wide compiled FlexAttention, created on first use (never at import).

    ``torch.compile(flex_attention, dynamic=True, fullgraph=True)``; on CPU Inductor lowers it to
    its C++ flex template, on CUDA to the Triton kernels.
    """
    return torch.compile(flex_attention, dynamic=True, fullgraph=True)


def _check_selection(selection: object, q: Tensor, k: Tensor) -> Selection:
    if not isinstance(selection, Selection):
        raise TypeError(f"selection: expected a Selection, got {type(selection).__name__}")
    keep = selection.keep  # 3-D bool and num_kept in [0, S]: checked by Selection itself
    if tuple(keep.shape) != tuple(k.shape[:3]):
        raise ValueError(
            f"selection.keep: expected shape (B, Hkv, S) = {tuple(k.shape[:3])} like k, "
            f"got {tuple(keep.shape)}"
        )
    if keep.device != q.device:
        raise ValueError(f"selection.keep: expected device {q.device} like q, got {keep.device}")
    # every row must keep num_kept tokens, or the gathered tensors would silently mix kept and
    # unkept tokens: one host read, unless the selector already verified it (TopKSelector does)
    return selection.check_counts()


def _gather_kv(k: Tensor, v: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """k (B, Hkv, S, D), v (B, Hkv, S, Dv), idx (B, Hkv, L) -> (B, Hkv, L, D), (B, Hkv, L, Dv)."""
    kg = k.gather(2, idx[..., None].expand(*idx.shape, k.shape[-1]))  # (B, Hkv, L, D)
    vg = v.gather(2, idx[..., None].expand(*idx.shape, v.shape[-1]))  # (B, Hkv, L, Dv)
    return kg, vg


def _gather_q(q: Tensor, idx: Tensor) -> Tensor:
    """q (B, Hq, S, D), idx (B, Hkv, L) -> (B, Hq, L, D); query heads use their KV head's idx."""
    g = q.shape[1] // idx.shape[1]
    # a 4-D gather (not a 5-D view of q): Inductor's CPU flex template needs 4-D inputs
    idx_q = idx.repeat_interleave(g, dim=1)  # (B, Hq, L)
    return q.gather(2, idx_q[..., None].expand(*idx_q.shape, q.shape[-1]))  # (B, Hq, L, D)


def _scatter_rows(out_kept: Tensor, idx: Tensor, s: int) -> Tensor:
    """out_kept (B, Hq, P, Dv) at positions idx (B, Hkv, P) -> (B, Hq, S, Dv), zeros elsewhere."""
    b, hq, n, dv = out_kept.shape
    idx_q = idx.repeat_interleave(hq // idx.shape[1], dim=1)  # (B, Hq, P)
    out = out_kept.new_zeros(b, hq, s, dv)  # (B, Hq, S, Dv)
    return out.scatter_(2, idx_q[..., None].expand(b, hq, n, dv), out_kept)


def triton_copy_problem(
    q: Tensor, *, impl: Impl | str = "auto", unkept: str = "zero"
) -> str | None:
    """Why ``copy_impl="triton"`` cannot run a ``sparse_attention`` call, or None when it can.

    Args:
        q: the call's queries (their device decides).
        impl: the call's ``impl`` (``"sdpa"`` and ``"auto"`` are the paths with the copies).
        unkept: the call's ``unkept`` (``"zero"`` is the path with the copies).

    Returns:
        None, or what is missing, worded to follow "needs" (e.g. ``"a CUDA tensor ..."``).
    """
    impl_ = parse_impl("impl", impl, SPARSE_ATTENTION_IMPLS)
    if impl_ not in (Impl.SDPA, Impl.AUTO):
        return f"impl 'sdpa' or 'auto' (the path whose copies it replaces), got {impl_.value!r}"
    if unkept != "zero":
        return f"unkept='zero' (the path whose copies it replaces), got {unkept!r}"
    if torch.compiler.is_compiling():
        return "an eager call (inside torch.compile the PyTorch copies are traced instead)"
    try:
        from zipvl.sparsity import gather_triton
    except ImportError as exc:  # pragma: no cover - triton ships with torch on Linux
        return f"the triton package ({exc})"
    if not gather_triton.triton_copy_available(q.device):
        return (
            f"a CUDA tensor (or TRITON_INTERPRET=1 set before the kernels are imported), got "
            f"device {q.device}"
        )
    return None


def copy_impl_for(
    q: Tensor,
    *,
    impl: Impl | str = "auto",
    unkept: str = "zero",
    copy_impl: Impl | str = "auto",
) -> Impl:
    """The copies a ``sparse_attention`` call runs: ``Impl.TRITON`` or ``Impl.TORCH``.

    ``"torch"`` and ``"triton"`` are taken as asked; ``"auto"`` is ``Impl.TRITON`` exactly when
    q is a CUDA tensor and ``triton_copy_problem`` returns None, ``Impl.TORCH`` otherwise.

    Raises:
        ValueError: an unknown ``copy_impl`` or ``impl``, or ``copy_impl="triton"`` where it
            cannot run (the message says why).
    """
    copy = parse_impl("copy_impl", copy_impl, COPY_IMPLS)
    if copy is Impl.TORCH or (copy is Impl.AUTO and not q.is_cuda):
        return Impl.TORCH
    problem = triton_copy_problem(q, impl=impl, unkept=unkept)
    if problem is None:
        return Impl.TRITON
    if copy is Impl.TRITON:
        raise ValueError(f"copy_impl: 'triton' cannot run: it needs {problem}")
    return Impl.TORCH


def _mark_dynamic(block_mask: BlockMask, *tensors: Tensor) -> None:
    """Mark sequence-length dims dynamic so that one compiled kernel serves every padded length."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 2)
    for name in _BLOCK_MASK_TENSORS:
        t = getattr(block_mask, name, None)
        if isinstance(t, Tensor):
            for dim in range(2, t.ndim):
                torch._dynamo.maybe_mark_dynamic(t, dim)


def _flex(
    q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float | None, compile: bool
) -> Tensor:
    if torch.compiler.is_compiling():
        # already inside someone's torch.compile region: it compiles flex_attention with the rest
        fn = flex_attention
    elif compile:
        _mark_dynamic(block_mask, q, k, v)
        fn = compiled_flex_attention()
    else:
        fn = flex_attention
    out = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
    assert isinstance(out, Tensor)  # no return_lse / return_aux requested
    return out


def _flex_sparse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    *,
    unkept: str,
    scale: float | None,
    block_size: int,
    compile: bool,
) -> Tensor:
    hq, s = q.shape[1], q.shape[2]
    g = hq // k.shape[1]
    p = selection.num_kept
    padded = -(-p // block_size) * block_size
    idx = selection.indices()  # (B, Hkv, P) ascending positions
    # Padding slots gather position 0; the BlockMask hides them (kv >= P never visible).
    idx_pad = F.pad(idx, (0, padded - p))  # (B, Hkv, Ppad)
    kg, vg = _gather_kv(k, v, idx_pad)  # (B, Hkv, Ppad, D), (B, Hkv, Ppad, Dv)
    if unkept == "zero":
        qg = _gather_q(q, idx_pad)  # (B, Hq, Ppad, D)
        bm = compacted_causal_block_mask(p, padded, block_size, device=q.device)
        out = _flex(qg, kg, vg, bm, scale, compile)  # (B, Hq, Ppad, Dv)
        return _scatter_rows(out[:, :, :p], idx, s)
    visible = selection.keep.cumsum(dim=-1, dtype=torch.int32)  # (B, Hkv, S)
    bm = compacted_prefix_block_mask(visible, padded, block_size, group_size=g)
    return _flex(q, kg, vg, bm, scale, compile)  # (B, Hq, S, Dv)


def _sdpa_sparse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    *,
    unkept: str,
    scale: float | None,
    tuned: bool = False,
    copy: Impl = Impl.TORCH,
) -> Tensor:
    """The gather + SDPA path; ``copy`` (resolved by ``copy_impl_for``) picks the copies of the
    ``"zero"`` path: ``Impl.TRITON`` (``zipvl.sparsity.gather_triton``) or ``Impl.TORCH``."""
    backend = "auto" if tuned else None  # the measured SDPA backend, or PyTorch's dispatch
    b, hq, s, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = hq // hkv
    p = selection.num_kept
    idx = selection.indices()  # (B, Hkv, P)
    if unkept == "zero" and copy is Impl.TRITON:
        # lazy import: triton is an optional, Linux-only dependency
        from zipvl.sparsity.gather_triton import gather_qkv_triton, scatter_rows_triton

        qg, kg, vg = gather_qkv_triton(q, k, v, idx)  # (B, Hq|Hkv, P, D|Dv): one launch
        out = sdpa(
            qg, kg, vg, backend=backend, is_causal=True, scale=scale, enable_gqa=True
        )  # (B, Hq, P, Dv)
        # (B, Hq, S, Dv): one launch, which also applies the plan's unread NaN flag; in q's
        # memory layout (a (B, S, Hq, D) view in transformers models: their transpose back to
        # (B, S, Hq, Dv) then copies nothing, where it copied the whole output before)
        return scatter_rows_triton(
            out, idx, selection.keep, s, nan_flag=selection.nan_flag,
            seq_major=hq > 1 and s > 1 and q.stride(1) < q.stride(2),
        )  # fmt: skip
    kg, vg = _gather_kv(k, v, idx)  # (B, Hkv, P, D), (B, Hkv, P, Dv)
    if unkept == "zero":
        qg = _gather_q(q, idx)  # (B, Hq, P, D)
        out = sdpa(
            qg, kg, vg, backend=backend, is_causal=True, scale=scale, enable_gqa=True
        )  # (B, Hq, P, Dv)
        return _scatter_rows(out, idx, s)
    # attend: query row t sees the first visible[t] gathered keys (kept positions <= t)
    visible = selection.keep.cumsum(dim=-1)  # (B, Hkv, S)
    out = q.new_empty(b, hkv, g, s, dv)  # (B, Hkv, G, S, Dv)
    q5 = q.view(b, hkv, g, s, d)  # (B, Hkv, G, S, D)
    rows = max(1, _SDPA_ATTEND_CHUNK // max(1, b * hq * p))
    slot = torch.arange(p, device=q.device)  # (P,)
    for r0 in range(0, s, rows):
        r1 = min(r0 + rows, s)
        vis = visible[:, :, r0:r1]  # (B, Hkv, c)
        mask = slot < vis[..., None]  # (B, Hkv, c, P)
        mask = mask[:, :, None].expand(b, hkv, g, r1 - r0, p).reshape(b, hkv, -1, p)
        qc = q5[:, :, :, r0:r1].reshape(b, hkv, -1, d)  # (B, Hkv, G*c, D)
        oc = sdpa(qc, kg, vg, backend=backend, attn_mask=mask, scale=scale)
        oc = oc.view(b, hkv, g, r1 - r0, dv)  # (B, Hkv, G, c, Dv)
        # rows that see no kept key are fully masked (NaN in SDPA); their output is zero
        out[:, :, :, r0:r1] = torch.where((vis > 0)[:, :, None, :, None], oc, 0.0)
    return out.view(b, hq, s, dv)


def _padded_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    spans: list[tuple[int, int]],
    kw: dict,
) -> Tensor:
    """Row by row on the real span: the row's own kept tokens (padding never attended)."""
    b, hq, s, _ = q.shape
    counts = torch.stack(
        [selection.keep[r, :, start:end].sum(-1) for r, (start, end) in enumerate(spans)]
    ).tolist()  # (B, Hkv): one host read
    out = q.new_zeros(b, hq, s, v.shape[-1])
    for r, (start, end) in enumerate(spans):
        if len(set(counts[r])) != 1:
            raise ValueError(
                f"selection: row {r} keeps different numbers of real tokens per KV head "
                f"({counts[r]}); expected one count per row"
            )
        n = counts[r][0]
        qs, ks, vs = (t[r : r + 1, :, start:end] for t in (q, k, v))
        if n >= end - start:  # every real token kept: dense causal attention of the row
            o = sdpa(qs, ks, vs, backend="auto" if kw["impl"] is Impl.AUTO else None,
                     is_causal=True, scale=kw["scale"], enable_gqa=hq != k.shape[1])  # fmt: skip
        else:
            row_sel = Selection(keep=selection.keep[r : r + 1, :, start:end], num_kept=n)
            o = sparse_attention(qs, ks, vs, row_sel, **kw)
        out[r : r + 1, :, start:end] = o
    return out


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    *,
    impl: Impl | str = "auto",
    unkept: Literal["zero", "attend"] = "zero",
    scale: float | None = None,
    block_size: int = 128,
    compile: bool = True,
    key_valid: Tensor | None = None,
    copy_impl: Impl | str = "auto",
) -> Tensor:
    """Causal prefill attention restricted to the selected tokens of each KV head.

    Kept query t attends to the kept keys at positions <= t of its KV head. Unkept queries get a
    zero output (``unkept="zero"``, ZipVL) or attend to the kept keys at positions <= their own
    (``unkept="attend"``). Keep = 1 0 1 1 (one head)::

        zero            attend
        kv  0 1 2 3     kv  0 1 2 3
        q0  1 0 0 0     q0  1 0 0 0
        q1  0 0 0 0     q1  1 0 0 0
        q2  1 0 1 0     q2  1 0 1 0
        q3  1 0 1 1     q3  1 0 1 1

    Args:
        q: (B, Hq, S, D) queries, RoPE applied.
        k: (B, Hkv, S, D) keys, Hq divisible by Hkv (GQA).
        v: (B, Hkv, S, Dv) values.
        selection: ``keep`` (B, Hkv, S) bool with ``num_kept`` True per row (``TopKSelector``).
            The row counts are verified (``Selection.check_counts``: one host read for a
            selection built by hand, none for one from ``TopKSelector``; skipped while
            ``torch.compile`` traces).
        impl: ``"auto"`` (default: the gather + SDPA path on the SDPA backend measured fastest
            for the shape, see ``zipvl.sparsity.sdpa_backend``), ``"sdpa"`` (the same path on
            PyTorch's own backend dispatch; both faster than ``"flex"``, which also compiles
            for tens of seconds on its first call), ``"flex"`` or ``"reference"``.
        unkept: ``"zero"`` or ``"attend"``.
        scale: softmax scale; None = 1 / sqrt(D).
        block_size: FlexAttention tile size; the gathered length is padded to a multiple of it.
            Only used by ``impl="flex"``.
        compile: ``impl="flex"`` only: run the lazily compiled FlexAttention (True) or eager
            FlexAttention (False, slow).
        key_valid: optional (B, S) bool, True = real token (one contiguous run per row, left or
            right padding): every row attends among its own real kept tokens only, exactly as
            if it ran alone (the selection of ``plan_tokens(key_valid=...)``, whose top-up
            padding positions are never attended); padding query rows are 0. Two host reads
            (the spans and the row counts).
        copy_impl: the gather of the kept rows and the scatter of the output on the
            ``"sdpa"``/``"auto"`` path with ``unkept="zero"``: ``"triton"`` (one launch each,
            ``zipvl.sparsity.gather_triton``; CUDA, or the CPU under ``TRITON_INTERPRET=1``),
            ``"torch"`` (``gather``, ``new_zeros`` + ``scatter_``) or ``"auto"`` (default:
            ``"triton"`` for eager CUDA calls of that path, ``"torch"`` otherwise; see
            ``copy_impl_for``). The results are equal element for element.

    Returns:
        (B, Hq, S, Dv) in q's dtype; rows of queries that attend to nothing are zero. The
        Triton copies write it in q's memory layout (a (B, Hq, S, Dv) view of a (B, S, Hq, Dv)
        buffer when q is such a view, as in transformers models); the other paths return a
        contiguous tensor. A selection with ``num_kept = 0`` gives all zeros. A selection
        carrying a plan's unread NaN flag (``Selection.attach_nan_flag``: a plan with a budget
        known on the host reads nothing back) gives NaN in every element when the flag is set,
        still without a host read.

    Raises:
        ValueError: unknown ``impl``/``unkept``/``copy_impl``, ``copy_impl="triton"`` where
            it cannot run (``triton_copy_problem``), bad shapes/dtypes/devices (``check_qkv``),
            Sq != Skv, a selection that does not match k or whose rows do not all keep
            ``num_kept`` tokens, a non-positive or non-finite ``scale``, ``block_size < 1``.
        TypeError: ``selection`` is not a ``Selection``; ``scale``, ``block_size`` or
            ``compile`` of the wrong type.
    """
    impl_ = parse_impl("impl", impl, SPARSE_ATTENTION_IMPLS)
    parse_impl("copy_impl", copy_impl, COPY_IMPLS)
    check_qkv(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q: expected Sq = Skv = {k.shape[2]} (sparse_attention is prefill attention), "
            f"got Sq = {q.shape[2]}"
        )
    if unkept not in ("zero", "attend"):
        raise ValueError(f"unkept: expected 'zero' or 'attend', got {unkept!r}")
    check_scale("scale", scale)
    check_int("block_size", block_size, 1)
    if not isinstance(compile, bool):
        raise TypeError(f"compile: expected a bool, got {type(compile).__name__}")
    copy = copy_impl_for(q, impl=impl_, unkept=unkept, copy_impl=copy_impl)
    _check_selection(selection, q, k)  # last: its row-count check reads the device
    b, hq, s, _ = q.shape
    if key_valid is not None:
        spans = padded_spans(key_valid, b, s)
        if spans is not None:
            kw = {"impl": impl_, "unkept": unkept, "scale": scale, "block_size": block_size,
                  "compile": compile, "copy_impl": copy}  # fmt: skip
            return _poisoned(_padded_rows(q, k, v, selection, spans, kw), selection.nan_flag)

    applied = False  # whether the path below wrote the plan's NaN flag itself
    if selection.num_kept == 0:
        out = q.new_zeros(b, hq, s, v.shape[-1])
    elif impl_ is Impl.REFERENCE:
        out = reference_sparse_attention(q, k, v, selection, unkept=unkept, scale=scale)
    elif impl_ in (Impl.SDPA, Impl.AUTO):
        tuned = impl_ is Impl.AUTO
        out = _sdpa_sparse(q, k, v, selection, unkept=unkept, scale=scale, tuned=tuned, copy=copy)
        applied = unkept == "zero" and copy is Impl.TRITON  # the scatter kernel's flag
    else:
        out = _flex_sparse(q, k, v, selection, unkept=unkept, scale=scale,
                           block_size=block_size, compile=compile)  # fmt: skip
    return out if applied else _poisoned(out, selection.nan_flag)


def _poisoned(out: Tensor, nan_flag: Tensor | None) -> Tensor:
    """``out`` (a fresh tensor), NaN everywhere when the plan's unread NaN flag is set (in
    place, no host read)."""
    if nan_flag is None:
        return out
    return out.masked_fill_(nan_flag.bool(), float("nan"))
