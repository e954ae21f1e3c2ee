"""GraphDecoder / cuda_graph_decode: a transformers model's decode step recorded once, replayed.

On the CPU a stand-in recorder runs the recorded step again on every replay, with the same
split as a CUDA graph: the recorded half (every layer's device-side append and decode
attention) inside the step, the host half (``advance``, decode-block recompression) after it.
The properties: replayed decoding equals eager decoding step for step (logits and the cache's
stored classes), across recompression blocks, pool growth and a left-padded batch; generate
routed through it gives the same tokens; a change of the cache's buffers is noticed (one eager
step, then a new recording); bad input raises naming the argument. The CUDA test records a
real graph and compares it with the eager fused-kernel path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers

from zipvl.cache.hf_compat import DynamicCache
from zipvl.config import ZipVLConfig
from zipvl.models import cache_kwargs, disable, enable, new_cache
from zipvl.models.captured import GraphDecoder, cuda_graph_decode
from zipvl.testing.lvlm import SUPPORTED_ARCHITECTURES, build_tiny_model, tiny_inputs
from zipvl.testing.recorder import ReRunRecorder

ReRun = ReRunRecorder


def _model(device: str = "cpu") -> Any:
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, vocab_size=256, attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(cfg).eval().to(device)


CFG = dict(recompress_every=8, page_size=16, decode_impl="reference")  # the kernel: GPU test


def _classes(cache: Any) -> list[torch.Tensor]:
    return [layer.store.class_bits[:, :, : layer.store.length].clone() for layer in cache.layers]


@torch.no_grad()
def _run(model: Any, ids: torch.Tensor, mask: torch.Tensor, steps: int, positions: bool,
         replay: bool) -> tuple[Any, ...]:  # fmt: skip
    """Prefill, then ``steps`` greedy steps: eager model calls, or a GraphDecoder's replays."""
    cache = enable(model, ZipVLConfig.preset("fixed", **CFG))
    kw = cache_kwargs(model.forward, cache)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw)
    tok = out.logits[:, -1:].argmax(-1)
    rec = ReRun()
    dec = GraphDecoder(model, cache, recorder=rec) if replay else None
    logits = []
    for _ in range(steps):
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        p = pos if positions else None
        if dec is not None:
            step = dec(tok, position_ids=p, attention_mask=mask)
        else:
            step = model(input_ids=tok, attention_mask=mask, position_ids=p, **kw).logits[:, -1:]
        logits.append(step)
        tok = step.argmax(-1)
    disable(model)
    return logits, _classes(cache), dec.stats if dec else None, rec.records


@pytest.mark.parametrize("positions", [True, False], ids=["positions", "from-cache"])
def test_replayed_decoding_equals_eager(positions: bool) -> None:
    """40 steps over a left-padded batch (blocks of 8: five recompressions per layer, pages of
    16): the replayed steps give the eager logits and store the same precision classes, with
    the caller's position_ids or without (the cache length, as the model's forward does)."""
    model = _model()
    ids = torch.randint(3, 256, (2, 37))
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, :5], ids[1, :5] = 0, 0
    want, want_classes, _, _ = _run(model, ids, mask, 40, positions, replay=False)
    got, got_classes, stats, records = _run(model, ids, mask, 40, positions, replay=True)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {i}")
    for a, b in zip(got_classes, want_classes, strict=True):
        assert torch.equal(a, b)
    assert stats["replays"] > 30 and stats["recompressions"] == 2 * 5
    assert stats["records"] == records >= 1
    assert stats["eager"] == stats["records"]  # one eager step before every recording
    assert stats["eager"] + stats["replays"] == 40


def test_a_buffer_change_is_noticed_and_recorded_again() -> None:
    """A reorder between steps (what beam search does) replaces the store's buffers: the next
    step runs eagerly, the one after records again, and the results follow the reorder."""
    model = _model()
    ids = torch.randint(3, 256, (2, 30))
    cache = enable(model, ZipVLConfig.preset("fixed", **CFG))
    kw = cache_kwargs(model.forward, cache)
    with torch.no_grad():
        tok = model(input_ids=ids, **kw).logits[:, -1:].argmax(-1)
        dec = GraphDecoder(model, cache, recorder=ReRun())
        for _ in range(3):
            tok = dec(tok).argmax(-1)
        assert dec.stats["records"] == 1
        cache.reorder_cache(torch.tensor([1, 0]))
        tok = tok.flip(0)
        dec(tok)
        assert dec.stats == {**dec.stats, "records": 1, "eager": 2}
        dec(tok)
        assert dec.stats["records"] == 2
    disable(model)


