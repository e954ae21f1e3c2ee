"""What a ZipVL cache reports: token-sparsity and memory, per layer and in total.

The numbers are the ones the paper tabulates (docs/algorithm.md#accounting):

* kept ratio p / n of the prefill selection per layer, and its attention-FLOP reduction
  ``1 - (p / n)^2`` (dense causal attention versus attention over the kept tokens only);
* KV memory: the bytes the cache actually holds against a bf16 cache of the same tokens.

Built by ``ZipVLCache.report()``; plain frozen dataclasses with no tensor inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zipvl import plotting

__all__ = ["CacheReport", "LayerReport"]


@dataclass(frozen=True)
class LayerReport:
    """One cache layer.

    Attributes:
        layer: layer index.
        prompt_tokens: n, the prefill length committed by ``compress_prefill`` (0 if none).
        kept_tokens: p, the important tokens per (b, h) row of the prefill selection.
        kept_ratio: p / n (1.0 when no prefill selection was recorded).
        attn_flop_reduction: ``1 - kept_ratio ** 2``.
        seq_length: positions currently cached.
        tokens_at_bits: bit width -> mean number of positions per (sequence, KV head) row stored at
            that width; 16 is full precision (sinks, fp tail, uncommitted prefill). Values sum to
            ``seq_length``; they are integers unless a crop cut through a compressed chunk whose
            rows differ.
        decode_blocks: decode blocks compressed by ``compress_tail``.
        decode_block_tokens: tokens per (b, h) row in those blocks.
        decode_kept_tokens: tokens per (b, h) row kept at high precision in those blocks.
        bytes: bytes actually held (sum of ``nbytes`` of every tensor of the layer, the unused
            capacity of paged storage included).
        bf16_bytes: bytes a bf16 cache of the same positions would hold.
        live_bytes: bytes of the live tokens only (pages in use, fp tokens, class maps): what
            a store sized exactly would hold; equal to ``bytes`` for chunked storage.
        storage: ``"paged"`` or ``"chunked"``.
        decode_read: how decode reads the layer: ``"fused"`` (the paged kernel) or
            ``"dense: <why>"`` (every position dequantized: slower, and why).
    """

    layer: int
    prompt_tokens: int
    kept_tokens: int
    kept_ratio: float
    attn_flop_reduction: float
    seq_length: int
    tokens_at_bits: dict[int, float]
    decode_blocks: int
    decode_block_tokens: int
    decode_kept_tokens: float
    bytes: int
    bf16_bytes: int
    live_bytes: int = -1
    storage: str = "chunked"
    decode_read: str = "dense"

    def __post_init__(self) -> None:
        if self.live_bytes < 0:
            object.__setattr__(self, "live_bytes", self.bytes)

    @property
    def compression(self) -> float:
        """bf16 bytes over actual bytes (1.0 for an empty layer)."""
        return self.bf16_bytes / self.bytes if self.bytes else 1.0

    @property
    def live_compression(self) -> float:
        """bf16 bytes over live bytes (1.0 for an empty layer)."""
        return self.bf16_bytes / self.live_bytes if self.live_bytes else 1.0

    @property
    def decode_kept_ratio(self) -> float:
        """Fraction of decode-block tokens kept at high precision (1.0 before any block)."""
        if not self.decode_block_tokens:
            return 1.0
        return self.decode_kept_tokens / self.decode_block_tokens


@dataclass(frozen=True)
class CacheReport:
    """All layers of a cache, with totals.

    A cache whose KV heads are split over processes (tensor parallelism) reports the whole
    model (``merge`` of the ranks' reports) and keeps each rank's own report in ``ranks``.

    Attributes:
        layers: one ``LayerReport`` per created layer, in layer order.
        ranks: every rank's own report, in rank order (empty: one process).
        rank: the rank that built this report (0 for one process).
    """

    layers: tuple[LayerReport, ...]
    ranks: tuple[CacheReport, ...] = ()
    rank: int = 0

    @property
    def world_size(self) -> int:
        """Processes this report covers (1 for one process)."""
        return max(len(self.ranks), 1)

    @staticmethod
    def merge(ranks: tuple[CacheReport, ...], *, rank: int = 0) -> CacheReport:
        """The whole model's report from every rank's report of its own KV heads.

        Every rank holds the same number of KV heads (the model's are split evenly), so a
        per-row figure of the whole model is the mean over the ranks, and a byte count the sum:

        * ``prompt_tokens``, ``seq_length``, ``decode_blocks``, ``decode_block_tokens``,
          ``storage``, ``decode_read``: rank 0's (the same on every rank);
        * ``kept_tokens``: the mean over the ranks, rounded (the same on every rank when the
          budget is reduced over them, as ``zipvl.enable`` does), and ``kept_ratio`` from it;
        * ``tokens_at_bits`` and ``decode_kept_tokens``: the mean over the ranks;
        * ``bytes``, ``bf16_bytes``, ``live_bytes``: the sum over the ranks.

        Args:
            ranks: one report per rank, in rank order, each with the same layers.
            rank: the rank building the merged report.

        Raises:
            ValueError: no report, or reports with different layers.
        """
        if not ranks:
            raise ValueError("ranks: expected one report per rank, got none")
        first = ranks[0]
        layer_ids = [r.layer for r in first.layers]
        for i, other in enumerate(ranks):
            if [r.layer for r in other.layers] != layer_ids:
                raise ValueError(
                    f"ranks: expected every rank to report layers {layer_ids}, rank {i} reports "
                    f"{[r.layer for r in other.layers]}"
                )
        n = len(ranks)
        rows = []
        for j, base in enumerate(first.layers):
            per = [other.layers[j] for other in ranks]
            kept = round(sum(r.kept_tokens for r in per) / n)
            ratio = kept / base.prompt_tokens if base.prompt_tokens else 1.0
            bits = sorted({b for r in per for b in r.tokens_at_bits})
            rows.append(
                LayerReport(
                    layer=base.layer,
                    prompt_tokens=base.prompt_tokens,
                    kept_tokens=kept,
                    kept_ratio=ratio,
                    attn_flop_reduction=1.0 - ratio**2,
                    seq_length=base.seq_length,
                    tokens_at_bits={
                        b: sum(r.tokens_at_bits.get(b, 0) for r in per) / n for b in bits
                    },
                    decode_blocks=base.decode_blocks,
                    decode_block_tokens=base.decode_block_tokens,
                    decode_kept_tokens=sum(r.decode_kept_tokens for r in per) / n,
                    bytes=sum(r.bytes for r in per),
                    bf16_bytes=sum(r.bf16_bytes for r in per),
                    live_bytes=sum(r.live_bytes for r in per),
                    storage=base.storage,
                    decode_read=base.decode_read,
                )
            )
        return CacheReport(layers=tuple(rows), ranks=tuple(ranks), rank=rank)

    @property
    def prefilled(self) -> tuple[LayerReport, ...]:
        """The layers with a committed prefill (``prompt_tokens > 0``)."""
        return tuple(r for r in self.layers if r.prompt_tokens)

    @property
    def kept_ratio(self) -> float:
        """Mean p / n over the prefilled layers (the paper's "Ratio"; 1.0 if none)."""
        return _mean([r.kept_ratio for r in self.prefilled], empty=1.0)

    @property
    def attn_flop_reduction(self) -> float:
        """Mean ``1 - (p / n)^2`` over the prefilled layers (the paper's "Attn FLOPs
        reduction"; 0.0 if none)."""
        return _mean([r.attn_flop_reduction for r in self.prefilled], empty=0.0)

    @property
    def bytes(self) -> int:
        """Bytes held by all layers."""
        return sum(r.bytes for r in self.layers)

    @property
    def bf16_bytes(self) -> int:
        """Bytes a bf16 cache of the same positions would hold."""
        return sum(r.bf16_bytes for r in self.layers)

    @property
    def compression(self) -> float:
        """bf16 bytes over actual bytes, over all layers (1.0 for an empty cache)."""
        return self.bf16_bytes / self.bytes if self.bytes else 1.0

    @property
    def live_bytes(self) -> int:
        """Live bytes of all layers (``LayerReport.live_bytes``)."""
        return sum(r.live_bytes for r in self.layers)

    @property
    def dense_read_layers(self) -> tuple[int, ...]:
        """Layers that decode reads densely (not with the fused kernel)."""
        return tuple(r.layer for r in self.layers if r.decode_read != "fused")

    def to_markdown(self) -> str:
        """A GitHub-markdown table, one row per layer and a final total row."""
        bits = sorted({b for r in self.layers for b in r.tokens_at_bits}, reverse=True)
        cols = ["layer", "prompt", "kept", "ratio", "attn FLOPs red."]
        cols += [f"{b}-bit tok" for b in bits]
        cols += ["decode kept", "bytes", "live bytes", "bf16 bytes", "compression", "decode read"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for r in self.layers:
            row = [
                str(r.layer),
                str(r.prompt_tokens),
                str(r.kept_tokens),
                f"{r.kept_ratio:.1%}",
                f"{r.attn_flop_reduction:.1%}",
            ]
            row += [f"{r.tokens_at_bits.get(b, 0):g}" for b in bits]
            row += [
                f"{r.decode_kept_ratio:.1%}" if r.decode_blocks else "-",  # no block yet
                str(r.bytes),
                str(r.live_bytes),
                str(r.bf16_bytes),
                f"{r.compression:.2f}x",
                f"{r.storage}, {r.decode_read}",
            ]
            lines.append("| " + " | ".join(row) + " |")
        total = ["total", "", "", f"{self.kept_ratio:.1%}", f"{self.attn_flop_reduction:.1%}"]
        total += ["" for _ in bits]
        total += ["", str(self.bytes), str(self.live_bytes), str(self.bf16_bytes)]
        total += [f"{self.compression:.2f}x", ""]
        lines.append("| " + " | ".join(total) + " |")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Write a PNG bar chart of the per-layer kept ratio (matplotlib, Agg backend).

        Args:
            path: output file; its parent directory must exist.

        Returns:
            The path written.

        Raises:
            ValueError: the report has no layer.
            ImportError: matplotlib is not installed (``pip install "zipvl[plot]"``).
        """
        if not self.layers:
            raise ValueError("self: expected a report with at least one layer to plot, got none")
        out = Path(path)
        # matplotlib is imported here (slow, optional); the figure has its own Agg canvas
        fig = plotting.figure(
            (max(4.0, 0.35 * len(self.layers) + 2.0), 3.0), what="CacheReport.plot"
        )
        ax = fig.add_subplot(1, 1, 1)
        ax.bar([r.layer for r in self.layers], [r.kept_ratio for r in self.layers])
        ax.axhline(self.kept_ratio, color="k", linestyle="--", linewidth=1, label="mean")
        ax.set_xlabel("layer")
        ax.set_ylabel("kept ratio p / n")
        ax.set_ylim(0.0, 1.05)
        ax.set_title(f"ZipVL kept ratio (attn FLOPs -{self.attn_flop_reduction:.1%})")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out, format="png")
        return out


def _mean(values: list[float], *, empty: float) -> float:
    return sum(values) / len(values) if values else empty
