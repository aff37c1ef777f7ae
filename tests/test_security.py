"""Security: the bearer token on write endpoints, secret masking, webhook signatures, input checks.

The API tests run the real app in uvicorn on 127.0.0.1. The non-loopback
rule is tested by telling the app it listens on 0.0.0.0 (as
``run_server`` does for ``--host 0.0.0.0``) while it binds 127.0.0.1, so
that no test opens a port on a public interface.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import free_port, render_config, run_bgapi, serve_in_thread
from upstream import Upstream

from bgapi import security
from bgapi.config import Config, config_from_dict
from bgapi.errors import ConfigError
from bgapi.logs import RedactingFilter
from bgapi.poller import LoopResources, Poller
from bgapi.security import (
    WriteGuard,
    check_browser_headers,
    is_loopback,
    sign_body,
    token_matches,
    verify_signature,
)
from bgapi.server import create_app

TOKEN = "test-token-" + "7" * 24
HEADER_SECRET = "hdr-secret-" + "5" * 16
URL_SECRET = "url-secret-" + "3" * 16
BODY_SECRET = "body-secret-" + "1" * 16
WEBHOOK_SECRET = "whsec-" + "8" * 24
ALL_SECRETS = (TOKEN, HEADER_SECRET, URL_SECRET, BODY_SECRET, WEBHOOK_SECRET)
ENVIRON = {
    "BGAPI_TOKEN": TOKEN,
    "HEADER_SECRET": HEADER_SECRET,
    "URL_SECRET": URL_SECRET,
    "BODY_SECRET": BODY_SECRET,
    "WEBHOOK_SECRET": WEBHOOK_SECRET,
}


def api_config(tmp_path: Path, upstream: Upstream, environ: dict[str, str] | None = None) -> Config:
    return config_from_dict(
        {
            "store": {"path": str(tmp_path / "bgapi.db")},
            "targets": [{"name": "api", "url": upstream.url("/ok")}],
        },
        environ=environ or {},
    )


def serve(config: Config, listen_host: str | None = None) -> Any:
    app = create_app(config, poll=False)
    if listen_host is not None:
        app.state.listen_host = listen_host
    return serve_in_thread(app)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as http_client:
        yield http_client


# Bearer token ----------------------------------------------------------------------------


def test_post_without_token_rejected(
    tmp_path: Path, upstream: Upstream, client: httpx.Client
) -> None:
    with serve(api_config(tmp_path, upstream, {"BGAPI_TOKEN": TOKEN})) as base_url:
        response = client.post(f"{base_url}/api/targets/api/poll")

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "missing bearer token" in response.json()["detail"]
    assert "BGAPI_TOKEN" in response.json()["detail"]
    assert upstream.hits["/ok"] == 0


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        TOKEN,
        "Bearer",
        f"Bearer  {TOKEN} extra",
    ],
)
def test_post_with_wrong_token_rejected(
    tmp_path: Path, upstream: Upstream, client: httpx.Client, authorization: str
) -> None:
    with serve(api_config(tmp_path, upstream, {"BGAPI_TOKEN": TOKEN})) as base_url:
        response = client.post(
            f"{base_url}/api/targets/api/poll", headers={"Authorization": authorization}
        )

    assert response.status_code == 401
    assert "invalid_token" in response.headers["www-authenticate"]
    assert TOKEN not in response.text
    assert upstream.hits["/ok"] == 0


def test_post_with_non_ascii_token_rejected(
    tmp_path: Path, upstream: Upstream, client: httpx.Client
) -> None:
    # hmac.compare_digest raises TypeError for non-ASCII str; bytes must be compared.
    with serve(api_config(tmp_path, upstream, {"BGAPI_TOKEN": TOKEN})) as base_url:
        response = client.post(
            f"{base_url}/api/targets/api/poll",
            headers=[(b"Authorization", "Bearer tökén".encode("latin-1"))],
        )

    assert response.status_code == 401


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_post_with_token_accepted(
    tmp_path: Path, upstream: Upstream, client: httpx.Client, scheme: str
) -> None:
    with serve(api_config(tmp_path, upstream, {"BGAPI_TOKEN": TOKEN})) as base_url:
        response = client.post(
            f"{base_url}/api/targets/api/poll", headers={"Authorization": f"{scheme} {TOKEN}"}
        )

    assert response.status_code == 200, response.text
    assert response.json()["ok"] is True
    assert upstream.hits["/ok"] == 1


def test_get_needs_no_token(tmp_path: Path, upstream: Upstream, client: httpx.Client) -> None:
    with serve(api_config(tmp_path, upstream, {"BGAPI_TOKEN": TOKEN})) as base_url:
        for path in ("/healthz", "/api/targets", "/api/targets/api", "/api/poller"):
            assert client.get(base_url + path).status_code == 200, path


def test_custom_token_env(tmp_path: Path, upstream: Upstream, client: httpx.Client) -> None:
    config = config_from_dict(
        {
            "server": {"token_env": "MY_API_TOKEN"},
            "store": {"path": str(tmp_path / "bgapi.db")},
            "targets": [{"name": "api", "url": upstream.url("/ok")}],
        },
        environ={"MY_API_TOKEN": TOKEN, "BGAPI_TOKEN": "not-this-one"},
    )
    with serve(config) as base_url:
        rejected = client.post(
            f"{base_url}/api/targets/api/poll", headers={"Authorization": "Bearer not-this-one"}
        )
        accepted = client.post(
            f"{base_url}/api/targets/api/poll", headers={"Authorization": f"Bearer {TOKEN}"}
        )

    assert config.server.token == TOKEN
    assert rejected.status_code == 401
    assert "MY_API_TOKEN" in rejected.json()["detail"]
    assert accepted.status_code == 200


def test_empty_token_counts_as_unset() -> None:
    config = config_from_dict({}, environ={"BGAPI_TOKEN": ""})

    assert config.server.token is None


def test_invalid_token_env_is_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"server": {"token_env": "MY-TOKEN"}}, environ={})

    assert "server.token_env" in str(caught.value)
    assert "'MY-TOKEN'" in str(caught.value)


def test_token_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(left: bytes, right: bytes) -> bool:
        calls.append((left, right))
        return original(left, right)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)

    assert token_matches(TOKEN, f"Bearer {TOKEN}") is True
    assert token_matches(TOKEN, "Bearer wrong") is False
    assert calls == [(TOKEN.encode(), TOKEN.encode()), (b"wrong", TOKEN.encode())]


# Loopback rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("api.localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.10", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_non_loopback_without_token_refuses_writes(
    tmp_path: Path, upstream: Upstream, client: httpx.Client
) -> None:
    with serve(api_config(tmp_path, upstream), listen_host="0.0.0.0") as base_url:
        write = client.post(f"{base_url}/api/targets/api/poll")
        read = client.get(f"{base_url}/api/targets/api")

    assert write.status_code == 403
    detail = write.json()["detail"]
    assert "0.0.0.0" in detail
    assert "not a loopback address" in detail
    assert "BGAPI_TOKEN" in detail
    assert read.status_code == 200
    assert upstream.hits["/ok"] == 0


def test_non_loopback_with_token_accepts_writes(
    tmp_path: Path, upstream: Upstream, client: httpx.Client
) -> None:
    config = api_config(tmp_path, upstream, {"BGAPI_TOKEN": TOKEN})
    with serve(config, listen_host="0.0.0.0") as base_url:
        response = client.post(
            f"{base_url}/api/targets/api/poll", headers={"Authorization": f"Bearer {TOKEN}"}
        )

    assert response.status_code == 200


def test_loopback_without_token_accepts_writes(
    tmp_path: Path, upstream: Upstream, client: httpx.Client
) -> None:
    with serve(api_config(tmp_path, upstream)) as base_url:
        response = client.post(f"{base_url}/api/targets/api/poll")

    assert response.status_code == 200


def test_guard_checks_connection_address() -> None:
    # An app run by another server (no listen_host) on a public interface.
    guard = WriteGuard(None, "BGAPI_TOKEN")

    denial = guard.check("POST", None, None, "192.0.2.10")

    assert denial is not None
    assert denial.status_code == 403
    assert guard.check("GET", None, None, "192.0.2.10") is None
    assert guard.check("POST", None, None, "127.0.0.1") is None


def test_startup_message_non_loopback(
    tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="bgapi.server"),
        serve(api_config(tmp_path, upstream), listen_host="0.0.0.0"),
    ):
        pass

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("0.0.0.0" in m and "403" in m and "BGAPI_TOKEN" in m for m in warnings), warnings


def test_startup_message_from_cli(upstream: Upstream, tmp_path: Path) -> None:
    config = tmp_path / "token.toml"
    config.write_text(
        render_config(
            store={"path": tmp_path / "bgapi.db"},
            targets=[{"name": "api", "url": upstream.url("/ok")}],
        ),
        encoding="utf-8",
    )

    with run_bgapi(config, command="serve", env={"BGAPI_TOKEN": TOKEN}) as running:
        output = running.output()
    with run_bgapi(config, command="serve") as running:
        output_without = running.output()

    assert "write endpoints (POST) require the bearer token from BGAPI_TOKEN" in output
    assert "accept requests without a token" in output_without
    assert "127.0.0.1" in output_without


def test_openapi_documents_bearer_on_writes(
    tmp_path: Path, upstream: Upstream, client: httpx.Client
) -> None:
    with serve(api_config(tmp_path, upstream)) as base_url:
        schema = client.get(f"{base_url}/openapi.json").json()

    poll = schema["paths"]["/api/targets/{name}/poll"]["post"]
    targets = schema["paths"]["/api/targets"]["get"]
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert poll["security"] == [{"bearerAuth": []}]
    assert {"401", "403"} <= set(poll["responses"])
    assert "security" not in targets


# Masking ---------------------------------------------------------------------------------


def secret_config_dict(upstream: Upstream, store_path: Path, closed_port: int) -> dict[str, Any]:
    return {
        "store": {"path": str(store_path)},
        "targets": [
            {
                "name": "headers",
                "url": upstream.url("/status/500"),
                "headers": {
                    "Authorization": "Bearer ${HEADER_SECRET}",
                    "X-Api-Key": "plain-key-123",
                    "X-Trace": "trace-${URL_SECRET}",
                },
                "json": {"query": "${BODY_SECRET}"},
                "method": "POST",
                "actions": [
                    {
                        "type": "webhook",
                        "url": upstream.url("/webhook/fail"),
                        "secret": "${WEBHOOK_SECRET}",
                        "retries": 0,
                        "on": "always",
                    }
                ],
            },
            {
                "name": "url",
                "url": f"http://127.0.0.1:{closed_port}/?key=${{URL_SECRET}}",
                "interval": 0.5,
            },
            {
                "name": "condition",
                "url": upstream.url("/ok"),
                "conditions": ['body contains "${BODY_SECRET}"'],
                "interval": 0.5,
            },
        ],
    }


def test_repr_masks_secrets(upstream: Upstream, tmp_path: Path) -> None:
    config = config_from_dict(
        secret_config_dict(upstream, tmp_path / "bgapi.db", free_port()), environ=ENVIRON
    )
    texts = [
        repr(config),
        str(config),
        *map(repr, config.targets),
        repr(config.targets[0].actions[0]),
    ]
    texts.append(repr(WriteGuard(config.server.token, config.server.token_env)))

    for text in texts:
        for secret in ALL_SECRETS:
            assert secret not in text
    assert "plain-key-123" not in repr(config.targets[0])
    assert "***" in repr(config.targets[0])


def test_config_error_masks_secret() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(
            {"targets": [{"name": "a", "url": "http://x/", "interval": "${URL_SECRET}"}]},
            environ=ENVIRON,
        )

    message = str(caught.value)
    assert "targets[0]" in message
    assert URL_SECRET not in message
    assert "***" in message


def test_literal_webhook_secret_masked() -> None:
    config = config_from_dict(
        {
            "targets": [
                {
                    "name": "a",
                    "url": "http://127.0.0.1/",
                    "actions": [
                        {
                            "type": "webhook",
                            "url": "http://127.0.0.1/h",
                            "secret": "literal-whsec-1",
                        }
                    ],
                }
            ]
        },
        environ={},
    )

    assert "literal-whsec-1" not in repr(config)
    assert config.redact("sent literal-whsec-1") == "sent ***"


def test_logs_and_api_mask_secrets(upstream: Upstream, tmp_path: Path) -> None:
    config_dict = secret_config_dict(upstream, tmp_path / "bgapi.db", free_port())
    config_dict["targets"][0]["interval"] = 0.3
    config_path = tmp_path / "secrets.toml"
    config_path.write_text(render_config(**config_dict), encoding="utf-8")

    with run_bgapi(config_path, "--log-level", "debug", env=ENVIRON) as running:
        running.wait_for(lambda targets: all(t["runs"] >= 1 for t in targets), "/api/targets")
        assert upstream.wait_for_hits("/webhook/fail", 1, 5.0)
        bodies = [
            running.get(path).text
            for path in (
                "/api/targets",
                "/api/targets/url",
                "/api/targets/condition",
                "/api/targets/url/results",
                "/api/targets/condition/results",
                "/api/poller",
                "/healthz",
                "/openapi.json",
            )
        ]
        polled = running.client.post(
            "/api/targets/condition/poll", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        time.sleep(0.2)  # let the failed webhook's log line be written
        outcome = running.stop(signal.SIGTERM)

    condition = json.loads(bodies[2])["last_result"]
    assert polled.status_code == 200
    assert "***" in json.loads(bodies[1])["url"]
    assert "***" in condition["error"]
    assert "webhook for target headers failed" in outcome.output
    for text in [*bodies, polled.text, outcome.output]:
        for secret in ALL_SECRETS:
            assert secret not in text


def test_poll_once_json_masks_secrets(upstream: Upstream, tmp_path: Path) -> None:
    config_dict = secret_config_dict(upstream, tmp_path / "bgapi.db", free_port())
    config_path = tmp_path / "secrets.toml"
    config_path.write_text(render_config(**config_dict), encoding="utf-8")

    from helpers import run_cli

    completed = run_cli("poll-once", "--config", config_path, "--json", cwd=tmp_path, env=ENVIRON)

    assert completed.returncode == 1
    assert "***" in completed.stdout
    for secret in ALL_SECRETS:
        assert secret not in completed.stdout
        assert secret not in completed.stderr


def test_log_traceback_masked() -> None:
    records: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = ListHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RedactingFilter(lambda text: text.replace(URL_SECRET, "***")))
    logger = logging.getLogger("test_security.traceback")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError(f"bad URL http://host/?key={URL_SECRET}")
        except ValueError:
            logger.exception("poll of target %s failed", "url")
    finally:
        logger.removeHandler(handler)

    (line,) = records
    assert "poll of target url failed" in line
    assert "ValueError: bad URL http://host/?key=***" in line
    assert URL_SECRET not in line


# Webhook signatures ----------------------------------------------------------------------


def run_webhook(upstream: Upstream, path: str, action: dict[str, Any], expected_hits: int) -> None:
    config = config_from_dict(
        {
            "targets": [
                {
                    "name": "signed",
                    "url": upstream.url("/status/500"),
                    "actions": [
                        {"type": "webhook", "url": upstream.url(path), "on": "always", **action}
                    ],
                }
            ]
        },
        environ=ENVIRON,
    )

    async def run() -> None:
        resources = LoopResources(config)
        try:
            await Poller(config).check(config.targets[0], resources)
            await asyncio.to_thread(upstream.wait_for_hits, path, expected_hits, 10.0)
        finally:
            await resources.aclose()

    asyncio.run(run())


def expected_signature(secret: str, timestamp: str, body: bytes) -> str:
    """Compute the signature as the README documents it for receivers."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def test_webhook_signed(upstream: Upstream) -> None:
    run_webhook(upstream, "/webhook", {"secret": "${WEBHOOK_SECRET}"}, 1)

    (request,) = upstream.requests_for("/webhook")
    timestamp = request.headers["x-bgapi-timestamp"]
    signature = request.headers["x-bgapi-signature"]
    assert abs(int(timestamp) - time.time()) < 60
    assert signature == expected_signature(WEBHOOK_SECRET, timestamp, request.body)
    assert verify_signature(WEBHOOK_SECRET, request.body, timestamp, signature)
    assert request.json()["target"] == "signed"
    assert request.headers["content-type"] == "application/json"
    assert WEBHOOK_SECRET not in request.body.decode()


