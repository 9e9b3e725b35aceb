"""The ``hipoa`` command: one subcommand per workflow stage.

Each handler parses its arguments, sets up logging and calls one library function with keyword
arguments, so ``snakemake -p`` prints commands that can be rerun by hand.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from hipoa import __version__

log = logging.getLogger("hipoa")


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with timestamps (rules redirect stderr to their log file)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


Handler = Callable[[argparse.Namespace], int]
_SUBCOMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Handler]] = []


def subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``handler`` as ``hipoa NAME``."""

    def wrap(handler: Handler) -> Handler:
        _SUBCOMMANDS.append((name, help, add_arguments, handler))
        return handler

    return wrap


# ---- synth -----------------------------------------------------------------------------------
# ---- end synth -------------------------------------------------------------------------------

# ---- ingest ----------------------------------------------------------------------------------
# ---- end ingest ------------------------------------------------------------------------------

# ---- crop-patches / show-patches -------------------------------------------------------------
# ---- end crop-patches ------------------------------------------------------------------------

# ---- split-data / train-unet / evaluate ------------------------------------------------------
# ---- end train -------------------------------------------------------------------------------

# ---- predict-masks / phenotypes --------------------------------------------------------------
# ---- end predict -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hipoa", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hipoa {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, handler in _SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
