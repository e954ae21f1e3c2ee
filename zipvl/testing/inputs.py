"""Seeded input factories for attention tests and benchmarks (nothing is downloaded).

Tensors are drawn on the CPU with an explicit ``torch.Generator`` and then moved, so the same seed
gives the same values on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PlantedInputs", "planted_qkv", "random_qkv", "random_scores", "with_outlier_channel"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def random_qkv(
    b: int,
    hq: int,
    hkv: int,
    s: int,
    d: int,
    *,
    dv: int | None = None,
    sq: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Standard-normal q, k, v.

    Args:
        b, hq, hkv, s, d: batch, query heads, KV heads, key length, head dim.
        dv: value head dim (default ``d``).
        sq: query length (default ``s``).
        dtype, device: of the results.
        seed: generator seed.

    Returns:
        q (B, Hq, Sq, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv).
    """
    g = _gen(seed)
    q = torch.randn(b, hq, sq if sq is not None else s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, dv if dv is not None else d, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))  # type: ignore[return-value]


def with_outlier_channel(
    q: Tensor, k: Tensor, value: float, *, channel: int = 0
) -> tuple[Tensor, Tensor]:
    """Copies of q and k whose ``channel`` is ``value`` everywhere (LLM "massive activations").

    Every logit gains the same ``value**2`` (times the scale), which the softmax cancels, so the
    attention pattern is unchanged in exact arithmetic; with ``value = 300`` the raw q.k (9e4)
    overflows fp16 while the scaled logits stay far inside fp32's range.

    Args:
        q: (B, Hq, Sq, D).
        k: (B, Hkv, Skv, D).
        value: the outlier value.
        channel: which head-dim channel, in [0, D).

    Returns:
        (q', k') of the same shapes and dtypes.
    """
    q, k = q.clone(), k.clone()
    q[..., channel] = value
    k[..., channel] = value
    return q, k


def random_scores(
    b: int,
    hkv: int,
    s: int,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    ties: bool = False,
) -> Tensor:
    """Random (B, Hkv, S) float32 scores; ``ties=True`` draws from a few values to force ties."""
    g = _gen(seed)
    if ties:
        x = torch.randint(0, 4, (b, hkv, s), generator=g).float()
    else:
        x = torch.randn(b, hkv, s, generator=g)
    return x.to(device)


@dataclass(frozen=True)
class PlantedInputs:
    """Inputs with a known set of important keys.

    Attributes:
        q: (B, Hq, S, D).
        k: (B, Hkv, S, D).
        v: (B, Hkv, S, D).
        important: (S,) bool, the planted key positions (the same for every batch row and head).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    important: Tensor


def planted_qkv(
    b: int,
    hq: int,
    hkv: int,
    s: int,
    d: int,
    *,
    num_important: int,
    logit_gap: float = 12.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> PlantedInputs:
    """q/k/v where a known subset of keys takes almost all attention.

    Every query and every important key share one random unit direction ``u`` per KV head; other
    keys are small noise orthogonal to ``u``. The logit of an important key exceeds that of any
    other key by about ``logit_gap`` (with the default 1/sqrt(D) scale), so each query spreads
    nearly all its attention over the important keys it can see. Position 0 is always important
    so every query sees at least one.

    Args:
        b, hq, hkv, s, d: shapes (D >= 2).
        num_important: size of the planted set, in [1, S].
        logit_gap: margin of the important keys' logits over the others.
        dtype, device: of the results.
        seed: generator seed.

    Returns:
        ``PlantedInputs``.
    """
    if not 1 <= num_important <= s:
        raise ValueError(f"num_important: expected an int in [1, S={s}], got {num_important}")
    g = _gen(seed)
    u = torch.nn.functional.normalize(torch.randn(hkv, d, generator=g), dim=-1)  # (Hkv, D)
    amp = (logit_gap * d**0.5) ** 0.5  # q.k = amp^2 and the scale 1/sqrt(D) gives logit_gap
    rest = torch.randperm(s - 1, generator=g)[: num_important - 1] + 1
    important = torch.zeros(s, dtype=torch.bool)
    important[0] = True
    important[rest] = True

    def orthogonal_noise(shape: tuple[int, ...], sigma: float) -> Tensor:
        x = torch.randn(*shape, generator=g) * sigma  # (B, Hkv, ..., D)
        uu = u.view(1, hkv, *([1] * (len(shape) - 3)), d)
        return x - (x * uu).sum(-1, keepdim=True) * uu

    gq = hq // hkv
    q = amp * u.view(1, hkv, 1, 1, d) + orthogonal_noise((b, hkv, gq, s, d), 0.3)
    q = q.reshape(b, hq, s, d)  # (B, Hq, S, D)
    k = orthogonal_noise((b, hkv, s, d), 0.3)  # (B, Hkv, S, D)
    k = k + important.view(1, 1, s, 1) * amp * u.view(1, hkv, 1, d)
    v = torch.randn(b, hkv, s, d, generator=g)
    return PlantedInputs(
        q=q.to(device=device, dtype=dtype),
        k=k.to(device=device, dtype=dtype),
        v=v.to(device=device, dtype=dtype),
        important=important.to(device),
    )
