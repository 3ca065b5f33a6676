# The `sectionchat` command: parse, configure logging, run. Nothing else.

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence

from . import config as config_module
from .app import StartupError, serve_until_signalled


class _UTCFormatter(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d}Z"


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UTCFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every failed handshake (port scanners, health probes) at
    # INFO; ours says what matters.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sectionchat", description="Real-time chat for document sections.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the server")
    config_module.add_serve_arguments(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        config = config_module.load(args)
        configure_logging(config.log_level)
        try:
            asyncio.run(serve_until_signalled(config))
        except StartupError as error:
            print(f"sectionchat: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
