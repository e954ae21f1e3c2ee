"""Importance scorers: (q, k) -> ``Scores(mass, normalized)``, each (B, Hkv, Skv) float32.

* ``ProbeScorer``: ZipVL / ZipCache probe attention (He et al., arXiv 2410.08584 v1, Alg. 1 and
  Eq. 7; ZipCache arXiv 2405.14256): a softmax over a few probe query rows stands in for the full
  attention map, so the real attention can run in a fused kernel.
* ``AccumulatedAttentionScorer``: H2O's heavy hitters (Zhang et al. 2023), all query rows.
* ``SnapKVScorer``: SnapKV (Li et al. 2024), the last ``window`` queries, pooled over keys.
* ``KeyNormScorer``: low key L2 norm = important (Devoto et al. 2024).

Alignment when Sq < Skv (chunked prefill): the queries are the last Sq positions, query row ``i``
sits at position ``Skv - Sq + i`` and sees keys ``j <= Skv - Sq + i``. Sq = 3, Skv = 5::

    key j      0 1 2 3 4
    query 0    1 1 1 0 0      (position 2)
    query 1    1 1 1 1 0      (position 3)
    query 2    1 1 1 1 1      (position 4)

All scorers are plain PyTorch with fixed shapes and no host sync (probe positions depend only on
shapes and the seed), so they trace under ``torch.compile(fullgraph=True)``. Attention logits
are computed by a matmul in the input dtype (float32 for float16 inputs, whose logits would
overflow or lose precision), then softmax runs in float32. Non-finite logits give NaN mass, which
``CumulativeMassAllocator`` turns into its sentinel budget and ``TopKSelector`` rejects. Memory
is bounded by chunking over KV heads (and, for the all-rows scorer, over query rows).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from zipvl.checks import check_buffer, check_fraction, check_int, check_qkv, check_scale
from zipvl.impl import SCORER_IMPLS, Impl, parse_impl
from zipvl.sparsity.probe_estimate import band_width, offset_corrected_mass, stratified_rows
from zipvl.types import Scores

__all__ = [
    "AccumulatedAttentionScorer",
    "KeyNormScorer",
    "ProbeScorer",
    "SnapKVScorer",
    "probe_positions",
]


def _check_inputs(q: Tensor, k: Tensor) -> tuple[int, int, int, int, int]:
    """Validate (q, k); return (B, Hkv, G, Sq, Skv)."""
    b, hq, hkv = check_qkv(q, k)
    sq, skv = q.shape[2], k.shape[2]
    if skv == 0:
        raise ValueError(f"k: expected at least one key (Skv >= 1), got shape {tuple(k.shape)}")
    if sq == 0 or sq > skv:
        raise ValueError(
            f"q: expected 1 <= Sq <= Skv = {skv} (queries are the last Sq positions), "
            f"got Sq = {sq}"
        )
    return b, hkv, hq // hkv, sq, skv


def _floor_frac(frac: float, n: int) -> int:
    # round() first so that 0.29 * 100 = 28.999999999999996 floors to 29
    return math.floor(round(frac * n, 9))


_MULS = (0x2C1B3C6D, 0x297A2D39, 0x1B873593)


def _mix31(seed: int) -> int:
    """``_hash31`` of a host int (the seed), so no tensor is built from Python state."""
    x = seed & 0x7FFFFFFF
    for mul in _MULS:
        x = ((x ^ (x >> 16)) * mul) & 0x7FFFFFFF
    return x ^ (x >> 16)


def _hash31(x: Tensor) -> Tensor:
    """A keyed integer mixer on int64 values in [0, 2^31): every product stays below 2^62."""
    for mul in _MULS:
        x = ((x ^ (x >> 16)) * mul) & 0x7FFFFFFF
    return x ^ (x >> 16)


def _check_sampling(sampling: object) -> None:
    if sampling not in ("uniform", "stratified"):
        raise ValueError(f"sampling: expected 'uniform' or 'stratified', got {sampling!r}")


def _probe_counts(
    sq: int,
    recent_frac: float,
    random_frac: float,
    max_recent: int | None,
    max_random: int | None,
    min_probes: int,
) -> tuple[int, int]:
    """(m_recent, m_random) of ``probe_positions`` (host ints, arguments already checked)."""
    m_recent = _floor_frac(recent_frac, sq)
    if max_recent is not None:
        m_recent = min(m_recent, max_recent)
    m_random = _floor_frac(random_frac, sq)
    if max_random is not None:
        m_random = min(m_random, max_random)
    m_random = min(m_random, sq - m_recent)
    need = min(min_probes, sq)
    if m_recent + m_random < need:
        m_recent = need - m_random
    return m_recent, m_random


def probe_positions(
    sq: int,
    *,
    recent_frac: float = 0.05,
    random_frac: float = 0.05,
    max_recent: int | None = None,
    max_random: int | None = None,
    min_probes: int = 1,
    seed: int = 0,
    sampling: Literal["uniform", "stratified"] = "uniform",
    device: torch.device | str | None = None,
) -> Tensor:
    """Probe query rows: the last ``m_recent`` rows plus ``m_random`` rows drawn from the rest.

    ``m_recent = floor(recent_frac * Sq)`` and ``m_random = floor(random_frac * Sq)`` (each capped
    by ``max_*``); if together they are fewer than ``min(min_probes, Sq)``, recent rows are added.
    The random rows are drawn without replacement and uniformly from the first ``Sq - m_recent``
    rows, as the ``m_random`` smallest values of a keyed hash of (row, seed). That makes the draw a
    pure function of the shape and ``seed``: identical on every device, in eager and compiled code,
    and free of host RNG state. (ZipCache draws with replacement; duplicates only re-weight a row.)
    ``sampling="stratified"`` instead cuts the first ``Sq - m_recent`` rows into ``m_random``
    equal strata and draws one row from each (at a keyed-hash offset): the rows cover the prompt
    evenly, and every row of the rest has the same chance to be drawn.

    Args:
        sq: number of query rows, >= 1.
        recent_frac, random_frac: fractions of ``sq`` in [0, 1].
        max_recent, max_random: optional caps (>= 0).
        min_probes: at least this many probes (capped at ``sq``).
        seed: key of the random draw.
        sampling: ``"uniform"`` (default) or ``"stratified"``.
        device: where to build the result.

    Returns:
        (M,) int64 query-row indices in ascending order, all distinct, M >= min(min_probes, sq).

    Raises:
        TypeError / ValueError: an argument of the wrong type or outside its range.
    """
    check_int("sq", sq, 1)
    check_fraction("recent_frac", recent_frac, low_open=False)
    check_fraction("random_frac", random_frac, low_open=False)
    check_int("max_recent", max_recent, 0, optional=True)
    check_int("max_random", max_random, 0, optional=True)
    check_int("min_probes", min_probes, 1)
    check_int("seed", seed, 0)
    _check_sampling(sampling)
    m_recent, m_random = _probe_counts(
        sq, recent_frac, random_frac, max_recent, max_random, min_probes
    )
    n_rest = sq - m_recent
    recent = torch.arange(n_rest, sq, device=device)  # (m_recent,)
    if m_random == 0:
        return recent
    if sampling == "stratified":
        strata = torch.arange(m_random, device=device)  # (m_random,)
        key = _hash31(strata ^ _mix31(seed))  # (m_random,) values in [0, 2^31)
        return torch.cat([stratified_rows(n_rest, m_random, key), recent])  # (M,)
    rows = torch.arange(n_rest, device=device)  # (n_rest,)
    key = rows ^ _mix31(seed)  # (n_rest,) values in [0, 2^31)
    # hash * n_rest + row: unique keys, so the draw has no ties (< 2^62, no overflow)
    key = _hash31(key) * n_rest + rows  # (n_rest,)
    drawn = key.topk(m_random, largest=False, sorted=False).indices.sort().values  # (m_random,)
    return torch.cat([drawn, recent])  # (M,)


@functools.lru_cache(maxsize=64)
def _probe_positions_cached(
    sq: int,
    recent_frac: float,
    random_frac: float,
    max_recent: int | None,
    max_random: int | None,
    min_probes: int,
    seed: int,
    sampling: Literal["uniform", "stratified"],
    device: torch.device,
) -> Tensor:
    return probe_positions(
        sq,
        recent_frac=recent_frac,
        random_frac=random_frac,
        max_recent=max_recent,
        max_random=max_random,
        min_probes=min_probes,
        seed=seed,
        sampling=sampling,
        device=device,
    )


def _probe_probs(
    q: Tensor, k: Tensor, rows: Tensor, *, scale: float, heads_per_chunk: int
) -> Iterator[tuple[int, int, Tensor]]:
    """The causal softmax of the query rows ``rows`` over all keys, one KV-head chunk at a time.

    Args:
        q: (B, Hq, Sq, D), the last Sq positions.
        k: (B, Hkv, Skv, D).
        rows: (M,) int64 query-row indices.
        scale: softmax scale.
        heads_per_chunk: KV heads per chunk; the fp32 buffer is B * chunk * G * M * Skv.

    Yields:
        (h0, h1, probs): KV heads h0..h1-1 and their (B, h1 - h0, G, M, Skv) float32 softmax.
    """
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    g = hq // hkv
    m = rows.shape[0]
    # fp16 logits overflow at 65504, which an outlier channel reaches before the scale is
    # applied (q.k of two channels at 300 is 9e4), and lose the small differences that matter on
    # top of a large shared offset: fp16 inputs get fp32 logits, as in the fused kernels. bf16
    # shares fp32's range and stays in its own dtype (the common case pays nothing).
    mm_dtype = torch.float32 if q.dtype == torch.float16 else q.dtype
    qp = q.index_select(2, rows).to(mm_dtype).view(b, hkv, g, m, d)  # (B, Hkv, G, M, D)
    q_pos = rows + (skv - sq)  # (M,) absolute positions
    hidden = torch.arange(skv, device=k.device)[None, :] > q_pos[:, None]  # (M, Skv)
    for h0 in range(0, hkv, heads_per_chunk):
        h1 = min(h0 + heads_per_chunk, hkv)
        # (G*M, D) x (D, Skv) per KV head: no broadcast copy of k over the G query heads
        qc = qp[:, h0:h1].reshape(b, h1 - h0, g * m, d)  # (B, hc, G*M, D)
        kc = k[:, h0:h1].to(mm_dtype)  # (B, hc, Skv, D), a copy only for fp16
        logits = torch.matmul(qc, kc.transpose(-1, -2)).float()  # (B, hc, G*M, Skv)
        logits = logits.view(b, h1 - h0, g, m, skv)  # (B, hc, G, M, Skv)
        logits = logits.mul_(scale).masked_fill_(hidden, float("-inf"))
        yield h0, h1, torch.softmax(logits, dim=-1)  # (B, hc, G, M, Skv)


def _probe_mass(
    q: Tensor, k: Tensor, rows: Tensor, *, scale: float, heads_per_chunk: int
) -> Tensor:
    """Column mass of the causal softmax of the query rows ``rows`` over all keys.

    Args:
        q: (B, Hq, Sq, D), the last Sq positions.
        k: (B, Hkv, Skv, D).
        rows: (M,) int64 query-row indices.
        scale: softmax scale.
        heads_per_chunk: KV heads per chunk; the fp32 buffer is B * chunk * G * M * Skv.

    Returns:
        (B, Hkv, Skv) float32, summed over the M rows and the G query heads of each KV head.
    """
    chunks = [
        probs.sum(dim=(2, 3))  # (B, hc, Skv)
        for _, _, probs in _probe_probs(q, k, rows, scale=scale, heads_per_chunk=heads_per_chunk)
    ]
    return torch.cat(chunks, dim=1)  # (B, Hkv, Skv)


def _probe_mass_and_band(
    q: Tensor,
    k: Tensor,
    rows: Tensor,
    weights: Tensor,
    *,
    width: int,
    scale: float,
    heads_per_chunk: int,
) -> tuple[Tensor, Tensor]:
    """The weighted column mass of the probe rows and their band next to the diagonal.

    Args:
        q, k, rows, scale, heads_per_chunk: as ``_probe_mass``.
        weights: (M,) float32 weight of each probe row.
        width: band width W >= 1.

    Returns:
        ``ht``: (B, Hkv, Skv) float32, ``sum_i weights[i] * P[i, :]``; ``band``: (B, Hkv, M, W)
        float32, ``P[i, pos_i - d]`` (0 where ``pos_i - d < 0``); P summed over the G query
        heads of each KV head.
    """
    skv, sq = k.shape[2], q.shape[2]
    pos = rows + (skv - sq)  # (M,)
    cols = pos[:, None] - torch.arange(width, device=k.device)[None, :]  # (M, W)
    valid = cols >= 0  # (M, W)
    hts, bands = [], []
    for _, _, probs in _probe_probs(q, k, rows, scale=scale, heads_per_chunk=heads_per_chunk):
        pg = probs.sum(dim=2)  # (B, hc, M, Skv)
        hts.append(torch.einsum("bhms,m->bhs", pg, weights))  # (B, hc, Skv)
        idx = cols.clamp(min=0).expand(*pg.shape[:2], -1, -1)  # (B, hc, M, W)
        bands.append(pg.gather(-1, idx) * valid)  # (B, hc, M, W)
    return torch.cat(hts, dim=1), torch.cat(bands, dim=1)


def _probe_mass_and_band_triton(
    q: Tensor,
    k: Tensor,
    rows: Tensor,
    weights: Tensor,
    *,
    width: int,
    scale: float,
    addr: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``_probe_mass_and_band`` from the fused kernels: the weighted column mass
    (``probe_mass_triton(weights=...)``, no probe map in memory), then the band next to each
    probe row's diagonal (``probe_band_triton``, the band keys read in place), normalised by the
    rows' log-sum-exp the first kernels return. ``addr``: read the inputs by address."""
    from zipvl.sparsity.probe_triton import probe_band_triton, probe_mass_triton

    b, hq, _, _ = q.shape
    hkv = k.shape[1]
    lse = torch.empty(b, hkv, rows.shape[0], hq // hkv, device=q.device, dtype=torch.float32)
    ht = probe_mass_triton(q, k, rows, scale=scale, weights=weights, lse=lse, addr=addr)
    band = probe_band_triton(q, k, rows, lse, width=width, scale=scale, addr=addr)
    return ht, band


def _offset_scores(
    ht: Tensor, band: Tensor, rows: Tensor, weights: Tensor, sq: int, skv: int,
    mass: Tensor | None = None, normalized: Tensor | None = None,
) -> Scores:  # fmt: skip
    """The offset estimator's scores from the probes' weighted mass and band (either path):
    the corrected mass and Eq. 7 with the causal count, written into ``mass`` / ``normalized``
    where given."""
    est = offset_corrected_mass(ht, band, rows + (skv - sq), weights, sq=sq, skv=skv)
    est = est if mass is None else mass.copy_(est)
    den = _causal_visible(sq, skv, ht.device)
    nrm = est / den if normalized is None else torch.div(est, den, out=normalized)
    return Scores(mass=est, normalized=nrm)


def _causal_visible(sq: int, skv: int, device: torch.device) -> Tensor:
    """Number of query rows that can see each key: Skv - max(j, Skv - Sq), (Skv,) float32."""
    j = torch.arange(skv, device=device)
    return (skv - torch.clamp(j, min=skv - sq)).float()  # (Skv,)


@dataclass(frozen=True)
class ProbeScorer:
    """ZipVL probe-attention scorer (recent + random probe queries, ZipCache lineage).

    ``mass[b, h, j]`` = sum over the probe rows i and the G query heads of KV head h of
    ``softmax(q_i k^T * scale + causal)[j]`` (fp32 softmax, rows see keys at positions <= their
    own). ``normalized`` is Eq. 7, the mass divided by a count of queries that can see j:

    * ``"causal"`` (default, ZipCache's code): ``Skv - max(j, Skv - Sq)`` (``n - j`` in prefill),
      the count of the full causal map even though only probe rows were summed. This deflates
      columns outside the recent-probe window, i.e. favours the most recent tokens.
    * ``"probe_count"``: ``G * #{probe rows that can see j}``, the mean probe attention. Columns
      that no probe sees get 0.

    Two options change how the probe rows stand in for the full map (defaults: the paper's):

    * ``sampling``: ``"uniform"`` draws the random rows anywhere in the rest of the prompt;
      ``"stratified"`` draws one from each of ``m_random`` equal strata (``probe_positions``).
    * ``estimator``: ``"sum"`` makes ``mass`` the plain sum over the probe rows (ZipCache).
      ``"offset"`` makes it an estimate of the *full* causal map's column mass
      (``zipvl.sparsity.probe_estimate.offset_corrected_mass``): random rows weighted by their
      inverse inclusion probability, the band next to the diagonal rebuilt from the mean
      attention at each offset. The plain sum over-weights each probe's neighbours, so Eq. 6
      budgets come out 42-46 % low at tau 0.9 on a real model (SmolLM2-135M, 1k-8k tokens);
      ``"offset"`` with 128 stratified rows brings the median error to 1.8-3.1 %
      (``zipvl.eval.measure_budget_estimator``, ``docs/budget_estimator.md``). With
      ``impl="triton"`` (``"auto"`` on CUDA) the fused kernels compute the weighted column mass
      (each row's weight applied as a shift of its log-sum-exp) and return the rows'
      log-sum-exp, from which the M x W band next to the diagonal is computed; the correction
      itself is a few O(Skv) PyTorch ops. It needs ``denominator="causal"``.
      ``ProbeScorer.estimator_preset()`` builds the measured setting.

    Memory (``impl="torch"``): per chunk of KV heads, the logits of B * heads_per_chunk * G * M
    * Skv in the input dtype (fp32 for fp16 inputs, plus an fp32 copy of the chunk's keys), then
    two fp32 buffers of that size (masked logits, softmax) that are freed before the next chunk;
    ``impl="triton"`` never materialises the probe map. With ``estimator="offset"`` it gathers
    the band keys, B * Hkv * M * W * D elements in the input dtype plus an fp32 copy (about 100 MB
    at 64k with ``estimator_preset(128)``, W = 256), for all KV heads at once; inside a captured
    plan they stay in the graph's memory pool, once per captured shape.

    Attributes:
        recent_frac: fraction of the Sq query rows used as recent probes (the last rows), [0, 1].
        random_frac: fraction drawn at random from the other rows, [0, 1].
        max_recent, max_random: optional caps on the two counts (e.g. 64 + 64 for long prompts).
        min_probes: at least this many probes (recent rows are added), so short prompts get one.
        seed: key of the random draw (deterministic by default; see ``probe_positions``).
        sampling: ``"uniform"`` (default) or ``"stratified"`` random rows.
        estimator: ``"sum"`` (default) or ``"offset"`` (the full-map mass estimate).
        denominator: ``"causal"`` or ``"probe_count"``.
        scale: softmax scale; None = 1 / sqrt(D).
        heads_per_chunk: KV heads processed at once (bounds the fp32 buffer; ``"torch"`` only).
        impl: ``"torch"`` (plain PyTorch, any device, traceable by ``torch.compile``) or
            ``"triton"`` (``zipvl.sparsity.probe_triton``: two fused kernels that never write the
            probe map; CUDA, or the CPU under ``TRITON_INTERPRET=1``; power-of-two D >= 16).
            ``"auto"`` (default) is a documented dispatch, decided per call: ``"triton"`` for
            eager CUDA inputs with a power-of-two D >= 16, ``"torch"`` otherwise (CPU, other
            head dims, inside ``torch.compile``); ``impl_for(q)`` says which a call runs. An
            explicitly requested impl that cannot run raises ``ValueError``; nothing falls
            back. Stored as an ``Impl`` (strings are accepted).
    """

    recent_frac: float = 0.05
    random_frac: float = 0.05
    max_recent: int | None = None
    max_random: int | None = None
    min_probes: int = 1
    seed: int = 0
    denominator: Literal["causal", "probe_count"] = "causal"
    scale: float | None = None
    heads_per_chunk: int = 1
    impl: Impl | Literal["auto", "torch", "triton"] = Impl.AUTO
    sampling: Literal["uniform", "stratified"] = "uniform"
    estimator: Literal["sum", "offset"] = "sum"

    def __post_init__(self) -> None:
        object.__setattr__(self, "impl", parse_impl("impl", self.impl, SCORER_IMPLS))
        check_fraction("recent_frac", self.recent_frac, low_open=False)
        check_fraction("random_frac", self.random_frac, low_open=False)
        check_int("max_recent", self.max_recent, 0, optional=True)
        check_int("max_random", self.max_random, 0, optional=True)
        check_int("min_probes", self.min_probes, 1)
        check_int("seed", self.seed, 0)
        check_int("heads_per_chunk", self.heads_per_chunk, 1)
        if self.denominator not in ("causal", "probe_count"):
            raise ValueError(
                f"denominator: expected 'causal' or 'probe_count', got {self.denominator!r}"
            )
        check_scale("scale", self.scale)
        _check_sampling(self.sampling)
        if self.estimator not in ("sum", "offset"):
            raise ValueError(f"estimator: expected 'sum' or 'offset', got {self.estimator!r}")
        if self.estimator == "offset" and self.denominator != "causal":
            raise ValueError(
                "denominator: estimator='offset' estimates the full map's mass, whose "
                f"Eq. 7 count is 'causal'; got {self.denominator!r}"
            )

    @classmethod
    def estimator_preset(cls, num_probes: int = 128, **overrides: object) -> ProbeScorer:
        """The measured better budget estimator: ``num_probes`` stratified rows, offset-corrected.

        ``recent_frac=0, random_frac=0.1, max_random=num_probes, sampling="stratified",
        estimator="offset"``: 10 % of the rows up to ``num_probes``, so the probe count grows
        with the prompt until the cap, and the scoring cost relative to dense attention falls
        as ``num_probes / (2 n)`` beyond it (stratified rows see half the keys on average).

        Args:
            num_probes: the cap on random rows, >= 1.
            **overrides: any other field (``seed``, ``scale``, ``heads_per_chunk``, ...).
        """
        check_int("num_probes", num_probes, 1)
        fields: dict[str, object] = {
            "recent_frac": 0.0,
            "random_frac": 0.1,
            "max_random": num_probes,
            "sampling": "stratified",
            "estimator": "offset",
        }
        fields.update(overrides)
        return cls(**fields)  # type: ignore[arg-type]

    def probe_weights(self, sq: int, device: torch.device | str | None = None) -> Tensor:
        """Inverse inclusion probability of each probe row of ``probe_rows(sq)``: (M,) float32.

        1 for the recent rows; for the random rows, the stratum size (``"stratified"``) or
        ``(Sq - m_recent) / m_random`` (``"uniform"``).
        """
        m_recent, m_random = self._counts(sq)
        n_rest = sq - m_recent
        if m_random == 0:
            return torch.ones(m_recent, device=device)
        if self.sampling == "stratified":
            t = torch.arange(m_random + 1, device=device)
            edges = (t * n_rest) // m_random  # (m_random + 1,)
            rand = (edges[1:] - edges[:-1]).float()  # (m_random,)
        else:
            rand = torch.full((m_random,), n_rest / m_random, device=device)
        return torch.cat([rand, torch.ones(m_recent, device=device)])  # (M,)

    def band_width(self, sq: int) -> int:
        """The local band W of ``estimator="offset"`` for ``sq`` query rows (``band_width``)."""
        m_recent, m_random = self._counts(sq)
        return band_width(sq - m_recent, m_random)

    def _counts(self, sq: int) -> tuple[int, int]:
        check_int("sq", sq, 1)
        return _probe_counts(
            sq,
            self.recent_frac,
            self.random_frac,
            self.max_recent,
            self.max_random,
            self.min_probes,
        )

    def probe_rows(self, sq: int, device: torch.device | str | None = None) -> Tensor:
        """The probe query rows for ``sq`` queries: (M,) int64, ascending (``probe_positions``).

        A pure function of the shape and the fields, so eager calls reuse a cached tensor (about
        twenty small kernels saved per layer); do not modify the result in place.
        """
        args = (
            sq,
            self.recent_frac,
            self.random_frac,
            self.max_recent,
            self.max_random,
            self.min_probes,
            self.seed,
            self.sampling,
            torch.device(device) if device is not None else torch.device("cpu"),
        )
        if torch.compiler.is_compiling():
            # dynamo cannot trace through lru_cache; a compiled graph builds them once anyway
            return _probe_positions_cached.__wrapped__(*args)
        return _probe_positions_cached(*args)

    def fused_scores(
        self,
        q: Tensor,
        k: Tensor,
        /,
        *,
        mass: Tensor | None = None,
        normalized: Tensor | None = None,
        addr: Tensor | None = None,
    ) -> Scores:
        """``self(q, k)`` through the fused kernels: what ``__call__`` runs for ``impl="triton"``
        (or ``"auto"`` on CUDA) with ``denominator="causal"``. With ``estimator="sum"`` the
        kernels' column pass also computes Eq. 7; with ``estimator="offset"`` they return the
        weighted column mass and the rows' log-sum-exp, a third kernel the band, and the
        correction runs in PyTorch on those (O(Skv) work, no input read).

        Args:
            q, k: as in ``__call__``.
            mass, normalized: contiguous (B, Hkv, Skv) float32 tensors to write the scores into
                (None: new ones).
            addr: int64 (2,) addresses of the inputs to read instead of q's and k's own
                (``probe_mass_triton``): ``PlanGraph`` replays its captured plan on new inputs
                this way, without copying them into static buffers.

        Returns:
            ``Scores`` (``mass`` and ``normalized`` when given), equal to ``self(q, k)``.

        Raises:
            ValueError: ``denominator="probe_count"``, ``impl="torch"``, inputs the kernels
                cannot read, or bad ``mass`` / ``normalized`` / ``addr``.
        """
        if self.denominator != "causal":
            raise ValueError(
                f"denominator: fused_scores computes 'causal' only, got {self.denominator!r}"
            )
        if self.impl is Impl.TORCH:
            raise ValueError("impl: fused_scores runs the fused kernels, got 'torch'")
        _, _, _, sq, skv = _check_inputs(q, k)
        from zipvl.sparsity.probe_triton import probe_mass_triton  # lazy: triton is optional

        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        b, hkv = k.shape[0], k.shape[1]
        rows = self.probe_rows(sq, device=q.device)
        if self.estimator == "offset":
            weights = self.probe_weights(sq, device=q.device)  # (M,)
            check_buffer("mass", mass, (b, hkv, skv), torch.float32, k.device)
            check_buffer("normalized", normalized, (b, hkv, skv), torch.float32, k.device)
            ht, band = _probe_mass_and_band_triton(
                q, k, rows, weights, width=self.band_width(sq), scale=scale, addr=addr
            )
            return _offset_scores(ht, band, rows, weights, sq, skv, mass, normalized)
        if normalized is None:
            normalized = torch.empty(b, hkv, skv, device=k.device, dtype=torch.float32)
        out = probe_mass_triton(
            q, k, rows, scale=scale, out=mass, normalized=normalized, addr=addr
        )  # fmt: skip
        return Scores(mass=out, normalized=normalized)

    def impl_for(self, q: Tensor) -> Impl:
        """The impl a call with queries ``q`` runs: ``impl`` itself unless it is ``"auto"``, then
        ``Impl.TRITON`` for eager CUDA inputs with a power-of-two D >= 16, ``Impl.TORCH``
        otherwise."""
        if self.impl is not Impl.AUTO:
            return cast(Impl, self.impl)  # parsed in __post_init__
        d = q.shape[-1]
        fused = q.is_cuda and d >= 16 and d & (d - 1) == 0 and not torch.compiler.is_compiling()
        return Impl.TRITON if fused else Impl.TORCH

    def __call__(self, q: Tensor, k: Tensor, /) -> Scores:
        """Score every key by probe attention.

        Args:
            q: (B, Hq, Sq, D) queries (RoPE applied), the last Sq positions, Sq <= Skv.
            k: (B, Hkv, Skv, D) keys, Hq divisible by Hkv.

        Returns:
            ``Scores`` with ``mass`` and ``normalized``, each (B, Hkv, Skv) float32.

        Raises:
            ValueError: bad ranks, GQA mismatch, dtype/device mismatch, or Sq > Skv.
        """
        _, _, g, sq, skv = _check_inputs(q, k)
        fused = self.impl_for(q) is Impl.TRITON
        if fused and self.denominator == "causal":  # either estimator (offset needs "causal")
            return self.fused_scores(q, k)
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        rows = self.probe_rows(sq, device=q.device)  # (M,)
        if self.estimator == "offset":
            weights = self.probe_weights(sq, device=q.device)  # (M,)
            ht, band = _probe_mass_and_band(
                q,
                k,
                rows,
                weights,
                width=self.band_width(sq),
                scale=scale,
                heads_per_chunk=self.heads_per_chunk,
            )  # (B, Hkv, Skv), (B, Hkv, M, W)
            return _offset_scores(ht, band, rows, weights, sq, skv)
        if fused:  # "probe_count": the kernels' mass, the count below
            # lazy import: triton is an optional, Linux-only dependency
            from zipvl.sparsity.probe_triton import probe_mass_triton

            mass = probe_mass_triton(q, k, rows, scale=scale)  # (B, Hkv, Skv)
        else:
            mass = _probe_mass(q, k, rows, scale=scale, heads_per_chunk=self.heads_per_chunk)
        if self.denominator == "causal":
            den = _causal_visible(sq, skv, k.device)  # (Skv,)
            normalized = mass / den
        else:
            pos = rows + (skv - sq)  # (M,) absolute positions
            hist = torch.zeros(skv, device=k.device).index_add_(
                0, pos, torch.ones_like(pos, dtype=torch.float32)
            )  # (Skv,) probes at each position
            den = hist.flip(0).cumsum(0).flip(0) * g  # (Skv,) G * #{probes at >= j}
            normalized = torch.where(den > 0, mass / den.clamp(min=1.0), 0.0)
        return Scores(mass=mass, normalized=normalized)


@dataclass(frozen=True)
class AccumulatedAttentionScorer:
    """H2O heavy-hitter scores: attention accumulated over all query rows.

    ``mass[b, h, j]`` = sum over all Sq query rows and the G query heads of KV head h of the causal
    fp32 softmax; ``normalized`` = mass / (G * number of query rows that can see j), the mean
    attention weight key j received. Costs a full Sq x Skv attention map, computed in chunks of
    ``rows_per_chunk`` query rows per KV-head chunk (buffer B * hc * G * rows_per_chunk * Skv).

    Attributes:
        scale: softmax scale; None = 1 / sqrt(D).
        heads_per_chunk: KV heads processed at once.
        rows_per_chunk: query rows processed at once.
    """

    scale: float | None = None
    heads_per_chunk: int = 1
    rows_per_chunk: int = 1024

    def __post_init__(self) -> None:
        check_scale("scale", self.scale)
        check_int("heads_per_chunk", self.heads_per_chunk, 1)
        check_int("rows_per_chunk", self.rows_per_chunk, 1)

    def __call__(self, q: Tensor, k: Tensor, /) -> Scores:
        """Score every key by its accumulated attention.

        Args:
            q: (B, Hq, Sq, D), the last Sq positions, Sq <= Skv.
            k: (B, Hkv, Skv, D).

        Returns:
            ``Scores``, each (B, Hkv, Skv) float32.
        """
        _, _, g, sq, skv = _check_inputs(q, k)
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        mass = torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)  # (B, Hkv, Skv)
        for r0 in range(0, sq, self.rows_per_chunk):
            rows = torch.arange(r0, min(r0 + self.rows_per_chunk, sq), device=q.device)
            mass = mass + _probe_mass(
                q, k, rows, scale=scale, heads_per_chunk=self.heads_per_chunk
            )
        normalized = mass / (_causal_visible(sq, skv, k.device) * g)
        return Scores(mass=mass, normalized=normalized)


