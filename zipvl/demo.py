"""``zipvl demo``: one LVLM prompt, run dense and with ZipVL, side by side.

With no arguments it builds the tiny LLaVA-style model of ``zipvl.testing.demo_lvlm``
(random weights with planted attention structure, seeded, nothing downloaded) and a prompt of
one synthetic image plus a synthetic multi-frame video (hundreds of visual tokens; 65,536 with
``size="large"``, a GPU workload where attention is most of the dense prefill; ``frames``
resizes it), then prints:

* the per-layer table of the ZipVL cache report (kept ratio p / n, attention-FLOP reduction,
  tokens per precision, bytes vs bf16, compression),
* the mean attention-FLOP reduction, KV bytes and compression,
* prefill time dense vs ZipVL (median, fastest and slowest of ``repeats`` timed runs after
  ``warmup`` untimed ones, and a verdict when the spread makes the speed-up meaningless), and
  ZipVL's time with a 16-bit cache (sparse prefill without the KV quantization), next to the
  Amdahl bound: the speed-up if attention cost exactly (p / n)^2 of its dense time and nothing
  else changed (the attention share is measured: one dense causal SDPA at the prompt's shape per
  layer),
* the greedy tokens of both runs and how many agree,

and writes the per-layer kept-ratio plot (PNG) and a JSON summary to the output directory.
``model_path`` runs a local image-text-to-text checkpoint (one synthetic image, the processor's
chat template) instead.

Importing this module does not import transformers: ``check_demo_args`` (``zipvl.demo_args``)
validates every argument first, and ``run_demo`` imports the model side (``zipvl.models``) only
after that. Model building and loading live in ``zipvl.testing.demo_lvlm``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from zipvl import plotting
from zipvl.config import ZipVLConfig
from zipvl.demo_args import (
    DEMO_SIZES,
    LARGE_PROBE_CAP,
    DemoSetup,
    check_demo_args,
)
from zipvl.impl import Impl
from zipvl.quant import IdentityKVQuantizer

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from zipvl.cache.report import CacheReport

__all__ = [
    "DEMO_SIZES",
    "LARGE_PROBE_CAP",
    "SPREAD_LIMIT",
    "DemoResult",
    "DemoSetup",
    "Timing",
    "amdahl_bound",
    "check_demo_args",
    "kept_ratio_figure",
    "plot_kept_ratio",
    "run_demo",
    "speedup_note",
]

SPREAD_LIMIT = 1.5
"""A speed-up whose range over the timed runs (fastest against slowest) spans more than this
factor is reported as too noisy to mean anything."""


@dataclass(frozen=True)
class DemoResult:
    """What ``run_demo`` measured.

    Attributes:
        report: the ZipVL cache report after the generation.
        prompt_tokens: prompt length.
        visual_tokens: visual placeholder tokens in the prompt.
        dense_tokens: greedy tokens of the dense run.
        zipvl_tokens: greedy tokens of the ZipVL run.
        forced_agreement: steps where ZipVL, fed the dense continuation, predicts its next token.
        prefill_ms_dense: median dense prefill time.
        prefill_ms_zipvl: median ZipVL prefill time.
        prefill_ms_zipvl_16bit: median ZipVL prefill time with a 16-bit cache.
        timings: every timed run, per setting ("dense", "zipvl", "zipvl_16bit").
        attn_share: measured share of dense attention in the dense prefill, in [0, 1].
        amdahl_bound: the prefill speed-up if only attention changed, to (p / n)^2 of its time.
        plot: path of the PNG plot (None: matplotlib is not installed).
        summary: path of the JSON summary.
        text: everything that was printed.
    """

    report: CacheReport
    prompt_tokens: int
    visual_tokens: int
    dense_tokens: tuple[int, ...]
    zipvl_tokens: tuple[int, ...]
    forced_agreement: int
    prefill_ms_dense: float
    prefill_ms_zipvl: float
    prefill_ms_zipvl_16bit: float
    timings: Mapping[str, Timing]
    attn_share: float
    amdahl_bound: float
    plot: Path | None
    summary: Path
    text: str

    @property
    def agreement(self) -> int:
        """Positions where the two greedy continuations have the same token."""
        return sum(a == b for a, b in zip(self.dense_tokens, self.zipvl_tokens, strict=False))


T = TypeVar("T")


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated runs of one setting, in milliseconds.

    Attributes:
        runs_ms: one entry per timed run (after the warm-up runs), in run order.
    """

    runs_ms: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.runs_ms:
            raise ValueError("runs_ms: expected at least one timed run, got none")

    @property
    def min(self) -> float:
        return min(self.runs_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.runs_ms)

    @property
    def max(self) -> float:
        return max(self.runs_ms)

    def describe(self) -> str:
        """``"16.4 ms (15.9 to 18.0)"``: the median, then the fastest and the slowest run."""
        return f"{self.median:.1f} ms ({self.min:.1f} to {self.max:.1f})"


