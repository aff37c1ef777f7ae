"""Actions fired by a real poller: ``on`` rules, log lines and webhooks to a local receiver."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from helpers import free_port
from upstream import RecordedRequest, Upstream

from bgapi import actions
from bgapi.config import Config, config_from_dict
from bgapi.poller import LoopResources, Poller

RESULT_KEYS = {"ok", "status_code", "elapsed_ms", "error_kind", "error", "failed_conditions"}


def _config(upstream: Upstream, *action_tables: dict[str, Any], **target: Any) -> Config:
    fields = {
        "name": "status",
        "url": upstream.url("/status.json"),
        "conditions": ['json.status.indicator == "none"'],
        "actions": list(action_tables),
        **target,
    }
    return config_from_dict({"targets": [fields]})


@asynccontextmanager
async def _poller(config: Config) -> AsyncIterator[tuple[Poller, LoopResources]]:
    resources = LoopResources(config)
    try:
        yield Poller(config), resources
    finally:
        await resources.aclose()


async def _poll(
    poller: Poller, resources: LoopResources, indicator: str, upstream: Upstream
) -> None:
    upstream.set_status_indicator(indicator)
    target = poller.config.targets[0]
    await poller.check(target, resources)


async def _wait_for_hits(upstream: Upstream, path: str, count: int, timeout_s: float = 5.0) -> bool:
    # The webhook tasks run on this loop, so wait in a thread and let them run.
    return await asyncio.to_thread(upstream.wait_for_hits, path, count, timeout_s)


def _payloads(requests: list[RecordedRequest]) -> list[dict[str, Any]]:
    return [request.json() for request in requests]


def _run_sequence(
    upstream: Upstream, config: Config, indicators: str, settle_s: float = 0.3
) -> None:
    """Poll once per indicator ('+' none, '-' major), then let actions finish."""

    async def run() -> None:
        async with _poller(config) as (poller, resources):
            for char in indicators:
                await _poll(poller, resources, "none" if char == "+" else "major", upstream)
                await asyncio.sleep(0.02)
            await asyncio.sleep(settle_s)

    asyncio.run(run())


def test_webhook_on_change(upstream: Upstream) -> None:
    config = _config(upstream, {"type": "webhook", "url": upstream.url("/webhook")})

    _run_sequence(upstream, config, "++-+")
    payloads = _payloads(upstream.requests_for("/webhook"))

    # unknown -> up fires nothing; up -> down and down -> up fire once each.
    assert [(p["state"], p["previous_state"]) for p in payloads] == [("down", "up"), ("up", "down")]
    down = payloads[0]
    assert down["target"] == "status"
    assert RESULT_KEYS <= set(down["result"])
    assert down["result"]["ok"] is False
    assert down["result"]["error_kind"] == "condition"
    assert down["result"]["failed_conditions"]
    assert payloads[1]["result"]["ok"] is True
    assert upstream.requests_for("/webhook")[0].headers["content-type"] == "application/json"


def test_unknown_to_down_fires_down_actions(upstream: Upstream) -> None:
    config = _config(
        upstream,
        {"type": "webhook", "url": upstream.url("/webhook"), "on": "down"},
    )

    _run_sequence(upstream, config, "-")
    payloads = _payloads(upstream.requests_for("/webhook"))

    assert [(p["state"], p["previous_state"]) for p in payloads] == [("down", "unknown")]


def test_unknown_to_up_fires_nothing(upstream: Upstream) -> None:
    config = _config(
        upstream,
        {"type": "webhook", "url": upstream.url("/webhook"), "on": "change"},
        {"type": "webhook", "url": upstream.url("/webhook"), "on": "up"},
    )

    _run_sequence(upstream, config, "+++", settle_s=0.1)

    assert upstream.hits["/webhook"] == 0


def test_on_up_fires_on_recovery_only(upstream: Upstream) -> None:
    config = _config(upstream, {"type": "webhook", "url": upstream.url("/webhook"), "on": "up"})

    _run_sequence(upstream, config, "+-++-+")
    payloads = _payloads(upstream.requests_for("/webhook"))

    assert [(p["state"], p["previous_state"]) for p in payloads] == [("up", "down"), ("up", "down")]


def test_on_always_fires_every_result(upstream: Upstream) -> None:
    config = _config(upstream, {"type": "webhook", "url": upstream.url("/webhook"), "on": "always"})

    _run_sequence(upstream, config, "++-")
    payloads = _payloads(upstream.requests_for("/webhook"))

    assert len(payloads) == 3
    assert [p["state"] for p in sorted(payloads, key=lambda p: p["sent_at"])] == [
        "up",
        "up",
        "down",
    ]


def test_thresholds_delay_actions(upstream: Upstream) -> None:
    config = _config(
        upstream,
        {"type": "webhook", "url": upstream.url("/webhook")},
        failure_threshold=2,
    )

    _run_sequence(upstream, config, "+-+--")
    payloads = _payloads(upstream.requests_for("/webhook"))

    assert [(p["state"], p["previous_state"]) for p in payloads] == [("down", "up")]


def test_log_action_line(upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    config = _config(upstream, {"type": "log"})

    with caplog.at_level(logging.INFO, logger="bgapi.actions"):
        _run_sequence(upstream, config, "+-+", settle_s=0.05)
    lines = [r for r in caplog.records if r.name == "bgapi.actions"]

    assert len(lines) == 2
    assert lines[0].levelno == logging.WARNING
    assert lines[0].getMessage().startswith("target status is down (was up)")
    assert "HTTP 200" in lines[0].getMessage()
    assert lines[1].levelno == logging.INFO
    assert lines[1].getMessage().startswith("target status is up (was down)")


def test_webhook_retries_then_delivers(
    upstream: Upstream, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(actions, "WEBHOOK_BACKOFF_S", 0.01)
    config = _config(
        upstream,
        {
            "type": "webhook",
            "url": upstream.url("/webhook/flaky?fail=2"),
            "retries": 3,
            "on": "always",
        },
    )

    async def run() -> None:
        async with _poller(config) as (poller, resources):
            await _poll(poller, resources, "none", upstream)
            assert await _wait_for_hits(upstream, "/webhook/flaky", 3)
            await asyncio.sleep(0.1)

    with caplog.at_level(logging.DEBUG, logger="bgapi.actions"):
        asyncio.run(run())
    messages = [r.getMessage() for r in caplog.records if r.name == "bgapi.actions"]

    assert upstream.hits["/webhook/flaky"] == 3
    assert sum("attempt 1 of 4" in m for m in messages) == 1
    assert sum("attempt 2 of 4" in m for m in messages) == 1
    assert any("delivered on attempt 3" in m for m in messages)
    assert not any("giving up" in m for m in messages)
    bodies = _payloads(upstream.requests_for("/webhook/flaky"))
    assert bodies[0]["target"] == bodies[2]["target"] == "status"


def test_failing_webhook_logged_and_poller_continues(
    upstream: Upstream, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(actions, "WEBHOOK_BACKOFF_S", 0.01)
    config = _config(
        upstream,
        {"type": "webhook", "url": upstream.url("/webhook/fail"), "retries": 1},
        {"type": "webhook", "url": upstream.url("/webhook")},
    )

    async def run() -> Poller:
        async with _poller(config) as (poller, resources):
            await _poll(poller, resources, "none", upstream)
            await _poll(poller, resources, "major", upstream)
            assert await _wait_for_hits(upstream, "/webhook/fail", 2)
            await asyncio.sleep(0.1)
            await _poll(poller, resources, "none", upstream)
            assert await _wait_for_hits(upstream, "/webhook", 2)
            return poller

    with caplog.at_level(logging.WARNING):
        poller = asyncio.run(run())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]

    status = poller.status("status")
    assert status is not None
    assert str(status.state) == "up"
    assert upstream.hits["/webhook/fail"] == 4
    assert any(
        "webhook for target status failed (HTTP 500) after 2 attempts; giving up" in r.getMessage()
        for r in errors
    )


def test_webhook_connection_refused_logged(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(
        upstream,
        {
            "type": "webhook",
            "url": f"http://127.0.0.1:{free_port()}/hook",
            "retries": 0,
            "on": "always",
        },
    )

    with caplog.at_level(logging.ERROR, logger="bgapi.actions"):
        _run_sequence(upstream, config, "+", settle_s=0.3)

    messages = [r.getMessage() for r in caplog.records]
    assert any("ConnectError" in m and "after 1 attempts; giving up" in m for m in messages), (
        messages
    )


def test_webhook_timeout_logged(upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    config = _config(
        upstream,
        {
            "type": "webhook",
            "url": upstream.url("/hang"),
            "retries": 0,
            "timeout": 0.2,
            "on": "always",
        },
    )

    with caplog.at_level(logging.ERROR, logger="bgapi.actions"):
        _run_sequence(upstream, config, "+", settle_s=0.4)

    messages = [r.getMessage() for r in caplog.records]
    assert any("no answer within 0.2 s" in m for m in messages), messages


def test_action_exception_logged_with_traceback(
    upstream: Upstream, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_action(*args: Any, **kwargs: Any) -> None:
        raise ValueError("action bug")

    monkeypatch.setattr("bgapi.poller.run_action", broken_action)
    config = _config(upstream, {"type": "log", "on": "always"})

    with caplog.at_level(logging.ERROR, logger="bgapi.poller"):
        _run_sequence(upstream, config, "++", settle_s=0.05)

    failures = [r for r in caplog.records if "log action of target status failed" in r.getMessage()]
    assert len(failures) == 2
    assert failures[0].exc_info is not None
    assert failures[0].exc_info[0] is ValueError


def test_webhook_payload_has_no_secret(upstream: Upstream) -> None:
    secret = "tok-" + "9" * 16
    config = config_from_dict(
        {
            "targets": [
                {
                    "name": "secret",
                    "url": upstream.url("/status/500") + "?token=${TOKEN}",
                    "actions": [
                        {"type": "webhook", "url": upstream.url("/webhook"), "on": "always"}
                    ],
                }
            ]
        },
        environ={"TOKEN": secret},
    )

    async def run() -> None:
        async with _poller(config) as (poller, resources):
            await poller.check(config.targets[0], resources)
            assert await _wait_for_hits(upstream, "/webhook", 1)

    asyncio.run(run())

    (request,) = upstream.requests_for("/webhook")
    assert secret not in request.body.decode()
    assert request.json()["state"] == "down"
