"""Access control for the API's write endpoints and HMAC signatures for webhooks.

Write endpoints are those with a method other than GET, HEAD and OPTIONS.
The rules, from :class:`WriteGuard`:

- a token is configured (the environment variable named by ``[server]
  token_env``, ``BGAPI_TOKEN`` by default): a write needs the header
  ``Authorization: Bearer <token>``, else 401;
- no token, and the API listens on a loopback address: writes are allowed,
  because only local processes can connect;
- no token, and the API listens on any other address: writes get 403.

Webhooks with a ``secret`` carry ``X-Bgapi-Timestamp`` (Unix seconds) and
``X-Bgapi-Signature: sha256=<hex>``, the HMAC-SHA256 of
``timestamp + "." + body`` keyed with the secret.
"""

# No `from __future__ import annotations`: FastAPI reads the annotation of
# WriteGuard.dependency()'s inner function at runtime, and it names a local import.

import hashlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "Denial",
    "WriteGuard",
    "describe_write_access",
    "install_openapi_security",
    "is_loopback",
    "sign_body",
    "signature_headers",
    "token_matches",
    "verify_signature",
]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SIGNATURE_HEADER = "X-Bgapi-Signature"
TIMESTAMP_HEADER = "X-Bgapi-Timestamp"
SIGNATURE_PREFIX = "sha256="
# Receivers should reject signatures older or newer than this, to stop replays.
DEFAULT_SIGNATURE_TOLERANCE_S = 300
BEARER_SCHEME_NAME = "bearerAuth"


