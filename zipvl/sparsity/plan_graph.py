"""The plan of one layer as one unit: score -> allocate -> select -> compact, replayed from a CUDA
graph, with one host read, or none where the budget is known on the host.

Run eagerly, ``plan_tokens`` is about sixty small launches and a host read in the middle: at an
8k prompt its host time (about 1.1 ms on an H200) exceeds dense attention itself, while its GPU
work is a fifth of that. ``PlanGraph`` captures the whole fixed-shape part once per input shape
and replays it:

1. the inputs are not copied: with the fused probe scorer (``ProbeScorer.fused_scores``, what
   ``impl="auto"`` runs on CUDA) the kernels read q and k at the addresses held in a two-slot
   device table, which two 8-byte fills point at the call's tensors before each replay (their
   strides are part of the captured shape). Other scorers, and inputs that are not 16-byte
   aligned, are copied into the graph's static buffers (all of ``k``; of ``q`` only the probe
   rows when the scorer is a ``ProbeScorer``, which reads nothing else);
2. one replay scores (the fused probe kernels, which write the mass and Eq. 7's normalized score
   straight into the output buffer), allocates the budget on the device, and builds the keep
   mask and the kept positions of every row in ascending order from the device budget, also in
   place (``plan_keep``: ``TopKSelector.keep_and_indices``, the select kernels up to 128k
   tokens, which rank the raw scores as ``_ranked`` would while they read them; the sort of
   ``keep_mask`` and a running count above; no read);
3. one copy takes every output out of the graph's memory (the next replay overwrites it), and
   (unless the budget is known on the host, below)
   one host read brings back the budget's range, the NaN flag and the rows' kept counts: the
   same checks, the same errors and the same selection as ``plan_scores`` with
   ``TopKSelector`` (both selections are the first ``p`` entries of the stable descending
   order, property-tested).

The kept positions come back with the selection (``Selection.indices`` returns them without
recomputing), so ``sparse_attention`` gathers straight away.

A budget known on the host (``zipvl.sparsity.host_budget``: ``FixedRatioAllocator``, or a
``PerLayerSchedule`` entry that is one) with ``TopKSelector`` needs no read at all: every row
keeps ``clamp(max(budget, |forced|), 0, Skv)`` tokens by construction, so the host sizes the
gathered tensors without waiting, and keeps launching the layer's attention while the GPU
plans. The NaN check of the scores then stays on the device (``Selection.attach_nan_flag``):
``sparse_attention`` writes NaN into the whole output when it is set, instead of the plan
raising.

A layer's shape is captured the second time that layer plans it: a model's first forward at a
new prompt length runs eagerly, its second captures one graph per shape (shared by the layers
when the allocator ignores the layer), and later forwards replay; a prompt length that occurs
once costs nothing extra. At most ``max_shapes`` shapes keep their graphs (least recently used
dropped), because every captured shape holds its outputs (and, where the inputs are copied,
static copies of q and k).
Capture and replay run under the inputs' device (Triton launches on the current device).
Off CUDA, ``capture=False`` runs the same fixed-shape function eagerly: that is what the CPU
tests compare with ``plan_tokens``.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from zipvl.checks import check_int, check_qkv
from zipvl.impl import Impl
from zipvl.sparsity.allocators import CumulativeMassAllocator, FixedRatioAllocator
from zipvl.sparsity.pipeline import TokenPlan, keep_mask_of, plan_keep, read_free_budget
from zipvl.sparsity.scorers import ProbeScorer
from zipvl.sparsity.selectors import TopKSelector, check_budget_read
from zipvl.types import (
    Allocator,
    Scorer,
    Scores,
    Selection,
    Selector,
)

__all__ = [
    "GRAPH_MAX_TOKENS",
    "PlanGraph",
    "graph_plan_problem",
    "graph_plannable",
    "graph_planner",
]

GRAPH_MAX_TOKENS = 65536
"""``plan_impl="auto"`` captures prompts up to this many tokens. Above it the eager plan is
already under 2 % of dense attention (H200: 0.66 % at 128k), and where the inputs are copied
(a scorer other than the fused one, unaligned inputs) the static copies of q and k a captured
shape holds (``B * (Hq + Hkv) * S * D`` elements) are not worth their memory."""

# The components whose calls are known to be capturable (fixed shapes, no host read):
_CAPTURABLE = (ProbeScorer, CumulativeMassAllocator, FixedRatioAllocator, TopKSelector)


def graph_plannable(scorer: Scorer, allocator: Allocator, selector: Selector) -> str | None:
    """Why ``PlanGraph`` cannot plan with these components, or None when it can.

    The rule of ``plan_impl="auto"`` for the components (the rest of the rule is about the call:
    CUDA, no padding, no cross-process reduction, not inside ``torch.compile``): the scorer is a
    ``ProbeScorer`` (either estimator: both run fixed-shape on the device), the allocator a
    ``CumulativeMassAllocator``
    or ``FixedRatioAllocator``, the selector a ``TopKSelector``. A custom component may well be
    capturable; ``plan_impl="graph"`` tries it and raises if the capture fails.
    """
    # exact types: a subclass may read the host or depend on layer_idx
    if type(scorer) is not ProbeScorer:
        return f"scorer: {type(scorer).__name__} is not a ProbeScorer"
    if type(allocator) not in _CAPTURABLE[1:3]:
        return f"allocator: {type(allocator).__name__} is not known to be capturable"
    if type(selector) is not TopKSelector:
        return f"selector: {type(selector).__name__} is not a TopKSelector"
    return None


# Static inputs and the output buffer of a captured shape, shared by every planner that
# captured that shape (all layers of a model, typically): replays run one after another and
# each fills the inputs right before its replay and copies the outputs right after it. The
# planners' entries hold the tensors; this map only lets a second planner find them.
_SHARED: weakref.WeakValueDictionary[tuple, Tensor] = weakref.WeakValueDictionary()


def _shared(key: tuple, make: Any) -> Tensor:
    t = _SHARED.get(key)
    if t is None:
        t = make()
        _SHARED[key] = t
    return t


def _device(dev: torch.device) -> Any:
    """The device guard of a CUDA tensor's device (nothing for another device)."""
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def graph_plan_problem(
    q: Tensor,
    k: Tensor,
    scorer: Scorer,
    allocator: Allocator,
    selector: Selector,
    *,
    padded: bool,
    mass_reduce: object,
    explicit: bool,
) -> str | None:
    """Why a plan cannot (explicit ``"graph"``) or would not (``"auto"``) be replayed from a CUDA
    graph, or None. ``explicit`` skips the checks that only ``"auto"`` makes (the length limit
    and the list of components known to be capturable: an explicit request tries to capture)."""
    if q.shape[-2] != k.shape[-2]:
        sq, skv = q.shape[-2], k.shape[-2]
        return f"q: the graph plans a whole prefill (Sq = Skv = {skv}), got Sq = {sq}"
    if not q.is_cuda:
        return f"q: a CUDA graph needs CUDA tensors, got device {q.device}"
    if torch.compiler.is_compiling():
        return "plan_impl: inside torch.compile (the compiled region is the unit there)"
    if torch.cuda.is_current_stream_capturing():
        return "plan_impl: the stream is already capturing a CUDA graph"
    if padded:
        return "key_valid: padded rows are planned one by one (eagerly)"
    if mass_reduce is not None:
        return "mass_reduce: the cross-process reduction is not captured"
    if explicit:
        return None
    if q.shape[-2] > GRAPH_MAX_TOKENS:
        return f"q: {q.shape[-2]} tokens > GRAPH_MAX_TOKENS = {GRAPH_MAX_TOKENS}"
    return graph_plannable(scorer, allocator, selector)


