"""The thread runner's selector: timeouts never end early, ready I/O never waits."""

from __future__ import annotations

import selectors
import socket
import time

import pytest

from bgapi.runners.thread import PreciseEpollSelector

pytestmark = pytest.mark.skipif(
    not hasattr(selectors, "EpollSelector"), reason="epoll is Linux-only"
)


def test_selector_timeout_never_ends_early() -> None:
    selector = PreciseEpollSelector()
    try:
        for timeout in (0.0005, 0.003, 0.009, 0.0101, 0.05):
            start = time.monotonic()
            assert selector.select(timeout) == []
            assert time.monotonic() - start >= timeout
    finally:
        selector.close()


def test_selector_returns_ready_socket_at_once() -> None:
    left, right = socket.socketpair()
    selector = PreciseEpollSelector()
    try:
        selector.register(left, selectors.EVENT_READ)
        right.send(b"x")
        start = time.monotonic()
        ready = selector.select(30)
        elapsed = time.monotonic() - start

        assert [key.fileobj for key, _ in ready] == [left]
        assert elapsed < 10, "a ready socket waited for the timeout"
    finally:
        selector.close()
        left.close()
        right.close()

