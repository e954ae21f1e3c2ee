# pyright: reportArgumentType=false, reportOperatorIssue=false, reportAttributeAccessIssue=false, reportCallIssue=false, reportIndexIssue=false, reportGeneralTypeIssues=false
# (Triton's constexpr arguments, pointer arithmetic and static_range are not statically typed)
"""The copies of token-sparse prefill, one Triton launch each: gather the kept rows, scatter back.

``sparse_attention(impl="sdpa"|"auto", unkept="zero")`` compacts q, k and v to the P kept
positions of each KV head, runs causal SDPA on them and writes the result back to the full
length. In PyTorch that is four ``gather`` kernels (q through a ``repeat_interleave``'d index)
and a zero fill plus a ``scatter_``: seven launches, the output written twice. Here:

* ``gather_qkv_triton``, grid (P blocks, Hkv, B): a program reads its block of BLOCK_P kept
  positions once and copies those rows of the G query heads of its KV head, of k and of v
  (each row D contiguous elements, vector loads and stores). Bytes: the kept rows read once
  and written once, the floor of the copy.
* ``scatter_rows_triton``, grid (P blocks + S blocks, Hkv, B): the first programs copy the kept
  rows of the G query heads to their positions, the others write zeros at the positions their
  block does not keep (from the keep mask). Every element of the output is written exactly
  once (no zero fill first), and each kept row is read once.

Launch arguments: the lengths (P, S: not specialised, so that every prompt length reuses one
compiled kernel), the (batch, head, position) strides of each strided input (the last dim must
be contiguous; Triton specialises strides divisible by 16, which is what lets it emit 16-byte
vector accesses) and constexprs fixed by the model (G, D, Dv). Head and batch indices come from
the grid, not from arguments. Inputs may be views (e.g. transformers' ``(B, S, H, D)``
projections transposed to ``(B, H, S, D)``); outputs are new contiguous tensors. Nothing is read
back to the host, so both can be captured in a CUDA graph (after a first eager call, which
compiles them).

Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (how CI tests it, at small shapes).
Imported lazily by ``zipvl.sparsity.attention``: triton is an optional dependency.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["INTERPRETED", "gather_qkv_triton", "scatter_rows_triton", "triton_copy_available"]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels below were decorated for the Triton interpreter (Triton reads the variable
when a kernel is decorated, i.e. at this module's import), so CPU tensors can run them."""

_BLOCK_P = 32  # kept rows per program (x G + 2 rows of D elements copied by a gather program)
_BLOCK_S = 64  # positions per zero-writing program of the scatter
_WARPS = 4


def triton_copy_available(device: torch.device) -> bool:
    """True where the kernels can run: CUDA, or any device when this module was imported with
    TRITON_INTERPRET=1."""
    return device.type == "cuda" or INTERPRETED


@triton.jit
def _copy_rows(
    src, src_rows, src_stride, dst, dst_rows, ok, D: tl.constexpr, BLOCK_D: tl.constexpr,
    nan_ptr=None,
):  # fmt: skip
    """Copy rows ``src + src_rows * src_stride`` (D contiguous elements each) to rows
    ``dst + dst_rows * D`` where ``ok``; NaN instead where the flag at ``nan_ptr`` (if given)
    is set."""
    offs_d = tl.arange(0, BLOCK_D)
    # a mask constant along D when D is a power of two: whole-row vector accesses
    mask = ok[:, None] if BLOCK_D == D else ok[:, None] & (offs_d < D)[None, :]
    x = tl.load(src + src_rows[:, None] * src_stride + offs_d[None, :], mask=mask)
    if nan_ptr is not None:  # x's own dtype: exact when the flag is clear
        x = tl.where(tl.load(nan_ptr) != 0, tl.full(x.shape, float("nan"), x.dtype), x)
    tl.store(dst + dst_rows[:, None] * D + offs_d[None, :], x, mask=mask)


