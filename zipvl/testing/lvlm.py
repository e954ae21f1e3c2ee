"""Tiny transformers models of every supported architecture, built in code for tests.

``build_tiny_model(arch)`` + ``tiny_inputs(model, ...)``: a 2-layer model of each supported
architecture (``SUPPORTED_ARCHITECTURES``) with matching inputs (placeholder tokens and pixel
tensors of the right counts). Random weights, seeded, nothing downloaded; they cost milliseconds
on a CPU. The demo's LLaVA-style model is in ``zipvl.testing.demo_lvlm`` and shares the token
ids defined here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor

from zipvl.cache.hf_compat import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)

__all__ = [
    "BOS",
    "EOS",
    "IMAGE_TOKEN",
    "PAD",
    "SUPPORTED_ARCHITECTURES",
    "VIDEO_TOKEN",
    "VISION_END",
    "VISION_START",
    "VOCAB",
    "build_tiny_model",
    "tiny_inputs",
]

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "qwen2",
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
)
"""Short names of the architectures ``zipvl.enable`` supports, one tiny builder each."""

# Token ids shared by the tiny models (vocabulary of 256).
VOCAB = 256
PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 255, 254, 253, 252
_TEXT_HIGH = 250  # text tokens are drawn from [3, _TEXT_HIGH)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the block with ``torch.manual_seed(seed)``, then restore every global RNG state.

    ``torch.manual_seed`` reseeds the CPU generator and every CUDA device's, so the CUDA
    states are forked too whenever CUDA is available (``fork_rng(devices=[])`` would leave
    them reseeded).
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _text_kwargs(num_layers: int, hidden: int, heads: int, kv_heads: int, **extra: Any) -> dict:
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    kw.update(extra)
    return kw


def _vision_kwargs(image_size: int) -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
    )


def build_tiny_model(
    arch: str,
    *,
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A tiny random model of one supported architecture, in eval mode, float32, on the CPU.

    Args:
        arch: one of ``SUPPORTED_ARCHITECTURES``.
        num_layers: decoder layers of the language model.
        hidden: hidden size of the language model (head dim = hidden // heads).
        heads: query heads.
        kv_heads: key/value heads (GQA when smaller than ``heads``).
        seed: seeds the weight initialisation (the global RNG state is restored afterwards).
        attn_implementation: the model's own attention (``"sdpa"`` or ``"eager"``).

    Returns:
        The model. Vision towers are 2-layer, 32-wide; images are 56 x 56 pixels (16 patches).

    Raises:
        ValueError: unknown ``arch``.
    """
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"arch: expected one of {SUPPORTED_ARCHITECTURES}, got {arch!r}")
    text = _text_kwargs(num_layers, hidden, heads, kv_heads)
    grid = [[56, 112], [112, 56]]
    cls: type[PreTrainedModel]
    if arch == "llama":
        cfg: Any = LlamaConfig(**text)
        cls = LlamaForCausalLM
    elif arch == "qwen2":
        cfg = Qwen2Config(**text)
        cls = Qwen2ForCausalLM
    elif arch == "llava":
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(**_vision_kwargs(56)),
            text_config=LlamaConfig(**text),
            image_token_index=IMAGE_TOKEN,
            image_seq_length=16,
        )
        cls = LlavaForConditionalGeneration
    elif arch == "llava_next":
        cfg = LlavaNextConfig(
            vision_config=CLIPVisionConfig(**_vision_kwargs(56)),
            text_config=LlamaConfig(**text),
            image_token_index=IMAGE_TOKEN,
            image_grid_pinpoints=grid,
        )
        cls = LlavaNextForConditionalGeneration
    elif arch == "llava_onevision":
        vis = _vision_kwargs(56)
        cfg = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vis),
            text_config=Qwen2Config(**text),
            image_token_index=IMAGE_TOKEN,
            video_token_index=VIDEO_TOKEN,
            image_grid_pinpoints=grid,
        )
        cls = LlavaOnevisionForConditionalGeneration
    else:
        head_dim = hidden // heads
        # mrope sections are in units of rotary pairs and must sum to head_dim / 2
        half = head_dim // 2
        t_sec = half // 4
        h_sec = (half - t_sec) // 2
        section = [t_sec, h_sec, half - t_sec - h_sec]
        text_mrope = _text_kwargs(
            num_layers,
            hidden,
            heads,
            kv_heads,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": section,
            },
        )
        ids: dict[str, Any] = dict(
            image_token_id=IMAGE_TOKEN,
            video_token_id=VIDEO_TOKEN,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )
        if arch == "qwen2_vl":
            vision: dict[str, Any] = dict(
                depth=2,
                embed_dim=32,
                hidden_size=hidden,
                num_heads=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
            )
            cfg = Qwen2VLConfig(text_config=text_mrope, vision_config=vision, **ids)
            cls = Qwen2VLForConditionalGeneration
        else:
            vision: dict[str, Any] = dict(
                depth=2,
                hidden_size=32,
                out_hidden_size=hidden,
                intermediate_size=64,
                num_heads=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                fullatt_block_indexes=[1],
                window_size=56,
            )
            cfg = Qwen2_5_VLConfig(text_config=text_mrope, vision_config=vision, **ids)
            cls = Qwen2_5_VLForConditionalGeneration
    cfg._attn_implementation = attn_implementation
    with _seeded(seed):
        model = cls(cfg)
    model.eval()
    _quiet_generation_config(model)
    return model


def _quiet_generation_config(model: PreTrainedModel) -> None:
    # Give generate() the ids it would otherwise warn about on every call.
    gen = model.generation_config
    gen.pad_token_id = PAD
    gen.bos_token_id = BOS
    gen.eos_token_id = None  # random weights: never stop early, so runs have a known length


