"""One poller per deployment: the lock, standby and takeover, and ``run-all --workers N``.

The counting tests compare the hits that a local upstream receives in a
window, measured on the upstream's own clock, so the sleeps of the test do
not blur the count.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import (
    ConfigWriter,
    RunningBgapi,
    assert_clean_exit,
    interrupt_during_startup,
    run_bgapi,
    serve_in_thread,
    wait_until,
)
from upstream import Upstream

from bgapi.background import BackgroundPoller
from bgapi.config import config_from_dict
from bgapi.errors import ConfigError
from bgapi.runners import Runner, RunState
from bgapi.server import create_app
from bgapi.workers import (
    PollerLock,
    create_app_from_env,
    lock_path_for,
    lock_retry_s,
)

# Generous for a loaded machine; the documented bound is 2 s.
STOP_BOUND_S = 2.0
INTERVAL_S = 0.25
WINDOW_S = 2.0
PATHS = ("/ok", "/json")


def _targets(upstream: Upstream) -> list[dict[str, Any]]:
    return [
        {"name": path.strip("/"), "url": upstream.url(path), "interval": INTERVAL_S}
        for path in PATHS
    ]


def _count_window(upstream: Upstream) -> dict[str, int]:
    """Wait until every target is polled, then count each path's hits over WINDOW_S."""
    for path in PATHS:
        assert upstream.wait_for_hits(path, 2, timeout=15), f"{path} was never polled"
    time.sleep(0.3)
    start = time.monotonic()
    time.sleep(WINDOW_S)
    end = time.monotonic()
    return {
        path: sum(
            1 for request in upstream.requests_for(path) if start <= request.received_at < end
        )
        for path in PATHS
    }


def _poller_documents(bgapi: RunningBgapi, count: int) -> list[dict[str, Any]]:
    """GET /api/poller ``count`` times, each on a new connection, so that different workers respond."""
    documents = []
    for _ in range(count):
        with httpx.Client(base_url=bgapi.base_url, timeout=5) as client:
            documents.append(client.get("/api/poller").json())
    return documents


# The lock ----------------------------------------------------------------------------


def test_lock_is_exclusive(tmp_path: Path) -> None:
    path = lock_path_for(tmp_path / "bgapi.db")
    first, second = PollerLock(path), PollerLock(path)

    assert path.name == "bgapi.db.poller.lock"
    assert first.try_acquire() is True
    assert second.try_acquire() is False
    assert second.holder_pid() == os.getpid()
    first.release()
    assert second.try_acquire() is True
    second.release()


def test_lock_released_when_holder_dies(tmp_path: Path) -> None:
    path = tmp_path / "bgapi.db.poller.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\n"
                "from bgapi.workers import PollerLock\n"
                f"assert PollerLock({str(path)!r}).try_acquire()\n"
                "print('locked', flush=True)\n"
                "time.sleep(60)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        lock = PollerLock(path)
        assert lock.try_acquire() is False
        assert lock.holder_pid() == holder.pid
        holder.kill()
        holder.wait(10)
        assert lock.try_acquire() is True
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()


def test_lock_retry_follows_shortest_interval() -> None:
    assert lock_retry_s([60.0, 30.0]) == 1.0
    assert lock_retry_s([0.2, 5.0]) == 0.2
    assert lock_retry_s([0.001]) == 0.05
    assert lock_retry_s([]) == 1.0


# Standby and takeover in one process -----------------------------------------------


