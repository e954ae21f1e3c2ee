"""A transformers model's decode step replayed from a CUDA graph.

An eager decode step of a 7B model at batch 1 is host-bound: the GPU work of one token is a few
milliseconds, the Python of 28 layers (transformers' modules, the cache, the attention function,
the kernel launcher) costs several times that. ``GraphDecoder`` records one decode step of a
model (one token per row) into a CUDA graph and replays it for every later token, so the host
only copies the new token ids in, replays, and does the cache's host bookkeeping.

With a ``ZipVLCache`` (``zipvl.enable``) the step is split in two halves:

* recorded (replayed on the GPU): every layer's append of the new K/V at the device-side tail
  count (``PagedKVStore.append_device``) and the fused decode kernel over the pages, which
  reads page tables, counts and pointers from device memory;
* on the host after every replay: each layer's ``advance(1)``, and for each layer whose
  full-precision tail reached a block of ``recompress_every`` tokens, the decode-block
  recompression (``compress_tail``) from that step's query and log-sum-exp, eagerly, exactly
  what the eager step does at that point.

A recorded step is valid while the cache's buffers keep their addresses and sizes (the
kernel's address table). A pool that grows, a reorder (beam search), a crop or a new batch
size changes them: the decoder notices before the next step (it compares the address tables),
runs that step eagerly (which rebuilds the table and compiles nothing new) and records again
at the step after. With a transformers ``StaticCache`` (the dense baseline under the same
capture) nothing is done on the host: the cache position drives everything.

Usage::

    cache = zipvl.new_cache(model)
    logits = model(input_ids=prompt, use_cache=True, **zipvl.cache_kwargs(model, cache)).logits
    step = GraphDecoder(model, cache)
    tok = logits[:, -1:].argmax(-1)
    for _ in range(n):
        tok = step(tok)[:, -1:].argmax(-1)

or ``with zipvl.cuda_graph_decode(model, cache): model.generate(...)``, which routes every
one-token step that ``generate`` takes with that cache through the decoder.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from zipvl.cache import PagedCacheLayer, ZipVLCache
from zipvl.cache.graph_step import recorded_step
from zipvl.cache.hf_compat import Cache
from zipvl.cache.paged_layer import DECODE
from zipvl.models.cache_arg import cache_argument

__all__ = ["CUDARecorder", "GraphDecoder", "Recorder", "cuda_graph_decode"]


class Recorder(Protocol):
    """Records a step once and replays it (``CUDARecorder``; the CPU tests use a stand-in)."""

    def record(self, fn: Callable[[], Any]) -> Any:
        """Record ``fn`` and return what it returned (static outputs)."""
        ...

    def replay(self) -> None:
        """Run the recorded step again."""
        ...

    def eager(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` as an ordinary (unrecorded) step."""
        ...