def test_generate_through_cuda_graph_decode_gives_the_same_tokens() -> None:
    """generate (greedy) inside cuda_graph_decode: the prefill runs the model's own forward,
    the decode steps replay, the tokens are generate's without it; the forward is restored."""
    model = _model()
    ids = torch.randint(3, 256, (2, 33))
    mask = torch.ones(2, 33, dtype=torch.long)
    mask[0, :4], ids[0, :4] = 0, 0
    gen = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cache = enable(model, ZipVLConfig.preset("fixed", **CFG))
        want = model.generate(input_ids=ids, **gen, **cache_kwargs(model, cache))
        cache = new_cache(model)
        with cuda_graph_decode(model, cache, recorder=ReRun()) as dec:
            got = model.generate(input_ids=ids, **gen, **cache_kwargs(model, cache))
    disable(model)
    assert torch.equal(got, want)
    assert dec.stats["replays"] >= 20 and dec.stats["recompressions"] > 0
    assert "forward" not in model.__dict__


def test_bad_input_raises_naming_the_argument() -> None:
    model = _model()
    ids = torch.randint(3, 256, (1, 20))
    with pytest.raises(ValueError, match="cache: expected a ZipVLCache or a transformers"):
        GraphDecoder(model, DynamicCache(config=model.config), recorder=ReRun())
    cache = enable(model, ZipVLConfig.preset("fixed", **CFG))
    other = new_cache(model)  # binds a new cache: the first is no longer the model's
    with pytest.raises(ValueError, match="cache: expected the ZipVLCache bound to this model"):
        GraphDecoder(model, cache, recorder=ReRun())
    with pytest.raises(ValueError, match="model: the default recorder records CUDA graphs"):
        GraphDecoder(model, other)
    dec = GraphDecoder(model, other, recorder=ReRun())
    with pytest.raises(ValueError, match=r"cache: layer 0 is in state 'empty'"):
        dec(ids[:, :1])
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(model.forward, other))
        with pytest.raises(ValueError, match=r"input_ids: expected a \(B, 1\) tensor"):
            dec(ids[:, :2])
        with pytest.raises(ValueError, match="position_ids: expected shape"):
            dec(ids[:, :1], position_ids=torch.zeros(1, 2, dtype=torch.long))
        with (
            cuda_graph_decode(model, other, recorder=ReRun()),
            pytest.raises(ValueError, match="output_hidden_states: a decode step replayed"),
        ):
            model(input_ids=ids[:, :1], output_hidden_states=True,
                  **cache_kwargs(model.forward, other))  # fmt: skip
    disable(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_matches_the_eager_fused_path() -> None:
    """Real CUDA graphs, the fused kernel: 130 greedy steps (a decode block of 100 per layer
    compressed between replays) equal the eager steps' logits within bf16 rounding and give
    the same tokens."""
    model = _model("cuda").to(torch.bfloat16)
    ids = torch.randint(3, 256, (2, 300), device="cuda")
    cfg = ZipVLConfig.preset("fixed", decode_impl="triton")
    results = []
    with torch.no_grad():
        for graphs in (False, True):
            cache = enable(model, cfg)
            kw = cache_kwargs(model.forward, cache)
            tok = model(input_ids=ids, **kw).logits[:, -1:].argmax(-1)
            dec = GraphDecoder(model, cache) if graphs else None
            logits = []
            for _ in range(130):
                step = dec(tok) if dec else model(input_ids=tok, **kw).logits[:, -1:]
                logits.append(step.float())
                tok = step.argmax(-1)
            disable(model)
            results.append((torch.cat(logits, 1), dec.stats if dec else None))
    (want, _), (got, stats) = results
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # one decode block of 100 per layer; the pools grew once (one more eager step, recording)
    assert stats is not None and stats["replays"] >= 120 and stats["recompressions"] == 2


def test_a_static_cache_replays_as_its_eager_steps() -> None:
    """The dense baseline under the same recorder: transformers' StaticCache (it counts its
    length on the device), replayed steps give the eager steps' logits."""
    from transformers import StaticCache

    model = _model()
    ids = torch.randint(3, 256, (1, 21))
    results = []
    with torch.no_grad():
        for replay in (False, True):
            cache = StaticCache(config=model.config, max_cache_len=64)
            kw = cache_kwargs(model.forward, cache)
            tok = model(input_ids=ids, **kw).logits[:, -1:].argmax(-1)
            dec = GraphDecoder(model, cache, recorder=ReRun()) if replay else None
            logits = []
            for _ in range(12):
                step = dec(tok) if dec else model(input_ids=tok, **kw).logits[:, -1:]
                logits.append(step)
                tok = step.argmax(-1)
            results.append(torch.cat(logits, 1))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-5)
    assert dec is not None and dec.stats["replays"] == 11 and dec.stats["eager"] == 1


