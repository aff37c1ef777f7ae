"""bgapi as a library: BackgroundPoller in a user's FastAPI app, custom jobs, lifespans.

Apps run under real uvicorn in a thread (``serve_in_thread``), with a real
SQLite store in the test's directory.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from helpers import ConfigWriter, serve_in_thread, wait_until
from upstream import Upstream

import bgapi
from bgapi import BackgroundPoller, Job, combine_lifespans, get_poller, job
from bgapi.errors import RunnerError

MODES = ["thread", "asyncio", "apscheduler"]


def _settings(tmp_path: Path, *targets: dict[str, Any]) -> dict[str, Any]:
    return {"store": {"path": str(tmp_path / "bgapi.db")}, "targets": list(targets)}


@contextmanager
def _serve(poller: BackgroundPoller, prefix: str = "") -> Iterator[httpx.Client]:
    """Serve an app whose lifespan is the poller's; yield a client for it."""
    app = FastAPI(lifespan=poller.lifespan)
    poller.add_api_routes(app, prefix=prefix)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=5) as client:
        yield client


def _has_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# Lifespans -------------------------------------------------------------------------


def test_lifespans_start_and_stop_in_order(tmp_path: Path) -> None:
    events: list[tuple[str, bool]] = []
    poller = BackgroundPoller(_settings(tmp_path), mode="asyncio")

    @poller.job(interval=0.05)
    async def tick() -> None:
        events.append(("job", poller.started))

    @asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append(("app startup", poller.started))
        yield
        events.append(("app shutdown", poller.started))

    app = FastAPI(lifespan=combine_lifespans(app_lifespan, poller.lifespan))
    with serve_in_thread(app):
        assert wait_until(lambda: ("job", True) in events, timeout_s=5)

    assert events[0] == ("app startup", False)
    assert events[-1] == ("app shutdown", False)
    assert {event for event in events[1:-1]} == {("job", True)}
    assert poller.store._writer is None  # the store was closed


def test_failed_startup_stops_started_lifespans(tmp_path: Path) -> None:
    poller = BackgroundPoller(_settings(tmp_path), mode="thread")
    events: list[str] = []

    @asynccontextmanager
    async def broken(app: Any) -> AsyncIterator[None]:
        events.append(f"broken startup, poller started={poller.started}")
        raise RuntimeError("database unreachable")
        yield

    async def main() -> None:
        async with combine_lifespans(poller.lifespan, broken)(FastAPI()):
            events.append("served")

    with pytest.raises(RuntimeError, match="database unreachable"):
        asyncio.run(main())

    assert events == ["broken startup, poller started=True"]
    assert poller.started is False
    assert poller.runner is not None
    assert poller.runner.state == "stopped"


def test_lifespan_state_is_merged(tmp_path: Path) -> None:
    poller = BackgroundPoller(_settings(tmp_path), mode="asyncio")

    async def app_lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"greeting": "hello"}

    app = FastAPI(lifespan=combine_lifespans(app_lifespan, poller.lifespan))

    @app.get("/greeting")
    def greeting(request: Request) -> dict[str, Any]:
        return {"greeting": request.state.greeting, "bgapi": request.app.state.bgapi is poller}

    with serve_in_thread(app) as url:
        document = httpx.get(f"{url}/greeting", timeout=5).json()

    assert document == {"greeting": "hello", "bgapi": True}


# Jobs --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_sync_job_runs_off_the_event_loop(tmp_path: Path, mode: str) -> None:
    seen: list[tuple[str, bool]] = []
    poller = BackgroundPoller(_settings(tmp_path), mode=mode)

    @poller.job(interval=0.05)
    def blocking() -> None:
        seen.append((threading.current_thread().name, _has_running_loop()))
        time.sleep(0.02)

    with _serve(poller) as client:
        assert wait_until(lambda: len(seen) >= 3, timeout_s=5)
        on_request = client.post("/api/targets/blocking/poll").json()

    assert on_request["ok"] is True
    for thread_name, on_loop in seen:
        assert thread_name.startswith("bgapi-job-blocking")
        assert on_loop is False


@pytest.mark.parametrize("mode", MODES)
def test_async_job_runs_on_the_poller_loop(tmp_path: Path, mode: str) -> None:
    threads: list[str] = []
    poller = BackgroundPoller(_settings(tmp_path), mode=mode)

    @poller.job(interval=0.05)
    async def on_loop() -> None:
        threads.append(threading.current_thread().name)

    with _serve(poller):
        assert wait_until(lambda: len(threads) >= 2, timeout_s=5)

    # Thread mode has a loop of its own; the other modes share the server's.
    expected = "bgapi-poller" if mode == "thread" else "test-uvicorn"
    assert set(threads) == {expected}


