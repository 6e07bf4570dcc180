"""The `asteroid` command line, one module per subcommand: compile, show, simulate, profile, check,
launch and worker, and report. ``-v`` shows the project's progress messages at INFO, ``-vv`` at DEBUG,
``-q`` only errors."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn, Sequence

from asteroid_fx.cli import check, export, launch, profile, report, show, simulate
from asteroid_fx.cli import compile as compile_command
from asteroid_fx.cli.models import load_model, parse_input_spec
from asteroid_fx.ir.errors import AsteroidError

__all__ = ["build_parser", "load_model", "main", "parse_input_spec"]


class OneLineParser(argparse.ArgumentParser):
    """A parser whose refusal is one line, naming the argument: the usage it would print first pushes
    the error out of a short terminal or log excerpt; ``--help`` still shows it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="asteroid", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log messages (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    parser.add_argument("--debug", action="store_true",
                        help="after an error's one-line message, its traceback too (for a bug report)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (compile_command, show, simulate, profile, check, launch, export, report):
        command.register(sub)
    return parser


def configure_logging(verbose: int = 0, quiet: bool = False) -> None:
    """The project's logger ("asteroid_fx") to stderr: WARNING by default, INFO with -v, DEBUG with
    -vv, ERROR with -q. Libraries embedding asteroid_fx configure logging themselves instead."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    log = logging.getLogger("asteroid_fx")
    log.setLevel(level)
    if not any(getattr(h, "_asteroid_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._asteroid_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except (AsteroidError, ValueError) as e:
        print(f"asteroid {args.command}: error: {e}", file=sys.stderr)
        if args.debug:
            raise
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what the command started is stopped on the way out, no traceback
        print(f"asteroid {args.command}: interrupted", file=sys.stderr)
        if args.debug:
            raise
        return 130


if __name__ == "__main__":
    sys.exit(main())
