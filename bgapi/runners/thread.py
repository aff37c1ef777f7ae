"""Thread strategy: the poller runs on its own event loop in a dedicated thread.

The server's event loop only serves requests. Polls, their HTTP client and
their actions live on the thread's loop, so a slow or blocking poll never
stalls the API. The GIL is still shared, so CPU-heavy work slows both.

The thread's loop waits with :class:`PreciseEpollSelector`, so that a poll
starts as close to its slot as a thread waiting on ``threading.Event``.
"""

from __future__ import annotations

import asyncio
import math
import selectors
import threading
import time

from bgapi.poller import LoopResources
from bgapi.runners.base import Runner, RunState
from bgapi.schedule import run_schedule

__all__ = ["PreciseEpollSelector", "ThreadRunner", "new_loop"]


class PreciseEpollSelector(selectors.EpollSelector):
    """An epoll selector whose timeouts end on time instead of up to 2 ms late.

    epoll waits whole milliseconds, and ``selectors.EpollSelector`` rounds a
    timeout up twice (``math.ceil(t * 1e3) * 1e-3``, then again in
    ``epoll.poll``): 9 ms becomes 10. An event loop's timers therefore fire
    1 to 2 ms late. This selector waits one millisecond less than the timeout
    with epoll, then sleeps the rest. The sleep delays I/O that arrives in
    that last millisecond or two, a fair price on the poller's own loop but
    not on a server's.
    """

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout <= 0:
            return super().select(timeout)
        deadline = time.monotonic() + timeout
        # Even rounded up twice, this wait ends before the deadline.
        coarse_ms = math.floor(timeout * 1000) - 1
        if coarse_ms > 0:
            ready = super().select(coarse_ms / 1000)
            if ready:
                return ready
        remaining = deadline - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        return super().select(0)


def new_loop() -> asyncio.AbstractEventLoop:
    """Return an event loop for a poller that owns its thread: it waits with PreciseEpollSelector."""
    if hasattr(selectors, "EpollSelector"):
        return asyncio.SelectorEventLoop(PreciseEpollSelector())
    return asyncio.new_event_loop()


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
            with asyncio.Runner(loop_factory=new_loop) as runner:
                runner.run(self._serve())
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
