"""Crashes and a failing disk: what ``bgapi run-all`` keeps and how it reports a loss.

The SIGKILL test kills the real process at random moments. Every result the
API reported before the kill must be in the SQLite file afterwards, and the
file must pass ``PRAGMA integrity_check``. The restarted poller must not
replay the slots it missed while it was down. The store tests make the
store's directory or file read-only, or cap the file size the way a full
disk does, and expect a clear message instead of a silent loss.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from helpers import cli_env, free_port, render_config, run_bgapi, wait_until
from upstream import Upstream

from bgapi.poll import format_timestamp

FAST_PATH = "/status/200"
FAST_INTERVAL_S = 0.1
KILL_ROUNDS = 4
# Random kill moments after the API is up, in seconds.
KILL_DELAY_S = (0.0, 1.2)
# Downtime before the last restart: 10 missed slots of the fast target.
DOWNTIME_S = 1.0
BURST_WINDOW_S = 1.0
# Set BGAPI_TEST_SEED to replay the kill moments of a failed run.
SEED = int(os.environ.get("BGAPI_TEST_SEED", str(random.randrange(1 << 30))))

ResultKey = tuple[str, str, float]


def durability_config(tmp_path: Path, upstream: Upstream) -> Path:
    text = render_config(
        store={"path": tmp_path / "bgapi.db", "retention": 100_000},
        targets=[
            {"name": "fast", "url": upstream.url(FAST_PATH), "interval": FAST_INTERVAL_S},
            {"name": "down", "url": upstream.url("/status/500"), "interval": 0.15},
            {"name": "json", "url": upstream.url("/json"), "interval": 0.2, "timeout": 1},
        ],
    )
    path = tmp_path / "durability.toml"
    path.write_text(text, encoding="utf-8")
    return path


def result_key(target: str, result: dict[str, Any]) -> ResultKey:
    return (target, result["started_at"], result["elapsed_ms"])


def reported_results(client: httpx.Client) -> set[ResultKey]:
    """Return every result the API shows: each target's results and last result."""
    keys: set[ResultKey] = set()
    for target in client.get("/api/targets").json():
        if target["last_result"] is not None:
            keys.add(result_key(target["name"], target["last_result"]))
        response = client.get(f"/api/targets/{target['name']}/results", params={"limit": 1000})
        keys.update(result_key(target["name"], result) for result in response.json())
    return keys


def stored_results(db_path: Path) -> set[ResultKey]:
    """Read the results table straight from SQLite, after a crash."""
    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        rows = connection.execute("SELECT target, started_at, elapsed_ms FROM results").fetchall()
    return {
        (target, format_timestamp(started_at), elapsed_ms)
        for target, started_at, elapsed_ms in rows
    }


def integrity(db_path: Path) -> str:
    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])


def test_sigkill_loses_no_reported_result(upstream: Upstream, tmp_path: Path) -> None:
    config = durability_config(tmp_path, upstream)
    db_path = tmp_path / "bgapi.db"
    rng = random.Random(SEED)
    reported: set[ResultKey] = set()

    for round_index in range(KILL_ROUNDS):
        mode = ("thread", "asyncio")[round_index % 2]
        with run_bgapi(config, "--mode", mode) as running:
            time.sleep(rng.uniform(*KILL_DELAY_S))
            reported |= reported_results(running.client)
            outcome = running.stop(signal.SIGKILL)

        assert outcome.returncode == -signal.SIGKILL
        missing = reported - stored_results(db_path)
        assert not missing, (
            f"seed {SEED}, round {round_index}: {len(missing)} lost, e.g. {min(missing)}"
        )
        assert integrity(db_path) == "ok", f"seed {SEED}, round {round_index}"

    assert len(reported) > KILL_ROUNDS, "the API reported too few results to test anything"


def test_restart_after_kill_no_burst(upstream: Upstream, tmp_path: Path) -> None:
    config = durability_config(tmp_path, upstream)
    with run_bgapi(config) as running:
        running.wait_for(lambda target: target["runs"] >= 3, "/api/targets/fast")
        running.stop(signal.SIGKILL)
    time.sleep(DOWNTIME_S)
    upstream.clear()

    with run_bgapi(config) as running:
        assert upstream.wait_for_hits(FAST_PATH, 1, 10.0)
        first = upstream.requests_for(FAST_PATH)[0].received_at
        wait_until(lambda: time.monotonic() > first + BURST_WINDOW_S + 0.2, 5.0)
        hits = [r.received_at for r in upstream.requests_for(FAST_PATH)]

    in_window = [hit for hit in hits if hit <= first + BURST_WINDOW_S]
    expected = BURST_WINDOW_S / FAST_INTERVAL_S
    # Replaying the missed slots would add DOWNTIME_S / FAST_INTERVAL_S = 10 polls.
    assert len(in_window) <= expected + 2, f"{len(in_window)} polls in {BURST_WINDOW_S} s"
    assert len(in_window) >= expected / 2, f"{len(in_window)} polls in {BURST_WINDOW_S} s"
    assert integrity(tmp_path / "bgapi.db") == "ok"


