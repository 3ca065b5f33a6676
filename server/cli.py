# The `sectionchat` command: parse, configure logging, run. Nothing else.

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence

from . import config as config_module
from .app import StartupError, serve_until_signalled
from .auth import mint_token


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
    token = commands.add_parser("token", help="mint a token for token mode (development and tests)")
    token.add_argument("--sub", required=True, help="the user")
    token.add_argument("--docs", nargs="+", metavar="DOCUMENT_ID", help="documents granted ('*': all); default: all")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)")
    token.add_argument("--secret", help=f"the server's secret (default: ${config_module.ENV_PREFIX}AUTH_SECRET)")
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
    elif args.command == "token":
        secret = args.secret or os.environ.get(config_module.ENV_PREFIX + "AUTH_SECRET")
        if not secret:
            print(f"sectionchat: give --secret or set {config_module.ENV_PREFIX}AUTH_SECRET", file=sys.stderr)
            return 1
        print(mint_token(secret, args.sub, args.docs, args.ttl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
