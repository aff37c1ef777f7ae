"""Asyncio strategy: the poller is a task on the server's own event loop.

No thread and no second loop: the cheapest way to run, but every poll, its
JSON parsing and any blocking call share the loop with the API requests.
"""

from __future__ import annotations

import asyncio
import contextlib

from bgapi.poller import LoopResources
from bgapi.runners.base import Runner, RunState
from bgapi.schedule import run_schedule

__all__ = ["AsyncioRunner"]


class AsyncioRunner(Runner):
    """Run the schedule as an ``asyncio`` task whose handle is kept and awaited."""

    mode = "asyncio"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # Keeping the handle matters: the loop holds only a weak reference to a
        # task, and a crash is reported through its done callback.
        self._task: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name="bgapi-poller")
        self._task.add_done_callback(self._on_done)
        self.state = RunState.RUNNING

    async def _serve(self) -> None:
        resources = LoopResources(self.poller.config)
        try:
            await run_schedule(self.poller, resources)
        finally:
            await resources.aclose()

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.report_crash(error)

    async def _stop(self, timeout: float) -> None:
        task = self._task
        if task is None or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                self.error = f"the poller task did not stop within {timeout:g} s"
