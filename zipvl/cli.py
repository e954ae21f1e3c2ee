"""The ``zipvl`` console script."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zipvl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the embedded demo (dense vs ZipVL)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        raise SystemExit("zipvl demo: not built yet (see the integration issue)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
