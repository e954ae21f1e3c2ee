"""The reference decoder against transformers' own Llama / Qwen2 with the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from zipvl.config import ZipVLConfig
from zipvl.models.llama import ModelArgs, Transformer, generate


def _pair(qkv_bias: bool) -> tuple[Transformer, torch.nn.Module]:
    """A tiny reference decoder and the transformers model holding the same weights."""
    args = ModelArgs.from_name("tiny", qkv_bias=qkv_bias)
    common = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.n_layer,
        num_attention_heads=args.n_head,
        num_key_value_heads=args.n_local_heads,
        rms_norm_eps=args.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_base},
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    if qkv_bias:
        hf: torch.nn.Module = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    hf.eval()
    ours = Transformer(args, ZipVLConfig.preset("dense")).eval()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return ours, hf


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["llama", "qwen2"])
@torch.no_grad()
def test_dense_decoder_matches_transformers(qkv_bias: bool) -> None:
    ours, hf = _pair(qkv_bias)
    idx = torch.randint(0, 256, (2, 40))
    torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)  # type: ignore[operator]
    want = hf.generate(idx, max_new_tokens=10, do_sample=False)  # type: ignore[operator]
    assert torch.equal(generate(ours, idx, 10), want)


@torch.no_grad()
def test_left_padded_generation_matches_transformers() -> None:
    ours, hf = _pair(True)
    idx = torch.randint(3, 256, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    idx[1, :6] = 0
    want = hf.generate(  # type: ignore[operator]
        input_ids=idx, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0
    )
    got = generate(ours, idx, 8, key_valid=mask.bool())
    assert torch.equal(got, want)


@torch.no_grad()
def test_zipvl_generation_past_recompression_boundaries() -> None:
    ours, _ = _pair(True)
    cfg = ZipVLConfig(recompress_every=5, page_size=16)
    cache = ours.new_cache(cfg)
    idx = torch.randint(0, 256, (2, 64))
    out = generate(ours, idx, 17, cache=cache, config=cfg)
    assert out.shape == (2, 81)
    rep = cache.report()
    assert all(r.decode_blocks == 3 and r.prompt_tokens == 64 for r in rep.layers)
    assert rep.bytes == cache.nbytes()
    assert rep.live_bytes < rep.bf16_bytes  # held bytes include the pools' reserve
    for r in rep.layers:  # 64 prompt + 15 tokens in 3 blocks at 4/2 bits, 1 in the fp tail
        assert sum(r.tokens_at_bits.values()) == 80
        # each class is paged in whole pages of 16; fewer than a page waits at 16 bits
        for bits, n in ((4, r.kept_tokens + r.decode_kept_tokens),
                        (2, 64 - r.kept_tokens + 15 - r.decode_kept_tokens)):  # fmt: skip
            paged = r.tokens_at_bits.get(bits, 0.0)
            assert paged % 16 == 0 and n - 16 < paged <= n, (bits, paged, n)


def test_model_presets() -> None:
    longva = ModelArgs.from_name("longva-7b")
    shape = (longva.n_layer, longva.n_head, longva.n_local_heads, longva.head_dim)
    assert shape == (28, 28, 4, 128)
    assert (longva.dim, longva.intermediate_size, longva.qkv_bias) == (3584, 18944, True)
    assert ModelArgs.from_name("qwen2-7b") == longva
    assert ModelArgs.from_name("tiny").head_dim == 16
    with pytest.raises(ValueError, match=r"unknown model preset 'gpt-9'.*'longva-7b'"):
        ModelArgs.from_name("gpt-9")
    with pytest.raises(ValueError, match=r"n_local_heads: expected a divisor of n_head=4"):
        ModelArgs(n_head=4, n_local_heads=3, dim=64)
    with pytest.raises(ValueError, match=r"dense_layers: expected layer indices < num_layers=2"):
        Transformer(ModelArgs.from_name("tiny"), ZipVLConfig(dense_layers={5}))
