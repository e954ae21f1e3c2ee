"""Input validation at the public boundary, written once.

Every check raises ``ValueError`` (or ``TypeError`` for a wrong type) whose message names the
argument and states what was expected and what was given.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
from torch import Tensor

__all__ = [
    "check_buffer",
    "check_fraction",
    "check_int",
    "check_qkv",
    "check_same_device",
    "check_scale",
    "check_tensor",
]


def check_tensor(
    name: str,
    x: object,
    *,
    ndim: int | None = None,
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = None,
    floating: bool = False,
) -> Tensor:
    """Check that ``x`` is a tensor of the given rank / dtype; return it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-D tensor, got shape {tuple(x.shape)} ({x.ndim}-D)"
        )
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if x.dtype not in allowed:
            names = ", ".join(str(d) for d in allowed)
            raise ValueError(f"{name}: expected dtype in ({names}), got {x.dtype}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    return x


def check_buffer(
    name: str,
    t: Tensor | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """A tensor a kernel writes into or reads whole (an output buffer, a workspace, a table):
    contiguous, of exactly ``shape``, ``dtype`` and ``device``. None passes (the callee makes
    its own)."""
    if t is None:
        return
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device or (
        not t.is_contiguous()
    ):  # fmt: skip
        layout = "" if t.is_contiguous() else "non-contiguous "
        raise ValueError(
            f"{name}: expected a contiguous {tuple(shape)} {_dtype(dtype)} tensor on {device}, "
            f"got a {layout}{tuple(t.shape)} {_dtype(t.dtype)} tensor on {t.device}"
        )


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_same_device(**tensors: Tensor) -> None:
    """All tensors on one device; the message lists each argument's device."""
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"expected all tensors on one device, got {listing}")


def check_fraction(name: str, value: float, *, low_open: bool = True) -> float:
    """A number in (0, 1] (or [0, 1] with ``low_open=False``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        rng = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name}: expected a value in {rng}, got {value}")
    return float(value)


@overload
def check_int(name: str, value: object, minimum: int, optional: Literal[False] = False) -> int: ...


@overload
def check_int(name: str, value: object, minimum: int, optional: bool) -> int | None: ...


def check_int(name: str, value: object, minimum: int, optional: bool = False) -> int | None:
    """An int (not a bool) >= ``minimum``; None passes when ``optional``. Returns the value.

    Raises:
        TypeError: ``value`` is not an int (a bool or a float such as ``16.0`` included).
        ValueError: ``value < minimum``.
    """
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "an int or None" if optional else "an int"
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_scale(name: str, value: object) -> float | None:
    """A softmax scale: a positive, finite real number, or None (= 1 / sqrt(D)).

    Raises:
        TypeError: ``value`` is not a real number (bools are rejected).
        ValueError: ``value`` is 0, negative, NaN or infinite.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name}: expected a positive float or None, got {type(value).__name__} {value!r}"
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a positive float or None (finite), got {value!r}")
    return float(value)


def check_qkv(q: Tensor, k: Tensor, v: Tensor | None = None) -> tuple[int, int, int]:
    """Validate q (B, Hq, Sq, D), k/v (B, Hkv, Skv, D) for GQA attention.

    Returns:
        (B, Hq, Hkv).
    """
    check_tensor("q", q, ndim=4, floating=True)
    check_tensor("k", k, ndim=4, floating=True)
    tensors = {"q": q, "k": k}
    if v is not None:
        check_tensor("v", v, ndim=4, floating=True)
        tensors["v"] = v
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(
                f"v: expected shape (B, Hkv, Skv, *) = {tuple(k.shape[:3])} like k, "
                f"got {tuple(v.shape)}"
            )
        if v.dtype != k.dtype:
            raise ValueError(f"v: expected dtype {k.dtype} like k, got {v.dtype}")
    check_same_device(**tensors)
    if q.dtype != k.dtype:
        raise ValueError(f"k: expected dtype {q.dtype} like q, got {k.dtype}")
    b, hq, _, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"k: expected batch size {b} like q, got {k.shape[0]}")
    if k.shape[-1] != d:
        raise ValueError(f"k: expected head dim {d} like q, got {k.shape[-1]}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"k: the number of KV heads ({hkv}) must divide the number of query heads ({hq}) "
            "for grouped-query attention"
        )
    return b, hq, hkv
