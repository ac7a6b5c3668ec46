"""``kiln``: generate images and videos, list and install models.

Each subcommand lives in its own module; this one parses arguments and maps Kiln's errors to
exit codes (2: the request was wrong, 3: a model is not installed, 1: anything else).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kiln import __version__
from kiln.errors import KilnError, UnavailableError, UserError


def build_parser() -> argparse.ArgumentParser:
    from kiln.cli import generate, keys, models, serve, worker

    parser = argparse.ArgumentParser(prog="kiln", description="Self-hosted inference server for generative media.")
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    parser.add_argument(
        "--catalog",
        metavar="FILE",
        default=os.environ.get("KILN_CATALOG"),
        help="model catalog TOML (default: KILN_CATALOG, else the one shipped with Kiln)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parser(sub)
    worker.add_parser(sub)
    generate.add_parser(sub)
    models.add_parsers(sub)
    keys.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except UnavailableError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 3
    except KilnError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
