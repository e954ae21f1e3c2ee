"""The LLaVA-style model of ``zipvl demo``, its synthetic inputs and local checkpoints.

* ``build_demo_lvlm(size)`` + ``synthetic_image`` / ``synthetic_video`` + ``demo_inputs``: a CLIP
  vision tower, a two-layer projector and a Qwen2-style language model, random weights, seeded,
  nothing downloaded, whose prompt is mostly visual tokens (hundreds for ``"tiny"``, thousands for
  ``"large"``);
* ``build_tiny_processor`` / ``load_local_model`` / ``processor_inputs`` / ``to_pil``: a
  processor built in code, and the ``zipvl demo --model PATH`` path for saved checkpoints.

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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zipvl.cache.hf_compat import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    Qwen2Config,
)
from zipvl.testing.lvlm import (
    _TEXT_HIGH,
    BOS,
    EOS,
    IMAGE_TOKEN,
    PAD,
    VOCAB,
    _quiet_generation_config,
    _seeded,
    _text_kwargs,
)

__all__ = [
    "DEMO_SPECS",
    "DemoSpec",
    "attention_shape",
    "build_demo_lvlm",
    "build_tiny_processor",
    "demo_inputs",
    "load_demo_lvlm_tp",
    "load_local_model",
    "processor_inputs",
    "synthetic_image",
    "synthetic_video",
    "to_pil",
]


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

    from zipvl.cache.hf_compat import (
        CLIPImageProcessor,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

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
    path: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    tensor_parallel: bool = False,
) -> tuple[PreTrainedModel, Any]:
    """Load an image-text-to-text checkpoint and its processor from a local directory.

    Args:
        path: a directory written by ``save_pretrained`` (model and processor). Nothing is
            downloaded (``local_files_only``).
        device: where to put the model (ignored with ``tensor_parallel``: transformers puts
            every rank's shard on its own device).
        dtype: weight dtype (None: float32 on the CPU, bfloat16 on CUDA).
        tensor_parallel: shard the model over the ``torchrun`` processes (``tp_plan="auto"``).

    Returns:
        (model in eval mode, processor).

    Raises:
        ValueError: ``path`` is not a directory.
    """
    from pathlib import Path

    from zipvl.cache.hf_compat import AutoModelForImageTextToText, AutoProcessor

    if not Path(path).is_dir():
        raise ValueError(f"path: expected a local checkpoint directory, got {path!r}")
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    extra: dict[str, Any] = {"tp_plan": "auto"} if tensor_parallel else {}
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, local_files_only=True, attn_implementation="sdpa", **extra
    )
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    if not tensor_parallel:
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, processor


def load_demo_lvlm_tp(
    size: Literal["tiny", "large"] = "tiny", *, seed: int = 0, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """``build_demo_lvlm(size, seed=seed)`` sharded over the ``torchrun`` processes.

    Every rank builds the same seeded model, saves it to a temporary directory of its own (no
    rank waits for another before the process group exists) and loads it back with
    ``tp_plan="auto"``: transformers creates the process group (gloo on the CPU, NCCL on
    CUDA), shards the language model's heads and places each shard on the rank's device.

    Returns:
        The sharded model, in eval mode.
    """
    import tempfile

    model = build_demo_lvlm(size, seed=seed)
    with tempfile.TemporaryDirectory(prefix="zipvl_demo_tp_") as where:
        model.save_pretrained(where)
        del model
        sharded = LlavaForConditionalGeneration.from_pretrained(
            where, tp_plan="auto", dtype=dtype, local_files_only=True
        )
    sharded.eval()
    _quiet_generation_config(sharded)
    return sharded


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
