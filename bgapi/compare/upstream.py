"""The built-in upstream that ``bgapi compare`` polls: a small, fast HTTP/1.1 server.

It responds to every request with the same small Statuspage-like JSON document,
keeps connections open, and parses only what HTTP/1.1 keep-alive needs (the
end of the head, ``Content-Length`` and ``Connection: close``). A raw asyncio
protocol instead of a framework keeps it at thousands of requests per second
on one core, so that the upstream is never what a benchmark measures. It uses
uvloop when that is installed.

Run it as ``python -m bgapi.compare.upstream``: it binds a random port on
127.0.0.1, prints the port on its first stdout line, and serves until SIGTERM,
SIGINT, the end of ``--max-seconds`` or the death of its parent process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import cast

from bgapi.parent_watch import watch_parent

__all__ = ["BODY", "UpstreamProtocol", "serve"]

BODY = b'{"status": "ok", "page": {"name": "bgapi-compare"}, "components": []}'
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(BODY)).encode() + b"\r\n"
    b"\r\n" + BODY
)
_CLOSE_RESPONSE = _RESPONSE.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
# A request head longer than this is not a client of ours: close the connection.
MAX_HEAD_BYTES = 16 * 1024
# The upstream stops by itself after this many seconds, even without a signal.
DEFAULT_MAX_SECONDS = 3600.0


class UpstreamProtocol(asyncio.Protocol):
    """Respond to each HTTP/1.1 request on one connection with the fixed JSON document."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        # Body bytes of the current request still to skip.
        self._skip = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        self._buffer += data
        while True:
            if self._skip:
                skipped = min(self._skip, len(self._buffer))
                del self._buffer[:skipped]
                self._skip -= skipped
                if self._skip:
                    return
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    transport.write(_BAD_REQUEST)
                    transport.close()
                return
            head = bytes(self._buffer[:end]).lower()
            del self._buffer[: end + 4]
            self._skip = _content_length(head)
            if self._skip < 0:
                transport.write(_BAD_REQUEST)
                transport.close()
                return
            request_line = head.split(b"\r\n", 1)[0]
            if b"\r\nconnection: close" in head or request_line.endswith(b" http/1.0"):
                transport.write(_CLOSE_RESPONSE)
                transport.close()
                return
            transport.write(_RESPONSE)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


def _content_length(head: bytes) -> int:
    """Return the request's Content-Length (0 when absent, -1 when invalid)."""
    marker = b"\r\ncontent-length:"
    start = head.find(marker)
    if start < 0:
        return 0
    line_end = head.find(b"\r\n", start + len(marker))
    value = head[start + len(marker) : line_end if line_end >= 0 else len(head)].strip()
    return int(value) if value.isdigit() else -1


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    max_seconds: float = DEFAULT_MAX_SECONDS,
) -> None:
    """Serve the fixed document on ``host:port`` until ``stop`` is set or ``max_seconds`` pass.

    Args:
        host: Address to bind.
        port: Port to bind; 0 picks a free one.
        ready: Called with the bound port once the server accepts connections.
        stop: Set it to stop the server; None serves until the time limit.
        max_seconds: Upper bound on the server's life.
    """
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(bound)
    stop = stop or asyncio.Event()
    async with server:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max_seconds)


def event_loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    loop.call_soon_threadsafe(callback)


def main(argv: list[str] | None = None) -> None:
    """Run the upstream as a process: print the port, serve until a signal or the time limit."""
    parser = argparse.ArgumentParser(prog="python -m bgapi.compare.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    parser.add_argument("--no-uvloop", action="store_true", help="Use asyncio's own event loop.")
    args = parser.parse_args(argv)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watch_parent(lambda: _call_soon(loop, stop.set))

        def ready(port: int) -> None:
            sys.stdout.write(f"{port}\n")
            sys.stdout.flush()

        await serve(args.host, args.port, ready=ready, stop=stop, max_seconds=args.max_seconds)

    with asyncio.Runner(loop_factory=event_loop_factory(not args.no_uvloop)) as runner:
        runner.run(run())


if __name__ == "__main__":
    main()
