"""The poller core that every strategy shares.

:class:`Poller` turns one poll of one target into everything that follows:
the up/down state, the stored result, the run statistics and the actions.
Runners decide only *where* this code runs: a thread of its own, a task on
the server's event loop, or APScheduler. What it does is written once, here.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import Coroutine, Iterable
from typing import Any, TypeAlias

from bgapi.actions import run_action, should_fire
from bgapi.conditions import Condition, default_conditions, parse_conditions
from bgapi.config import ActionConfig, Config, TargetConfig
from bgapi.errors import StoreError
from bgapi.jobs import Job
from bgapi.poll import ErrorKind, HttpClients, PollResult, poll_http
from bgapi.state import LatenessStats, State, TargetStatus, Transition
from bgapi.store import Store

__all__ = ["LoopResources", "Poller", "Target"]

logger = logging.getLogger(__name__)

# At shutdown, actions still running (a webhook being retried) get this long.
ACTION_GRACE_S = 0.5
# Actions running at once per event loop. Beyond this (a webhook receiver that
# is down while results keep firing `always` actions) new actions are dropped,
# so memory stays bounded.
MAX_RUNNING_ACTIONS = 1000

Target: TypeAlias = TargetConfig | Job
"""Anything the poller schedules: an HTTP target from the config or a custom job."""


class LoopResources:
    """The per-loop resources of polls: HTTP clients, action tasks, poll slots.

    The HTTP clients and the action tasks belong to one event loop: the
    runner that owns the loop creates this object on it and closes it there.
    """

    def __init__(self, config: Config) -> None:
        self.clients = HttpClients(config.poller)
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped_actions = 0
        # Scheduled polls running at once. Without a bound, thousands of polls
        # queue inside httpx's connection pool, whose cost per waiting request
        # grows with the queue and can stall the loop, shutdown included.
        self.poll_slots = asyncio.Semaphore(config.poller.max_concurrency)

    def spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coroutine`` as a task that :meth:`aclose` waits for or cancels.

        Drops it, with a warning for the first and every 100th drop, while
        :data:`MAX_RUNNING_ACTIONS` tasks are already running.
        """
        if len(self._tasks) >= MAX_RUNNING_ACTIONS:
            coroutine.close()
            self.dropped_actions += 1
            if self.dropped_actions % 100 == 1:
                logger.warning(
                    "dropped action %s: %d actions are still running; %d dropped so far",
                    name,
                    len(self._tasks),
                    self.dropped_actions,
                )
            return
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Give running actions a short grace, cancel the rest, close the clients."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=ACTION_GRACE_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=ACTION_GRACE_S)
                logger.warning("cancelled %d action(s) still running at shutdown", len(pending))
        await self.clients.aclose()


