"""The poll itself: one HTTP request to a target, turned into a :class:`PollResult`.

This module has no notion of schedules, state or storage, so every
strategy (thread, asyncio task, APScheduler) runs exactly this code. Every
failure an upstream can cause becomes a result with an :class:`ErrorKind`;
only bugs propagate as exceptions.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import os
import socket
import ssl
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any

import httpx

from bgapi import __version__
from bgapi.conditions import Condition, ResponseView, evaluate
from bgapi.config import SENSITIVE_HEADERS, PollerConfig, TargetConfig

__all__ = ["ErrorKind", "HttpClients", "PollClient", "PollResult", "format_timestamp", "poll_http"]

USER_AGENT = f"bgapi/{__version__}"
# Connecting may take at most this long even when the target allows a longer
# total deadline, because the rest of the deadline is meant for the response.
MAX_CONNECT_TIMEOUT_S = 10.0
READ_CHUNK_BYTES = 64 * 1024
# Only codings that _BoundedDecoder can undo within max_body_bytes.
ACCEPT_ENCODING = "gzip, deflate"


class ErrorKind(enum.StrEnum):
    """Why a poll failed: the stable, machine-readable part of a failure."""

    TIMEOUT = "timeout"
    CONNECT = "connect"
    DNS = "dns"
    TLS = "tls"
    PROTOCOL = "protocol"
    TOO_LARGE = "too_large"
    INVALID_JSON = "invalid_json"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    HTTP_STATUS = "http_status"
    CONDITION = "condition"
    INTERNAL = "internal"


@dataclass(slots=True)
class PollResult:
    """The outcome of one poll of one target.

    Times are Unix timestamps in seconds; ``lateness_ms`` is how long after its
    scheduled slot the poll started (None for polls run on request).
    """

    target: str
    ok: bool
    scheduled_at: float
    started_at: float
    elapsed_ms: float
    status_code: int | None = None
    error_kind: ErrorKind | None = None
    error: str | None = None
    failed_conditions: list[str] = field(default_factory=list)
    lateness_ms: float | None = None

    @classmethod
    def starting(cls, target: str, scheduled_at: float | None) -> PollResult:
        """Return a failed result that starts now; the caller fills in the outcome.

        ``scheduled_at`` of None (a poll on request) means the start time.
        """
        started_at = time.time()
        return cls(
            target=target,
            ok=False,
            scheduled_at=started_at if scheduled_at is None else scheduled_at,
            started_at=started_at,
            elapsed_ms=0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-ready data with ISO 8601 UTC times."""
        data = asdict(self)
        data["scheduled_at"] = format_timestamp(self.scheduled_at)
        data["started_at"] = format_timestamp(self.started_at)
        data["error_kind"] = str(self.error_kind) if self.error_kind else None
        return data


