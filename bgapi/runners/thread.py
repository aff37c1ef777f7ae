"""Thread strategy: the poller runs on its own event loop in a dedicated thread.

The server's event loop only serves requests. Polls, their HTTP client and
their actions live on the thread's loop, so a slow or blocking poll never
stalls the API. The GIL is still shared, so CPU-heavy work slows both.
"""

from __future__ import annotations

import asyncio
import threading

from bgapi.poller import LoopResources
from bgapi.runners.base import Runner, RunState
from bgapi.schedule import run_schedule

__all__ = ["ThreadRunner"]


class ThreadRunner(Runner):
    """Run the schedule in a non-daemon thread, stopped through an event and joined."""

    mode = "thread"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._stop_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = threading.Event()

    async def _start(self) -> None:
        # Not a daemon: the process must wait for the thread to close its client.
        self._thread = threading.Thread(target=self._main, name="bgapi-poller", daemon=False)
        self._thread.start()
        # The loop exists before start() returns, so stop() can always reach it.
        await asyncio.to_thread(self._ready.wait, 5.0)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # noqa: BLE001 - a dying thread must say why
            self.report_crash(error)
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        resources = LoopResources(self.poller.config)
        self.state = RunState.RUNNING
        self._ready.set()
        try:
            if not self._stop_requested.is_set():
                await run_schedule(self.poller, resources)
        except asyncio.CancelledError:
            if not self._stop_requested.is_set():
                raise
        finally:
            await resources.aclose()

    async def _stop(self, timeout: float) -> None:
        self._stop_requested.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # the loop closed between the check and the call
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                self.error = f"the poller thread did not stop within {timeout:g} s"
