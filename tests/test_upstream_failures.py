"""Misbehaving upstreams under a real runner: each failure is recorded with its kind.

One schedule per strategy polls every case of ``CASES`` together with an
``ok`` target at a short interval, for a few seconds, against the local
``Upstream`` servers. The table-driven tests then check, per case, the stored
error kind, the message and the time bound, and that the ``ok`` target kept
its schedule meanwhile. Separate tests bound the memory a huge body costs and
the time a hanging name resolver costs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import cli_env, free_port, render_config, wait_until
from upstream import Upstream

from bgapi.conditions import default_conditions
from bgapi.config import config_from_dict
from bgapi.poll import ErrorKind, HttpClients, poll_http
from bgapi.poller import Poller
from bgapi.runners import RunState, create_runner
from bgapi.store import Store

# Every failure target gets this total deadline and interval, in seconds.
TIMEOUT_S = 1.0
INTERVAL_S = 1.0
# Allowed overrun of a deadline: scheduling and cancellation on a busy machine.
DEADLINE_SLACK_S = 0.5
OK_INTERVAL_S = 0.2
RUN_S = 3.0
# A late start beyond this means the failures held up the healthy target.
MAX_OK_LATENESS_MS = 500.0
OK_PATH = "/status/200"
# The .invalid top-level domain is reserved and never resolves.
UNRESOLVABLE_HOST = "bgapi-test.invalid"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Case:
    """One misbehaving upstream and what bgapi must record for it.

    ``url`` may use ``{plain}``, ``{tls}`` and ``{closed}`` for the base URLs of
    the plain server, the TLS server and a closed port. ``options`` may use
    ``{ca}`` for the TLS server's CA file. A ``kind`` of None means that the
    response is valid HTTP and the target must be up.
    """

    id: str
    url: str
    kind: ErrorKind | None
    fragment: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    status_code: int | None = None


CASES = [
    Case("connection-refused", "{closed}/", ErrorKind.CONNECT, "Connection refused"),
    Case("unresolvable-name", f"http://{UNRESOLVABLE_HOST}/", ErrorKind.DNS, "name resolution"),
    Case("accepts-never-answers", "{plain}/hang", ErrorKind.TIMEOUT, "within 1 s"),
    Case("reset-in-headers", "{plain}/reset?stage=headers", ErrorKind.CONNECT, "reset by peer"),
    Case(
        "reset-in-body",
        "{plain}/reset?stage=body",
        ErrorKind.CONNECT,
        "reset by peer",
        status_code=200,
    ),
    # One byte every 0.5 s: no single read times out, only the total deadline ends it.
    Case("drip-feed", "{plain}/drip?seconds=0.5", ErrorKind.TIMEOUT, "within 1 s", status_code=200),
    Case("server-error", "{plain}/status/503", ErrorKind.HTTP_STATUS, "503", status_code=503),
    Case(
        "truncated-json",
        "{plain}/invalid-json",
        ErrorKind.INVALID_JSON,
        "not valid JSON",
        {"conditions": ["json.oops == 1"]},
        status_code=200,
    ),
    Case(
        "text-for-json-condition",
        "{plain}/ok",
        ErrorKind.INVALID_JSON,
        "not valid JSON",
        {"conditions": ['json.status == "ok"']},
        status_code=200,
    ),
    Case(
        "huge-body",
        "{plain}/huge?mb=300",
        ErrorKind.TOO_LARGE,
        "exceeds the limit",
        status_code=200,
    ),
    Case(
        "redirect-loop", "{plain}/redirect-loop", ErrorKind.TOO_MANY_REDIRECTS, "too many redirects"
    ),
    Case("self-signed", "{tls}/ok", ErrorKind.TLS, "CERTIFICATE_VERIFY_FAILED"),
    Case("self-signed-verify-off", "{tls}/ok", None, options={"verify": False}, status_code=200),
    Case("self-signed-ca-bundle", "{tls}/ok", None, options={"ca_bundle": "{ca}"}, status_code=200),
    Case(
        "not-utf8-for-json-condition",
        "{plain}/not-utf8",
        ErrorKind.INVALID_JSON,
        "not valid JSON",
        {"conditions": ["json.ok == true"]},
        status_code=200,
    ),
    # Invalid bytes are replaced (U+FFFD) for text conditions, so "ok" is still found.
    Case(
        "not-utf8-for-text-condition",
        "{plain}/not-utf8",
        None,
        options={"conditions": ['body contains "ok"']},
        status_code=200,
    ),
    Case(
        "length-longer-than-body",
        "{plain}/lying-length",
        ErrorKind.PROTOCOL,
        "invalid HTTP response",
        status_code=200,
    ),
    # A body that ends when the server closes the connection is valid HTTP/1.1.
    Case("no-content-length", "{plain}/no-length", None, status_code=200),
]


@pytest.fixture(scope="module")
def plain_upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server


@pytest.fixture(scope="module")
def tls_upstream_module() -> Iterator[Upstream]:
    with Upstream(tls=True) as server:
        yield server


@dataclass
class ScheduledRun:
    """What one runner recorded while it polled every case and the ok target."""

    mode: str
    results: dict[str, list[dict[str, Any]]]
    runner_state: RunState
    ok_hits: int
    stop_s: float
    open_connections_after: int


def build_config(plain: Upstream, tls: Upstream, store_path: Path) -> dict[str, Any]:
    """Return the config dict with one target per case and the ok target."""
    bases = {
        "plain": plain.base_url,
        "tls": tls.base_url,
        "closed": f"http://127.0.0.1:{free_port()}",
    }
    targets: list[dict[str, Any]] = []
    for case in CASES:
        options = {
            key: value.format(ca=tls.ca_path) if isinstance(value, str) else value
            for key, value in case.options.items()
        }
        targets.append(
            {
                "name": case.id,
                "url": case.url.format(**bases),
                "interval": INTERVAL_S,
                "timeout": TIMEOUT_S,
                **options,
            }
        )
    targets.append({"name": "ok", "url": plain.url(OK_PATH), "interval": OK_INTERVAL_S})
    return {
        "poller": {"timeout": TIMEOUT_S},
        "store": {"path": str(store_path)},
        "targets": targets,
    }


# Each runner once, and each HTTP transport once: "auto" picks aiohttp when it is installed.
@pytest.fixture(
    scope="module",
    params=[("thread", "httpx"), ("asyncio", "auto")],
    ids=["thread-httpx", "asyncio-auto"],
)
def scheduled_run(
    request: pytest.FixtureRequest,
    plain_upstream: Upstream,
    tls_upstream_module: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> ScheduledRun:
    """Run the real runner of one mode for ``RUN_S`` seconds over every case."""
    mode, http_client = request.param
    store_path = tmp_path_factory.mktemp(f"failures-{mode}") / "bgapi.db"
    data = build_config(plain_upstream, tls_upstream_module, store_path)
    data["poller"]["http_client"] = http_client
    config = config_from_dict(data)
    plain_upstream.clear()
    store = Store(config.store.path, config.store.retention)
    store.open()
    poller = Poller(config, store, mode)
    runner = create_runner(mode, poller)

    async def run() -> float:
        await runner.start()
        await asyncio.sleep(RUN_S)
        stop_started = time.monotonic()
        await runner.stop()
        return time.monotonic() - stop_started

    try:
        stop_s = asyncio.run(run())
        results = {target.name: store.results(target.name, 1000) for target in config.targets}
    finally:
        store.close()
    wait_until(lambda: plain_upstream.open_connections == 0, 2.0)
    return ScheduledRun(
        mode=mode,
        results=results,
        runner_state=runner.state,
        ok_hits=plain_upstream.hits[OK_PATH],
        stop_s=stop_s,
        open_connections_after=plain_upstream.open_connections,
    )


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_case_recorded_with_kind(scheduled_run: ScheduledRun, case: Case) -> None:
    results = scheduled_run.results[case.id]

    assert results, f"{case.id}: no result was stored in {RUN_S} s"
    for result in results:
        expected_kind = None if case.kind is None else str(case.kind)
        assert result["error_kind"] == expected_kind, result
        assert result["ok"] is (case.kind is None), result
        if case.kind is not None:
            assert case.fragment in (result["error"] or ""), result
        assert result["status_code"] == case.status_code, result


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_case_within_deadline(scheduled_run: ScheduledRun, case: Case) -> None:
    bound_ms = (TIMEOUT_S + DEADLINE_SLACK_S) * 1000

    for result in scheduled_run.results[case.id]:
        assert result["elapsed_ms"] <= bound_ms, result


def test_ok_target_polled_on_time(scheduled_run: ScheduledRun) -> None:
    results = scheduled_run.results["ok"]
    expected_runs = RUN_S / OK_INTERVAL_S
    lateness = [result["lateness_ms"] for result in results]

    assert len(results) >= expected_runs - 3, (
        f"{len(results)} runs, expected about {expected_runs:.0f}"
    )
    assert scheduled_run.ok_hits >= expected_runs - 3
    assert all(result["ok"] for result in results)
    assert max(lateness) < MAX_OK_LATENESS_MS, sorted(lateness)


def test_runner_survives_every_case(scheduled_run: ScheduledRun) -> None:
    assert scheduled_run.runner_state is RunState.STOPPED
    # The hanging and dripping polls in flight are cancelled within stop()'s bound.
    assert scheduled_run.stop_s < 2 * TIMEOUT_S + DEADLINE_SLACK_S
    assert scheduled_run.open_connections_after == 0


# Memory --------------------------------------------------------------------------------


def test_huge_body_memory_bounded(plain_upstream: Upstream) -> None:
    config = config_from_dict(
        {
            "poller": {"max_body_bytes": MIB},
            "targets": [{"name": "huge", "url": plain_upstream.url("/huge?mb=300"), "timeout": 5}],
        }
    )
    target = config.targets[0]

    async def poll() -> Any:
        clients = HttpClients(config.poller)
        try:
            return await poll_http(
                clients.for_target(target), target, default_conditions(), max_body_bytes=MIB
            )
        finally:
            await clients.aclose()

    tracemalloc.start()
    try:
        result = asyncio.run(poll())
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert result.error_kind is ErrorKind.TOO_LARGE
    # The body buffer, one copy of it and httpx's chunks: a few MiB, not 300.
    assert peak_bytes < 16 * MIB, f"peak {peak_bytes / MIB:.1f} MiB"


def peak_rss_of_poll_once(config_path: Path) -> int:
    """Run ``bgapi poll-once`` and return its peak resident set size in bytes (Linux)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bgapi", "poll-once", "--config", str(config_path)],
        cwd=config_path.parent,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # wait4() reports this child's own peak RSS; the timer bounds the wait.
    killer = threading.Timer(30.0, process.kill)
    killer.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        killer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024  # Linux reports kibibytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units differ")
