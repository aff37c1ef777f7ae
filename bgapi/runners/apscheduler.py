"""APScheduler strategy: APScheduler 3's ``AsyncIOScheduler`` on the server's event loop.

Each enabled target or job is one APScheduler job with an ``IntervalTrigger``,
configured so that bgapi's scheduling rules hold:

- ``max_instances=1``: a target never overlaps itself. A run that comes due
  while the previous one still runs is skipped and counted as missed
  (APScheduler reports it as ``EVENT_JOB_MAX_INSTANCES``).
- ``coalesce=True``: after a stall only the latest due run starts, with no
  burst of catch-up runs. The runs it replaces are counted as missed.
- ``misfire_grace_time=None``: a late run still starts however late it is.
  APScheduler's default grace of one second would drop it silently.
- start dates spread over the interval as in the other modes, and each run's
  lateness (start minus the scheduled run time) goes to ``/api/poller``.

The scheduler is created and started inside the lifespan, on the running
loop, never at import. APScheduler schedules on the wall clock
(``datetime.now``), so a step of the system clock shifts the runs that follow.
The thread and asyncio modes use the monotonic clock instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apscheduler.events import (
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    EVENT_JOB_SUBMITTED,
    JobExecutionEvent,
    JobSubmissionEvent,
    SchedulerEvent,
)
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from bgapi.poller import LoopResources, Target
from bgapi.runners.base import Runner, RunState
from bgapi.schedule import start_offsets

__all__ = ["APSchedulerRunner"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Slots:
    """One APScheduler job's fixed-rate grid and the runs counted on it so far."""

    target: Target
    first_run_at: float  # Unix time of slot 0
    interval_s: float
    # The latest slot that was either run or counted as missed.
    last_slot: int = -1
    # Set when APScheduler submits a run, read when the run starts.
    pending: tuple[float, int] | None = None

    def slot_of(self, run_time: datetime) -> int:
        return round((run_time.timestamp() - self.first_run_at) / self.interval_s)


class APSchedulerRunner(Runner):
    """Run every target as an APScheduler 3 interval job on the server's event loop."""

    mode = "apscheduler"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._scheduler: AsyncIOScheduler | None = None
        self._resources: LoopResources | None = None
        self._slots: dict[str, _Slots] = {}
        self._running: set[asyncio.Task[Any]] = set()
        self._stopping = False

    async def _start(self) -> None:
        self._resources = LoopResources(self.poller.config)
        scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop(), timezone=UTC)
        scheduler.add_listener(
            self._on_event, EVENT_JOB_SUBMITTED | EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED
        )
        targets = self.poller.enabled_targets
        now = time.time()
        for target, offset in zip(targets, start_offsets(targets), strict=True):
            first_run_at = now + offset
            self._slots[target.name] = _Slots(target, first_run_at, target.interval_s)
            start_date = datetime.fromtimestamp(first_run_at, UTC)
            trigger = IntervalTrigger(seconds=target.interval_s, start_date=start_date, timezone=UTC)
            scheduler.add_job(
                self._run,
                trigger,
                args=(target.name,),
                id=target.name,
                name=f"bgapi poll of {target.name}",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
                # Without it APScheduler computes the first run when the
                # scheduler starts; slot 0 of the first target is past by
                # then and would be skipped.
                next_run_time=start_date,
            )
            self.poller.set_next_run(target.name, first_run_at)
        if not targets:
            logger.info("no enabled targets or jobs; the poller has nothing to do")
        scheduler.start()
        self._scheduler = scheduler
        self.state = RunState.RUNNING

    def _on_event(self, event: SchedulerEvent) -> None:
        """Count skipped slots and hand each submitted run its scheduled time.

        APScheduler calls this on the event loop, right after it submits a run
        and before that run's task starts.
        """
        slots = self._slots.get(getattr(event, "job_id", ""))
        if slots is None:
            return
        if isinstance(event, JobSubmissionEvent):
            run_time = event.scheduled_run_times[-1]
            slot = slots.slot_of(run_time)
            if event.code == EVENT_JOB_SUBMITTED:
                # Coalesced runs between the last counted slot and this one were skipped.
                missed = max(0, slot - slots.last_slot - 1)
                slots.pending = (run_time.timestamp(), missed)
            else:
                # EVENT_JOB_MAX_INSTANCES: the previous run still goes; this slot is skipped too.
                missed = max(0, slot - slots.last_slot)
                if missed:
                    self.poller.record_missed(slots.target.name, missed)
            slots.last_slot = max(slots.last_slot, slot)
        elif isinstance(event, JobExecutionEvent) and event.code == EVENT_JOB_MISSED:
            # Not expected with misfire_grace_time=None; counted should it happen.
            slot = slots.slot_of(event.scheduled_run_time)
            missed = max(0, slot - slots.last_slot)
            if missed:
                self.poller.record_missed(slots.target.name, missed)
            slots.last_slot = max(slots.last_slot, slot)

    async def _run(self, name: str) -> None:
        """Poll one target for one APScheduler run."""
        if self._stopping:
            return
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        slots = self._slots[name]
        assert self._resources is not None
        try:
            # Bounded like the other modes: at most max_concurrency polls at once.
            async with self._resources.poll_slots:
                scheduled_at, missed = slots.pending or (time.time(), 0)
                slots.pending = None
                lateness_ms = (time.time() - scheduled_at) * 1000
                self.poller.set_next_run(name, scheduled_at + slots.interval_s)
                self.poller.record_run(name, lateness_ms, missed)
                await self.poller.check(
                    slots.target,
                    self._resources,
                    scheduled_at=scheduled_at,
                    lateness_ms=lateness_ms,
                )
        except asyncio.CancelledError:
            # Only _stop() cancels a run. APScheduler 3 catches BaseException
            # around the job and would log this cancellation as a failure with
            # a traceback, so the run ends quietly here instead.
            return
        except Exception:
            # check() handles failed polls itself; this is a bug or a store
            # failure, and the schedule must go on regardless.
            logger.exception("scheduled poll of target %s failed", name)
        finally:
            self._running.discard(task)

    async def _stop(self, timeout: float) -> None:
        self._stopping = True
        scheduler = self._scheduler
        if scheduler is not None and scheduler.running:
            scheduler.pause()  # no new runs are submitted from here on
        # Runs submitted just before the pause start, see _stopping and return.
        await asyncio.sleep(0)
        running = set(self._running)
        for task in running:
            task.cancel()
        if running:
            _, pending = await asyncio.wait(running, timeout=timeout)
            if pending:
                self.error = f"{len(pending)} APScheduler run(s) did not stop within {timeout:g} s"
        if scheduler is not None and scheduler.running:
            scheduler.shutdown(wait=False)
            # AsyncIOScheduler.shutdown() schedules the real work with call_soon_threadsafe.
            await asyncio.sleep(0)
        self._scheduler = None
        if self._resources is not None:
            await self._resources.aclose()
            self._resources = None
