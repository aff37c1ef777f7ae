"""The process mode: the schedule in a child process of a real ``bgapi run-all``."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import (
    ConfigWriter,
    assert_clean_exit,
    interrupt_during_startup,
    run_bgapi,
    wait_until,
)
from upstream import Upstream

from bgapi import BackgroundPoller
from bgapi.config import config_from_dict
from bgapi.errors import RunnerError, StoreError
from bgapi.poller import LoopResources, Poller
from bgapi.runners.process import ProcessRunner, _max_uncommitted, _ReportingPoller
from bgapi.store import Store


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child that exited but was not reaped yet is a zombie: gone for our purpose.
    try:
        status = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_quietly(pid: int | None) -> None:
    if pid is not None and _alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_child_polls_and_server_shows_stored_results(
    make_config: ConfigWriter, upstream: Upstream
) -> None:
    config = make_config(
        targets=[
            {"name": "up", "url": upstream.url("/ok"), "interval": 0.1},
            {"name": "down", "url": upstream.url("/status/503"), "interval": 0.1},
        ]
    )

    with run_bgapi(config, "--mode", "process") as bgapi:
        targets = bgapi.wait_for(
            lambda docs: [d["state"] for d in docs] == ["up", "down"], "/api/targets"
        )
        poller = bgapi.wait_for(lambda doc: doc["runs"] >= 6, "/api/poller")
        outcome = bgapi.stop(signal.SIGTERM)

    assert poller["mode"] == "process"
    assert poller["poller_pid"] != poller["worker_pid"]
    assert poller["lateness_ms"]["samples"] >= 6
    assert targets[0]["next_run_at"] is not None
    assert outcome.returncode == 0, outcome.output
    assert "Traceback" not in outcome.output
    assert not _alive(poller["poller_pid"])
    with sqlite3.connect(config.parent / "bgapi.db") as db:
        stored = db.execute("SELECT count(*) FROM results").fetchone()[0]
    hits = upstream.hits["/ok"] + upstream.hits["/status/503"]
    # Every poll that got a response was stored, except one per target cancelled at shutdown.
    assert hits - 2 <= stored <= hits


def test_dead_child_reported_api_serves(
    make_config: ConfigWriter, upstream: Upstream
) -> None:
    config = make_config(targets=[{"name": "up", "url": upstream.url("/ok"), "interval": 0.1}])

    with run_bgapi(config, "--mode", "process") as bgapi:
        # SIGKILL loses the results that the child has not committed yet, so
        # wait until one is committed and shown.
        bgapi.wait_for(lambda doc: doc[0]["state"] == "up", "/api/targets")
        pid = bgapi.get("/api/poller").json()["poller_pid"]
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: bgapi.get("/healthz").status_code == 503, 5.0), bgapi.output()
        health = bgapi.get("/healthz").json()
        targets = bgapi.get("/api/targets")
        outcome = bgapi.stop(signal.SIGTERM)

    assert health["poller"] == "crashed"
    assert f"the poller process {pid} exited with code -9" in health["reason"]
    assert targets.status_code == 200
    assert targets.json()[0]["state"] == "up"
    assert "the process poller died and polls no more" in outcome.output


def test_ctrl_c_while_child_starts(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(targets=[{"name": "up", "url": upstream.url("/ok"), "interval": 0.1}])

    # The lifespan starts the child right after this line.
    outcome = interrupt_during_startup(
        config, "--mode", "process", after_line="Waiting for application startup", delay_s=0.1
    )

    assert_clean_exit(outcome)
    assert "exited during startup" not in outcome.output


def test_child_stops_when_the_server_is_killed(
    make_config: ConfigWriter, upstream: Upstream
) -> None:
    config = make_config(targets=[{"name": "up", "url": upstream.url("/ok"), "interval": 0.1}])
    pid = None
    try:
        with run_bgapi(config, "--mode", "process") as bgapi:
            pid = bgapi.wait_for(lambda doc: doc["runs"] >= 1, "/api/poller")["poller_pid"]
            bgapi.process.kill()
            bgapi.process.wait(5)
            # The child checks for its parent twice a second.
            assert wait_until(lambda: not _alive(pid), 5.0), "the poller outlived its server"
            output = bgapi.output()
    finally:
        _kill_quietly(pid)

    assert "Traceback" not in output
    assert "CancelledError" not in output


def test_workers_report_the_same_poller(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(targets=[{"name": "up", "url": upstream.url("/ok"), "interval": 0.1}])

    with run_bgapi(config, "--mode", "process", "--workers", "2") as bgapi:
        def poller_document() -> dict[str, Any]:
            # A new connection each time, so that requests reach both workers.
            document: dict[str, Any] = httpx.get(f"{bgapi.base_url}/api/poller", timeout=5).json()
            return document

        # Until its child has started, the polling worker's own id is in the lock file.
        assert wait_until(lambda: poller_document()["runs"] >= 1, 10.0), bgapi.output()
        documents = [poller_document() for _ in range(20)]
        outcome = bgapi.stop(signal.SIGTERM)

    workers = {document["worker_pid"] for document in documents}
    pollers = {document["poller_pid"] for document in documents}
    assert len(pollers) == 1, documents
    assert not pollers & workers, "poller_pid names a worker, not the polling child"
    assert outcome.returncode == 0, outcome.output


def test_process_mode_rejects_jobs(tmp_path: Path) -> None:
    poller = BackgroundPoller({"store": {"path": str(tmp_path / "bgapi.db")}}, mode="process")

    @poller.job(interval=1)
    def refresh() -> None:
        pass

    with pytest.raises(RunnerError, match="runs HTTP targets only.*use the thread or asyncio mode"):
        asyncio.run(poller.start())
    assert not poller.started


def _check_once(config: Any, poller: Any) -> bool:
    """Poll the config's first target once with ``poller`` on a new event loop."""

    async def check() -> bool:
        resources = LoopResources(config)
        try:
            result = await asyncio.wait_for(poller.check(config.targets[0], resources), 30.0)
        finally:
            await resources.aclose()
        return result.ok

    return asyncio.run(check())


