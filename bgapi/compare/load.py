"""The load generator of ``bgapi compare``: HTTP/1.1 GET requests to the measured server.

It runs as its own process (``python -m bgapi.compare.load``), so it shares no
GIL with the harness or the server. ``--concurrency`` clients each keep one
keep-alive connection and send one request at a time. Without ``--rate``, each
client sends its next request as soon as the previous response arrives: a
closed loop that saturates the server. With ``--rate``, the clients share a
fixed schedule of that many requests per second: an open loop at a moderate
load.

Latency is measured from writing the request to reading the last body byte.
In paced mode, a request whose slot comes while every client is busy is sent
late, and that wait is not part of its latency. The number of such requests
is reported as ``late_sends``.

The generator is bounded: it stops at ``--duration`` seconds after
``--start-at``, after ``--max-requests`` requests, or when its parent dies;
each request times out after ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from bgapi.compare.upstream import event_loop_factory
from bgapi.parent_watch import watch_parent

__all__ = ["LoadResult", "run_load"]

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_REQUESTS = 1_000_000
# A response head longer than this is not from the server we test.
MAX_HEAD_BYTES = 64 * 1024
# Pause before a client reconnects after a failure, so a dead server is not hammered.
RECONNECT_PAUSE_S = 0.05


class _ResponseError(Exception):
    pass


class _ClientProtocol(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self._status = 0
        self._body_left = -1
        # Response body bytes received on this connection, for LoadResult.body_bytes.
        self.body_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes) -> asyncio.Future[int]:
        """Write ``request``; the future resolves to the response's status code."""
        assert self.transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self._status = 0
        self._body_left = -1
        self.transport.write(request)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._body_left < 0:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    self._fail("response head too long")
                return
            head = bytes(self._buffer[:end]).lower()
            del self._buffer[: end + 4]
            try:
                self._status = int(head[9:12])
                self._body_left = _content_length(head)
            except ValueError:
                self._fail("invalid response head")
                return
        if len(self._buffer) < self._body_left:
            return
        self.body_bytes += self._body_left
        del self._buffer[: self._body_left]
        waiter, self._waiter = self._waiter, None
        self._body_left = -1
        if waiter is not None and not waiter.done():
            waiter.set_result(self._status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail("connection closed")

    def _fail(self, reason: str) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(_ResponseError(reason))
        if self.transport is not None:
            self.transport.close()


def _content_length(head: bytes) -> int:
    marker = b"\r\ncontent-length:"
    start = head.find(marker)
    if start < 0:
        raise ValueError("no content-length")
    line_end = head.find(b"\r\n", start + len(marker))
    return int(head[start + len(marker) : line_end if line_end >= 0 else len(head)].strip())


class LoadResult:
    """The figures of one load run: latencies of completed requests and error counts."""

    def __init__(self) -> None:
        self.latencies_ms = array("d")
        self.errors: Counter[str] = Counter()
        self.late_sends = 0
        self.body_bytes = 0
        self.started_at = 0.0
        self.ended_at = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-ready data."""
        elapsed = max(self.ended_at - self.started_at, 1e-9)
        return {
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "completed": len(self.latencies_ms),
            "requests_per_s": len(self.latencies_ms) / elapsed,
            "errors": dict(self.errors),
            "late_sends": self.late_sends,
            "mean_body_bytes": self.body_bytes / len(self.latencies_ms) if self.latencies_ms else None,
            "latencies_ms": [round(value, 4) for value in self.latencies_ms],
        }


async def run_load(
    host: str,
    port: int,
    paths: Sequence[str],
    *,
    concurrency: int,
    duration_s: float,
    start_at: float | None = None,
    rate: float = 0.0,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> LoadResult:
    """Send GET requests for ``paths`` (in turn) to ``host:port`` and time them.

    Args:
        host: Server address.
        port: Server port.
        paths: Request paths, used round-robin.
        concurrency: Number of clients, each with one connection.
        duration_s: Seconds to send requests for, from ``start_at``.
        start_at: Wall-clock time (``time.time()``) to start at; None starts now.
        rate: Requests per second shared by all clients; 0 sends as fast as they can.
        max_requests: Upper bound on requests sent.
        timeout_s: Seconds before one request counts as timed out.
    """
    if not paths:
        raise ValueError("paths must not be empty")
    requests = [
        f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\nuser-agent: bgapi-compare\r\n\r\n".encode()
        for path in paths
    ]
    result = LoadResult()
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
    result.started_at = time.time()
    begin = time.perf_counter()
    end = begin + duration_s
    next_ticket = 0

    async def client() -> None:
        nonlocal next_ticket
        loop = asyncio.get_running_loop()
        protocol: _ClientProtocol | None = None
        try:
            while True:
                ticket = next_ticket
                next_ticket += 1
                if ticket >= max_requests:
                    return
                if rate > 0:
                    due = begin + ticket / rate
                    if due >= end:
                        return
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    elif delay < -0.001:
                        result.late_sends += 1
                if time.perf_counter() >= end:
                    return
                if protocol is None or protocol.transport is None:
                    protocol = await _open(loop, host, port, timeout_s)
                if protocol is None:
                    result.errors["connect"] += 1
                    await asyncio.sleep(RECONNECT_PAUSE_S)
                    continue
                connection = protocol
                sent = time.perf_counter()
                try:
                    status = await asyncio.wait_for(
                        connection.send(requests[ticket % len(requests)]), timeout_s
                    )
                except TimeoutError:
                    result.errors["timeout"] += 1
                    _close(connection)
                    protocol = None
                    continue
                except _ResponseError:
                    result.errors["connection"] += 1
                    protocol = None
                    continue
                result.latencies_ms.append((time.perf_counter() - sent) * 1000)
                result.body_bytes += connection.body_bytes
                connection.body_bytes = 0
                if status != 200:
                    result.errors[f"status_{status}"] += 1
        finally:
            if protocol is not None:
                _close(protocol)

    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    try:
        # Clients end by themselves at the deadline; this bounds a stuck one.
        await asyncio.wait(tasks, timeout=duration_s + timeout_s + 1)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if rate > 0:
        # A paced schedule covers the whole window even when its last request
        # went out early, so requests/s is what the window saw.
        result.ended_at = result.started_at + duration_s
    else:
        result.ended_at = min(time.time(), result.started_at + duration_s)
    return result


async def _open(
    loop: asyncio.AbstractEventLoop, host: str, port: int, timeout_s: float
) -> _ClientProtocol | None:
    """Open one connection, or return None when it is refused or times out."""
    try:
        _, protocol = await asyncio.wait_for(
            loop.create_connection(_ClientProtocol, host, port), timeout_s
        )
    except (OSError, TimeoutError):
        return None
    return protocol


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    loop.call_soon_threadsafe(callback)


def _close(protocol: _ClientProtocol) -> None:
    if protocol.transport is not None:
        protocol.transport.close()


def main(argv: list[str] | None = None) -> None:
    """Run one load run as a process and write its result as JSON to ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m bgapi.compare.load", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", action="append", required=True, help="Request path (repeatable).")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True, help="Seconds of load.")
    parser.add_argument("--start-at", type=float, default=None, help="Wall-clock start time.")
    parser.add_argument("--rate", type=float, default=0.0, help="Requests/s; 0: unpaced.")
    parser.add_argument("--max-requests", type=int, default=DEFAULT_MAX_REQUESTS)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)

    async def run() -> LoadResult:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        watch_parent(lambda: _call_soon(loop, task.cancel))
        return await run_load(
            args.host,
            args.port,
            args.path,
            concurrency=args.concurrency,
            duration_s=args.duration,
            start_at=args.start_at,
            rate=args.rate,
            max_requests=args.max_requests,
            timeout_s=args.timeout,
        )

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    runner = asyncio.Runner(loop_factory=event_loop_factory(not args.no_uvloop))
    with runner, contextlib.suppress(asyncio.CancelledError):
        result = runner.run(run())
        args.out.write_text(json.dumps(result.to_dict()), encoding="utf-8")


if __name__ == "__main__":
    main()
