"""The ``lorite`` command: the parser assembled from :mod:`lorite.commands` (one module per subcommand),
and ``main``.

Every failure is one line on stderr, never a traceback, and nothing half-written is left. Exit codes:

* 0 — done;
* 2 — bad usage or input (an argparse usage error, a :class:`~lorite.errors.LoriteError`);
* 1 — a failure at run time: a damaged artefact (a :class:`~lorite.errors.DamagedArtifact`, e.g. a
  checkpoint whose files do not match its manifest), out of memory, a run that diverged (its metrics are
  written first), any other ``RuntimeError`` while training (``LORITE_TRACEBACK=1`` re-raises it, with its traceback);
* 130 — interrupted (Ctrl-C).
"""

from __future__ import annotations

import os
import sys

import torch

from . import __version__
from .commands import COMMANDS
from .commands._options import Parser
from .errors import DamagedArtifact, LoriteError

# torch >= 2.5 names it at the top level; before, only under torch.cuda (both are RuntimeErrors)
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def build_parser() -> Parser:
    parser = Parser(prog="lorite", description="Efficient LLM training around LoRA-RITE.")
    parser.add_argument("--version", action="version", version=f"lorite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (torch's messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (one line, code 2), --help and --version (code 0)
        return int(exit_.code or 0)
    prefix = f"lorite {args.command}: error:"
    try:
        args.func(args)
    except (
        DamagedArtifact
    ) as error:  # a saved artefact (a checkpoint) that cannot be used: a run-time failure
        print(f"{prefix} {one_line(error)}", file=sys.stderr)
        return 1
    except LoriteError as error:
        print(f"{prefix} {one_line(error)}", file=sys.stderr)
        return 2
    except OutOfMemoryError as error:
        print(
            f"{prefix} out of memory ({one_line(error)}); try a smaller --batch-size (a larger --grad-accum "
            "keeps the batch) or, when fine-tuning, --gradient-checkpointing",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as error:  # a run that failed (diverged, a CUDA or NCCL error, …)
        if os.environ.get("LORITE_TRACEBACK") == "1":
            raise
        print(f"{prefix} {one_line(error)}", file=sys.stderr)
        return 1
    except (
        OSError
    ) as error:  # the disk is full, a file vanished, no permission: the previous checkpoint stays
        if os.environ.get("LORITE_TRACEBACK") == "1":
            raise
        where = f" ({error.filename})" if error.filename else ""
        print(
            f"{prefix} {error.strerror or one_line(error)}{where}; what was saved before is intact",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"lorite {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