def test_failing_job_is_logged_and_rescheduled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bgapi.jobs")
    poller = BackgroundPoller(_settings(tmp_path), mode="asyncio")

    @poller.job(interval=0.05)
    async def broken() -> None:
        raise ValueError("quota exceeded")

    with _serve(poller) as client:
        assert wait_until(lambda: poller.poller.stats.runs >= 4, timeout_s=5)
        target = client.get("/api/targets/broken").json()
        stored = client.get("/api/targets/broken/results").json()

    assert target["kind"] == "job"
    assert target["state"] == "down"
    assert target["last_result"]["error_kind"] == "internal"
    assert target["last_result"]["error"] == "ValueError: quota exceeded"
    assert len(stored) >= 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    repeats = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(errors) == 1  # the traceback once, then one line per repeat
    assert errors[0].exc_info is not None
    assert "job broken failed: ValueError: quota exceeded" in errors[0].getMessage()
    assert len(repeats) >= 2
    assert "failed again" in repeats[0].getMessage()


def test_job_returning_false_is_down(tmp_path: Path) -> None:
    results = iter([True, False, None])
    poller = BackgroundPoller(_settings(tmp_path), mode="asyncio")

    @poller.job(interval=60, failure_threshold=1)
    def check() -> bool | None:
        return next(results)

    states = []
    with _serve(poller) as client:
        assert wait_until(lambda: poller.poller.stats.runs >= 1, timeout_s=5)
        for _ in range(2):
            result = client.post("/api/targets/check/poll").json()
            states.append(
                (result["ok"], result["error"], client.get("/api/targets/check").json()["state"])
            )

    assert states == [(False, "the job returned False", "down"), (True, None, "up")]


def test_async_job_timeout_cancels_it(tmp_path: Path) -> None:
    cancelled = threading.Event()
    poller = BackgroundPoller(_settings(tmp_path), mode="asyncio")

    @poller.job(interval=60, timeout=0.1)
    async def stuck() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with _serve(poller) as client:
        assert wait_until(
            lambda: client.get("/api/targets/stuck").json()["last_result"], timeout_s=5
        )
        target = client.get("/api/targets/stuck").json()

    assert cancelled.is_set()
    assert target["timeout_s"] == 0.1
    assert target["last_result"]["error_kind"] == "timeout"
    assert target["last_result"]["error"] == "the job did not finish within 0.1 s"


def test_sync_job_never_overlaps(tmp_path: Path) -> None:
    running = 0
    max_running = 0
    lock = threading.Lock()
    poller = BackgroundPoller(_settings(tmp_path), mode="thread")

    @poller.job(interval=0.05)
    def slow() -> None:
        nonlocal running, max_running
        with lock:
            running += 1
            max_running = max(max_running, running)
        time.sleep(0.2)
        with lock:
            running -= 1

    with _serve(poller) as client:
        # A request arriving while a scheduled run goes waits for it.
        assert wait_until(lambda: running == 1, timeout_s=5)
        on_request = client.post("/api/targets/slow/poll").json()
        time.sleep(0.3)
        target = client.get("/api/targets/slow").json()

    assert max_running == 1
    assert on_request["ok"] is True
    assert on_request["elapsed_ms"] >= 200
    assert target["missed"] >= 3


def test_job_with_actions_fires_webhook(tmp_path: Path, upstream: Upstream) -> None:
    poller = BackgroundPoller(_settings(tmp_path), mode="asyncio")

    @poller.job(
        interval=60, actions=[{"type": "webhook", "url": upstream.url("/webhook"), "on": "down"}]
    )
    def failing() -> bool:
        return False

    with _serve(poller):
        assert upstream.wait_for_hits("/webhook", 1, timeout=5)

    payload = upstream.requests_for("/webhook")[0].json()
    assert payload["target"] == "failing"
    assert payload["state"] == "down"
    assert payload["previous_state"] == "unknown"


# The API and the state ----------------------------------------------------------------


def test_jobs_and_targets_share_the_api(tmp_path: Path, upstream: Upstream) -> None:
    poller = BackgroundPoller(
        _settings(tmp_path, {"name": "upstream", "url": upstream.url("/ok"), "interval": 0.1}),
        mode="asyncio",
    )

    @poller.job(interval=0.1, name="nightly-report")
    def report() -> None:
        pass

    with _serve(poller, prefix="/bgapi") as client:
        assert wait_until(
            lambda: all(t["state"] == "up" for t in client.get("/bgapi/api/targets").json()),
            timeout_s=5,
        )
        targets = client.get("/bgapi/api/targets").json()
        stats = client.get("/bgapi/api/poller").json()
        health = client.get("/bgapi/healthz")
        missing = client.get("/bgapi/api/targets/nope")

    assert [(t["name"], t["kind"]) for t in targets] == [
        ("upstream", "http"),
        ("nightly-report", "job"),
    ]
    assert targets[1]["url"] is None
    assert targets[1]["method"] is None
    assert targets[1]["interval_s"] == 0.1
    assert targets[1]["runs"] >= 1
    assert stats["targets"] == 2
    assert stats["polling"] is True
    assert health.status_code == 200
    assert missing.status_code == 404