def speedup_note(dense: Timing, other: Timing) -> str:
    """The speed-up of ``other`` over ``dense``, its range over the runs, and a verdict.

    The range goes from the slowest ``other`` run against the fastest dense one to the
    fastest against the slowest. The verdict says when the range spans more than
    ``SPREAD_LIMIT`` (too wide to mean anything) or contains 1 (no measurable difference).
    """
    mid = dense.median / other.median
    low, high = dense.min / other.max, dense.max / other.min
    text = f"{mid:.2f}x (range {low:.2f}x to {high:.2f}x)"
    if high / low > SPREAD_LIMIT:
        return (
            f"{text}: the runs spread too widely for this speed-up to mean anything "
            "(a busy or throttled machine; try more --repeats on an idle one)"
        )
    if low <= 1.0 <= high:
        return f"{text}: within the spread of the runs, no measurable difference"
    return text


def _bar(items: Iterable[T], label: str, total: int, progress: _Progress) -> Iterator[T]:
    """``items`` with a tqdm bar (rate, time left) on a terminal; quiet otherwise."""
    yield from tqdm(
        items,
        desc=f"[zipvl demo] {label}",
        total=total,
        file=progress.stream,
        disable=None if progress.enabled else True,  # None: only on a terminal
        leave=False,
        unit="run",
        dynamic_ncols=True,
    )


class _Progress:
    """Stage lines and tqdm bars on stderr; the generation bar doubles as a ``generate``
    streamer."""

    def __init__(self, enabled: bool, stream: TextIO) -> None:
        self.enabled, self.stream = enabled, stream
        self._bar: Any = None
        self._skip_prompt = True

    def stage(self, text: str) -> None:
        if self.enabled:
            tqdm.write(f"[zipvl demo] {text}", file=self.stream)

    def start(self, label: str, total: int) -> _Progress:
        self.end()
        self._skip_prompt = True
        self._bar = tqdm(
            desc=f"[zipvl demo] {label}",
            total=total,
            file=self.stream,
            disable=None if self.enabled else True,
            leave=False,
            unit="tok",
            dynamic_ncols=True,
        )
        return self

    # the two methods generate() calls on a streamer
    def put(self, value: Tensor) -> None:
        if self._skip_prompt:  # the first call carries the prompt
            self._skip_prompt = False
            return
        if self._bar is not None:
            self._bar.update(1)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_runs(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    warmup: int,
    label: str,
    progress: _Progress,
) -> Timing:
    """``warmup`` untimed runs (allocations, lazy compilation), then ``repeats`` timed ones."""
    times: list[float] = []
    for i in _bar(range(warmup + repeats), label, warmup + repeats, progress):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(tuple(times))