class CUDARecorder:
    """One CUDA graph. Eager steps run on the capture stream (the warm-up that the capture of
    cuBLAS and Triton launches needs happens there, on the step that precedes a capture)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _on_stream(self, fn: Callable[[], Any]) -> Any:
        cur = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(cur)
        try:
            with torch.cuda.stream(self.stream):
                return fn()
        finally:
            cur.wait_stream(self.stream)

    def eager(self, fn: Callable[[], Any]) -> Any:
        return self._on_stream(fn)

    def record(self, fn: Callable[[], Any]) -> Any:
        self.graph = None  # the previous recording's memory goes back to the allocator
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):  # its own private memory pool
            out = fn()
        self.graph = graph
        return out

    def replay(self) -> None:
        if self.graph is None:
            raise RuntimeError("replay: nothing recorded")
        self.graph.replay()


class GraphDecoder:
    """One-token decode steps of a transformers causal LM, recorded once and replayed.

    Args:
        model: a transformers causal LM (its ``forward`` takes ``input_ids``, ``position_ids``,
            ``use_cache``, ``logits_to_keep`` and the cache).
        cache: the ``ZipVLCache`` bound to ``model`` by ``zipvl.enable`` (after the prefill),
            or a transformers ``StaticCache``.
        recorder: how steps are recorded; None: ``CUDARecorder`` (CUDA graphs, the model on a
            CUDA device). The CPU tests pass a stand-in that re-runs the recorded step.

    Attributes:
        stats: ``records`` (captures), ``replays``, ``eager`` (steps run unrecorded: the
            first one, and the one after every change of the cache's buffers),
            ``recompressions`` (decode blocks compressed on the host after replays).

    Raises:
        ValueError: a cache of another kind, a ZipVL cache not bound to ``model``, or a model
            whose ``forward`` does not take the arguments above; no CUDA device with the
            default recorder.
    """

    def __init__(
        self, model: nn.Module, cache: Cache, *, recorder: Recorder | None = None
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected a transformers model, got {type(model).__name__}")
        params = inspect.signature(model.forward).parameters
        self.cache_kw = cache_argument(model.forward)
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        named = ("position_ids", "use_cache", "logits_to_keep")  # or through **kwargs
        missing = [n for n in ("input_ids", self.cache_kw) if n not in params]
        missing += [n for n in named if n not in params and not var_kw]
        if missing:
            raise ValueError(
                f"model: its forward does not take {missing}; GraphDecoder drives a transformers "
                "causal LM"
            )
        self.takes_cache_position = "cache_position" in params
        # Qwen2-VL-style multi-section rotary positions (their decoder keeps rope_deltas)
        self._mrope = any(hasattr(m, "rope_deltas") for m in model.modules())
        self.model = model
        self._fwd = model.forward  # its own forward (cuda_graph_decode wraps model.forward)
        self.cache = cache
        self.zipvl = isinstance(cache, ZipVLCache)
        if self.zipvl:
            from zipvl.models.hf import bound_cache

            if bound_cache(model) is not cache:
                raise ValueError(
                    "cache: expected the ZipVLCache bound to this model (zipvl.enable(model) "
                    "returns it; zipvl.new_cache(model) binds a new one), got another cache"
                )
        elif type(cache).__name__ != "StaticCache":
            raise ValueError(
                f"cache: expected a ZipVLCache or a transformers StaticCache (fixed addresses), "
                f"got {type(cache).__name__}"
            )
        device = next(model.parameters()).device
        if recorder is None:
            if device.type != "cuda":
                raise ValueError(
                    f"model: the default recorder records CUDA graphs, the model is on {device}"
                )
            recorder = CUDARecorder(device)
        self.device = device
        self.recorder = recorder
        self.stats = {"records": 0, "replays": 0, "eager": 0, "recompressions": 0}
        self._key: tuple[Any, ...] | None = None  # what the recorded step was recorded for
        self._eager_key: tuple[Any, ...] | None = None  # buffers the last eager step read
        self._static: dict[str, Tensor] = {}
        self._logits: Tensor | None = None
        self._out_type: type | None = None
        self._step_tokens: list[int] = []
        self._step_inputs: list[tuple[Tensor, Tensor, float | None]] = []
        self._stores: list[Any] = []

    def _check_bound(self) -> None:
        """A ZipVL cache must still be the one the model's attention reads (new_cache(model)
        or disable(model) since the decoder was made would leave a replay on a stale cache)."""
        if not self.zipvl:
            return
        from zipvl.models.hf import bound_cache, is_enabled

        if not is_enabled(self.model) or bound_cache(self.model) is not self.cache:
            raise ValueError(
                "cache: no longer the ZipVLCache bound to this model (zipvl.new_cache or "
                "zipvl.disable was called since this GraphDecoder was made); make a new one"
            )

    # ------------------------------------------------------------------ cache views
    def _layers(self) -> list[PagedCacheLayer]:
        assert isinstance(self.cache, ZipVLCache)
        layers = []
        for i, layer in enumerate(self.cache.layers):
            if not isinstance(layer, PagedCacheLayer):
                raise ValueError(
                    f"cache: layer {i} is a {type(layer).__name__}; a recorded decode step needs "
                    "paged layers (ZipVLConfig(decode_impl='auto' or 'triton'))"
                )
            if layer.state != DECODE or layer.store is None:
                raise ValueError(
                    f"cache: layer {i} is in state {layer.state!r}; run the prefill (a forward "
                    "of the prompt with this cache) before decoding from a graph"
                )
            layers.append(layer)
        return layers

    def _buffers(self) -> tuple[Any, ...]:
        """What a recorded step depends on besides its inputs: every paged layer's store (its
        identity: a reset and a new prompt make new stores, whose buffers the allocator may
        place at the old addresses) and address table values (pointers and sizes); for a
        StaticCache, every layer's key and value buffers (a reorder replaces them)."""
        if not self.zipvl:
            return tuple(
                (t.data_ptr(), tuple(t.shape))
                for layer in getattr(self.cache, "layers", [])
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                if isinstance(t, Tensor)
            )
        from zipvl.paged_decode_triton import table_entries

        return tuple(
            (id(layer.store), tuple(table_entries(layer.store))) for layer in self._layers()
        )

    def _key_of(self, ids: Tensor, pos: Tensor, cp: Tensor | None) -> tuple[Any, ...]:
        """What a recording is valid for: batch, position shape, cache-position use, buffers."""
        return (ids.shape[0], tuple(pos.shape), cp is None, self._buffers())

    # ------------------------------------------------------------------ the step
    def _forward(self, ids: Tensor, pos: Tensor, cp: Tensor | None, mask: Tensor | None) -> Any:
        kw: dict[str, Any] = {self.cache_kw: self.cache}
        if self.takes_cache_position and cp is not None:
            kw["cache_position"] = cp
        if mask is not None:
            kw["attention_mask"] = mask
        return self._fwd(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **kw)

    def _positions(self, ids: Tensor, position_ids: Tensor | None,
                   cache_position: Tensor | None) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        b = ids.shape[0]
        if cache_position is not None:
            if not isinstance(cache_position, Tensor) or cache_position.numel() != 1:
                raise ValueError(
                    "cache_position: expected a (1,) int64 tensor (one new position), got "
                    f"{getattr(cache_position, 'shape', type(cache_position).__name__)}"
                )
            cache_position = cache_position.reshape(1).to(self.device, torch.long)
        if position_ids is None and self._mrope:
            raise ValueError(
                "position_ids: this model's rotary positions have several sections (M-RoPE, "
                "shifted by the prompt's rope_deltas), which the step cannot derive from the "
                "cache length; pass the ones generate computes (inside cuda_graph_decode, "
                "generate does)"
            )
        if position_ids is None:
            if cache_position is not None:
                position_ids = cache_position.view(1, 1).expand(b, 1)
            else:  # the cache length for every row, what the model's forward does without
                # position_ids (generate passes them where it derives them from a mask); a
                # StaticCache counts on the device (no host read)
                n = self.cache.get_seq_length()
                if isinstance(n, Tensor):
                    position_ids = n.reshape(1, 1).expand(b, 1)
                else:
                    position_ids = torch.full((b, 1), n, dtype=torch.long, device=self.device)
        elif (
            not isinstance(position_ids, Tensor)
            or position_ids.ndim < 2
            or tuple(position_ids.shape[-2:]) != (b, 1)
        ):
            raise ValueError(
                f"position_ids: expected shape (B, 1) = {(b, 1)}, or (R, B, 1) for multi-section "
                f"rotary positions (Qwen2-VL), got {getattr(position_ids, 'shape', position_ids)}"
            )
        return position_ids.to(self.device, torch.long), cache_position

    @torch.no_grad()
    def __call__(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        cache_position: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """One decode step: the logits (B, 1, V) of the next token after ``input_ids``.

        Args:
            input_ids: (B, 1) int64, the tokens decoded last.
            position_ids: optional (B, 1) positions, or (R, B, 1) for multi-section rotary
                positions (Qwen2-VL; required there); what ``generate`` computes, where it
                does (left-padded batches); default: ``cache_position``, else the cache length,
                as the model's own forward does without them.
            cache_position: optional (1,) int64, the new token's index in the cache (passed
                on where the model's forward takes it; transformers' StaticCache counts its
                length on the device itself).
            attention_mask: read by unrecorded steps only (a ZipVL cache keeps the prompt's
                padding itself and checks the mask once, on the first decode step).

        Returns:
            (B, 1, V) logits, a fresh tensor.

        Raises:
            ValueError: ``input_ids`` not (B, 1) integers on the model's device, or bad
                positions.
        """
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.shape[1] != 1:
            raise ValueError(
                "input_ids: expected a (B, 1) tensor (one token per row), got "
                f"{getattr(input_ids, 'shape', type(input_ids).__name__)}"
            )
        if input_ids.dtype not in (torch.int32, torch.int64) or input_ids.device != self.device:
            raise ValueError(
                f"input_ids: expected int32 or int64 on {self.device}, got {input_ids.dtype} on "
                f"{input_ids.device}"
            )
        self._check_bound()
        if isinstance(self.cache, ZipVLCache):  # prompt commits it may have deferred
            self.cache.commit_pending()
        pos, cp = self._positions(input_ids, position_ids, cache_position)
        key = self._key_of(input_ids, pos, cp)
        if self._key != key:
            self._key = None
            if self._eager_key != key:
                return self._eager(input_ids, pos, cp, attention_mask, key)
            self._record(input_ids, pos, cp)
            self._key = key
        st = self._static
        st["ids"].copy_(input_ids)
        st["pos"].copy_(pos)
        if cp is not None:
            st["cp"].copy_(cp)
        self.recorder.replay()
        self.stats["replays"] += 1
        assert self._logits is not None
        logits = self._logits.clone()
        if self.zipvl:
            self._after_replay()
        return logits

    def _eager(self, ids: Tensor, pos: Tensor, cp: Tensor | None, mask: Tensor | None,
               key: tuple[Any, ...]) -> Tensor:  # fmt: skip
        out = self.recorder.eager(lambda: self._forward(ids, pos, cp, mask))
        self.stats["eager"] += 1
        self._out_type = type(out)
        # recordable next time if this step left the buffers as it found them (it built their
        # address tables); a step that grew a pool runs eagerly once more
        self._eager_key = key if self._key_of(ids, pos, cp) == key else None
        return out.logits[:, -1:].clone()

    def _record(self, ids: Tensor, pos: Tensor, cp: Tensor | None) -> None:
        st = self._static = {"ids": ids.clone(), "pos": pos.clone()}
        if cp is not None:
            st["cp"] = cp.clone()
        layers = self._layers() if self.zipvl else []
        for layer in layers:
            assert layer.store is not None
            layer.store.step_tokens = 0
            layer.step_inputs = None

        def step() -> Any:
            # everything the host half reads after a replay is an output of the step
            with recorded_step():
                out = self._forward(st["ids"], st["pos"], st.get("cp"), None)
                return out, [layer.step_inputs for layer in layers]

        if isinstance(self.recorder, CUDARecorder):
            # the dequantizing reference reads host counts (page-table widths) that a graph
            # would freeze: only the fused kernel, which reads them on the device, is recorded
            for i, layer in enumerate(layers):
                if getattr(layer.store, "_decode_ws", None) is None:
                    raise ValueError(
                        f"cache: layer {i} decodes with the dequantizing reference, which a "
                        "CUDA graph cannot replay (it reads host-side page counts); use "
                        "ZipVLConfig(decode_impl='auto' or 'triton') on CUDA"
                    )
        out, inputs = self.recorder.record(step)
        self._logits = out.logits
        self._out_type = type(out)
        self._step_tokens = [layer.store.step_tokens for layer in layers if layer.store]
        if any(x is None for x in inputs):
            raise RuntimeError(
                "GraphDecoder: a layer's attention did not run the paged decode while the step "
                "was recorded (is ZipVL enabled on this model with this cache?)"
            )
        # this recording's own static query / log-sum-exp per layer (another decoder on the
        # same cache may record later and set the layers' attribute again)
        self._step_inputs = [x for x in inputs if x is not None]
        self._stores = [layer.store for layer in layers]  # keeps the ids in the key unique
        self.stats["records"] += 1

    def _after_replay(self) -> None:
        """The host half of the step: advance every layer, then compress full decode blocks
        (every layer is advanced before any compression, so one that raises leaves no layer
        behind its device count)."""
        layers = self._layers()
        for layer, t in zip(layers, self._step_tokens, strict=True):
            assert layer.store is not None
            layer.store.advance(t)
        for layer, (q, lse2, scale) in zip(layers, self._step_inputs, strict=True):
            assert layer.store is not None
            if layer.store.tail_length >= layer.recompress_every:
                self.stats["recompressions"] += layer.compress_tail(q, lse2=lse2, scale=scale)

    def output(self, logits: Tensor) -> Any:
        """``logits`` in the model's output type (for ``generate``)."""
        if self._out_type is None:
            raise RuntimeError("output: no step has run yet")
        return self._out_type(logits=logits, past_key_values=self.cache)


_STEP_ARGS = frozenset({
    "input_ids", "position_ids", "cache_position", "attention_mask", "use_cache",
    "logits_to_keep", "return_dict", "past_key_values", "cache",
})  # fmt: skip
"""What ``generate`` passes on a decode step that the recorded step accounts for."""

_OFF_FLAGS = frozenset({"output_attentions", "output_hidden_states"})
"""Requests that, switched off, ask nothing of the step."""


@contextlib.contextmanager
def cuda_graph_decode(
    model: nn.Module, cache: Cache, *, recorder: Recorder | None = None
) -> Iterator[GraphDecoder]:
    """Route every one-token step that ``model`` takes with ``cache`` through a ``GraphDecoder``.

    Inside the block, ``model(...)`` (and so ``model.generate(...)``) runs a call whose cache
    is ``cache``, whose ``input_ids`` are (B, 1) and whose cache already holds a prompt, as a
    replay; any other call (the prefill, another cache) runs the model's own forward.

    Args:
        model: the transformers causal LM.
        cache: its ``ZipVLCache`` (or a ``StaticCache``).
        recorder: see ``GraphDecoder``.

    Yields:
        The decoder (its ``stats`` say how many steps were replayed).

    Raises:
        ValueError: a ZipVL cache with layers that are not paged; a routed step passes an
            argument the recorded step cannot honour (for example ``inputs_embeds``,
            ``output_hidden_states=True`` or ``use_cache=False``), naming it.
    """
    decoder = GraphDecoder(model, cache, recorder=recorder)
    if isinstance(cache, ZipVLCache):
        chunked = [
            i for i, layer in enumerate(cache.layers) if not isinstance(layer, PagedCacheLayer)
        ]
        if chunked:
            raise ValueError(
                f"cache: layers {chunked} store chunks (a quantizer without the paged layout, "
                "e.g. the 'kivi' or 'dense' presets), which decode densely and cannot be "
                "replayed from a graph; cuda_graph_decode needs paged layers"
            )
    original = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        routed = (
            kwargs.get(decoder.cache_kw) is cache
            and isinstance(ids, Tensor)
            and ids.ndim == 2
            and ids.shape[1] == 1
            and _holds_prompt(decoder)
        )
        if not routed or not isinstance(ids, Tensor):
            return original(*args, **kwargs)
        if args:
            raise ValueError("input_ids: pass it by keyword on a recorded decode step")
        for name, value in kwargs.items():
            if name in _STEP_ARGS or value is None or (value is False and name in _OFF_FLAGS):
                continue
            raise ValueError(
                f"{name}: a decode step replayed from a CUDA graph cannot honour it (got "
                f"{value if isinstance(value, bool) else type(value).__name__}); leave "
                "cuda_graph_decode for such calls"
            )
        if kwargs.get("use_cache") is False:
            raise ValueError(
                "use_cache: a decode step replayed from a CUDA graph appends to the cache; got "
                "False (leave cuda_graph_decode for such calls)"
            )
        logits = decoder(
            ids,
            position_ids=kwargs.get("position_ids"),
            cache_position=kwargs.get("cache_position"),
            attention_mask=kwargs.get("attention_mask"),
        )
        out = decoder.output(logits)
        return out.to_tuple() if kwargs.get("return_dict") is False else out

    # generate validates its keyword arguments against forward's signature: keep the model's
    functools.update_wrapper(forward, original)
    own = model.__dict__.get("forward")  # an instance-level forward someone installed
    model.forward = forward  # type: ignore[method-assign]
    try:
        yield decoder
    finally:
        if own is None:
            del model.forward  # the class's forward again
        else:
            model.forward = own  # type: ignore[method-assign]


def _holds_prompt(decoder: GraphDecoder) -> bool:
    cache = decoder.cache
    if isinstance(cache, ZipVLCache):
        cache.commit_pending()  # a prompt commit still queued (defer_commit) counts as held
        return all(
            isinstance(layer, PagedCacheLayer) and layer.state == DECODE for layer in cache.layers
        )
    return True  # a StaticCache: every one-token call is a decode step
