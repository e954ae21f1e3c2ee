"""zipvl.enable / disable on every supported transformers architecture (tiny random models).

* identity: the "dense" preset (tau 1, 16-bit cache) is token-identical to the model's own
  attention with a DynamicCache, with a left-padded batch and across recompression boundaries;
* defaults: generation runs past three recompression boundaries, the report matches the cache;
* generate modes: sampling and beam search; errors for wrong caches and unsupported models.
"""

from __future__ import annotations

import gc
import math
import weakref
from typing import Any

import pytest
import torch
import transformers

from zipvl.cache.hf_compat import AttentionInterface, AttentionMaskInterface, DynamicCache
from zipvl.config import ZipVLConfig
from zipvl.eval import evaluate, kl_divergence
from zipvl.models import (
    SUPPORTED_MODELS,
    cache_argument,
    cache_kwargs,
    disable,
    enable,
    is_enabled,
    new_cache,
)
from zipvl.models.llama import generate
from zipvl.sparsity import FixedRatioAllocator
from zipvl.testing.lvlm import SUPPORTED_ARCHITECTURES, build_tiny_model, tiny_inputs

from .test_llama import _pair

NEW_TOKENS = 14  # 13 fed back: with recompress_every=4, three blocks + one fp tail token


def _generate(model: Any, inputs: dict, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **kw)


def _visuals(arch: str) -> list[str]:
    return (
        ["image", "video"] if arch in ("llava_onevision", "qwen2_vl", "qwen2_5_vl") else ["image"]
    )


CASES = [(arch, vis) for arch in SUPPORTED_ARCHITECTURES for vis in _visuals(arch)]


@pytest.mark.parametrize(("arch", "visual"), CASES)
def test_dense_preset_is_token_identical(arch: str, visual: str) -> None:
    model = build_tiny_model(arch)
    inputs = tiny_inputs(model, batch=2, pad=3, visual=visual)  # type: ignore[arg-type]
    want = _generate(model, inputs, **cache_kwargs(model, DynamicCache()))
    cache = enable(model, ZipVLConfig.preset("dense", recompress_every=4))
    got = _generate(model, inputs, **cache_kwargs(model, cache))
    disable(model)
    assert torch.equal(got, want)
    assert all(r.decode_blocks == 3 for r in cache.report().layers)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_defaults_run_past_recompression_boundaries(arch: str) -> None:
    model = build_tiny_model(arch)
    inputs = tiny_inputs(model, batch=2, pad=2, text_len=40)
    prompt = inputs["input_ids"].shape[1]
    cfg = ZipVLConfig(recompress_every=4)
    cache = enable(model, cfg)
    out = _generate(model, inputs, **cache_kwargs(model, cache))
    disable(model)
    assert out.shape == (2, prompt + NEW_TOKENS)
    rep = cache.report()
    assert len(rep.layers) == model.get_decoder().config.num_hidden_layers
    assert rep.bytes == cache.nbytes()
    for r in rep.layers:
        assert r.prompt_tokens == prompt and r.decode_blocks == 3
        assert r.seq_length == prompt + NEW_TOKENS - 1  # the last token is never fed back
        # paged storage never stores padding: the counts are those of the real tokens
        pads = float((inputs["attention_mask"] == 0).sum(1).float().mean())
        assert sum(r.tokens_at_bits.values()) == r.seq_length - pads
        assert cache.layer(r.layer).tail_length == NEW_TOKENS - 1 - 12  # after 3 blocks of 4
        assert r.kept_tokens <= prompt and 0.0 < r.kept_ratio <= 1.0


def test_default_block_of_100() -> None:
    """With the paper's recompress_every=100 the first decode block is compressed at 100."""
    model = build_tiny_model("qwen2")
    inputs = tiny_inputs(model, batch=1, text_len=30)
    cache = enable(model, ZipVLConfig())
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=102, do_sample=False, **cache_kwargs(model, cache))
    disable(model)
    rep = cache.report()
    assert all(r.decode_blocks == 1 and r.decode_block_tokens == 100 for r in rep.layers)
    assert all(cache.layer(r.layer).tail_length == 1 for r in rep.layers)
    assert all(sum(r.tokens_at_bits.values()) == r.seq_length for r in rep.layers)


