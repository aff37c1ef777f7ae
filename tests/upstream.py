"""HTTP/1.1 test server whose routes misbehave on purpose, down to the byte level.

``Upstream`` runs an ``asyncio.start_server`` server on a random 127.0.0.1 port in a
background thread with its own event loop, so synchronous tests and the code under
test reach it over real sockets. ``Upstream(tls=True)`` serves the same routes over
HTTPS with a certificate from a throwaway CA (``ca_path``).

Routes are chosen by path. The query string only carries parameters, and
``?delay=S`` on any route waits S seconds before the route runs.

- ``/ok``: 200 ``text/plain`` body ``ok``.
- ``/json``: 200 ``{"ok": true, "items": [1, 2, 3]}``.
- ``/status.json``: 200 Statuspage-shaped document; see ``set_status_indicator``.
- ``/status/{code}``: that status code (200 to 599) with a short text body.
- ``/slow?seconds=S``: waits S seconds (default 2), then 200 ``slow``.
- ``/hang``: never responds. The handler ends when the client closes or the server stops.
- ``/invalid-json``: 200 ``application/json`` with the truncated body ``{"oops": ``.
- ``/reset?stage=headers|body``: sends part of the head (default) or the full head and
  part of the body, then resets the connection with SO_LINGER 0.
- ``/drip?seconds=S&bytes=N``: 200 with ``Content-Length: N`` (default 1000) and one
  byte every S seconds (default 0.5), so only a total deadline catches it.
- ``/huge?mb=N``: 200 with an N MiB body (default 300), streamed in 64 KiB chunks.
- ``/redirect-loop``: 302 to itself. ``/redirect/{n}``: n redirects that end at ``/ok``.
- ``/gzip-bomb?mb=N``: 200 with ``Content-Encoding: gzip, gzip``, N MiB of zeros inflated.
- ``/deflate``: 200 JSON ``{"ok": true}`` with ``Content-Encoding: deflate``.
- ``/redirect-to?url=U&status=S&cookie=1``: S (default 302; 301, 303, 307 or 308) to U,
  which must be on ``http://127.0.0.1:``; with ``cookie=1`` also sets a cookie.
- ``/redirect-raw?location=L``: 302 with ``Location: L`` as given, for invalid values
  that a client must reject without connecting anywhere.
- ``/not-utf8``: 200 ``text/plain; charset=utf-8`` with the bytes ``b"\\xff\\xfe ok \\xc3\\x28"``.
- ``/lying-length``: 200 with ``Content-Length: 100`` but 10 body bytes, then close.
- ``/no-length``: 200 without ``Content-Length``, the body, then close.
- ``/echo``: 200 JSON with the request's method, path, query, headers and body.
- ``/webhook``: 200 ``{"received": true}``. Read what arrived with ``requests_for``.
- ``/webhook/fail``: always 500.
- ``/webhook/flaky?fail=N``: 500 for the first N requests (default 1), then 200.
- Any other path: 404.

Routes that misbehave (``/hang``, ``/reset``, ``/drip``, ``/huge``, ``/lying-length``,
``/no-length``) close the connection afterwards. The others keep HTTP/1.1 connections
open unless the request sends ``Connection: close``. HTTP/1.0 connections always close
after one response.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import gzip
import http
import json
import logging
import math
import re
import socket
import ssl
import zlib
import struct
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl

__all__ = ["RecordedRequest", "Upstream"]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
SERVER_NAME = "bgapi-test-upstream"
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"

MAX_RECORDED_REQUESTS = 10_000
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_TRAILER_LINES = 100
LISTEN_BACKLOG = 1024

START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 2.0
# Share of STOP_TIMEOUT_S that stop() gives the connection handlers to unwind after
# it cancels them. SERVER_CLOSE_TIMEOUT_S and LEFTOVER_TASK_TIMEOUT_S take most of the rest.
HANDLER_CANCEL_TIMEOUT_S = 1.0
CLOSE_TIMEOUT_S = 1.0
SERVER_CLOSE_TIMEOUT_S = 0.5
LEFTOVER_TASK_TIMEOUT_S = 0.2
# A TLS close waits this long for the client's close_notify. asyncio's default is 30 s.
TLS_SHUTDOWN_TIMEOUT_S = 1.0
# /reset waits this long after its last write so the partial response leaves the
# kernel send buffer, because a reset discards bytes that are still queued there.
RESET_FLUSH_DELAY_S = 0.05

MIB = 1024 * 1024
HUGE_CHUNK = b"x" * (64 * 1024)
READ_CHUNK_BYTES = 64 * 1024

# Top-level descriptions that Statuspage shows for a page with one component.
# NOTE: pages with several components blend statuses, so real descriptions vary.
STATUS_DESCRIPTIONS = {
    "none": "All Systems Operational",
    "minor": "Partially Degraded Service",
    "major": "Partial System Outage",
    "critical": "Major System Outage",
    "maintenance": "Service Under Maintenance",
}

# HTTP forbids a body in 204 and 304 responses (RFC 9110), so clients read none.
NO_BODY_STATUSES = frozenset({204, 304})


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """Request as the server parsed it.

    ``headers`` has lower-case names. A header sent several times appears once, with
    its values joined by ", ". ``received_at`` is the ``time.monotonic()`` value at
    which the body was complete. ``connection_id`` numbers the server's connections
    from 1 in the order they were accepted, so equal ids mean a reused connection.
    """

    connection_id: int
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    received_at: float

    def json(self) -> Any:
        """Decode the body as JSON, raising ``json.JSONDecodeError`` if it is invalid."""
        return json.loads(self.body)


class _BadRequest(Exception):
    """Request that the server rejects with a 4xx status and a text message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass
