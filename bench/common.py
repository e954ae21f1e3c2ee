"""Shared helpers of the GPU benchmark scripts: environment header, timers, ceilings, output.

Every GPU script prints a header (device, versions, commit), a GitHub-markdown table for
humans and, as its LAST line, one JSON document. Each figure is reported as a ratio to its
baseline measured in the same process and as a fraction of its floor (bytes over measured copy
bandwidth, FLOPs over the measured dense matmul rate).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ceilings",
    "env_info",
    "markdown_table",
    "median_ms",
    "median_ms_graph",
    "progress",
    "write_result",
]


def _git_commit() -> str:
    # the device machine gets a copy of the tree without .git: the caller passes the commit
    if os.environ.get("ZIPVL_COMMIT"):
        return os.environ["ZIPVL_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def env_info() -> dict[str, Any]:
    """Device, library versions and git commit: the header every result carries."""
    import transformers
    import triton

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "commit": _git_commit(),
        "argv": " ".join(sys.argv),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["sm_count"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["device"] = "cpu"
    return info


def median_ms(fn: Callable[[], object], *, warmup_ms: int = 50, rep_ms: int = 300) -> float:
    """Median time of ``fn`` in milliseconds, CUDA-event timed after a warm-up (do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def median_ms_graph(fn: Callable[[], object], *, rep_ms: int = 300) -> float:
    """Median time of ``fn`` replayed from a CUDA graph (launch overhead removed), in ms."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def ceilings(device: str = "cuda") -> dict[str, float]:
    """Measure the two ceilings once: device copy bandwidth (GB/s, read+write) and bf16 TFLOP/s."""
    n = 1 << 30  # 1 GiB of bytes
    src = torch.randn(n // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * n / (ms * 1e-3) / 1e9
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b)
    tflops = 2 * m**3 / (ms * 1e-3) / 1e12
    return {"copy_gbs": copy_gbs, "matmul_tflops": tflops}


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-markdown table of ``rows`` (floats printed with 3 significant digits)."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def random_qkv(
    s: int, hq: int, hkv: int, d: int, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded bf16 q (1, hq, s, d), k and v (1, hkv, s, d) on CUDA, drawn in that order."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = {"device": "cuda", "dtype": torch.bfloat16, "generator": gen}
    return (torch.randn(1, hq, s, d, **kw), torch.randn(1, hkv, s, d, **kw),
            torch.randn(1, hkv, s, d, **kw))  # fmt: skip


def progress(msg: str) -> None:
    """One progress line on stderr (long runs show where they are)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def write_result(name: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON under $OUT (when set) and print it as the last stdout line."""
    out = os.environ.get("OUT")
    text = json.dumps(payload, sort_keys=True)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(text + "\n")
    print(text, flush=True)