def test_second_poller_waits_then_takes_over(tmp_path: Path, upstream: Upstream) -> None:
    settings = {
        "store": {"path": str(tmp_path / "bgapi.db")},
        "targets": [{"name": "ok", "url": upstream.url("/ok"), "interval": 0.1}],
    }
    first = BackgroundPoller(settings, mode="asyncio")
    second = BackgroundPoller(settings, mode="asyncio")

    async def main() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(first.lifespan())
            await stack.enter_async_context(second.lifespan())
            await asyncio.sleep(0.4)
            seen["first_polling"] = first.polling
            seen["second_state"] = second.runner.state if second.runner else None
            seen["second_polling"] = second.polling
            seen["second_runs_before"] = second.poller.stats.runs
            seen["standby_state_of_ok"] = second.status("ok")
            await first.stop()
            stopped_at = time.monotonic()
            while not second.polling and time.monotonic() - stopped_at < 3:
                await asyncio.sleep(0.02)
            seen["takeover_s"] = time.monotonic() - stopped_at
            await asyncio.sleep(0.3)
            seen["second_runs_after"] = second.poller.stats.runs
        return seen

    seen = asyncio.run(main())

    assert seen["first_polling"] is True
    assert seen["second_state"] is RunState.STANDBY
    assert seen["second_polling"] is False
    assert seen["second_runs_before"] == 0
    # The standby shows what the polling process stored.
    assert seen["standby_state_of_ok"].state == "up"
    assert seen["standby_state_of_ok"].last_result is not None
    assert seen["takeover_s"] < 1.0
    assert seen["second_runs_after"] >= 2


