"""The fastest ``scaled_dot_product_attention`` backend for a call, measured once per shape bucket.

PyTorch's SDPA picks a backend by a fixed priority, not by speed. On an H200 (torch 2.11, LongVA
heads) cuDNN is about 1.3x faster than flash for causal prefill and 3-5x slower for one-query
decode over a growing cache (it plans every new key length), so no fixed order is right for
both. ``fastest_backend`` times every backend that can run a call (cuDNN, flash, memory-efficient,
math; only those the caller left enabled, e.g. inside ``torch.nn.attention.sdpa_kernel``) the
first time a shape bucket is seen, and remembers the winner:

* bucket = (device, dtype, Hq, Hkv, D, Dv, causal, masked, Sq and Skv rounded up to a power of
  two, B): one measurement per bucket, a few ms, with host syncs (like Triton's autotuning);
* no measurement on the CPU, while compiling or while a CUDA graph is being captured: those calls
  use PyTorch's own dispatch (``None``), and say so in ``choices()``.

``sdpa(q, k, v, backend=..., **kw)`` runs one call on a chosen backend. ``choices()`` lists what
was chosen (benchmarks print it next to their tables).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["BACKENDS", "BackendChoice", "choices", "clear_choices", "fastest_backend", "sdpa"]

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
    """

    backend: str | None
    times_ms: dict[str, float]
    why: str


_CHOICES: dict[tuple[Any, ...], BackendChoice] = {}


def _bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _key(q: Tensor, k: Tensor, v: Tensor, causal: bool, masked: bool) -> tuple[Any, ...]:
    return (str(q.device), q.dtype, q.shape[0], q.shape[1], k.shape[1], q.shape[-1],
            v.shape[-1], causal, masked, _bucket(q.shape[-2]), _bucket(k.shape[-2]))  # fmt: skip


def choices() -> dict[str, BackendChoice]:
    """Every choice made so far, keyed by a readable description of its bucket."""
    out = {}
    for key, choice in _CHOICES.items():
        dev, dtype, b, hq, hkv, d, dv, causal, masked, sq, skv = key
        flags = (" causal" if causal else "") + (" masked" if masked else "")
        name = (f"{dev} {str(dtype).removeprefix('torch.')} B={b} Hq={hq} Hkv={hkv} D={d} "
                f"Dv={dv} Sq<={sq} Skv<={skv}{flags}")  # fmt: skip
        out[name] = choice
    return out


def clear_choices() -> None:
    """Forget every choice (the next call of each bucket measures again)."""
    _CHOICES.clear()


def sdpa(q: Tensor, k: Tensor, v: Tensor, *, backend: str | None, **kw: Any) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kw)`` on ``backend`` (None: PyTorch's own
    dispatch). A named backend that cannot run the call raises (PyTorch's RuntimeError)."""
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {sorted(BACKENDS)} or None, got {backend!r}")
    with sdpa_kernel([BACKENDS[backend]]):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def _cuda_median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _default_timer(name: str, run: Callable[[], object]) -> float:
    run()  # warm-up (cuDNN builds its plan here)
    return _cuda_median_ms(run, 3)


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
            with CUDA events. Tests pass their own.
        **kw: the call's SDPA keywords (``is_causal``, ``attn_mask``, ``scale``,
            ``enable_gqa``).

    Returns:
        A key of ``BACKENDS`` or None.

    Raises:
        RuntimeError: no enabled backend can run the call (PyTorch's own error of the last one).
    """
    causal = bool(kw.get("is_causal", False))
    masked = kw.get("attn_mask") is not None
    key = _key(q, k, v, causal, masked)
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit.backend
    if not q.is_cuda and timer is None:
        return None  # not remembered: a CPU call costs nothing to decide
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    measure = timer if timer is not None else _default_timer

    times: dict[str, float] = {}
    last_error: RuntimeError | None = None
    for name in BACKENDS:
        if not _ENABLED[name]():
            continue

        def run(name: str = name) -> Tensor:
            return sdpa(q, k, v, backend=name, **kw)

        try:
            times[name] = float(measure(name, run))
        except RuntimeError as err:  # no kernel of this backend for the call
            last_error = err
    if not times:
        raise RuntimeError(f"no enabled SDPA backend runs this call: {last_error}")
    best = min(times, key=lambda n: times[n])
    _CHOICES[key] = BackendChoice(best, times, "measured on the first call of the bucket")
    return best
