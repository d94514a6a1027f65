"""`robustops demo|train|attack|evaluate|certify|predict|plot|perturbation|generate|bench|robustify`: the command line, the only
part of robustops that parses arguments, sets up torchrun process groups, or reads and writes run files.

One module per subcommand, each with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
``common`` holds what they share. A subcommand reports a user error by raising ``CLIError``:
:func:`main` prints it on one line and returns 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from . import attack, bench, certify, demo, evaluate, generate, perturbation, plot, predict, robustify, train
from .common import CLIError, Parser, os_error_line

__all__ = ["main", "build_parser", "CLIError", "COMMANDS"]

COMMANDS = {"demo": demo, "train": train, "attack": attack, "evaluate": evaluate, "certify": certify, "predict": predict, "plot": plot,
            "bench": bench, "perturbation": perturbation, "generate": generate, "robustify": robustify}


def build_parser(command: Optional[str] = "*") -> argparse.ArgumentParser:
    """The parser of ``robustops``: every subcommand's arguments (command "*"), only those of one
    command, or none (None: ``robustops --help``, which then needs no torch)."""
    parser = Parser(prog="robustops", description="Fast robust machine learning in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if command == "*" or command == name:
            module.add_arguments(p)
    return parser


def _command(argv) -> Optional[str]:
    """The subcommand named in argv (the first word that is one), if any."""
    for a in argv:
        if a in COMMANDS:
            return a
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command(argv)).parse_args(argv)
    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except CLIError as e:
        print(f"robustops {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a file that vanished or cannot be written: one line, no traceback
        print(f"robustops {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
