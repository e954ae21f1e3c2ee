"""The fused decode attention over the packed cache against dense float64 attention.

Tolerance (the 2x rule): the fused kernel's error against float64 attention over the same
dequantized cache is at most twice the error of the plain PyTorch path in the input dtype
(dequantize to that dtype, then SDPA), plus a float32 band. On the CPU the kernel runs under
TRITON_INTERPRET=1 (conftest); its dots are fp16 internally, which the interpreter models
faithfully, so bf16 inputs are fine there.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from zipvl.cache import ZipVLCache
from zipvl.decode import decode_attention, decode_read_bytes, layer_segments
from zipvl.quant import (
    IdentityKVQuantizer,
    KIVIKVQuantizer,
    MixedPrecisionKVQuantizer,
    ZipCacheKVQuantizer,
)

# (B, Hq, Hkv, D, prompt, decode steps): GQA, batch > 1, lengths off the 64-token tile
CASES = [(2, 6, 2, 64, 37, 11), (1, 4, 1, 64, 130, 9)]


def _triton_runs(device: str) -> bool:
    """Where the fused kernel runs: CUDA, or any device under TRITON_INTERPRET=1."""
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _random_keep(b: int, h: int, t: int, kept: int) -> torch.Tensor:
    keep = torch.zeros(b, h, t, dtype=torch.bool)
    for i in range(b):
        for j in range(h):
            keep[i, j, torch.randperm(t)[:kept]] = True
    return keep


def _filled_cache(case: tuple[int, ...], device: str, dtype: torch.dtype, quantizer=None):
    b, hq, hkv, d, s, steps = case
    cache = ZipVLCache(1, recompress_every=8, sink_tokens=2, quantizer=quantizer)
    k = torch.randn(b, hkv, s, d, device=device, dtype=dtype)
    v = torch.randn(b, hkv, s, d, device=device, dtype=dtype)
    cache.prefill(0, k, v, _random_keep(b, hkv, s, s // 3).to(device))
    for _ in range(steps):  # crosses a recompression boundary: a decode chunk + the fp tail
        q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
        kn = torch.randn(b, hkv, 1, d, device=device, dtype=dtype)
        vn = torch.randn(b, hkv, 1, d, device=device, dtype=dtype)
        cache.decode_step(0, q, kn, vn)
    return cache


# mixed precision as ZipVL stores it (4/2 bits), and 8/4 bits (one packed field per byte for keys)
QUANTIZERS = {
    "4/2": MixedPrecisionKVQuantizer(),
    "8/4": MixedPrecisionKVQuantizer(ZipCacheKVQuantizer(8), ZipCacheKVQuantizer(4)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", sorted(QUANTIZERS))
@pytest.mark.parametrize("block_t", [16, None])  # None: the autotuned kernel on CUDA
def test_fused_decode_matches_dense(
    case: tuple[int, ...], dtype: torch.dtype, bits: str, block_t: int | None, device: str
) -> None:
    b, hq, _, d, _, _ = case
    cache = _filled_cache(case, device, dtype, quantizer=QUANTIZERS[bits])
    segs = layer_segments(cache.layer(0))
    assert len(cache.layer(0).chunks) == 2  # the prefill chunk and one decode block
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
    k, v = cache.dense_kv(0, torch.float64)
    ref = F.scaled_dot_product_attention(q.double(), k, v, enable_gqa=True)
    kd, vd = cache.dense_kv(0, dtype)
    plain = F.scaled_dot_product_attention(q, kd, vd, enable_gqa=True)
    if not _triton_runs(device):  # CPU tensors on a CUDA machine: the fast path must refuse
        with pytest.raises(ValueError, match="needs a CUDA tensor"):
            decode_attention(q, segs, impl="triton")
        return
    fused = decode_attention(q, segs, impl="triton", block_t=block_t)
    oracle = decode_attention(q, segs, impl="reference")
    assert fused.shape == (b, hq, 1, d) and fused.dtype == dtype
    plain_err = (plain.double() - ref).abs().max().item()
    fused_err = (fused.double() - ref).abs().max().item()
    assert fused_err <= 2 * plain_err + 1e-4, (fused_err, plain_err)
    # the float32 reference merge is exact up to float32 rounding
    assert (oracle.double() - ref).abs().max().item() <= 2 * plain_err + 1e-4


def test_identity_cache_decode_equals_sdpa(device: str) -> None:
    """16-bit parts: the fused entry point merges their float32 states with the same LSE merge
    the kernel's states go through (the kernel itself reads only quantized parts)."""
    cache = _filled_cache(CASES[0], device, torch.float32, quantizer=IdentityKVQuantizer())
    q = torch.randn(2, 6, 1, 64, device=device)
    k, v = cache.dense_kv(0)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    impl = "triton" if _triton_runs(device) else "reference"
    got = decode_attention(q, layer_segments(cache.layer(0)), impl=impl)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_read_bytes_counts_every_stored_tensor(device: str) -> None:
    cache = _filled_cache(CASES[0], device, torch.bfloat16)
    layer = cache.layer(0)
    segs = layer_segments(layer)
    bitmaps = sum(c.keep.nbytes for c in layer.chunks if c.keep is not None)
    assert decode_read_bytes(segs) == cache.nbytes() - bitmaps