class _Exchange:
    """One request being handled, and the connection to write the response to."""

    upstream: Upstream
    request: RecordedRequest
    query: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    keep_alive: bool
    path_params: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def head_only(self) -> bool:
        """Whether the request is HEAD, so the response must carry no body."""
        return self.request.method == "HEAD"

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = TEXT,
        headers: Iterable[tuple[str, str]] = (),
    ) -> bool:
        """Send a complete response and return whether the connection stays open."""
        response_headers = [("Server", SERVER_NAME)]
        if status not in NO_BODY_STATUSES:
            response_headers.append(("Content-Type", content_type))
            response_headers.append(("Content-Length", str(len(body))))
        response_headers.extend(headers)
        if not self.keep_alive:
            response_headers.append(("Connection", "close"))

        self.writer.write(_format_head(status, response_headers))
        if body and not self.head_only and status not in NO_BODY_STATUSES:
            self.writer.write(body)
        await self.writer.drain()
        return self.keep_alive

    async def respond_json(self, status: int, document: object) -> bool:
        """Send ``document`` as a JSON response and return whether the connection stays open."""
        return await self.respond(status, json.dumps(document).encode(), JSON)

    async def send_head(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        """Send only the status line and headers, with ``Connection: close``.

        The caller writes the body itself and must close the connection afterwards.
        """
        self.keep_alive = False
        response_headers = [("Server", SERVER_NAME), *headers, ("Connection", "close")]
        self.writer.write(_format_head(status, response_headers))
        await self.writer.drain()


Handler = Callable[[_Exchange], Awaitable[bool]]


class Upstream:
    """HTTP/1.1 server on a random 127.0.0.1 port, run in a background thread.

    Use it as a context manager, or call ``start()`` and ``stop()``. ``stop()`` aborts
    every open connection and joins the thread within ``STOP_TIMEOUT_S`` seconds, even
    with ``/hang`` or ``/drip`` requests in flight.

    Args:
        tls: Serve HTTPS with a certificate for 127.0.0.1 and localhost that is
            signed by a throwaway CA. Needs the ``trustme`` package.
    """

    def __init__(self, *, tls: bool = False) -> None:
        self.host = HOST
        self.port = 0
        self.tls = tls

        # The loop thread writes the statistics below and test threads read them,
        # so every access holds this condition's lock.
        self._condition = threading.Condition()
        self._hits: collections.Counter[str] = collections.Counter()
        self._requests: collections.deque[RecordedRequest] = collections.deque(
            maxlen=MAX_RECORDED_REQUESTS
        )
        self._errors: list[BaseException] = []
        self._status_indicator = "none"
        self._status_description = STATUS_DESCRIPTIONS["none"]
        self._status_updated_at = _utc_timestamp()

        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._loop_error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        # Open connections by the task that handles each. Only the loop thread changes it.
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._accepted_connections = 0

        self._server_ssl_context: ssl.SSLContext | None = None
        self._cert_dir: tempfile.TemporaryDirectory[str] | None = None
        self._ca_path: Path | None = None

    # Public API -----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Scheme, host and port, for example ``http://127.0.0.1:41234``."""
        if self.port == 0:
            raise RuntimeError("Upstream has no port yet: call start() or enter the context")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        """Return the absolute URL of ``path``, which must start with "/"."""
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got: {path!r}")
        return self.base_url + path

    @property
    def ca_path(self) -> Path:
        """PEM file of the CA that signed the server certificate, for ``tls=True`` only."""
        if self._ca_path is None:
            if not self.tls:
                raise RuntimeError("ca_path exists only for Upstream(tls=True)")
            raise RuntimeError("ca_path is created by start(): start the Upstream first")
        return self._ca_path

    def client_ssl_context(self) -> ssl.SSLContext:
        """Create a client SSL context that trusts ``ca_path``, for ``httpx.Client(verify=...)``."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    @property
    def hits(self) -> collections.Counter[str]:
        """Copy of the number of requests received per path, query string excluded."""
        with self._condition:
            return collections.Counter(self._hits)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Copy of the last ``MAX_RECORDED_REQUESTS`` requests, oldest first."""
        with self._condition:
            return list(self._requests)

    def requests_for(self, path: str) -> list[RecordedRequest]:
        """Return the recorded requests to ``path``, oldest first."""
        with self._condition:
            return [request for request in self._requests if request.path == path]

    @property
    def errors(self) -> list[BaseException]:
        """Copy of the unexpected exceptions raised in handlers or the event loop.

        Client disconnects, failed TLS handshakes and malformed requests are expected
        and not listed.
        """
        with self._condition:
            return list(self._errors)

    @property
    def open_connections(self) -> int:
        """Number of client connections that a handler is still serving."""
        return len(self._connections)

    def clear(self) -> None:
        """Forget the recorded hits, requests and errors."""
        with self._condition:
            self._hits.clear()
            self._requests.clear()
            self._errors.clear()

    def wait_for_hits(self, path: str, count: int, timeout: float) -> bool:
        """Block until ``path`` has at least ``count`` hits or ``timeout`` seconds pass.

        Returns:
            Whether the count was reached.
        """
        with self._condition:
            return self._condition.wait_for(lambda: self._hits[path] >= count, timeout)

    def set_status_indicator(self, value: str, description: str | None = None) -> None:
        """Set ``status.indicator`` in the ``/status.json`` document.

        Args:
            value: Statuspage uses "none", "minor", "major" and "critical". Other
                values are served as given, to test how clients handle them.
            description: ``status.description``. Defaults to the text Statuspage
                shows for ``value``, or "Unknown" for other values.
        """
        if description is None:
            description = STATUS_DESCRIPTIONS.get(value, "Unknown")
        with self._condition:
            self._status_indicator = value
            self._status_description = description
            self._status_updated_at = _utc_timestamp()

    # Lifecycle ------------------------------------------------------------------

    def start(self) -> Self:
        """Start the server thread and wait until the port is open.

        Raises:
            RuntimeError: The server is already running, or it failed to start
                within ``START_TIMEOUT_S`` seconds.
        """
        if self._thread is not None:
            raise RuntimeError(f"Upstream is already running on port {self.port}")
        if self.tls:
            self._create_certificate()

        self._ready.clear()
        self._loop_error = None
        self._thread = threading.Thread(
            target=self._run_loop, name=f"upstream-{id(self):x}", daemon=True
        )
        self._thread.start()

        if not self._ready.wait(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"Upstream did not start within {START_TIMEOUT_S} s")
        if self._loop_error is not None:
            error = self._loop_error
            self.stop()
            raise RuntimeError(f"Upstream failed to start: {error!r}") from error

        logger.info("upstream listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Close every connection and join the server thread. Does nothing if not running.

        Raises:
            RuntimeError: The thread was still alive after ``STOP_TIMEOUT_S`` seconds.
        """
        thread = self._thread
        if thread is None:
            return

        loop = self._loop
        stopping = self._stopping
        if loop is not None and stopping is not None:
            # The loop may already be closed if the server thread crashed.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        thread.join(STOP_TIMEOUT_S)

        self._thread = None
        self._loop = None
        self._stopping = None
        if self._cert_dir is not None:
            self._cert_dir.cleanup()
            self._cert_dir = None
            self._ca_path = None

        if thread.is_alive():
            raise RuntimeError(
                f"Upstream thread {thread.name} did not stop within {STOP_TIMEOUT_S} s"
            )
        logger.info("upstream on port %d stopped", self.port)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _create_certificate(self) -> None:
        """Create a CA, a server certificate it signs, and the CA's PEM file."""
        try:
            import trustme
        except ImportError as error:
            raise RuntimeError(
                "Upstream(tls=True) needs the trustme package: pip install trustme"
            ) from error

        authority = trustme.CA()
        server_cert = authority.issue_cert(HOST, "localhost")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_cert.configure_cert(context)
        self._server_ssl_context = context

        self._cert_dir = tempfile.TemporaryDirectory(prefix="bgapi-upstream-")
        self._ca_path = Path(self._cert_dir.name) / "ca.pem"
        authority.cert_pem.write_to_path(str(self._ca_path))

    def _run_loop(self) -> None:
        """Run the event loop of the server thread until ``stop()`` is called."""
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._handle_loop_exception)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as error:
            logger.exception("upstream server loop failed")
            self._loop_error = error
            self._ready.set()
        finally:
            _cancel_remaining_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _handle_loop_exception(
        self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]
    ) -> None:
        """Log errors that asyncio reports outside the handlers, and record unexpected ones.

        Failed TLS handshakes and client disconnects are expected, for example when a
        test checks that a client rejects the certificate, and so are handshakes that
        shutdown cancels. They are logged at DEBUG.
        """
        error = context.get("exception")
        message = context.get("message", "unknown event loop error")
        if isinstance(error, (ConnectionError, ssl.SSLError, asyncio.CancelledError)):
            logger.debug("upstream event loop: %s: %r", message, error)
            return
        logger.error("upstream event loop: %s", message, exc_info=error)
        with self._condition:
            self._errors.append(error or RuntimeError(message))

    async def _serve(self) -> None:
        """Listen until ``stop()`` sets the stopping event, then shut down."""
        self._stopping = asyncio.Event()
        tls_options: dict[str, Any] = {}
        if self._server_ssl_context is not None:
            tls_options = {
                "ssl": self._server_ssl_context,
                "ssl_shutdown_timeout": TLS_SHUTDOWN_TIMEOUT_S,
            }
        server = await asyncio.start_server(
            self._handle_connection,
            HOST,
            0,
            limit=MAX_HEAD_BYTES,
            backlog=LISTEN_BACKLOG,
            **tls_options,
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()

        try:
            await self._stopping.wait()
        finally:
            await self._shutdown(server)

    async def _shutdown(self, server: asyncio.Server) -> None:
        """Stop listening, abort every connection and wait briefly for the handlers."""
        server.close()
        handlers = list(self._connections)
        for task, writer in list(self._connections.items()):
            writer.transport.abort()
            task.cancel()
        if handlers:
            _, still_running = await asyncio.wait(handlers, timeout=HANDLER_CANCEL_TIMEOUT_S)
            if still_running:
                logger.warning(
                    "upstream stop: %d connection handlers ignored cancellation",
                    len(still_running),
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), SERVER_CLOSE_TIMEOUT_S)

    # Connections ----------------------------------------------------------------

    async def _handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve requests on one connection until either side closes it."""
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        self._accepted_connections += 1
        connection_id = self._accepted_connections
        try:
            keep_open = True
            while keep_open:
                keep_open = await self._serve_request(connection_id, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as error:
            logger.debug("upstream connection closed by the client: %r", error)
        except asyncio.CancelledError:
            # Only _shutdown() cancels handlers. The task ends normally because the
            # done callback of asyncio 3.11's StreamReaderProtocol calls
            # task.exception(), which raises and logs an error for a cancelled task.
            logger.debug("upstream connection %d closed by stop()", connection_id)
        except Exception as error:
            logger.exception("upstream connection handler failed")
            with self._condition:
                self._errors.append(error)
        finally:
            del self._connections[task]
            await _close_writer(writer)

    async def _serve_request(
        self, connection_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Read one request and respond to it. Returns whether the connection stays open."""
        try:
            parsed = await _read_request(connection_id, reader)
        except _BadRequest as error:
            logger.debug("upstream rejected a request: %d %s", error.status, error.message)
            writer.write(_format_error(error))
            await writer.drain()
            return False
        if parsed is None:
            return False

        request, keep_alive = parsed
        self._record(request)
        exchange = _Exchange(
            upstream=self,
            request=request,
            query=dict(parse_qsl(request.query, keep_blank_values=True)),
            reader=reader,
            writer=writer,
            keep_alive=keep_alive,
        )
        try:
            delay_s = _float_param(exchange, "delay", 0.0)
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            handler = _resolve_route(exchange)
            return await handler(exchange)
        except _BadRequest as error:
            return await exchange.respond(error.status, error.message.encode())

    def _record(self, request: RecordedRequest) -> None:
        with self._condition:
            self._hits[request.path] += 1
            self._requests.append(request)
            self._condition.notify_all()

    def _hit_count(self, path: str) -> int:
        with self._condition:
            return self._hits[path]

    def _status_document(self) -> dict[str, object]:
        """Build the ``/status.json`` body in the shape of Statuspage's API v2."""
        with self._condition:
            return {
                "page": {
                    "id": "bgapi-upstream",
                    "name": "bgapi test upstream",
                    "url": self.base_url,
                    "time_zone": "Etc/UTC",
                    "updated_at": self._status_updated_at,
                },
                "status": {
                    "indicator": self._status_indicator,
                    "description": self._status_description,
                },
            }


