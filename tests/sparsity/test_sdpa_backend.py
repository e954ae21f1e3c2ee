"""The measured SDPA backend choice (``impl="auto"``): picks the fastest, measures once per
shape bucket, skips backends that cannot run or are disabled, and never changes the result
beyond the 2x rule."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from zipvl.sparsity import sdpa_backend as sb
from zipvl.sparsity.attention import sparse_attention
from zipvl.types import Selection


@pytest.fixture(autouse=True)
def _fresh() -> None:
    sb.clear_choices()


def _qkv(s: int = 40, device: str = "cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, s, 32, generator=g).to(device, dtype)
    k = torch.randn(1, 2, s, 32, generator=g).to(device, dtype)
    v = torch.randn(1, 2, s, 32, generator=g).to(device, dtype)
    return q, k, v


def test_picks_the_fastest_and_measures_once_per_bucket() -> None:
    fake = {"cudnn": 3.0, "flash": 1.0, "efficient": 2.0, "math": 9.0}
    calls: list[str] = []

    def timer(name, run):
        calls.append(name)
        return fake[name]

    q, k, v = _qkv(40)
    kw = {"is_causal": True, "enable_gqa": True}
    assert sb.fastest_backend(q, k, v, timer=timer, **kw) == "flash"
    assert sorted(calls) == ["cudnn", "efficient", "flash"]  # math only when nothing else runs
    # same bucket (40 and 60 both round up to 64): no new measurement
    q2, k2, v2 = _qkv(60)
    assert sb.fastest_backend(q2, k2, v2, timer=timer, **kw) == "flash"
    assert len(calls) == 3
    # a new bucket measures again; a faster backend there wins there
    fake["cudnn"] = 0.5
    q3, k3, v3 = _qkv(100)
    assert sb.fastest_backend(q3, k3, v3, timer=timer, **kw) == "cudnn"
    assert len(calls) == 6
    (choice,) = [c for name, c in sb.choices().items() if "Skv<=128" in name]
    assert choice.backend == "cudnn" and choice.times_ms["cudnn"] == 0.5


@pytest.mark.parametrize(("first", "runs", "want"), [(5.0, 4, 5.0), (25.0, 2, 25.0)])
def test_default_timer_times_a_long_call_once(first: float, runs: int, want: float) -> None:
    """Warm-up, then three timed runs (their median) or, from LONG_CALL_MS on, one."""
    calls: list[str] = []
    script = iter([first, first + 2.0, first - 1.0])

    def clock(fn) -> float:
        fn()
        return next(script)

    got = sb._default_timer("flash", lambda: calls.append("run"), clock=clock)
    assert len(calls) == runs  # the warm-up is one of them
    assert got == want  # a short call: median of (5, 7, 4) = 5


def test_skips_backends_that_cannot_run_or_are_disabled() -> None:
    def timer(name, run):
        if name == "cudnn":
            raise RuntimeError("no kernel")
        return {"flash": 2.0, "efficient": 1.0, "math": 5.0}[name]

    q, k, v = _qkv()
    assert sb.fastest_backend(q, k, v, timer=timer, is_causal=True, enable_gqa=True) == (
        "efficient"
    )
    sb.clear_choices()
    seen: list[str] = []

    def record(name, run):
        seen.append(name)
        return 1.0

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        sb.fastest_backend(q, k, v, timer=record, is_causal=True, enable_gqa=True)
    assert sorted(seen) == ["efficient", "flash"]  # the caller's restriction

    def broken(name, run):
        raise RuntimeError(f"{name}: no kernel")

    sb.clear_choices()
    with pytest.raises(RuntimeError, match="no enabled SDPA backend"):
        sb.fastest_backend(q, k, v, timer=broken, is_causal=True)


def test_unseeded_cpu_calls_use_pytorch_dispatch_and_remember_nothing() -> None:
    q, k, v = _qkv()
    assert sb.fastest_backend(q, k, v, is_causal=True, enable_gqa=True) is None
    assert sb.choices() == {}
    with pytest.raises(ValueError, match="backend"):
        sb.sdpa(q, k, v, backend="fast")
    torch.testing.assert_close(  # "auto" unseeded on the CPU: PyTorch's dispatch
        sb.sdpa(q, k, v, backend="auto", is_causal=True, enable_gqa=True),
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        rtol=0,
        atol=0,
    )


def _selection(s: int) -> Selection:
    keep = torch.zeros(1, 2, s, dtype=torch.bool)
    keep[..., ::3] = True
    keep[..., -1] = True
    return Selection(keep=keep, num_kept=int(keep[0, 0].sum()))


@contextlib.contextmanager
def _named_backends_run():
    """Records the backend of every call ``sdpa_auto`` makes (its calls go through the module's
    ``sdpa``)."""
    ran: list[str] = []
    real = sb.sdpa

    def spy(q, k, v, *, backend, **kw):
        ran.append(backend)
        return real(q, k, v, backend=backend, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sb, "sdpa", spy)
        yield ran


def _seed(q, k, v, backend: str, **kw) -> None:
    """Remember ``backend`` for the bucket of this call (a timer under which only it runs)."""

    def timer(name, run):
        if name != backend:
            raise RuntimeError(f"{name}: not in this test")
        return 1.0

    assert sb.fastest_backend(q, k, v, timer=timer, **kw) == backend


def test_auto_runs_the_remembered_backend() -> None:
    """sparse_attention(impl="auto") runs the gathered call on the backend remembered for its
    bucket (math here, seeded), with the same result as PyTorch's dispatch."""
    q, k, v = _qkv(48)
    sel = _selection(48)
    p = sel.num_kept
    gq, gk, gv = q[:, :, :p], k[:, :, :p], v[:, :, :p]  # the gathered call's shapes
    _seed(gq, gk, gv, "math", is_causal=True, scale=None, enable_gqa=True)
    with _named_backends_run() as ran:
        a = sparse_attention(q, k, v, sel, impl="auto")
    assert ran == ["math"]
    b = sparse_attention(q, k, v, sel, impl="sdpa")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_choice_that_is_pytorchs_own_runs_without_forcing_it(monkeypatch) -> None:
    """Where PyTorch's dispatch picks the measured backend itself (flash on CPU tensors here),
    ``sdpa_auto`` calls SDPA without the ``sdpa_kernel`` context; where it does not (math
    seeded), the backend is forced."""
    q, k, v = _qkv()
    kw = {"is_causal": True, "enable_gqa": True}
    _seed(q, k, v, "flash", **kw)
    (choice,) = sb.choices().values()
    assert choice.dispatch == "flash"  # what torch._fused_sdp_choice says for CPU tensors
    entered: list[object] = []
    real = sb.sdpa_kernel
    monkeypatch.setattr(sb, "sdpa_kernel", lambda *a, **k: entered.append(a) or real(*a, **k))
    torch.testing.assert_close(
        sb.sdpa_auto(q, k, v, **kw), F.scaled_dot_product_attention(q, k, v, **kw)
    )
    assert entered == []
    sb.clear_choices()
    _seed(q, k, v, "math", **kw)
    torch.testing.assert_close(
        sb.sdpa_auto(q, k, v, **kw), F.scaled_dot_product_attention(q, k, v, **kw),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    assert len(entered) == 1


def test_a_cached_choice_is_never_a_disabled_backend() -> None:
    q, k, v = _qkv()
    kw = {"is_causal": True, "enable_gqa": True}
    _seed(q, k, v, "math", **kw)
    assert sb.fastest_backend(q, k, v, **kw) == "math"
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # math off: another bucket, measured anew
        got = sb.fastest_backend(q, k, v, timer=lambda name, run: 1.0, **kw)
        assert got == "flash"
        assert sb.sdpa_auto(q, k, v, **kw).shape == q.shape  # runs flash (CPU), not math


def test_a_refused_call_is_measured_again() -> None:
    """A remembered backend that cannot run a later call of its bucket (cudnn on CPU tensors
    here) is measured again on that call; the result is PyTorch's and the reason is recorded."""
    q, k, v = _qkv()
    kw = {"is_causal": True, "enable_gqa": True}
    _seed(q, k, v, "cudnn", **kw)

    def timer(name, run):
        run()  # cudnn and efficient refuse CPU tensors; flash (CPU) and math run
        return {"flash": 1.0, "math": 2.0}[name]

    out = sb.sdpa_auto(q, k, v, timer=timer, **kw)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kw))
    (choice,) = sb.choices().values()
    assert choice.backend == "flash" and "cudnn refused" in choice.why
    assert "math" not in choice.times_ms  # math is timed only when nothing else runs


