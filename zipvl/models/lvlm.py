"""Tiny vision-language models built in code: random weights, seeded, nothing downloaded.

Two kinds of builders live here (the only models module besides ``hf.py`` that imports
transformers):

* ``build_tiny_model(arch)`` + ``tiny_inputs(model, ...)``: a 2-layer model of each supported
  architecture (``SUPPORTED_ARCHITECTURES``) with matching inputs (placeholder tokens and pixel
  tensors of the right counts). Tests use them; they cost milliseconds on a CPU.
* ``build_demo_lvlm(size)`` + ``synthetic_image`` / ``synthetic_video`` + ``demo_inputs``: the
  LLaVA-style model of ``zipvl demo`` (a CLIP vision tower, a two-layer projector and a
  Qwen2-style language model) whose prompt is mostly visual tokens (hundreds for ``"tiny"``,
  thousands for ``"large"``).

Planted structure (``build_demo_lvlm``). Random weights give near-uniform attention, and with it a
kept ratio close to tau: nothing for ZipVL to find. Worse, every layer of a random model attends
to a different random subset of tokens, while trained LVLMs attend to a fairly stable set of
salient tokens (sinks, the text, a few visual tokens). The demo model therefore gets:

1. one key projection shared by all language-model layers, scaled by ``key_scale``, and one
   query bias (a random vector of scale ``query_bias`` added to every query, all layers): every
   query then shares a component that prefers the same keys, and how strongly a key is
   preferred depends on its token's hidden state. Attention becomes peaky and the set of
   important tokens depends on the input and (through the per-layer query weights and hidden
   states) varies from layer to layer;
2. the embedding of the first prompt token (``BOS``) scaled by ``sink_scale``, as an attention
   sink;
3. a synthetic image and video made of flat regions, so many visual tokens are near-duplicates.

With tau = 0.975 the tiny demo keeps roughly 70 % of its tokens per layer (less with tau =
0.96), against ~93 % for the same model without the planted structure. These numbers say
nothing about trained models. Random models also have near-tied next-token logits, so their
greedy continuations diverge from the dense run after small perturbations; judge accuracy on a
real checkpoint (``zipvl demo --model PATH``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import (
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
    "DEMO_SPECS",
    "SUPPORTED_ARCHITECTURES",
    "DemoSpec",
    "attention_shape",
    "build_demo_lvlm",
    "build_tiny_model",
    "build_tiny_processor",
    "demo_inputs",
    "load_local_model",
    "processor_inputs",
    "synthetic_image",
    "synthetic_video",
    "tiny_inputs",
    "to_pil",
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


# --------------------------------------------------------------------------------------------
# The demo model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSpec:
    """Sizes of the demo LVLM and of its synthetic inputs.

    Attributes:
        hidden: language-model hidden size.
        layers: language-model layers.
        heads: query heads.
        kv_heads: key/value heads.
        vision_hidden: CLIP hidden size.
        vision_layers: CLIP layers.
        image_size: side in pixels of the image and of every video frame (patch 14, so
            ``(image_size / 14)^2`` tokens per picture).
        frames: video frames.
        key_scale: scale of the key projection shared by all layers (planted peaky attention).
        query_bias: scale of the query bias shared by all layers.
        sink_scale: scale of the BOS embedding (planted attention sink).
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vision_hidden: int
    vision_layers: int
    image_size: int
    frames: int
    key_scale: float = 10.0
    query_bias: float = 2.0
    sink_scale: float = 8.0

    @property
    def tokens_per_picture(self) -> int:
        """Visual tokens of one image or one video frame."""
        return (self.image_size // 14) ** 2

    @property
    def visual_tokens(self) -> int:
        """Visual tokens of the prompt: one image plus ``frames`` video frames."""
        return self.tokens_per_picture * (1 + self.frames)


DEMO_SPECS: Mapping[str, DemoSpec] = {
    # (1 image + 7 frames) x 64 tokens = 512 visual tokens; seconds on a CPU.
    "tiny": DemoSpec(
        hidden=128,
        layers=4,
        heads=4,
        kv_heads=2,
        vision_hidden=64,
        vision_layers=2,
        image_size=112,
        frames=7,
    ),
    # the GPU demo: 4 layers of LongVA-7B's language model (hidden 3584, 28 query / 4 KV heads,
    # head dim 128) and (1 image + 255 frames) x 256 tokens = 65536 visual tokens (LongVA's
    # long-video regime). At 16.6k tokens (64 frames) the MLP dominated the prefill (H200:
    # ZipVL 1.00x, bound ~1.2x); at 64k dense attention is most of it, so sparsity pays
    # (``demo_inputs(frames=...)`` / ``zipvl demo --frames`` size it).
    "large": DemoSpec(
        hidden=3584,
        layers=4,
        heads=28,
        kv_heads=4,
        vision_hidden=256,
        vision_layers=4,
        image_size=224,
        frames=255,
    ),
}


def build_demo_lvlm(
    size: Literal["tiny", "large"] = "tiny", *, seed: int = 0
) -> LlavaForConditionalGeneration:
    """The demo's LLaVA-style LVLM: CLIP vision tower + projector + Qwen2-style language model.

    Random weights with planted structure (see the module docstring): a shared, scaled key
    projection and query bias in every language-model layer and a scaled BOS embedding.
    Seeded; the global RNG state is restored afterwards.

    Args:
        size: ``"tiny"`` (CPU, 512 visual tokens) or ``"large"`` (GPU, 65536 visual tokens).
        seed: weight seed.

    Returns:
        The model in eval mode, float32, on the CPU, using SDPA attention.

    Raises:
        ValueError: unknown ``size``.
    """
    if size not in DEMO_SPECS:
        raise ValueError(f"size: expected one of {tuple(DEMO_SPECS)}, got {size!r}")
    spec = DEMO_SPECS[size]
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=max(1, spec.vision_hidden // 32),
        image_size=spec.image_size,
        patch_size=14,
    )
    text = Qwen2Config(
        **_text_kwargs(
            spec.layers, spec.hidden, spec.heads, spec.kv_heads, intermediate_size=3 * spec.hidden
        )
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=(spec.image_size // 14) ** 2,
        vision_feature_select_strategy="default",
    )
    cfg._attn_implementation = "sdpa"
    with _seeded(seed):
        model = LlavaForConditionalGeneration(cfg)
        _plant_structure(model, spec)
    model.eval()
    _quiet_generation_config(model)
    return model


@torch.no_grad()
def _plant_structure(model: LlavaForConditionalGeneration, spec: DemoSpec) -> None:
    lm = model.model.language_model
    layers = list(lm.layers)  # type: ignore[arg-type]
    first = layers[0].self_attn
    assert isinstance(first.k_proj, nn.Linear) and isinstance(first.q_proj, nn.Linear)
    key_weight = first.k_proj.weight * spec.key_scale  # (Hkv*D, E)
    query_bias = spec.query_bias * torch.randn(first.q_proj.out_features)  # (Hq*D,)
    for layer in layers:
        attn = layer.self_attn
        attn.k_proj.weight.copy_(key_weight)
        if attn.q_proj.bias is None:
            raise ValueError("model: the planted query bias needs q_proj biases (Qwen2 style)")
        attn.q_proj.bias.add_(query_bias)
    emb = lm.get_input_embeddings()
    assert isinstance(emb, nn.Embedding)
    emb.weight[BOS].mul_(spec.sink_scale)


def synthetic_image(size: int, *, seed: int = 0) -> Tensor:
    """A normalised RGB image of flat regions: background, two discs and a bar.

    Args:
        size: side in pixels.
        seed: places the shapes.

    Returns:
        (3, size, size) float32, roughly zero-mean and unit-variance.
    """
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")  # (H, W)
    img = torch.empty(3, size, size)
    img[0].fill_(0.2)
    img[1].fill_(0.5)
    img[2].fill_(0.8)
    for _ in range(2):
        cy, cx = (torch.rand(2, generator=gen) * size).tolist()
        r = size * (0.1 + 0.15 * float(torch.rand((), generator=gen)))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r  # (H, W)
        color = torch.rand(3, generator=gen)
        img[:, disc] = color[:, None]
    bar = (xx > size * 0.45) & (xx < size * 0.55)  # (H, W)
    img[:, bar] = torch.tensor([1.0, 1.0, 0.0])[:, None]
    return (img - 0.5) / 0.25


def synthetic_video(frames: int, size: int, *, seed: int = 0) -> Tensor:
    """A normalised clip of a square moving over a static two-tone background.

    Args:
        frames: number of frames.
        size: frame side in pixels.
        seed: picks the colours.

    Returns:
        (frames, 3, size, size) float32.
    """
    gen = torch.Generator().manual_seed(seed)
    bg = torch.rand(3, generator=gen)
    fg = torch.rand(3, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")  # (H, W)
    out = torch.empty(frames, 3, size, size)
    side = max(2, size // 5)
    for f in range(frames):
        out[f] = bg[:, None, None] * torch.where(yy < size // 2, 1.0, 0.6)
        x0 = int((size - side) * f / max(frames - 1, 1))
        sq = (xx >= x0) & (xx < x0 + side) & (yy >= size // 3) & (yy < size // 3 + side)
        out[f][:, sq] = fg[:, None]
    return (out - 0.5) / 0.25


def demo_inputs(
    size: Literal["tiny", "large"] = "tiny",
    *,
    frames: int | None = None,
    text_len: int = 24,
    seed: int = 0,
) -> dict[str, Tensor]:
    """The demo prompt: ``[BOS] <image> <video frames> text``, one row.

    LLaVA takes a video as a sequence of images: every frame goes through the vision tower at
    ``DemoSpec.image_size`` and contributes ``tokens_per_picture`` placeholder tokens.

    Args:
        size: the spec the model was built with (``build_demo_lvlm(size)``).
        frames: video frames (None: ``DEMO_SPECS[size].frames``), >= 0; the prompt length
            grows by ``tokens_per_picture`` per frame.
        text_len: text tokens after the visual block, >= 1.
        seed: seeds the text tokens and the synthetic pixels.

    Returns:
        ``input_ids`` (1, S), ``attention_mask`` (1, S) and ``pixel_values``
        (1 + frames, 3, H, W), with S = 1 + (1 + frames) * tokens_per_picture + text_len.

    Raises:
        ValueError: unknown ``size``, ``frames < 0`` or ``text_len < 1``.
    """
    if size not in DEMO_SPECS:
        raise ValueError(f"size: expected one of {tuple(DEMO_SPECS)}, got {size!r}")
    if text_len < 1:
        raise ValueError(f"text_len: expected an int >= 1, got {text_len}")
    spec = DEMO_SPECS[size]
    if frames is not None:
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 0:
            raise ValueError(f"frames: expected an int >= 0 or None, got {frames!r}")
        spec = dataclasses.replace(spec, frames=frames)
    image = synthetic_image(spec.image_size, seed=seed)  # (3, H, W)
    video = synthetic_video(spec.frames, spec.image_size, seed=seed + 1)  # (F, 3, H, W)
    pixel_values = torch.cat([image[None], video], dim=0)  # (1 + F, 3, H, W)
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, _TEXT_HIGH, (text_len,), generator=gen).tolist()
    ids = [BOS] + [IMAGE_TOKEN] * spec.visual_tokens + text
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": pixel_values,
    }


def attention_shape(model: PreTrainedModel) -> tuple[int, int, int, int]:
    """(layers, query heads, KV heads, head dim) of a transformers model's language model.

    Raises:
        ValueError: the text config lacks the layer or head counts.
    """
    cfg = model.config.get_text_config()
    try:
        layers, hq = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    except AttributeError as err:
        raise ValueError(f"model: its text config has no layer / head counts ({err})") from None
    hkv = int(getattr(cfg, "num_key_value_heads", None) or hq)
    d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // hq)
    return layers, hq, hkv, d


# --------------------------------------------------------------------------------------------
# Local checkpoints (``zipvl demo --model PATH``)
# --------------------------------------------------------------------------------------------


def build_tiny_processor(size: Literal["tiny", "large"] = "tiny") -> Any:
    """A processor for ``build_demo_lvlm(size)``: word-level tokenizer + CLIP image processor.

    The vocabulary is ``w0 .. w255`` with ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` and ``<image>``
    at the ids the tiny models use. Built in code (nothing downloaded), so that a tiny
    checkpoint with a processor can be saved with ``save_pretrained`` and loaded back through
    ``AutoProcessor`` (the ``--model PATH`` path of the demo).

    Returns:
        A ``LlavaProcessor``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    if size not in DEMO_SPECS:
        raise ValueError(f"size: expected one of {tuple(DEMO_SPECS)}, got {size!r}")
    specials = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", 3: "<unk>", IMAGE_TOKEN: "<image>"}
    vocab = {specials.get(i, f"w{i}"): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # type: ignore[assignment]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    side = DEMO_SPECS[size].image_size
    images = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def load_local_model(
    path: str, *, device: str = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, Any]:
    """Load an image-text-to-text checkpoint and its processor from a local directory.

    Args:
        path: a directory written by ``save_pretrained`` (model and processor). Nothing is
            downloaded (``local_files_only``).
        device: where to put the model.
        dtype: weight dtype (None: float32 on the CPU, bfloat16 on CUDA).

    Returns:
        (model in eval mode, processor).

    Raises:
        ValueError: ``path`` is not a directory.
    """
    from pathlib import Path

    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not Path(path).is_dir():
        raise ValueError(f"path: expected a local checkpoint directory, got {path!r}")
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    )
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, processor


def to_pil(image: Tensor) -> Any:
    """A normalised (3, H, W) image (``synthetic_image``) as a PIL RGB image."""
    from PIL import Image

    pixels = ((image * 0.25 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def processor_inputs(
    processor: Any, image: Any, prompt: str = "Describe the image in detail."
) -> dict[str, Tensor]:
    """Build model inputs for one image and a prompt with a checkpoint's processor.

    Uses the processor's chat template when it has one, else ``"<image token>\\n<prompt>"``.

    Args:
        processor: an ``AutoProcessor`` of an image-text-to-text model.
        image: a PIL image.
        prompt: the user text.

    Returns:
        The processor's tensors (``input_ids``, ``attention_mask``, pixels, ...).
    """
    if getattr(processor, "chat_template", None):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        token = getattr(processor, "image_token", None) or "<image>"
        text = f"{token}\n{prompt}"
    out = processor(images=[image], text=[text], return_tensors="pt")
    return dict(out.items())