def test_sampling_and_beam_search() -> None:
    model = build_tiny_model("llava")
    inputs = tiny_inputs(model, batch=2, pad=2, text_len=20)
    want = _generate(model, inputs, num_beams=3)
    cache = enable(model, ZipVLConfig.preset("dense", recompress_every=4))
    assert torch.equal(_generate(model, inputs, num_beams=3, **cache_kwargs(model, cache)), want)
    enable(model, ZipVLConfig(recompress_every=4))
    beams = _generate(model, inputs, num_beams=3, **cache_kwargs(model, new_cache(model)))
    assert beams.shape == want.shape
    prompt = inputs["input_ids"].shape[1]

    def sample(**kw: Any) -> torch.Tensor:
        torch.manual_seed(0)
        with torch.no_grad():
            return model.generate(
                **inputs, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=8, **kw
            )

    cache = new_cache(model)
    sampled = sample(**cache_kwargs(model, cache))
    assert sampled.shape == want.shape
    assert torch.equal(sampled[:, :prompt], inputs["input_ids"])
    assert all(r.decode_blocks == 3 for r in cache.report().layers)
    # the dense preset draws the same samples as the model's own attention (same seed)
    enable(model, ZipVLConfig.preset("dense", recompress_every=4))
    dense_sampled = sample(**cache_kwargs(model, new_cache(model)))
    disable(model)
    assert torch.equal(dense_sampled, sample())
    assert not torch.equal(dense_sampled, _generate(model, inputs))  # not greedy


def test_registration_and_disable_restore() -> None:
    model = build_tiny_model("qwen2_vl")
    decoder = model.get_decoder()
    inputs = tiny_inputs(model, batch=2, pad=2)
    before = _generate(model, inputs)
    enable(model)
    name = decoder.config._attn_implementation
    assert name.startswith("zipvl_") and is_enabled(model)
    assert name in AttentionInterface() and name in AttentionMaskInterface()
    assert model.model.visual.config._attn_implementation == "sdpa"  # vision tower untouched
    disable(model)
    assert decoder.config._attn_implementation == "sdpa" and not is_enabled(model)
    assert torch.equal(_generate(model, inputs), before)
    with pytest.raises(RuntimeError, match=r"ZipVL is not enabled on this model"):
        disable(model)
    with pytest.raises(RuntimeError, match=r"ZipVL is not enabled on this model"):
        new_cache(model)


def test_wrong_or_missing_cache_raises() -> None:
    model = build_tiny_model("llama")
    inputs = tiny_inputs(model, batch=1)
    cache = enable(model)
    with pytest.raises(
        RuntimeError, match=r"did not come from the ZipVLCache bound to this model"
    ):
        _generate(model, inputs, **cache_kwargs(model, DynamicCache()))
    with pytest.raises(RuntimeError, match=r"did not come from the ZipVLCache bound"):
        _generate(model, inputs)  # generate() builds a DynamicCache itself
    _generate(model, inputs, **cache_kwargs(model, cache))
    stale = new_cache(model)  # an unused cache, then rebinding: only the newest one is read
    new_cache(model)
    with pytest.raises(RuntimeError, match=r"\(it holds 0\)") as err:
        _generate(model, inputs, **cache_kwargs(model, stale))
    # the message names the keyword the installed transformers takes
    assert f"to generate() / forward as {cache_argument(model)}= " in str(err.value)
    disable(model)


def test_unsupported_models_and_configs() -> None:
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)
    )
    names = r"LlavaForConditionalGeneration.*Qwen2_5_VLForConditionalGeneration.*Qwen2ForCausalLM"
    with pytest.raises(ValueError, match=rf"GPT2LMHeadModel is not supported.*{names}"):
        enable(gpt2)
    with pytest.raises(ValueError, match=r"not supported"):
        enable(torch.nn.Linear(2, 2))
    assert len(SUPPORTED_MODELS) == 7
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match=r"dense_layers: expected layer indices < num_layers=2"):
        enable(model, ZipVLConfig(dense_layers={2}))
    with pytest.raises(TypeError, match=r"config: expected a ZipVLConfig"):
        enable(model, {"tau": 0.9})  # type: ignore[arg-type]
    sliding = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=0,
        )
    )
    with pytest.raises(ValueError, match=r"full-attention layers only.*sliding_attention"):
        enable(sliding)


def test_eval_report() -> None:
    model = build_tiny_model("llava_next")
    inputs = tiny_inputs(model, batch=2, pad=2, text_len=30)
    dense = evaluate(model, inputs, ZipVLConfig.preset("dense"), max_new_tokens=6)
    assert (dense.agreement, dense.matches, dense.steps) == (1.0, 12, 6)
    assert dense.kl_first == 0.0 and dense.retained_mass == 1.0
    cfg = ZipVLConfig(allocator=FixedRatioAllocator(0.5))
    rep = evaluate(model, inputs, cfg, max_new_tokens=6)
    assert not is_enabled(model)
    assert 0.0 <= rep.agreement <= 1.0 and rep.kl_first >= 0.0
    assert len(rep.layers) == 2 and all(0.0 < r.retained_mass < 1.0 for r in rep.layers)
    assert all(abs(r.kept_ratio - 0.5) < 0.1 for r in rep.layers)
    text = rep.to_markdown()
    assert "| layer | kept ratio | retained attention mass |" in text and "KL" in text
    p = torch.randn(3, 11)
    assert torch.allclose(kl_divergence(p, p), torch.zeros(3, dtype=torch.float64))
    assert (kl_divergence(p, torch.randn(3, 11)) > 0).all()