def format_timestamp(timestamp: float) -> str:
    """Format a Unix timestamp as ISO 8601 UTC with milliseconds."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


class HttpClients:
    """The ``httpx.AsyncClient`` instances of one event loop, one per TLS setting.

    A client keeps connections bound to the loop that created it, so each
    runner creates its own, reuses it for every poll and closes it on shutdown.
    """

    def __init__(self, poller: PollerConfig) -> None:
        self._poller = poller
        self._clients: dict[tuple[bool, str | None], PollClient] = {}

    def for_target(self, target: TargetConfig) -> PollClient:
        """Return the client for the target's TLS settings, creating it on first use."""
        ca_bundle = str(target.ca_bundle) if target.ca_bundle else None
        key = (target.verify, ca_bundle)
        client = self._clients.get(key)
        if client is None:
            client = self._create(target.verify, target.ca_bundle)
            self._clients[key] = client
        return client

    def default(self) -> PollClient:
        """Return the client with TLS verification on and the system CA store."""
        key = (True, None)
        if key not in self._clients:
            self._clients[key] = self._create(True, None)
        return self._clients[key]

    def _create(self, verify: bool, ca_bundle: Path | None) -> PollClient:
        tls: bool | ssl.SSLContext = verify
        if verify and ca_bundle is not None:
            tls = ssl.create_default_context(cafile=str(ca_bundle))
        limits = httpx.Limits(
            max_connections=self._poller.max_concurrency,
            max_keepalive_connections=self._poller.max_concurrency,
        )
        return PollClient(
            verify=tls,
            limits=limits,
            transport=_transport(self._poller.http_client, tls, limits),
            max_redirects=self._poller.max_redirects,
            headers={"user-agent": USER_AGENT},
            # Every request passes its own timeout; this only guards misuse.
            timeout=httpx.Timeout(self._poller.timeout),
        )

    async def aclose(self) -> None:
        """Close every client and its connections."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


class PollClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that sends polls straight to its transport.

    Most of the CPU time of ``AsyncClient.send`` goes to work that a poll does
    not need: building the same request again, merging headers and cookies,
    redirect and auth hooks. :func:`poll_http` therefore builds each target's
    request once (:meth:`prepared`) and hands it to the transport, which
    more than halves the client's CPU time per poll (``benchmarks/poll_layers.py``).
    httpx ignores proxy variables of the environment when given a transport,
    so sending to it directly skips nothing. The client keeps no cookies:
    every poll starts clean, as a monitor's should.
    """

    def __init__(self, *, transport: httpx.AsyncBaseTransport, **kwargs: Any) -> None:
        no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
        super().__init__(transport=transport, cookies=no_cookies, **kwargs)
        self.direct_transport = transport
        self._prepared: dict[str, tuple[TargetConfig, httpx.Request]] = {}

    def prepared(self, target: TargetConfig) -> httpx.Request:
        """Return the target's request, built on first use and reused after.

        A request without a streaming body can be sent any number of times.
        """
        cached = self._prepared.get(target.name)
        if cached is not None and cached[0] is target:
            return cached[1]
        request = _build_request(self, target)
        self._prepared[target.name] = (target, request)
        return request


def _build_request(client: httpx.AsyncClient, target: TargetConfig) -> httpx.Request:
    deadline_s = target.timeout_s
    url = httpx.URL(target.url)
    headers = {**target.headers, "accept-encoding": ACCEPT_ENCODING}
    if url.userinfo:
        # AsyncClient.send turns credentials in the URL into Basic auth, and
        # polls skip send(). aiohttp rejects a URL with credentials beside an
        # Authorization header, so they leave the URL.
        if not any(name.lower() == "authorization" for name in headers):
            credentials = f"{url.username}:{url.password}".encode()
            headers["authorization"] = "Basic " + base64.b64encode(credentials).decode("ascii")
        url = url.copy_with(userinfo=b"")
    return client.build_request(
        target.method,
        url,
        headers=headers,
        content=target.body,
        json=target.json_body,
        timeout=httpx.Timeout(deadline_s, connect=min(deadline_s, MAX_CONNECT_TIMEOUT_S), pool=deadline_s),
    )


def _transport(
    choice: str, tls: bool | ssl.SSLContext, limits: httpx.Limits
) -> httpx.AsyncBaseTransport:
    """Return the aiohttp transport, or httpx's own if ``choice`` is "httpx" or aiohttp is missing."""
    if choice != "httpx":
        try:
            from bgapi.aiohttp_transport import AiohttpTransport
        except ImportError:
            if choice == "aiohttp":
                raise
        else:
            return AiohttpTransport(verify=tls, limits=limits)
    return httpx.AsyncHTTPTransport(verify=tls, limits=limits)


