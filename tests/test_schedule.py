"""Fixed-rate scheduling: the pure slot arithmetic, then ``run_schedule`` on a real loop.

The loop tests poll the test upstream over real sockets. A subclass of
:class:`Poller` records when each run started; the schedule under test is
the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from upstream import Upstream

from bgapi.config import Config, TargetConfig, config_from_dict
from bgapi.jobs import job
from bgapi.poll import PollResult
from bgapi.poller import LoopResources, Poller
from bgapi.schedule import (
    MAX_GROUP_SIZE,
    MAX_SPREAD_S,
    latest_slot,
    next_slot,
    run_schedule,
    start_offsets,
)

# Slot arithmetic ---------------------------------------------------------------------


def test_latest_slot_before_start() -> None:
    assert latest_slot(100.0, 2.0, 50.0) == 0
    assert latest_slot(100.0, 2.0, 100.0) == 0


def test_latest_slot_counts_whole_intervals() -> None:
    assert latest_slot(100.0, 2.0, 101.9) == 0
    assert latest_slot(100.0, 2.0, 102.0) == 1
    assert latest_slot(100.0, 2.0, 107.5) == 3
    assert latest_slot(0.0, 0.01, 1.005) == 100


def test_next_slot_when_poll_was_short() -> None:
    assert next_slot(0.0, 1.0, 0, 0.3) == (1, 0)
    assert next_slot(10.0, 1.0, 4, 14.99) == (5, 0)


def test_next_slot_skips_slots_a_long_poll_covered() -> None:
    # Slot 0 ran from 0 to 3.5: slots 1, 2 and 3 came while it ran.
    assert next_slot(0.0, 1.0, 0, 3.5) == (4, 3)
    assert next_slot(0.0, 1.0, 0, 1.2) == (2, 1)


@given(
    t0=st.floats(0, 1e6),
    interval=st.floats(1e-3, 1e4),
    done=st.integers(0, 10_000),
    elapsed=st.floats(0, 1e6),
)
def test_next_slot_properties(t0: float, interval: float, done: int, elapsed: float) -> None:
    now = t0 + done * interval + elapsed

    upcoming, skipped = next_slot(t0, interval, done, now)

    assert upcoming > done
    assert skipped == upcoming - done - 1
    # The next slot is not yet due (up to float rounding of the product), and
    # the one before it is: nothing past is replayed, nothing future skipped.
    tolerance = 1e-9 * max(1.0, abs(now))
    assert t0 + upcoming * interval > now - tolerance
    if skipped:
        assert t0 + (upcoming - 1) * interval <= now + tolerance


def _targets(*intervals: float) -> list[TargetConfig]:
    config = config_from_dict(
        {
            "targets": [
                {"name": f"t{index}", "url": "http://127.0.0.1:9/", "interval": interval}
                for index, interval in enumerate(intervals)
            ]
        }
    )
    return config.targets


def test_start_offsets_spread_over_interval() -> None:
    assert start_offsets(_targets(1.0, 1.0, 1.0, 1.0)) == [0.0, 0.25, 0.5, 0.75]


def test_start_offsets_capped_for_long_intervals() -> None:
    offsets = start_offsets(_targets(3600.0, 3600.0))

    assert offsets == [0.0, MAX_SPREAD_S / 2]


def test_start_offsets_single_and_none() -> None:
    assert start_offsets(_targets(5.0)) == [0.0]
    assert start_offsets([]) == []


def test_grouped_offsets_step_apart() -> None:
    offsets = start_offsets(_targets(*[1.0] * 50), group_step_s=0.1)

    starts = sorted(set(offsets))
    assert len(starts) == 10
    assert all(offsets.count(start) == 5 for start in starts)
    assert starts == pytest.approx([index / 10 for index in range(10)])


def test_grouped_offsets_few_targets_spread() -> None:
    assert start_offsets(_targets(1.0, 1.0, 1.0, 1.0), group_step_s=0.1) == [0.0, 0.25, 0.5, 0.75]


def test_grouped_offsets_cap_group_size() -> None:
    offsets = start_offsets(_targets(*[1.0] * 1000), group_step_s=0.1)

    assert max(offsets.count(start) for start in set(offsets)) == MAX_GROUP_SIZE
    assert len(set(offsets)) == 1000 // MAX_GROUP_SIZE
    assert max(offsets) < 1.0


def test_grouped_offsets_float_division() -> None:
    offsets = start_offsets(_targets(*[0.3] * 30), group_step_s=0.1)

    assert len(set(offsets)) == 3


def test_grouped_offsets_short_interval() -> None:
    # An interval shorter than the step still gets one group, never an offset past it.
    offsets = start_offsets(_targets(0.05, 0.05, 0.05), group_step_s=0.1)

    assert offsets == [0.0, 0.0, 0.0]


# run_schedule on a real event loop ---------------------------------------------------


class RecordingPoller(Poller):
    """A real poller that also records each scheduled run's monotonic start time."""

    def __init__(self, config: Config) -> None:
        super().__init__(config, store=None, mode="test")
        self.starts: dict[str, list[tuple[float, float]]] = {t.name: [] for t in config.targets}

    def record_run(self, name: str, lateness_ms: float, missed: int) -> None:
        self.starts[name].append((time.monotonic(), lateness_ms))
        super().record_run(name, lateness_ms, missed)