@pytest.mark.parametrize("mode", ["sample", "beams"])
def test_sampling_and_beam_search_through_cuda_graph_decode(mode: str) -> None:
    """Sampling (same seed) and beam search give generate's tokens without the block. Beam
    search reorders the cache every step, which replaces its buffers: every such step runs
    eagerly (never a stale replay)."""
    model = _model()
    ids = torch.randint(3, 256, (1, 29))
    gen: dict[str, Any] = dict(max_new_tokens=12, pad_token_id=0)
    gen.update(do_sample=True, top_k=20) if mode == "sample" else gen.update(
        do_sample=False, num_beams=2
    )
    outs = []
    with torch.no_grad():
        for graphs in (False, True):
            cache = enable(model, ZipVLConfig.preset("fixed", **CFG))
            torch.manual_seed(7)
            ctx = cuda_graph_decode(model, cache, recorder=ReRun()) if graphs else None
            with ctx if ctx is not None else contextlib.nullcontext() as dec:
                outs.append(model.generate(input_ids=ids, **gen, **cache_kwargs(model, cache)))
            disable(model)
    assert torch.equal(outs[1], outs[0])
    assert dec is not None and dec.stats["replays"] + dec.stats["eager"] == 11
    if mode == "sample":
        assert dec.stats["replays"] >= 9
    else:  # every beam step reorders the cache (new buffers): each one runs eagerly
        assert dec.stats["eager"] == 11 and dec.stats["replays"] == 0


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_every_supported_architecture_generates_the_same_tokens(arch: str) -> None:
    """LLaVA-family and Qwen2-VL-family LVLMs (an image in the prompt, a left-padded batch of
    2) and the text backbones: generate inside cuda_graph_decode gives generate's tokens.
    Qwen2-VL's multi-section positions come from generate; the step refuses to guess them."""
    model = build_tiny_model(arch)
    inputs = tiny_inputs(model, batch=2, pad=3, text_len=20)
    cfg = ZipVLConfig.preset("fixed", recompress_every=4, decode_impl="reference")
    gen: dict[str, Any] = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        cache = enable(model, cfg)
        want = model.generate(**inputs, **gen, **cache_kwargs(model, cache))
        cache = new_cache(model)
        with cuda_graph_decode(model, cache, recorder=ReRun()) as dec:
            got = model.generate(**inputs, **gen, **cache_kwargs(model, cache))
        if arch.startswith("qwen2_") and arch != "qwen2":
            with pytest.raises(ValueError, match="position_ids: this model's rotary positions"):
                dec(got[:, -1:])
    disable(model)
    assert torch.equal(got, want)
    assert dec.stats["replays"] > 0 and dec.stats["recompressions"] > 0


def test_a_static_cache_reorder_is_noticed() -> None:
    """A StaticCache's reorder replaces its key / value buffers: the next step runs eagerly."""
    from transformers import StaticCache

    model = _model()
    ids = torch.randint(3, 256, (2, 21))
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=64)
        tok = model(input_ids=ids, **cache_kwargs(model.forward, cache)).logits[:, -1:].argmax(-1)
        dec = GraphDecoder(model, cache, recorder=ReRun())
        for _ in range(3):
            tok = dec(tok).argmax(-1)
        assert dec.stats == {"records": 1, "replays": 2, "eager": 1, "recompressions": 0}
        cache.reorder_cache(torch.tensor([1, 0]))
        dec(tok.flip(0))
        assert dec.stats["eager"] == 2 and dec.stats["replays"] == 2


