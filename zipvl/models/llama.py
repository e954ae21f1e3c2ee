"""A single-file reference decoder (Llama / Qwen2 family) with ZipVL attention, gpt-fast style.

Readable on purpose: RMSNorm, rotary embeddings (the "rotate half" convention of Llama and
Qwen2 checkpoints), SwiGLU MLP and grouped-query attention through ``ZipVLAttention``. The same
module runs prefill (the cache is empty: ZipVL token-sparse attention, then the prompt is
committed to the mixed-precision cache) and decode steps (dense attention over the cache), and
``generate`` does greedy decoding. The GPU benchmarks use it with ``ModelArgs.from_name``:

* ``"tiny"``: 2 layers, width 64, 4 query / 2 KV heads (tests);
* ``"qwen2-7b"`` / ``"longva-7b"``: the LongVA-7B language model (Qwen2-7B shapes): 28 layers,
  28 query heads, 4 KV heads, head dim 128, hidden 3584, MLP 18944, qkv bias, rope base 1e6.

Dense baseline: ``ZipVLConfig.preset("dense")`` (tau 1, 16-bit cache) runs exactly dense causal
attention and an unquantized cache. Weights are random unless loaded by the caller (the layout
follows the transformers names of Llama / Qwen2, so a state dict maps one-to-one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from zipvl.cache import ZipVLCache
from zipvl.checks import check_tensor
from zipvl.config import ZipVLConfig
from zipvl.models.attention import ZipVLAttention, make_cache

__all__ = [
    "TRANSFORMER_CONFIGS",
    "ModelArgs",
    "RMSNorm",
    "RotaryEmbedding",
    "Transformer",
    "TransformerBlock",
    "generate",
]


@dataclass(frozen=True)
class ModelArgs:
    """Shapes of the decoder.

    Attributes:
        vocab_size: V.
        n_layer: L.
        n_head: Hq.
        n_local_heads: Hkv (-1: = n_head).
        dim: model width E.
        head_dim: D (0: dim // n_head).
        intermediate_size: MLP width (0: the Llama rule, 2/3 * 4E rounded up to 256).
        rope_base: rotary base theta.
        norm_eps: RMSNorm epsilon.
        qkv_bias: biases on the q/k/v projections (Qwen2).
        max_positions: longest sequence the rotary table covers.
    """

    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_local_heads: int = -1
    dim: int = 4096
    head_dim: int = 0
    intermediate_size: int = 0
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    max_positions: int = 32768

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "dim", "max_positions"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {val!r}")
        if self.n_local_heads == -1:
            object.__setattr__(self, "n_local_heads", self.n_head)
        if self.n_local_heads < 1 or self.n_head % self.n_local_heads:
            raise ValueError(
                f"n_local_heads: expected a divisor of n_head={self.n_head}, "
                f"got {self.n_local_heads}"
            )
        if self.head_dim == 0:
            if self.dim % self.n_head:
                raise ValueError(
                    f"head_dim: dim={self.dim} is not divisible by n_head={self.n_head}; "
                    "give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_head)
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim: expected an even int >= 2, got {self.head_dim}")
        if self.intermediate_size == 0:
            hidden = int(2 * (4 * self.dim) / 3)
            object.__setattr__(self, "intermediate_size", -(-hidden // 256) * 256)
        if self.intermediate_size < 1:
            raise ValueError(
                f"intermediate_size: expected an int >= 1, got {self.intermediate_size}"
            )
        if not self.rope_base > 0:
            raise ValueError(f"rope_base: expected a positive float, got {self.rope_base}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelArgs:
        """Preset shapes from ``TRANSFORMER_CONFIGS``.

        Args:
            name: a key of ``TRANSFORMER_CONFIGS``.
            **overrides: fields to replace (e.g. ``n_layer=2`` for a short benchmark).

        Raises:
            ValueError: unknown ``name`` (the message lists the presets).
        """
        if name not in TRANSFORMER_CONFIGS:
            raise ValueError(
                f"name: unknown model preset {name!r}; "
                f"expected one of {sorted(TRANSFORMER_CONFIGS)}"
            )
        return cls(**{**TRANSFORMER_CONFIGS[name], **overrides})


_QWEN2_7B: dict[str, Any] = dict(
    vocab_size=152064,
    n_layer=28,
    n_head=28,
    n_local_heads=4,
    dim=3584,
    intermediate_size=18944,
    rope_base=1_000_000.0,
    norm_eps=1e-6,
    qkv_bias=True,
    max_positions=131072,
)

TRANSFORMER_CONFIGS: Mapping[str, Mapping[str, Any]] = {
    "tiny": dict(
        vocab_size=256, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128
    ),
    "small": dict(
        vocab_size=1024, n_layer=4, n_head=8, n_local_heads=2, dim=512, intermediate_size=1408
    ),
    "qwen2-7b": _QWEN2_7B,
    # LongVA-7B's language model is Qwen2-7B-Instruct-224K
    # (docs/decisions.md#model-facts-used-by-the-benchmarks)
    "longva-7b": _QWEN2_7B,
    "llama-2-7b": dict(n_layer=32, n_head=32, dim=4096, intermediate_size=11008),
}
"""Model presets: name -> ``ModelArgs`` fields."""


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / rms(x) * weight``, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., E) -> (..., E) in x's dtype."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, "rotate half" layout (Llama / Qwen2 checkpoints).

    Called as the ``ZipVLAttention`` rotary hook: ``(q, k, positions) -> (q, k)``.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (D / 2,)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions (B, S) -> cos, sin (B, 1, S, D) in ``dtype``."""
        freqs = positions.float()[..., None] * self.inv_freq  # (B, S, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (B, S, D)
        return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)

    def forward(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate q (B, Hq, S, D) and k (B, Hkv, S, D) by positions (B, S)."""
        cos, sin = self.cos_sin(positions, q.dtype)  # (B, 1, S, D)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class FeedForward(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, S, E) -> (B, S, E)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(
        self, args: ModelArgs, layer_idx: int, rotary: RotaryEmbedding, config: ZipVLConfig
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = ZipVLAttention(
            args.dim,
            args.n_head,
            args.n_local_heads,
            args.head_dim,
            layer_idx=layer_idx,
            config=config,
            rotary=rotary,
            qkv_bias=args.qkv_bias,
        )
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(
        self,
        x: Tensor,
        *,
        cache: ZipVLCache | None,
        positions: Tensor,
        key_valid: Tensor | None,
        config: ZipVLConfig | None,
    ) -> Tensor:
        """x (B, S, E) -> (B, S, E)."""
        h = x + self.self_attn(
            self.input_layernorm(x),
            cache=cache,
            positions=positions,
            key_valid=key_valid,
            config=config,
        )
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """Decoder-only language model with ZipVL attention in every layer.

    Args:
        args: shapes.
        config: ZipVL configuration (None: ``ZipVLConfig()``); ``forward`` may override it.

    Example::

        model = Transformer(ModelArgs.from_name("tiny"))
        cache = model.new_cache()
        logits = model(prompt, cache=cache)                  # prefill, prompt (B, S)
        logits = model(next_tok, cache=cache)                # decode, next_tok (B, 1)
        tokens = generate(model, prompt, max_new_tokens=32)  # greedy
    """

    def __init__(self, args: ModelArgs, config: ZipVLConfig | None = None) -> None:
        super().__init__()
        self.args = args
        self.config = config if config is not None else ZipVLConfig()
        self.config.check_num_layers(args.n_layer)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.rotary = RotaryEmbedding(args.head_dim, args.rope_base)
        self.layers = nn.ModuleList(
            TransformerBlock(args, i, self.rotary, self.config) for i in range(args.n_layer)
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)

    def new_cache(self, config: ZipVLConfig | None = None) -> ZipVLCache:
        """A fresh ``ZipVLCache`` for this model (``make_cache``)."""
        return make_cache(config if config is not None else self.config, self.args.n_layer)

    def forward(
        self,
        idx: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        cache: ZipVLCache | None = None,
        key_valid: Tensor | None = None,
        positions: Tensor | None = None,
        config: ZipVLConfig | None = None,
    ) -> Tensor:
        """Prefill (empty cache or no cache) or decode step (the cache holds tokens).

        Args:
            idx: (B, S) token ids, or None with ``inputs_embeds``.
            inputs_embeds: (B, S, E) embeddings (e.g. visual tokens already projected).
            cache: optional ``ZipVLCache`` (``new_cache``); None runs one prefill, storing nothing.
            key_valid: optional bool padding mask, True = real token ((B, S) in prefill, (B, N)
                over all positions in decode).
            positions: optional (B, S) or (S,) rotary positions (default: cache length +
                arange(S); with left padding, pass positions that start at 0 on each row).
            config: per-call ZipVL configuration (default: the model's).

        Returns:
            (B, S, V) float logits.
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError(
                "idx, inputs_embeds: expected exactly one of them, got both or neither"
            )
        if idx is not None:
            check_tensor("idx", idx, ndim=2, dtype=(torch.int64, torch.int32))
            x = self.embed_tokens(idx)  # (B, S, E)
        else:
            x = check_tensor("inputs_embeds", inputs_embeds, ndim=3, floating=True)
        b, s = x.shape[:2]
        offset = 0 if cache is None else cache.get_seq_length(0)
        if positions is None:
            positions = torch.arange(offset, offset + s, device=x.device)
        positions = positions.expand(b, s) if positions.ndim == 1 else positions  # (B, S)
        for layer in self.layers:
            x = layer(x, cache=cache, positions=positions, key_valid=key_valid, config=config)
        return self.lm_head(self.norm(x))  # (B, S, V)

    @classmethod
    def from_name(
        cls, name: str, config: ZipVLConfig | None = None, **overrides: Any
    ) -> Transformer:
        """A randomly initialised model of a preset shape (``ModelArgs.from_name``)."""
        return cls(ModelArgs.from_name(name, **overrides), config)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    cache: ZipVLCache | None = None,
    config: ZipVLConfig | None = None,
    key_valid: Tensor | None = None,
) -> Tensor:
    """Greedy decoding: one prefill, then ``max_new_tokens - 1`` decode steps.

    Args:
        model: the decoder.
        prompt: (B, S) token ids.
        max_new_tokens: tokens to generate, >= 1.
        cache: optional empty ``ZipVLCache`` (default: ``model.new_cache(config)``); inspect it
            afterwards (``cache.report()``).
        config: per-call ZipVL configuration (default: the model's).
        key_valid: optional (B, S) bool prompt padding mask; rows must be LEFT-padded (new
            tokens are appended on the right). Rotary positions then start at 0 on the first
            real token of each row.

    Returns:
        (B, S + max_new_tokens) the prompt followed by the generated tokens.
    """
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    cache = model.new_cache(config) if cache is None else cache
    if cache.get_seq_length(0) != 0:
        raise ValueError(
            f"cache: expected an empty cache, it holds {cache.get_seq_length(0)} positions"
        )
    b = prompt.shape[0]
    positions = None
    if key_valid is not None:
        positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, S), 0 at first token
    logits = model(prompt, cache=cache, key_valid=key_valid, positions=positions, config=config)
    tokens = [logits[:, -1].argmax(-1)]  # (B,)
    valid = key_valid
    next_pos = None if positions is None else positions[:, -1:] + 1  # (B, 1)
    for _ in range(max_new_tokens - 1):
        if valid is not None:
            valid = torch.cat([valid, valid.new_ones(b, 1)], dim=1)  # (B, N)
        logits = model(
            tokens[-1][:, None], cache=cache, key_valid=valid, positions=next_pos, config=config
        )
        if next_pos is not None:
            next_pos = next_pos + 1
        tokens.append(logits[:, -1].argmax(-1))
    return torch.cat([prompt, torch.stack(tokens, dim=1)], dim=1)