@triton.jit(do_not_specialize=["n_kept"])
def _gather_qkv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    qg_ptr,
    kg_ptr,
    vg_ptr,
    n_kept,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pb = tl.program_id(0)
    hkv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n_hkv = tl.num_programs(1)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = offs_p < n_kept
    row = (b * n_hkv + hkv) * n_kept + offs_p  # (BLOCK_P,) row of idx, kg and vg
    pos = tl.load(idx_ptr + row, mask=ok, other=0)  # kept positions (int64)
    _copy_rows(k_ptr + b * stride_kb + hkv * stride_kh, pos, stride_ks, kg_ptr, row, ok,
               D, BLOCK_D)  # fmt: skip
    _copy_rows(v_ptr + b * stride_vb + hkv * stride_vh, pos, stride_vs, vg_ptr, row, ok,
               DV, BLOCK_DV)  # fmt: skip
    for j in tl.static_range(GROUP):  # the query heads of this KV head
        h = hkv * GROUP + j
        q_row = (b * n_hkv * GROUP + h) * n_kept + offs_p
        _copy_rows(q_ptr + b * stride_qb + h * stride_qh, pos, stride_qs, qg_ptr, q_row, ok,
                   D, BLOCK_D)  # fmt: skip


@triton.jit(do_not_specialize=["n_kept", "seq_len"])
def _scatter_rows_kernel(
    o_ptr,
    idx_ptr,
    keep_ptr,
    out_ptr,
    nan_ptr,
    n_kept,
    seq_len,
    stride_ob,
    stride_oh,
    stride_os,
    GROUP: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SEQ_MAJOR: tl.constexpr,
):
    pid = tl.program_id(0)
    hkv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n_hkv = tl.num_programs(1)
    bh = b * n_hkv + hkv
    n_pb = tl.cdiv(n_kept, BLOCK_P)
    if pid < n_pb:  # kept rows: out[b, h, idx[p]] = o[b, h, p]
        offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = offs_p < n_kept
        pos = tl.load(idx_ptr + bh * n_kept + offs_p, mask=ok, other=0)
        for j in tl.static_range(GROUP):
            h = hkv * GROUP + j
            if SEQ_MAJOR:  # the output's memory is (B, S, Hq, Dv)
                dst = (b * seq_len + pos) * (n_hkv * GROUP) + h
            else:
                dst = (b * n_hkv * GROUP + h) * seq_len + pos
            src = o_ptr + b * stride_ob + h * stride_oh
            _copy_rows(src, offs_p.to(tl.int64), stride_os, out_ptr, dst, ok, DV, BLOCK_DV,
                       nan_ptr)  # fmt: skip
    else:  # unkept positions of this block: zeros (NaN when the plan's flag is set)
        offs_s = (pid - n_pb) * BLOCK_S + tl.arange(0, BLOCK_S)
        in_seq = offs_s < seq_len
        kept = tl.load(keep_ptr + bh * seq_len + offs_s, mask=in_seq, other=1)
        zero = in_seq & (kept == 0)
        offs_d = tl.arange(0, BLOCK_DV)
        mask = zero[:, None] if BLOCK_DV == DV else zero[:, None] & (offs_d < DV)[None, :]
        zeros = tl.zeros([BLOCK_S, BLOCK_DV], dtype=out_ptr.dtype.element_ty)
        if nan_ptr is not None:
            nans = tl.full([BLOCK_S, BLOCK_DV], float("nan"), out_ptr.dtype.element_ty)
            zeros = tl.where(tl.load(nan_ptr) != 0, nans, zeros)
        for j in tl.static_range(GROUP):
            h = hkv * GROUP + j
            if SEQ_MAJOR:
                rows = (b * seq_len + offs_s) * (n_hkv * GROUP) + h
            else:
                rows = (b * n_hkv * GROUP + h) * seq_len + offs_s
            tl.store(out_ptr + rows[:, None] * DV + offs_d[None, :], zeros, mask=mask)


def _empty(like: Tensor, *shape: int) -> Tensor:
    """A new uninitialised contiguous tensor of ``like``'s dtype and device (the outputs; the
    tests replace it with a poisoned one, to prove that the kernels write every element)."""
    return like.new_empty(shape)


