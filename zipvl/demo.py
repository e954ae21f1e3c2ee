"""``zipvl demo``: one LVLM prompt, run dense and with ZipVL, side by side.

With no arguments it builds the tiny LLaVA-style model of ``zipvl.models.lvlm`` (random weights
with planted attention structure, seeded, nothing downloaded) and a prompt of one synthetic image
plus a synthetic multi-frame video (hundreds of visual tokens; 65,536 with ``size="large"``, a
GPU workload where attention is most of the dense prefill; ``frames`` resizes it), then prints:

* the per-layer table of the ZipVL cache report (kept ratio p / n, attention-FLOP reduction,
  tokens per precision, bytes vs bf16, compression),
* the mean attention-FLOP reduction, KV bytes and compression,
* prefill time dense vs ZipVL (median of a few timed runs after a warm-up), and ZipVL's time
  with a 16-bit cache (sparse prefill without the KV quantization), next to the Amdahl bound:
  the speed-up if attention cost exactly (p / n)^2 of its dense time and nothing else changed
  (the attention share is measured: one dense causal SDPA at the prompt's shape per layer),
* the greedy tokens of both runs and how many agree,

and writes the per-layer kept-ratio plot (PNG) and a JSON summary to the output directory.
``model_path`` runs a local image-text-to-text checkpoint (one synthetic image, the processor's
chat template) instead.

This module is transformers-free: model building and loading live in ``zipvl.models.lvlm``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor

from zipvl.cache.report import CacheReport
from zipvl.checks import check_int
from zipvl.config import PRESETS, ZipVLConfig
from zipvl.models import disable, enable, is_enabled, lvlm, new_cache
from zipvl.models.hf import forced_generate
from zipvl.quant import IdentityKVQuantizer
from zipvl.types import Impl

__all__ = ["LARGE_PROBE_CAP", "DemoResult", "amdahl_bound", "run_demo"]

LARGE_PROBE_CAP = 64
"""Probe cap of the large demo when none is given (method.md 4.2: a cap for long prompts)."""


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
        attn_share: measured share of dense attention in the dense prefill, in [0, 1].
        amdahl_bound: the prefill speed-up if only attention changed, to (p / n)^2 of its time.
        plot: path of the PNG plot.
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
    attn_share: float
    amdahl_bound: float
    plot: Path
    summary: Path
    text: str

    @property
    def agreement(self) -> int:
        """Positions where the two greedy continuations have the same token."""
        return sum(a == b for a, b in zip(self.dense_tokens, self.zipvl_tokens, strict=False))


class _Progress:
    """Progress lines on stderr (``tqdm``-free), also used as a ``generate`` streamer."""

    def __init__(self, enabled: bool, stream: TextIO) -> None:
        self.enabled, self.stream = enabled, stream
        self.total = 0
        self.done = 0
        self.label = ""
        self._skip_prompt = True

    def stage(self, text: str) -> None:
        if self.enabled:
            print(f"[zipvl demo] {text}", file=self.stream, flush=True)

    def start(self, label: str, total: int) -> _Progress:
        self.label, self.total, self.done, self._skip_prompt = label, total, 0, True
        return self

    # the two methods generate() calls on a streamer
    def put(self, value: Tensor) -> None:
        if self._skip_prompt:  # the first call carries the prompt
            self._skip_prompt = False
            return
        self.done += 1
        if not self.enabled:
            return
        bar = "#" * (20 * self.done // max(self.total, 1))
        line = f"[zipvl demo] {self.label} [{bar:<20}] {self.done}/{self.total}"
        if self._tty:
            print(f"\r{line}", end="", file=self.stream, flush=True)
        elif self.done == self.total or self.done % max(1, self.total // 4) == 0:
            print(line, file=self.stream, flush=True)  # a few lines when logging to a file

    def end(self) -> None:
        if self.enabled and self._tty and self.total:
            print(file=self.stream, flush=True)

    @property
    def _tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocations, lazy compilation)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _config(
    preset: str,
    tau: float | None,
    recompress_every: int | None,
    probe_cap: int | None,
    quant_impl: str | None,
) -> ZipVLConfig:
    cfg = ZipVLConfig.preset(preset)
    changes: dict[str, Any] = {}
    if tau is not None:
        changes["tau"] = tau
    if recompress_every is not None:
        changes["recompress_every"] = recompress_every
    if probe_cap is not None:
        changes["probe_cap"] = probe_cap
    if quant_impl is not None:
        changes["quant_impl"] = quant_impl
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _probe_cap(cap: int | None, size: str, model_path: str | None) -> tuple[int | None, bool]:
    """The probe cap to use and whether it is the large demo's default (method.md 4.2)."""
    if cap is None and model_path is None and size == "large":
        return LARGE_PROBE_CAP, True
    return cap, False


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
) -> float:
    """Median time of one layer's dense causal SDPA at the prompt's shape (what the dense
    model runs: no mask, GQA in the kernel). Random inputs from a private generator."""
    _, hq, hkv, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, hq, s, d, generator=gen, device=device, dtype=dtype)  # (1, Hq, S, D)
    k = torch.randn(1, hkv, s, d, generator=gen, device=device, dtype=dtype)  # (1, Hkv, S, D)
    v = torch.randn(1, hkv, s, d, generator=gen, device=device, dtype=dtype)
    gqa = hq != hkv
    with torch.no_grad():
        return _median_ms(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
            device,
            repeats,
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
    repeats: int = 3,
    seed: int = 0,
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
        tau: overrides the preset's tau.
        recompress_every: overrides the preset's decode block size.
        probe_cap: caps the recent and the random probe counts of the default scorer (None:
            64 for ``size="large"``, as method.md 4.2 recommends for long prompts; no cap
            otherwise).
        quant_impl: ``"reference"`` or ``"triton"``, the default quantizers' write path.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        max_new_tokens: greedy tokens to generate, >= 1.
        out_dir: where the plot and the JSON summary go (created if missing).
        repeats: timed prefill runs (the median is reported), >= 1.
        seed: seeds the built-in model and the synthetic inputs.
        progress: progress lines on ``stderr``.
        stdout: report stream (default ``sys.stdout``).
        stderr: progress stream (default ``sys.stderr``).

    Returns:
        ``DemoResult``.

    Raises:
        ValueError: bad arguments (unknown preset or size, CUDA requested but unavailable, ...).
    """
    out_stream = sys.stdout if stdout is None else stdout
    prog = _Progress(progress, sys.stderr if stderr is None else stderr)
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if size not in lvlm.DEMO_SPECS:
        raise ValueError(f"size: expected one of {sorted(lvlm.DEMO_SPECS)}, got {size!r}")
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("repeats", repeats, 1)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    if frames is not None and model_path is not None:
        raise ValueError(f"frames: only for the built-in model, got frames={frames} with a model")
    probe_cap, capped_by_default = _probe_cap(probe_cap, size, model_path)
    config = _config(preset, tau, recompress_every, probe_cap, quant_impl)
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
    if model_path is None:
        model: Any = lvlm.build_demo_lvlm(size, seed=seed)  # type: ignore[arg-type]
        model.to(device=dev, dtype=dtype)
        inputs = lvlm.demo_inputs(size, frames=frames, seed=seed)  # type: ignore[arg-type]
        spec = lvlm.DEMO_SPECS[size]
        n_frames = spec.frames if frames is None else frames
        visual = spec.tokens_per_picture * (1 + n_frames)
        title = (
            f"built-in {size} LLaVA-style LVLM (random weights, planted structure; "
            f"1 image + {n_frames}-frame video, {spec.tokens_per_picture} tokens each)"
        )
    else:
        model, processor = lvlm.load_local_model(model_path, device=str(dev), dtype=dtype)
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
    with torch.no_grad():
        prog.stage(f"timing the dense prefill ({repeats} runs + warm-up)")
        dense_ms = _median_ms(lambda: model(**inputs, use_cache=True), dev, repeats)
        shape = lvlm.attention_shape(model)
        prog.stage(f"timing one layer's dense attention at S = {prompt_len} (Amdahl bound)")
        attn_ms = _dense_attention_ms(shape, prompt_len, dev, dtype, repeats)
        dense_out = model.generate(
            **inputs, **gen_kwargs, streamer=prog.start("dense generation", max_new_tokens)
        )
        try:
            prog.stage(f"timing the ZipVL prefill ({repeats} runs + warm-up, 2 settings)")
            enable(model, _unquantized(config))
            sparse_ms = _median_ms(
                lambda: model(**inputs, past_key_values=new_cache(model)), dev, repeats
            )
            enable(model, config)
            zipvl_ms = _median_ms(
                lambda: model(**inputs, past_key_values=new_cache(model)), dev, repeats
            )
            cache = new_cache(model)
            zipvl_out = model.generate(
                **inputs,
                **gen_kwargs,
                past_key_values=cache,
                streamer=prog.start("ZipVL generation", max_new_tokens),
            )
            prog.stage("teacher-forced pass (ZipVL predicting the dense continuation)")
            forced = forced_generate(
                model, inputs, dense_out[:, prompt_len:], past_key_values=new_cache(model)
            )
        finally:
            if is_enabled(model):
                disable(model)
    report = cache.report()
    attn_share = min(shape[0] * attn_ms / dense_ms, 1.0)
    bound = amdahl_bound(attn_share, [r.kept_ratio for r in report.prefilled] or [1.0])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = report.plot(out / "kept_ratio.png")
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
            " (the default for --size large: method.md 4.2 recommends a cap for long prompts, "
            "where 5 % + 5 % of the prompt would be thousands of probe rows; not in the paper)"
            if capped_by_default
            else ""
        )
        say(f"probe queries: at most {config.probe_cap} recent + {config.probe_cap} random{why}")
    say(
        f"prefill time (median of {repeats}): dense {dense_ms:.1f} ms, ZipVL {zipvl_ms:.1f} ms "
        f"({dense_ms / zipvl_ms:.2f}x); ZipVL without KV quantization (16-bit cache) "
        f"{sparse_ms:.1f} ms ({dense_ms / sparse_ms:.2f}x)"
    )
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
    say(f"plot: {plot}  summary: {summary}")
    summary.write_text(
        json.dumps(
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
                "attn_ms_per_layer_dense": attn_ms,
                "attn_share_dense": attn_share,
                "amdahl_bound": bound,
                "probe_cap": config.probe_cap,
                "dense_tokens": list(dense_tok),
                "zipvl_tokens": list(zipvl_tok),
                "agreement": agree,
                "teacher_forced_agreement": forced_agree,
            },
            indent=2,
        )
    )
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
        attn_share=attn_share,
        amdahl_bound=bound,
        plot=plot,
        summary=summary,
        text="\n".join(lines),
    )
