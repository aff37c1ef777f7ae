"""The APScheduler mode: the real CLI, and the runner on a real loop with a real store.

The rules under test are bgapi's, not APScheduler's defaults. A target never
overlaps itself, missed slots are counted, and a stall ends with one run, not
a burst. Lateness is reported, a poll in flight does not delay the stop, and
without APScheduler the CLI exits with code 2 and the install command.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import ConfigWriter, run_bgapi, run_cli
from upstream import Upstream

from bgapi.config import Config, config_from_dict
from bgapi.errors import ConfigError
from bgapi.poller import Poller
from bgapi.runners import RunState, create_runner
from bgapi.runners.apscheduler import APSchedulerRunner
from bgapi.store import Store

# Generous for a loaded machine; the documented bound is 2 s.
STOP_BOUND_S = 2.0
INSTALL_HINT = "pip install 'bgapi[apscheduler]'"


def _config(tmp_path: Path, *targets: dict[str, Any]) -> Config:
    return config_from_dict(
        {"store": {"path": str(tmp_path / "bgapi.db")}, "targets": list(targets)}
    )


def _run_with_runner(
    config: Config, scenario: Callable[[APSchedulerRunner], Awaitable[None]]
) -> Poller:
    """Start an APSchedulerRunner on a fresh loop, run ``scenario``, stop it; return the poller."""

    async def main() -> Poller:
        store = Store(config.store.path, config.store.retention)
        await asyncio.to_thread(store.open)
        poller = Poller(config, store, "apscheduler")
        runner = APSchedulerRunner(poller)
        await runner.start()
        try:
            await scenario(runner)
        finally:
            await runner.stop()
            await asyncio.to_thread(store.close)
        return poller

    return asyncio.run(main())


# The CLI -----------------------------------------------------------------------------


def test_run_all_apscheduler_polls_and_stops(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(
        targets=[
            {"name": "up", "url": upstream.url("/ok"), "interval": 0.2},
            {"name": "down", "url": upstream.url("/status/500"), "interval": 0.2},
        ]
    )

    with run_bgapi(config, "--mode", "apscheduler") as bgapi:
        targets = bgapi.wait_for(
            lambda docs: [d["state"] for d in docs] == ["up", "down"], "/api/targets"
        )
        poller = bgapi.wait_for(lambda doc: doc["runs"] >= 6, "/api/poller")
        outcome = bgapi.stop(signal.SIGTERM)

    assert targets[0]["last_result"]["status_code"] == 200
    assert targets[0]["next_run_at"] is not None
    assert targets[1]["last_result"]["status_code"] == 500
    assert poller["mode"] == "apscheduler"
    assert poller["state"] == "running"
    assert poller["polling"] is True
    assert poller["lateness_ms"]["samples"] >= 6
    assert poller["lateness_ms"]["p50"] is not None
    assert poller["lateness_ms"]["p99"] >= poller["lateness_ms"]["p50"]
    assert poller["lateness_ms"]["max"] >= poller["lateness_ms"]["p99"]
    assert outcome.returncode == 0, outcome.output
    assert outcome.elapsed_s < STOP_BOUND_S, f"took {outcome.elapsed_s:.2f} s:\n{outcome.output}"
    assert "Traceback" not in outcome.output
    assert "Task was destroyed but it is pending" not in outcome.output
    assert "poller started in apscheduler mode with 2 target(s)" in outcome.output
    assert "poller stopped after" in outcome.output


def test_run_all_stops_with_poll_in_flight(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(
        targets=[{"name": "hang", "url": upstream.url("/hang"), "interval": 60, "timeout": 30}]
    )

    with run_bgapi(config, "--mode", "apscheduler") as bgapi:
        assert upstream.wait_for_hits("/hang", 1, timeout=10)
        outcome = bgapi.stop(signal.SIGTERM)

    assert outcome.returncode == 0, outcome.output
    assert outcome.elapsed_s < STOP_BOUND_S, f"took {outcome.elapsed_s:.2f} s:\n{outcome.output}"
    assert "Traceback" not in outcome.output
    assert "raised an exception" not in outcome.output
    assert "Task was destroyed but it is pending" not in outcome.output


def test_missing_apscheduler_exits_2(make_config: ConfigWriter, tmp_path: Path) -> None:
    config = make_config(targets=[{"name": "t", "url": "http://127.0.0.1:9/"}])
    # A module set to None in sys.modules makes its import raise ImportError.
    block = tmp_path / "block_apscheduler"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['apscheduler'] = None\n")

    result = run_cli(
        "run-all",
        "--config",
        config,
        "--mode",
        "apscheduler",
        cwd=tmp_path,
        env={"PYTHONPATH": str(block)},
    )

    assert result.returncode == 2, result.stderr
    assert "APScheduler 3" in result.stderr
    assert INSTALL_HINT in result.stderr
    assert "Traceback" not in result.stderr


def test_create_runner_without_apscheduler_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes an import raise ImportError; submodules that
    # are already loaded must be blocked too.
    for name in [name for name in sys.modules if name.split(".")[0] == "apscheduler"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "apscheduler", None)
    monkeypatch.delitem(sys.modules, "bgapi.runners.apscheduler", raising=False)
    poller = Poller(_config(tmp_path))

    with pytest.raises(ConfigError) as caught:
        create_runner("apscheduler", poller)

    assert INSTALL_HINT in str(caught.value)


# The runner ----------------------------------------------------------------------


def test_slow_target_never_overlaps(tmp_path: Path, upstream: Upstream) -> None:
    config = _config(
        tmp_path,
        {"name": "slow", "url": upstream.url("/slow?seconds=0.3"), "interval": 0.1, "timeout": 2},
    )

    async def scenario(runner: APSchedulerRunner) -> None:
        await asyncio.sleep(1.5)

    poller = _run_with_runner(config, scenario)

    starts = [request.received_at for request in upstream.requests_for("/slow")]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    status = poller.status("slow")
    assert status is not None
    assert len(starts) >= 3
    assert min(gaps) >= 0.28, f"polls overlapped: gaps {gaps}"
    assert status.missed >= 5
    assert poller.stats.snapshot()["missed"] == status.missed
    # Every slot of the window is either run or counted as missed.
    assert 13 <= status.runs + status.missed <= 17


def test_stall_runs_once_without_burst(tmp_path: Path, upstream: Upstream) -> None:
    config = _config(tmp_path, {"name": "fast", "url": upstream.url("/ok"), "interval": 0.1})
    window: dict[str, float] = {}

    async def scenario(runner: APSchedulerRunner) -> None:
        await asyncio.sleep(0.35)
        window["stall_start"] = time.monotonic()
        time.sleep(0.7)  # noqa: ASYNC251 - blocks the loop: seven slots pass
        window["stall_end"] = time.monotonic()
        await asyncio.sleep(0.35)

    poller = _run_with_runner(config, scenario)

    after_stall = [
        request
        for request in upstream.requests_for("/ok")
        if window["stall_start"] <= request.received_at <= window["stall_end"] + 0.05
    ]
    status = poller.status("fast")
    assert status is not None
    assert len(after_stall) <= 2, "missed runs were replayed in a burst"
    assert status.missed >= 4
    assert poller.stats.snapshot()["lateness_ms"]["max"] < 100 + 50


def test_late_run_starts_however_late(tmp_path: Path, upstream: Upstream) -> None:
    # APScheduler's default misfire grace of 1 s would drop this run silently.
    config = _config(tmp_path, {"name": "slow-rate", "url": upstream.url("/ok"), "interval": 1.5})
    window: dict[str, float] = {}

    async def scenario(runner: APSchedulerRunner) -> None:
        await asyncio.sleep(1.4)
        time.sleep(1.3)  # noqa: ASYNC251 - the slot at 1.5 s is 1.2 s late afterwards
        window["stall_end"] = time.monotonic()
        await asyncio.sleep(0.2)

    poller = _run_with_runner(config, scenario)

    late = [
        request
        for request in upstream.requests_for("/ok")
        if window["stall_end"] <= request.received_at <= window["stall_end"] + 0.15
    ]
    assert len(late) == 1
    assert poller.stats.snapshot()["lateness_ms"]["max"] >= 1000


def test_first_runs_are_spread(tmp_path: Path, upstream: Upstream) -> None:
    paths = ["/ok", "/json", "/status.json"]
    config = _config(
        tmp_path,
        *(
            {"name": f"t{index}", "url": upstream.url(path), "interval": 0.6}
            for index, path in enumerate(paths)
        ),
    )

    async def scenario(runner: APSchedulerRunner) -> None:
        await asyncio.sleep(0.5)

    _run_with_runner(config, scenario)

    firsts = [upstream.requests_for(path)[0].received_at for path in paths]
    assert firsts == sorted(firsts)
    for earlier, later in itertools.pairwise(firsts):
        assert 0.12 <= later - earlier <= 0.3, f"first runs at {firsts}"


def test_stop_cancels_poll_in_flight(
    tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(
        tmp_path, {"name": "hang", "url": upstream.url("/hang"), "interval": 60, "timeout": 30}
    )
    timing: dict[str, float] = {}
    caplog.set_level(logging.INFO)

    async def main() -> APSchedulerRunner:
        store = Store(config.store.path)
        await asyncio.to_thread(store.open)
        runner = APSchedulerRunner(Poller(config, store, "apscheduler"))
        await runner.start()
        assert await asyncio.to_thread(upstream.wait_for_hits, "/hang", 1, 10)
        start = time.monotonic()
        await runner.stop(timeout=1.5)
        timing["stop_s"] = time.monotonic() - start
        await asyncio.to_thread(store.close)
        return runner

    runner = asyncio.run(main())

    assert timing["stop_s"] < 1.0
    assert runner.state is RunState.STOPPED
    assert runner.error is None
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []


def test_job_error_does_not_stop_schedule(tmp_path: Path, upstream: Upstream) -> None:
    config = _config(tmp_path, {"name": "ok", "url": upstream.url("/ok"), "interval": 0.1})

    class BrokenStorePoller(Poller):
        calls = 0

        async def check(self, *args: Any, **kwargs: Any) -> Any:
            BrokenStorePoller.calls += 1
            if BrokenStorePoller.calls == 2:
                raise RuntimeError("simulated bug in check()")
            return await super().check(*args, **kwargs)

    async def main() -> int:
        store = Store(config.store.path)
        await asyncio.to_thread(store.open)
        runner = APSchedulerRunner(BrokenStorePoller(config, store, "apscheduler"))
        await runner.start()
        await asyncio.sleep(0.55)
        await runner.stop()
        await asyncio.to_thread(store.close)
        return BrokenStorePoller.calls

    assert asyncio.run(main()) >= 4
