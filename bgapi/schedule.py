"""Fixed-rate scheduling on a monotonic clock.

Run ``k`` of a target is due at ``t0 + k * interval``. The period never grows
by the poll's duration, so no drift accumulates. A poll never overlaps
itself: a slot that comes while the previous poll still runs is skipped and
counted as missed, and after a stall the poller resumes at the latest slot
instead of replaying the ones it missed in a burst.

The slot arithmetic is pure (:func:`latest_slot`, :func:`next_slot`);
:func:`run_schedule` is the async loop that the thread and asyncio runners
both run, each on its own event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Sequence

from bgapi.poller import LoopResources, Poller, Target

__all__ = ["latest_slot", "next_slot", "run_schedule", "start_offsets"]

logger = logging.getLogger(__name__)

# Targets' first runs are spread over their interval, but over at most this
# many seconds, so that a long interval does not delay the first results.
MAX_SPREAD_S = 10.0
# When targets start in groups, at most this many share a start time.
MAX_GROUP_SIZE = 10


def latest_slot(t0: float, interval: float, now: float) -> int:
    """Return the index of the latest slot due at or before ``now`` (0 before ``t0``)."""
    if now <= t0:
        return 0
    return math.floor((now - t0) / interval)


def next_slot(t0: float, interval: float, done: int, now: float) -> tuple[int, int]:
    """Return the slot to run after slot ``done`` finished at ``now``, and how many were skipped.

    The next slot is ``done + 1`` unless it is already due, in which case the
    poll ran past it: every slot up to ``now`` is skipped.
    """
    following = done + 1
    if t0 + following * interval > now:
        return following, 0
    upcoming = latest_slot(t0, interval, now) + 1
    return upcoming, upcoming - following


def start_offsets(targets: Sequence[Target], group_step_s: float = 0.0) -> list[float]:
    """Return each target's first-run offset in seconds, spreading targets evenly.

    Polling every target at the same instant makes a burst of requests and
    connections at each slot boundary; spreading them keeps the load flat.

    With ``group_step_s``, targets start in fewer groups: as many as the
    shortest interval (or :data:`MAX_SPREAD_S`) has steps of that length, or
    more where a group would otherwise get more than :data:`MAX_GROUP_SIZE`
    targets. The targets of a group that share an interval start together,
    so 50 targets at 1 s start in 10 groups 0.1 s apart. Each
    wake-up of an idle process costs CPU of its own (about 0.2 ms on a
    2-core virtual machine, see ``benchmarks/wakeups.py``), so a poller that
    wakes once for five polls uses much less CPU than one that wakes five
    times. The later polls of a group start a little late, by the time the
    loop takes to start the ones before them.
    """
    count = len(targets)
    if count == 0:
        return []
    spans = [min(target.interval_s, MAX_SPREAD_S) for target in targets]
    groups = count
    if group_step_s > 0:
        # The epsilon keeps 0.3 / 0.1 = 2.9999999999999996 at 3 steps.
        groups_by_step = max(1, math.floor(min(spans) / group_step_s + 1e-9))
        groups = min(count, max(groups_by_step, math.ceil(count / MAX_GROUP_SIZE)))
    return [(index * groups // count) / groups * span for index, span in enumerate(spans)]


async def run_schedule(poller: Poller, resources: LoopResources, group_step_s: float = 0.0) -> None:
    """Poll every enabled target at its fixed rate until cancelled.

    ``group_step_s`` makes targets start in groups: see :func:`start_offsets`.

    Raises:
        asyncio.CancelledError: when the runner stops it; the polls in flight
            are cancelled and awaited first.
        Exception: a bug outside a poll (in the statistics, say), so that the
            runner reports the crash instead of one target silently stopping.
    """
    targets = poller.enabled_targets
    if not targets:
        logger.info("no enabled targets or jobs; the poller has nothing to do")
        await asyncio.Event().wait()
    await _Scheduler(poller, resources, targets, group_step_s).run()


class _Scheduler:
    """One task that starts every target's polls from a heap of due slots.

    A task runs per poll in flight, not per target. 10,000 idle targets are
    then 10,000 tuples in a heap instead of 10,000 suspended coroutines, so
    garbage collections have less to scan and shutdown has fewer tasks to cancel.
    """

    def __init__(
        self,
        poller: Poller,
        resources: LoopResources,
        targets: Sequence[Target],
        group_step_s: float,
    ) -> None:
        self._poller = poller
        self._resources = resources
        self._targets = list(targets)
        start = time.monotonic()
        self._t0 = [start + offset for offset in start_offsets(self._targets, group_step_s)]
        # Wall-clock time of a monotonic instant, for the timestamps users read.
        self._wall_offset = time.time() - time.monotonic()
        # (due, target index, slot) of every target whose poll is not running.
        self._due: list[tuple[float, int, int]] = []
        self._running: set[asyncio.Task[None]] = set()
        self._waiter: asyncio.Future[None] | None = None
        self._waiting_until = math.inf
        self._crash: BaseException | None = None
        self._stopping = False
        for index, t0 in enumerate(self._t0):
            self._push(index, 0, t0)

    async def run(self) -> None:
        try:
            while True:
                if self._crash is not None:
                    raise self._crash
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    _, index, slot = heapq.heappop(self._due)
                    name = f"bgapi-poll-{self._targets[index].name}"
                    task = asyncio.create_task(self._poll(index, slot), name=name)
                    self._running.add(task)
                    task.add_done_callback(self._finished)
                await self._sleep_until(self._due[0][0] if self._due else math.inf)
        finally:
            self._stopping = True
            for task in self._running:
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)

    def _push(self, index: int, slot: int, due: float) -> None:
        heapq.heappush(self._due, (due, index, slot))
        self._poller.set_next_run(self._targets[index].name, due + self._wall_offset)
        if due < self._waiting_until:
            self._wake()

    async def _sleep_until(self, when: float) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._waiting_until = when
        timer = None
        if when < math.inf:
            timer = loop.call_later(when - time.monotonic(), self._wake)
        try:
            await self._waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None
            self._waiting_until = math.inf

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if task.cancelled():
            if not self._stopping:
                # Its target would never be scheduled again, so report a crash.
                self._crash = RuntimeError(f"poll task {task.get_name()} was cancelled outside shutdown")
                self._wake()
        elif task.exception() is not None:
            self._crash = task.exception()
            self._wake()

    async def _poll(self, index: int, slot: int) -> None:
        target = self._targets[index]
        t0, interval = self._t0[index], target.interval_s
        # Waiting here for a free slot counts as lateness: the poll starts late.
        async with self._resources.poll_slots:
            now = time.monotonic()
            # A stalled loop may wake up several slots late: run the latest one.
            caught_up = max(slot, latest_slot(t0, interval, now))
            due = t0 + caught_up * interval
            lateness_ms = (now - due) * 1000
            self._poller.record_run(target.name, lateness_ms, caught_up - slot)
            try:
                await self._poller.check(
                    target,
                    self._resources,
                    scheduled_at=due + self._wall_offset,
                    lateness_ms=lateness_ms,
                )
            except Exception:
                # check() handles failed polls itself; this is a bug or a store
                # failure, and the schedule must go on regardless.
                logger.exception("scheduled poll of target %s failed", target.name)
        following, skipped = next_slot(t0, interval, caught_up, time.monotonic())
        if skipped:
            self._poller.record_missed(target.name, skipped)
        self._push(index, following, t0 + following * interval)
