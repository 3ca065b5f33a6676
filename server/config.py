# The server's configuration: one Config with safe defaults, and the command
# line, environment and TOML file that fill it. Precedence: command line >
# environment (SECTIONCHAT_<OPTION>) > file (--config) > default.

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping

ENV_PREFIX = "SECTIONCHAT_"
DEFAULT_API_PORT = 8766


@dataclasses.dataclass(frozen=True)
class Config:
    # Network
    host: str = "127.0.0.1"
    port: int = 8765
    # Connections the kernel queues before they are accepted (it caps this at
    # net.core.somaxconn): asyncio's default of 100 drops SYNs when thousands
    # of clients reconnect at once after a restart, each costing them a 1 s retransmit.
    listen_backlog: int = 2048
    # Storage
    data_dir: str = "./data"
    storage: str = "file"
    # Access
    auth_secret: str | None = dataclasses.field(default=None, repr=False)
    allowed_origins: tuple[str, ...] = ()
    # Limits
    rate_limit: float = 20.0
    max_frame_bytes: int = 65536
    max_text_chars: int = 8000
    max_subscriptions: int = 100
    sessions_per_minute: int = 300
    max_connections_per_user: int = 100
    max_outgoing_bytes: int = 1024 * 1024
    recovery_window: int = 1000
    # Timeouts
    open_timeout_s: float = 10.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    shutdown_grace_s: float = 10.0
    section_idle_s: float = 60.0
    presence_ttl_s: float = 15.0
    health_check_interval_s: float = 1.0
    # Logging
    log_level: str = "info"
    log_format: str = "text"
    # Runtime
    event_loop: str = "auto"
    # The HTTP API (on when there is a key)
    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    api_host: str = "127.0.0.1"
    api_port: int | None = None  # None: DEFAULT_API_PORT
    # Webhooks
    webhooks: tuple[str, ...] = ()
    webhook_secret: str | None = dataclasses.field(default=None, repr=False)

    @property
    def api_listen_port(self) -> int:
        return DEFAULT_API_PORT if self.api_port is None else self.api_port


# option name -> (type, help); the option's flag is --name-with-dashes.
_OPTIONS: dict[str, tuple[type, str]] = {
    "host": (str, "address to listen on"),
    "port": (int, "port to listen on; 0 picks a free one"),
    "listen_backlog": (
        int,
        "connections waiting to be accepted (capped by net.core.somaxconn); sized for reconnect storms",
    ),
    "data_dir": (str, "directory for file storage"),
    "storage": (str, "'file' or redis://HOST:PORT/DB"),
    "auth_secret": (str, "HS256 secret: turns on token mode"),
    "rate_limit": (
        float,
        "requests per second per connection; 0 turns off every rate limit (this and --sessions-per-minute)",
    ),
    "max_frame_bytes": (int, "largest frame accepted; larger ones close the connection with 1009"),
    "max_text_chars": (int, "longest message text accepted"),
    "max_subscriptions": (int, "sections one connection may subscribe to"),
    "sessions_per_minute": (int, "sessions one user may create per minute; 0: no limit"),
    "max_connections_per_user": (int, "open connections per user; 0: no limit"),
    "max_outgoing_bytes": (int, "unsent bytes a connection may queue before it is closed as a slow consumer (4008)"),
    "recovery_window": (int, "how many events a section keeps for recovery"),
    "open_timeout_s": (float, "how long a client has to complete the opening handshake"),
    "ping_interval_s": (float, "how often the server pings each connection"),
    "ping_timeout_s": (float, "how long a ping may go unanswered before the connection is dropped"),
    "shutdown_grace_s": (float, "how long shutdown waits for requests in flight"),
    "section_idle_s": (float, "how long an unused section stays in memory"),
    "presence_ttl_s": (float, "with Redis: how soon the users of a node that died without a word leave"),
    "health_check_interval_s": (float, "how often storage is checked for /healthz (which reports the last check)"),
    "log_level": (str, "debug, info, warning or error"),
    "log_format": (str, "text or json (one JSON object per line)"),
    "event_loop": (str, "auto (uvloop when installed), uvloop or asyncio"),
    "api_host": (str, "address the HTTP API listens on"),
    "webhook_secret": (str, "the Standard Webhooks secret (whsec_...) that signs every webhook"),
    "api_port": (int, f"port of the HTTP API (default {DEFAULT_API_PORT}; 0 picks a free one); needs --api-key"),
}
SECRETS = frozenset({"auth_secret", "api_keys", "webhook_secret"})


def _env_value(name: str, kind: type, environ: Mapping[str, str]) -> object:
    raw = environ[ENV_PREFIX + name.upper()]
    try:
        return kind(raw)
    except ValueError:
        raise SystemExit(f"sectionchat: {ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}") from None


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", dest="config_file", metavar="FILE", help="a TOML file of options (same names as the flags)"
    )
    for name, (kind, text) in _OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text)
    parser.add_argument(
        "--allowed-origin",
        dest="allowed_origins",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="an Origin allowed to open WebSockets (repeatable); any other gets HTTP 403",
    )
    parser.add_argument(
        "--webhook",
        dest="webhooks",
        action="append",
        default=None,
        metavar="URL",
        help="POST every stored event here, signed (repeatable; SECTIONCHAT_WEBHOOKS: comma-separated); needs --webhook-secret",
    )
    parser.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        default=None,
        metavar="KEY",
        help="a key of the HTTP API (repeatable; SECTIONCHAT_API_KEYS takes a comma-separated list): turns the API on",
    )