async def poll_http(
    client: httpx.AsyncClient,
    target: TargetConfig,
    conditions: Sequence[Condition],
    *,
    max_body_bytes: int,
    scheduled_at: float | None = None,
) -> PollResult:
    """Send the target's request, read at most ``max_body_bytes`` and check the conditions.

    The whole poll, from connect to the last body byte, is bounded by the
    target's timeout. Network and HTTP failures are returned as a failed
    result; an exception escapes only for a bug.
    """
    start = time.perf_counter()
    result = PollResult.starting(target.name, scheduled_at)
    deadline_s = target.timeout_s
    if isinstance(client, PollClient):
        request = client.prepared(target)
    else:
        request = _build_request(client, target)
    try:
        async with asyncio.timeout(deadline_s):
            response = await _send(client, request, target, max_redirects=client.max_redirects)
            try:
                result.status_code = response.status_code
                body = await _read_capped(response, max_body_bytes)
            finally:
                await response.aclose()
    except TimeoutError:
        return _fail(result, start, ErrorKind.TIMEOUT, f"no complete response within {deadline_s:g} s")
    except _BodyTooLarge:
        return _fail(
            result,
            start,
            ErrorKind.TOO_LARGE,
            f"body exceeds the limit of {max_body_bytes} bytes; reading stopped there "
            "(raise [poller] max_body_bytes if the body is expected)",
        )
    except _TooManyRedirects as exc:
        return _fail(
            result,
            start,
            ErrorKind.TOO_MANY_REDIRECTS,
            f"too many redirects: more than {exc.limit}, the last to {exc.url}; raise [poller] "
            "max_redirects or set follow_redirects = false for this target",
        )
    except _UnsupportedEncoding as exc:
        return _fail(result, start, ErrorKind.PROTOCOL, f"unsupported Content-Encoding {exc}")
    except _InvalidRedirect as exc:
        return _fail(result, start, ErrorKind.PROTOCOL, str(exc))
    except httpx.HTTPError as exc:
        kind, message = classify_http_error(exc)
        return _fail(result, start, kind, message)

    result.elapsed_ms = (time.perf_counter() - start) * 1000
    view = ResponseView(
        status_code=response.status_code,
        elapsed_ms=result.elapsed_ms,
        headers=response.headers,
        body=bytes(body),
    )
    failures = evaluate(conditions, view)
    result.failed_conditions = [str(failure) for failure in failures]
    result.ok = not failures
    if failures:
        result.error_kind = _failure_kind(conditions, failures, view)
        result.error = result.failed_conditions[0]
    return result


class _BodyTooLarge(Exception):
    pass


class _TooManyRedirects(Exception):
    def __init__(self, limit: int, url: httpx.URL) -> None:
        self.limit = limit
        self.url = url


class _UnsupportedEncoding(Exception):
    pass


class _InvalidRedirect(Exception):
    """A redirect whose Location cannot be followed; the message quotes at most 200 characters of it."""

    def __init__(self, problem: str, location: str) -> None:
        quoted = location if len(location) <= 200 else location[:200] + "..."
        super().__init__(f"invalid redirect: {problem}: Location {quoted!r}")


async def _send(
    client: httpx.AsyncClient, request: httpx.Request, target: TargetConfig, *, max_redirects: int
) -> httpx.Response:
    """Send ``request`` and follow redirects by hand; return the final response, unread.

    httpx's own redirect handling reads each redirect's whole body and keeps
    every request header across origins but Authorization. Here redirect
    bodies are never read, and the target's configured headers (API keys,
    tokens) and credential headers are sent to the target's origin only.
    """
    private = {name.lower() for name in target.headers} | SENSITIVE_HEADERS
    # A PollClient's requests go straight to its transport, any other client's through send().
    transport = client.direct_transport if isinstance(client, PollClient) else None
    redirects = 0
    while True:
        if transport is None:
            response = await client.send(request, stream=True, follow_redirects=False)
        else:
            response = await transport.handle_async_request(request)
            response.request = request
        if not target.follow_redirects or not response.has_redirect_location:
            return response
        await response.aclose()
        next_request = _redirect_request(request, response)
        redirects += 1
        if redirects > max_redirects:
            raise _TooManyRedirects(max_redirects, next_request.url)
        if not _keeps_credentials(request.url, next_request.url):
            for name in private:
                next_request.headers.pop(name, None)
        request = next_request


