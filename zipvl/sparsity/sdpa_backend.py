"""The fastest ``scaled_dot_product_attention`` backend for a call, measured once per shape bucket.

PyTorch's SDPA picks a backend by a fixed priority, not by speed. On an H200 (torch 2.11, LongVA
heads) cuDNN is about 1.3x faster than flash for causal prefill and 3-5x slower for one-query
decode over a growing cache (it plans every new key length), so no fixed order is right for
both. ``fastest_backend`` times every backend that can run a call (cuDNN, flash, memory-efficient,
math; only those the caller left enabled, e.g. inside ``torch.nn.attention.sdpa_kernel``) the
first time a shape bucket is seen, and remembers the winner:

* bucket = (device, dtype, B, Hq, Hkv, D, Dv, Sq and Skv rounded up to a power of two, causal,
  Sq == Skv, the mask's dtype and shape, dropout, requires_grad, unit last strides, 16-byte
  alignment, deterministic mode, PyTorch's backend priority order, the enabled backends):
  everything that decides which backends can run a call and which one PyTorch's dispatch
  picks, so one measurement per bucket (a few ms, with host syncs, like Triton's autotuning)
  holds for the bucket's later calls;
* should the remembered backend still refuse a later call, ``sdpa_auto`` measures that call
  again (all backends compute the same function) and records why in ``choices()``;
* the math backend is timed only when no other backend runs (it materialises the score matrix);
* no measurement, and no remembered choice, on the CPU, while compiling or while a CUDA graph is
  captured: those calls use PyTorch's own dispatch (``None``).

``sdpa(q, k, v, backend=..., **kw)`` runs one call on a chosen backend, ``sdpa_auto`` on the
measured one. ``choices()`` lists what was chosen (benchmarks print it next to their tables).
``torch.nn.attention.sdpa_kernel`` switches process-wide flags, so measuring (and every call on
a named backend) is not thread-safe across threads that run SDPA concurrently; measurement
holds a lock against concurrent measurements.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "BACKENDS",
    "BackendChoice",
    "choices",
    "clear_choices",
    "fastest_backend",
    "sdpa",
    "sdpa_auto",
]

BACKENDS: dict[str, SDPBackend] = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
"""The backends a choice is made among, by name."""

_ENABLED: dict[str, Callable[[], bool]] = {
    "cudnn": torch.backends.cuda.cudnn_sdp_enabled,
    "flash": torch.backends.cuda.flash_sdp_enabled,
    "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
    "math": torch.backends.cuda.math_sdp_enabled,
}


@dataclass(frozen=True)
class BackendChoice:
    """What ``fastest_backend`` chose for one bucket.

    Attributes:
        backend: the fastest backend's name, or None (PyTorch's own dispatch: nothing timed).
        times_ms: median ms of every backend that ran ({} when nothing was timed).
        why: a few words on how the choice was made.
        dispatch: the backend PyTorch's own dispatch picks for the bucket's calls
            (``torch._fused_sdp_choice``), or None where it could not be asked. Where it is
            ``backend``, ``sdpa_auto`` calls SDPA directly: the ``sdpa_kernel`` context that
            forces a backend costs about 15 us of host time per call.
    """

    backend: str | None
    times_ms: dict[str, float]
    why: str
    dispatch: str | None = None


_CHOICES: dict[tuple[Any, ...], BackendChoice] = {}
_LOCK = threading.Lock()


def _bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _enabled() -> tuple[str, ...]:
    return tuple(name for name in BACKENDS if _ENABLED[name]())


def _key(q: Tensor, k: Tensor, v: Tensor, kw: dict[str, Any]) -> tuple[Any, ...]:
    mask = kw.get("attn_mask")
    tensors = (q, k, v)
    return (
        str(q.device), q.dtype, q.shape[0], q.shape[1], k.shape[1], q.shape[-1], v.shape[-1],
        _bucket(q.shape[-2]), _bucket(k.shape[-2]),
        bool(kw.get("is_causal", False)), q.shape[-2] == k.shape[-2],
        None if mask is None else (mask.dtype, tuple(mask.shape)),
        float(kw.get("dropout_p", 0.0)), bool(kw.get("enable_gqa", False)),
        any(t.requires_grad for t in tensors), all(t.stride(-1) == 1 for t in tensors),
        all(t.data_ptr() % 16 == 0 for t in tensors),
        torch.are_deterministic_algorithms_enabled(), _priority(), _enabled(),
    )  # fmt: skip


def _priority() -> tuple[int, ...] | None:
    """PyTorch's current backend priority order (``sdpa_kernel(..., set_priority=True)``
    changes it, and with it what its own dispatch picks), or None where it cannot be asked."""
    get = getattr(torch._C, "_get_sdp_priority_order", None)
    return tuple(cast(list[int], get())) if callable(get) else None


def choices() -> dict[str, BackendChoice]:
    """Every choice made so far, keyed by a readable description of its bucket."""
    out = {}
    for key, choice in _CHOICES.items():
        dev, dtype, b, hq, hkv, d, dv, sq, skv, causal, _, mask = key[:12]
        flags = (" causal" if causal else "") + (" masked" if mask is not None else "")
        name = (f"{dev} {str(dtype).removeprefix('torch.')} B={b} Hq={hq} Hkv={hkv} D={d} "
                f"Dv={dv} Sq<={sq} Skv<={skv}{flags} enabled={'/'.join(key[-1])}")  # fmt: skip
        out[name] = choice
    return out


def clear_choices() -> None:
    """Forget every choice (the next call of each bucket measures again)."""
    _CHOICES.clear()


def sdpa(q: Tensor, k: Tensor, v: Tensor, *, backend: str | None, **kw: Any) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kw)`` on ``backend``: a key of ``BACKENDS``
    (one that cannot run the call raises PyTorch's RuntimeError), ``"auto"`` (``sdpa_auto``: the
    one measured fastest for the shape) or None (PyTorch's own dispatch)."""
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    if backend == "auto":
        return sdpa_auto(q, k, v, **kw)
    if backend not in BACKENDS:
        raise ValueError(
            f"backend: expected one of {sorted(BACKENDS)}, 'auto' or None, got {backend!r}"
        )
    with sdpa_kernel([BACKENDS[backend]]):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def _cuda_ms(fn: Callable[[], object]) -> float:
    """One run of ``fn``, timed with CUDA events (ms)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


LONG_CALL_MS = 20.0
"""A call whose first timed run takes at least this long is timed once: its run-to-run spread
is far below the gaps between backends, and two more runs of a 128k-token prefill cost about a
second per backend."""


def _default_timer(
    name: str, run: Callable[[], object], clock: Callable[[Callable[[], object]], float] = _cuda_ms
) -> float:
    """Warm-up once (cuDNN builds its plan here), then the median of 3 timed runs, or the one
    timed run of a long call (``LONG_CALL_MS``)."""
    run()
    first = clock(run)
    if first >= LONG_CALL_MS:
        return first
    times = sorted([first, clock(run), clock(run)])
    return times[1]


def fastest_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    timer: Callable[[str, Callable[[], object]], float] | None = None,
    **kw: Any,
) -> str | None:
    """The fastest backend for ``F.scaled_dot_product_attention(q, k, v, **kw)`` (measured on
    the first call of its bucket, then remembered), or None where nothing is measured (CPU
    tensors, inside ``torch.compile`` or a CUDA-graph capture: PyTorch's own dispatch).

    Args:
        q, k, v: the call's tensors (the measurement runs on them; nothing is written).
        timer: ``(name, run) -> ms``; default: warm-up once, then the median of 3 runs timed
            with CUDA events (one run for a call of ``LONG_CALL_MS`` or more). Tests pass
            their own.
        **kw: the call's SDPA keywords (``is_causal``, ``attn_mask``, ``scale``,
            ``enable_gqa``).

    Returns:
        A key of ``BACKENDS`` or None.

    Raises:
        RuntimeError: no enabled backend can run the call (PyTorch's own error of the last one).
    """
    choice = _choice(q, k, v, timer, kw)
    return None if choice is None else choice.backend


def _choice(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    timer: Callable[[str, Callable[[], object]], float] | None,
    kw: dict[str, Any],
) -> BackendChoice | None:
    """``fastest_backend``'s whole choice (None: PyTorch's own dispatch, nothing measured)."""
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    key = _key(q, k, v, kw)
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit
    if not q.is_cuda and timer is None:
        return None  # not measured on the CPU: PyTorch's dispatch (tests seed choices)
    _measure(key, q, k, v, timer, kw, "measured on the first call of the bucket")
    return _CHOICES[key]


def _measure(
    key: tuple[Any, ...],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    timer: Callable[[str, Callable[[], object]], float] | None,
    kw: dict[str, Any],
    why: str,
) -> str:
    measure = timer if timer is not None else _default_timer
    with _LOCK:
        times: dict[str, float] = {}
        last_error: RuntimeError | None = None
        for name in key[-1]:  # the enabled backends, math last
            if name == "math" and times:
                continue  # math materialises the scores: only when nothing else runs

            def run(name: str = name) -> Tensor:
                return sdpa(q, k, v, backend=name, **kw)

            try:
                times[name] = float(measure(name, run))
            except RuntimeError as err:  # no kernel of this backend for the call
                last_error = err
        if not times:
            raise RuntimeError(f"no enabled SDPA backend runs this call: {last_error}")
        best = min(times, key=lambda n: times[n])
        _CHOICES[key] = BackendChoice(best, times, why, _dispatch(q, k, v, kw))
    return best


_BY_VALUE = {b.value: name for name, b in BACKENDS.items()}


def _dispatch(q: Tensor, k: Tensor, v: Tensor, kw: dict[str, Any]) -> str | None:
    """The backend PyTorch's own dispatch runs for this call, or None where it cannot say."""
    try:
        value = torch._fused_sdp_choice(  # pyright: ignore[reportPrivateImportUsage]
            q, k, v, kw.get("attn_mask"), float(kw.get("dropout_p", 0.0)),
            bool(kw.get("is_causal", False)), scale=kw.get("scale"),
            enable_gqa=bool(kw.get("enable_gqa", False)),
        )  # fmt: skip
    except (AttributeError, RuntimeError, TypeError):
        return None
    return _BY_VALUE.get(int(value))


def sdpa_auto(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    timer: Callable[[str, Callable[[], object]], float] | None = None,
    **kw: Any,
) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kw)`` on ``fastest_backend``'s choice. If
    the remembered backend refuses this call (something outside the bucket key), the call is
    measured again and the new choice (with the reason) replaces the old one. Where PyTorch's
    own dispatch picks that backend for the bucket (``BackendChoice.dispatch``), SDPA is
    called without forcing it (the same kernel, less host time)."""
    choice = _choice(q, k, v, timer, kw)
    backend = None if choice is None else choice.backend
    if choice is not None and choice.dispatch == backend:
        # PyTorch's dispatch picks the fastest itself: no sdpa_kernel context (host time)
        return F.scaled_dot_product_attention(q, k, v, **kw)
    try:
        return sdpa(q, k, v, backend=backend, **kw)
    except RuntimeError as err:
        if backend is None:
            raise
        why = f"measured again: {backend} refused a later call ({str(err).splitlines()[0][:80]})"
        key = _key(q, k, v, kw)
        _CHOICES.pop(key, None)
        return sdpa(q, k, v, backend=_measure(key, q, k, v, timer, kw, why), **kw)
