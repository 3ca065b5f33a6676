# The server's lifecycle: start -> serve -> shut down, in that fixed order.
#
# Shutdown stops accepting connections, lets requests in flight finish (their
# writes reach the disk and their replies go out) within a grace period, then
# closes every WebSocket with 1001 and closes storage.
#
# Health: storage is checked on an interval (--health-check-interval-s), never
# per request, and /healthz reports the outcome of the last check: answering it
# costs no I/O, however often load balancers and strangers ask.

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager

from aiohttp import web
from websockets.asyncio.server import Server, serve

from .api import Api
from .chat import Chat
from .cluster import RedisCluster
from .config import Config
from .http import HttpRoutes, load_static
from .metrics import Metrics
from .storage.base import Storage, StorageError
from .storage.file import FileStorage
from .storage.redis import RedisStorage
from .transport import IdentifiedConnection, Transport
from .webhooks import Webhooks

logger = logging.getLogger("sectionchat")

SWEEP_INTERVAL_S = 5.0
# A storage check that takes longer than this counts as failed (a stalled Redis, a hung disk).
HEALTH_CHECK_TIMEOUT_S = 5.0
STORAGE_THREADS = 32


class StartupError(Exception):
    """The server cannot start; the message says why in one line."""


def make_storage(config: Config, metrics: Metrics | None = None) -> Storage:
    if config.storage == "file":
        return FileStorage(config.data_dir, metrics)
    if config.storage.startswith(("redis://", "rediss://", "unix://")):
        return RedisStorage(config.storage, metrics)
    raise StartupError(f"--storage must be 'file' or redis://HOST:PORT/DB, not {config.storage!r}")


