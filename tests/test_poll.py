"""The poll core against the misbehaving upstream: every failure becomes a result."""

from __future__ import annotations

import asyncio
import base64
import time
import tracemalloc
import urllib.parse
from typing import Any

import pytest
from helpers import free_port
from upstream import Upstream

from bgapi import __version__
from bgapi.conditions import default_conditions, parse_conditions
from bgapi.config import config_from_dict
from bgapi.poll import ErrorKind, HttpClients, PollResult, poll_http

RESULT_KEYS = {
    "target",
    "ok",
    "scheduled_at",
    "started_at",
    "elapsed_ms",
    "status_code",
    "error_kind",
    "error",
    "failed_conditions",
    "lateness_ms",
}


def poll(
    url: str, max_body_bytes: int = 1024 * 1024, http_client: str = "auto", **fields: Any
) -> PollResult:
    """Poll one target built from ``fields`` once, with a fresh client."""
    config = config_from_dict(
        {
            "poller": {"timeout": 5, "http_client": http_client},
            "targets": [{"name": "t", "url": url, **fields}],
        }
    )
    target = config.targets[0]
    conditions = parse_conditions(target.conditions) or default_conditions()

    async def run() -> PollResult:
        clients = HttpClients(config.poller)
        try:
            return await poll_http(
                clients.for_target(target), target, conditions, max_body_bytes=max_body_bytes
            )
        finally:
            await clients.aclose()

    return asyncio.run(run())


def test_ok_route_is_up(upstream: Upstream) -> None:
    result = poll(upstream.url("/ok"))

    assert result.ok
    assert result.status_code == 200
    assert result.error_kind is None
    assert result.error is None
    assert result.failed_conditions == []
    assert result.elapsed_ms > 0
    assert set(result.to_dict()) == RESULT_KEYS


def test_5xx_is_http_status(upstream: Upstream) -> None:
    result = poll(upstream.url("/status/503"))

    assert not result.ok
    assert result.status_code == 503
    assert result.error_kind is ErrorKind.HTTP_STATUS
    assert len(result.failed_conditions) == 1
    assert "503" in result.failed_conditions[0]


def test_status_indicator_condition_flips(upstream: Upstream) -> None:
    conditions = ["status == 200", 'json.status.indicator == "none"']

    up = poll(upstream.url("/status.json"), conditions=conditions)
    upstream.set_status_indicator("major")
    down = poll(upstream.url("/status.json"), conditions=conditions)

    assert up.ok
    assert not down.ok
    assert down.error_kind is ErrorKind.CONDITION
    assert len(down.failed_conditions) == 1
    assert 'json.status.indicator == "none"' in down.failed_conditions[0]
    assert "major" in down.failed_conditions[0]


def test_invalid_json_body(upstream: Upstream) -> None:
    result = poll(upstream.url("/invalid-json"), conditions=["json.oops == 1"])

    assert not result.ok
    assert result.status_code == 200
    assert result.error_kind is ErrorKind.INVALID_JSON


def test_json_condition_on_text_body(upstream: Upstream) -> None:
    result = poll(upstream.url("/ok"), conditions=["json.ok == true"])

    assert not result.ok
    assert result.error_kind is ErrorKind.INVALID_JSON
    assert "json" in (result.error or "").lower()


def test_body_and_header_conditions(upstream: Upstream) -> None:
    result = poll(
        upstream.url("/json"),
        conditions=[
            'body contains "items"',
            'header.content-type contains "json"',
            "json.items[2] == 3",
            "elapsed_ms < 5000",
        ],
    )

    assert result.ok, result.failed_conditions


def test_slow_response_times_out(upstream: Upstream) -> None:
    start = time.monotonic()
    result = poll(upstream.url("/slow?seconds=5"), timeout=0.3)
    elapsed = time.monotonic() - start

    assert not result.ok
    assert result.error_kind is ErrorKind.TIMEOUT
    assert "0.3 s" in (result.error or "")
    assert elapsed < 2.0


def test_hang_times_out(upstream: Upstream) -> None:
    result = poll(upstream.url("/hang"), timeout=0.3)

    assert result.error_kind is ErrorKind.TIMEOUT
    assert result.status_code is None
    assert 250 <= result.elapsed_ms < 2000


def test_drip_hits_total_deadline(upstream: Upstream) -> None:
    # Each byte arrives within any read timeout; only the total deadline ends it.
    result = poll(upstream.url("/drip?seconds=0.1&bytes=100"), timeout=0.5)

    assert result.error_kind is ErrorKind.TIMEOUT
    assert result.status_code == 200
    assert result.elapsed_ms < 2000


