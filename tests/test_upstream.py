"""Check the test upstream server against a plain httpx client and raw sockets."""

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from upstream import STOP_TIMEOUT_S, Upstream

# Every client request gets a deadline, so a server bug fails a test instead of hanging it.
CLIENT_TIMEOUT = httpx.Timeout(5.0)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=CLIENT_TIMEOUT) as http_client:
        yield http_client


def wait_until_no_connections(server: Upstream, timeout_s: float = 2.0) -> bool:
    """Poll ``server.open_connections`` until it is 0 or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.open_connections == 0:
            return True
        time.sleep(0.02)
    return server.open_connections == 0


def send_raw(server: Upstream, data: bytes) -> bytes:
    """Send raw bytes on a new connection and return everything until the server closes."""
    received = b""
    with socket.create_connection((server.host, server.port), timeout=5.0) as sock:
        sock.sendall(data)
        for _ in range(1000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


# Plain routes ----------------------------------------------------------------------


def test_ok_route(upstream: Upstream, client: httpx.Client) -> None:
    response = client.get(upstream.url("/ok"))

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "ok"


def test_json_route(upstream: Upstream, client: httpx.Client) -> None:
    response = client.get(upstream.url("/json"))

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"ok": True, "items": [1, 2, 3]}


def test_status_json_follows_indicator(upstream: Upstream, client: httpx.Client) -> None:
    first = client.get(upstream.url("/status.json")).json()
    upstream.set_status_indicator("major")
    during = client.get(upstream.url("/status.json")).json()
    upstream.set_status_indicator("none")
    after = client.get(upstream.url("/status.json")).json()

    assert first["status"] == {"indicator": "none", "description": "All Systems Operational"}
    assert during["status"] == {"indicator": "major", "description": "Partial System Outage"}
    assert after["status"]["indicator"] == "none"
    assert first["page"]["url"] == upstream.base_url
    assert set(first["page"]) >= {"id", "name", "url", "updated_at"}


def test_status_indicator_custom_description(upstream: Upstream, client: httpx.Client) -> None:
    upstream.set_status_indicator("weird", description="Something odd")

    status = client.get(upstream.url("/status.json")).json()["status"]

    assert status == {"indicator": "weird", "description": "Something odd"}


@pytest.mark.parametrize("status", [200, 404, 418, 500, 503, 599])
def test_status_code_route(upstream: Upstream, client: httpx.Client, status: int) -> None:
    response = client.get(upstream.url(f"/status/{status}"))

    assert response.status_code == status
    assert response.text == f"status {status}\n"


def test_status_204_has_no_body(upstream: Upstream, client: httpx.Client) -> None:
    response = client.get(upstream.url("/status/204"))

    assert response.status_code == 204
    assert response.content == b""
    assert "content-length" not in response.headers
    assert client.get(upstream.url("/ok")).text == "ok"


def test_status_code_out_of_range(upstream: Upstream, client: httpx.Client) -> None:
    response = client.get(upstream.url("/status/100"))

    assert response.status_code == 400
    assert "between 200 and 599" in response.text


def test_unknown_path_is_404(upstream: Upstream, client: httpx.Client) -> None:
    response = client.get(upstream.url("/no/such/path"))

    assert response.status_code == 404
    assert "/no/such/path" in response.text


def test_query_is_ignored_for_routing(upstream: Upstream, client: httpx.Client) -> None:
    response = client.get(upstream.url("/ok?x=1&y=2"))

    assert response.text == "ok"
    assert upstream.hits["/ok"] == 1
    assert upstream.requests[-1].query == "x=1&y=2"


def test_head_request_has_no_body(upstream: Upstream, client: httpx.Client) -> None:
    head = client.head(upstream.url("/json"))
    get = client.get(upstream.url("/ok"))

    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(b'{"ok": true, "items": [1, 2, 3]}'))
    assert get.text == "ok"
    assert upstream.requests[0].connection_id == upstream.requests[1].connection_id


# Slow and stalled responses --------------------------------------------------------


def test_slow_route_waits(upstream: Upstream, client: httpx.Client) -> None:
    started = time.monotonic()
    response = client.get(upstream.url("/slow?seconds=0.3"))
    elapsed = time.monotonic() - started

    assert response.text == "slow"
    assert elapsed >= 0.3


def test_slow_route_triggers_read_timeout(upstream: Upstream) -> None:
    with (
        httpx.Client(timeout=httpx.Timeout(5.0, read=0.1)) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.get(upstream.url("/slow?seconds=1"))


def test_delay_parameter_on_any_route(upstream: Upstream, client: httpx.Client) -> None:
    started = time.monotonic()
    response = client.get(upstream.url("/json?delay=0.2"))

    assert response.json()["ok"] is True
    assert time.monotonic() - started >= 0.2


def test_invalid_query_parameter_is_400(upstream: Upstream, client: httpx.Client) -> None:
    response = client.get(upstream.url("/slow?seconds=soon"))

    assert response.status_code == 400
    assert "'seconds' must be a number" in response.text
    assert client.get(upstream.url("/ok")).text == "ok"


def test_hang_never_responds(upstream: Upstream) -> None:
    with (
        httpx.Client(timeout=httpx.Timeout(5.0, read=0.2)) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.get(upstream.url("/hang"))

    assert upstream.hits["/hang"] == 1
    assert wait_until_no_connections(upstream)


def test_drip_defeats_read_timeout(upstream: Upstream) -> None:
    # One byte every 0.1 s never lets a 0.5 s read timeout fire, so only the
    # client's own total deadline ends the response.
    received = b""
    deadline = time.monotonic() + 1.0
    with (
        httpx.Client(timeout=httpx.Timeout(5.0, read=0.5)) as client,
        client.stream("GET", upstream.url("/drip?seconds=0.1&bytes=1000")) as response,
    ):
        assert response.headers["content-length"] == "1000"
        for chunk in response.iter_raw():
            received += chunk
            if time.monotonic() > deadline:
                break

    assert 5 <= len(received) < 1000
    assert set(received) == {ord(".")}
    assert wait_until_no_connections(upstream)


def test_drip_default_interval(upstream: Upstream) -> None:
    with (
        httpx.Client(timeout=CLIENT_TIMEOUT) as client,
        client.stream("GET", upstream.url("/drip")) as response,
    ):
        iterator = response.iter_raw()
        first = next(iterator)
        started = time.monotonic()
        second = next(iterator)
        gap = time.monotonic() - started

    assert first == b"."
    assert second == b"."
    assert 0.3 <= gap <= 1.5


# Broken responses ------------------------------------------------------------------


def test_invalid_json_route(upstream: Upstream, client: httpx.Client) -> None:
    response = client.get(upstream.url("/invalid-json"))

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_reset_during_headers(upstream: Upstream, client: httpx.Client) -> None:
    with pytest.raises(httpx.ReadError, match="reset"):
        client.get(upstream.url("/reset"))


def test_reset_during_body(upstream: Upstream, client: httpx.Client) -> None:
    with client.stream("GET", upstream.url("/reset?stage=body")) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.ReadError, match="reset"):
            response.read()


def test_reset_invalid_stage(upstream: Upstream, client: httpx.Client) -> None:
    response = client.get(upstream.url("/reset?stage=later"))

    assert response.status_code == 400


def test_lying_length_is_protocol_error(upstream: Upstream, client: httpx.Client) -> None:
    with pytest.raises(httpx.RemoteProtocolError, match="received 10 bytes, expected 100"):
        client.get(upstream.url("/lying-length"))


def test_no_length_reads_until_close(upstream: Upstream, client: httpx.Client) -> None:
    response = client.get(upstream.url("/no-length"))

    assert response.status_code == 200
    assert "content-length" not in response.headers
    assert response.headers["connection"] == "close"
    assert response.text == "body without length\n"


def test_not_utf8_bytes(upstream: Upstream, client: httpx.Client) -> None:
    response = client.get(upstream.url("/not-utf8"))

    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.content == b"\xff\xfe ok \xc3\x28"
    assert "\ufffd" in response.text


def test_huge_small_body_is_complete(upstream: Upstream, client: httpx.Client) -> None:
    response = client.get(upstream.url("/huge?mb=1.5"))

    assert response.headers["content-length"] == str(1536 * 1024)
    assert len(response.content) == 1536 * 1024


def test_huge_stops_when_client_leaves(upstream: Upstream) -> None:
    received = 0
    with (
        httpx.Client(timeout=CLIENT_TIMEOUT) as client,
        client.stream("GET", upstream.url("/huge")) as response,
    ):
        assert response.headers["content-length"] == str(300 * 1024 * 1024)
        for chunk in response.iter_raw():
            received += len(chunk)
            if received >= 2 * 1024 * 1024:
                break

    assert received >= 2 * 1024 * 1024
    assert wait_until_no_connections(upstream)
    assert upstream.errors == []


# Redirects -------------------------------------------------------------------------


def test_redirect_loop(upstream: Upstream) -> None:
    with (
        httpx.Client(timeout=CLIENT_TIMEOUT, follow_redirects=True, max_redirects=5) as client,
        pytest.raises(httpx.TooManyRedirects),
    ):
        client.get(upstream.url("/redirect-loop"))

    assert upstream.hits["/redirect-loop"] == 6


def test_redirect_loop_location(upstream: Upstream, client: httpx.Client) -> None:
    response = client.get(upstream.url("/redirect-loop"))

    assert response.status_code == 302
    assert response.headers["location"] == "/redirect-loop"


def test_redirect_chain_ends_at_ok(upstream: Upstream) -> None:
    with httpx.Client(timeout=CLIENT_TIMEOUT, follow_redirects=True) as client:
        response = client.get(upstream.url("/redirect/3"))

    assert response.text == "ok"
    assert [r.headers["location"] for r in response.history] == [
        "/redirect/2",
        "/redirect/1",
        "/ok",
    ]


def test_redirect_chain_rejects_zero(upstream: Upstream, client: httpx.Client) -> None:
    response = client.get(upstream.url("/redirect/0"))

    assert response.status_code == 400


# Echo and webhooks -----------------------------------------------------------------


def test_echo_returns_request(upstream: Upstream, client: httpx.Client) -> None:
    response = client.post(
        upstream.url("/echo?a=1"), json={"event": "down"}, headers={"X-Token": "abc"}
    )

    echo = response.json()
    assert echo["method"] == "POST"
    assert echo["path"] == "/echo"
    assert echo["query"] == "a=1"
    assert echo["headers"]["x-token"] == "abc"
    assert echo["headers"]["content-type"] == "application/json"
    assert json.loads(echo["body"]) == {"event": "down"}


def test_echo_chunked_request_body(upstream: Upstream, client: httpx.Client) -> None:
    response = client.post(upstream.url("/echo"), content=iter([b"ab", b"cd", b"ef"]))

    echo = response.json()
    assert echo["headers"]["transfer-encoding"] == "chunked"
    assert echo["body"] == "abcdef"


def test_webhook_records_request(upstream: Upstream, client: httpx.Client) -> None:
    before = time.monotonic()
    response = client.post(upstream.url("/webhook"), json={"target": "api", "ok": False})

    assert response.status_code == 200
    assert response.json() == {"received": True}
    [recorded] = upstream.requests_for("/webhook")
    assert recorded.method == "POST"
    assert recorded.json() == {"target": "api", "ok": False}
    assert recorded.headers["content-type"] == "application/json"
    assert before <= recorded.received_at <= time.monotonic()


def test_webhook_fail_always_500(upstream: Upstream, client: httpx.Client) -> None:
    statuses = [client.post(upstream.url("/webhook/fail"), json={}).status_code for _ in range(3)]

    assert statuses == [500, 500, 500]


def test_webhook_flaky_recovers(upstream: Upstream, client: httpx.Client) -> None:
    url = upstream.url("/webhook/flaky?fail=2")
    statuses = [client.post(url, json={}).status_code for _ in range(4)]

    assert statuses == [500, 500, 200, 200]


# Recording -------------------------------------------------------------------------


def test_hits_are_counted(upstream: Upstream, client: httpx.Client) -> None:
    for _ in range(3):
        client.get(upstream.url("/ok"))
    client.get(upstream.url("/json"))

    assert upstream.hits["/ok"] == 3
    assert upstream.hits["/json"] == 1
    assert upstream.wait_for_hits("/ok", 3, timeout=0.1)


def test_wait_for_hits_times_out(upstream: Upstream) -> None:
    started = time.monotonic()

    assert not upstream.wait_for_hits("/ok", 1, timeout=0.1)
    assert time.monotonic() - started < 1.0


def test_wait_for_hits_wakes_on_request(upstream: Upstream, client: httpx.Client) -> None:
    timer = threading.Timer(0.1, lambda: client.get(upstream.url("/ok")))
    timer.start()
    try:
        assert upstream.wait_for_hits("/ok", 1, timeout=5.0)
    finally:
        timer.join(5.0)


def test_clear_forgets_requests(upstream: Upstream, client: httpx.Client) -> None:
    client.get(upstream.url("/ok"))
    upstream.clear()

    assert upstream.hits == {}
    assert upstream.requests == []


def test_malformed_request_line_is_400(upstream: Upstream) -> None:
    response = send_raw(upstream, b"NONSENSE\r\n\r\n")

    assert response.startswith(b"HTTP/1.1 400 ")
    assert b"invalid request line" in response


def test_oversized_head_is_431(upstream: Upstream) -> None:
    request = b"GET /ok HTTP/1.1\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n"

    response = send_raw(upstream, request)

    assert response.startswith(b"HTTP/1.1 431 ")


def test_http10_closes_after_response(upstream: Upstream) -> None:
    response = send_raw(upstream, b"GET /ok HTTP/1.0\r\n\r\n")

    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close\r\n" in response
    assert response.endswith(b"\r\n\r\nok")


def test_pipelined_requests_on_one_connection(upstream: Upstream) -> None:
    requests = b"GET /ok HTTP/1.1\r\n\r\nGET /json HTTP/1.1\r\nConnection: close\r\n\r\n"

    response = send_raw(upstream, requests)

    assert response.count(b"HTTP/1.1 200 OK") == 2
    assert response.endswith(b'{"ok": true, "items": [1, 2, 3]}')


# Connections and lifecycle ---------------------------------------------------------


def test_keep_alive_reuses_connection(upstream: Upstream, client: httpx.Client) -> None:
    statuses = [client.get(upstream.url("/ok")).status_code for _ in range(100)]

    assert statuses == [200] * 100
    assert {request.connection_id for request in upstream.requests} == {1}


def test_connection_close_is_honoured(upstream: Upstream, client: httpx.Client) -> None:
    first = client.get(upstream.url("/ok"), headers={"Connection": "close"})
    client.get(upstream.url("/ok"))

    assert first.headers["connection"] == "close"
    first_id, second_id = (request.connection_id for request in upstream.requests)
    assert first_id != second_id


def test_concurrent_connections(upstream: Upstream) -> None:
    count = 50

    async def fetch_all() -> list[int]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=limits) as client:
            responses = await asyncio.gather(
                *(client.get(upstream.url("/slow?seconds=0.5")) for _ in range(count))
            )
        return [response.status_code for response in responses]

    started = time.monotonic()
    statuses = asyncio.run(fetch_all())
    elapsed = time.monotonic() - started

    assert statuses == [200] * count
    # Served one after another, the requests would take 25 s.
    assert elapsed < 3.0
    assert len({request.connection_id for request in upstream.requests}) == count


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_stop_with_requests_in_flight(tls: bool) -> None:
    server = Upstream(tls=tls).start()
    verify = server.client_ssl_context() if tls else True
    client_errors: list[Exception] = []

    def request_in_thread(path: str) -> None:
        with httpx.Client(timeout=httpx.Timeout(10.0), verify=verify) as client:
            try:
                client.get(server.url(path))
            except httpx.HTTPError as error:
                client_errors.append(error)

    threads = [
        threading.Thread(target=request_in_thread, args=(path,), daemon=True)
        for path in ("/hang", "/drip", "/slow?seconds=30")
    ]
    try:
        for thread in threads:
            thread.start()
        assert server.wait_for_hits("/hang", 1, timeout=5.0)
        assert server.wait_for_hits("/drip", 1, timeout=5.0)
        assert server.wait_for_hits("/slow", 1, timeout=5.0)
    finally:
        started = time.monotonic()
        server.stop()
        stop_duration = time.monotonic() - started
        for thread in threads:
            thread.join(5.0)

    assert stop_duration < STOP_TIMEOUT_S
    assert not any(thread.is_alive() for thread in threads)
    assert len(client_errors) == 3
    assert server.errors == []


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_stop_with_idle_connections(tls: bool) -> None:
    # Over TLS, the silent clients keep asyncio waiting for their handshakes.
    server = Upstream(tls=tls).start()
    sockets = [socket.create_connection((server.host, server.port), timeout=5.0) for _ in range(3)]
    try:
        time.sleep(0.1)
        started = time.monotonic()
        server.stop()
        stop_duration = time.monotonic() - started
    finally:
        for sock in sockets:
            sock.close()

    assert stop_duration < STOP_TIMEOUT_S
    assert server.errors == []


def test_stop_is_idempotent() -> None:
    server = Upstream().start()
    server.stop()
    server.stop()

    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url("/ok"), timeout=CLIENT_TIMEOUT)


def test_start_twice_raises(upstream: Upstream) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        upstream.start()


def test_url_requires_leading_slash(upstream: Upstream) -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        upstream.url("ok")


def test_url_before_start_raises() -> None:
    with pytest.raises(RuntimeError, match="call start"):
        Upstream().url("/ok")


# TLS -------------------------------------------------------------------------------


def test_tls_rejects_unknown_ca(tls_upstream: Upstream) -> None:
    with (
        httpx.Client(timeout=CLIENT_TIMEOUT) as client,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.get(tls_upstream.url("/ok"))


def test_tls_accepts_its_ca(tls_upstream: Upstream) -> None:
    assert tls_upstream.base_url.startswith("https://127.0.0.1:")
    assert tls_upstream.ca_path.read_text().startswith("-----BEGIN CERTIFICATE-----")

    verify = tls_upstream.client_ssl_context()
    with httpx.Client(timeout=CLIENT_TIMEOUT, verify=verify) as client:
        responses = [client.get(tls_upstream.url("/json")) for _ in range(3)]

    assert [response.json()["ok"] for response in responses] == [True, True, True]
    assert {request.connection_id for request in tls_upstream.requests} == {1}


def test_tls_broken_routes(tls_upstream: Upstream) -> None:
    verify = tls_upstream.client_ssl_context()
    with httpx.Client(timeout=CLIENT_TIMEOUT, verify=verify) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(tls_upstream.url("/lying-length"))
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            client.get(tls_upstream.url("/reset"))
        no_length = client.get(tls_upstream.url("/no-length"))

    assert no_length.text == "body without length\n"


def test_ca_path_requires_tls(upstream: Upstream) -> None:
    with pytest.raises(RuntimeError, match="tls=True"):
        _ = upstream.ca_path


def test_ca_file_removed_on_stop() -> None:
    server = Upstream(tls=True).start()
    ca_path = server.ca_path
    server.stop()

    assert not ca_path.exists()