class App:
    """One running sectionchat server."""

    def __init__(self, config: Config):
        self.config = config
        self.state = "starting"
        self.metrics = Metrics()
        self.storage: Storage | None = None
        self.chat: Chat | None = None
        self.transport: Transport | None = None
        self.server: Server | None = None
        self.cluster: RedisCluster | None = None
        self._stack = AsyncExitStack()  # how to stop what start started, in reverse
        self._sweeper: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None
        self._storage_problem: str | None = None  # what the last storage check found wrong; None: ok
        self._storage_checked = 0.0  # time.monotonic() of the last check
        self.api_port: int | None = None  # where the HTTP API listens, once it does

    @property
    def port(self) -> int:
        assert self.server is not None, "server is not started"
        return self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}/ws"

    async def health(self) -> tuple[int, dict[str, object]]:
        """The health document: the last storage check's outcome, no I/O of its own."""
        if self.state != "serving" or self.storage is None:
            return 503, {"status": self.state}
        problem = self._storage_problem
        since = time.monotonic() - self._storage_checked
        if problem is None and since > self.config.health_check_interval_s + HEALTH_CHECK_TIMEOUT_S + 1.0:
            # The checks stopped coming: an "ok" that old says nothing.
            problem = f"storage has not been checked for {since:.0f} s"
        if problem is not None:
            return 503, {"status": "unhealthy", "storage": problem}
        return 200, {
            "status": "serving",
            "storage": "ok",
            "connections": len(self.server.connections) if self.server else 0,
        }

    async def _check_storage(self) -> None:
        """Check storage once; the outcome is what /healthz reports until the next check."""
        assert self.storage is not None
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancel that stops this task.
            async with asyncio.timeout(HEALTH_CHECK_TIMEOUT_S):
                await self.storage.check()
        except StorageError as error:
            problem: str | None = str(error) or type(error).__name__
        except TimeoutError:
            problem = f"storage did not answer a check within {HEALTH_CHECK_TIMEOUT_S:g} s"
        except Exception as error:
            # A bug in a check must not stop the checking, nor pass for health.
            logger.exception("storage check crashed")
            problem = f"storage check crashed: {type(error).__name__}"
        else:
            problem = None
        if problem != self._storage_problem:
            if problem is None:
                logger.info("storage check passes again: /healthz answers 200")
            else:
                logger.warning("storage check failed: %s; /healthz answers 503", problem)
        self._storage_problem = problem
        self._storage_checked = time.monotonic()

    async def _check_storage_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_interval_s)
            await self._check_storage()

    async def start(self) -> None:
        # Durable writes run in the default executor (aiofiles): one thread per
        # section writing at once lets their fsyncs overlap.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(STORAGE_THREADS, "sectionchat-storage"))
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()  # what did start stops, in reverse
            raise

    async def _start(self) -> None:
        """Start each part, registering how it stops: `stop` (or a failure here) unwinds them in reverse."""
        stack = self._stack
        storage = make_storage(self.config, self.metrics)
        try:
            await storage.open()
        except StorageError as error:
            raise StartupError(str(error)) from None
        stack.push_async_callback(storage.close)
        self.storage = storage
        self.chat = Chat(
            storage,
            max_text_chars=self.config.max_text_chars,
            max_subscriptions=self.config.max_subscriptions,
            sessions_per_minute=self.config.sessions_per_minute,
            recovery_window=self.config.recovery_window,
            section_idle_s=self.config.section_idle_s,
            metrics=self.metrics,
        )
        if isinstance(storage, RedisStorage):
            cluster = RedisCluster(storage.client, self.chat, presence_ttl_s=self.config.presence_ttl_s)
            try:
                await cluster.start()
            except StorageError as error:
                raise StartupError(str(error)) from None
            stack.push_async_callback(cluster.stop)
            self.cluster = self.chat.cluster = cluster
        stack.push_async_callback(self.chat.close)  # after the last write: the sections' states are kept
        self.transport = Transport(self.chat, self.config, HttpRoutes(self.health, self.metrics, load_static()))
        try:
            self.server = await serve(
                self.transport.handle,
                self.config.host,
                self.config.port,
                process_request=self.transport.process_request,
                create_connection=IdentifiedConnection,
                select_subprotocol=self.transport.select_subprotocol,
                server_header=None,
                compression=None,
                max_size=self.config.max_frame_bytes,
                open_timeout=self.config.open_timeout_s,
                ping_interval=self.config.ping_interval_s,
                ping_timeout=self.config.ping_timeout_s,
                logger=logging.getLogger("websockets.server"),
                backlog=self.config.listen_backlog,
            )
        except OSError as error:
            reason = os.strerror(error.errno).lower() if error.errno else str(error)
            raise StartupError(f"cannot listen on {self.config.host}:{self.config.port}: {reason}") from None
        stack.push_async_callback(self._close_connections, self.server, self.transport, self.chat)
        if self.config.webhooks:
            assert self.config.webhook_secret is not None  # the config says so
            webhooks = Webhooks(self.chat, self.config.webhooks, self.config.webhook_secret, self.metrics)
            await webhooks.start()
            stack.push_async_callback(webhooks.stop)
        if self.config.api_keys:
            await self._start_api(self.chat)
        self._sweeper = asyncio.create_task(self._sweep())
        stack.push_async_callback(_cancelled, self._sweeper)
        await self._check_storage()
        self._checker = asyncio.create_task(self._check_storage_periodically())
        stack.push_async_callback(_cancelled, self._checker)  # before storage closes under a check in flight
        self.state = "serving"
        host = self.server.sockets[0].getsockname()[0]
        logger.info(
            "listening on %s:%d (http://%s:%d/, ws://%s:%d/ws)", host, self.port, host, self.port, host, self.port
        )
        if self.api_port is not None:
            logger.info("api listening on %s:%d", self.config.api_host, self.api_port)

    async def _start_api(self, chat: Chat) -> None:
        """The HTTP API on its own port; it stops before the connections close (no write after the last)."""
        runner = web.AppRunner(
            Api(chat, self.config.api_keys).application(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, self.config.api_host, self.config.api_listen_port)
        try:
            await site.start()
        except OSError as error:
            reason = os.strerror(error.errno).lower() if error.errno else str(error)
            where = f"{self.config.api_host}:{self.config.api_listen_port}"
            raise StartupError(f"cannot listen for the HTTP API on {where}: {reason}") from None
        self.api_port = runner.addresses[0][1]  # logged after the main "listening on" line, which tools wait for

    async def _sweep(self) -> None:
        assert self.chat is not None
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            evicted = await self.chat.evict_idle()
            if evicted:
                logger.debug("%d idle sections left memory", evicted)

    async def stop(self) -> None:
        if self.state in ("draining", "stopped"):
            return
        self.state = "draining"
        # Closing thousands of connections allocates in bursts, and each burst set off a full
        # collection over every connection's objects: 5,000 took 3.5 s to close instead of 2.
        # Cycles can wait until the server has stopped (the process then exits).
        collecting = gc.isenabled()
        gc.disable()
        logger.info("shutting down")
        try:
            await self._stack.aclose()
        finally:
            if collecting:
                gc.enable()
        self.state = "stopped"
        logger.info("stopped")

    async def _close_connections(self, server: Server, transport: Transport, chat: Chat) -> None:
        """Stop accepting, let requests in flight finish (up to the grace period), close every WebSocket with 1001."""
        server.server.close()  # open connections stay for now
        transport.draining = True
        try:
            await asyncio.wait_for(transport.wait_idle(), self.config.shutdown_grace_s)
        except TimeoutError:
            logger.warning("requests still in flight after %.1f s; closing anyway", self.config.shutdown_grace_s)
        server.close()
        await server.wait_closed()
        await chat.drain()


async def _cancelled(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait for it, boundedly: shutdown never hangs on one."""
    task.cancel()
    await asyncio.wait([task], timeout=HEALTH_CHECK_TIMEOUT_S)


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[App]:
    """Start a server for the duration of a block (tests use port 0)."""
    app = App(config)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def serve_until_signalled(config: Config) -> None:
    """Run until SIGINT or SIGTERM; a second signal stops at once."""
    app = App(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            raise SystemExit(1)
        stop.set()

    # Handlers first: a signal that arrives while starting still stops cleanly.
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    await app.start()
    # What starting built (modules, routes, the storage's index) lives as long as the
    # process: frozen out of the collector's way, every full collection traverses only
    # what connections and sections made since.
    gc.collect()
    gc.freeze()
    try:
        await stop.wait()
    finally:
        await app.stop()