@torch.no_grad()
def test_sparse_zipvl_in_transformers_equals_reference_decoder() -> None:
    """transformers + ZipVL (sparse prefill, 4/2-bit cache, left-padded batch) equals the
    reference decoder ``zipvl.models.llama`` with the same weights: the same greedy tokens and
    cache report, bit-identical prefill logits and stored (compressed) K/V.

    Decode steps differ by an ulp: with a padding mask transformers repeats K/V heads before
    SDPA while the reference decoder passes ``enable_gqa``, and the CPU kernels round
    differently (measured max |diff| 1.2e-7 on logits of magnitude ~0.5)."""
    ours, hf = _pair(qkv_bias=True)
    cfg = ZipVLConfig(allocator=FixedRatioAllocator(0.5), recompress_every=4)
    idx = torch.randint(3, 256, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :7], idx[1, :7] = 0, 0
    valid = mask.bool()
    steps = 14  # 13 fed back: three blocks of 4 re-compressed, one fp tail token
    hf_cache = enable(hf, cfg)
    want = hf.generate(  # type: ignore[operator]
        input_ids=idx,
        attention_mask=mask,
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        **cache_kwargs(hf, hf_cache),
    )
    our_cache = ours.new_cache(cfg)
    assert torch.equal(
        generate(ours, idx, steps, cache=our_cache, config=cfg, key_valid=valid), want
    )
    report = hf_cache.report()
    assert report == our_cache.report()
    assert all(r.decode_blocks == 3 and r.kept_ratio < 0.6 for r in report.layers)  # sparse
    real = torch.cat([valid, torch.ones(2, steps - 1, dtype=torch.bool)], dim=1)  # (B, N)
    for i in range(len(report.layers)):
        stored = real.clone()
        stored[:, real.shape[1] - our_cache.layer(i).tail_length :] = False  # chunks only
        for a, b in zip(hf_cache.dense_kv(i), our_cache.dense_kv(i), strict=True):
            a, b = a.transpose(1, 2), b.transpose(1, 2)  # (B, N, Hkv, D)
            assert torch.equal(a[stored], b[stored])
            torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-6)
    # teacher-forced logits, prompt then every step, with the same rotary positions
    hf_cache, our_cache = new_cache(hf), ours.new_cache(cfg)
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
    got = ours(idx, cache=our_cache, key_valid=valid, positions=pos, config=cfg)
    ref = hf(input_ids=idx, attention_mask=mask, position_ids=pos, **cache_kwargs(hf, hf_cache))
    assert torch.equal(got[valid], ref.logits[valid])  # type: ignore[union-attr]
    for t in range(40, 40 + steps - 1):
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
        tok = want[:, t : t + 1]
        got = ours(tok, cache=our_cache, key_valid=mask.bool(), positions=pos, config=cfg)
        ref = hf(
            input_ids=tok,
            attention_mask=mask,
            position_ids=pos,
            **cache_kwargs(hf, hf_cache),
        )
        torch.testing.assert_close(got, ref.logits, rtol=0, atol=1e-6)  # type: ignore[union-attr]
    disable(hf)


def test_registered_function_dies_with_the_model() -> None:
    """transformers' registry is global: it must not keep a collected model's cache alive."""
    model = build_tiny_model("llama")
    cache = weakref.ref(enable(model))
    name = model.get_decoder().config._attn_implementation
    assert cache() is not None and name in AttentionInterface()
    del model
    gc.collect()
    assert cache() is None
    with pytest.raises(RuntimeError, match=rf"attention '{name}' was disabled"):
        AttentionInterface()[name]()
    # names are never reused, even when a new model lands at the old one's address
    other = build_tiny_model("llama")
    enable(other)
    assert other.get_decoder().config._attn_implementation != name
    enable(other, ZipVLConfig(tau=0.9))  # re-enabling keeps the model's name
    assert is_enabled(other)
    disable(other)


def test_builders_restore_the_global_rng_states() -> None:
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    build_tiny_model("llama", seed=3)
    assert torch.equal(torch.get_rng_state(), cpu)
    after = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    assert all(torch.equal(a, b) for a, b in zip(after, cuda, strict=True))


