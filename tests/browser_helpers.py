"""Playwright helpers for the browser tests: Debian's Chromium, pages that record their console."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Dialog, Page, WebSocketRoute, expect

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 420, "height": 860}


@dataclass
class Tab:
    """One user's page, with everything it complained about."""

    context: BrowserContext
    page: Page
    console_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    @property
    def status(self):
        return self.page.locator("#status")

    @property
    def composer(self):
        return self.page.get_by_label("Message", exact=True)

    def messages(self, text: str | None = None):
        found = self.page.locator("#messages li.message")
        return found.filter(has=self.page.locator(".message-text", has_text=text)) if text is not None else found

    async def wait_connected(self, timeout: float = 10_000) -> None:
        await expect(self.status).to_have_attribute("data-state", "connected", timeout=timeout)

    async def send(self, text: str) -> None:
        """Type a message the way a user does and press Enter."""
        await self.composer.fill(text)
        await self.composer.press("Enter")


def page_url(port: int, **params: str) -> str:
    return f"http://127.0.0.1:{port}/" + ("?" + urlencode(params) if params else "")


async def open_tab(browser: Browser, port: int, *, viewport: dict | None = None, **params: str) -> Tab:
    """A fresh browser context (its own storage, like another person) on the chat page."""
    return await open_page(browser, page_url(port, **params), viewport)


async def open_page(browser: Browser, url: str, viewport: dict | None = None) -> Tab:
    """A fresh browser context on any page, recording its console errors and dismissing its dialogs."""
    context = await browser.new_context(viewport=viewport or WIDE)
    page = await context.new_page()
    tab = Tab(context, page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            tab.console_errors.append(message.text)

    async def on_dialog(dialog: Dialog) -> None:
        tab.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    page.on("console", on_console)
    page.on("pageerror", lambda error: tab.console_errors.append(f"uncaught: {error}"))
    page.on("dialog", on_dialog)
    await page.goto(url)
    return tab


class Proxy:
    """Playwright between the page and the server: counts what the page sends, can cut and hold the socket."""

    def __init__(self) -> None:
        self.hold = asyncio.Event()  # set: new connection attempts are refused
        self.routes: list[tuple[WebSocketRoute, WebSocketRoute]] = []
        self.sent: list[dict] = []  # every JSON frame the page sent to the server
        self.swallow_after: str | None = None  # a request type: from the first one on, that socket's replies are lost
        self.swallowed: WebSocketRoute | None = None

    async def route(self, ws: WebSocketRoute) -> None:
        if self.hold.is_set():
            await ws.close(code=1013, reason="try again later")
            return
        server = ws.connect_to_server()

        def to_server(message: str | bytes) -> None:
            if isinstance(message, str):
                frame = json.loads(message)
                self.sent.append(frame)
                if frame.get("type") == self.swallow_after and self.swallowed is None:
                    self.swallowed = ws  # from here on this connection's answers are lost
            server.send(message)

        def to_page(message: str | bytes) -> None:
            if ws is not self.swallowed:
                ws.send(message)

        ws.on_message(to_server)
        server.on_message(to_page)
        self.routes.append((ws, server))

    async def cut(self) -> None:
        ws, server = self.routes[-1]
        await ws.close(code=1011, reason="cut by the test")
        await server.close()

    def requests(self, type: str) -> list[dict]:
        return [frame for frame in self.sent if frame.get("type") == type]