def test_webhook_retries_signed_each(upstream: Upstream) -> None:
    run_webhook(upstream, "/webhook/flaky", {"secret": "${WEBHOOK_SECRET}", "retries": 2}, 2)

    requests = upstream.requests_for("/webhook/flaky")
    assert len(requests) == 2
    for request in requests:
        timestamp = request.headers["x-bgapi-timestamp"]
        assert request.headers["x-bgapi-signature"] == expected_signature(
            WEBHOOK_SECRET, timestamp, request.body
        )


def test_webhook_without_secret_unsigned(upstream: Upstream) -> None:
    run_webhook(upstream, "/webhook", {}, 1)

    (request,) = upstream.requests_for("/webhook")
    assert "x-bgapi-signature" not in request.headers
    assert "x-bgapi-timestamp" not in request.headers


def test_verify_signature_rejects_tampering() -> None:
    body = b'{"target":"a","state":"down"}'
    now = 1_700_000_000
    signature = sign_body(WEBHOOK_SECRET, body, now)

    assert verify_signature(WEBHOOK_SECRET, body, str(now), signature, now=now)
    assert not verify_signature(WEBHOOK_SECRET, body + b" ", str(now), signature, now=now)
    assert not verify_signature("other-secret", body, str(now), signature, now=now)
    assert not verify_signature(WEBHOOK_SECRET, body, str(now + 1), signature, now=now)
    assert not verify_signature(WEBHOOK_SECRET, body, str(now), signature, now=now + 301)
    assert not verify_signature(WEBHOOK_SECRET, body, "not-a-number", signature, now=now)
    assert not verify_signature(WEBHOOK_SECRET, body, None, signature, now=now)
    assert not verify_signature(WEBHOOK_SECRET, body, str(now), None, now=now)


