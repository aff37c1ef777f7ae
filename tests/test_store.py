"""The SQLite store: ordering, retention, state round-trips, WAL and commit-before-show."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until
from upstream import Upstream

from bgapi.config import config_from_dict
from bgapi.errors import StoreError
from bgapi.poll import ErrorKind, PollResult, format_timestamp
from bgapi.poller import LoopResources, Poller
from bgapi.schedule import run_schedule
from bgapi.state import State, TargetStatus
from bgapi.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "results.db", retention=1000)
    opened.open()
    yield opened
    opened.close()


def _result(target: str, index: int, ok: bool = True) -> PollResult:
    return PollResult(
        target=target,
        ok=ok,
        scheduled_at=1_700_000_000.0 + index,
        started_at=1_700_000_000.0 + index + 0.001,
        elapsed_ms=float(index),
        status_code=200 if ok else 503,
        error_kind=None if ok else ErrorKind.HTTP_STATUS,
        error=None if ok else "status == 200 failed: got 503",
        failed_conditions=[] if ok else ["status == 200 failed: got 503"],
        lateness_ms=0.5,
    )


def _save_all(store: Store, results: list[PollResult], status: TargetStatus | None = None) -> None:
    async def save() -> None:
        for result in results:
            await store.save(result, status or TargetStatus(result.target))

    asyncio.run(save())


def _rows(path: Path, query: str, *params: object) -> list[tuple[object, ...]]:
    """Read with a fresh connection, as another process would."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute(query, params).fetchall()


def test_results_newest_first_with_limit(store: Store) -> None:
    _save_all(store, [_result("a", index) for index in range(10)])
    _save_all(store, [_result("b", 100)])

    newest = store.results("a", limit=3)

    assert [row["elapsed_ms"] for row in newest] == [9.0, 8.0, 7.0]
    assert len(store.results("a", limit=100)) == 10
    assert [row["target"] for row in store.results("b")] == ["b"]
    assert store.results("missing") == []


def test_result_round_trip(store: Store) -> None:
    original = _result("a", 1, ok=False)
    _save_all(store, [original])

    (row,) = store.results("a")

    assert row == original.to_dict()
    assert row["error_kind"] == "http_status"
    assert row["failed_conditions"] == ["status == 200 failed: got 503"]
    assert row["started_at"] == format_timestamp(original.started_at)


def test_retention_prunes_oldest(tmp_path: Path) -> None:
    store = Store(tmp_path / "small.db", retention=10)
    store.open()
    try:
        _save_all(store, [_result("a", index) for index in range(50)])
        _save_all(store, [_result("b", index) for index in range(3)])

        kept = store.count("a")
        newest = store.results("a", limit=1)
    finally:
        store.close()

    # Pruning runs every retention/10 writes, so at most 10 % extra remain.
    assert 10 <= kept <= 11
    assert newest[0]["elapsed_ms"] == 49.0
    assert store.count("b") == 3


def test_save_is_committed_when_it_returns(store: Store) -> None:
    _save_all(store, [_result("a", 7)])

    rows = _rows(store.path, "SELECT target, elapsed_ms FROM results")

    assert rows == [("a", 7.0)]


def test_wal_mode(store: Store) -> None:
    (mode,) = _rows(store.path, "PRAGMA journal_mode")[0]

    assert mode == "wal"
    assert Path(str(store.path) + "-wal").exists()


def test_state_round_trips_through_restore(tmp_path: Path) -> None:
    config = config_from_dict(
        {
            "store": {"path": str(tmp_path / "state.db")},
            "targets": [
                {"name": "a", "url": "http://127.0.0.1:9/"},
                {"name": "b", "url": "http://127.0.0.1:9/"},
            ],
        }
    )
    status = TargetStatus(
        "a",
        state=State.DOWN,
        consecutive_failures=4,
        last_success_at=1_700_000_000.5,
        last_change_at=1_700_000_100.25,
    )
    last = _result("a", 3, ok=False)
    store = Store(config.store.path)
    store.open()
    try:
        _save_all(store, [_result("a", 2), last], status)
    finally:
        store.close()

    reopened = Store(config.store.path)
    reopened.open()
    try:
        poller = Poller(config, reopened)
        poller.restore()
        restored = poller.status("a")
        untouched = poller.status("b")
    finally:
        reopened.close()

    assert restored is not None
    assert restored.state is State.DOWN
    assert restored.consecutive_failures == 4
    assert restored.consecutive_successes == 0
    assert restored.last_success_at == 1_700_000_000.5
    assert restored.last_change_at == 1_700_000_100.25
    assert restored.last_result is not None
    assert restored.last_result.to_dict() == last.to_dict()
    assert untouched is not None
    assert untouched.state is State.UNKNOWN
    assert untouched.last_result is None