def test_huge_body_capped(upstream: Upstream) -> None:
    result = poll(upstream.url("/huge?mb=4"), max_body_bytes=256 * 1024)

    assert not result.ok
    assert result.error_kind is ErrorKind.TOO_LARGE
    assert "262144 bytes" in (result.error or "")


def test_redirect_loop_bounded(upstream: Upstream) -> None:
    result = poll(upstream.url("/redirect-loop"))

    assert result.error_kind is ErrorKind.TOO_MANY_REDIRECTS
    assert upstream.hits["/redirect-loop"] <= 10


def test_redirects_followed(upstream: Upstream) -> None:
    result = poll(upstream.url("/redirect/2"))

    assert result.ok
    assert upstream.hits["/ok"] == 1


def test_redirects_not_followed_when_off(upstream: Upstream) -> None:
    result = poll(upstream.url("/redirect/2"), follow_redirects=False, conditions=["status == 302"])

    assert result.ok
    assert upstream.hits["/ok"] == 0


@pytest.mark.parametrize("stage", ["headers", "body"])
def test_reset_connection(upstream: Upstream, stage: str) -> None:
    result = poll(upstream.url(f"/reset?stage={stage}"))

    assert not result.ok
    assert result.error_kind in (ErrorKind.CONNECT, ErrorKind.PROTOCOL)
    assert result.error


def test_connection_refused() -> None:
    result = poll(f"http://127.0.0.1:{free_port()}/ok")

    assert not result.ok
    assert result.error_kind is ErrorKind.CONNECT
    assert (result.error or "").startswith("connection failed")


def test_lying_length(upstream: Upstream) -> None:
    result = poll(upstream.url("/lying-length"))

    assert not result.ok
    assert result.error_kind in (ErrorKind.PROTOCOL, ErrorKind.CONNECT)


def test_request_method_body_headers(upstream: Upstream) -> None:
    result = poll(
        upstream.url("/echo"),
        method="post",
        headers={"X-Test": "yes"},
        json={"hello": "world"},
    )
    (request,) = upstream.requests_for("/echo")

    assert result.ok
    assert request.method == "POST"
    assert request.headers["x-test"] == "yes"
    assert request.headers["user-agent"] == f"bgapi/{__version__}"
    assert request.json() == {"hello": "world"}


def test_scheduled_at_kept(upstream: Upstream) -> None:
    config = config_from_dict({"targets": [{"name": "t", "url": upstream.url("/ok")}]})
    target = config.targets[0]

    async def run() -> PollResult:
        clients = HttpClients(config.poller)
        try:
            return await poll_http(
                clients.for_target(target),
                target,
                default_conditions(),
                max_body_bytes=1024,
                scheduled_at=1234.5,
            )
        finally:
            await clients.aclose()

    result = asyncio.run(run())

    assert result.scheduled_at == 1234.5
    assert result.to_dict()["scheduled_at"] == "1970-01-01T00:20:34.500+00:00"


def test_tls_untrusted_certificate(tls_upstream: Upstream) -> None:
    result = poll(tls_upstream.url("/ok"))

    assert not result.ok
    assert result.error_kind is ErrorKind.TLS


def test_tls_with_ca_bundle(tls_upstream: Upstream) -> None:
    result = poll(tls_upstream.url("/ok"), ca_bundle=str(tls_upstream.ca_path))

    assert result.ok, result.error


def test_clients_reused_per_tls_setting(upstream: Upstream) -> None:
    config = config_from_dict(
        {
            "targets": [
                {"name": "a", "url": upstream.url("/ok")},
                {"name": "b", "url": upstream.url("/json")},
                {"name": "c", "url": upstream.url("/ok"), "verify": False},
            ]
        }
    )
    clients = HttpClients(config.poller)
    a, b, c = config.targets

    assert clients.for_target(a) is clients.for_target(b)
    assert clients.for_target(a) is not clients.for_target(c)
    assert clients.default() is clients.for_target(a)
    asyncio.run(clients.aclose())


