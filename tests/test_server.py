"""The API served by real uvicorn in a thread, with a real runner polling the upstream."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import serve_in_thread, wait_until
from upstream import Upstream

from bgapi.config import Config, config_from_dict
from bgapi.errors import StoreError
from bgapi.server import create_app
from bgapi.store import Store

TARGET_KEYS = {
    "name",
    "url",
    "method",
    "enabled",
    "interval_s",
    "timeout_s",
    "state",
    "last_result",
    "consecutive_successes",
    "consecutive_failures",
    "last_success_at",
    "last_change_at",
    "next_run_at",
    "runs",
    "missed",
}
RESULT_KEYS = {
    "target",
    "ok",
    "status_code",
    "elapsed_ms",
    "error_kind",
    "error",
    "failed_conditions",
    "scheduled_at",
    "started_at",
    "lateness_ms",
}
ENDPOINTS = {
    ("/healthz", "get"),
    ("/api/targets", "get"),
    ("/api/targets/{name}", "get"),
    ("/api/targets/{name}/results", "get"),
    ("/api/targets/{name}/poll", "post"),
    ("/api/poller", "get"),
}
SECRET = "sekret-" + "7a" * 8


def _config(tmp_path: Path, upstream: Upstream, **poller: Any) -> Config:
    return config_from_dict(
        {
            "poller": {"timeout": 2, **poller},
            "store": {"path": str(tmp_path / "api.db")},
            "targets": [
                {"name": "ok", "url": upstream.url("/ok"), "interval": 0.1},
                {"name": "broken", "url": upstream.url("/status/503"), "interval": 0.1},
                {"name": "off", "url": upstream.url("/json"), "enabled": False},
            ],
        }
    )


@contextlib.contextmanager
def _client(config: Config, **app_options: Any) -> Iterator[httpx.Client]:
    app = create_app(config, **app_options)
    with serve_in_thread(app) as base_url, httpx.Client(base_url=base_url, timeout=5.0) as client:
        yield client


def _wait_json(client: httpx.Client, path: str, predicate: Any, timeout_s: float = 5.0) -> Any:
    documents: list[Any] = [None]

    def check() -> bool:
        documents[0] = client.get(path).json()
        return bool(predicate(documents[0]))

    assert wait_until(check, timeout_s, step_s=0.05), f"GET {path} never matched: {documents[0]!r}"
    return documents[0]


def _both_polled(targets: list[dict[str, Any]]) -> bool:
    by_name = {target["name"]: target for target in targets}
    return all(by_name[name]["last_result"] is not None for name in ("ok", "broken"))


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[Upstream]:
    """One upstream for the read-only API tests of this module."""
    with Upstream() as server:
        yield server


@pytest.fixture(scope="module", params=["thread", "asyncio"])
def running(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    shared_upstream: Upstream,
) -> Iterator[httpx.Client]:
    """A served app whose runner has polled both enabled targets a few times.

    One server per mode serves every test that takes this fixture, so those
    tests must not depend on each other's requests.
    """
    config = _config(tmp_path_factory.mktemp(f"api-{request.param}"), shared_upstream)
    with _client(config, mode=request.param) as client:
        client.headers["x-test-mode"] = request.param  # read back by test_poller_stats
        _wait_json(client, "/api/targets", _both_polled)
        _wait_json(client, "/api/poller", lambda poller: poller["runs"] >= 4)
        yield client


def test_healthz_ok(running: httpx.Client) -> None:
    response = running.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "poller": "running", "reason": None}


def test_targets_list(running: httpx.Client) -> None:
    targets = running.get("/api/targets").json()

    assert isinstance(targets, list)
    assert [target["name"] for target in targets] == ["ok", "broken", "off"]
    for target in targets:
        assert TARGET_KEYS <= set(target)
    by_name = {target["name"]: target for target in targets}
    assert by_name["ok"]["state"] == "up"
    assert by_name["broken"]["state"] == "down"
    assert by_name["off"]["state"] == "unknown"
    assert by_name["off"]["last_result"] is None
    assert set(by_name["ok"]["last_result"]) == RESULT_KEYS
    assert by_name["broken"]["last_result"]["error_kind"] == "http_status"
    assert by_name["broken"]["last_result"]["status_code"] == 503


def test_target_detail(running: httpx.Client) -> None:
    response = running.get("/api/targets/ok")
    target = response.json()

    assert response.status_code == 200
    assert TARGET_KEYS <= set(target)
    assert target["state"] == "up"
    assert target["interval_s"] == 0.1
    assert target["timeout_s"] == 2
    assert target["runs"] >= 1
    assert target["consecutive_successes"] >= 1
    assert target["next_run_at"] is not None
    assert target["last_result"]["ok"] is True


def test_results_newest_first(running: httpx.Client) -> None:
    _wait_json(running, "/api/targets/ok", lambda target: target["runs"] >= 3)

    response = running.get("/api/targets/ok/results", params={"limit": 3})
    results = response.json()

    assert response.status_code == 200
    assert len(results) == 3
    for result in results:
        assert set(result) == RESULT_KEYS
        assert result["target"] == "ok"
    started = [result["started_at"] for result in results]
    assert started == sorted(started, reverse=True)
    assert len(running.get("/api/targets/ok/results", params={"limit": 1}).json()) == 1


@pytest.mark.parametrize("limit", [0, -1, 1001, "ten"])
def test_results_limit_bounds(running: httpx.Client, limit: int | str) -> None:
    response = running.get("/api/targets/ok/results", params={"limit": limit})

    assert response.status_code == 422
    assert "limit" in response.text


def test_results_limit_max_allowed(running: httpx.Client) -> None:
    assert running.get("/api/targets/ok/results", params={"limit": 1000}).status_code == 200


def test_poll_now_returns_stored_result(running: httpx.Client) -> None:
    response = running.post("/api/targets/off/poll")
    result = response.json()

    assert response.status_code == 200
    assert set(result) == RESULT_KEYS
    assert result["target"] == "off"
    assert result["ok"] is True
    assert result["status_code"] == 200
    assert result["lateness_ms"] is None
    stored = running.get("/api/targets/off/results").json()
    assert stored[0]["started_at"] == result["started_at"]
    assert running.get("/api/targets/off").json()["state"] == "up"


def test_poller_stats(running: httpx.Client) -> None:
    stats = running.get("/api/poller").json()

    assert stats["mode"] == running.headers["x-test-mode"]
    assert stats["state"] == "running"
    assert stats["runs"] >= 4
    assert stats["missed"] >= 0
    assert stats["targets"] == 2
    assert stats["uptime_s"] > 0
    assert stats["error"] is None
    lateness = stats["lateness_ms"]
    assert {"p50", "p99", "max"} <= set(lateness)
    assert 0 <= lateness["p50"] <= lateness["p99"] <= lateness["max"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/targets/nope"),
        ("GET", "/api/targets/nope/results"),
        ("POST", "/api/targets/nope/poll"),
    ],
)
def test_unknown_target_404(running: httpx.Client, method: str, path: str) -> None:
    response = running.request(method, path)

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": "target 'nope' not found"}


def test_openapi_lists_every_endpoint(running: httpx.Client) -> None:
    schema = running.get("/openapi.json").json()
    docs = running.get("/docs")

    listed = {(path, method) for path, item in schema["paths"].items() for method in item}
    assert ENDPOINTS <= listed
    for path, method in ENDPOINTS:
        assert schema["paths"][path][method].get("description") or schema["paths"][path][
            method
        ].get("summary")
    for model in ("TargetModel", "ResultModel", "PollerModel", "HealthModel"):
        assert model in schema["components"]["schemas"]
    assert "404" in schema["paths"]["/api/targets/{name}"]["get"]["responses"]
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


def test_shown_result_is_in_database(tmp_path: Path, upstream: Upstream) -> None:
    config = _config(tmp_path, upstream)
    checked = 0
    with (
        _client(config, mode="thread") as client,
        contextlib.closing(sqlite3.connect(config.store.path)) as connection,
    ):
        _wait_json(client, "/api/targets", _both_polled)
        deadline = time.monotonic() + 5.0
        while checked < 20 and time.monotonic() < deadline:
            shown = client.get("/api/targets/ok").json()["last_result"]
            rows = connection.execute(
                "SELECT ok, status_code, elapsed_ms FROM results WHERE target = 'ok' ORDER BY id DESC LIMIT 50"
            ).fetchall()
            assert (1, shown["status_code"], shown["elapsed_ms"]) in rows
            checked += 1

    assert checked == 20


def test_secrets_absent_from_responses(tmp_path: Path, upstream: Upstream) -> None:
    config = config_from_dict(
        {
            "store": {"path": str(tmp_path / "secret.db")},
            "targets": [
                {
                    "name": "secret",
                    "url": upstream.url("/status/401") + "?token=${TOKEN}",
                    "headers": {"Authorization": "Bearer ${TOKEN}"},
                    "conditions": ["status == 200", 'body contains "${TOKEN}"'],
                    "interval": 0.1,
                }
            ],
        },
        environ={"TOKEN": SECRET},
    )
    with _client(config, mode="asyncio") as client:
        _wait_json(client, "/api/targets/secret", lambda target: target["last_result"] is not None)
        responses = [
            client.get("/api/targets"),
            client.get("/api/targets/secret"),
            client.get("/api/targets/secret/results"),
            client.post("/api/targets/secret/poll"),
            client.get("/api/poller"),
            client.get("/openapi.json"),
        ]

    for response in responses:
        assert response.status_code == 200
        assert SECRET not in response.text, response.request.url
    target = responses[1].json()
    assert target["url"].endswith("?token=***")
    assert target["state"] == "down"
    assert any("***" in text for text in target["last_result"]["failed_conditions"])
    (request,) = upstream.requests_for("/status/401")[:1]
    assert request.headers["authorization"] == f"Bearer {SECRET}", "the secret is still sent"


@pytest.mark.parametrize("mode", ["thread", "asyncio"])
def test_health_503_when_runner_crashes(
    tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    async def exploding_schedule(*args: Any) -> None:
        raise RuntimeError("schedule exploded")

    module = "bgapi.runners.thread" if mode == "thread" else "bgapi.runners.asyncio_task"
    monkeypatch.setattr(f"{module}.run_schedule", exploding_schedule)

    with _client(_config(tmp_path, upstream), mode=mode) as client:
        assert wait_until(lambda: client.get("/healthz").status_code == 503, 5.0)
        health = client.get("/healthz")
        stats = client.get("/api/poller").json()
        targets = client.get("/api/targets")

    assert health.json()["status"] == "unhealthy"
    assert health.json()["poller"] == "crashed"
    assert "RuntimeError: schedule exploded" in health.json()["reason"]
    assert stats["state"] == "crashed"
    assert "schedule exploded" in stats["error"]
    assert targets.status_code == 200


def test_serve_without_poller(tmp_path: Path, upstream: Upstream) -> None:
    with _client(_config(tmp_path, upstream), poll=False) as client:
        time.sleep(0.3)
        health = client.get("/healthz").json()
        stats = client.get("/api/poller").json()
        polled = client.post("/api/targets/ok/poll").json()
        results = client.get("/api/targets/ok/results").json()

    assert health == {"status": "ok", "poller": "disabled", "reason": None}
    assert stats["mode"] is None
    assert stats["state"] == "disabled"
    assert stats["runs"] == 0
    assert upstream.hits["/ok"] == 1, "only the poll on request"
    assert polled["ok"] is True
    assert [result["started_at"] for result in results] == [polled["started_at"]]


def test_state_survives_restart(tmp_path: Path, upstream: Upstream) -> None:
    config = _config(tmp_path, upstream)
    with _client(config, mode="thread") as client:
        before = _wait_json(client, "/api/targets/broken", lambda target: target["state"] == "down")

    with _client(config, poll=False) as client:
        after = client.get("/api/targets/broken").json()

    assert after["state"] == "down"
    assert after["last_result"] is not None
    assert after["last_result"]["status_code"] == 503
    assert after["last_change_at"] == before["last_change_at"]


def test_import_starts_nothing(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import threading
        import psutil
        before = threading.active_count()
        import bgapi.server, bgapi.cli, bgapi.poller, bgapi.store, bgapi.runners
        import bgapi.runners.thread, bgapi.runners.asyncio_task, bgapi.oneshot
        from bgapi.config import config_from_dict
        app = bgapi.server.create_app(config_from_dict({}))
        print(before, threading.active_count(), len(psutil.Process().net_connections()))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    before, after, sockets = map(int, completed.stdout.split())
    assert after == before
    assert sockets == 0
    assert list(tmp_path.iterdir()) == [], "no bgapi.db or other file created"


def test_unreadable_store_gets_503(
    tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, upstream)
    message = f"cannot read the store {str(config.store.path)!r}: disk I/O error"

    def unreadable(*args: Any, **kwargs: Any) -> Any:
        raise StoreError(message)

    with _client(config, poll=False) as client:
        # The store is a collaborator here: the test checks the API's response.
        monkeypatch.setattr(Store, "states", unreadable)
        monkeypatch.setattr(Store, "results", unreadable)
        responses = [client.get(path) for path in ("/api/targets", "/api/targets/ok", "/api/targets/ok/results")]
        health = client.get("/healthz")

    for response in responses:
        assert response.status_code == 503, response.text
        assert response.json() == {"detail": message}
    assert health.status_code == 200
    assert caplog.text.count(message) == 1