def _qwen2_d64() -> Any:
    """A tiny Qwen2 with head dim 64, the smallest the fused kernel reads at 2 bits."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, vocab_size=256, attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(cfg).eval()


def test_decode_reads_the_pages_never_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under zipvl.enable, decode steps go through the fused kernel (the Triton interpreter on
    the CPU) and never materialise dense K/V."""
    import zipvl.paged_decode_triton as kernels
    from zipvl.cache import PagedCacheLayer, PagedKVStore

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("dense read in decode")

    launches = []
    real = kernels.paged_decode_triton

    def counting(*args: Any, **kwargs: Any) -> Any:
        launches.append(1)
        return real(*args, **kwargs)

    model = _qwen2_d64()
    ids = torch.randint(3, 256, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :6], ids[1, :6] = 0, 0
    cache = enable(model, ZipVLConfig.preset("fixed", recompress_every=4, page_size=16))
    monkeypatch.setattr(PagedKVStore, "dense_kv", refuse)
    monkeypatch.setattr(PagedCacheLayer, "dense_kv", refuse)
    monkeypatch.setattr(kernels, "paged_decode_triton", counting)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9,
                             do_sample=False, pad_token_id=0,
                             **cache_kwargs(model, cache))  # fmt: skip
    disable(model)
    assert out.shape == (2, 49)
    assert len(launches) == 2 * 8  # every layer, every decode step
    assert all(r.decode_blocks == 2 and r.decode_read == "fused" for r in cache.report().layers)