def _redirect_request(request: httpx.Request, response: httpx.Response) -> httpx.Request:
    """Return the request that follows ``response``'s redirect, as a browser would send it.

    A 303, and a 301 or 302 after a POST, become a GET without a body; 307
    and 308 repeat the method and the body.
    """
    location = response.headers["location"]
    try:
        url = request.url.join(location)
        same_origin = _same_origin(request.url, url)  # decodes an IDNA host, which may fail
    except (httpx.InvalidURL, ValueError):  # IDNA errors are ValueErrors
        raise _InvalidRedirect("not a valid URL", location) from None
    if url.scheme not in ("http", "https"):
        raise _InvalidRedirect(f"unsupported scheme {url.scheme[:20]!r}", location)
    if url.port is not None and not 0 < url.port < 65536:
        raise _InvalidRedirect("port out of range", location)
    method = request.method
    if (response.status_code == 303 and method != "HEAD") or (
        response.status_code in (301, 302) and method == "POST"
    ):
        method = "GET"
    headers = httpx.Headers(request.headers)
    if not same_origin:
        headers.pop("host", None)  # the new request sets it from its URL
    content = request.content
    if method != request.method:
        content = b""
        for name in ("content-length", "content-type", "transfer-encoding"):
            headers.pop(name, None)
    try:
        return httpx.Request(
            method, url, headers=headers, content=content or None, extensions=request.extensions
        )
    except (httpx.InvalidURL, ValueError):
        raise _InvalidRedirect("not a valid URL", location) from None


def _same_origin(source: httpx.URL, destination: httpx.URL) -> bool:
    return (source.scheme, source.host, source.port) == (destination.scheme, destination.host, destination.port)


def _keeps_credentials(source: httpx.URL, destination: httpx.URL) -> bool:
    """Tell whether a redirect stays on the origin, or only upgrades it to HTTPS."""
    if _same_origin(source, destination):
        return True
    return (
        source.scheme == "http"
        and destination.scheme == "https"
        and source.host == destination.host
        and source.port in (None, 80)
        and destination.port in (None, 443)
    )


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytearray:
    """Read and decode the body, stopping as soon as it exceeds ``max_bytes``.

    Decoding is done here rather than by httpx, whose decoders inflate a whole
    network chunk at once: a few hundred bytes of nested gzip become gigabytes.
    """
    decoder = _BoundedDecoder(response.headers.get("content-encoding", ""), max_bytes)
    body = bytearray()
    async for chunk in response.aiter_raw(READ_CHUNK_BYTES):
        body += decoder.decode(chunk)
        if len(body) > max_bytes:
            raise _BodyTooLarge
    body += decoder.flush()
    if len(body) > max_bytes:
        raise _BodyTooLarge
    return body


class _BoundedDecoder:
    """Undo gzip and deflate content codings without ever inflating past a limit."""

    def __init__(self, content_encoding: str, limit: int) -> None:
        self._limit = limit
        codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
        # Codings are listed in the order they were applied, so undo them backwards.
        self._stages: list[Any] = []
        for coding in reversed(codings):
            if coding == "identity":
                continue
            if coding in ("gzip", "x-gzip"):
                self._stages.append(zlib.decompressobj(16 + zlib.MAX_WBITS))
            elif coding == "deflate":
                self._stages.append(_Deflate())
            else:
                raise _UnsupportedEncoding(repr(coding))

    def decode(self, data: bytes) -> bytes:
        for stage in self._stages:
            data = self._inflate(stage, data)
        return data

    def flush(self) -> bytes:
        data = b""
        for stage in self._stages:
            data = self._inflate(stage, data) + stage.flush()
        return data

    def _inflate(self, stage: Any, data: bytes) -> bytes:
        # Ask for one byte more than the limit: getting it proves the body too large.
        try:
            output = stage.decompress(data, self._limit + 1)
        except zlib.error as exc:
            raise httpx.DecodingError(f"invalid compressed body: {exc}") from None
        if stage.unconsumed_tail:
            raise _BodyTooLarge
        return output


