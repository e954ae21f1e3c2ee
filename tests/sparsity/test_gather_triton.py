"""The Triton copies of sparse prefill (``zipvl.sparsity.gather_triton``) against the PyTorch ones.

Pure copies, so the check is exact equality. On the CPU the kernels run under TRITON_INTERPRET=1
(set by conftest before triton is imported), at small shapes and few examples (the interpreter is
slow); on a CUDA machine they run on the GPU. The outputs are allocated poisoned (NaN), so an
element a kernel forgets to write (a zero of the scatter included) fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zipvl.sparsity.gather_triton as gather_triton
from zipvl.impl import Impl
from zipvl.sparsity import sparse_attention
from zipvl.sparsity.attention import (
    _gather_kv,
    _gather_q,
    _scatter_rows,
    copy_impl_for,
    triton_copy_problem,
)
from zipvl.sparsity.gather_triton import gather_qkv_triton, scatter_rows_triton
from zipvl.types import Selection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS = gather_triton.triton_copy_available(torch.device(DEVICE))
needs_kernels = pytest.mark.skipif(not RUNS, reason="CPU without TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every output of the kernels starts as NaN (torch.equal fails on an unwritten element)."""

    def poisoned(like: torch.Tensor, *shape: int) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(gather_triton, "_empty", poisoned)


def _layout(x: torch.Tensor, how: str) -> torch.Tensor:
    """x (B, H, S, D) with the same values in another memory layout."""
    if how == "heads_inner":  # transformers' (B, S, H, D) projections, transposed
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "strided_rows":  # a slice of wider rows (the last dim still contiguous)
        wide = torch.zeros(*x.shape[:-1], x.shape[-1] + 8, dtype=x.dtype, device=x.device)
        wide[..., 4 : 4 + x.shape[-1]] = x
        return wide[..., 4 : 4 + x.shape[-1]]
    if how == "strided_last":  # a last dim that is not contiguous (copied by the wrapper)
        wide = torch.zeros(*x.shape, 2, dtype=x.dtype, device=x.device)
        wide[..., 0] = x
        return wide[..., 0]
    return x


LAYOUTS = ["contiguous", "heads_inner", "strided_rows", "strided_last"]