def _unquantized(config: ZipVLConfig) -> ZipVLConfig:
    """The same sparsity with a 16-bit cache: separates attention from quantization time."""
    quant_keys = ("quantizer", "bits_high", "bits_low", "quant_impl")
    layers = {
        i: {k: v for k, v in o.items() if k not in quant_keys} for i, o in config.layers.items()
    }
    return dataclasses.replace(
        config,
        quantizer=IdentityKVQuantizer(),
        bits_high=4,
        bits_low=2,
        quant_impl=Impl.REFERENCE,
        layers=layers,
    )


def _to_device(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if not isinstance(value, Tensor):
        return value
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def _dense_attention_ms(
    shape: tuple[int, int, int, int],
    s: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
    progress: _Progress,
) -> Timing:
    """Times of one layer's dense causal SDPA at the prompt's shape (what the dense model
    runs: no mask, GQA in the kernel). Random inputs from a private generator."""
    _, hq, hkv, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, hq, s, d, generator=gen, device=device, dtype=dtype)  # (1, Hq, S, D)
    k = torch.randn(1, hkv, s, d, generator=gen, device=device, dtype=dtype)  # (1, Hkv, S, D)
    v = torch.randn(1, hkv, s, d, generator=gen, device=device, dtype=dtype)
    gqa = hq != hkv
    with torch.no_grad():
        return _time_runs(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
            device,
            repeats,
            warmup,
            "one layer's dense attention",
            progress,
        )


def amdahl_bound(attn_share: float, kept_ratios: Sequence[float]) -> float:
    """Prefill speed-up if attention took (p / n)^2 of its dense time and nothing else changed.

    Args:
        attn_share: share of the dense prefill spent in attention, in [0, 1].
        kept_ratios: p / n per layer (every layer's dense attention costs the same).

    Returns:
        ``1 / ((1 - f) + f * mean((p / n)^2))``.
    """
    if not 0.0 <= attn_share <= 1.0:
        raise ValueError(f"attn_share: expected a value in [0, 1], got {attn_share}")
    if not kept_ratios:
        raise ValueError("kept_ratios: expected at least one layer, got none")
    r2 = sum(r * r for r in kept_ratios) / len(kept_ratios)
    return 1.0 / ((1.0 - attn_share) + attn_share * r2)