def _file_values(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except OSError as error:
        raise SystemExit(f"sectionchat: cannot read {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise SystemExit(f"sectionchat: {path} is not valid TOML: {error}") from None
    values: dict[str, object] = {}
    for raw_name, value in table.items():
        name = raw_name.replace("-", "_")
        if (
            name in ("allowed_origins", "api_keys", "webhooks")
            and isinstance(value, list)
            and all(isinstance(v, str) for v in value)
        ):
            values[name] = tuple(value)
            continue
        if name not in _OPTIONS:
            raise SystemExit(f"sectionchat: {path}: unknown option {raw_name!r}")
        kind = _OPTIONS[name][0]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SystemExit(f"sectionchat: {path}: {raw_name} must be a {kind.__name__}, not {value!r}")
        values[name] = value
    return values


def load(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Config:
    """Resolve the configuration: command line > environment > file > default."""
    file = getattr(args, "config_file", None) or environ.get(ENV_PREFIX + "CONFIG")
    values: dict[str, object] = _file_values(file) if file else {}
    for name, (kind, _) in _OPTIONS.items():
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
        elif ENV_PREFIX + name.upper() in environ:
            values[name] = _env_value(name, kind, environ)
    if getattr(args, "allowed_origins", None):
        values["allowed_origins"] = tuple(args.allowed_origins)
    else:
        for name in ("ALLOWED_ORIGINS", "ALLOWED_ORIGIN"):  # space- or comma-separated
            if ENV_PREFIX + name in environ:
                values["allowed_origins"] = tuple(environ[ENV_PREFIX + name].replace(",", " ").split())
    if getattr(args, "webhooks", None):
        values["webhooks"] = tuple(args.webhooks)
    elif ENV_PREFIX + "WEBHOOKS" in environ:
        values["webhooks"] = tuple(url.strip() for url in environ[ENV_PREFIX + "WEBHOOKS"].split(",") if url.strip())
    if getattr(args, "api_keys", None):
        values["api_keys"] = tuple(args.api_keys)
    elif ENV_PREFIX + "API_KEYS" in environ:
        values["api_keys"] = tuple(key.strip() for key in environ[ENV_PREFIX + "API_KEYS"].split(",") if key.strip())
    if values.get("rate_limit") == 0 and "sessions_per_minute" not in values:
        # "0 turns the limit off, for benchmarks and trusted harnesses": all of it.
        values["sessions_per_minute"] = 0
    config = Config(**values)  # type: ignore[arg-type]
    validate(config)
    return config


def describe(config: Config) -> str:
    """The resolved configuration as TOML, secrets masked."""
    lines = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in SECRETS and value:
            value = "********"
        if value is None:
            lines.append(f"# {field.name} is not set")
        else:
            # JSON strings, numbers and arrays of strings are valid TOML too.
            lines.append(
                f"{field.name} = {json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)}"
            )
    return "\n".join(lines)


def validate(config: Config) -> None:
    if not 0 <= config.port <= 65535:
        raise SystemExit(f"sectionchat: --port {config.port} is not a port number")
    if config.webhooks and not config.webhook_secret:
        raise SystemExit("sectionchat: --webhook needs --webhook-secret (whsec_ and a base64 key)")
    if config.webhook_secret is not None and not _valid_webhook_secret(config.webhook_secret):
        raise SystemExit("sectionchat: --webhook-secret must be whsec_ followed by a base64 key")
    for url in config.webhooks:
        if not url.startswith(("http://", "https://")):
            raise SystemExit(f"sectionchat: --webhook {url!r} is not an http:// or https:// URL")
    if config.api_port is not None and not config.api_keys:
        raise SystemExit("sectionchat: --api-port needs an API key (--api-key or SECTIONCHAT_API_KEYS)")
    if not 0 <= config.api_listen_port <= 65535:
        raise SystemExit(f"sectionchat: --api-port {config.api_port} is not a port number")
    if config.rate_limit < 0:
        raise SystemExit("sectionchat: --rate-limit must be 0 (off) or positive")
    if not config.health_check_interval_s > 0:
        raise SystemExit("sectionchat: --health-check-interval-s must be positive")
    if config.event_loop not in ("auto", "uvloop", "asyncio"):
        raise SystemExit(f"sectionchat: --event-loop {config.event_loop!r} is not one of auto, uvloop, asyncio")
    if config.log_format not in ("text", "json"):
        raise SystemExit(f"sectionchat: --log-format {config.log_format!r} is not one of text, json")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise SystemExit(f"sectionchat: --log-level {config.log_level!r} is not one of debug, info, warning, error")
    for name in (
        "max_frame_bytes", "max_text_chars", "max_subscriptions", "max_outgoing_bytes", "recovery_window", "listen_backlog",
    ):  # fmt: skip
        if getattr(config, name) < 1:
            raise SystemExit(f"sectionchat: --{name.replace('_', '-')} must be at least 1")


def _valid_webhook_secret(secret: str) -> bool:
    from standardwebhooks.webhooks import Webhook

    try:
        Webhook(secret)
    except Exception:  # the library's own check: bad base64, or empty
        return False
    return secret.startswith("whsec_")
