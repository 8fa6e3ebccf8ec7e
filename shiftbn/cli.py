"""The ``shiftbn`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="shiftbn", description="BatchNorm under domain shift.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the built-in multi-lab demo and write a report")
    args = ap.parse_args(argv)
    if args.command == "demo":
        print("shiftbn demo: not built yet.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