def test_older_result_keeps_newer_state(store: Store) -> None:
    newer = _result("a", 5, ok=False)
    older = _result("a", 1)
    _save_all(store, [newer], TargetStatus("a", state=State.DOWN, consecutive_failures=1))

    # The older poll commits last, as a scheduled poll of the process mode's
    # child can after a poll on request in the server.
    _save_all(store, [older], TargetStatus("a", state=State.UP, consecutive_successes=1))

    state = store.states()["a"]
    assert state["state"] == "down"
    assert state["last_result"].started_at == newer.started_at
    assert state["consecutive_failures"] == 1
    assert store.count("a") == 2


def test_states_after_result_id_returns_changed_only(store: Store) -> None:
    _save_all(store, [_result("a", 1), _result("b", 2)])
    everything = store.states()
    seen = max(state["last_result_id"] for state in everything.values())
    _save_all(store, [_result("b", 3)])

    changed = store.states(after_result_id=seen)

    assert set(everything) == {"a", "b"}
    assert set(changed) == {"b"}
    assert changed["b"]["last_result"].started_at == _result("b", 3).started_at
    assert store.states(after_result_id=changed["b"]["last_result_id"]) == {}


def test_restore_changed_only_keeps_full_precision(tmp_path: Path) -> None:
    config = config_from_dict(
        {
            "store": {"path": str(tmp_path / "state.db")},
            "targets": [{"name": "a", "url": "http://127.0.0.1:9/"}],
        }
    )
    store = Store(config.store.path)
    store.open()
    try:
        poller = Poller(config, store)
        poller.restore(changed_only=True)
        empty = poller.status("a")
        precise = _result("a", 1)
        precise.started_at = 1_700_000_001.123456
        _save_all(store, [precise])
        poller.restore(changed_only=True)
        restored = poller.status("a")
    finally:
        store.close()

    assert empty is not None and empty.last_result is None
    assert restored is not None and restored.last_result is not None
    # Timestamps come back as stored, not rounded to the API's milliseconds.
    assert restored.last_result.started_at == 1_700_000_001.123456


def test_open_in_missing_directory(tmp_path: Path) -> None:
    store = Store(tmp_path / "no" / "such" / "dir" / "x.db")

    with pytest.raises(StoreError, match=r"cannot open the store .*x\.db.*\[store\] path"):
        store.open()


def test_save_on_closed_store_raises(tmp_path: Path) -> None:
    store = Store(tmp_path / "closed.db")

    with pytest.raises(StoreError, match="not open"):
        _save_all(store, [_result("a", 1)])


def test_save_blocking_from_thread(store: Store) -> None:
    errors: list[BaseException] = []

    def save() -> None:
        try:
            store.save_blocking(_result("t", 1), TargetStatus("t"))
        except BaseException as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    thread = threading.Thread(target=save)
    thread.start()
    thread.join(10)

    assert errors == []
    assert store.count("t") == 1


def test_close_flushes_queue(tmp_path: Path) -> None:
    store = Store(tmp_path / "flush.db")
    store.open()
    done: list[BaseException | None] = []
    for index in range(200):
        store.submit(_result("a", index), TargetStatus("a"), done.append)

    store.close()

    assert len(done) == 200
    assert all(error is None for error in done)
    assert _rows(tmp_path / "flush.db", "SELECT count(*) FROM results") == [(200,)]


def test_commit_delay_gathers_results(tmp_path: Path) -> None:
    store = Store(tmp_path / "delay.db", commit_delay_s=0.3)
    store.open()
    committed: list[float] = []
    submitted = time.monotonic()
    for index in range(5):
        store.submit(_result("a", index), TargetStatus("a"), lambda error: committed.append(time.monotonic()))

    assert wait_until(lambda: len(committed) == 5, 10.0)
    store.close()

    # One transaction after the delay, so no result committed before it ended.
    assert min(committed) - submitted >= 0.3
    assert _rows(tmp_path / "delay.db", "SELECT count(*) FROM results") == [(5,)]


