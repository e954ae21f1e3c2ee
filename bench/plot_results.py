"""Draw the committed GPU results as PNGs (latency against sequence length, speed-ups).

Reads ``bench/results/<device>/gpu_prefill.json``, ``gpu_decode.json``, ``gpu_e2e.json`` and
``gpu_hf.json`` (the last JSON line of the GPU scripts) and writes ``prefill_latency.png``,
``decode_latency.png``, ``e2e_prefill.png`` and ``gpu_hf.png`` next to them.

Run:  python bench/plot_results.py bench/results/h200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _title(data: dict[str, Any], what: str) -> str:
    env = data["env"]
    return f"{what}\n{env['device']}, torch {env['torch']}, commit {env['commit']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")  # headless; set here, in the script, never in the library
    import matplotlib.pyplot as plt

    written = []
    prefill = _load(args.folder, "gpu_prefill")
    if prefill:
        rows = prefill["rows"]
        s = [r["S"] for r in rows]
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        best = rows[0]["dense_best"]
        for key, label in (
            ("dense_best_ms", f"dense SDPA ({best}, the fastest)"),
            ("dense_flash_ms", "dense SDPA (flash)"),
            ("dense_flex_ms", "dense FlexAttention"),
            ("zipvl_auto_ms", "ZipVL, impl='auto'"),
            ("zipvl_flex_ms", "ZipVL, gather + Flex"),
            ("plan_ms", "ZipVL plan only"),
        ):
            ax.loglog(s, [r[key] for r in rows], marker="o", label=label)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("ms, one layer")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax2.semilogx(s, [r["speedup_auto"] for r in rows], marker="o", label="ZipVL, impl='auto'")
        ax2.semilogx(s, [r["speedup_flex"] for r in rows], marker="o", label="ZipVL (Flex)")
        ax2.semilogx(s, [r["ideal_1/r2"] for r in rows], ls="--", label="ideal 1/r^2")
        ax2.set_xlabel("sequence length")
        ax2.set_ylabel(f"speed-up vs dense SDPA ({best})")
        ax2.legend(fontsize=8)
        ax2.grid(True, which="both", alpha=0.3)
        fig.suptitle(_title(prefill, f"one-layer prefill, kept ratio {rows[0]['kept']:.2f}"))
        fig.tight_layout()
        out = args.folder / "prefill_latency.png"
        fig.savefig(out, dpi=110)
        written.append(out)
    decode = _load(args.folder, "gpu_decode")
    if decode:
        fig, ax = plt.subplots(figsize=(6, 4))
        # ms per step against the batch, one line per cache length (the fastest dense backend
        # of each row, named in its label)
        for n in sorted({r["N"] for r in decode["rows"]}):
            rows = [r for r in decode["rows"] if r["N"] == n]
            b = [r["B"] for r in rows]
            dense = "/".join(sorted({r["fastest_dense"] for r in rows}))
            ax.loglog(b, [r[f"sdpa_{r['fastest_dense']}_graph_ms"] for r in rows], marker="o",
                      label=f"bf16 SDPA ({dense}), {n // 1024}k tokens")  # fmt: skip
            ax.loglog(b, [r["fused_graph_ms"] for r in rows], marker="s",
                      label=f"fused 4/2-bit, {n // 1024}k tokens")  # fmt: skip
        ax.set_xlabel("batch")
        ax.set_ylabel("ms per decode step, one layer (CUDA-graph replay)")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(_title(decode, "decode attention"), fontsize=9)
        fig.tight_layout()
        out = args.folder / "decode_latency.png"
        fig.savefig(out, dpi=110)
        written.append(out)
    e2e = _load(args.folder, "gpu_e2e")
    if e2e:
        rows = e2e["rows"]
        fig, ax = plt.subplots(figsize=(6, 4))
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["dense_prefill_ms"] / 1e3 for r in rows], 0.4,
               label="dense")  # fmt: skip
        ax.bar([i + 0.2 for i in x], [r["zipvl_prefill_ms"] / 1e3 for r in rows], 0.4,
               label="ZipVL")  # fmt: skip
        for i, r in enumerate(rows):
            note = f"{r['prefill_speedup']:.2f}x\n(bound {r['amdahl_bound']:.2f}x)"
            y = r["zipvl_prefill_ms"] / 1e3
            ax.text(i + 0.2, y, note, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), [f"{r['S'] // 1024}k" for r in rows])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("prefill seconds, 28 layers")
        ax.legend()
        ax.set_title(_title(e2e, "end-to-end prefill, LongVA-7B shapes"), fontsize=9)
        fig.tight_layout()
        out = args.folder / "e2e_prefill.png"
        fig.savefig(out, dpi=110)
        written.append(out)
    hf = _load(args.folder, "gpu_hf")
    if hf:
        from gpu_hf import plot as plot_hf  # bench/ is on sys.path when run as a script

        out = plot_hf(hf, args.folder / "gpu_hf.png")
        if out:
            written.append(out)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
