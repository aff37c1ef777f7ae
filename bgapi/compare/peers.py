"""Runners that ``bgapi compare`` measures beside bgapi's own strategies.

- ``fixed-delay``: the loop of fastapi-utils' ``repeat_every`` (run the job,
  then sleep the interval, as a task on the server's loop), one loop per
  target. It calls the same :meth:`Poller.check` as bgapi's runners, so only
  the scheduling differs.
- ``bare-asyncio``: fixed-rate ``asyncio.sleep`` loops on the server's loop
  that only record their lateness: the floor of the asyncio strategy.
- ``bare-thread``: one thread that waits for the next slot with
  ``threading.Event.wait`` and only records its lateness: the floor of the
  thread strategy.
- ``baseline``: a runner that polls nothing, for the server without a poller.

Each peer records every run with :meth:`Poller.record_run`, as bgapi's
runners do, so ``/api/poller`` and the benchmark read them the same way.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
from collections.abc import Callable

from bgapi.poller import LoopResources, Poller, Target
from bgapi.runners.asyncio_task import AsyncioRunner
from bgapi.runners.base import Runner, RunState
from bgapi.schedule import latest_slot, start_offsets

__all__ = [
    "PEER_MODES",
    "BareAsyncioRunner",
    "BareThreadRunner",
    "FixedDelayRunner",
    "NoScheduleRunner",
    "peer_factory",
]

logger = logging.getLogger(__name__)


class FixedDelayRunner(AsyncioRunner):
    """Poll each target, then sleep its interval, on the server's loop (``repeat_every``).

    A run's lateness is measured from when this loop meant to start it (the
    end of the previous poll plus the interval), so it shows only the loop's
    own delay. Its ``scheduled_at`` is the fixed-rate slot of the run
    (first start + runs × interval): ``started_at - scheduled_at`` is the
    drift that the fixed delay has accumulated.
    """

    mode = "fixed-delay"

    async def _serve(self) -> None:
        resources = LoopResources(self.poller.config)
        targets = self.poller.enabled_targets
        try:
            # repeat_every starts every decorated function at startup, unspread.
            await asyncio.gather(*(self._repeat(target, resources) for target in targets))
        finally:
            await resources.aclose()

    async def _repeat(self, target: Target, resources: LoopResources) -> None:
        interval = target.interval_s
        wall_offset = time.time() - time.monotonic()
        first = time.monotonic()
        intended = first
        runs = 0
        while True:
            now = time.monotonic()
            lateness_ms = (now - intended) * 1000
            self.poller.record_run(target.name, lateness_ms, 0)
            fixed_rate_slot = first + runs * interval
            try:
                await self.poller.check(
                    target,
                    resources,
                    scheduled_at=fixed_rate_slot + wall_offset,
                    lateness_ms=lateness_ms,
                )
            except Exception:
                logger.exception("fixed-delay poll of target %s failed", target.name)
            runs += 1
            intended = time.monotonic() + interval
            await asyncio.sleep(interval)


class BareAsyncioRunner(AsyncioRunner):
    """Wake at each target's fixed-rate slot with ``asyncio.sleep`` and do nothing else."""

    mode = "bare-asyncio"

    async def _serve(self) -> None:
        targets = self.poller.enabled_targets
        start = time.monotonic()
        offsets = start_offsets(targets)
        await asyncio.gather(
            *(self._tick(target, start + offset) for target, offset in zip(targets, offsets, strict=True))
        )

    async def _tick(self, target: Target, t0: float) -> None:
        interval = target.interval_s
        slot = 0
        while True:
            delay = t0 + slot * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            latest = max(slot, latest_slot(t0, interval, now))
            self.poller.record_run(target.name, (now - (t0 + latest * interval)) * 1000, latest - slot)
            slot = latest + 1


class BareThreadRunner(Runner):
    """Wake at each target's fixed-rate slot in one thread with ``Event.wait`` and do nothing else."""

    mode = "bare-thread"

    def __init__(self, poller: Poller) -> None:
        super().__init__(poller)
        self._stop_requested = threading.Event()
        self._thread: threading.Thread | None = None

    async def _start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="bgapi-bare-thread", daemon=False)
        self._thread.start()
        self.state = RunState.RUNNING

    def _main(self) -> None:
        try:
            self._tick()
        except BaseException as error:  # noqa: BLE001 - a dying thread must say why
            self.report_crash(error)

    def _tick(self) -> None:
        targets = self.poller.enabled_targets
        if not targets:
            self._stop_requested.wait()
            return
        start = time.monotonic()
        # (due, index, slot) per target; the heap's head is the next slot due.
        heap = [
            (start + offset, index, 0)
            for index, offset in enumerate(start_offsets(targets))
        ]
        heapq.heapify(heap)
        while not self._stop_requested.is_set():
            due, index, slot = heap[0]
            delay = due - time.monotonic()
            if delay > 0 and self._stop_requested.wait(delay):
                return
            now = time.monotonic()
            target = targets[index]
            interval = target.interval_s
            t0 = due - slot * interval
            latest = max(slot, latest_slot(t0, interval, now))
            self.poller.record_run(target.name, (now - (t0 + latest * interval)) * 1000, latest - slot)
            heapq.heapreplace(heap, (t0 + (latest + 1) * interval, index, latest + 1))

    async def _stop(self, timeout: float) -> None:
        self._stop_requested.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                self.error = f"the bare thread did not stop within {timeout:g} s"


class NoScheduleRunner(Runner):
    """Start and stop like a runner, and poll nothing: the baseline of ``bgapi compare``.

    A server built with ``poll=False`` is a standby that reads the store on
    every API request, so it would not be the same server. This runner keeps
    the request path of a polling server and only removes the polls.
    """

    mode = "baseline"

    async def _start(self) -> None:
        self.state = RunState.RUNNING

    async def _stop(self, timeout: float) -> None:
        return


_PEERS: dict[str, Callable[[Poller], Runner]] = {
    FixedDelayRunner.mode: FixedDelayRunner,
    BareAsyncioRunner.mode: BareAsyncioRunner,
    BareThreadRunner.mode: BareThreadRunner,
}
PEER_MODES: tuple[str, ...] = tuple(_PEERS)


def peer_factory(mode: str) -> Callable[[Poller], Runner] | None:
    """Return the runner class of peer ``mode``, or None when ``mode`` is not a peer."""
    return _PEERS.get(mode)