def _arch_of(model: PreTrainedModel) -> str:
    names = {
        LlamaForCausalLM: "llama",
        Qwen2ForCausalLM: "qwen2",
        LlavaForConditionalGeneration: "llava",
        LlavaNextForConditionalGeneration: "llava_next",
        LlavaOnevisionForConditionalGeneration: "llava_onevision",
        Qwen2VLForConditionalGeneration: "qwen2_vl",
        Qwen2_5_VLForConditionalGeneration: "qwen2_5_vl",
    }
    for cls, name in names.items():
        if isinstance(model, cls):
            return name
    raise ValueError(
        f"model: expected a model built by build_tiny_model ({SUPPORTED_ARCHITECTURES}), "
        f"got {type(model).__name__}"
    )


def _count_features(out: Any) -> int:
    # get_*_features return a tensor, a list of tensors or an output object across versions
    if hasattr(out, "pooler_output") and out.pooler_output is not None:
        out = out.pooler_output
    elif hasattr(out, "last_hidden_state") and not isinstance(out, (list, tuple, Tensor)):
        out = out.last_hidden_state
    if isinstance(out, (list, tuple)):
        return sum(_count_features(o) for o in out)
    assert isinstance(out, Tensor)
    return int(out.shape[0] * out.shape[1]) if out.ndim == 3 else int(out.shape[0])


def tiny_inputs(
    model: PreTrainedModel,
    *,
    batch: int = 1,
    text_len: int = 8,
    visual: Literal["image", "video", "none"] = "image",
    pad: int = 0,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Inputs for a model from ``build_tiny_model``: one image (or video) per row + text.

    Each row is ``[BOS, visual tokens..., text...]``. With ``pad > 0`` rows after the first are
    LEFT-padded by ``pad * row_index`` tokens (and their text is shortened by as much), so the
    batch has rows of different lengths, as ``generate`` expects for decoder-only models.

    Args:
        model: a tiny model (its class decides the visual inputs).
        batch: rows.
        text_len: text tokens after the visual block, >= 1.
        visual: ``"image"``, ``"video"`` (LLaVA-OneVision and Qwen2-VL family only; the text
            models ignore it) or ``"none"``.
        pad: left padding step per row.
        seed: seeds the token and pixel draws (global RNG state untouched).

    Returns:
        ``input_ids``, ``attention_mask`` and the pixel tensors the architecture needs.

    Raises:
        ValueError: bad counts, or ``visual="video"`` for an architecture without video input.
    """
    if batch < 1 or text_len < 1 or pad < 0 or pad * (batch - 1) >= text_len:
        raise ValueError(
            f"batch, text_len, pad: expected batch >= 1, text_len >= 1 and pad * (batch - 1) < "
            f"text_len, got batch={batch}, text_len={text_len}, pad={pad}"
        )
    arch = _arch_of(model)
    gen = torch.Generator().manual_seed(seed)
    extra: dict[str, Tensor] = {}
    start: list[int] = []
    end: list[int] = []
    n_vis = 0
    token = IMAGE_TOKEN
    if arch in ("llama", "qwen2") or visual == "none":
        pass
    elif visual == "video" and arch not in ("llava_onevision", "qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"visual: {arch} has no video input, got visual='video'")
    elif arch == "llava":
        extra["pixel_values"] = torch.randn(batch, 3, 56, 56, generator=gen)
        n_vis = 16
    elif arch in ("llava_next", "llava_onevision") and visual == "image":
        pv = torch.randn(batch, 3, 3, 56, 56, generator=gen)  # (B, patches, C, H, W)
        sizes = torch.tensor([[56, 112]] * batch)
        with torch.no_grad():
            n_vis = _count_features(model.model.get_image_features(pv[:1], sizes[:1]))  # type: ignore[operator]
        extra.update(pixel_values=pv, image_sizes=sizes)
    elif arch == "llava_onevision":
        vid = torch.randn(batch, 4, 3, 56, 56, generator=gen)  # (B, frames, C, H, W)
        with torch.no_grad():
            n_vis = _count_features(model.model.get_video_features(vid[:1]))  # type: ignore[operator]
        if n_vis % vid.shape[1] == 0:
            # transformers < 5.2x appends the video's newline token in forward(), not in
            # get_video_features(): frames * pooled tokens, plus that one token
            n_vis += 1
        extra["pixel_values_videos"] = vid
        token = VIDEO_TOKEN
    else:  # qwen2_vl / qwen2_5_vl: flattened patches + (t, h, w) grid
        t = 1 if visual == "image" else 2
        thw = torch.tensor([[t, 8, 8]] * batch)
        patches = torch.randn(batch * t * 64, 3 * 14 * 14 * 2, generator=gen)
        n_vis = t * 64 // 4
        if visual == "image":
            extra.update(pixel_values=patches, image_grid_thw=thw)
        else:
            extra.update(pixel_values_videos=patches, video_grid_thw=thw)
            token = VIDEO_TOKEN
        start, end = [VISION_START], [VISION_END]
    rows, masks = [], []
    width = 1 + len(start) + n_vis + len(end) + text_len
    for r in range(batch):
        n_pad = pad * r
        text = torch.randint(3, _TEXT_HIGH, (text_len - n_pad,), generator=gen).tolist()
        ids = [PAD] * n_pad + [BOS] + start + [token] * n_vis + end + text
        rows.append(ids)
        masks.append([0] * n_pad + [1] * (width - n_pad))
    return {
        "input_ids": torch.tensor(rows),
        "attention_mask": torch.tensor(masks),
        **extra,
    }
