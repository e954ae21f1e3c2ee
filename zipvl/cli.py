"""The ``zipvl`` console script.

``zipvl demo`` runs one LVLM prompt dense and with ZipVL and prints the per-layer kept-ratio
table, the attention-FLOP reduction, KV bytes and compression, prefill times and the generated
tokens of both runs (see ``zipvl.demo``).

Every argument is checked before anything is built, and a bad one ends the command with a
one-line usage error that names it (exit status 2). The checks come in two steps:

1. without torch (``--help`` and these errors take a fraction of a second): ranges, the
   ``--device`` syntax, ``--out``, ``--model``, ``--frames`` with ``--model``, and
   ``--quant-impl triton`` on a CPU;
2. with torch but without transformers: the preset's configuration with the overrides applied
   (``zipvl.demo_args.check_demo_args``, e.g. ``--tau`` on a preset whose prefill is dense)
   and whether the CUDA device exists.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from zipvl.impl import QUANT_IMPLS

PRESET_NAMES = ("dense", "fixed", "kivi", "zipvl", "zipvl-fast")
"""The ``--preset`` choices: the names of ``zipvl.config.PRESETS`` (a test keeps them equal),
spelled out here so that the command line parses without importing torch."""

DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
"""Devices the demo runs on: ``cpu``, ``cuda`` or ``cuda:N``."""

# run_demo's parameter -> the option that sets it (errors from the library name the parameter)
_OPTION_OF = {
    "model_path": "--model",
    "path": "--model",
    "size": "--size",
    "frames": "--frames",
    "preset": "--preset",
    "tau": "--tau",
    "recompress_every": "--recompress-every",
    "probe_cap": "--probe-cap",
    "quant_impl": "--quant-impl",
    "device": "--device",
    "max_new_tokens": "--max-new-tokens",
    "repeats": "--repeats",
    "warmup": "--warmup",
    "out_dir": "--out",
    "seed": "--seed",
    "tp": "--tp",
}


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _tau(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _device(text: str) -> str:
    if DEVICE_PATTERN.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def out_dir_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be the demo's output directory, or None if it can.

    The directory may exist (it must then be a writable directory) or not (its parent must then
    be an existing writable directory: only the last component is created).
    """
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            return f"{str(out)!r} exists and is not a directory"
        if not os.access(out, os.W_OK | os.X_OK):
            return f"directory {str(out)!r} is not writable"
        return None
    parent = out.parent
    if not parent.exists():
        return f"the parent directory {str(parent)!r} of {str(out)!r} does not exist"
    if not parent.is_dir():
        return f"the parent {str(parent)!r} of {str(out)!r} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {str(out)!r}: directory {str(parent)!r} is not writable"
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a local checkpoint directory (``save_pretrained``), or None."""
    where = Path(path)
    if not where.is_dir():
        return f"expected a local checkpoint directory, got {str(path)!r} (not a directory)"
    if not (where / "config.json").is_file():
        return (
            f"expected a local checkpoint directory (written by save_pretrained), got "
            f"{str(path)!r}, which has no config.json"
        )
    return None


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``zipvl`` parser and its ``demo`` subparser."""
    parser = argparse.ArgumentParser(
        prog="zipvl", description="zipvl: adaptive token-sparse prefill + mixed-precision KV"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run the embedded demo (dense vs ZipVL)",
        description="Run one prompt dense and with ZipVL on a tiny built-in LVLM (default) or "
        "a local checkpoint, print the per-layer report and write a plot.",
    )
    demo.add_argument("--model", metavar="PATH", help="local image-text-to-text checkpoint dir")
    demo.add_argument(
        "--size",
        choices=("tiny", "large"),
        default="tiny",
        help="built-in model: tiny (512 visual tokens, CPU) or large (LongVA-shaped layers, "
        "65536 visual tokens, GPU)",
    )
    demo.add_argument(
        "--frames",
        type=_int_at_least(0),
        help="video frames of the built-in prompt (default: 7 tiny, 255 large); each adds 64 "
        "(tiny) or 256 (large) visual tokens",
    )
    demo.add_argument("--preset", choices=PRESET_NAMES, default="zipvl")
    demo.add_argument(
        "--tau",
        type=_tau,
        help="override the preset's tau (e.g. 0.96); an error with a preset that has no tau",
    )
    demo.add_argument(
        "--recompress-every",
        type=_int_at_least(1),
        help="override the decode block size (paper: 100)",
    )
    demo.add_argument(
        "--probe-cap",
        type=_int_at_least(1),
        help="cap the recent and the random probe counts (default: 64, ZipVLConfig's default; "
        "docs/decisions.md#probe-cap)",
    )
    demo.add_argument(
        "--quant-impl",
        choices=[i.value for i in QUANT_IMPLS],
        help="KV write path of the default quantizers (triton: fused kernel, CUDA)",
    )
    demo.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    demo.add_argument("--max-new-tokens", type=_int_at_least(1), default=16)
    demo.add_argument(
        "--repeats",
        type=_int_at_least(1),
        default=5,
        help="timed prefill runs per setting (min / median / max are printed)",
    )
    demo.add_argument(
        "--warmup",
        type=_int_at_least(0),
        default=2,
        help="untimed prefill runs before the timed ones",
    )
    demo.add_argument(
        "--tp",
        type=_int_at_least(1),
        default=1,
        help="tensor-parallel processes: the model's heads are sharded over N processes "
        "(transformers tp_plan='auto'; gloo on the CPU, NCCL with --device cuda); started "
        "with torchrun when not already running under it",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="zipvl_demo_out", help="output dir for the plot/summary")
    demo.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser, demo


