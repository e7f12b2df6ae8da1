"""The ``boxdisk`` command line.

Each subcommand imports only what it needs, so ``boxdisk --version`` starts fast.
Errors print one line (``boxdisk: error: …``) and exit non-zero; ``--debug``
shows the traceback; ``-v`` turns on structlog's console output.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _configure_logging(verbose: bool) -> None:
    """Warnings (or, with -v, everything) to stderr; set up only when something logs."""

    def configure() -> None:
        import logging  # noqa: PLC0415 - only when something logs

        import structlog  # noqa: PLC0415 - only the CLI configures logging

        level = logging.DEBUG if verbose else logging.WARNING
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        )

    from ._log import when_structlog_loads  # noqa: PLC0415

    when_structlog_loads(configure)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo  # noqa: PLC0415

    return run_demo(keep=args.keep)


def _parser() -> argparse.ArgumentParser:
    from . import __version__  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="boxdisk", description="QEMU-exact qcow2 disks and backing chains for sandbox boxes."
    )
    parser.add_argument("--version", action="version", version=f"boxdisk {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log events to stderr")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the whole workflow in a temporary directory")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory")
    demo.set_defaults(func=_cmd_demo)
    from ._cli._image import add_image_commands  # noqa: PLC0415

    add_image_commands(sub)
    from ._cli._store import add_store_commands  # noqa: PLC0415

    add_store_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ._errors import BoxdiskError  # noqa: PLC0415

    try:
        return int(args.func(args))
    except BoxdiskError as exc:
        if args.debug:
            raise
        print(f"boxdisk: error: {exc}", file=sys.stderr)
        return int(getattr(args, "error_exit", 1))
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as other tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:  # a file the user named (not an image) could not be used
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"boxdisk: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return int(getattr(args, "error_exit", 1))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
