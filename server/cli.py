# The `sectionchat` command: parse, configure logging, run. Nothing else.

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from . import config as config_module
from .app import StartupError, make_storage, serve_until_signalled
from .auth import mint_token
from .storage.base import StorageError
from .storage.file import FileStorage
from .transfer import TransferError, export_document, import_lines


class _UTCFormatter(logging.Formatter):
    _second: tuple[int, str] = (-1, "")  # the last second formatted: strftime once a second, not once a line

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second[0]:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return f"{self._second[1]}.{int(record.msecs):03d}Z"


class _JSONFormatter(_UTCFormatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text") -> None:
    # Every connection logs two lines, thousands a second in a reconnect storm: no
    # record looks up its caller's file and line, thread or process, none of which
    # the formats show (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JSONFormatter())
    else:
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
    config = commands.add_parser("config", help="print the resolved configuration (secrets masked)")
    config_module.add_serve_arguments(config)
    token = commands.add_parser("token", help="mint a token for token mode (development and tests)")
    token.add_argument("--sub", required=True, help="the user")
    token.add_argument("--docs", nargs="+", metavar="DOCUMENT_ID", help="documents granted ('*': all); default: all")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)")
    token.add_argument("--role", action="append", default=[], metavar="ROLE", help="a role to grant (moderator)")
    token.add_argument("--secret", help=f"the server's secret (default: ${config_module.ENV_PREFIX}AUTH_SECRET)")
    export = commands.add_parser("export", help="write a document's sessions and messages as JSON lines")
    export.add_argument("--document", required=True, metavar="DOCUMENT_ID")
    export.add_argument("--output", "-o", metavar="FILE", help="default: standard output")
    importer = commands.add_parser(
        "import", help="read an export back into storage (the server must be stopped for files)"
    )
    importer.add_argument("file", metavar="FILE", help="an export file ('-': standard input)")
    for command in (export, importer):
        command.add_argument("--config", dest="config_file", metavar="FILE")
        command.add_argument("--data-dir", dest="data_dir")
        command.add_argument("--storage", dest="storage")
    commands.add_parser("script", help="run a scripted-socket scenario (sectionchat script --help)", add_help=False)
    return parser


async def transfer(args: argparse.Namespace, config: config_module.Config) -> int:
    if args.command == "export":
        storage = make_storage(config) if config.storage != "file" else FileStorage(config.data_dir, read_only=True)
    else:
        storage = make_storage(config)
    await storage.open()
    try:
        if args.command == "export":
            with open(args.output, "wb") if args.output else os.fdopen(os.dup(sys.stdout.fileno()), "wb") as out:
                count = await export_document(storage, args.document, out)
            print(f"exported {count} records of document {args.document!r}", file=sys.stderr)
        else:
            with open(args.file, "rb") if args.file != "-" else os.fdopen(os.dup(sys.stdin.fileno()), "rb") as lines:
                imported, skipped = await import_lines(storage, lines)
            print(f"imported {imported} records; skipped {skipped} already present", file=sys.stderr)
    finally:
        await storage.close()
    return 0


def run(main: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Run the server on uvloop when it is wanted and installed, else on asyncio's own loop."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise StartupError("--event-loop uvloop: uvloop is not installed") from None
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["script"]:
        # The scripted-socket harness has its own command line (client/script.py).
        from client.script import main as script_main

        return script_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "config":
        print(config_module.describe(config_module.load(args)))
    elif args.command == "serve":
        config = config_module.load(args)
        configure_logging(config.log_level, config.log_format)
        try:
            run(serve_until_signalled(config), config.event_loop)
        except StartupError as error:
            print(f"sectionchat: {error}", file=sys.stderr)
            return 1
        # Stopped cleanly: everything is stored and closed, the threads joined. The
        # interpreter's teardown of a heap that held thousands of connections would take
        # most of a second more (0.7 s after 5,000) and do nothing that matters, unless
        # a profiler or tracer (cProfile, coverage) is waiting to write what it saw.
        if sys.getprofile() is None and sys.gettrace() is None:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    elif args.command in ("export", "import"):
        config = config_module.load(args)
        configure_logging("warning")
        try:
            return asyncio.run(transfer(args, config))
        except (StartupError, StorageError, TransferError, OSError) as error:
            print(f"sectionchat: {error}", file=sys.stderr)
            return 1
    elif args.command == "token":
        secret = args.secret or os.environ.get(config_module.ENV_PREFIX + "AUTH_SECRET")
        if not secret:
            print(f"sectionchat: give --secret or set {config_module.ENV_PREFIX}AUTH_SECRET", file=sys.stderr)
            return 1
        print(mint_token(secret, args.sub, args.docs, args.ttl, args.role))
    return 0


if __name__ == "__main__":
    sys.exit(main())
