"""An httpx transport that sends requests with aiohttp.

bgapi keeps ``httpx.AsyncClient`` as its HTTP API (redirects, timeouts,
headers, errors). But httpx's own connection pool (httpcore 1.0) checks every
pooled connection, with a system call each, for every request. Its CPU cost
per request therefore grows with the pool, and throughput collapses with many
connections (encode/httpx#3215). aiohttp's connector does not scan, so this
transport, plugged in with ``httpx.AsyncClient(transport=...)``, keeps the
httpx API at aiohttp's speed. ``benchmarks/http_clients.py`` measures both.

aiohttp's exceptions are mapped onto httpx's, with the original as
``__cause__``, so :func:`bgapi.poll.classify_http_error` receives the same
classes as with httpx's own transport: a refused or unresolvable connection
is :class:`httpx.ConnectError`, a connection cut before or during the
response is :class:`httpx.RemoteProtocolError` or :class:`httpx.ReadError`.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx
from yarl import URL

__all__ = ["AiohttpTransport"]

# aiohttp reads the body in chunks of at most this many bytes.
READ_CHUNK_BYTES = 64 * 1024
# Parsed URLs kept for reuse: polls send the same few URLs over and over.
URL_CACHE_SIZE = 16 * 1024


@contextlib.contextmanager
def _map_errors(phase: str) -> Iterator[None]:
    """Re-raise aiohttp errors as the httpx exception a default transport would raise."""
    try:
        yield
    except aiohttp.ClientError as exc:
        raise _httpx_error(exc, phase) from exc


def _httpx_error(exc: aiohttp.ClientError, phase: str) -> httpx.TransportError:
    # Order matters: several aiohttp classes derive from each other.
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ServerTimeoutError):
        if phase == "connect" and not isinstance(exc, aiohttp.SocketTimeoutError):
            return httpx.ConnectTimeout(message)
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(message)
    if isinstance(exc, aiohttp.ClientPayloadError):
        detail = getattr(exc.__cause__, "message", None) or message
        # aiohttp names a reset during the body only in the error's text.
        if "ConnectionResetError" in message:
            return httpx.ReadError(f"connection reset by peer during the body: {detail}")
        return httpx.RemoteProtocolError(f"incomplete body: {detail}")
    if isinstance(exc, aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(message)
    if isinstance(exc, aiohttp.ClientOSError | aiohttp.ClientConnectionResetError):
        # aiohttp sends the request and reads the head in one step. A reset
        # there is most often the server dropping the connection before its response.
        return httpx.ReadError(message)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(message)
    if isinstance(exc, aiohttp.ClientConnectionError):
        return httpx.ConnectError(message) if phase == "connect" else httpx.ReadError(message)
    return httpx.TransportError(message)


class _ResponseStream(httpx.AsyncByteStream):
    """The body of an aiohttp response as an httpx byte stream."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _map_errors("read"):
            async for chunk in self._response.content.iter_chunked(READ_CHUNK_BYTES):
                yield chunk

    async def aclose(self) -> None:
        # A body read to the end lets the connection go back to the pool. A body
        # left unread (too large, cancelled) closes it, because draining it could take long.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Send httpx requests over an ``aiohttp.ClientSession``, created on first use.

    Like every aiohttp session, it belongs to the event loop that first uses it.

    Args:
        verify: False to skip certificate checks, True for httpx's default CA
            store, or an SSL context.
        limits: ``max_connections`` bounds the open connections (None: no
            bound) and ``keepalive_expiry`` how long idle ones are kept.
    """

    def __init__(self, *, verify: ssl.SSLContext | bool = True, limits: httpx.Limits | None = None) -> None:
        self._ssl: ssl.SSLContext | bool
        if verify is True:
            self._ssl = httpx.create_ssl_context()
        else:
            self._ssl = verify
        self._limits = limits or httpx.Limits()
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limits.max_connections or 0,
                limit_per_host=0,
                keepalive_timeout=self._limits.keepalive_expiry or 5.0,
                ssl=self._ssl,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # httpx decodes bodies, follows redirects and owns cookies and
                # proxies; aiohttp only moves bytes.
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and return the response with its body still to be read."""
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            # aiohttp's connect covers the wait for a pooled connection too.
            connect=_sum(timeouts.get("pool"), timeouts.get("connect")),
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        body = await request.aread()
        headers = [(key.decode("latin-1"), value.decode("latin-1")) for key, value in request.headers.raw]
        with _map_errors("connect"):
            response = await self._get_session().request(
                request.method,
                _aiohttp_url(str(request.url)),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=timeout,
                server_hostname=request.extensions.get("sni_hostname"),
            )
        version = response.version or aiohttp.HttpVersion11
        extensions = {"http_version": f"HTTP/{version.major}.{version.minor}".encode()}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("latin-1", errors="replace")
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        """Close the session and every pooled connection."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


@functools.lru_cache(maxsize=URL_CACHE_SIZE)
def _aiohttp_url(url: str) -> URL:
    # httpx has already encoded the URL; parsing it again costs more than the send.
    return URL(url, encoded=True)


def _sum(first: float | None, second: float | None) -> float | None:
    if first is None or second is None:
        return None
    return first + second