def test_close_ends_commit_delay(tmp_path: Path) -> None:
    store = Store(tmp_path / "delay-close.db", commit_delay_s=60.0)
    store.open()
    done: list[BaseException | None] = []
    for index in range(3):
        store.submit(_result("a", index), TargetStatus("a"), done.append)
    started = time.monotonic()

    store.close()

    assert time.monotonic() - started < 30.0
    assert done == [None, None, None]
    assert _rows(tmp_path / "delay-close.db", "SELECT count(*) FROM results") == [(3,)]


def test_close_timeout_logs_lost_results(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "locked.db"
    store = Store(path)
    store.open()
    locker = sqlite3.connect(path, timeout=0)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        for index in range(3):
            store.submit(_result("a", index), TargetStatus("a"), lambda error: None)

        store.close(timeout=0.3)
    finally:
        locker.rollback()
        locker.close()

    assert "the store writer did not finish within 0.3 s; about 3 results were not stored" in caplog.text


def test_close_closes_every_thread_reader(tmp_path: Path) -> None:
    path = tmp_path / "readers.db"
    store = Store(path)
    store.open()
    store.submit(_result("a", 0), TargetStatus("a"), lambda error: None)
    readers = [threading.Thread(target=store.results, args=("a", 10)) for _ in range(3)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(10)

    store.close()

    # SQLite removes the WAL file when the last connection to the database closes.
    assert not Path(f"{path}-wal").exists()


def test_read_error_raises_store_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "race.db")
    store.open()
    try:
        # close() on another thread can close a read connection between its
        # lookup and the query. Closing it here has the same effect.
        store._connect_for_reading().close()

        for read in (lambda: store.results("a"), store.states, store.count):
            with pytest.raises(StoreError, match="cannot read the store .*closed database"):
                read()
    finally:
        store.close()


def test_reader_reconnects_after_close(tmp_path: Path) -> None:
    store = Store(tmp_path / "reopen.db")
    store.open()
    store.submit(_result("a", 0), TargetStatus("a"), lambda error: None)
    store.results("a", 10)  # opens this thread's read connection
    store.close()

    store.open()

    assert len(store.results("a", 10)) == 1
    store.close()


def test_shown_result_already_on_disk(tmp_path: Path, upstream: Upstream) -> None:
    """Whatever ``Poller.status`` shows has committed, checked while polls run."""
    path = tmp_path / "shown.db"
    config = config_from_dict(
        {
            "store": {"path": str(path)},
            "targets": [{"name": "t", "url": upstream.url("/ok"), "interval": 0.01}],
        }
    )
    store = Store(path)
    store.open()
    poller = Poller(config, store)
    missing: list[str] = []
    checked = 0

    async def watch() -> None:
        nonlocal checked
        resources = LoopResources(config)
        task = asyncio.create_task(run_schedule(poller, resources))
        deadline = time.monotonic() + 5.0
        try:
            while checked < 50 and time.monotonic() < deadline:
                await asyncio.sleep(0.003)
                status = poller.status("t")
                if status is None or status.last_result is None:
                    continue
                started_at = status.last_result.started_at
                found = _rows(path, "SELECT count(*) FROM results WHERE started_at = ?", started_at)
                checked += 1
                if found != [(1,)]:
                    missing.append(format_timestamp(started_at))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await resources.aclose()

    try:
        asyncio.run(watch())
    finally:
        store.close()

    assert checked >= 50
    assert missing == []


def test_writer_survives_closed_caller_loop(store: Store) -> None:
    """A save whose event loop closed before the commit must not stop the writer."""
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # hold the write lock so the save stays pending

    async def abandon_save() -> None:
        asyncio.get_running_loop().create_task(store.save(_result("a", 1), TargetStatus("a")))
        await asyncio.sleep(0.05)
        # asyncio.run() now cancels the pending save and closes this loop.

    try:
        asyncio.run(abandon_save())
    finally:
        blocker.execute("COMMIT")
        blocker.close()

    async def save_again() -> None:
        await asyncio.wait_for(store.save(_result("a", 2), TargetStatus("a")), timeout=5.0)

    asyncio.run(save_again())

    assert store.count("a") == 2


def test_open_rejects_foreign_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE users (id INTEGER)")
    connection.execute("PRAGMA user_version = 99")
    connection.commit()
    connection.close()

    with pytest.raises(StoreError, match="another program's SQLite database"):
        Store(path).open()

    # The other program's file is left as it was.
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == 99
    connection.close()
