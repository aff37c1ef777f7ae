"""The result store: SQLite in WAL mode, written by one dedicated thread.

Writes go through a queue to a writer thread that commits them in batches, so
no event loop ever waits on the disk. :meth:`Store.save` resolves only after
the transaction holding the result has committed: a result that the API has
shown is already on disk. Reads open their own connection per thread, which
WAL mode lets run beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bgapi.errors import StoreError
from bgapi.poll import ErrorKind, PollResult
from bgapi.state import TargetStatus

__all__ = ["Store"]

logger = logging.getLogger(__name__)

# Stored as PRAGMA user_version; raise it when the schema changes.
SCHEMA_VERSION = 1
# Commit at most this many results in one transaction.
MAX_BATCH = 500
# How long close() waits for the writer to flush what is queued.
CLOSE_TIMEOUT_S = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    target TEXT NOT NULL,
    ok INTEGER NOT NULL,
    scheduled_at REAL NOT NULL,
    started_at REAL NOT NULL,
    elapsed_ms REAL NOT NULL,
    status_code INTEGER,
    error_kind TEXT,
    error TEXT,
    failed_conditions TEXT NOT NULL,
    lateness_ms REAL
);
CREATE INDEX IF NOT EXISTS results_by_target ON results (target, id);
CREATE TABLE IF NOT EXISTS target_state (
    target TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    consecutive_successes INTEGER NOT NULL,
    consecutive_failures INTEGER NOT NULL,
    last_success_at REAL,
    last_change_at REAL,
    last_result_id INTEGER
);
"""

_INSERT_RESULT = """
INSERT INTO results (target, ok, scheduled_at, started_at, elapsed_ms, status_code,
                     error_kind, error, failed_conditions, lateness_ms)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

# Two processes can write a target's state: the process mode's child and the
# server, for a poll on request. A result that started before the one the
# state already shows does not replace it, whichever commits last.
_UPSERT_STATE = """
INSERT INTO target_state (target, state, consecutive_successes, consecutive_failures,
                          last_success_at, last_change_at, last_result_id)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (target) DO UPDATE SET
    state = excluded.state,
    consecutive_successes = excluded.consecutive_successes,
    consecutive_failures = excluded.consecutive_failures,
    last_success_at = excluded.last_success_at,
    last_change_at = excluded.last_change_at,
    last_result_id = excluded.last_result_id
