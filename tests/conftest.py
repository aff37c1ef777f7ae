"""Shared pytest fixtures."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ConfigWriter
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


@pytest.fixture
def make_config(tmp_path: Path) -> ConfigWriter:
    """Return a ``helpers.ConfigWriter`` that writes TOML configs into ``tmp_path``."""
    return ConfigWriter(tmp_path)