def _config(*targets: dict[str, Any]) -> Config:
    return config_from_dict({"poller": {"timeout": 2}, "targets": list(targets)})


async def _run_until(
    poller: Poller,
    done: Callable[[], bool],
    max_s: float,
    during: Callable[[], Any] | None = None,
) -> float:
    """Run the schedule until ``done()`` or ``max_s``; return the elapsed seconds.

    ``during`` is called once on the loop after the first run, e.g. to stall it.
    """
    resources = LoopResources(poller.config)
    start = time.monotonic()
    task = asyncio.create_task(run_schedule(poller, resources))
    called = False
    try:
        while not done() and time.monotonic() - start < max_s:
            await asyncio.sleep(0.005)
            if during is not None and not called and poller.stats.runs >= 3:
                called = True
                during()
        elapsed = time.monotonic() - start
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await resources.aclose()
    assert task.cancelled(), "run_schedule must end only by cancellation"
    return elapsed


def test_no_drift_over_many_short_ticks(upstream: Upstream) -> None:
    interval = 0.01
    poller = RecordingPoller(
        _config({"name": "fast", "url": upstream.url("/ok"), "interval": interval})
    )

    def enough_slots() -> bool:
        return poller.stats.runs + poller.stats.missed >= 200

    elapsed = asyncio.run(_run_until(poller, enough_slots, max_s=10.0))
    starts = poller.starts["fast"]
    runs, missed = poller.stats.runs, poller.stats.missed

    assert runs >= 50, f"only {runs} runs in {elapsed:.2f} s"
    assert enough_slots(), f"{runs} runs + {missed} missed after {elapsed:.2f} s"
    # Every run was scheduled on the grid t0 + k * interval. The tolerance
    # covers the delay between the schedule reading the clock and the spy.
    dues = [start - lateness_ms / 1000 for start, lateness_ms in starts]
    for due in dues:
        steps = (due - dues[0]) / interval
        assert abs(steps - round(steps)) < 0.2, f"run off the grid by {steps - round(steps):.4f}"
    # The last run started within one interval of its slot.
    last_start, last_lateness_ms = starts[-1]
    assert 0 <= last_lateness_ms < interval * 1000
    assert last_start - dues[-1] < interval
    # Runs plus missed slots cover the elapsed time: the period did not grow
    # by the poll's duration. A poll still in flight has not yet counted the
    # slots it covers, hence the tolerance of a few slots.
    expected_slots = elapsed / interval
    assert abs(runs + missed - expected_slots) <= 5, (
        f"{runs} runs + {missed} missed, expected about {expected_slots:.0f}"
    )


def test_slow_poll_never_overlaps(upstream: Upstream) -> None:
    poller = RecordingPoller(
        _config(
            {
                "name": "slow",
                "url": upstream.url("/slow?seconds=0.25"),
                "interval": 0.1,
                "timeout": 2,
            },
            {"name": "fast", "url": upstream.url("/ok"), "interval": 0.05},
        )
    )
    slow_runs = poller.starts["slow"]

    elapsed = asyncio.run(_run_until(poller, lambda: len(slow_runs) >= 4, max_s=5.0))
    slow_requests = upstream.requests_for("/slow")
    slow_status = poller.status("slow")

    assert len(slow_runs) >= 4
    # The last run may be cancelled before its request leaves.
    assert len(slow_runs) - 1 <= len(slow_requests) <= len(slow_runs)
    arrivals = [request.received_at for request in slow_requests]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    # A new request only after the previous 0.25 s response: never two at once.
    assert min(gaps) >= 0.24, f"overlapping polls, gaps {gaps}"
    assert slow_status is not None
    # Each 0.25 s poll covers the next two 0.1 s slots.
    assert slow_status.missed >= 2 * (slow_status.runs - 1)
    assert slow_status.last_result is not None
    assert slow_status.last_result.ok
    # The slow target does not hold up the fast one.
    fast_runs = len(poller.starts["fast"])
    assert fast_runs >= 0.5 * elapsed / 0.05, (
        f"fast target ran {fast_runs} times in {elapsed:.2f} s"
    )


def test_stall_is_followed_by_no_burst(upstream: Upstream) -> None:
    interval = 0.05
    stall_s = 0.5
    poller = RecordingPoller(
        _config({"name": "t", "url": upstream.url("/ok"), "interval": interval})
    )
    runs = poller.starts["t"]
    stall_end: list[float] = []

    def stall() -> None:
        time.sleep(stall_s)  # blocks the event loop, as a blocking call would
        stall_end.append(time.monotonic())

    def done() -> bool:
        return bool(stall_end) and time.monotonic() > stall_end[0] + 0.3

    asyncio.run(_run_until(poller, done, max_s=5.0, during=stall))

    assert stall_end, "the stall never ran"
    after = [start for start, _ in runs if start >= stall_end[0]]
    within_one_interval = [start for start in after if start < stall_end[0] + interval]
    assert len(within_one_interval) <= 2, f"burst of {len(within_one_interval)} catch-up polls"
    assert poller.stats.missed >= stall_s / interval - 3
    # The schedule resumed at its normal rate after the stall.
    assert len(after) >= 3


