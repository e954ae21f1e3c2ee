"""The one vocabulary of implementations: ``Impl``, the values each operation accepts, and
``parse_impl``, the one parser every public entry point uses.

This module imports nothing but the standard library, so that the console script can name the
choices without importing torch. ``zipvl.types`` re-exports ``Impl`` and ``parse_impl``.

``Impl`` is a ``str`` enum: ``"sdpa"`` and ``Impl.SDPA`` are interchangeable wherever an impl is
taken, and compare equal. An explicitly requested impl never falls back: one that cannot run
raises ``ValueError``. ``Impl.AUTO`` is the only place a choice is made, by a rule each operation
documents and exposes (see the table below).

=========================================  ==================================  ==============
operation (argument)                        accepts                             default
=========================================  ==================================  ==============
``sparse_attention(impl=)``,                ``SPARSE_ATTENTION_IMPLS``          ``"auto"``
``ZipVLConfig.impl``
``sparse_attention(copy_impl=)``            ``COPY_IMPLS``                      ``"auto"``
``ProbeScorer.impl``                        ``SCORER_IMPLS``                    ``"auto"``
``quantize_pack(impl=)``, quantizers'       ``QUANT_IMPLS``                     ``"reference"``
``token_wise_impl``, ``ZipVLConfig.
quant_impl``, ``zipvl demo --quant-impl``
``decode_attention(impl=)``,                ``DECODE_IMPLS``                    ``"auto"``
``ZipVLConfig.decode_impl``
``plan_tokens(impl=)``,                     ``PLAN_IMPLS``                      ``"auto"``
``ZipVLConfig.plan_impl``
``PagedKVStore(write_impl=)``,              ``PAGE_WRITE_IMPLS``                ``"auto"``
``ZipVLConfig.page_write_impl``
=========================================  ==================================  ==============

The ``"auto"`` rules: ``sparse_attention`` runs the ``"sdpa"`` path with every SDPA call on the
backend ``zipvl.sparsity.sdpa_backend.fastest_backend`` measured for its shape bucket (PyTorch's
own dispatch on the CPU, inside ``torch.compile`` and during CUDA-graph capture), and its
gather and scatter (``copy_impl``) in Triton (``zipvl.sparsity.gather_triton``: one launch each)
exactly when ``zipvl.sparsity.attention.triton_copy_problem`` finds nothing against it and the
tensors are on CUDA (eager calls of the ``"sdpa"``/``"auto"`` path with ``unkept="zero"``; the
Triton interpreter's CPU runs only when asked for), in PyTorch (``"torch"``) otherwise;
``ProbeScorer.impl_for(q)`` returns what a call picks (``"triton"`` for
eager CUDA inputs with a power-of-two D >= 16, ``"torch"`` otherwise); ``decode_attention`` runs
``"triton"`` exactly when ``zipvl.decode.fused_decode_problem(q, store)`` is None (CUDA, or the
Triton interpreter; one query per row; a head dim the kernel reads) and ``"reference"``
otherwise; ``plan_tokens`` replays the plan from a CUDA graph (``"graph"``) exactly when
``zipvl.sparsity.plan_graph.graph_plan_problem`` finds nothing against it (eager CUDA inputs
without padding or a cross-process reduction, at most ``GRAPH_MAX_TOKENS`` tokens, components
known to be capturable) and runs it eagerly (``"torch"``) otherwise; a paged cache writes its
pages with one Triton launch per class (``"triton"``, ``zipvl.cache.page_triton``) exactly when
``page_write_problem`` finds nothing against it for a CUDA store (a power-of-two page size and
head dim), in PyTorch (``"reference"``) otherwise.
"""

from __future__ import annotations

import enum
from collections.abc import Collection

__all__ = [
    "COPY_IMPLS",
    "DECODE_IMPLS",
    "PAGE_WRITE_IMPLS",
    "PLAN_IMPLS",
    "QUANT_IMPLS",
    "SCORER_IMPLS",
    "SPARSE_ATTENTION_IMPLS",
    "Impl",
    "parse_impl",
]


class Impl(str, enum.Enum):
    """Implementation selector of a public operation. A requested impl never falls back."""

    AUTO = "auto"  # a documented choice among the others, made where the operation runs
    REFERENCE = "reference"  # dense, eager, the oracle
    TORCH = "torch"  # plain PyTorch (any device, traceable by torch.compile)
    FLEX = "flex"  # gather + FlexAttention
    SDPA = "sdpa"  # gather + scaled_dot_product_attention
    TRITON = "triton"  # hand-written Triton kernel
    GRAPH = "graph"  # replayed from a captured CUDA graph

    def __str__(self) -> str:  # "sdpa", not "Impl.SDPA", in messages and f-strings
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


SPARSE_ATTENTION_IMPLS: tuple[Impl, ...] = (Impl.AUTO, Impl.SDPA, Impl.FLEX, Impl.REFERENCE)
"""``zipvl.sparsity.sparse_attention`` and ``ZipVLConfig.impl`` (the first is the default)."""

COPY_IMPLS: tuple[Impl, ...] = (Impl.AUTO, Impl.TORCH, Impl.TRITON)
"""``sparse_attention(copy_impl=)``: the gather of the kept rows and the scatter of the output
(the first is the default)."""

SCORER_IMPLS: tuple[Impl, ...] = (Impl.AUTO, Impl.TORCH, Impl.TRITON)
"""``ProbeScorer.impl`` (the first is the default)."""

QUANT_IMPLS: tuple[Impl, ...] = (Impl.REFERENCE, Impl.TRITON)
"""``quantize_pack``, the quantizers' ``token_wise_impl``, ``ZipVLConfig.quant_impl`` and the
demo's ``quant_impl`` (the first is the default)."""

PLAN_IMPLS: tuple[Impl, ...] = (Impl.AUTO, Impl.TORCH, Impl.GRAPH)
"""``zipvl.sparsity.plan_tokens(impl=)`` and ``ZipVLConfig.plan_impl`` (the first is the
default)."""

DECODE_IMPLS: tuple[Impl, ...] = (Impl.AUTO, Impl.TRITON, Impl.REFERENCE)
"""``zipvl.decode.decode_attention`` and ``ZipVLConfig.decode_impl`` (the first is the
default)."""

PAGE_WRITE_IMPLS: tuple[Impl, ...] = (Impl.AUTO, Impl.TRITON, Impl.REFERENCE)
"""How a paged cache writes pages (``PagedKVStore(write_impl=)``, ``ZipVLConfig.page_write_impl``;
the first is the default)."""


def parse_impl(name: str, value: object, allowed: Collection[Impl]) -> Impl:
    """The ``Impl`` that ``value`` names, if ``allowed``.

    Args:
        name: the argument's name, for the message (``"impl"``, ``"decode_impl"``, ...).
        value: an ``Impl`` or its string spelling (``"sdpa"``).
        allowed: the impls the operation accepts, in the order the message lists them.

    Returns:
        The ``Impl`` member.

    Raises:
        ValueError: ``value`` is not the spelling of an allowed impl; the message names the
            argument and lists the allowed values, e.g.
            ``impl: expected one of 'sdpa', 'flex', 'reference', got 'triton'``.
    """
    try:
        impl = Impl(value)
    except (ValueError, TypeError):
        impl = None
    if impl is None or impl not in allowed:
        names = ", ".join(repr(Impl(a).value) for a in allowed)
        got = value.value if isinstance(value, Impl) else value
        raise ValueError(f"{name}: expected one of {names}, got {got!r}")
    return impl
