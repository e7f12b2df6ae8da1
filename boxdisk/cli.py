"""The ``boxdisk`` command line.

Each subcommand imports only what it needs, so ``boxdisk --version`` starts fast.
Errors print one line (``boxdisk: error: …``) and exit non-zero; ``--debug``
shows the traceback; ``-v`` logs boxdisk's info events to stderr, ``-vv``
its debug events too (warnings always go there).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]


def _configure_logging(verbosity: int) -> Callable[[], None]:
    """boxdisk's events to stderr: warnings and errors, ``-v`` info too, ``-vv`` debug too.

    Only the ``boxdisk`` logger is configured (the root logger and structlog are
    left alone), never towards stdout, where commands print their results.
    Returns the function that puts the logger back as it was, so that
    :func:`main` called in a process leaves no logging set-up behind.
    """
    import logging  # noqa: PLC0415 - not needed by --version or --help

    class StderrHandler(logging.Handler):
        """Writes to whatever ``sys.stderr`` is when the event comes, as logging.lastResort."""

        def emit(self, record: logging.LogRecord) -> None:
            try:
                sys.stderr.write(self.format(record) + "\n")
            except Exception:  # reported (or not) as logging reports its own errors
                self.handleError(record)

    levels = (logging.WARNING, logging.INFO, logging.DEBUG)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s %(message)s",
                                           datefmt="%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("boxdisk")
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(levels[min(verbosity, len(levels) - 1)])
    logger.propagate = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]

    return restore


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo  # noqa: PLC0415

    return run_demo(keep=args.keep)


def _parser() -> argparse.ArgumentParser:
    from . import __version__  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="boxdisk", description="QEMU-exact qcow2 disks and backing chains for sandbox boxes."
    )
    parser.add_argument("--version", action="version", version=f"boxdisk {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log boxdisk's events to stderr (-v info, -vv debug)")
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
    restore_logging = _configure_logging(args.verbose)
    try:
        return _run(parser, args)
    finally:
        restore_logging()


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
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