@dataclass(frozen=True)
class SnapKVScorer:
    """SnapKV scores: attention of the last ``window`` queries, pooled over neighbouring keys.

    ``mass`` = the window's attention mass per key (sum over window rows and the G query heads,
    causal inside the window). ``normalized`` = ``mass`` pooled along the key axis
    (``avg_pool1d``/``max_pool1d``, odd ``kernel``, stride 1, same length), except that the keys at
    the window's own positions (the last ``min(window, Sq)`` positions) score ``+inf`` so they are
    kept first, as SnapKV always keeps its observation window. The window counts against the budget
    (SnapKV keeps capacity - window prefix keys plus the window).

    Attributes:
        window: observation window (last query rows), >= 1 (capped at Sq). SnapKV's config uses 32.
        kernel: pooling kernel, odd, >= 1.
        pooling: ``"avg"`` (SnapKV default) or ``"max"``.
        scale: softmax scale; None = 1 / sqrt(D).
        heads_per_chunk: KV heads processed at once.
    """

    window: int = 32
    kernel: int = 5
    pooling: Literal["avg", "max"] = "avg"
    scale: float | None = None
    heads_per_chunk: int = 1

    def __post_init__(self) -> None:
        check_int("window", self.window, 1)
        check_int("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel: expected an odd pooling kernel, got {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling: expected 'avg' or 'max', got {self.pooling!r}")
        check_scale("scale", self.scale)
        check_int("heads_per_chunk", self.heads_per_chunk, 1)

    def __call__(self, q: Tensor, k: Tensor, /) -> Scores:
        """Score every key by the observation window's attention.

        Args:
            q: (B, Hq, Sq, D), the last Sq positions, Sq <= Skv.
            k: (B, Hkv, Skv, D).

        Returns:
            ``Scores``, each (B, Hkv, Skv) float32; ``normalized`` is +inf on the window.
        """
        b, hkv, _, sq, skv = _check_inputs(q, k)
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        w = min(self.window, sq)
        rows = torch.arange(sq - w, sq, device=q.device)  # (w,)
        mass = _probe_mass(q, k, rows, scale=scale, heads_per_chunk=self.heads_per_chunk)
        flat = mass.view(b * hkv, 1, skv)  # (B*Hkv, 1, Skv)
        pad = self.kernel // 2
        if self.pooling == "avg":
            pooled = F.avg_pool1d(flat, self.kernel, stride=1, padding=pad)
        else:
            pooled = F.max_pool1d(flat, self.kernel, stride=1, padding=pad)
        pooled = pooled.view(b, hkv, skv)  # (B, Hkv, Skv)
        in_window = torch.arange(skv, device=k.device) >= skv - w  # (Skv,)
        normalized = pooled.masked_fill(in_window, float("inf"))
        return Scores(mass=mass, normalized=normalized)


@dataclass(frozen=True)
class KeyNormScorer:
    """Key-norm scores: a LOWER key L2 norm means MORE important (Devoto et al. 2024).

    ``normalized = -||k||_2`` (fp32), so "higher = keep" still holds. ``mass`` has no attention
    meaning here; it is ``softmax(-||k||_2)`` over the keys of each (b, h) (non-negative, sums to 1
    per row) so that mass-based allocators run, but pair this scorer with ``FixedRatioAllocator``
    for the published method. Queries are only validated, not used.
    """

    def __call__(self, q: Tensor, k: Tensor, /) -> Scores:
        """Score every key by its negated L2 norm.

        Args:
            q: (B, Hq, Sq, D), validated only.
            k: (B, Hkv, Skv, D).

        Returns:
            ``Scores``, each (B, Hkv, Skv) float32.
        """
        _check_inputs(q, k)
        normalized = -torch.linalg.vector_norm(k.float(), dim=-1)  # (B, Hkv, Skv)
        return Scores(mass=torch.softmax(normalized, dim=-1), normalized=normalized)