def test_gzip_bomb_stops_at_cap(upstream: Upstream) -> None:
    tracemalloc.start()
    try:
        result = poll(upstream.url("/gzip-bomb?mb=300"), max_body_bytes=1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert result.error_kind is ErrorKind.TOO_LARGE
    # The body inflates to 300 MiB; decoding must stop near the 1 MiB cap.
    assert peak < 32 * 1024 * 1024


def test_deflate_body_decoded(upstream: Upstream) -> None:
    result = poll(upstream.url("/deflate"), conditions=["json.ok == true"])

    assert result.ok, result


def test_redirect_keeps_headers_on_origin(upstream: Upstream) -> None:
    result = poll(upstream.url("/redirect/1"), headers={"X-Api-Key": "k-123456789"})

    assert result.ok, result
    assert upstream.requests_for("/ok")[0].headers["x-api-key"] == "k-123456789"


@pytest.mark.parametrize(
    ("status", "method", "body"),
    [(303, "GET", ""), (302, "GET", ""), (307, "POST", "payload"), (308, "POST", "payload")],
)
def test_redirect_after_post(upstream: Upstream, status: int, method: str, body: str) -> None:
    # 303 (and 301 or 302 after a POST) turn into a GET without a body; 307
    # and 308 repeat the request as it was.
    url = upstream.url(f"/redirect-to?status={status}&url={upstream.url('/echo')}")
    result = poll(url, method="POST", body="payload", headers={"Content-Type": "text/plain"})

    assert result.ok, result
    echoed = upstream.requests_for("/echo")[0]
    assert echoed.method == method
    assert echoed.body.decode() == body
    if not body:
        assert "content-length" not in echoed.headers or echoed.headers["content-length"] == "0"
        assert "content-type" not in echoed.headers


def test_redirect_keeps_host_header_on_origin(upstream: Upstream) -> None:
    # A virtual host behind a redirect on the same origin (a trailing slash
    # added, say) must still be asked for by its name.
    result = poll(upstream.url("/redirect/1"), headers={"Host": "api.example.test"})

    assert result.ok, result
    assert upstream.requests_for("/ok")[0].headers["host"] == "api.example.test"


@pytest.mark.parametrize(
    ("location", "problem"),
    [
        ("mailto:SSL-team@example.org", "unsupported scheme 'mailto'"),
        ("gopher://Name or service not known/", "unsupported scheme 'gopher'"),
        ("http://127.0.0.1:99999/", "port out of range"),
        ("http://xn--a.invalid/", "not a valid URL"),
        ("ftp://x/" + "a" * 5000, "unsupported scheme 'ftp'"),
    ],
)
def test_invalid_redirect_is_protocol_failure(upstream: Upstream, location: str, problem: str) -> None:
    # The upstream's Location must neither pick the error kind (a message
    # with "SSL" in it is not a TLS failure) nor make the stored error huge.
    result = poll(upstream.url("/redirect-raw?" + urllib.parse.urlencode({"location": location})))

    assert result.error_kind is ErrorKind.PROTOCOL, result
    assert result.error is not None
    assert problem in result.error
    assert len(result.error) < 300


@pytest.mark.parametrize("http_client", ["httpx", "aiohttp"])
def test_url_credentials_sent_as_basic_auth(upstream: Upstream, http_client: str) -> None:
    url = upstream.url("/echo").replace("http://", "http://alice:s3cret-pw@")

    result = poll(url, http_client=http_client)

    assert result.ok, result
    expected = "Basic " + base64.b64encode(b"alice:s3cret-pw").decode()
    assert upstream.requests_for("/echo")[0].headers["authorization"] == expected


def test_polls_keep_no_cookies(upstream: Upstream) -> None:
    # A monitor's polls are independent: a cookie set by one response is
    # not sent back, neither along the redirect nor by the next poll.
    config = config_from_dict(
        {"targets": [{"name": "t", "url": upstream.url(f"/redirect-to?cookie=1&url={upstream.url('/echo')}")}]}
    )
    target = config.targets[0]

    async def run() -> None:
        clients = HttpClients(config.poller)
        try:
            for _ in range(2):
                result = await poll_http(
                    clients.for_target(target), target, default_conditions(), max_body_bytes=1 << 20
                )
                assert result.ok, result
        finally:
            await clients.aclose()

    asyncio.run(run())

    echoed = upstream.requests_for("/echo")
    assert len(echoed) == 2
    assert all("cookie" not in request.headers for request in echoed)


def test_request_is_built_once_per_target(upstream: Upstream) -> None:
    config = config_from_dict(
        {"targets": [{"name": "a", "url": upstream.url("/ok")}, {"name": "b", "url": upstream.url("/json")}]}
    )
    a, b = config.targets
    clients = HttpClients(config.poller)
    client = clients.for_target(a)

    assert client.prepared(a) is client.prepared(a)
    assert client.prepared(a) is not client.prepared(b)
    # A target reloaded under the same name gets a new request.
    changed = a.model_copy(update={"url": upstream.url("/json")})
    assert client.prepared(changed).url == upstream.url("/json")
    asyncio.run(clients.aclose())


def test_redirect_drops_headers_across_origins(upstream: Upstream) -> None:
    with Upstream() as other:
        headers = {"X-Api-Key": "k-123456789", "X-Tenant": "acme", "Authorization": "Bearer t"}
        result = poll(upstream.url(f"/redirect-to?url={other.url('/ok')}"), headers=headers)
        received = other.requests_for("/ok")[0].headers

    assert result.ok, result
    assert "x-api-key" not in received
    assert "x-tenant" not in received
    assert "authorization" not in received