def _triton_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"  # CPU: conftest's interpreter


def test_unsupported_layout_raises_for_triton() -> None:
    dev = _triton_device()
    cache = _filled_cache(CASES[0], dev, torch.float32, quantizer=KIVIKVQuantizer(2, 16))
    q = torch.randn(2, 6, 1, 64, device=dev)
    segs = layer_segments(cache.layer(0))
    with pytest.raises(ValueError, match="impl='triton' reads keys quantized per channel"):
        decode_attention(q, segs, impl="triton")
    decode_attention(q, segs, impl="reference")  # the oracle reads any layout


def test_bad_inputs_raise() -> None:
    dev = _triton_device()
    kv = torch.randn(1, 2, 8, 16, device=dev)
    chunk = MixedPrecisionKVQuantizer().quantize(kv, kv)
    with pytest.raises(ValueError, match="one decoding query"):
        decode_attention(torch.randn(1, 4, 2, 16, device=dev), [chunk])
    with pytest.raises(ValueError, match="impl"):
        decode_attention(torch.randn(1, 4, 1, 16, device=dev), [chunk], impl="cuda")
    with pytest.raises(ValueError, match=r"segments\[0\]"):
        decode_attention(torch.randn(1, 4, 1, 32, device=dev), [chunk])
    with pytest.raises(ValueError, match="at least one"):
        decode_attention(torch.randn(1, 4, 1, 16, device=dev), [])
    with pytest.raises(ValueError, match="head_dim \\* bits / 8 >= 16"):
        decode_attention(torch.randn(1, 4, 1, 16, device=dev), [chunk])  # 2-bit, D = 16
    q = torch.randn(1, 4, 1, 16, device=dev)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="scale"):
            decode_attention(q, [chunk], scale=bad, impl="reference")
    for bad_t in (16.0, 8, 48):
        with pytest.raises(ValueError, match="block_t"):
            decode_attention(q, [chunk], block_t=bad_t, impl="reference")  # type: ignore[arg-type]
    cache = ZipVLCache(1)
    cache.update(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), 0)
    with pytest.raises(ValueError, match="compress_prefill"):
        layer_segments(cache.layer(0))


def _decoder_logits(decode_impl: str, device: str, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Teacher-forced decode of the reference decoder: logits of every step."""
    from zipvl import ZipVLConfig
    from zipvl.models.llama import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny", dim=256, n_head=4, n_local_heads=2)  # head dim 64
    model = Transformer(args).to(device).eval()
    cfg = ZipVLConfig(recompress_every=8, decode_impl=decode_impl)  # type: ignore[arg-type]
    cache = model.new_cache(cfg)
    out = []
    with torch.no_grad():
        model(tokens[:, :40], cache=cache, config=cfg)
        for i in range(40, tokens.shape[1]):  # crosses two recompression boundaries
            out.append(model(tokens[:, i : i + 1], cache=cache, config=cfg)[:, -1])
    assert len(cache.layer(0).chunks) == 3  # prefill chunk + two decode blocks
    return out


def test_reference_decoder_fused_decode_matches_reference(device: str) -> None:
    tokens = torch.randint(0, 256, (2, 58), device=device)
    if not _triton_runs(device):
        with pytest.raises(ValueError, match="needs a CUDA tensor"):
            _decoder_logits("triton", device, tokens)
        return
    fused = _decoder_logits("triton", device, tokens)
    ref = _decoder_logits("reference", device, tokens)
    for step, (a, b) in enumerate(zip(fused, ref, strict=True)):
        # same stored cache, read two ways: fp16 operands in the kernel vs fp32 dequantization
        err = (a - b).abs().max().item()
        assert err <= 5e-4 * b.abs().max().item(), (step, err)  # measured: 6e-5


def test_fused_decode_request_that_cannot_run_raises() -> None:
    from zipvl import ZipVLConfig, zipvl_attention
    from zipvl.models import make_cache

    dev = _triton_device()
    cfg = ZipVLConfig(decode_impl="triton")
    cache = make_cache(cfg, 1)
    q = torch.randn(1, 4, 20, 64, device=dev)
    k = torch.randn(1, 2, 20, 64, device=dev)
    zipvl_attention(q, k, k, config=cfg, cache=cache)  # prefill
    q1, k1 = q[:, :, :1], k[:, :, :1]
    with pytest.raises(ValueError, match="decode_impl: 'triton' needs no padding mask"):
        valid = torch.ones(1, 21, dtype=torch.bool, device=dev)
        zipvl_attention(q1, k1, k1, config=cfg, cache=cache, key_valid=valid)
    with pytest.raises(ValueError, match="decode_impl"):
        ZipVLConfig(decode_impl="cuda")  # type: ignore[arg-type]