WHERE NOT EXISTS (
    SELECT 1 FROM results AS shown
    WHERE shown.id = target_state.last_result_id
      AND shown.started_at > (SELECT started_at FROM results WHERE id = excluded.last_result_id)
)
"""

_PRUNE = """
DELETE FROM results WHERE target = ? AND id <= (
    SELECT id FROM results WHERE target = ? ORDER BY id DESC LIMIT 1 OFFSET ?
)
"""


@dataclass(slots=True)
class _Write:
    """A queued result: ``done`` is called after the commit, or ``future`` settled on its loop."""

    result: PollResult
    status: tuple[Any, ...]
    done: Callable[[BaseException | None], None] | None = None
    future: asyncio.Future[None] | None = None


_STOP = object()


class Store:
    """A SQLite file of poll results and the last known state of each target."""

    def __init__(self, path: str | Path, retention: int = 1000, commit_delay_s: float = 0.0) -> None:
        """Set up a store for the file at ``path``, which :meth:`open` creates or opens.

        Args:
            path: The SQLite file.
            retention: Results kept per target; older ones are pruned.
            commit_delay_s: How long the writer waits after a result arrives
                before it commits, to gather the results that follow into the
                same transaction. Each commit wakes the writer thread and each
                waiting event loop, so a delay saves CPU when results arrive
                one at a time, and delays every result by up to this much.
        """
        self.path = Path(path)
        self.retention = retention
        self.commit_delay_s = commit_delay_s
        self._queue: queue.SimpleQueue[_Write | object] = queue.SimpleQueue()
        # Set by close(), so that a writer waiting out the commit delay commits at once.
        self._closing = threading.Event()
        # Writes queued since the store was created, and writes the writer has
        # finished (committed or failed). Only the writer thread changes _finished.
        self._submitted = 0
        self._submitted_lock = threading.Lock()
        self._finished = 0
        self._writer: threading.Thread | None = None
        self._local = threading.local()
        # Every thread's read connection, so that close() can close them all.
        # SQLite removes the WAL file only when the last connection to the file closes.
        self._readers: set[sqlite3.Connection] = set()
        self._readers_lock = threading.Lock()
        self._since_prune: dict[str, int] = {}
        self._write_error: BaseException | None = None
        # Results lost since the current run of write errors began.
        self._unstored = 0

    def open(self) -> None:
        """Create the schema if needed and start the writer thread.

        Raises:
            StoreError: the file cannot be created, opened or written.
        """
        connection: sqlite3.Connection | None = None
        try:
            connection = self._connect()
            self._check_foreign(connection)
            connection.executescript(_SCHEMA)
            # Also a write probe: a read-only file or directory fails here, at
            # startup, instead of at the first result.
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            connection.commit()
        except sqlite3.Error as exc:
            if connection is not None:
                connection.close()
            raise StoreError(
                f"cannot open the store {str(self.path)!r}: {exc}; check that the directory "
                "exists and that it and the file are writable, or set [store] path"
            ) from None
        self._closing.clear()
        self._writer = threading.Thread(
            target=self._write_loop, args=(connection,), name="bgapi-store", daemon=True
        )
        self._writer.start()

    def _check_foreign(self, connection: sqlite3.Connection) -> None:
        """Raise StoreError if the file is another program's SQLite database."""
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        tables = {
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        ours = {"results", "target_state"}
        if version not in (0, SCHEMA_VERSION) or (tables and not tables & ours):
            connection.close()
            raise StoreError(
                f"the store {str(self.path)!r} is another program's SQLite database "
                f"(user_version {version}, tables: {', '.join(sorted(tables)) or 'none'}); "
                "set [store] path to a new file"
            )

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Commit what is queued, stop the writer thread and close connections.

        A writer that has not committed everything within ``timeout`` seconds
        (the file is locked or the disk stalls) is left behind, and the
        results it still holds are logged as lost.
        """
        if self._writer is not None:
            self._closing.set()
            self._queue.put(_STOP)
            self._writer.join(timeout)
            if self._writer.is_alive():
                logger.error(
                    "the store writer did not finish within %g s; about %d results were not stored",
                    timeout,
                    self.uncommitted,
                )
            self._writer = None
        with self._readers_lock:
            readers, self._readers = self._readers, set()
        for connection in readers:
            connection.close()
        self._local.connection = None

    @property
    def uncommitted(self) -> int:
        """The number of results queued or being written that the writer has not finished yet."""
        return self._submitted - self._finished

    async def save(self, result: PollResult, status: TargetStatus) -> None:
        """Store ``result`` and the target's state; return once both are committed.

        Raises:
            StoreError: the write failed (disk full, read-only file, ...).
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(result, status, future=future)
        await future

    def save_blocking(self, result: PollResult, status: TargetStatus) -> None:
        """Store ``result`` from a thread without an event loop; wait for the commit."""
        finished = threading.Event()
        errors: list[BaseException] = []

        def done(error: BaseException | None) -> None:
            if error is not None:
                errors.append(error)
            finished.set()

        self.submit(result, status, done)
        finished.wait(CLOSE_TIMEOUT_S)
        if errors:
            raise errors[0]

    def submit(
        self, result: PollResult, status: TargetStatus, done: Callable[[BaseException | None], None]
    ) -> None:
        """Queue a write; ``done`` is called from the writer thread after the commit."""
        self._enqueue(result, status, done=done)

    def _enqueue(
        self,
        result: PollResult,
        status: TargetStatus,
        *,
        done: Callable[[BaseException | None], None] | None = None,
        future: asyncio.Future[None] | None = None,
    ) -> None:
        if self._writer is None:
            error = StoreError("the store is not open")
            if future is not None:
                future.set_exception(error)
            elif done is not None:
                done(error)
            return
        row = (
            status.name,
            str(status.state),
            status.consecutive_successes,
            status.consecutive_failures,
            status.last_success_at,
            status.last_change_at,
        )
        with self._submitted_lock:
            self._submitted += 1
        self._queue.put(_Write(result, row, done, future))

    def results(self, target: str, limit: int = 100) -> list[dict[str, Any]]:
        """Return the newest ``limit`` results of ``target``, newest first."""
        query = "SELECT * FROM results WHERE target = ? ORDER BY id DESC LIMIT ?"
        with self._reading() as connection:
            return [_result_row(row) for row in connection.execute(query, (target, limit))]

    def states(self, after_result_id: int = 0) -> dict[str, dict[str, Any]]:
        """Return the stored state of every target, with its last :class:`PollResult`.

        With ``after_result_id``, return only the targets whose last result is
        newer than that result id: the states that changed since a previous call.
        """
        query = "SELECT s.*, r.* FROM target_state s LEFT JOIN results r ON r.id = s.last_result_id"
        parameters: tuple[int, ...] = ()
        if after_result_id:
            query += " WHERE s.last_result_id > ?"
            parameters = (after_result_id,)
        with self._reading() as connection:
            rows = connection.execute(query, parameters).fetchall()
        states = {}
        for row in rows:
            states[row["target"]] = {
                "state": row["state"],
                "consecutive_successes": row["consecutive_successes"],
                "consecutive_failures": row["consecutive_failures"],
                "last_success_at": row["last_success_at"],
                "last_change_at": row["last_change_at"],
                "last_result": _result(row) if row["id"] is not None else None,
                "last_result_id": row["last_result_id"],
            }
        return states

    def count(self, target: str | None = None) -> int:
        """Return how many results are stored, for one target or all."""
        with self._reading() as connection:
            if target is None:
                return int(connection.execute("SELECT count(*) FROM results").fetchone()[0])
            query = "SELECT count(*) FROM results WHERE target = ?"
            return int(connection.execute(query, (target,)).fetchone()[0])

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode loses no committed transaction when the process
        # dies, only on power loss, and avoids an fsync per commit.
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """Yield this thread's read connection, turning every SQLite error into StoreError.

        A read can fail after it started: the file locked for longer than
        the timeout, a disk error, or close() on another thread.
        """
        connection = self._connect_for_reading()
        try:
            yield connection
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store {str(self.path)!r}: {exc}") from None

    def _connect_for_reading(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None or connection not in self._readers:
            # None, or closed by close() since this thread last read.
            try:
                connection = self._connect()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the store {str(self.path)!r}: {exc}") from None
            self._local.connection = connection
            with self._readers_lock:
                self._readers.add(connection)
        return connection

    def _write_loop(self, connection: sqlite3.Connection) -> None:
        try:
            while True:
                batch: list[_Write] = []
                item = self._queue.get()
                stopping = item is _STOP
                if not stopping:
                    batch.append(item)  # type: ignore[arg-type]
                    if self.commit_delay_s > 0:
                        # Not a get() with a timeout: each put() would wake it.
                        self._closing.wait(self.commit_delay_s)
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                        continue
                    batch.append(item)  # type: ignore[arg-type]
                if batch:
                    self._write_batch(connection, batch)
                    self._finished += len(batch)
                if stopping and self._queue.empty():
                    return
        finally:
            connection.close()

    def _write_batch(self, connection: sqlite3.Connection, batch: list[_Write]) -> None:
        error: BaseException | None = None
        try:
            with connection:
                for write in batch:
                    result = write.result
                    cursor = connection.execute(
                        _INSERT_RESULT,
                        (
                            result.target,
                            int(result.ok),
                            result.scheduled_at,
                            result.started_at,
                            result.elapsed_ms,
                            result.status_code,
                            str(result.error_kind) if result.error_kind else None,
                            result.error,
                            json.dumps(result.failed_conditions),
                            result.lateness_ms,
                        ),
                    )
                    connection.execute(_UPSERT_STATE, (*write.status, cursor.lastrowid))
                    self._prune_if_due(connection, result.target)
        except sqlite3.Error as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                fix = "another program holds a lock on the file; stop it or let it finish"
            else:
                fix = "check the free disk space and that the file and its directory are writable"
            error = StoreError(f"cannot write to the store {str(self.path)!r}: {exc}; {fix}")
            # Logged once per distinct error; the count of lost results goes
            # into the line that reports the recovery.
            if self._write_error is None or str(self._write_error) != str(error):
                logger.error("%s; %d results were not stored", error, len(batch))
            self._write_error = error
            self._unstored += len(batch)
        else:
            if self._write_error is not None:
                logger.warning(
                    "the store %r accepts writes again; %d results were not stored meanwhile",
                    str(self.path),
                    self._unstored,
                )
            self._write_error = None
            self._unstored = 0
        _report(batch, error)

    def _prune_if_due(self, connection: sqlite3.Connection, target: str) -> None:
        # Pruning after every insert would double the writes; once per tenth of
        # the retention keeps the table within 110 % of it.
        count = self._since_prune.get(target, 0) + 1
        if count < max(1, self.retention // 10):
            self._since_prune[target] = count
            return
        self._since_prune[target] = 0
        connection.execute(_PRUNE, (target, target, self.retention))


def _report(batch: list[_Write], error: BaseException | None) -> None:
    """Tell every writer of ``batch`` that it committed, or failed with ``error``.

    Waking an event loop from another thread costs a system call, so each
    loop is woken once per batch rather than once per result.
    """
    waiting: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for write in batch:
        if write.future is not None:
            waiting.setdefault(write.future.get_loop(), []).append(write.future)
        elif write.done is not None:
            write.done(error)
    for loop, futures in waiting.items():
        # The loop may have closed meanwhile (a runner's thread stopped with
        # a save pending). Raising here would kill the writer thread and leave
        # every later save waiting forever.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, futures, error)


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _result(row: sqlite3.Row) -> PollResult:
    return PollResult(
        target=row["target"],
        ok=bool(row["ok"]),
        scheduled_at=row["scheduled_at"],
        started_at=row["started_at"],
        elapsed_ms=row["elapsed_ms"],
        status_code=row["status_code"],
        error_kind=ErrorKind(row["error_kind"]) if row["error_kind"] else None,
        error=row["error"],
        failed_conditions=json.loads(row["failed_conditions"]),
        lateness_ms=row["lateness_ms"],
    )


def _result_row(row: sqlite3.Row) -> dict[str, Any]:
    return _result(row).to_dict()