def _check_without_torch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    problem = out_dir_problem(args.out)
    if problem is not None:
        parser.error(f"argument --out: {problem}")
    if args.model is not None:
        problem = checkpoint_problem(args.model)
        if problem is not None:
            parser.error(f"argument --model: {problem}")
        if args.frames is not None:
            parser.error("argument --frames: only for the built-in model, not with --model")
    if (
        args.quant_impl == "triton"
        and args.device == "cpu"
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        parser.error(
            "argument --quant-impl: 'triton' runs the fused Triton kernel, which needs "
            "--device cuda (or TRITON_INTERPRET=1 for the slow interpreter); got --device cpu"
        )


def _usage_error(parser: argparse.ArgumentParser, err: ValueError) -> None:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    name, sep, rest = text.partition(":")
    option = _OPTION_OF.get(name.strip())
    parser.error(f"argument {option}:{rest}" if sep and option else text)


def _under_torchrun(tp: int, argv: list[str]) -> int:
    """Run ``zipvl <argv>`` in ``tp`` processes of one host (``torchrun --standalone``) and
    return its exit status; each process sees WORLD_SIZE and runs the demo itself."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={tp}", "-m", "zipvl", *argv]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zipvl`` console script.

    Args:
        argv: arguments (None: ``sys.argv[1:]``).

    Returns:
        The process exit status (0 on success; bad arguments exit with status 2).
    """
    parser, demo_parser = _parsers()
    args = parser.parse_args(argv)
    if args.command == "demo":
        _check_without_torch(demo_parser, args)
        if args.tp > 1 and "WORLD_SIZE" not in os.environ:
            return _under_torchrun(args.tp, sys.argv[1:] if argv is None else argv)
        from zipvl import demo  # lazy: torch loads only for the demo, transformers later

        kwargs = dict(
            model_path=args.model,
            size=args.size,
            frames=args.frames,
            preset=args.preset,
            tau=args.tau,
            recompress_every=args.recompress_every,
            probe_cap=args.probe_cap,
            quant_impl=args.quant_impl,
            device=args.device,
            max_new_tokens=args.max_new_tokens,
            out_dir=args.out,
            repeats=args.repeats,
            warmup=args.warmup,
            seed=args.seed,
            tp=args.tp,
        )
        try:
            demo.check_demo_args(**kwargs)
        except ValueError as err:
            _usage_error(demo_parser, err)
        try:
            demo.run_demo(**kwargs, progress=not args.quiet)
        except ValueError as err:  # found while running (e.g. a checkpoint that does not load)
            raise SystemExit(f"zipvl demo: error: {err}") from err
        _close_process_group()  # after a run every rank finished (a failed one just exits)
    return 0


def _close_process_group() -> None:
    """Leave the process group the tensor-parallel model created, every rank together: a rank
    that exits while another's gloo threads still talk to it can abort at exit ("terminate
    called without an active exception", seen once in CI)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
