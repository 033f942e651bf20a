"""The ``lorite`` command."""

from __future__ import annotations

import argparse
import sys


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def _demo(args: argparse.Namespace) -> None:
    from .train.tiny_demo import run_tiny_demo

    run_tiny_demo(steps=args.steps, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorite", description="Efficient LLM training around LoRA-RITE.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="fine-tune a tiny model with LoRA-RITE and AdamW; print the loss curves"
    )
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CliError as error:
        print(f"lorite {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