# Read-only and full stores -------------------------------------------------------------


def drop_file_permission_override() -> None:
    """Make root subject to file permissions in the child, as any other user is.

    Root bypasses mode bits through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH.
    Removing them from the bounding set before exec removes them from the
    program that exec starts.
    """
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def can_drop_capabilities() -> bool:
    if os.geteuid() != 0:
        return True
    probe = subprocess.run(
        [sys.executable, "-c", "pass"], preexec_fn=drop_file_permission_override, check=False
    )
    return probe.returncode == 0


def run_restricted(
    args: list[str], cwd: Path, timeout_s: float = 30.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bgapi", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        preexec_fn=drop_file_permission_override,
        check=False,
    )


needs_permissions = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not can_drop_capabilities(),
    reason="needs Linux, and prctl(PR_CAPBSET_DROP) when run as root",
)


@pytest.fixture
def restore_mode() -> Iterator[Callable[[Path, int], None]]:
    """Chmod paths for a test and restore their modes afterwards, so tmp_path can be removed."""
    changed: list[tuple[Path, int]] = []

    def chmod(path: Path, mode: int) -> None:
        changed.append((path, path.stat().st_mode))
        path.chmod(mode)

    yield chmod
    for path, mode in reversed(changed):
        path.chmod(mode)


@needs_permissions
def test_read_only_directory_clear_error(
    upstream: Upstream, tmp_path: Path, restore_mode: Callable[[Path, int], None]
) -> None:
    store_dir = tmp_path / "readonly"
    store_dir.mkdir()
    restore_mode(store_dir, 0o555)
    config = tmp_path / "readonly.toml"
    config.write_text(
        render_config(
            store={"path": store_dir / "bgapi.db"},
            targets=[{"name": "fast", "url": upstream.url(FAST_PATH)}],
        ),
        encoding="utf-8",
    )

    for command in (["run-all", "--port", str(free_port())], ["poll-once"]):
        completed = run_restricted([*command, "--config", str(config)], cwd=tmp_path)

        assert completed.returncode == 1, completed
        assert "cannot open the store" in completed.stderr
        assert str(store_dir / "bgapi.db") in completed.stderr
        assert "writable" in completed.stderr
        assert "Traceback" not in completed.stderr


@needs_permissions
def test_read_only_file_clear_error(
    upstream: Upstream, tmp_path: Path, restore_mode: Callable[[Path, int], None]
) -> None:
    config = tmp_path / "readonly.toml"
    config.write_text(
        render_config(
            store={"path": tmp_path / "bgapi.db"},
            targets=[{"name": "fast", "url": upstream.url(FAST_PATH)}],
        ),
        encoding="utf-8",
    )
    first = run_restricted(["poll-once", "--config", str(config)], cwd=tmp_path)
    assert first.returncode == 0, first
    restore_mode(tmp_path / "bgapi.db", 0o444)

    completed = run_restricted(["poll-once", "--config", str(config)], cwd=tmp_path)

    assert completed.returncode == 1, completed
    assert "cannot open the store" in completed.stderr
    assert "readonly" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs prlimit (Linux)")
def test_full_disk_reported_not_silent(upstream: Upstream, tmp_path: Path) -> None:
    config = tmp_path / "full.toml"
    db_path = tmp_path / "bgapi.db"
    config.write_text(
        render_config(
            store={"path": db_path},
            targets=[{"name": "fast", "url": upstream.url(FAST_PATH), "interval": 0.02}],
        ),
        encoding="utf-8",
    )

    with run_bgapi(config) as running:
        running.wait_for(lambda target: target["runs"] >= 3, "/api/targets/fast")
        # RLIMIT_FSIZE makes writes past the limit fail with EFBIG, the way a full
        # disk fails them with ENOSPC; SQLite reports both as a write error.
        # Python ignores SIGXFSZ, so the process lives on. The log file is far
        # below the limit, so logging still works.
        limit = max(path.stat().st_size for path in tmp_path.glob("bgapi.db*")) + 4096
        psutil.Process(running.process.pid).rlimit(psutil.RLIMIT_FSIZE, (limit, limit))

        assert wait_until(lambda: running.get("/healthz").status_code == 503, 10.0), (
            running.output()
        )
        health = running.get("/healthz").json()
        poller = running.get("/api/poller").json()
        outcome = running.stop(signal.SIGTERM)

    assert "cannot write to the store" in health["reason"]
    assert "free disk space" in health["reason"]
    assert "cannot write to the store" in (poller["error"] or "")
    assert "results were not stored" in outcome.output
    assert "Traceback" not in outcome.output
    assert outcome.returncode == 0