def test_crashed_poller_releases_lock(
    tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    class CrashingRunner(Runner):
        mode = "crashing"

        async def _start(self) -> None:
            self.state = RunState.RUNNING
            crash = RuntimeError("simulated poller bug")
            asyncio.get_running_loop().call_later(0.1, self.report_crash, crash)

        async def _stop(self, timeout: float) -> None:
            pass

    settings = {
        "store": {"path": str(tmp_path / "bgapi.db")},
        "targets": [{"name": "ok", "url": upstream.url("/ok"), "interval": 0.1}],
    }
    crashing = BackgroundPoller(settings, runner_factory=CrashingRunner)
    healthy = BackgroundPoller(settings, mode="asyncio")

    async def main() -> float:
        async with crashing.lifespan(), healthy.lifespan():
            started = time.monotonic()
            while not healthy.polling and time.monotonic() - started < 3:
                await asyncio.sleep(0.02)
            return time.monotonic() - started

    takeover_s = asyncio.run(main())

    assert takeover_s < 1.0
    assert crashing.runner is not None
    assert crashing.runner.state is RunState.CRASHED
    assert crashing.runner.error == "RuntimeError: simulated poller bug"
    assert "released the poller lock" in caplog.text


def test_standby_api_serves_stored_state_and_polls(tmp_path: Path, upstream: Upstream) -> None:
    config = config_from_dict(
        {
            "store": {"path": str(tmp_path / "bgapi.db")},
            "targets": [
                {"name": "ok", "url": upstream.url("/ok"), "interval": 0.1},
                {"name": "down", "url": upstream.url("/status/503"), "interval": 0.1},
            ],
        }
    )

    with (
        serve_in_thread(create_app(config, mode="thread")) as polling_url,
        serve_in_thread(create_app(config, mode="thread")) as standby_url,
        httpx.Client(timeout=5) as client,
    ):
        assert wait_until(
            lambda: (
                [t["state"] for t in client.get(f"{standby_url}/api/targets").json()]
                == ["up", "down"]
            ),
            timeout_s=5,
        )
        standby_poller = client.get(f"{standby_url}/api/poller").json()
        polling_poller = client.get(f"{polling_url}/api/poller").json()
        health = client.get(f"{standby_url}/healthz")
        earlier = client.get(f"{standby_url}/api/targets/ok").json()
        time.sleep(0.3)
        later = client.get(f"{standby_url}/api/targets/ok").json()
        on_request = client.post(f"{standby_url}/api/targets/down/poll")

    assert standby_poller["state"] == "standby"
    assert standby_poller["polling"] is False
    assert standby_poller["mode"] == "thread"
    assert standby_poller["poller_pid"] == os.getpid()
    assert polling_poller["polling"] is True
    assert health.status_code == 200
    assert health.json()["poller"] == "standby"
    # The standby never polls, yet its view follows what the polling app stores.
    assert later["runs"] == 0
    assert later["last_result"]["started_at"] > earlier["last_result"]["started_at"]
    assert on_request.status_code == 200
    assert on_request.json()["status_code"] == 503


def test_factory_needs_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BGAPI_CONFIG", raising=False)

    with pytest.raises(ConfigError) as caught:
        create_app_from_env()

    assert "BGAPI_CONFIG is not set" in str(caught.value)


def test_factory_rejects_unknown_mode(
    make_config: ConfigWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BGAPI_CONFIG", str(make_config(targets=[])))
    monkeypatch.setenv("BGAPI_MODE", "celery")

    with pytest.raises(ConfigError) as caught:
        create_app_from_env()

    assert "BGAPI_MODE='celery'" in str(caught.value)
    assert "thread, asyncio, apscheduler" in str(caught.value)


# run-all --workers N -------------------------------------------------------------


@contextmanager
def _fresh_upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server


def test_workers_poll_each_slot_once(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(targets=_targets(upstream))

    with run_bgapi(config, "--workers", "3") as bgapi:
        counts_with_workers = _count_window(upstream)
        documents = _poller_documents(bgapi, 12)
        views, polls = [], []
        for _ in range(6):
            with httpx.Client(base_url=bgapi.base_url, timeout=5) as client:
                views.append([target["state"] for target in client.get("/api/targets").json()])
                polls.append(client.post("/api/targets/ok/poll"))
        outcome = bgapi.stop(signal.SIGTERM)

    with _fresh_upstream() as single_upstream:
        single_config = make_config(
            targets=_targets(single_upstream), store={"path": config.parent / "single.db"}
        )
        with run_bgapi(single_config):
            counts_single = _count_window(single_upstream)

    expected = WINDOW_S / INTERVAL_S
    for path in PATHS:
        assert abs(counts_with_workers[path] - counts_single[path]) <= 1, (
            counts_with_workers,
            counts_single,
        )
        assert counts_with_workers[path] <= expected + 1, counts_with_workers
    # Every worker, polling or not, shows the stored states and polls on request.
    assert views == [["up", "up"]] * 6
    assert [response.status_code for response in polls] == [200] * 6
    assert {response.json()["status_code"] for response in polls} == {200}
    poller_pids = {document["poller_pid"] for document in documents}
    assert len(poller_pids) == 1, documents
    for document in documents:
        assert document["polling"] is (document["worker_pid"] in poller_pids), document
    assert outcome.returncode == 0, outcome.output
    assert outcome.elapsed_s < STOP_BOUND_S, f"took {outcome.elapsed_s:.2f} s:\n{outcome.output}"
    assert "Traceback" not in outcome.output
    assert "is on standby" in outcome.output
    assert "bgapi stopped" in outcome.output


def test_killed_poller_worker_is_replaced(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(targets=_targets(upstream))

    with run_bgapi(config, "--workers", "2") as bgapi:
        assert upstream.wait_for_hits("/ok", 2, timeout=15)
        first = bgapi.wait_for(lambda doc: doc["poller_pid"] is not None, "/api/poller")
        killed_pid = first["poller_pid"]
        os.kill(killed_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert wait_until(
            lambda: any(r.received_at > killed_at + 0.1 for r in upstream.requests_for("/ok")),
            timeout_s=10,
        ), bgapi.output()
        resumed_s = (
            min(
                r.received_at
                for r in upstream.requests_for("/ok")
                if r.received_at > killed_at + 0.1
            )
            - killed_at
        )
        second = bgapi.wait_for(
            lambda doc: doc["poller_pid"] not in (None, killed_pid), "/api/poller"
        )
        outcome = bgapi.stop(signal.SIGTERM)

    assert second["poller_pid"] != killed_pid
    # The standby retries the lock every INTERVAL_S here; a few intervals at most.
    assert resumed_s < 3.0, f"polling resumed after {resumed_s:.2f} s"
    assert "took the poller lock" in outcome.output
    assert outcome.returncode == 0, outcome.output


def test_ctrl_c_while_workers_start(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(targets=[{"name": "up", "url": upstream.url("/ok"), "interval": 0.1}])

    # uvicorn logs this line just before it starts the workers.
    outcome = interrupt_during_startup(
        config, "--workers", "2", after_line="Started parent process", delay_s=0.1
    )

    assert_clean_exit(outcome)
    assert "KeyboardInterrupt" not in outcome.output