def _pow2(n: int) -> int:
    """The least power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _check_device(name: str, t: Tensor) -> None:
    if not triton_copy_available(t.device):
        raise ValueError(
            f"{name}: the Triton copies need a CUDA tensor (or TRITON_INTERPRET=1 set before "
            f"zipvl.sparsity.gather_triton is imported), got device {t.device}"
        )


def _check_idx(idx: object, b: int, hkv: int, device: torch.device) -> Tensor:
    if not isinstance(idx, Tensor) or idx.ndim != 3 or idx.dtype != torch.int64:
        shown = f"{idx.dtype} of {idx.ndim} dims" if isinstance(idx, Tensor) else type(idx)
        raise ValueError(f"idx: expected an int64 (B, Hkv, P) tensor, got {shown}")
    if tuple(idx.shape[:2]) != (b, hkv):
        raise ValueError(
            f"idx: expected (B, Hkv) = {(b, hkv)} leading dims, got {tuple(idx.shape)}"
        )
    if idx.device != device:
        raise ValueError(f"idx: expected device {device}, got {idx.device}")
    return idx.contiguous()  # a copy for a sliced Selection.indices() (the captured plan's)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def gather_qkv_triton(
    q: Tensor, k: Tensor, v: Tensor, idx: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The kept rows of q, k and v, in one launch.

    Equal, element for element, to ``q.gather(2, ...)`` with ``idx`` repeated over the G query
    heads of each KV head, and ``k.gather(2, ...)``, ``v.gather(2, ...)`` with ``idx``.

    Args:
        q: (B, Hq, S, D) queries; any strides (a last dim that is not contiguous is copied
            first).
        k: (B, Hkv, S, D) keys, Hq divisible by Hkv, q's dtype and device.
        v: (B, Hkv, S, Dv) values.
        idx: (B, Hkv, P) int64 positions in [0, S) (``Selection.indices()``: ascending); query
            head h uses the positions of KV head ``h // G``. Not range-checked (a device read).

    Returns:
        ``(qg, kg, vg)``: (B, Hq, P, D), (B, Hkv, P, D), (B, Hkv, P, Dv), new contiguous
        tensors in q's dtype.

    Raises:
        ValueError: mismatched ranks, shapes, dtypes or devices (the message names the
            argument), or a device the kernels cannot run on.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.ndim != 4:
            raise ValueError(f"{name}: expected a 4-D (B, H, S, D) tensor, got {_shape(t)}")
    b, hq, s, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    if tuple(k.shape) != (b, hkv, s, d) or hkv == 0 or hq % hkv:
        raise ValueError(
            f"k: expected (B, Hkv, S, D) with Hq = {hq} divisible by Hkv, like q "
            f"{tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if tuple(v.shape[:3]) != (b, hkv, s):
        raise ValueError(f"v: expected (B, Hkv, S) = {(b, hkv, s)} like k, got {tuple(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"{name}: expected q's dtype and device ({q.dtype}, {q.device}), got "
                f"({t.dtype}, {t.device})"
            )
    _check_device("q", q)
    idx = _check_idx(idx, b, hkv, q.device)
    p = idx.shape[2]
    qg = _empty(q, b, hq, p, d)
    kg = _empty(q, b, hkv, p, d)
    vg = _empty(q, b, hkv, p, dv)
    if qg.numel() == 0 and kg.numel() == 0 and vg.numel() == 0:
        return qg, kg, vg
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    _gather_qkv_kernel[(triton.cdiv(p, _BLOCK_P), hkv, b)](
        q, k, v, idx, qg, kg, vg, p,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        GROUP=hq // hkv, D=d, DV=dv, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), BLOCK_P=_BLOCK_P,
        num_warps=_WARPS,
    )  # fmt: skip
    return qg, kg, vg


def scatter_rows_triton(
    out_kept: Tensor,
    idx: Tensor,
    keep: Tensor,
    s: int,
    *,
    nan_flag: Tensor | None = None,
    seq_major: bool = False,
) -> Tensor:
    """The full-length output of the kept rows, zeros elsewhere, written once in one launch.

    Equal, element for element, to ``new_zeros(B, Hq, S, Dv).scatter_(2, idx_q, out_kept)`` with
    ``idx`` repeated over the G query heads of each KV head.

    Args:
        out_kept: (B, Hq, P, Dv) rows of the kept positions; any strides (a last dim that is
            not contiguous is copied first).
        idx: (B, Hkv, P) int64 positions, Hq divisible by Hkv: row p of query head h goes to
            position ``idx[b, h // G, p]``.
        keep: (B, Hkv, S) bool, True exactly at the positions in ``idx`` (a ``Selection``'s
            ``keep`` and ``indices()``). Not cross-checked (a device read): a kept position
            missing from ``idx`` would be left unwritten.
        s: the output length S.
        nan_flag: optional 0-dim integer or bool tensor on the device (a plan's unread NaN
            check, ``Selection.nan_flag``): when nonzero every output element is NaN. Read by
            the kernel, never by the host.
        seq_major: write a (B, S, Hq, Dv) buffer and return it as its (B, Hq, S, Dv) view (the
            layout of q in a transformers model, whose attention output is transposed back to
            (B, S, Hq, Dv): ``.transpose(1, 2).contiguous()`` then copies nothing).

    Returns:
        (B, Hq, S, Dv) in out_kept's dtype: a new contiguous tensor, or with ``seq_major`` the
        transposed view of a new contiguous (B, S, Hq, Dv) tensor.

    Raises:
        ValueError: mismatched ranks, shapes, dtypes or devices (the message names the
            argument), or a device the kernels cannot run on.
    """
    if not isinstance(out_kept, Tensor) or out_kept.ndim != 4:
        raise ValueError(f"out_kept: expected a 4-D (B, Hq, P, Dv) tensor, got {_shape(out_kept)}")
    if not isinstance(seq_major, bool):
        raise ValueError(f"seq_major: expected a bool, got {type(seq_major).__name__}")
    if isinstance(s, bool) or not isinstance(s, int) or s < 0:
        raise ValueError(f"s: expected an int >= 0, got {s!r}")
    b, hq, p, dv = out_kept.shape
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.ndim != 3:
        raise ValueError(f"keep: expected a bool (B, Hkv, S) tensor, got {_shape(keep)}")
    hkv = keep.shape[1]
    if keep.shape[0] != b or keep.shape[2] != s or hkv == 0 or hq % hkv:
        raise ValueError(
            f"keep: expected (B, Hkv, S) = ({b}, Hkv, {s}) with Hq = {hq} divisible by Hkv, "
            f"got {tuple(keep.shape)}"
        )
    if keep.device != out_kept.device:
        raise ValueError(f"keep: expected device {out_kept.device}, got {keep.device}")
    _check_device("out_kept", out_kept)
    idx = _check_idx(idx, b, hkv, out_kept.device)
    if idx.shape[2] != p:
        raise ValueError(f"idx: expected P = {p} positions like out_kept, got {tuple(idx.shape)}")
    if nan_flag is not None:
        if (not isinstance(nan_flag, Tensor) or nan_flag.ndim != 0
                or nan_flag.is_floating_point() or nan_flag.is_complex()):  # fmt: skip
            raise ValueError(
                f"nan_flag: expected a 0-dim integer or bool tensor, got {_shape(nan_flag)}"
            )
        if nan_flag.device != out_kept.device:
            raise ValueError(f"nan_flag: expected device {out_kept.device}, got {nan_flag.device}")
    out = _empty(out_kept, b, s, hq, dv).transpose(1, 2) if seq_major else _empty(
        out_kept, b, hq, s, dv
    )  # fmt: skip
    if out.numel() == 0:
        return out
    out_kept = _last_dim_contiguous(out_kept)
    keep8 = keep.contiguous().view(torch.uint8)
    grid = (triton.cdiv(p, _BLOCK_P) + triton.cdiv(s, _BLOCK_S), hkv, b)
    _scatter_rows_kernel[grid](
        out_kept, idx, keep8, out, nan_flag, p, s,  # nan_flag None: a kernel without the flag
        out_kept.stride(0), out_kept.stride(1), out_kept.stride(2),
        GROUP=hq // hkv, DV=dv, BLOCK_DV=_pow2(dv), BLOCK_P=_BLOCK_P, BLOCK_S=_BLOCK_S,
        SEQ_MAJOR=seq_major, num_warps=_WARPS,
    )  # fmt: skip
    return out


def _shape(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} of shape {tuple(t.shape)}"
    return type(t).__name__
