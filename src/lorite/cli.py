"""The ``lorite`` command: the parser assembled from :mod:`lorite.commands` (one module per subcommand),
and ``main``.

Bad input is one line on stderr and exit code 2, never a traceback, and nothing half-written is left.
"""

from __future__ import annotations

import sys

from .commands import COMMANDS
from .commands._options import Parser
from .errors import LoriteError


def build_parser() -> Parser:
    parser = Parser(prog="lorite", description="Efficient LLM training around LoRA-RITE.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (one line, code 2) and --help (code 0)
        return int(exit_.code or 0)
    try:
        args.func(args)
    except LoriteError as error:
        print(f"lorite {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorite {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