def _stored_count(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM results").fetchone()[0]


@pytest.mark.parametrize("backlogged", [False, True])
def test_child_poll_waits_only_when_backlogged(
    tmp_path: Path, upstream: Upstream, backlogged: bool
) -> None:
    config = config_from_dict(
        {
            "store": {"path": str(tmp_path / "bgapi.db")},
            "targets": [{"name": "up", "url": upstream.url("/ok")}],
        }
    )
    store = Store(config.store.path, commit_delay_s=0.5 if backlogged else 600.0)
    store.open()
    poller = _ReportingPoller(config, store, mode="process")
    if backlogged:
        poller.max_uncommitted = 0
    try:
        assert _check_once(config, poller)
        # With room in the queue the poll returns before its commit, which a
        # 600 s delay keeps off the disk. With a full queue it waits for it.
        assert _stored_count(config.store.path) == (1 if backlogged else 0)
    finally:
        store.close()

    assert _stored_count(config.store.path) == 1
    assert poller.store_error is None


def test_uncommitted_bound_follows_targets() -> None:
    slow = config_from_dict(
        {"targets": [{"name": f"t{index}", "url": "http://127.0.0.1:9/"} for index in range(50)]}
    )
    fast = config_from_dict(
        {
            "targets": [
                {"name": f"t{index}", "url": "http://127.0.0.1:9/", "interval": 0.05}
                for index in range(20)
            ]
        }
    )

    # One per target, as when every poll waited for its commit ...
    assert _max_uncommitted(slow.targets) == 50
    # ... or two commit delays' worth of polls: 400 polls/s for 0.2 s.
    assert _max_uncommitted(fast.targets) == 80


def test_child_store_error_reaches_server() -> None:
    config = config_from_dict({"targets": [{"name": "up", "url": "http://127.0.0.1:9/"}]})
    child = _ReportingPoller(config, None, mode="process")
    server = ProcessRunner(Poller(config, None))
    error = "cannot write to the store 'bgapi.db': disk I/O error"

    child._saved(StoreError(error))
    server._apply(child.take_events())
    failing = server.poller.store_error
    child._saved(None)
    server._apply(child.take_events())

    assert failing == error
    assert server.poller.store_error is None
    assert child.take_events() == []