def kept_ratio_figure(report: CacheReport, *, preset: str) -> Figure:
    """The per-layer kept-ratio bar chart of a report, naming the preset (matplotlib, Agg).

    The legend sits outside the axes, right of them, so it never covers a bar; the title gives
    the mean attention-FLOP reduction as a non-negative share ("12.3 % fewer").

    Args:
        report: a cache report with at least one layer.
        preset: the preset name shown in the title.

    Returns:
        The figure (drawn by ``plot_kept_ratio``).

    Raises:
        ValueError: the report has no layer.
        ImportError: matplotlib is not installed (``pip install "zipvl[plot]"``).
    """
    if not report.layers:
        raise ValueError("report: expected a report with at least one layer to plot, got none")
    fig = plotting.figure(
        (max(5.5, 0.35 * len(report.layers) + 3.5), 3.2), what="the kept-ratio plot"
    )
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(
        [r.layer for r in report.layers],
        [r.kept_ratio for r in report.layers],
        label="kept ratio per layer",
    )
    mean = report.kept_ratio
    ax.axhline(mean, color="k", linestyle="--", linewidth=1, label=f"mean {mean:.1%}")
    ax.set_xlabel("layer")
    ax.set_ylabel("kept ratio p / n")
    ax.set_ylim(0.0, 1.05)
    fewer = max(report.attn_flop_reduction, 0.0)  # never "-0.0 %"
    ax.set_title(
        f"ZipVL kept ratio per layer, preset {preset!r}\n"
        f"{fewer:.1%} fewer attention FLOPs (prefill)",
        fontsize="medium",
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
    fig.tight_layout()
    return fig


def plot_kept_ratio(report: CacheReport, path: str | Path, *, preset: str) -> Path:
    """Write ``kept_ratio_figure(report, preset=preset)`` as a PNG.

    Args:
        report: a cache report with at least one layer.
        path: output file; its parent directory must exist.
        preset: the preset name shown in the title.

    Returns:
        The path written.
    """
    out = Path(path)
    kept_ratio_figure(report, preset=preset).savefig(out, format="png", bbox_inches="tight")
    return out


def _tokens(out: Tensor, prompt_len: int) -> tuple[int, ...]:
    return tuple(int(t) for t in out[0, prompt_len:].tolist())


def run_demo(
    *,
    model_path: str | None = None,
    size: str = "tiny",
    frames: int | None = None,
    preset: str = "zipvl",
    tau: float | None = None,
    recompress_every: int | None = None,
    probe_cap: int | None = None,
    quant_impl: str | None = None,
    device: str = "cpu",
    max_new_tokens: int = 16,
    out_dir: str | Path = "zipvl_demo_out",
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
    tp: int = 1,
    progress: bool = True,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> DemoResult:
    """Run the demo (see the module docstring) and print its report.

    Args:
        model_path: local checkpoint directory (None: the built-in tiny LVLM).
        size: built-in model size, ``"tiny"`` (CPU, 512 visual tokens) or ``"large"``
            (LongVA-shaped layers, 65,536 visual tokens, for a GPU: about 1 GB of weights and
            a few GB of activations in bf16).
        frames: video frames of the built-in prompt (None: the size's default: 7 tiny, 255
            large); each adds 64 (tiny) or 256 (large) visual tokens.
        preset: ``ZipVLConfig`` preset name.
        tau: overrides the preset's tau; an error with a preset that has none (an explicit
            allocator, or a dense prefill with a uniform-precision cache).
        recompress_every: overrides the preset's decode block size.
        probe_cap: caps the recent and the random probe counts of the default scorer (None:
            64 for ``size="large"``, as docs/decisions.md#probe-cap recommends for long prompts;
            no cap otherwise). An error with a preset that never uses the scorer.
        quant_impl: ``"reference"`` or ``"triton"``, the default quantizers' write path.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        max_new_tokens: greedy tokens to generate, >= 1.
        out_dir: where the plot and the JSON summary go (created if missing; its parent must
            exist).
        repeats: timed prefill runs per setting (min / median / max are reported), >= 1.
        warmup: untimed prefill runs before the timed ones, >= 0.
        seed: seeds the built-in model and the synthetic inputs.
        tp: tensor-parallel processes (> 1: this is one of ``tp`` torchrun processes; the
            model is loaded with ``tp_plan="auto"``, ZipVL reduces the attention mass over
            them, and only rank 0 prints and writes files; every rank returns the result).
        progress: progress on ``stderr``: stage lines, and tqdm bars when it is a terminal.
        stdout: report stream (default ``sys.stdout``).
        stderr: progress stream (default ``sys.stderr``).

    Returns:
        ``DemoResult``.

    Raises:
        ValueError: bad arguments (``check_demo_args``), before anything is built.
    """
    setup = check_demo_args(
        model_path=model_path,
        size=size,
        frames=frames,
        preset=preset,
        tau=tau,
        recompress_every=recompress_every,
        probe_cap=probe_cap,
        quant_impl=quant_impl,
        device=device,
        max_new_tokens=max_new_tokens,
        out_dir=out_dir,
        repeats=repeats,
        warmup=warmup,
        seed=seed,
        tp=tp,
    )
    # transformers loads here, after the arguments are known to be good
    from zipvl.models import cache_kwargs, disable, enable, is_enabled, new_cache
    from zipvl.models.hf import forced_generate
    from zipvl.testing import demo_lvlm as lvlm

    out_stream = sys.stdout if stdout is None else stdout
    err_stream = sys.stderr if stderr is None else stderr
    lead = int(os.environ.get("RANK", "0")) == 0 if tp > 1 else True  # prints, writes files
    if not lead:
        out_stream, progress = io.StringIO(), False
    prog = _Progress(progress, err_stream)
    for warning in setup.warnings:
        print(f"[zipvl demo] {warning}", file=err_stream, flush=True)
    dev, config, capped_by_default = setup.device, setup.config, setup.capped_by_default
    if size == "tiny" and model_path is None:
        # a 537-token prompt: pages of 32 tokens (128 suits real lengths, where less than a
        # page per precision waits at full precision)
        config = dataclasses.replace(config, page_size=32)
    lines: list[str] = []

    def say(text: str = "") -> None:
        lines.append(text)
        print(text, file=out_stream, flush=True)

    prog.stage("building the model and the prompt")
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    inputs: Mapping[str, Any]
    if model_path is None and tp > 1:
        model: Any = lvlm.load_demo_lvlm_tp(size, seed=seed, dtype=dtype)  # type: ignore[arg-type]
    elif model_path is None:
        model = lvlm.build_demo_lvlm(size, seed=seed)  # type: ignore[arg-type]
        model.to(device=dev, dtype=dtype)
    else:
        model, processor = lvlm.load_local_model(
            model_path, device=str(dev), dtype=dtype, tensor_parallel=tp > 1
        )
    if tp > 1:
        dev = next(model.parameters()).device  # transformers put this rank's shard there
    if model_path is None:
        inputs = lvlm.demo_inputs(size, frames=frames, seed=seed)  # type: ignore[arg-type]
        spec = lvlm.DEMO_SPECS[size]
        n_frames = spec.frames if frames is None else frames
        visual = spec.tokens_per_picture * (1 + n_frames)
        title = (
            f"built-in {size} LLaVA-style LVLM (random weights, planted structure; "
            f"1 image + {n_frames}-frame video, {spec.tokens_per_picture} tokens each)"
        )
    else:
        image = lvlm.synthetic_image(getattr(model.config.vision_config, "image_size", 336))
        inputs = lvlm.processor_inputs(processor, lvlm.to_pil(image))
        image_token = getattr(model.config, "image_token_id", None)
        if image_token is None:
            image_token = getattr(model.config, "image_token_index", -1)
        visual = int((inputs["input_ids"] == image_token).sum())
        title = f"checkpoint {model_path} ({type(model).__name__}, one synthetic image)"
    inputs = {k: _to_device(v, dev, dtype) for k, v in inputs.items()}
    prompt_len = int(inputs["input_ids"].shape[1])
    prog.stage(f"ready in {time.perf_counter() - t0:.1f} s: prompt of {prompt_len} tokens")

    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False)
    runs = f"{warmup} warm-up + {repeats} timed runs"
    with torch.no_grad():
        prog.stage(f"timing the dense prefill ({runs})")
        dense_t = _time_runs(
            lambda: model(**inputs, use_cache=True), dev, repeats, warmup, "dense prefill", prog
        )
        shape = lvlm.attention_shape(model)
        if tp > 1:  # every process attends over its own share of the heads
            shape = (shape[0], shape[1] // tp, shape[2] // tp, shape[3])
        prog.stage(f"timing one layer's dense attention at S = {prompt_len} (Amdahl bound)")
        attn_t = _dense_attention_ms(shape, prompt_len, dev, dtype, repeats, warmup, prog)
        dense_out = model.generate(
            **inputs, **gen_kwargs, streamer=prog.start("dense generation", max_new_tokens)
        )
        prog.end()
        try:
            prog.stage(f"timing the ZipVL prefill ({runs}, 2 settings)")
            enable(model, _unquantized(config))
            sparse_t = _time_runs(
                lambda: model(**inputs, **cache_kwargs(model, new_cache(model))),
                dev,
                repeats,
                warmup,
                "ZipVL prefill, 16-bit cache",
                prog,
            )
            enable(model, config)
            zipvl_t = _time_runs(
                lambda: model(**inputs, **cache_kwargs(model, new_cache(model))),
                dev,
                repeats,
                warmup,
                "ZipVL prefill",
                prog,
            )
            cache = new_cache(model)
            zipvl_out = model.generate(
                **inputs,
                **gen_kwargs,
                **cache_kwargs(model, cache),
                streamer=prog.start("ZipVL generation", max_new_tokens),
            )
            prog.end()
            prog.stage("teacher-forced pass (ZipVL predicting the dense continuation)")
            forced = forced_generate(
                model, inputs, dense_out[:, prompt_len:], **cache_kwargs(model, new_cache(model))
            )
        finally:
            prog.end()
            if is_enabled(model):
                disable(model)
    dense_ms, zipvl_ms, sparse_ms, attn_ms = (
        dense_t.median,
        zipvl_t.median,
        sparse_t.median,
        attn_t.median,
    )
    report = cache.report()
    attn_share = min(shape[0] * attn_ms / dense_ms, 1.0)
    bound = amdahl_bound(attn_share, [r.kept_ratio for r in report.prefilled] or [1.0])

    out = Path(out_dir)
    if lead:
        out.mkdir(exist_ok=True)  # its parent exists: check_demo_args
    plot = None
    if lead and plotting.available():
        plot = plot_kept_ratio(report, out / "kept_ratio.png", preset=preset)
    dense_tok = _tokens(dense_out, prompt_len)
    zipvl_tok = _tokens(zipvl_out, prompt_len)
    n = min(len(dense_tok), len(zipvl_tok))
    agree = sum(a == b for a, b in zip(dense_tok[:n], zipvl_tok[:n], strict=True))
    diverge = next((i for i in range(n) if dense_tok[i] != zipvl_tok[i]), None)
    forced_tok = tuple(int(t) for t in forced.argmax[0].tolist())
    forced_agree = sum(a == b for a, b in zip(forced_tok, dense_tok, strict=True))

    say(f"# zipvl demo: {title}")
    say(
        f"device {dev}, {str(dtype).replace('torch.', '')}; prompt {prompt_len} tokens "
        f"({visual} visual); preset {preset!r}: {config.describe()}"
    )
    if tp > 1:
        rank_kept = [[r.kept_tokens for r in rep.layers] for rep in report.ranks]
        same = all(k == rank_kept[0] for k in rank_kept)
        say(
            f"tensor parallel: {tp} processes ({dev.type}), each holding {shape[2]} of "
            f"{shape[2] * tp} KV heads per layer; every layer's budget is chosen on the "
            "attention mass all-reduced over them, so every process keeps the same tokens "
            f"per head ({'yes' if same else 'NO'}: {rank_kept}); the table is the whole "
            "model (bytes summed over the processes)"
        )
    say()
    say("## Per-layer kept ratio and KV cache (ZipVL)")
    say()
    say(report.to_markdown())
    say()
    say(
        f"attention-FLOP reduction (prefill, mean over layers): {report.attn_flop_reduction:.1%} "
        f"at a mean kept ratio of {report.kept_ratio:.1%}"
    )
    say(
        f"KV cache: {report.live_bytes:,} bytes of live tokens with ZipVL vs "
        f"{report.bf16_bytes:,} bytes in bf16 -> {report.bf16_bytes / report.live_bytes:.2f}x "
        f"compression; {report.bytes:,} bytes held ({report.compression:.2f}x), which adds the "
        "fixed full-precision capacity per row (tail and page staging, about 2 pages + 3 "
        "decode blocks of tokens: large next to a short prompt, ~2% at 128k tokens) and the "
        "pools' headroom"
    )
    if config.probe_cap is not None:
        why = (
            " (the default for --size large: docs/decisions.md#probe-cap recommends a cap for "
            "long prompts, where 5 % + 5 % of the prompt would be thousands of probe rows; not "
            "in the paper)"
            if capped_by_default
            else ""
        )
        say(f"probe queries: at most {config.probe_cap} recent + {config.probe_cap} random{why}")
    say(
        f"prefill time, median (fastest to slowest) of {repeats} runs after {warmup} warm-up: "
        f"dense {dense_t.describe()}, ZipVL {zipvl_t.describe()}, ZipVL with a 16-bit cache "
        f"(no KV quantization) {sparse_t.describe()}"
    )
    say(f"speed-up of ZipVL: {speedup_note(dense_t, zipvl_t)}")
    say(f"speed-up of ZipVL with a 16-bit cache: {speedup_note(dense_t, sparse_t)}")
    say(
        f"Amdahl bound {bound:.2f}x: dense attention is {attn_share:.1%} of the dense prefill "
        f"({shape[0]} layers x {attn_ms:.1f} ms of {dense_ms:.1f} ms); shrinking it to the kept "
        f"share (p/n)^2 with everything else unchanged (projections, MLP, vision tower) gives "
        f"at most {bound:.2f}x, before ZipVL's own scoring, selection and KV quantization"
    )
    say(f"generated (dense): {list(dense_tok)}")
    say(f"generated (ZipVL): {list(zipvl_tok)}")
    tail = "identical" if diverge is None else f"first difference at step {diverge}"
    say(f"agreement: {agree}/{n} tokens ({tail})")
    say(
        f"teacher-forced top-1 agreement (ZipVL's next token given the dense prefix): "
        f"{forced_agree}/{len(dense_tok)}"
    )
    if model_path is None:
        say(
            "note: random weights have near-tied next-token logits, so greedy continuations "
            "diverge after tiny perturbations; judge accuracy on a real checkpoint (--model PATH)"
        )
    summary = out / "summary.json"
    if plot is None:
        say(f"plot: none ({plotting.missing_message('the kept-ratio plot')})")
    say(f"plot: {plot}  summary: {summary}" if plot else f"summary: {summary}")
    summary_doc = json.dumps(
        {
            "model": title,
            "device": str(dev),
            "preset": preset,
            "config": config.describe(),
            "prompt_tokens": prompt_len,
            "visual_tokens": visual,
            "kept_ratio": report.kept_ratio,
            "layer_kept_ratio": [r.kept_ratio for r in report.layers],
            "attn_flop_reduction": report.attn_flop_reduction,
            "kv_bytes": report.bytes,
            "kv_bf16_bytes": report.bf16_bytes,
            "compression": report.bf16_bytes / report.live_bytes,
            "compression_held": report.compression,
            "kv_live_bytes": report.live_bytes,
            "prefill_ms_dense": dense_ms,
            "prefill_ms_zipvl": zipvl_ms,
            "prefill_ms_zipvl_16bit_cache": sparse_ms,
            "prefill_runs_ms": {
                "dense": list(dense_t.runs_ms),
                "zipvl": list(zipvl_t.runs_ms),
                "zipvl_16bit_cache": list(sparse_t.runs_ms),
            },
            "warmup_runs": warmup,
            "attn_ms_per_layer_dense": attn_ms,
            "attn_share_dense": attn_share,
            "amdahl_bound": bound,
            "probe_cap": config.probe_cap,
            "dense_tokens": list(dense_tok),
            "zipvl_tokens": list(zipvl_tok),
            "agreement": agree,
            "teacher_forced_agreement": forced_agree,
            "tp": tp,
            "rank_kept_tokens": [[r.kept_tokens for r in rep.layers] for rep in report.ranks],
        },
        indent=2,
    )
    if lead:  # with tp > 1, rank 0 writes the files
        summary.write_text(summary_doc)
    return DemoResult(
        report=report,
        prompt_tokens=prompt_len,
        visual_tokens=visual,
        dense_tokens=dense_tok,
        zipvl_tokens=zipvl_tok,
        forced_agreement=forced_agree,
        prefill_ms_dense=dense_ms,
        prefill_ms_zipvl=zipvl_ms,
        prefill_ms_zipvl_16bit=sparse_ms,
        timings={"dense": dense_t, "zipvl": zipvl_t, "zipvl_16bit": sparse_t},
        attn_share=attn_share,
        amdahl_bound=bound,
        plot=plot,
        summary=summary,
        text="\n".join(lines),
    )