class _Deflate:
    """A deflate decoder that accepts the zlib wrapper (RFC 9110) or a raw stream."""

    def __init__(self) -> None:
        self._decoder = zlib.decompressobj(zlib.MAX_WBITS)
        self._started = False

    @property
    def unconsumed_tail(self) -> bytes:
        return self._decoder.unconsumed_tail

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if not self._started and data:
            self._started = True
            try:
                return self._decoder.decompress(data, max_length)
            except zlib.error:
                # Some servers send raw deflate without the zlib header.
                self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._decoder.decompress(data, max_length)

    def flush(self) -> bytes:
        return self._decoder.flush()


def _fail(result: PollResult, start: float, kind: ErrorKind, message: str) -> PollResult:
    result.elapsed_ms = (time.perf_counter() - start) * 1000
    result.ok = False
    result.error_kind = kind
    result.error = message
    return result


def _failure_kind(
    conditions: Sequence[Condition], failures: Sequence[Any], view: ResponseView
) -> ErrorKind:
    failed = {failure.condition for failure in failures}
    if any(c.subject == "status" and c.text in failed for c in conditions):
        return ErrorKind.HTTP_STATUS
    if view.json_error is not None and any(c.needs_json and c.text in failed for c in conditions):
        return ErrorKind.INVALID_JSON
    return ErrorKind.CONDITION


def classify_http_error(exc: httpx.HTTPError) -> tuple[ErrorKind, str]:
    """Map an httpx exception to an error kind and a one-line message."""
    causes = list(_cause_chain(exc))
    if isinstance(exc, httpx.TooManyRedirects):
        return ErrorKind.TOO_MANY_REDIRECTS, (
            f"too many redirects, the last to {_request_url(exc)}; raise [poller] max_redirects "
            "or set follow_redirects = false for this target"
        )
    if isinstance(exc, httpx.TimeoutException):
        phase = type(exc).__name__.removesuffix("Timeout").lower() or "request"
        return ErrorKind.TIMEOUT, f"{phase} timed out"
    if any(isinstance(cause, socket.gaierror) for cause in causes) or _looks_like_dns(exc):
        return ErrorKind.DNS, f"name resolution failed: {_first_line(exc)}"
    if any(isinstance(cause, ssl.SSLError) for cause in causes) or "SSL" in str(exc):
        message = f"TLS handshake failed: {_first_line(exc)}"
        if "CERTIFICATE_VERIFY_FAILED" in message:
            message += "; give the issuing CA with ca_bundle, or set verify = false for this target"
        return ErrorKind.TLS, message
    if isinstance(exc, httpx.ConnectError):
        return ErrorKind.CONNECT, f"connection failed: {_root_message(causes)}"
    if isinstance(exc, httpx.ReadError):
        return ErrorKind.CONNECT, f"connection broken while reading the response: {_root_message(causes)}"
    if isinstance(exc, (httpx.WriteError, httpx.CloseError)):
        return ErrorKind.CONNECT, f"connection broken while sending the request: {_root_message(causes)}"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.LocalProtocolError, httpx.DecodingError)):
        return ErrorKind.PROTOCOL, f"invalid HTTP response: {_first_line(exc)}"
    return ErrorKind.PROTOCOL, f"{type(exc).__name__}: {_first_line(exc)}"


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _looks_like_dns(exc: BaseException) -> bool:
    text = str(exc)
    return "Name or service not known" in text or "nodename nor servname" in text or (
        "Temporary failure in name resolution" in text
    )


def _root_message(causes: list[BaseException]) -> str:
    """Describe the root cause: the deepest OSError's errno, else the first message.

    httpx's errors often say little ("", "All connection attempts failed");
    the OSError they wrap says what happened ("Connection refused").
    """
    for cause in reversed(causes):
        if isinstance(cause, OSError) and cause.errno:
            return f"[Errno {cause.errno}] {os.strerror(cause.errno)}"
    for cause in causes:
        if str(cause).strip():
            return _first_line(cause)
    return type(causes[0]).__name__ if causes else "unknown error"


def _request_url(exc: httpx.HTTPError) -> str:
    try:
        return str(exc.request.url)
    except RuntimeError:  # httpx raises this when the exception has no request
        return "an unknown URL"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