# HTTP parsing and formatting -----------------------------------------------------


async def _read_request(
    connection_id: int, reader: asyncio.StreamReader
) -> tuple[RecordedRequest, bool] | None:
    """Read one request head and body.

    Returns:
        The request and whether the client allows keep-alive, or None if the client
        closed the connection before sending a request.

    Raises:
        _BadRequest: The head or body is malformed or too large.
        asyncio.IncompleteReadError: The client closed the connection mid-body.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, f"request head is larger than {MAX_HEAD_BYTES} bytes") from None

    # RFC 9112 tells servers to ignore empty lines before the request line, which some
    # old clients send after a POST body.
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")[:-2]
    if not lines:
        raise _BadRequest(400, "request line is missing")

    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, f"invalid request line: {lines[0]!r}")
    method, target, version = parts

    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, separator, value = line.partition(":")
        if not separator or not name or name != name.strip():
            raise _BadRequest(400, f"invalid header line: {line!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value

    body = await _read_body(reader, headers)
    path, _, query = target.partition("?")
    request = RecordedRequest(
        connection_id=connection_id,
        method=method,
        path=path,
        query=query,
        headers=headers,
        body=body,
        received_at=time.monotonic(),
    )

    connection_options = {
        option.strip().lower() for option in headers.get("connection", "").split(",")
    }
    keep_alive = version == "HTTP/1.1" and "close" not in connection_options
    return request, keep_alive


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """Read the body that ``Transfer-Encoding: chunked`` or ``Content-Length`` announces."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked_body(reader)

    raw_length = headers.get("content-length")
    if raw_length is None:
        return b""
    if not raw_length.isdigit():
        raise _BadRequest(400, f"invalid Content-Length: {raw_length!r}")
    length = int(raw_length)
    if length > MAX_BODY_BYTES:
        raise _BadRequest(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
    return await reader.readexactly(length)


async def _read_chunked_body(reader: asyncio.StreamReader) -> bytes:
    """Read a chunked body and discard its trailer fields."""
    chunks: list[bytes] = []
    total = 0
    while True:
        size_line = await _read_line(reader)
        size_text = size_line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _BadRequest(400, f"invalid chunk size: {size_text!r}") from None
        if size == 0:
            break
        total += size
        if total > MAX_BODY_BYTES:
            raise _BadRequest(413, f"chunked request body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise _BadRequest(400, "chunk data is not followed by CRLF")

    for _ in range(MAX_TRAILER_LINES):
        if await _read_line(reader) == b"\r\n":
            return b"".join(chunks)
    raise _BadRequest(431, f"chunked body has more than {MAX_TRAILER_LINES} trailer lines")


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    """Read one CRLF-terminated line of a chunked body, raising _BadRequest if it is too long."""
    try:
        return await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, f"chunked body line is longer than {MAX_HEAD_BYTES} bytes") from None


def _format_head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _format_error(error: _BadRequest) -> bytes:
    """Format a complete response with ``Connection: close`` for a rejected request."""
    body = error.message.encode()
    headers = [
        ("Server", SERVER_NAME),
        ("Content-Type", TEXT),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    return _format_head(error.status, headers) + body


def _float_param(exchange: _Exchange, name: str, default: float, minimum: float = 0.0) -> float:
    """Parse a finite number of at least ``minimum`` from the query, raising _BadRequest."""
    raw = exchange.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _BadRequest(400, f"query parameter {name!r} must be a number, got: {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise _BadRequest(400, f"query parameter {name!r} must be >= {minimum}, got: {raw!r}")
    return value


def _int_param(exchange: _Exchange, name: str, default: int, minimum: int = 0) -> int:
    """Parse an integer of at least ``minimum`` from the query, raising _BadRequest."""
    raw = exchange.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        message = f"query parameter {name!r} must be an integer, got: {raw!r}"
        raise _BadRequest(400, message) from None
    if value < minimum:
        raise _BadRequest(400, f"query parameter {name!r} must be >= {minimum}, got: {raw!r}")
    return value


def _utc_timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


# Connection helpers --------------------------------------------------------------


def _cancel_remaining_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks still pending on ``loop`` and wait briefly for them to end.

    Connection handlers have normally ended by now, but asyncio runs a task per TLS
    handshake in progress. Closing the loop with a pending task logs "Task was
    destroyed but it is pending".
    """
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.wait(tasks, timeout=LEFTOVER_TASK_TIMEOUT_S))


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    """Close the connection after flushing it, or abort it if that takes too long."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT_S)
    except TimeoutError:
        writer.transport.abort()
    except OSError as error:
        # ssl.SSLError and ConnectionError are OSError subclasses.
        logger.debug("upstream connection failed while closing: %r", error)


async def _wait_for_disconnect(reader: asyncio.StreamReader) -> None:
    """Wait until the client closes the connection, discarding anything it sends."""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while await reader.read(READ_CHUNK_BYTES):
            pass


async def _run_until_disconnect(
    reader: asyncio.StreamReader, work: Coroutine[Any, Any, None]
) -> None:
    """Run ``work`` until it finishes or the client disconnects, whichever comes first.

    Only responses that close the connection afterwards may use this, because the
    disconnect watcher consumes anything that the client sends meanwhile.
    """
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(reader))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        work_task.cancel()
        watch_task.cancel()
        await asyncio.gather(work_task, watch_task, return_exceptions=True)

    if work_task.cancelled():
        return
    error = work_task.exception()
    if error is not None and not isinstance(error, (ConnectionError, ssl.SSLError)):
        raise error


def _reset_connection(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # A zero linger time makes close() send RST and drop unsent data.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# Routes --------------------------------------------------------------------------


async def _ok(exchange: _Exchange) -> bool:
    return await exchange.respond(200, b"ok")


async def _json(exchange: _Exchange) -> bool:
    return await exchange.respond_json(200, {"ok": True, "items": [1, 2, 3]})


async def _status_json(exchange: _Exchange) -> bool:
    return await exchange.respond_json(200, exchange.upstream._status_document())


async def _status_code(exchange: _Exchange) -> bool:
    status = int(exchange.path_params["code"])
    # A 1xx status is interim, so a client would wait for a second response forever.
    if not 200 <= status <= 599:
        raise _BadRequest(400, f"status code must be between 200 and 599, got: {status}")
    return await exchange.respond(status, f"status {status}\n".encode())


async def _slow(exchange: _Exchange) -> bool:
    await asyncio.sleep(_float_param(exchange, "seconds", 2.0))
    return await exchange.respond(200, b"slow")


async def _hang(exchange: _Exchange) -> bool:
    await _wait_for_disconnect(exchange.reader)
    return False


async def _invalid_json(exchange: _Exchange) -> bool:
    return await exchange.respond(200, b'{"oops": ', JSON)


async def _reset(exchange: _Exchange) -> bool:
    """Send part of a response, then reset the connection.

    NOTE: over TLS, httpx 0.29 with anyio 4.16 on Linux raised
    ``httpx.RemoteProtocolError`` (unexpected end of stream) here, not ``httpx.ReadError``.
    The RST is sent in both cases, but the client's TLS layer appears to report it as EOF.
    """
    stage = exchange.query.get("stage", "headers")
    if stage == "headers":
        partial = b"HTTP/1.1 200 OK\r\nServer: " + SERVER_NAME.encode() + b"\r\nContent-Ty"
    elif stage == "body":
        partial = _format_head(200, [("Content-Type", TEXT), ("Content-Length", "1000")])
        partial += b"partial body"
    else:
        raise _BadRequest(400, f"query parameter 'stage' must be headers or body, got: {stage!r}")

    exchange.writer.write(partial)
    await exchange.writer.drain()
    await asyncio.sleep(RESET_FLUSH_DELAY_S)
    _reset_connection(exchange.writer)
    return False


async def _drip(exchange: _Exchange) -> bool:
    interval_s = _float_param(exchange, "seconds", 0.5)
    size = _int_param(exchange, "bytes", 1000, minimum=1)
    await exchange.send_head(200, [("Content-Type", TEXT), ("Content-Length", str(size))])
    if exchange.head_only:
        return False

    async def send_bytes() -> None:
        for index in range(size):
            if index:
                await asyncio.sleep(interval_s)
            exchange.writer.write(b".")
            await exchange.writer.drain()

    await _run_until_disconnect(exchange.reader, send_bytes())
    return False


async def _huge(exchange: _Exchange) -> bool:
    size = int(_float_param(exchange, "mb", 300.0) * MIB)
    await exchange.send_head(200, [("Content-Type", TEXT), ("Content-Length", str(size))])
    if exchange.head_only:
        return False

    async def send_chunks() -> None:
        remaining = size
        while remaining > 0:
            chunk = HUGE_CHUNK if remaining >= len(HUGE_CHUNK) else HUGE_CHUNK[:remaining]
            exchange.writer.write(chunk)
            await exchange.writer.drain()
            remaining -= len(chunk)

    await _run_until_disconnect(exchange.reader, send_chunks())
    return False


async def _redirect_loop(exchange: _Exchange) -> bool:
    return await exchange.respond(302, b"", headers=[("Location", "/redirect-loop")])


async def _redirect_chain(exchange: _Exchange) -> bool:
    remaining = int(exchange.path_params["count"])
    if remaining < 1:
        raise _BadRequest(400, f"redirect count must be at least 1, got: {remaining}")
    location = "/ok" if remaining == 1 else f"/redirect/{remaining - 1}"
    return await exchange.respond(302, b"", headers=[("Location", location)])


async def _gzip_bomb(exchange: _Exchange) -> bool:
    # gzip of gzip of N MiB of zeros: a few hundred bytes on the wire.
    megabytes = int(_float_param(exchange, "mb", 200.0))
    # Compressed a mebibyte at a time, so the server never holds the inflated body.
    inner = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1024 * 1024)
    compressed = b"".join(inner.compress(zeros) for _ in range(megabytes)) + inner.flush()
    body = gzip.compress(compressed, compresslevel=9)
    return await exchange.respond(200, body, TEXT, headers=[("Content-Encoding", "gzip, gzip")])


async def _gzip_ok(exchange: _Exchange) -> bool:
    body = zlib.compress(json.dumps({"ok": True}).encode())
    return await exchange.respond(200, body, JSON, headers=[("Content-Encoding", "deflate")])


async def _redirect_to(exchange: _Exchange) -> bool:
    # Test-only: the target comes from the query and must be on 127.0.0.1.
    location = exchange.query.get("url", "")
    if not location.startswith("http://127.0.0.1:"):
        raise _BadRequest(400, f"url must start with http://127.0.0.1:, got: {location!r}")
    status = _int_param(exchange, "status", 302)
    if status not in (301, 302, 303, 307, 308):
        raise _BadRequest(400, f"status must be 301, 302, 303, 307 or 308, got: {status}")
    headers = [("Location", location)]
    if exchange.query.get("cookie") == "1":
        headers.append(("Set-Cookie", "session=from-upstream; Path=/"))
    return await exchange.respond(status, b"", headers=headers)


async def _redirect_raw(exchange: _Exchange) -> bool:
    return await exchange.respond(302, b"", headers=[("Location", exchange.query.get("location", ""))])


async def _not_utf8(exchange: _Exchange) -> bool:
    return await exchange.respond(200, b"\xff\xfe ok \xc3\x28", TEXT)


async def _lying_length(exchange: _Exchange) -> bool:
    await exchange.send_head(200, [("Content-Type", TEXT), ("Content-Length", "100")])
    if not exchange.head_only:
        exchange.writer.write(b"0123456789")
        await exchange.writer.drain()
    return False


async def _no_length(exchange: _Exchange) -> bool:
    await exchange.send_head(200, [("Content-Type", TEXT)])
    if not exchange.head_only:
        exchange.writer.write(b"body without length\n")
        await exchange.writer.drain()
    return False


async def _echo(exchange: _Exchange) -> bool:
    request = exchange.request
    return await exchange.respond_json(
        200,
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": request.headers,
            "body": request.body.decode("utf-8", errors="replace"),
        },
    )


async def _webhook(exchange: _Exchange) -> bool:
    return await exchange.respond_json(200, {"received": True})


async def _webhook_fail(exchange: _Exchange) -> bool:
    return await exchange.respond_json(500, {"error": "this webhook receiver always fails"})


async def _webhook_flaky(exchange: _Exchange) -> bool:
    failures = _int_param(exchange, "fail", 1)
    # The count includes this request and every earlier one since start() or clear().
    if exchange.upstream._hit_count(exchange.request.path) <= failures:
        return await exchange.respond_json(500, {"error": "flaky webhook receiver failed"})
    return await exchange.respond_json(200, {"received": True})


async def _not_found(exchange: _Exchange) -> bool:
    return await exchange.respond(404, f"no route for {exchange.request.path}\n".encode())


_FIXED_ROUTES: dict[str, Handler] = {
    "/ok": _ok,
    "/json": _json,
    "/status.json": _status_json,
    "/slow": _slow,
    "/hang": _hang,
    "/invalid-json": _invalid_json,
    "/reset": _reset,
    "/drip": _drip,
    "/huge": _huge,
    "/redirect-loop": _redirect_loop,
    "/not-utf8": _not_utf8,
    "/gzip-bomb": _gzip_bomb,
    "/deflate": _gzip_ok,
    "/redirect-to": _redirect_to,
    "/redirect-raw": _redirect_raw,
    "/lying-length": _lying_length,
    "/no-length": _no_length,
    "/echo": _echo,
    "/webhook": _webhook,
    "/webhook/fail": _webhook_fail,
    "/webhook/flaky": _webhook_flaky,
}

_PATTERN_ROUTES: list[tuple[re.Pattern[str], Handler]] = [
    (re.compile(r"/status/(?P<code>\d{1,3})"), _status_code),
    (re.compile(r"/redirect/(?P<count>\d{1,4})"), _redirect_chain),
]


def _resolve_route(exchange: _Exchange) -> Handler:
    """Find the handler for the request path and store its path parameters."""
    path = exchange.request.path
    handler = _FIXED_ROUTES.get(path)
    if handler is not None:
        return handler
    for pattern, pattern_handler in _PATTERN_ROUTES:
        match = pattern.fullmatch(path)
        if match is not None:
            exchange.path_params = match.groupdict()
            return pattern_handler
    return _not_found