def is_loopback(host: str) -> bool:
    """Tell whether ``host`` is a loopback address or the name ``localhost``.

    Any other name counts as non-loopback, because it may resolve to a public
    address. ``0.0.0.0`` and ``::`` (every interface) are not loopback.
    """
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def token_matches(expected: str, authorization: str | None) -> bool:
    """Check an ``Authorization`` header against ``expected`` in constant time.

    The comparison runs on UTF-8 bytes, because ``hmac.compare_digest``
    rejects ``str`` arguments with non-ASCII characters.
    """
    if not authorization:
        return False
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode(), expected.encode())


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a write request is rejected: the HTTP status, the message and extra headers."""

    status_code: int
    detail: str
    headers: dict[str, str] = field(default_factory=dict)


class WriteGuard:
    """The write rules of this module, and the FastAPI dependency that applies them.

    Install :meth:`dependency` on the app (``FastAPI(dependencies=[...])``) so
    that every route, including routes added later, is covered. Safe methods
    pass without a check.

    Args:
        token: The bearer token, or None when none is configured.
        token_env: The environment variable that contains the token, for messages.
    """

    def __init__(
        self, token: str | None, token_env: str, allowed_hosts: list[str] | None = None
    ) -> None:
        self._token = token or None
        self._token_env = token_env
        self._allowed_hosts = frozenset(host.lower() for host in allowed_hosts or [])

    def __repr__(self) -> str:
        configured = "configured" if self._token else "not configured"
        return f"WriteGuard(token={configured}, token_env={self._token_env!r})"

    def check(
        self,
        method: str,
        authorization: str | None,
        listen_host: str | None,
        local_host: str | None,
    ) -> Denial | None:
        """Return why a request must be rejected, or None when it may proceed.

        Args:
            method: The request's HTTP method.
            authorization: The ``Authorization`` header, if any.
            listen_host: The address the server is configured to bind, if known.
            local_host: The local address of the request's connection, if known.
        """
        if method.upper() in SAFE_METHODS:
            return None
        if self._token is not None:
            return self._check_token(authorization)
        for host in (listen_host, local_host):
            if host and not is_loopback(host):
                return Denial(
                    403,
                    f"write endpoints are disabled: the API listens on {host}, which is not a "
                    f"loopback address, and no token is configured; set the {self._token_env} "
                    "environment variable to a secret token and send it as "
                    "'Authorization: Bearer <token>'",
                )
        return None

    def _check_token(self, authorization: str | None) -> Denial | None:
        assert self._token is not None
        if not authorization:
            return Denial(
                401,
                f"missing bearer token; send 'Authorization: Bearer <token>' with the token "
                f"from {self._token_env}",
                {"WWW-Authenticate": "Bearer"},
            )
        if not token_matches(self._token, authorization):
            return Denial(
                401,
                f"invalid bearer token; send 'Authorization: Bearer <token>' with the token "
                f"from {self._token_env}",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return None

    def dependency(self) -> Callable[..., Awaitable[None]]:
        """Return a FastAPI dependency that raises ``HTTPException`` for a rejected request.

        The listening address comes from ``app.state.listen_host``, which
        :func:`bgapi.server.run_server` sets; the connection's own local
        address is checked too, which covers apps that another server runs.
        """
        # Imported here so that the poller, which signs webhooks with this
        # module, does not load FastAPI.
        from fastapi import HTTPException, Request

        async def require_write_access(request: Request) -> None:
            server = request.scope.get("server")
            listen_host = getattr(request.app.state, "listen_host", None)
            local_host = str(server[0]) if server and server[0] else None
            denial = check_browser_headers(
                request.method,
                request.headers.get("host"),
                request.headers.get("origin"),
                listen_host,
                local_host,
                token_configured=self._token is not None,
                allowed_hosts=self._allowed_hosts,
            ) or self.check(
                request.method, request.headers.get("authorization"), listen_host, local_host
            )
            if denial is not None:
                raise HTTPException(
                    denial.status_code, denial.detail, headers=denial.headers or None
                )

        return require_write_access


def check_browser_headers(
    method: str,
    host_header: str | None,
    origin: str | None,
    listen_host: str | None,
    local_host: str | None,
    *,
    token_configured: bool,
    allowed_hosts: frozenset[str] = frozenset(),
) -> Denial | None:
    """Reject what a web page in the user's browser could send to a loopback API.

    A page on another site can make the browser POST to 127.0.0.1 (a
    cross-site request, which carries an ``Origin`` header), and through DNS
    rebinding it can even read the answers (the ``Host`` header then names
    the attacker's domain). Neither matters once a token is required, or when
    the API does not listen on loopback.
    """
    on_loopback = all(is_loopback(host) for host in (listen_host, local_host) if host)
    if token_configured or not on_loopback:
        return None
    host_name = _host_name(host_header or "")
    if host_name and not is_loopback(host_name) and host_name.lower() not in allowed_hosts:
        return Denial(
            421,
            f"this API listens on a loopback address and answers only to loopback host "
            f"names, not {host_name!r}; use http://127.0.0.1 or http://localhost, or add "
            "the name to [server] allowed_hosts (other names are rejected to block DNS "
            "rebinding)",
        )
    if method.upper() not in SAFE_METHODS and origin and origin != "null":
        origin_host = _host_name(origin.split("://", 1)[-1])
        if not is_loopback(origin_host) and origin_host.lower() not in allowed_hosts:
            return Denial(
                403,
                f"cross-site write request from {origin!r} rejected; without a token, write "
                "endpoints accept requests from this machine only",
            )
    return None


def _host_name(authority: str) -> str:
    """Return the host of ``host[:port]`` or ``[v6]:port``, without the port."""
    authority = authority.split("/", 1)[0]
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def describe_write_access(host: str, token: str | None, token_env: str) -> tuple[int, str]:
    """Return the log level and the startup message that describe who may write.

    Args:
        host: The address the API listens on.
        token: The configured bearer token, or None.
        token_env: The environment variable that contains the token.
    """
    if token:
        return logging.INFO, f"write endpoints (POST) require the bearer token from {token_env}"
    if is_loopback(host):
        return logging.INFO, (
            f"write endpoints (POST) accept requests without a token because the API listens "
            f"on the loopback address {host}; set {token_env} to require one"
        )
    return logging.WARNING, (
        f"the API listens on {host}, which is not a loopback address, and {token_env} is not "
        f"set: write endpoints (POST) reject every request with 403; set {token_env} to a "
        "secret token to enable them"
    )


def install_openapi_security(app: "FastAPI") -> None:
    """Document the bearer scheme and the 401 and 403 responses of every write operation.

    FastAPI builds the OpenAPI document lazily; this wraps that step, so it
    covers the routes that exist when the document is first requested.
    """
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        _add_bearer_security(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_bearer_security(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})[BEARER_SCHEME_NAME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "The token from the environment variable named by [server] token_env "
        "(BGAPI_TOKEN by default). Needed only by write endpoints.",
    }
    error_ref = {"$ref": "#/components/schemas/ErrorModel"}
    has_error_model = "ErrorModel" in components.get("schemas", {})
    for path_item in schema.get("paths", {}).values():
        for method, operation in path_item.items():
            if method.upper() in SAFE_METHODS or not isinstance(operation, dict):
                continue
            operation.setdefault("security", [{BEARER_SCHEME_NAME: []}])
            responses = operation.setdefault("responses", {})
            for code, description in (
                ("401", "The bearer token is missing or invalid."),
                ("403", "No token is configured and the API listens on a non-loopback address."),
            ):
                answer: dict[str, Any] = {"description": description}
                if has_error_model:
                    answer["content"] = {"application/json": {"schema": error_ref}}
                responses.setdefault(code, answer)


def sign_body(secret: str, body: bytes, timestamp: int) -> str:
    """Return ``sha256=<hex>``: the HMAC-SHA256 of ``"<timestamp>." + body`` keyed with ``secret``."""
    message = str(timestamp).encode() + b"." + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def signature_headers(secret: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """Return the timestamp and signature headers for a webhook ``body``.

    Args:
        secret: The webhook's shared secret.
        body: The exact bytes sent as the request body.
        timestamp: Unix time in whole seconds; now when None.
    """
    when = int(time.time()) if timestamp is None else timestamp
    return {TIMESTAMP_HEADER: str(when), SIGNATURE_HEADER: sign_body(secret, body, when)}


def verify_signature(
    secret: str,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    tolerance_s: float = DEFAULT_SIGNATURE_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Check a webhook's signature headers as a receiver should.

    Returns False for a missing or malformed header, a timestamp further than
    ``tolerance_s`` seconds from ``now``, or a signature that does not match.
    """
    if not timestamp or not signature:
        return False
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - sent_at) > tolerance_s:
        return False
    expected = sign_body(secret, body, sent_at)
    return hmac.compare_digest(expected.encode(), signature.strip().encode())
