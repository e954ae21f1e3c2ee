"""transformers integration: a tiny random Llama generates through ZipVLCache.

Identity settings (16-bit storage, every prefill token committed as kept) must give exactly the
tokens of ``DynamicCache`` with the model's own attention (style I6). Built from a config, never
downloaded; bf16 so that 16-bit storage is lossless.
"""

from __future__ import annotations

from typing import cast

import pytest
import torch
import transformers

from zipvl.cache import ZipVLCache
from zipvl.cache.hf_compat import TRANSFORMERS_VERSION, DynamicCache, check_transformers_version
from zipvl.models import cache_kwargs
from zipvl.quant import IdentityKVQuantizer

NEW_TOKENS = 12


def _model(attn: str, device: str) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(
        config, attn_implementation=attn, dtype=torch.bfloat16
    )
    assert model.config._attn_implementation == attn and model.dtype == torch.bfloat16
    # plain nn.Module.to: pyright cannot follow the decorator transformers puts on its own
    return cast(torch.nn.Module, model).to(device).eval()


def _generate(model: torch.nn.Module, ids: torch.Tensor, cache: object, **kw: object):
    with torch.no_grad():
        return model.generate(  # type: ignore[operator]
            ids,
            **cache_kwargs(model, cache),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            **kw,
        )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_tokens_match_dynamic_cache(device: str, attn: str) -> None:
    model = _model(attn, device)
    ids = torch.randint(1, 97, (2, 9), device=device)
    want = _generate(model, ids, DynamicCache())
    cache = ZipVLCache(2, quantizer=IdentityKVQuantizer(), auto_commit_prefill=True)
    got = _generate(model, ids, cache)
    assert torch.equal(got, want)
    assert len(set(want[:, 9:].flatten().tolist())) > 1  # a non-degenerate continuation
    # the last generated token is never fed back: prompt + NEW_TOKENS - 1 positions
    assert cache.get_seq_length() == 9 + NEW_TOKENS - 1
    rep = cache.report()
    assert [r.kept_ratio for r in rep.layers] == [1.0, 1.0]
    assert rep.layers[0].tokens_at_bits == {16: 9.0 + NEW_TOKENS - 1}


def test_beam_search_reorders_the_cache(device: str) -> None:
    model = _model("sdpa", device)
    ids = torch.randint(1, 97, (2, 7), device=device)
    want = _generate(model, ids, DynamicCache(), num_beams=2)
    cache = ZipVLCache(2, quantizer=IdentityKVQuantizer(), auto_commit_prefill=True)
    calls: list[torch.Tensor] = []
    reorder = cache.reorder_cache

    def spy(beam_idx: torch.Tensor) -> None:
        calls.append(beam_idx.clone())
        reorder(beam_idx)  # type: ignore[arg-type]

    cache.reorder_cache = spy  # type: ignore[method-assign]
    got = _generate(model, ids, cache, num_beams=2)
    assert torch.equal(got, want)
    assert calls and cache.batch_size == 4  # 2 prompts x 2 beams
    moved = [c for c in calls if not torch.equal(c.cpu(), torch.arange(4))]
    assert moved, "beam search never moved a beam: the reorder path was not exercised"


def test_stock_attention_without_commit_raises(device: str) -> None:
    model = _model("sdpa", device)
    ids = torch.randint(1, 97, (1, 5), device=device)
    with pytest.raises(RuntimeError, match="compress_prefill"):
        _generate(model, ids, ZipVLCache(2, quantizer=IdentityKVQuantizer()))


def test_version_gate() -> None:
    assert check_transformers_version("5.17.0") < check_transformers_version("5.23.0")
    assert check_transformers_version("5.18.0.dev0").release[:2] == (5, 18)
    assert check_transformers_version(transformers.__version__) == TRANSFORMERS_VERSION
    for bad in ("5.16.2", "6.0.0", "4.57.1"):
        with pytest.raises(ImportError, match="transformers version"):
            check_transformers_version(bad)


def test_hf_compat_reexports_transformers_names_lazily() -> None:
    from zipvl.cache import hf_compat

    for name in sorted(hf_compat.LAZY_NAMES):
        assert getattr(hf_compat, name) is getattr(transformers, name), name
    with pytest.raises(AttributeError, match="NoSuchModel"):
        hf_compat.NoSuchModel  # noqa: B018