def test_huge_body_rss_bounded(plain_upstream: Upstream, tmp_path: Path) -> None:
    def config_for(path: str, name: str) -> Path:
        text = render_config(
            store={"path": tmp_path / f"{name}.db"},
            targets=[{"name": name, "url": plain_upstream.url(path), "timeout": 10}],
        )
        config_path = tmp_path / f"{name}.toml"
        config_path.write_text(text, encoding="utf-8")
        return config_path

    baseline = peak_rss_of_poll_once(config_for(OK_PATH, "small"))
    huge = peak_rss_of_poll_once(config_for("/huge?mb=300", "huge"))

    # Reading the 300 MiB body would add about 300 MiB; the 1 MiB cap adds a few.
    assert huge - baseline < 64 * MIB, (
        f"baseline {baseline / MIB:.0f} MiB, huge {huge / MIB:.0f} MiB"
    )


# Name resolution ------------------------------------------------------------------------


def test_hanging_resolver_bounded_by_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # The resolver here fails fast for .invalid names, so a stuck one is simulated:
    # getaddrinfo blocks in asyncio's executor thread until the test releases it.
    release = threading.Event()

    def stuck_getaddrinfo(*args: Any, **kwargs: Any) -> Any:
        release.wait(10.0)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", stuck_getaddrinfo)
    config = config_from_dict(
        {"targets": [{"name": "slow-dns", "url": "http://slow-dns.invalid/", "timeout": 0.5}]}
    )
    target = config.targets[0]

    async def poll() -> Any:
        clients = HttpClients(config.poller)
        try:
            return await poll_http(
                clients.for_target(target), target, default_conditions(), max_body_bytes=MIB
            )
        finally:
            # asyncio.run() waits for executor threads, so free the stuck one first.
            release.set()
            await clients.aclose()

    started = time.monotonic()
    result = asyncio.run(poll())
    elapsed_s = time.monotonic() - started

    assert result.error_kind is ErrorKind.TIMEOUT
    assert result.elapsed_ms <= (0.5 + DEADLINE_SLACK_S) * 1000
    assert elapsed_s < 0.5 + DEADLINE_SLACK_S + 1.0
