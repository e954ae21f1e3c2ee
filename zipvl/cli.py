"""The ``zipvl`` console script.

``zipvl demo`` runs one LVLM prompt dense and with ZipVL and prints the per-layer kept-ratio
table, the attention-FLOP reduction, KV bytes and compression, prefill times and the generated
tokens of both runs (see ``zipvl.demo``).
"""

from __future__ import annotations

import argparse

from zipvl.config import PRESETS


def _parser() -> argparse.ArgumentParser:
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
        type=int,
        help="video frames of the built-in prompt (default: 7 tiny, 255 large); each adds 64 "
        "(tiny) or 256 (large) visual tokens",
    )
    demo.add_argument("--preset", choices=sorted(PRESETS), default="zipvl")
    demo.add_argument("--tau", type=float, help="override the preset's tau (e.g. 0.96)")
    demo.add_argument(
        "--recompress-every", type=int, help="override the decode block size (paper: 100)"
    )
    demo.add_argument(
        "--probe-cap",
        type=int,
        help="cap the recent and the random probe counts (default: 64 with --size large, as "
        "method.md 4.2 recommends for long prompts; no cap otherwise)",
    )
    demo.add_argument(
        "--quant-impl",
        choices=("reference", "triton"),
        help="KV write path of the default quantizers (triton: fused kernel, CUDA)",
    )
    demo.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--repeats", type=int, default=3, help="timed prefill runs (median)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="zipvl_demo_out", help="output dir for the plot/summary")
    demo.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zipvl`` console script.

    Args:
        argv: arguments (None: ``sys.argv[1:]``).

    Returns:
        The process exit status (0 on success).
    """
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from zipvl.demo import run_demo  # lazy: torch/transformers load only for the demo

        try:
            run_demo(
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
                seed=args.seed,
                progress=not args.quiet,
            )
        except ValueError as err:
            raise SystemExit(f"zipvl demo: {err}") from err
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