class Poller:
    """Poll targets, keep their state, store results and fire actions.

    Safe to use from several threads and event loops at once: state lives
    behind a lock, and the API shows a result only after it is committed.
    """

    def __init__(
        self,
        config: Config,
        store: Store | None = None,
        mode: str | None = None,
        jobs: Iterable[Job] = (),
    ) -> None:
        self.config = config
        self.store = store
        self.mode = mode or config.poller.mode
        self.stats = LatenessStats()
        self.store_error: str | None = None
        self._conditions: dict[str, list[Condition]] = {
            target.name: parse_conditions(target.conditions) or default_conditions()
            for target in config.targets
        }
        self._lock = threading.Lock()
        # _working is what the next result builds on; _published is what the
        # API shows, and it changes only after the store has committed.
        self._working = {target.name: TargetStatus(target.name) for target in config.targets}
        self._published = {name: copy.copy(status) for name, status in self._working.items()}
        self._sequence = {target.name: 0 for target in config.targets}
        self._published_sequence = dict(self._sequence)
        # The newest result id that restore() has read from the store.
        self._restored_result_id = 0
        self._jobs: dict[str, Job] = {}
        for job in jobs:
            self.add_job(job)

    def add_job(self, job: Job) -> None:
        """Register a custom job beside the HTTP targets, before the runner starts.

        Raises:
            ValueError: a target or another job already has the job's name.
        """
        with self._lock:
            if job.name in self._working:
                raise ValueError(
                    f"cannot add job {job.name!r}: a target or job with this name exists; "
                    "give the job another name with job(..., name=...)"
                )
            self._jobs[job.name] = job
            self._working[job.name] = TargetStatus(job.name)
            self._published[job.name] = TargetStatus(job.name)
            self._sequence[job.name] = 0
            self._published_sequence[job.name] = 0

    @property
    def targets(self) -> list[Target]:
        """The HTTP targets of the config, then the custom jobs, enabled or not."""
        return [*self.config.targets, *self._jobs.values()]

    @property
    def enabled_targets(self) -> list[Target]:
        """The targets and jobs that runners schedule."""
        return [target for target in self.targets if target.enabled]

    def target(self, name: str) -> Target | None:
        """Return the target or job called ``name``, or None."""
        return self._jobs.get(name) or self.config.target(name)

    def restore(self, changed_only: bool = False) -> None:
        """Load each target's last state and result from the store, if there is one.

        A process that does not poll calls this again to show what the
        polling process has stored since. With ``changed_only``, only the
        targets with a result newer than the previous call's are read.
        """
        if self.store is None:
            return
        saved_states = self.store.states(self._restored_result_id if changed_only else 0)
        with self._lock:
            for name, saved in saved_states.items():
                if name not in self._working:
                    continue
                self._restored_result_id = max(self._restored_result_id, saved["last_result_id"] or 0)
                status = self._working[name]
                status.state = State(saved["state"])
                status.consecutive_successes = saved["consecutive_successes"]
                status.consecutive_failures = saved["consecutive_failures"]
                status.last_success_at = saved["last_success_at"]
                status.last_change_at = saved["last_change_at"]
                if saved["last_result"] is not None:
                    status.last_result = saved["last_result"]
                self._published[name] = copy.copy(status)

    def status(self, name: str) -> TargetStatus | None:
        """Return a copy of the target's published status, or None for an unknown name."""
        with self._lock:
            status = self._published.get(name)
            return copy.copy(status) if status is not None else None

    def statuses(self) -> list[TargetStatus]:
        """Return a copy of every target's published status: config order, then the jobs."""
        with self._lock:
            return [copy.copy(self._published[target.name]) for target in self.targets]

    def set_next_run(self, name: str, next_run_at: float) -> None:
        """Record when the target's next scheduled poll starts (Unix time)."""
        with self._lock:
            self._working[name].next_run_at = next_run_at
            self._published[name].next_run_at = next_run_at

    def record_run(self, name: str, lateness_ms: float, missed: int) -> None:
        """Count a scheduled run of ``name`` and the slots skipped before it."""
        self.stats.record_run(lateness_ms)
        if missed:
            self.stats.record_missed(missed)
        with self._lock:
            for status in (self._working[name], self._published[name]):
                status.runs += 1
                status.missed += missed

    def record_missed(self, name: str, missed: int) -> None:
        """Count slots of ``name`` that passed while its previous poll still ran."""
        self.stats.record_missed(missed)
        with self._lock:
            self._working[name].missed += missed
            self._published[name].missed += missed

    async def check(
        self,
        target: Target,
        resources: LoopResources,
        *,
        scheduled_at: float | None = None,
        lateness_ms: float | None = None,
    ) -> PollResult:
        """Poll ``target`` once, then update its state, store the result and fire actions.

        Never raises for a failed poll or an action; an unexpected error inside
        the poll is logged with its traceback and recorded as an ``internal``
        failure.
        """
        result = await self._poll(target, resources, scheduled_at)
        result.lateness_ms = lateness_ms
        self._redact(result)
        blocking_ms = self.config.poller.blocking_ms
        if blocking_ms:
            time.sleep(blocking_ms / 1000)  # benchmark aid: see PollerConfig.blocking_ms
        logger.debug(
            "polled target=%s ok=%s status=%s elapsed_ms=%.1f error_kind=%s",
            target.name,
            result.ok,
            result.status_code,
            result.elapsed_ms,
            result.error_kind,
        )
        transition, snapshot, sequence = self._apply(target, result)
        await self._save(result, snapshot)
        self._publish(target.name, snapshot, sequence)
        self._fire_actions(target, transition, snapshot, result, resources)
        return result

    async def _poll(
        self, target: Target, resources: LoopResources, scheduled_at: float | None
    ) -> PollResult:
        try:
            if isinstance(target, Job):
                return await target.run(scheduled_at)
            return await poll_http(
                resources.clients.for_target(target),
                target,
                self._conditions[target.name],
                max_body_bytes=self.config.poller.max_body_bytes,
                scheduled_at=scheduled_at,
            )
        except Exception as exc:
            logger.exception("poll of target %s failed with an unexpected error", target.name)
            result = PollResult.starting(target.name, scheduled_at)
            result.error_kind = ErrorKind.INTERNAL
            result.error = f"{type(exc).__name__}: {exc}"
            return result

    def _redact(self, result: PollResult) -> None:
        if result.error:
            result.error = self.config.redact(result.error)
        result.failed_conditions = [self.config.redact(text) for text in result.failed_conditions]

    def _apply(
        self, target: Target, result: PollResult
    ) -> tuple[Transition | None, TargetStatus, int]:
        with self._lock:
            status = self._working[target.name]
            transition = status.apply(result, target.success_threshold, target.failure_threshold)
            self._sequence[target.name] += 1
            return transition, copy.copy(status), self._sequence[target.name]

    async def _save(self, result: PollResult, snapshot: TargetStatus) -> None:
        if self.store is None:
            return
        try:
            await self.store.save(result, snapshot)
        except StoreError as exc:
            # The store logs each new write error once; keep it for /healthz.
            self.store_error = str(exc)
        else:
            self.store_error = None

    def _publish(self, name: str, snapshot: TargetStatus, sequence: int) -> None:
        with self._lock:
            published = self._published[name]
            # A slower, older result (a poll on request beside a scheduled one)
            # must not replace a newer one.
            if self._published_sequence[name] > sequence:
                return
            snapshot.runs, snapshot.missed = published.runs, published.missed
            snapshot.next_run_at = published.next_run_at
            self._published[name] = snapshot
            self._published_sequence[name] = sequence

    def _fire_actions(
        self,
        target: Target,
        transition: Transition | None,
        snapshot: TargetStatus,
        result: PollResult,
        resources: LoopResources,
    ) -> None:
        if transition is not None:
            logger.info(
                "target %s changed from %s to %s",
                target.name,
                transition.previous,
                transition.current,
            )
        previous = transition.previous if transition else snapshot.state
        for index, action in enumerate(target.actions):
            if should_fire(action, transition):
                resources.spawn(
                    self._run_action(action, target, snapshot.state, previous, result, resources),
                    name=f"bgapi-action-{target.name}-{index}",
                )

    async def _run_action(
        self,
        action: ActionConfig,
        target: Target,
        state: State,
        previous: State,
        result: PollResult,
        resources: LoopResources,
    ) -> None:
        try:
            # Actions read only the target's name, which a job has as well.
            client = resources.clients.default()
            await run_action(action, target, state, previous, result, client)  # type: ignore[arg-type]
        except Exception:
            logger.exception("%s action of target %s failed", action.type, target.name)