def test_poll_exception_logged_and_schedule_continues(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    class FailingPoller(RecordingPoller):
        calls = 0

        async def check(self, *args: Any, **kwargs: Any) -> PollResult:
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom in check")
            return await super().check(*args, **kwargs)

    poller = FailingPoller(_config({"name": "flaky", "url": upstream.url("/ok"), "interval": 0.02}))

    with caplog.at_level(logging.ERROR, logger="bgapi.schedule"):
        asyncio.run(_run_until(poller, lambda: poller.calls >= 5, max_s=5.0))

    failures = [
        r for r in caplog.records if "scheduled poll of target flaky failed" in r.getMessage()
    ]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert failures[0].exc_info[0] is RuntimeError
    assert poller.calls >= 5
    status = poller.status("flaky")
    assert status is not None
    assert status.last_result is not None
    assert status.last_result.ok


def test_next_run_is_set_ahead(upstream: Upstream) -> None:
    poller = RecordingPoller(_config({"name": "t", "url": upstream.url("/ok"), "interval": 0.5}))

    asyncio.run(
        _run_until(poller, lambda: poller.stats.runs >= 1 and upstream.hits["/ok"] >= 1, max_s=3.0)
    )
    status = poller.status("t")

    assert status is not None
    assert status.next_run_at is not None
    assert status.next_run_at > time.time() - 0.1
    assert status.next_run_at < time.time() + 0.6


def test_no_enabled_targets_waits_until_cancelled(upstream: Upstream) -> None:
    poller = RecordingPoller(
        _config({"name": "off", "url": upstream.url("/ok"), "interval": 0.01, "enabled": False})
    )

    elapsed = asyncio.run(_run_until(poller, lambda: False, max_s=0.2))

    assert elapsed >= 0.2
    assert poller.stats.runs == 0
    assert upstream.hits["/ok"] == 0


def test_first_runs_spread_over_interval(upstream: Upstream) -> None:
    targets = [{"name": f"t{i}", "url": upstream.url("/ok"), "interval": 0.4} for i in range(4)]
    poller = RecordingPoller(_config(*targets))

    asyncio.run(_run_until(poller, lambda: all(poller.starts.values()), max_s=3.0))
    # Scheduled slots (start minus lateness), so a busy loop does not matter.
    firsts = [
        start - lateness_ms / 1000
        for start, lateness_ms in (poller.starts[f"t{i}"][0] for i in range(4))
    ]

    gaps = [later - earlier for earlier, later in itertools.pairwise(firsts)]
    for gap in gaps:
        assert math.isclose(gap, 0.1, abs_tol=0.01), f"first runs not spread: gaps {gaps}"


def test_bug_outside_poll_ends_schedule(upstream: Upstream) -> None:
    # A poll's own failures are results, but a bug in the bookkeeping around
    # it must reach the runner, which reports the crash, rather than silently
    # stopping one target.
    class BrokenStats(RecordingPoller):
        def record_run(self, name: str, lateness_ms: float, missed: int) -> None:
            raise RuntimeError("bug in record_run")

    poller = BrokenStats(_config({"name": "t", "url": upstream.url("/ok"), "interval": 0.01}))

    async def run() -> None:
        await asyncio.wait_for(run_schedule(poller, LoopResources(poller.config)), timeout=5)

    with pytest.raises(RuntimeError, match="bug in record_run"):
        asyncio.run(run())


def test_many_targets_stop_quickly(upstream: Upstream) -> None:
    # 2,000 targets with a long interval are heap entries, not tasks, so the
    # schedule stops at once however many there are.
    targets = [{"name": f"t{i}", "url": upstream.url("/ok"), "interval": 3600} for i in range(2000)]
    poller = RecordingPoller(_config(*targets))

    async def run() -> float:
        resources = LoopResources(poller.config)
        task = asyncio.create_task(run_schedule(poller, resources))
        await asyncio.sleep(0.3)
        running = len(asyncio.all_tasks())
        stop = time.monotonic()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await resources.aclose()
        assert running < 100, f"{running} tasks for 2,000 idle targets"
        return time.monotonic() - stop

    stop_s = asyncio.run(run())

    assert stop_s < 2.0


def test_self_cancelling_job_keeps_schedule() -> None:
    # A job that awaits a future someone else cancelled raises CancelledError
    # without its task being cancelled: a failed run, and the schedule goes on.
    calls = 0

    @job(interval=0.02, name="flaky", timeout=1)
    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future

    poller = Poller(_config(), store=None, mode="test", jobs=[flaky])

    asyncio.run(_run_until(poller, lambda: calls >= 5, max_s=5.0))
    status = poller.status("flaky")

    assert calls >= 5
    assert status is not None
    assert status.consecutive_failures == 0
    assert status.runs >= 5