@dataclass
class _Entry:
    """One captured shape of one planner."""

    q: Tensor | None  # static inputs (shared), None where the inputs are read by address
    k: Tensor | None
    # the probe rows the scorer reads (None: all of q); read by address, the rows the captured
    # kernels index q with: held here so that the graph's address of them stays valid (the
    # scorer's cache of them is bounded and shared by every length)
    q_rows: Tensor | None
    packed: Tensor  # uint8, every output of one replay (shared)
    graph: Any  # torch.cuda.CUDAGraph
    addr: Tensor | None = None  # int64 (2,): q's and k's addresses, where read by address
    slots: tuple[Tensor, Tensor] | None = None  # its two entries (views made once)


_MAX_SEEN = 256  # shapes whose eager calls a planner counts (least recently seen dropped)

_Layout = list[tuple[str, torch.dtype, tuple[int, ...], int, int]]


@functools.lru_cache(maxsize=64)
def _layout(b: int, hkv: int, s: int) -> tuple[_Layout, int]:
    """Name, dtype, shape, byte offset (16-byte aligned) and byte size of every output inside
    one uint8 buffer, and the buffer's size."""
    items = [
        ("mass", torch.float32, (b, hkv, s)),
        ("normalized", torch.float32, (b, hkv, s)),
        ("idx", torch.int64, (b, hkv, s)),
        ("stats", torch.int64, (5,)),
        ("budget", torch.int32, (b, hkv)),
        ("keep", torch.bool, (b, hkv, s)),
        ("nan", torch.bool, ()),  # the read-free plan's NaN flag (it reads no stats)
    ]
    out: _Layout = []
    off = 0
    for name, dtype, shape in items:
        n = 1
        for x in shape:
            n *= x
        nbytes = n * dtype.itemsize
        out.append((name, dtype, shape, off, nbytes))
        off += -(-nbytes // 16) * 16
    return out, off


def _views(packed: Tensor, layout: _Layout) -> dict[str, Tensor]:
    return {
        name: packed[off : off + nbytes].view(dtype).view(shape)
        for name, dtype, shape, off, nbytes in layout
    }


class PlanGraph:
    """``plan_tokens`` of an unpadded prefill as one captured unit (see the module docstring).

    A layer's shape is captured when that layer plans it again (``capture_after`` earlier
    calls of the same layer and shape ran eagerly): a model's first forward at a new prompt
    length runs eagerly in every layer, the second captures once per shape (every layer with an
    allocator that ignores ``layer_idx`` shares that graph; with another allocator each layer
    has its own), later forwards replay.

    Args:
        scorer, allocator, selector: the layer's components. The selector must have the
            fixed-shape ``keep_mask(scores, budget)`` (``TopKSelector`` has it).
        capture: False runs the fixed-shape function eagerly on every call (any device): the
            reference the captured replay is tested against.
        max_shapes: shapes whose graphs are kept (least recently used dropped with all their
            layers' graphs, and their call counts forgotten), >= 1.
        capture_after: eager calls of a (layer, shape) before it is captured, >= 0.

    Attributes:
        replays, captures: how many calls replayed a graph, and how many graphs were captured.

    Raises:
        ValueError: a selector without ``keep_mask``, or a bad ``max_shapes`` / ``capture_after``.
    """

    def __init__(
        self,
        scorer: Scorer,
        allocator: Allocator,
        selector: Selector,
        *,
        capture: bool = True,
        max_shapes: int = 4,
        capture_after: int = 1,
    ) -> None:
        keep_mask_of(selector)  # raises for a selector without one, before any capture
        self.scorer, self.allocator, self.selector = scorer, allocator, selector
        self.capture = bool(capture)
        self.max_shapes = check_int("max_shapes", max_shapes, 1)
        self.capture_after = check_int("capture_after", capture_after, 0)
        # a known allocator ignores layer_idx: its layers share one graph per shape
        self._by_layer = type(allocator) not in (CumulativeMassAllocator, FixedRatioAllocator)
        # shape -> {layer key -> captured graph}; least recently used shape first
        self._entries: OrderedDict[tuple, dict[int | None, _Entry]] = OrderedDict()
        # (shape, layer) -> eager calls so far, for shapes without a graph of that layer
        self._seen: OrderedDict[tuple, int] = OrderedDict()
        self.replays = 0
        self.captures = 0

    def _fused(self, q: Tensor) -> bool:
        """Whether the scorer writes its scores straight into the output buffer and can read
        its inputs by address (``ProbeScorer.fused_scores``)."""
        sc = self.scorer
        return (
            type(sc) is ProbeScorer and sc.denominator == "causal"
            and sc.impl_for(q) is Impl.TRITON
        )  # fmt: skip

    def _by_address(self, q: Tensor, k: Tensor) -> bool:
        """Whether a capture of this call reads its inputs by address (no static copies): the
        fused scorer on CUDA, 16-byte aligned inputs with a last stride of 1 (their strides
        are part of the captured shape)."""
        return (
            q.is_cuda and self._fused(q) and q.stride(-1) == 1 and k.stride(-1) == 1
            and q.data_ptr() % 16 == 0 and k.data_ptr() % 16 == 0
        )  # fmt: skip

    def _static(
        self, q: Tensor, k: Tensor, layer_idx: int | None, out: dict[str, Tensor],
        addr: Tensor | None = None,
    ) -> None:  # fmt: skip
        """Score, allocate, keep-mask and compact into ``out`` (fixed shapes, no host read).
        With ``addr`` the scorer reads the inputs at the addresses it holds (q and k give
        shapes and strides)."""
        if self._fused(q):  # the scorer and the selection write into the buffer in place
            assert isinstance(self.scorer, ProbeScorer)
            sc = self.scorer.fused_scores(
                q, k, mass=out["mass"], normalized=out["normalized"], addr=addr
            )
        else:
            if addr is not None:
                raise ValueError("addr: only the fused probe scorer reads its inputs by address")
            sc = self.scorer(q, k)
            out["mass"].copy_(sc.mass)
            out["normalized"].copy_(sc.normalized)
        rk = plan_keep(
            sc, allocator=self.allocator, selector=self.selector, layer_idx=layer_idx,
            out=(out["keep"], out["idx"]),
        )  # fmt: skip
        budget, keep = rk.budget, rk.keep  # (B, Hkv), (B, Hkv, S)
        read_free = read_free_budget(self.allocator, self.selector, k.shape[-2], layer_idx)
        if read_free is not None:  # nothing but the NaN flag is looked at
            torch.any(sc.normalized.isnan(), out=out["nan"])
        else:
            lo, hi = torch.aminmax(budget.to(torch.int64))
            kept_lo, kept_hi = torch.aminmax(keep.sum(dim=-1).flatten())  # rows' kept counts
            nan = sc.normalized.isnan().any().to(torch.int64)
            out["stats"].copy_(torch.stack([lo, hi, nan, kept_lo, kept_hi]))
        out["budget"].copy_(budget)

    def __call__(self, q: Tensor, k: Tensor, *, layer_idx: int | None = None) -> TokenPlan:
        """Plan one unpadded prefill (one host read, none with a budget known on the host); the
        selection carries its kept positions.

        Args:
            q: (B, Hq, S, D) queries with RoPE applied.
            k: (B, Hkv, S, D) keys with RoPE applied.
            layer_idx: passed to the allocator.

        Returns:
            ``TokenPlan`` (scores, budget, selection) equal to ``plan_tokens``'s. With a budget
            known on the host and ``TopKSelector`` nothing is read (the selection carries the
            NaN flag instead).

        Raises:
            ValueError: as ``plan_scores`` with ``TopKSelector`` (the non-finite-mass sentinel,
                NaN scores, a budget that differs between rows or lies outside [0, Skv]; a
                read-free plan raises none of these: its NaN flag travels with the selection),
                rows of a custom selector that keep different counts, bad shapes, or a capture
                that fails (naming the components).
        """
        check_qkv(q, k)
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(
                f"q: PlanGraph plans a prefill (Sq = Skv = {k.shape[-2]}), got Sq = {q.shape[-2]}"
            )
        b, hkv, s = k.shape[0], k.shape[1], k.shape[-2]
        layout, nbytes = _layout(b, hkv, s)
        # inputs read by address bake their strides into the graph: part of the shape
        by_addr = self.capture and self._by_address(q, k)
        strides = (q.stride(), k.stride()) if by_addr else None
        shape = (tuple(q.shape), tuple(k.shape), q.dtype, k.dtype, q.device, strides)
        layer = layer_idx if self._by_layer else None
        graphs = self._entries.get(shape)
        entry = None if graphs is None else graphs.get(layer)
        if entry is None and self.capture and q.is_cuda:
            # counted per layer even where the layers share a graph: a length a model
            # prefills once runs eagerly in every layer, and is captured in its second forward
            seen = self._seen.pop((shape, layer_idx), 0)
            if seen >= self.capture_after:
                entry = self._capture(shape, layer, q, k, layer_idx, nbytes, layout, by_addr)
            else:
                self._seen[(shape, layer_idx)] = seen + 1  # most recent last
                while len(self._seen) > _MAX_SEEN:  # lengths seen once do not accumulate
                    self._seen.popitem(last=False)
        if entry is None:  # eager: the same function on fresh buffers
            packed = torch.empty(nbytes, dtype=torch.uint8, device=k.device)
            self._static(q, k, layer_idx, _views(packed, layout))
        else:
            self._entries.move_to_end(shape)
            with _device(q.device):
                self._fill(entry, q, k)
                entry.graph.replay()
                packed = entry.packed.clone()  # one copy out: the next replay overwrites it
            self.replays += 1
        return self._result(_views(packed, layout), s, layer_idx)

    @staticmethod
    def _fill(entry: _Entry, q: Tensor, k: Tensor) -> None:
        if entry.slots is not None:  # two fills of 8 bytes, in stream order before the replay
            entry.slots[0].fill_(q.data_ptr())
            entry.slots[1].fill_(k.data_ptr())
            return
        assert entry.q is not None and entry.k is not None
        entry.k.copy_(k)
        if entry.q_rows is None:
            entry.q.copy_(q)
        else:
            entry.q.index_copy_(2, entry.q_rows, q.index_select(2, entry.q_rows))

    def _capture(
        self, shape: tuple, layer: int | None, q: Tensor, k: Tensor, layer_idx: int | None,
        nbytes: int, layout: _Layout, by_addr: bool,
    ) -> _Entry:  # fmt: skip
        q_rows = None
        if isinstance(self.scorer, ProbeScorer):
            q_rows = self.scorer.probe_rows(q.shape[-2], device=q.device)
        dev = q.device
        # normal tensors even under inference_mode: later calls outside it write into them
        with torch.inference_mode(False):
            packed = _shared(
                ("out", *shape), lambda: torch.zeros(nbytes, dtype=torch.uint8, device=dev)
            )
            if by_addr:  # the kernels read the inputs where the two slots point
                table = torch.zeros(2, dtype=torch.int64, device=dev)
                entry = _Entry(q=None, k=None, q_rows=q_rows, packed=packed, graph=None,
                               addr=table, slots=(table[0], table[1]))  # fmt: skip
            else:
                entry = _Entry(
                    q=_shared(("q", *shape),
                              lambda: torch.zeros(q.shape, dtype=q.dtype, device=dev)),
                    k=_shared(("k", *shape),
                              lambda: torch.zeros(k.shape, dtype=k.dtype, device=dev)),
                    q_rows=q_rows, packed=packed, graph=None,
                )  # fmt: skip
            views = _views(entry.packed, layout)
        with _device(dev):  # Triton launches on the current device
            self._fill(entry, q, k)
            entry.graph = self._record(entry, layer_idx, views, q, k)
        if shape not in self._entries:  # a new shape: drop the least recently used ones
            while len(self._entries) >= self.max_shapes:
                old, _ = self._entries.popitem(last=False)
                for key in [key for key in self._seen if key[0] == old]:
                    del self._seen[key]  # an evicted shape earns its capture again
            self._entries[shape] = {}
        self._entries[shape][layer] = entry
        self.captures += 1
        return entry

    def _record(
        self, entry: _Entry, layer_idx: int | None, views: dict[str, Tensor], q: Tensor,
        k: Tensor,
    ) -> Any:  # fmt: skip
        """Warm up on a side stream, then capture ``_static`` on the static buffers (on the
        call's own q and k, for their shapes and strides, where they are read by address)."""
        addr = entry.addr
        if addr is None:
            assert entry.q is not None and entry.k is not None
            q, k = entry.q, entry.k
        dev = k.device
        current = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):  # warm-up: kernel compiles, cached probe rows
                self._static(q, k, layer_idx, views, addr)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device=dev)):
                self._static(q, k, layer_idx, views, addr)
        except RuntimeError as err:
            torch.cuda.set_stream(current)  # a failed capture may leave its stream current
            raise ValueError(
                "plan_impl: 'graph' could not capture the plan of "
                f"{type(self.scorer).__name__} / {type(self.allocator).__name__} / "
                f"{type(self.selector).__name__} (a host read or a host tensor inside one of "
                f"them?): {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from err
        return graph

    def _result(self, out: dict[str, Tensor], s: int, layer_idx: int | None) -> TokenPlan:
        scores = Scores(mass=out["mass"], normalized=out["normalized"])
        known = read_free_budget(self.allocator, self.selector, s, layer_idx)
        if known is not None:
            assert isinstance(self.selector, TopKSelector)
            # Every row keeps kept_count(Skv, budget) tokens by construction (keep_and_indices,
            # property-tested), and the budget is a host int: no read. The NaN check stays on
            # the device and travels with the selection (sparse_attention turns the output into
            # NaN when it is set).
            num_kept = self.selector.kept_count(s, known)
            sel = Selection(keep=out["keep"], num_kept=num_kept).check_counts(
                count_range=(num_kept, num_kept)
            )
            sel.attach_indices(out["idx"][..., :num_kept])
            sel.attach_nan_flag(out["nan"])
            return TokenPlan(scores=scores, budget=out["budget"], selection=sel)
        p_min, p_max, has_nan, kept_lo, kept_hi = out["stats"].tolist()  # the one host read
        check_budget_read(p_min, p_max, has_nan, s)
        forced = getattr(self.selector, "num_forced", None)
        n_forced = int(cast(int, forced(s))) if callable(forced) else 0
        num_kept = min(max(int(p_max), n_forced), s)
        # TopKSelector.keep_mask keeps clamp(max(budget, |forced|), 0, Skv) per row; any
        # selector's rows are checked here from the counts read with the budget
        sel = Selection(keep=out["keep"], num_kept=num_kept).check_counts(
            count_range=(int(kept_lo), int(kept_hi))
        )
        sel.attach_indices(out["idx"][..., :num_kept])
        return TokenPlan(scores=scores, budget=out["budget"], selection=sel)


# One planner per set of components (frozen dataclasses: equal components share one), at most
# _MAX_PLANNERS of them (least recently used dropped).
_PLANNERS: OrderedDict[tuple, PlanGraph] = OrderedDict()
_MAX_PLANNERS = 16


def _component_key(component: object) -> object:
    """A component as a registry key: itself where it hashes (equal frozen dataclasses share a
    planner), its identity otherwise (the planner keeps it alive, so the id stays its own)."""
    try:
        hash(component)
    except TypeError:
        return ("id", id(component))
    return component


def graph_planner(scorer: Scorer, allocator: Allocator, selector: Selector) -> PlanGraph:
    """The shared ``PlanGraph`` of these components (made on first use)."""
    key = tuple(_component_key(c) for c in (scorer, allocator, selector))
    planner = _PLANNERS.get(key)
    if planner is None:
        planner = PlanGraph(scorer, allocator, selector)
        _PLANNERS[key] = planner
        while len(_PLANNERS) > _MAX_PLANNERS:
            _PLANNERS.popitem(last=False)
    _PLANNERS.move_to_end(key)
    return planner