# Input validation ------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "abc", "1.5", ""])
def test_results_limit_out_of_bounds(
    tmp_path: Path, upstream: Upstream, client: httpx.Client, limit: str
) -> None:
    with serve(api_config(tmp_path, upstream)) as base_url:
        response = client.get(f"{base_url}/api/targets/api/results", params={"limit": limit})

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", "limit"]


@pytest.mark.parametrize("limit", ["1", "1000"])
def test_results_limit_in_bounds(
    tmp_path: Path, upstream: Upstream, client: httpx.Client, limit: str
) -> None:
    with serve(api_config(tmp_path, upstream)) as base_url:
        response = client.get(f"{base_url}/api/targets/api/results", params={"limit": limit})

    assert response.status_code == 200
    assert response.json() == []


@pytest.mark.parametrize(
    "name", ["-leading-dash", "a" * 101, "with space", "ümlaut", "semi;colon", "'quote"]
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_invalid_target_name_rejected(
    tmp_path: Path, upstream: Upstream, client: httpx.Client, name: str, method: str
) -> None:
    suffix = "/poll" if method == "POST" else ""
    with serve(api_config(tmp_path, upstream)) as base_url:
        response = client.request(method, f"{base_url}/api/targets/{name}{suffix}")

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["path", "name"]
    assert upstream.hits["/ok"] == 0


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_target_is_404(
    tmp_path: Path, upstream: Upstream, client: httpx.Client, method: str
) -> None:
    suffix = "/poll" if method == "POST" else ""
    with serve(api_config(tmp_path, upstream)) as base_url:
        response = client.request(method, f"{base_url}/api/targets/no-such-target{suffix}")

    assert response.status_code == 404
    assert response.json() == {"detail": "target 'no-such-target' not found"}


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [
        ("GET", {"host": "evil.example"}, 421),
        ("GET", {"host": "proxy.example:443"}, None),
        ("GET", {"host": "localhost:8000"}, None),
        ("POST", {"host": "127.0.0.1", "origin": "https://evil.example"}, 403),
        ("POST", {"host": "127.0.0.1", "origin": "http://127.0.0.1:8000"}, None),
        ("POST", {"host": "127.0.0.1"}, None),
    ],
)
def test_browser_headers_on_loopback(
    method: str, headers: dict[str, str], status: int | None
) -> None:
    denial = check_browser_headers(
        method,
        headers.get("host"),
        headers.get("origin"),
        "127.0.0.1",
        "127.0.0.1",
        token_configured=False,
        allowed_hosts=frozenset({"proxy.example"}),
    )

    assert (denial.status_code if denial else None) == status


def test_browser_headers_ignored_with_token() -> None:
    denial = check_browser_headers(
        "POST", "evil.example", "https://evil.example", "127.0.0.1", "127.0.0.1",
        token_configured=True,
    )

    assert denial is None