@st.composite
def problems(draw: st.DrawFn) -> dict:
    """Small shapes: B 1-2, Hkv 1-2, G 1-3, S 1-70, D 16/32, Dv 16/24/32, P in [0, S]."""
    b, hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    s = draw(st.integers(1, 70))
    return {
        "b": b,
        "hkv": hkv,
        "g": g,
        "s": s,
        "p": draw(st.integers(0, s)),
        "d": draw(st.sampled_from([16, 32])),
        "dv": draw(st.sampled_from([16, 24, 32])),  # 24: the masked (non-power-of-two) rows
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "layouts": draw(st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _keep(b: int, hkv: int, s: int, p: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A random keep mask with p positions per row and its ascending positions (B, Hkv, P)."""
    order = torch.rand(b, hkv, s, generator=gen).argsort(dim=-1)
    keep = order < p  # p True per row, at random positions
    idx = keep.nonzero()[:, 2].view(b, hkv, p)  # row-major: ascending within each row
    return keep.to(DEVICE), idx.to(DEVICE)


def _randn(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


@needs_kernels
@settings(max_examples=12)
@given(problems())
def test_gather_qkv_equals_torch_gather(pb: dict) -> None:
    b, hkv, g, s, p, d, dv = (pb[n] for n in ("b", "hkv", "g", "s", "p", "d", "dv"))
    gen = torch.Generator().manual_seed(pb["seed"])
    q = _layout(_randn(b, hkv * g, s, d, dtype=pb["dtype"], gen=gen), pb["layouts"][0])
    k = _layout(_randn(b, hkv, s, d, dtype=pb["dtype"], gen=gen), pb["layouts"][1])
    v = _layout(_randn(b, hkv, s, dv, dtype=pb["dtype"], gen=gen), pb["layouts"][2])
    _, idx = _keep(b, hkv, s, p, gen)
    qg, kg, vg = gather_qkv_triton(q, k, v, idx)
    kr, vr = _gather_kv(k, v, idx)
    for got, want in ((qg, _gather_q(q, idx)), (kg, kr), (vg, vr)):
        assert got.is_contiguous() and got.dtype == want.dtype
        assert torch.equal(got, want)


@needs_kernels
@settings(max_examples=12)
@given(problems())
def test_scatter_rows_equals_torch_scatter(pb: dict) -> None:
    b, hkv, g, s, p, dv = (pb[n] for n in ("b", "hkv", "g", "s", "p", "dv"))
    gen = torch.Generator().manual_seed(pb["seed"])
    keep, idx = _keep(b, hkv, s, p, gen)
    # SDPA's flash/cuDNN outputs are (B, P, Hq, Dv) in memory: any layout is read
    out_kept = _layout(_randn(b, hkv * g, p, dv, dtype=pb["dtype"], gen=gen), pb["layouts"][0])
    want = _scatter_rows(out_kept, idx, s)
    for seq_major in (False, True):  # (B, Hq, S, Dv) memory, or a view of (B, S, Hq, Dv)
        got = scatter_rows_triton(out_kept, idx, keep, s, seq_major=seq_major)
        assert got.shape == (b, hkv * g, s, dv)
        assert (got.transpose(1, 2) if seq_major else got).is_contiguous()
        assert torch.equal(got, want)  # the zeros too: the poisoned output had NaN there


@needs_kernels
@pytest.mark.parametrize(
    ("flag_dtype", "dtype"),
    [(torch.int64, torch.bfloat16), (torch.bool, torch.bfloat16), (torch.int64, torch.float64)],
)
def test_scatter_rows_writes_nan_everywhere_when_the_flag_is_set(flag_dtype, dtype) -> None:
    """A clear flag changes nothing (float64 rows stay exact), a set one writes NaN into every
    element."""
    gen = torch.Generator().manual_seed(3)
    b, hkv, g, s, p, dv = 1, 2, 3, 40, 9, 16
    keep, idx = _keep(b, hkv, s, p, gen)
    out_kept = _randn(b, hkv * g, p, dv, dtype=dtype, gen=gen)
    clear = torch.zeros((), dtype=flag_dtype, device=DEVICE)
    got = scatter_rows_triton(out_kept, idx, keep, s, nan_flag=clear)
    assert torch.equal(got, _scatter_rows(out_kept, idx, s))
    bad = scatter_rows_triton(out_kept, idx, keep, s, nan_flag=torch.ones_like(clear))
    assert bad.isnan().all()  # kept rows and zeros alike
    with pytest.raises(ValueError, match=r"nan_flag: expected a 0-dim integer"):
        scatter_rows_triton(out_kept, idx, keep, s, nan_flag=torch.zeros(1, device=DEVICE))
    # through sparse_attention's Triton copies: the selection's flag reaches the kernel
    q, k, v = (_randn(b, n, s, dv, dtype=torch.float32, gen=gen) for n in (hkv * g, hkv, hkv))
    for flag, nan in ((clear, False), (torch.ones_like(clear), True)):
        sel = Selection(keep=keep, num_kept=p).check_counts().attach_nan_flag(flag)
        out = sparse_attention(q, k, v, sel, impl="sdpa", copy_impl="triton")
        assert out.isnan().all() if nan else out.isfinite().all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["sdpa", "auto"])
def test_sparse_attention_triton_copies_equal_torch_copies(
    dtype: torch.dtype, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(1)
    b, hkv, g, s, d, p = 2, 2, 3, 45, 32, 17
    q = _layout(_randn(b, hkv * g, s, d, dtype=dtype, gen=gen), "heads_inner")
    k = _layout(_randn(b, hkv, s, d, dtype=dtype, gen=gen), "heads_inner")
    v = _randn(b, hkv, s, d, dtype=dtype, gen=gen)
    keep, _ = _keep(b, hkv, s, p, gen)
    sel = Selection(keep=keep, num_kept=p)
    calls: list[str] = []
    real = gather_triton.gather_qkv_triton

    def counted(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        calls.append("gather")
        return real(*args)

    monkeypatch.setattr(gather_triton, "gather_qkv_triton", counted)
    fast = sparse_attention(q, k, v, sel, impl=impl, copy_impl="triton")
    slow = sparse_attention(q, k, v, sel, impl=impl, copy_impl="torch")
    assert calls == ["gather"]  # the first call ran the kernels, the second did not
    assert torch.equal(fast, slow)
    # q's layout is the output's: transformers' (B, S, Hq, D) view gives a (B, S, Hq, Dv)
    # buffer (its transpose back copies nothing), a contiguous q a contiguous output
    assert fast.transpose(1, 2).is_contiguous() and not fast.is_contiguous()
    plain = sparse_attention(q.contiguous(), k, v, sel, impl=impl, copy_impl="triton")
    assert plain.is_contiguous() and torch.equal(plain, fast)
    want = sparse_attention(q, k, v, sel, impl="reference")
    torch.testing.assert_close(fast.float(), want.float(), atol=2e-2, rtol=2e-2)


@needs_kernels
def test_copy_impl_for_names_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    auto = Impl.TRITON if q.is_cuda else Impl.TORCH  # the interpreter runs only when asked
    assert copy_impl_for(q) is auto
    assert copy_impl_for(q, copy_impl="triton") is Impl.TRITON
    assert copy_impl_for(q, copy_impl="torch") is Impl.TORCH
    # the paths without these copies: "auto" keeps PyTorch, an explicit "triton" raises
    for kw in ({"impl": "flex"}, {"impl": "reference"}, {"unkept": "attend"}):
        assert copy_impl_for(q, **kw) is Impl.TORCH
        assert triton_copy_problem(q, **kw) is not None
        with pytest.raises(ValueError, match=r"^copy_impl: 'triton' cannot run: it needs "):
            copy_impl_for(q, copy_impl="triton", **kw)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert copy_impl_for(q) is Impl.TORCH  # traced: the PyTorch copies
    with pytest.raises(ValueError, match="copy_impl: 'triton' cannot run: it needs an eager"):
        copy_impl_for(q, copy_impl="triton")


def test_copy_impl_rejects_unknown_values() -> None:
    q = torch.randn(1, 2, 8, 16)
    keep = torch.zeros(1, 2, 8, dtype=torch.bool)
    keep[..., ::2] = True
    sel = Selection(keep=keep, num_kept=4)
    for bad in ("cuda", "sdpa", None):
        with pytest.raises(ValueError, match=r"^copy_impl: expected one of 'auto', 'torch', "):
            sparse_attention(q, q, q, sel, copy_impl=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^copy_impl: 'triton' cannot run: it needs unkept="):
        sparse_attention(q, q, q, sel, unkept="attend", copy_impl="triton")


def test_triton_copies_refuse_where_they_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # CPU tensors where the kernels were not decorated for the interpreter (a CUDA machine)
    monkeypatch.setattr(gather_triton, "INTERPRETED", False)
    q = torch.randn(1, 2, 8, 16)
    idx = torch.zeros(1, 2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^q: the Triton copies need a CUDA tensor"):
        gather_qkv_triton(q, q, q, idx)
    with pytest.raises(ValueError, match=r"^out_kept: the Triton copies need a CUDA tensor"):
        scatter_rows_triton(q[:, :, :3], idx, torch.ones(1, 2, 8, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match="copy_impl: 'triton' cannot run: it needs a CUDA"):
        copy_impl_for(q, copy_impl="triton")
    assert copy_impl_for(q) is Impl.TORCH


@needs_kernels
def test_bad_inputs_raise_naming_the_argument() -> None:
    with pytest.raises(ValueError, match=r"seq_major: expected a bool"):
        scatter_rows_triton(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, dtype=torch.int64),
                            torch.ones(1, 2, 1, dtype=torch.bool), 1, seq_major=1)  # fmt: skip
    q = torch.randn(1, 4, 10, 16, device=DEVICE)
    k = torch.randn(1, 2, 10, 16, device=DEVICE)
    idx = torch.tensor([[[1, 3], [2, 5]]], device=DEVICE)
    keep = torch.zeros(1, 2, 10, dtype=torch.bool, device=DEVICE)
    keep[0, 0, [1, 3]] = keep[0, 1, [2, 5]] = True
    o = torch.randn(1, 4, 2, 16, device=DEVICE)
    gather_cases = [
        ("q", (q[0], k, k, idx)),
        ("k", (q, k[:, :, :9], k, idx)),
        ("k", (q, torch.randn(1, 3, 10, 16, device=DEVICE), k, idx)),  # Hq % Hkv
        ("k", (q, k.double(), k, idx)),
        ("v", (q, k, k[:, :1], idx)),
        ("idx", (q, k, k, idx.int())),
        ("idx", (q, k, k, idx[:, :1])),
        ("idx", (q, k, k, idx[0])),
    ]
    for name, args in gather_cases:
        with pytest.raises(ValueError, match=f"^{name}: "):
            gather_qkv_triton(*args)
    scatter_cases = [
        ("out_kept", (o[0], idx, keep, 10)),
        ("s", (o, idx, keep, -1)),
        ("keep", (o, idx, keep.int(), 10)),
        ("keep", (o, idx, keep, 11)),
        ("keep", (o, idx, keep[:, :1].expand(1, 3, 10), 10)),  # Hq % Hkv
        ("idx", (o, idx[..., :1], keep, 10)),
        ("idx", (o, idx.float(), keep, 10)),
    ]
    for name, args in scatter_cases:
        with pytest.raises(ValueError, match=f"^{name}: "):
            scatter_rows_triton(*args)
