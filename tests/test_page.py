"""The status page at / rendered by a real headless Chromium against a real server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from upstream import Upstream

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Chromium (.ci/run), so there a missing browser is a failure.
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true",
    reason="Chromium is not installed (apt-get install chromium)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(upstream: Upstream, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    config = tmp_path / "bgapi.toml"
    config.write_text(
        f"""
[server]
port = {port}
[store]
path = "{tmp_path / 'bgapi.db'}"
[[targets]]
name = "healthy-api"
url = "{upstream.url('/ok')}"
interval = 0.5
[[targets]]
name = "broken-api"
url = "{upstream.url('/status/503')}"
interval = 0.5
""",
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "bgapi", "run-all", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        states: dict[str, str] = {}
        while time.monotonic() < deadline and process.poll() is None:
            try:
                states = {t["name"]: t["state"] for t in httpx.get(f"{base}/api/targets").json()}
            except httpx.HTTPError:
                pass
            if states and "unknown" not in states.values():
                break
            time.sleep(0.1)
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        assert states and "unknown" not in states.values(), f"targets never polled: {states}"
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def dump_dom(url: str, profile: Path) -> str:
    """Return the DOM of ``url`` after headless Chromium ran its scripts."""
    assert CHROMIUM is not None, "CI must install Chromium: apt-get install chromium"
    completed = subprocess.run(  # noqa: PLW1510 - the DOM is checked, not the exit code
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            # Lets scripts and their fetches finish before the DOM is dumped. It
            # stays below the status page's 10 s reload, which would blank the dump.
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return completed.stdout


def test_status_page_in_chromium(server: str, tmp_path: Path) -> None:
    dom = dump_dom(f"{server}/", tmp_path / "chromium")
    assert '<tr data-target="healthy-api">' in dom
    assert '<tr data-target="broken-api">' in dom
    assert '<span class="state up">up</span>' in dom
    assert '<span class="state down">down</span>' in dom
    assert "status &lt; 300 (status is 503)" in dom or "status is 503" in dom
    assert "1 up, 1 down, 0 unknown" in dom


def test_docs_render_offline(server: str, tmp_path: Path) -> None:
    # Swagger UI comes from the installed package: no CDN, so this works
    # on a machine without internet access.
    dom = dump_dom(f"{server}/docs", tmp_path / "chromium")
    assert "/api/targets/{name}/results" in dom
    assert "/api/poller" in dom
    assert "cdn." not in dom
