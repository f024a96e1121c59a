"""The ``polynet`` command: one thin subcommand per workflow, each in its own module here.

Every subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit status. Errors a user
can fix are reported as one line (``polynet: error: ...``); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand modules, in the order ``polynet --help`` lists them.
SUBCOMMANDS = (
    "polynet.cli.info",
    "polynet.cli.train",
    "polynet.cli.bench",
    "polynet.cli.grow",
    "polynet.cli.convert",
    "polynet.cli.predict",
    "polynet.cli.export",
    "polynet.cli.eval",
    "polynet.cli.ablate",
)


class UserError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="polynet",
        description="PolyNet: PolyInception networks, training, evaluation and studies.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


# What a user can fix: bad values, missing or unreadable files, full disks, interrupted runs.
_USER_ERRORS = (UserError, ValueError, FileNotFoundError, PermissionError, OSError, KeyError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``polynet`` command line; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("polynet: interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as err:
        if args.debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, KeyError):
            message = f"missing key {message}"
        print(f"polynet: error: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
