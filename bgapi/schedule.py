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


def start_offsets(targets: Sequence[Target]) -> list[float]:
    """Return each target's first-run offset in seconds, spreading targets evenly.

    Polling every target at the same instant makes a burst of requests and
    connections at each slot boundary; spreading them keeps the load flat.
    """
    count = len(targets)
    return [
        index / count * min(target.interval_s, MAX_SPREAD_S) for index, target in enumerate(targets)
    ]


async def run_schedule(poller: Poller, resources: LoopResources) -> None:
    """Poll every enabled target at its fixed rate until cancelled.

    Raises:
        asyncio.CancelledError: when the runner stops it; the polls in flight
            are cancelled and awaited first.
    """
    targets = poller.enabled_targets
    if not targets:
        logger.info("no enabled targets or jobs; the poller has nothing to do")
        await asyncio.Event().wait()
    start = time.monotonic()
    tasks = [
        asyncio.create_task(
            _run_target(poller, target, resources, start + offset), name=f"bgapi-target-{target.name}"
        )
        for target, offset in zip(targets, start_offsets(targets), strict=True)
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _run_target(
    poller: Poller, target: Target, resources: LoopResources, t0: float
) -> None:
    interval = target.interval_s
    # Wall-clock time of a monotonic instant, for the timestamps users read.
    wall_offset = time.time() - time.monotonic()
    slot = 0
    while True:
        due = t0 + slot * interval
        poller.set_next_run(target.name, due + wall_offset)
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        # Waiting here for a free slot counts as lateness: the poll starts late.
        async with resources.poll_slots:
            now = time.monotonic()
            # A stalled loop may wake up several slots late: run the latest one.
            caught_up = max(slot, latest_slot(t0, interval, now))
            missed = caught_up - slot
            slot = caught_up
            due = t0 + slot * interval
            lateness_ms = (now - due) * 1000
            poller.record_run(target.name, lateness_ms, missed)
            try:
                await poller.check(
                    target, resources, scheduled_at=due + wall_offset, lateness_ms=lateness_ms
                )
            except Exception:
                # check() handles failed polls itself; this is a bug or a store
                # failure, and the schedule must go on regardless.
                logger.exception("scheduled poll of target %s failed", target.name)
        slot, skipped = next_slot(t0, interval, slot, time.monotonic())
        if skipped:
            poller.record_missed(target.name, skipped)