@pytest.mark.parametrize("mode", [*MODES, "process"])
def test_state_reachable_from_user_endpoint(tmp_path: Path, upstream: Upstream, mode: str) -> None:
    poller = BackgroundPoller(
        _settings(tmp_path, {"name": "api", "url": upstream.url("/ok"), "interval": 0.05}),
        mode=mode,
    )
    app = FastAPI(lifespan=poller.lifespan)

    @app.get("/status")
    def status(bg: Annotated[BackgroundPoller, Depends(get_poller)]) -> dict[str, Any]:
        target = bg.status("api")
        assert target is not None
        return {"state": target.state, "runs": target.runs}

    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=5) as client:
        assert wait_until(lambda: client.get("/status").json()["state"] == "up", timeout_s=5)
        document = client.get("/status").json()

    assert document["runs"] >= 1


def test_get_poller_without_lifespan_raises() -> None:
    request = Request({"type": "http", "app": FastAPI()})

    with pytest.raises(RuntimeError, match="no BackgroundPoller runs in this app"):
        get_poller(request)


def test_poll_now_before_start_raises(tmp_path: Path) -> None:
    poller = BackgroundPoller(_settings(tmp_path))
    poller.add_job(job(interval=1, name="cleanup")(lambda: None))

    with pytest.raises(RunnerError, match="has not started"):
        asyncio.run(poller.poll_now("cleanup"))
    with pytest.raises(KeyError, match="no target or job named 'nope'"):
        asyncio.run(poller.poll_now("nope"))


# Building ----------------------------------------------------------------------------


def test_from_file_reads_config(make_config: ConfigWriter, upstream: Upstream) -> None:
    path = make_config(
        targets=[{"name": "ok", "url": upstream.url("/ok")}], poller={"mode": "asyncio"}
    )

    poller = BackgroundPoller.from_file(path)

    assert poller.mode == "asyncio"
    assert [status.name for status in poller.statuses()] == ["ok"]
    assert poller.statuses()[0].state == "unknown"


def test_job_decorator_keeps_function_callable() -> None:
    @job(interval=timedelta(minutes=5), timeout=30)
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    assert isinstance(add, Job)
    assert add(2, 3) == 5
    assert add.name == "add"
    assert add.interval_s == 300.0
    assert add.timeout_s == 30.0
    assert add.__doc__ == "Add two numbers."
    assert add.is_async is False


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"interval": 0}, ValueError, "job 'task': interval must be greater than 0 seconds, got 0"),
        ({"interval": -1.5}, ValueError, "interval must be greater than 0 seconds, got -1.5"),
        (
            {"interval": "60"},
            TypeError,
            "interval must be a number of seconds or a timedelta, got '60'",
        ),
        (
            {"interval": 1, "timeout": 0},
            ValueError,
            "timeout must be greater than 0 seconds, got 0",
        ),
        (
            {"interval": 1, "failure_threshold": 0},
            ValueError,
            "failure_threshold must be at least 1, got 0",
        ),
        (
            {"interval": 1, "success_threshold": 1.5},
            TypeError,
            "success_threshold must be a whole number",
        ),
        ({"interval": 1, "name": "has space"}, ValueError, "invalid job name 'has space'"),
        (
            {"interval": 1, "actions": [{"type": "email"}]},
            ValueError,
            "job 'task': invalid actions[0]: type",
        ),
        (
            {"interval": 1, "actions": [{"type": "webhook"}]},
            ValueError,
            "a webhook action needs a url",
        ),
    ],
)
def test_job_rejects_bad_options(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    def task() -> None:
        pass

    with pytest.raises(error) as caught:
        Job(task, **options)

    assert message in str(caught.value)


def test_bare_job_decorator_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"write @job\(interval=60\) instead of @job"):

        @job  # type: ignore[arg-type]
        def task() -> None:
            pass


def test_duplicate_names_are_rejected(tmp_path: Path) -> None:
    poller = BackgroundPoller(_settings(tmp_path, {"name": "api", "url": "http://127.0.0.1:9/"}))

    with pytest.raises(
        ValueError, match="cannot add job 'api': a target or job with this name exists"
    ):
        poller.add_job(job(interval=1, name="api")(lambda: None))


def test_add_job_after_start_is_rejected(tmp_path: Path) -> None:
    poller = BackgroundPoller(_settings(tmp_path), mode="asyncio")

    async def main() -> None:
        async with poller.lifespan():
            poller.add_job(job(interval=1, name="late")(lambda: None))

    with pytest.raises(RunnerError, match="cannot add job 'late': the poller has already started"):
        asyncio.run(main())


def test_unknown_mode_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(bgapi.ConfigError, match="mode 'cron' is unknown"):
        BackgroundPoller(_settings(tmp_path), mode="cron")


# The package -------------------------------------------------------------------------


def test_import_bgapi_is_cheap_and_starts_nothing() -> None:
    code = (
        "import sys, threading, bgapi\n"
        "heavy = [m for m in ('fastapi', 'httpx', 'pydantic', 'uvicorn', 'apscheduler') if m in sys.modules]\n"
        "print(heavy, threading.active_count())\n"
        "bgapi.BackgroundPoller\n"
        "print('fastapi' in sys.modules, threading.active_count())\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[] 1", "True 1"]


def test_public_names_are_documented() -> None:
    for name in bgapi.__all__:
        if name == "__version__":
            continue
        value = getattr(bgapi, name)
        assert value.__doc__, f"bgapi.{name} has no docstring"
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        bgapi.nothing  # noqa: B018
