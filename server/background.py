# Tasks that run beside the requests that started them (a write whose client
# went away, a state being kept), so that shutdown can wait for them.

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        # Whoever awaits the work reports its outcome; if they went away, nobody
        # will, so retrieve it here to keep asyncio from warning about it.
        if not task.cancelled():
            task.exception()

    async def drain(self) -> None:
        """Wait until no task is left (tasks may start others meanwhile)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))
