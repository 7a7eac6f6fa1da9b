"""Entry point of the ``norton`` command: wires the subcommands and the one error path.

Each command lives in its own module ``norton.cli.<name>`` exposing
``register(subparsers)``, which adds its parser and sets ``func`` to a function
``(args) -> int``. User mistakes surface as ``UserError``/``ValueError``/
``FileNotFoundError`` and are printed as one line on stderr with exit code 2;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from norton.errors import UserError

# Order is the order of ``norton --help``.
COMMANDS = ("demo", "train", "decompose", "prune", "compress", "evaluate", "complexity", "info", "export", "benchmark",
            "detect")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``norton`` parser; with ``command``, only that command's module is imported and registered.

    Command modules import their library code (and torch) when they are imported, which
    takes seconds: ``norton info --input-size 0`` should refuse in a fraction of that.
    ``norton --help`` registers every command.
    """
    parser = argparse.ArgumentParser(
        prog="norton",
        description="Compress CNNs with filter-wise CP decomposition and structured pruning (NORTON).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS if command is None else (command,):
        importlib.import_module(f"norton.cli.{name}").register(subparsers)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first word that is not an option), if it is one of ours."""
    words = [word for word in argv if not word.startswith("-")]
    return words[0] if words and words[0] in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("norton: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"norton {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
