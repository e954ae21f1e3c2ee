"""Arguments of ``zipvl demo``, checked and resolved before anything is built.

``check_demo_args`` validates every argument of ``zipvl.demo.run_demo`` (the command line calls it
first, so that a bad argument is reported in well under a second) and resolves the preset with
its overrides into a ``ZipVLConfig``. Importing this module does not import transformers.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from zipvl.checks import check_int
from zipvl.cli import DEVICE_PATTERN, checkpoint_problem, out_dir_problem
from zipvl.config import PRESETS, ZipVLConfig
from zipvl.impl import QUANT_IMPLS, parse_impl
from zipvl.quant import MixedPrecisionKVQuantizer

__all__ = [
    "DEMO_SIZES",
    "LARGE_CPU_WARNING",
    "LARGE_PROBE_CAP",
    "DemoSetup",
    "check_demo_args",
]

DEMO_SIZES = ("tiny", "large")
"""The built-in model sizes (the keys of ``zipvl.testing.demo_lvlm.DEMO_SPECS``; a test keeps
them equal), here so that arguments are checked without importing transformers."""

LARGE_PROBE_CAP = 64
"""Probe cap of the large demo when none is given (docs/decisions.md#probe-cap: a cap for long
prompts)."""

LARGE_CPU_WARNING = (
    "warning: --size large is a GPU workload (a prompt of 65k tokens through LongVA-shaped "
    "layers); on a CPU every prefill takes minutes and tens of GB of memory. Use --device cuda, "
    "or fewer --frames"
)


def _config(
    preset: str,
    tau: float | None,
    recompress_every: int | None,
    probe_cap: int | None,
    quant_impl: str | None,
) -> ZipVLConfig:
    cfg = ZipVLConfig.preset(preset)
    for name, value in (("tau", tau), ("probe_cap", probe_cap)):
        why = _no_effect(cfg, name) if value is not None else None
        if why is not None:
            raise ValueError(f"{name}: preset {preset!r} has no {name} to set: {why}")
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


def _no_effect(cfg: ZipVLConfig, setting: str) -> str | None:
    """Why ``setting`` ("tau" or "probe_cap") would change nothing under ``cfg``, or None.

    tau feeds the default allocator and probe_cap the default scorer. Their selection decides
    which tokens the prefill attends to (sparse prefill) and which are stored at high precision
    (a mixed-precision cache); with neither, it is never used.
    """
    component = "allocator" if setting == "tau" else "scorer"
    given = getattr(cfg, component)
    if given is not None:
        return f"its {component} is given explicitly ({given!r})"
    mixed = isinstance(cfg.for_layer(0).quantizer, MixedPrecisionKVQuantizer)
    if not cfg.sparse_prefill and not mixed:
        quantizer = type(cfg.for_layer(0).quantizer).__name__
        return (
            f"its prefill is dense and its {quantizer} cache stores every token at the same "
            "precision, so no token is ever selected"
        )
    return None


def _probe_cap(cap: int | None, size: str, model_path: str | None) -> tuple[int | None, bool]:
    """The probe cap to use and whether it is the large demo's default
    (docs/decisions.md#probe-cap)."""
    if cap is None and model_path is None and size == "large":
        return LARGE_PROBE_CAP, True
    return cap, False


@dataclasses.dataclass(frozen=True)
class DemoSetup:
    """The demo's arguments, checked and resolved (``check_demo_args``).

    Attributes:
        config: the preset with the overrides applied.
        device: the device to run on.
        capped_by_default: the probe cap is the large demo's default, not a given one.
        warnings: things worth saying before the run starts (e.g. a GPU workload on a CPU).
    """

    config: ZipVLConfig
    device: torch.device
    capped_by_default: bool
    warnings: tuple[str, ...]


def check_demo_args(
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
) -> DemoSetup:
    """Check every argument of ``run_demo`` before anything is built (no transformers import).

    Args: as ``run_demo``.

    Returns:
        ``DemoSetup``.

    Raises:
        ValueError: a bad argument; the message starts with the argument's name.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if size not in DEMO_SIZES:
        raise ValueError(f"size: expected one of {list(DEMO_SIZES)}, got {size!r}")
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    check_int("frames", frames, 0, optional=True)
    check_int("seed", seed, 0)
    if not isinstance(device, str) or DEVICE_PATTERN.fullmatch(device) is None:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    dev = torch.device(device)
    check_int("tp", tp, 1)
    if tp > 1:
        world = os.environ.get("WORLD_SIZE")
        if world != str(tp):
            raise ValueError(
                f"tp: expected to run in one of {tp} torchrun processes (WORLD_SIZE={tp}), got "
                f"WORLD_SIZE={world}: run `zipvl demo --tp {tp}` (it starts torchrun) or "
                f"`torchrun --nproc-per-node {tp} -m zipvl demo --tp {tp}`"
            )
        if dev.index is not None:
            raise ValueError(
                f"device: expected 'cpu' or 'cuda' with tp={tp} (every process takes the GPU "
                f"of its LOCAL_RANK), got {device!r}"
            )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {device!r} requested but only {torch.cuda.device_count()} CUDA "
                "device(s) exist"
            )
    if tp > 1 and dev.type == "cuda" and torch.cuda.device_count() < tp:
        raise ValueError(
            f"tp: expected at most the {torch.cuda.device_count()} CUDA device(s) of this "
            f"host, got tp={tp}"
        )
    if model_path is not None:
        problem = checkpoint_problem(model_path)
        if problem is not None:
            raise ValueError(f"model_path: {problem}")
        if frames is not None:
            raise ValueError(
                f"frames: only for the built-in model, got frames={frames} with a model"
            )
    problem = out_dir_problem(out_dir)
    if problem is not None:
        raise ValueError(f"out_dir: {problem}")
    if quant_impl is not None:
        quant_impl = parse_impl("quant_impl", quant_impl, QUANT_IMPLS)
    if quant_impl == "triton" and dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "quant_impl: 'triton' runs the fused Triton kernel, which needs a CUDA device (or "
            "TRITON_INTERPRET=1 for the slow interpreter); got device 'cpu'"
        )
    cap, capped_by_default = _probe_cap(probe_cap, size, model_path)
    config = _config(preset, tau, recompress_every, cap, quant_impl)
    warnings = (
        (LARGE_CPU_WARNING,)
        if size == "large" and model_path is None and (dev.type == "cpu")
        else ()
    )
    return DemoSetup(config, dev, capped_by_default, warnings)
