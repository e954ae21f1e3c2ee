"""ZipVL vs dense on one model and one input: how much does the output change, and why.

``evaluate(model, inputs, config)`` runs a supported transformers model (``zipvl.models.hf``)
twice on the same inputs:

1. dense (the model's own attention): a greedy continuation of ``max_new_tokens`` tokens and
   the logits of the first generated position;
2. ZipVL, teacher-forced on the dense continuation: at every step the model sees the dense
   tokens so far and its own greedy choice is recorded (so one early difference does not make
   every later comparison meaningless), plus the first-step logits and, per layer, what the
   prefill kept.

Metrics (``EvalReport``):

* ``agreement``: next-token top-1 agreement with the dense greedy continuation;
* ``kl_first``: KL(dense || ZipVL) of the first-step next-token distributions (nats, batch mean);
* per layer: kept ratio and the attention mass retained by the kept keys, the fraction of the
  full causal attention mass that falls on them (all query rows on short prompts, evenly
  spaced rows otherwise: ``zipvl.models.retained_attention_mass``);
* the cache report's totals (kept ratio, attention-FLOP reduction, KV compression).

transformers-free: the generation helpers live in ``zipvl.models.hf``.

The budget-estimator measurement (probe-estimated vs full-attention Eq. 6 budgets per layer on a
real causal LM) lives in ``zipvl.eval_budget`` and is re-exported here:
``measure_budget_estimator``, ``BudgetEstimatorReport``, ``layer_budgets``, ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zipvl.config import ZipVLConfig
from zipvl.eval_budget import (
    BudgetEstimatorReport,
    BudgetSample,
    EstimatorSummary,
    default_scorers,
    layer_budgets,
    load_causal_lm,
    measure_budget_estimator,
    packaged_model_path,
    packaged_texts,
    scoring_cost,
)
from zipvl.models.cache_arg import cache_kwargs
from zipvl.models.hf import disable, enable, forced_generate, is_enabled, recording

__all__ = [
    "BudgetEstimatorReport",
    "BudgetSample",
    "EstimatorSummary",
    "EvalReport",
    "LayerEval",
    "default_scorers",
    "evaluate",
    "kl_divergence",
    "layer_budgets",
    "load_causal_lm",
    "measure_budget_estimator",
    "packaged_model_path",
    "packaged_texts",
    "scoring_cost",
]


@dataclass(frozen=True)
class LayerEval:
    """One layer's prefill.

    Attributes:
        layer: layer index.
        kept_ratio: kept tokens / real prompt tokens.
        retained_mass: fraction of the full attention mass carried by the kept keys.
    """

    layer: int
    kept_ratio: float
    retained_mass: float


@dataclass(frozen=True)
class EvalReport:
    """ZipVL vs dense on one input.

    Attributes:
        steps: compared generation steps per row (``max_new_tokens``).
        matches: steps (over all rows) where ZipVL's greedy token equals the dense one.
        agreement: ``matches / (rows * steps)``.
        kl_first: KL(dense || ZipVL) of the first-step next-token distribution, nats, mean over
            rows.
        layers: per-layer kept ratio and retained attention mass.
        kept_ratio: mean kept ratio over layers (the paper's "Ratio").
        attn_flop_reduction: mean of ``1 - ratio^2`` over layers.
        compression: KV bytes of a bf16 cache over ZipVL's.
        config: ``ZipVLConfig.describe()`` of the evaluated config.
    """

    steps: int
    matches: int
    agreement: float
    kl_first: float
    layers: tuple[LayerEval, ...]
    kept_ratio: float
    attn_flop_reduction: float
    compression: float
    config: str

    @property
    def retained_mass(self) -> float:
        """Mean retained attention mass over layers."""
        return sum(r.retained_mass for r in self.layers) / max(len(self.layers), 1)

    def to_markdown(self) -> str:
        """A summary line block and a per-layer GitHub-markdown table."""
        lines = [
            f"ZipVL vs dense ({self.config})",
            "",
            f"* next-token top-1 agreement: {self.agreement:.1%} ({self.matches} of the dense "
            "greedy tokens, teacher-forced)",
            f"* KL(dense || ZipVL), first step: {self.kl_first:.4g} nats",
            f"* kept ratio {self.kept_ratio:.1%}, attention-FLOP reduction "
            f"{self.attn_flop_reduction:.1%}, retained attention mass {self.retained_mass:.1%}, "
            f"KV compression {self.compression:.2f}x",
            "",
            "| layer | kept ratio | retained attention mass |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r.layer} | {r.kept_ratio:.1%} | {r.retained_mass:.1%} |" for r in self.layers
        ]
        return "\n".join(lines)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per row, in float64.

    Args:
        p_logits: (B, V) reference logits.
        q_logits: (B, V) logits of the approximation.

    Returns:
        (B,) float64, >= 0.
    """
    if p_logits.shape != q_logits.shape or p_logits.ndim != 2:
        raise ValueError(
            f"q_logits: expected a (B, V) tensor like p_logits {tuple(p_logits.shape)}, got "
            f"{tuple(q_logits.shape)}"
        )
    logp = torch.log_softmax(p_logits.double(), dim=-1)  # (B, V)
    logq = torch.log_softmax(q_logits.double(), dim=-1)  # (B, V)
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: Mapping[str, Any],
    config: ZipVLConfig | None = None,
    *,
    max_new_tokens: int = 16,
    max_rows: int = 256,
) -> EvalReport:
    """Compare ZipVL with dense attention on one batch of inputs.

    Args:
        model: a supported transformers model (``zipvl.models.SUPPORTED_MODELS``) in eval mode,
            with ZipVL NOT enabled (the dense run uses the model's own attention).
        inputs: prompt inputs as for ``generate`` (``input_ids``, ``attention_mask``, pixels).
        config: ZipVL configuration (None: ``ZipVLConfig()``).
        max_new_tokens: greedy steps compared, >= 1.
        max_rows: query rows used per layer to measure the retained attention mass.

    Returns:
        ``EvalReport``.

    Raises:
        ValueError: ``max_new_tokens < 1`` or ZipVL already enabled on ``model``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens}")
    if is_enabled(model):
        raise ValueError("model: ZipVL is already enabled; disable it so the dense run is dense")
    config = ZipVLConfig() if config is None else config
    gen: Any = model
    dense = gen.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    prompt_len = int(inputs["input_ids"].shape[1])
    dense_tokens = dense.sequences[:, prompt_len:]  # (B, T)
    dense_first = dense.logits[0].float()  # (B, V)
    cache = enable(model, config)
    try:
        with recording(model, max_rows=max_rows) as traces:
            run = forced_generate(model, inputs, dense_tokens, **cache_kwargs(model, cache))
    finally:
        disable(model)
    matches = int((run.argmax == dense_tokens.cpu()).sum())
    kl = kl_divergence(dense_first.cpu(), run.first_logits.cpu())
    report = cache.report()
    layers = tuple(
        LayerEval(layer=t.layer_idx, kept_ratio=t.kept_ratio, retained_mass=t.retained_mass)
        for t in traces
    )
    return EvalReport(
        steps=int(dense_tokens.shape[1]),
        matches=matches,
        agreement=matches / dense_tokens.numel(),
        kl_first=float(kl.mean()),
        layers=layers,
        kept_ratio=report.kept_ratio,
        attn_flop_reduction=report.attn_flop_reduction,
        compression=report.compression,
        config=config.describe(),
    )