def test_two_decoders_a_reset_and_a_new_cache() -> None:
    """Two decoders taking turns on one cache decode as eager steps do (each keeps its own
    recorded query and log-sum-exp); after a reset and a new prompt the decoder runs an eager
    step first; a cache no longer bound to the model is refused."""
    model = _model()
    ids = torch.randint(3, 256, (1, 30))
    want, *_ = _run(model, ids, torch.ones(1, 30, dtype=torch.long), 20, False, replay=False)
    with torch.no_grad():
        cache = enable(model, ZipVLConfig.preset("fixed", **CFG))
        kw = cache_kwargs(model.forward, cache)
        tok = model(input_ids=ids, **kw).logits[:, -1:].argmax(-1)
        decs = [GraphDecoder(model, cache, recorder=ReRun()) for _ in range(2)]
        got = []
        for i in range(20):
            step = decs[(i // 3) % 2](tok)
            got.append(step)
            tok = step.argmax(-1)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {i}")
        assert all(d.stats["replays"] > 0 for d in decs)
        cache.reset()
        model(input_ids=ids, **kw)
        eager_before = decs[0].stats["eager"]
        decs[0](tok)
        assert decs[0].stats["eager"] == eager_before + 1  # new stores: never a stale replay
        new_cache(model)
        with pytest.raises(ValueError, match="cache: no longer the ZipVLCache bound"):
            decs[0](tok)
    disable(model)


def test_return_dict_use_cache_and_chunked_layers() -> None:
    model = _model()
    ids = torch.randint(3, 256, (1, 20))
    with torch.no_grad():
        cache = enable(model, ZipVLConfig.preset("fixed", **CFG))
        kw = cache_kwargs(model.forward, cache)
        tok = model(input_ids=ids, **kw).logits[:, -1:].argmax(-1)
        with cuda_graph_decode(model, cache, recorder=ReRun()):
            out = model(input_ids=tok, return_dict=False, **kw)
            assert isinstance(out, tuple) and out[0].shape == (1, 1, 256)
            with pytest.raises(ValueError, match="use_cache: a decode step replayed"):
                model(input_ids=tok, use_cache=False, **kw)
        cache = enable(model, ZipVLConfig.preset("kivi"))
        with (
            pytest.raises(ValueError, match=r"cache: layers \[0, 1\] store chunks"),
            cuda_graph_decode(model, cache, recorder=ReRun()),
        ):
            pass
    disable(model)


def test_recorded_steps_with_the_fused_kernel_under_the_interpreter() -> None:
    """The path a real graph records (the fused kernel, which reads the tail count and page
    tables from device memory; the Triton interpreter on the CPU): replayed steps across two
    decode blocks give the eager steps' logits."""
    from zipvl.paged_decode_triton import INTERPRETED

    if not INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 (set by the test suite's conftest)")
    model = _model()
    ids = torch.randint(3, 256, (1, 40))
    cfg = ZipVLConfig.preset("fixed", recompress_every=4, page_size=16, decode_impl="triton")
    results = []
    with torch.no_grad():
        for replay in (False, True):
            cache = enable(model, cfg)
            kw = cache_kwargs(model.forward, cache)
            tok = model(input_ids=ids, **kw).logits[:, -1:].argmax(-1)
            dec = GraphDecoder(model, cache, recorder=ReRun()) if replay else None
            logits = []
            for _ in range(9):
                step = dec(tok) if dec else model(input_ids=tok, **kw).logits[:, -1:]
                logits.append(step)
                tok = step.argmax(-1)
            disable(model)
            results.append(torch.cat(logits, 1))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-5)
    assert dec is not None and dec.stats["replays"] > 0 and dec.stats["recompressions"] == 4


def test_a_real_recording_refuses_the_reference_decode() -> None:
    """The dequantizing reference reads host-side page counts that a CUDA graph would freeze:
    a CUDA recorder refuses to record it (checked before anything is captured)."""
    from zipvl.models.captured import CUDARecorder

    class NoGPU(CUDARecorder):  # the CUDA recorder's checks, without a device
        def __init__(self) -> None:
            self.graph = None

        def eager(self, fn: Callable[[], Any]) -> Any:
            return fn()

        def record(self, fn: Callable[[], Any]) -> Any:
            raise AssertionError("must refuse before recording")

    model = _model()
    ids = torch.randint(3, 256, (1, 20))
    with torch.no_grad():
        cache = enable(model, ZipVLConfig.preset("fixed", **CFG))  # decode_impl="reference"
        tok = model(input_ids=ids, **cache_kwargs(model.forward, cache)).logits[:, -1:]
        dec = GraphDecoder(model, cache, recorder=NoGPU())
        tok = dec(tok.argmax(-1)).argmax(-1)  # the eager step
        with pytest.raises(ValueError, match="cache: layer 0 decodes with the dequantizing"):
            dec(tok)
    disable(model)