def test_batch_rows_decode_as_if_alone() -> None:
    """Row i of a left-padded batch gets the logits it gets alone, in prefill and through decode
    blocks: its own budgets, its own pages, no padding stored."""
    model = _qwen2_d64()
    with torch.no_grad():  # peaked attention: budgets that differ from row to row
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    # tau-based budgets depend on the mass: a batch-wide budget would differ from a row's own
    cfg = ZipVLConfig(tau=0.9, recompress_every=16, page_size=16)
    ids = torch.randint(3, 256, (2, 40))
    lens = [40, 29]
    follow = torch.randint(3, 256, (2, 34))

    def run(rows: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        s = max(lens[i] for i in rows)
        x = torch.zeros(len(rows), s, dtype=torch.long)
        m = torch.zeros(len(rows), s, dtype=torch.long)
        for j, i in enumerate(rows):
            x[j, s - lens[i] :], m[j, s - lens[i] :] = ids[i, : lens[i]], 1
        cache = enable(model, cfg)
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        logits = []
        with torch.no_grad():
            kw = cache_kwargs(model.forward, cache)
            out = model(input_ids=x, attention_mask=m, position_ids=pos, **kw)
            logits.append(out.logits[:, -1])
            for t in range(follow.shape[1]):
                pos = pos[:, -1:] + 1
                m = torch.cat([m, m.new_ones(len(rows), 1)], 1)
                out = model(input_ids=follow[rows, t : t + 1], attention_mask=m,
                            position_ids=pos, **kw)  # fmt: skip
                logits.append(out.logits[:, -1])
        disable(model)
        # which precision every position went to, per (row, KV head), padding cut off
        classes = []
        for layer in cache.layers:
            bits = layer.store.class_bits[:, :, : layer.store.length]  # (2, B * Hkv, N)
            classes.append([bits[:, j, s - lens[i] :] for j, i in enumerate(rows)])
        return logits, classes

    both, both_classes = run([0, 1])
    for i in (0, 1):
        alone, alone_classes = run([i])
        for step, (a, b) in enumerate(zip(both, alone, strict=True)):
            torch.testing.assert_close(a[i : i + 1], b, rtol=0, atol=1e-4, msg=f"row {i} {step}")
        for layer, (cb, ca) in enumerate(zip(both_classes, alone_classes, strict=True)):
            assert torch.equal(cb[i], ca[0]), (i, layer)  # the same kept set, prompt and blocks


@pytest.mark.parametrize("preset", ["zipvl", "dense"])  # paged and chunked storage
def test_a_cache_that_holds_a_generation_is_refused(preset: str) -> None:
    """generate() again with the cache of a finished generation (a new, longer prompt) raises
    instead of treating the compressed old prompt as the new one's prefix."""
    model = _qwen2_d64()
    cache = enable(model, ZipVLConfig.preset(preset, page_size=16))
    with torch.no_grad():
        model.generate(input_ids=torch.randint(3, 256, (1, 30)), max_new_tokens=3,
                       do_sample=False, **cache_kwargs(model, cache))  # fmt: skip
        with pytest.raises(RuntimeError, match=r"already holds a generation .*new_cache"):
            model.generate(input_ids=torch.randint(3, 256, (1, 45)), max_new_tokens=3,
                           do_sample=False, **cache_kwargs(model, cache))  # fmt: skip
        fresh = new_cache(model)  # what the message says works
        out = model.generate(input_ids=torch.randint(3, 256, (1, 45)), max_new_tokens=3,
                             do_sample=False, **cache_kwargs(model, fresh))  # fmt: skip
    disable(model)
    assert out.shape == (1, 48)


def test_a_reused_cache_is_refused_before_the_model_runs() -> None:
    """On an LVLM the model code itself fails on a reused cache (image tokens without image
    features) before any attention runs: the cache refuses at the start of generate, when
    transformers marks it as the caller's. transformers versions that do not mark it are
    covered by the attention check of the first step (text models)."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    if "_is_user_defined" not in inspect.getsource(GenerationMixin._prepare_cache_for_generation):
        pytest.skip("this transformers version does not mark the caller's cache in generate")
    model = build_tiny_model("llava")
    inputs = tiny_inputs(model, batch=1, text_len=20)
    cache = enable(model, ZipVLConfig(page_size=16))
    _generate(model, inputs, **cache_kwargs(model, cache))
    with pytest.raises(RuntimeError, match=r"already holds a generation"):
        _generate(model, inputs, **cache_kwargs(model, cache))
    disable(model)


def test_a_multi_token_step_on_a_decoding_cache_is_refused() -> None:
    """The attention-level check alone (forward calls, no generate): a second prompt chunk on
    a cache that already decodes raises, on paged and on chunked storage."""
    for preset in ("zipvl", "dense"):
        model = _qwen2_d64()
        cache = enable(model, ZipVLConfig.preset(preset, page_size=16))
        kw = cache_kwargs(model.forward, cache)
        with torch.no_grad():
            model(input_ids=torch.randint(3, 256, (1, 30)), **kw)
            model(input_ids=torch.randint(3, 256, (1, 1)), **kw)  # one decode step: fine
            with pytest.raises(RuntimeError, match=r"already holds a generation \(31 positions\)"):
                model(input_ids=torch.randint(3, 256, (1, 6)), **kw)
        disable(model)


def test_layers_are_resolved_at_enable_not_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-layer overrides and a PerLayerSchedule are resolved once, by enable: during
    generation no forward resolves a layer (ZipVLConfig.for_layer / _resolve) or looks a layer
    up in a schedule (PerLayerSchedule.__call__ / for_layer); the schedule's own budgets are
    used all the same (prefill and decode blocks)."""
    from zipvl.sparsity import PerLayerSchedule

    model = build_tiny_model("llama", num_layers=3)
    inputs = tiny_inputs(model, batch=1, text_len=40, visual="none")
    schedule = PerLayerSchedule([0.5, 0.25, FixedRatioAllocator(0.75)])
    cfg = ZipVLConfig(allocator=schedule, recompress_every=4, layers={1: {"impl": "reference"}})
    cache = enable(model, cfg)
    counts = {"for_layer": 0, "_resolve": 0, "schedule": 0}

    def counted(cls: type, name: str, key: str) -> None:
        original = getattr(cls, name)

        def wrapper(*a: Any, **kw: Any) -> Any:
            counts[key] += 1
            return original(*a, **kw)

        monkeypatch.setattr(cls, name, wrapper)

    counted(ZipVLConfig, "for_layer", "for_layer")
    counted(ZipVLConfig, "_resolve", "_resolve")
    counted(PerLayerSchedule, "__call__", "schedule")
    counted(PerLayerSchedule, "for_layer", "schedule")
    _generate(model, inputs, **cache_kwargs(model, cache))
    disable(model)
    assert counts == {"for_layer": 0, "_resolve": 0, "schedule": 0}
    rep = cache.report()
    prompt = inputs["input_ids"].shape[1]
    want = [math.ceil(r * prompt) for r in (0.5, 0.25, 0.75)]
    assert [r.kept_tokens for r in rep.layers] == want
    assert [r.decode_blocks for r in rep.layers] == [3, 3, 3]
    assert [r.decode_kept_tokens for r in rep.layers] == [6.0, 3.0, 9.0]  # blocks of 4
    # a schedule shorter than the model fails at enable, not in the middle of a forward
    with pytest.raises(ValueError, match=r"layer_idx: expected 0 <= layer_idx < 2"):
        enable(model, ZipVLConfig(allocator=PerLayerSchedule([0.5, 0.5])))
