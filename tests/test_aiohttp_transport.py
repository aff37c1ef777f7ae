"""The aiohttp transport classifies every upstream failure as httpx's own transport does."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from upstream import Upstream

from bgapi.aiohttp_transport import AiohttpTransport
from bgapi.conditions import default_conditions
from bgapi.config import config_from_dict
from bgapi.errors import ConfigError
from bgapi.poll import ErrorKind, HttpClients, PollResult, poll_http

# Routes whose error kind must not depend on the transport.
SAME_KIND_ROUTES = [
    "/ok",
    "/status/503",
    "/reset?stage=headers",
    "/reset?stage=body",
    "/lying-length",
    "/no-length",
    "/redirect-loop",
    "/huge?mb=2",
    "/hang",
]


def poll_with(http_client: str, url: str) -> tuple[str, PollResult]:
    """Poll ``url`` once with the given ``[poller] http_client``; return the transport's name too."""
    config = config_from_dict(
        {
            "poller": {"timeout": 1, "http_client": http_client, "max_body_bytes": 100_000},
            "targets": [{"name": "t", "url": url}],
        }
    )
    target = config.targets[0]

    async def run() -> tuple[str, PollResult]:
        clients = HttpClients(config.poller)
        try:
            client = clients.for_target(target)
            result = await poll_http(client, target, default_conditions(), max_body_bytes=100_000)
            return type(client._transport).__name__, result
        finally:
            await clients.aclose()

    return asyncio.run(run())


def test_auto_picks_aiohttp(upstream: Upstream) -> None:
    transport, result = poll_with("auto", upstream.url("/ok"))
    assert transport == "AiohttpTransport"
    assert result.ok


def test_httpx_setting_keeps_httpx_transport(upstream: Upstream) -> None:
    transport, result = poll_with("httpx", upstream.url("/ok"))
    assert transport == "AsyncHTTPTransport"
    assert result.ok


@pytest.mark.parametrize("route", SAME_KIND_ROUTES)
def test_error_kind_matches_httpx(upstream: Upstream, route: str) -> None:
    _, with_httpx = poll_with("httpx", upstream.url(route))
    _, with_aiohttp = poll_with("aiohttp", upstream.url(route))
    assert with_aiohttp.error_kind == with_httpx.error_kind
    assert with_aiohttp.status_code == with_httpx.status_code


def test_refused_connection_is_connect() -> None:
    _, result = poll_with("aiohttp", "http://127.0.0.1:1/")
    assert result.error_kind is ErrorKind.CONNECT
    assert "refused" in (result.error or "").lower()


def test_invalid_http_client_is_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"poller": {"http_client": "requests"}})
    assert "poller.http_client" in str(caught.value)


def test_transport_reuses_connections(upstream: Upstream) -> None:
    async def run() -> int:
        transport = AiohttpTransport(limits=httpx.Limits(max_connections=4))
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(20):
                response = await client.get(upstream.url("/ok"))
                assert response.text == "ok"
            connector = transport._get_session().connector
            assert connector is not None
            # Sequential requests leave exactly one idle keep-alive connection.
            return sum(len(idle) for idle in connector._conns.values())

    assert asyncio.run(run()) == 1