def test_dense_layers_of_auto_layers_use_the_choice() -> None:
    from zipvl.models.attention import dense_causal_attention

    q, k, v = _qkv(40)
    _seed(q, k, v, "math", is_causal=True, scale=None, enable_gqa=True)
    with _named_backends_run() as ran:
        out = dense_causal_attention(q, k, v, tuned=True)
    assert ran == ["math"]
    torch.testing.assert_close(out, dense_causal_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("causal", [True, False])
def test_every_backend_within_the_2x_rule_on_the_gpu(causal: bool) -> None:
    """Whichever backend is chosen, the result is within twice the error of PyTorch's own
    dispatch against float64 (the backend choice never changes the result beyond that)."""
    q, k, v = _qkv(1024, "cuda", torch.bfloat16)
    kw = {"is_causal": causal, "enable_gqa": True}
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)
    plain = (F.scaled_dot_product_attention(q, k, v, **kw).double() - ref).abs().max().item()
    ran = 0
    for name in sb.BACKENDS:
        try:
            out = sb.sdpa(q, k, v, backend=name, **kw)
        except RuntimeError:
            continue
        ran += 1
        assert (out.double() - ref).abs().max().item() <= 2 * plain + 1e-3, name
    assert ran >= 2
    assert sb.fastest_backend(q, k, v, **kw) in sb.BACKENDS
