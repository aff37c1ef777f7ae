"""Shared pytest fixtures."""

from collections.abc import Iterator

import pytest
from upstream import Upstream


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """Start a plain-HTTP ``Upstream`` for one test and stop it at teardown."""
    with Upstream() as server:
        yield server


@pytest.fixture
def tls_upstream() -> Iterator[Upstream]:
    """Start an HTTPS ``Upstream`` for one test and stop it at teardown.

    Clients trust it with ``verify=tls_upstream.client_ssl_context()``.
    """
    with Upstream(tls=True) as server:
        yield server
