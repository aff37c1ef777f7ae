"""Process strategy: the poller runs in a child process of the server.

In the thread strategy, polls and requests share one GIL. Every poll's Python
work (building the request, parsing the response, the store) then waits for
the server, and the server waits for it. Here the schedule, its HTTP clients
and its actions run in a process of their own, started and stopped with the
server, so polls and requests share only the CPU cores.

The child runs the schedule of the thread strategy, on an event loop that
waits with :class:`~bgapi.runners.thread.PreciseEpollSelector`, and commits
every result to the SQLite store. Every :data:`REPORT_S` seconds it sends
the server its run statistics (lateness, missed slots, next runs) over a
pipe. On each report the server reads the states that changed from the
store, so the API shows a result at most about :data:`REPORT_S` after its
commit.

Each wake-up of the child costs CPU that the server may need, so the child
wakes less often than the other strategies: its targets start in groups
(see :func:`~bgapi.schedule.start_offsets`), and its store commits the
results of :data:`COMMIT_DELAY_S` seconds in one transaction. A child
killed with SIGKILL therefore loses about that much of its latest results.
SIGTERM commits them, unless the store stays locked through the shutdown:
then the child logs how many it could not store.

Only HTTP targets run in the child. Custom jobs are functions of the app's
process, so this mode rejects them. A poll requested through the API runs in
the server process: its result is stored and shown, but the child's
thresholds do not count it. The child is started with a file descriptor
passed to it, so the mode needs a POSIX system.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bgapi.errors import RunnerError, StoreError
from bgapi.jobs import Job
from bgapi.parent_watch import watch_parent
from bgapi.poll import PollResult
from bgapi.poller import Poller
from bgapi.runners.base import Runner, RunState
from bgapi.state import TargetStatus

__all__ = ["ProcessRunner"]

logger = logging.getLogger(__name__)

# How often the child reports its runs, and the server refreshes the states.
REPORT_S = 0.25
# How long start() waits for the child to import bgapi and start its schedule.
START_TIMEOUT_S = 60.0
# The child's niceness increment: when the server and the poller both want a
# core, the kernel's scheduler runs the server first. At weight 110 against
# 1024 the poller still gets about a tenth of a busy core, more than 50 polls/s need.
CHILD_NICENESS = 10
# The child's store commits the results gathered over this long in one
# transaction. The server shows them only after its next report anyway.
COMMIT_DELAY_S = 0.1
# How long the child's store gets to commit its queue at shutdown: less than
# the 1.5 s after which the server kills the child, so that a loss is logged.
CLOSE_TIMEOUT_S = 1.0
# The child's targets start in groups this far apart (see start_offsets). 50 targets at
# 1 s make 10 wake-ups a second instead of 50, which halves the child's CPU
# time (benchmarks/wakeups.py on a 2-core virtual machine).
GROUP_STEP_S = 0.1
# How often the child checks that its parent is alive.
PARENT_CHECK_S = 0.5

Message = tuple[Any, ...]


class ProcessRunner(Runner):
    """Run the schedule in a child process, and stop it with SIGTERM."""

    mode = "process"

    def __init__(self, poller: Poller) -> None:
        super().__init__(poller)
        self._child: subprocess.Popen[bytes] | None = None
        self._events: Connection | None = None
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._restore_error: str | None = None
        # The child's peak resident memory, read just before it is stopped (Linux only).
        self.child_peak_rss_kb: int | None = None

    @property
    def child_pid(self) -> int | None:
        """The id of the polling child process, None before start."""
        return self._child.pid if self._child is not None else None

    @property
    def poller_pid(self) -> int | None:
        """The id of the child process while it polls."""
        return self.child_pid if self.polling else None

    async def _start(self) -> None:
        if os.name != "posix":
            self.state = RunState.IDLE
            raise RunnerError("the process mode needs Linux, macOS or another POSIX system")
        jobs = [target.name for target in self.poller.enabled_targets if isinstance(target, Job)]
        if jobs:
            self.state = RunState.IDLE
            raise RunnerError(
                f"the process mode runs HTTP targets only, and {len(jobs)} job(s) are registered "
                f"({', '.join(jobs[:3])}); use the thread or asyncio mode for custom jobs"
            )
        first = await asyncio.to_thread(self._launch)
        if first != ("ready",):
            code = self._child.poll() if self._child is not None else None
            self.state = RunState.CRASHED
            self.error = f"the poller process exited during startup (code {code})"
            raise RunnerError(self.error + "; the lines it logged above give the reason")
        self.state = RunState.RUNNING
        self._reader = threading.Thread(target=self._read, name="bgapi-process-reader", daemon=True)
        self._reader.start()

    def _launch(self) -> Message | None:
        """Start the child, send it the config and return its first event (None if it died)."""
        read_fd, write_fd = os.pipe()
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "bgapi.runners.process", str(write_fd), str(level).lower()],
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
                # Ctrl-C signals the terminal's process group, and would kill
                # the child while it imports. The server stops it with SIGTERM.
                process_group=0,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._events = Connection(read_fd, writable=False)
        assert self._child.stdin is not None
        try:
            with self._child.stdin:
                self._child.stdin.write(pickle.dumps(self.poller.config))
        except BrokenPipeError:
            pass  # the child died at once, and recv() below reports it
        if not self._events.poll(START_TIMEOUT_S):
            self._kill()
            return None
        try:
            return self._events.recv()
        except EOFError:
            return None

    def _read(self) -> None:
        """Apply the child's reports until it exits, then report a crash unless stop() ended it."""
        assert self._events is not None and self._child is not None
        try:
            while True:
                try:
                    events = self._events.recv()
                except EOFError:
                    break
                self._apply(events)
        except Exception as error:
            logger.exception("cannot read the poller process's reports")
            self._kill()
            self.report_crash(error)
            return
        code = self._child.wait()
        if not self._stopping:
            self.report_crash(
                RunnerError(f"the poller process {self._child.pid} exited with code {code}")
            )

    def _apply(self, events: list[Message]) -> None:
        poller = self.poller
        for event in events:
            kind, name = event[0], event[1]
            if kind == "run":
                first = poller.stats.first_run_at is None
                poller.record_run(name, event[2], event[3])
                if first:
                    poller.stats.first_run_at = event[4]
            elif kind == "missed":
                poller.record_missed(name, event[2])
            elif kind == "next":
                poller.set_next_run(name, event[2])
            elif kind == "store":
                # The child's store write error, or None once it writes again: /healthz shows it.
                poller.store_error = event[2]
        try:
            poller.restore(changed_only=True)
        except StoreError as exc:
            # The next report tries again, and each new error is logged once.
            if str(exc) != self._restore_error:
                logger.warning("cannot show the poller process's latest results: %s", exc)
            self._restore_error = str(exc)
        else:
            self._restore_error = None

    async def _stop(self, timeout: float) -> None:
        self._stopping = True
        child = self._child
        if child is None:
            return
        self.child_peak_rss_kb = _peak_rss_kb(child.pid)
        if child.poll() is None:
            child.terminate()
        try:
            await asyncio.to_thread(child.wait, timeout)
        except subprocess.TimeoutExpired:
            self.error = f"the poller process did not stop within {timeout:g} s and was killed"
            logger.error("%s; the results it had not stored yet are lost", self.error)
            self._kill()
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, timeout)
        if self._events is not None:
            self._events.close()
        # The child's last results are on disk, so show them.
        await asyncio.to_thread(self.poller.restore)

    def _kill(self) -> None:
        if self._child is not None and self._child.poll() is None:
            self._child.kill()
            self._child.wait()


def _peak_rss_kb(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


class _ReportingPoller(Poller):
    """The child's poller: it also queues what the server's copy must count."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[Message] = []
        self.max_uncommitted = _max_uncommitted(self.enabled_targets)
        self._sent_store_error: str | None = None

    def take_events(self) -> list[Message]:
        """Return the events since the last call, with the store's error if it changed."""
        batch, self.events = self.events, []
        store_error = self.store_error
        if store_error != self._sent_store_error:
            batch.append(("store", None, store_error))
            self._sent_store_error = store_error
        return batch

    def record_run(self, name: str, lateness_ms: float, missed: int) -> None:
        super().record_run(name, lateness_ms, missed)
        self.events.append(("run", name, lateness_ms, missed, time.time()))

    def record_missed(self, name: str, missed: int) -> None:
        super().record_missed(name, missed)
        self.events.append(("missed", name, missed))

    def set_next_run(self, name: str, next_run_at: float) -> None:
        super().set_next_run(name, next_run_at)
        self.events.append(("next", name, next_run_at))

    async def _save(self, result: PollResult, snapshot: TargetStatus) -> None:
        # The server reads results from the store, never from this process's
        # memory, so a poll need not wait for its commit. While the disk
        # stalls, polls wait again, so that the queue of writes stays bounded.
        if self.store is None:
            return
        if self.store.uncommitted >= self.max_uncommitted:
            await super()._save(result, snapshot)
        else:
            self.store.submit(result, snapshot, self._saved)

    def _saved(self, error: BaseException | None) -> None:
        # Called on the store's writer thread; the store logs write errors itself.
        self.store_error = str(error) if error is not None else None


def _max_uncommitted(targets: list[Any]) -> int:
    """Return how many results may wait for their commit before a poll waits for its own.

    One per target, the bound from when every poll waited for its commit,
    or twice the polls of one commit delay if that is more, so that a
    healthy store never delays a poll. If the store stalls and then SIGTERM
    comes, about this many results can be lost.
    """
    polls_per_s = sum(1 / target.interval_s for target in targets)
    return max(1, len(targets), math.ceil(2 * polls_per_s * COMMIT_DELAY_S))


async def _serve(poller: _ReportingPoller, events: Connection) -> None:
    """Run the schedule until SIGTERM, until the parent dies or until the schedule crashes."""
    from bgapi.poller import LoopResources
    from bgapi.schedule import run_schedule

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    watch_parent(lambda: loop.call_soon_threadsafe(stop.set), PARENT_CHECK_S)

    def send_events() -> None:
        batch = poller.take_events()
        try:
            events.send(batch)
        except OSError:  # the server is gone: stop polling
            stop.set()

    async def report() -> None:
        while True:
            await asyncio.sleep(REPORT_S)
            send_events()

    resources = LoopResources(poller.config)
    schedule = asyncio.create_task(run_schedule(poller, resources, GROUP_STEP_S), name="bgapi-schedule")
    reporter = asyncio.create_task(report(), name="bgapi-process-report")
    stopped = asyncio.create_task(stop.wait(), name="bgapi-process-stop")
    try:
        events.send(("ready",))
    except OSError:
        stop.set()
    try:
        await asyncio.wait({schedule, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (schedule, reporter, stopped):
            task.cancel()
        await asyncio.gather(schedule, reporter, stopped, return_exceptions=True)
        await resources.aclose()
        send_events()
    if not schedule.cancelled() and schedule.exception() is not None:
        # A bug outside a poll: exit non-zero with the traceback, so the server reports a crash.
        raise schedule.exception()  # type: ignore[misc]


def _child_main(argv: list[str]) -> None:
    """Poll until SIGTERM or until the parent dies: ``python -m bgapi.runners.process FD LEVEL``."""
    # The server stops this process with SIGTERM. A SIGINT sent to its own
    # process group (the server starts it in a new one) must not stop it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "nice"):
        os.nice(CHILD_NICENESS)
    events = Connection(int(argv[0]), readable=False)
    config = pickle.loads(sys.stdin.buffer.read())

    from bgapi.logs import setup_logging
    from bgapi.runners.thread import new_loop
    from bgapi.store import Store

    setup_logging(argv[1], config.redact)
    store = Store(config.store.path, config.store.retention, commit_delay_s=COMMIT_DELAY_S)
    store.open()
    try:
        poller = _ReportingPoller(config, store, mode=ProcessRunner.mode)
        poller.restore()
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(_serve(poller, events))
    finally:
        store.close(CLOSE_TIMEOUT_S)
        with contextlib.suppress(OSError):
            events.close()


if __name__ == "__main__":
    _child_main(sys.argv[1:])
