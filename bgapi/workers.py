"""One poller per deployment, however many worker processes serve the app.

Under ``bgapi run-all --workers N``, ``uvicorn --workers N``, gunicorn with
uvicorn workers or ``--reload``, every worker process runs the app's lifespan.
Each one tries an exclusive ``fcntl.flock`` on a file next to the SQLite
store (``bgapi.db.poller.lock`` beside ``bgapi.db``). The holder polls. The
others are on standby: they serve the API from the store and try the lock
again every second (sooner when a target's interval is shorter). The kernel
releases the lock when the holder exits or dies, so a standby takes over
within one retry period.

The lock covers the processes of one machine that share the store's
directory: ``flock`` is not reliable on network file systems.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from bgapi.errors import ConfigError, RunnerError, StoreError
from bgapi.runners.base import DEFAULT_STOP_TIMEOUT_S, Runner, RunState

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = [
    "ExclusiveRunner",
    "PollerLock",
    "create_app_from_env",
    "lock_path_for",
    "lock_retry_s",
    "run_workers",
]

logger = logging.getLogger(__name__)

# A standby tries the lock this often, or at the shortest interval if that is shorter.
LOCK_RETRY_S = 1.0
MIN_LOCK_RETRY_S = 0.05

# The environment that create_app_from_env() reads, and run_workers() sets.
CONFIG_ENV = "BGAPI_CONFIG"
MODE_ENV = "BGAPI_MODE"
LOG_LEVEL_ENV = "BGAPI_LOG_LEVEL"
# The address the workers' socket is bound to, for the write-access rules.
LISTEN_HOST_ENV = "BGAPI_LISTEN_HOST"

WORKER_APP = "bgapi.workers:create_app_from_env"


def lock_path_for(store_path: str | os.PathLike[str]) -> Path:
    """Return the poller lock file that belongs to the store at ``store_path``."""
    return Path(f"{os.fspath(store_path)}.poller.lock")


class PollerLock:
    """An exclusive, non-blocking lock on a file, released by the kernel when its holder dies.

    The holder writes its process id into the file, so that other processes
    can tell which one polls.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if no other process (or other PollerLock) holds it; never blocks.

        Raises:
            StoreError: the lock file cannot be created or opened.
        """
        if self._fd is not None:
            return True
        if fcntl is None:
            # NOTE: without fcntl (Windows) there is no lock: every process polls.
            self._fd = -1
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"cannot open the poller lock file {str(self.path)!r}: {exc}; "
                "check that the store's directory is writable, or set [store] path"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def record_holder(self, pid: int) -> None:
        """Write ``pid`` into the held lock file as the id of the process that polls."""
        if self._fd is None or self._fd < 0:
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{pid}\n".encode(), 0)

    def release(self) -> None:
        """Give the lock up; calling it without holding the lock does nothing."""
        fd, self._fd = self._fd, None
        if fd is None or fd < 0:
            return
        # The file stays: deleting it would let a process that opened the old
        # file lock it while another locks a new file at the same path.
        os.ftruncate(fd, 0)
        os.close(fd)

    def holder_pid(self) -> int | None:
        """Return the id of the process that holds the lock, None if unknown or dead."""
        if self.held:
            return os.getpid()
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not text.isdigit():
            return None
        pid = int(text)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # the holder died; a standby takes the lock on its next try
        except PermissionError:
            pass  # alive, but owned by another user
        return pid


def lock_retry_s(intervals: list[float]) -> float:
    """Return how often a standby tries the lock for targets with these intervals (seconds)."""
    shortest = min(intervals, default=LOCK_RETRY_S)
    return max(MIN_LOCK_RETRY_S, min(LOCK_RETRY_S, shortest))


class ExclusiveRunner(Runner):
    """Run ``inner`` only while this process holds the deployment's poller lock.

    Without the lock the runner is on standby (:attr:`RunState.STANDBY`): it
    counts as alive for ``/healthz``, :attr:`polling` is False, and a
    background task tries the lock every ``retry_s`` seconds. On taking the
    lock it reloads the targets' states from the store, so thresholds go on
    counting from where the previous holder stopped, and starts ``inner``.
    If ``inner`` crashes, the lock is released so that another process takes
    over, and this process reports the crash on ``/healthz``.
    """

    def __init__(self, inner: Runner, lock: PollerLock, retry_s: float = LOCK_RETRY_S) -> None:
        self.inner = inner
        self.lock = lock
        self.retry_s = retry_s
        self._supervisor: asyncio.Task[None] | None = None
        self._own_error: str | None = None
        super().__init__(inner.poller)
        self.mode = inner.mode  # type: ignore[misc]  # the wrapped strategy's name

    # Once the inner runner has begun, its state and error are this runner's.

    @property  # type: ignore[override]
    def state(self) -> RunState:
        """The inner runner's state once it has started, otherwise this runner's own."""
        if self._own_state is RunState.CRASHED or self.inner.state is RunState.IDLE:
            return self._own_state
        return self.inner.state

    @state.setter
    def state(self, value: RunState) -> None:
        self._own_state = value

    @property  # type: ignore[override]
    def error(self) -> str | None:
        """Why the runner died or did not stop in time, None otherwise."""
        return self.inner.error or self._own_error

    @error.setter
    def error(self, value: str | None) -> None:
        self._own_error = value

    @property
    def alive(self) -> bool:
        """True while starting, running or on standby."""
        return self.state in (RunState.STARTING, RunState.RUNNING, RunState.STANDBY)

    @property
    def polling(self) -> bool:
        """True while this process holds the lock and its runner is alive."""
        return self.lock.held and self.inner.alive

    @property
    def poller_pid(self) -> int | None:
        """The id of the polling process: the inner runner's while this one holds the lock."""
        if self.polling:
            return self.inner.poller_pid
        return self.lock.holder_pid()

    async def start(self) -> None:
        """Start polling if the lock is free, otherwise go on standby.

        Raises:
            RunnerError: the runner was already started.
            StoreError: the lock file cannot be opened.
        """
        if self.state is not RunState.IDLE:
            raise RunnerError(f"cannot start the {self.mode} runner: it is {self.state}")
        await self._start()

    async def _start(self) -> None:
        if self.lock.try_acquire():
            await self._start_inner()
        else:
            self.state = RunState.STANDBY
            logger.info(
                "process %d is on standby: process %s holds the poller lock %s, so this process "
                "serves the API from the store and starts polling if that process exits",
                os.getpid(),
                self.lock.holder_pid() or "(unknown)",
                self.lock.path,
            )
        self._supervisor = asyncio.create_task(self._supervise(), name="bgapi-poller-lock")

    async def _start_inner(self) -> None:
        await self.inner.start()
        # The process mode polls in a child: every worker then reports the child's id.
        pid = self.inner.poller_pid
        if pid is not None and pid != os.getpid():
            self.lock.record_holder(pid)

    async def _supervise(self) -> None:
        """Take the lock when it frees up and start polling; give it up if the poller dies."""
        try:
            if not self.lock.held:
                while not self.lock.try_acquire():
                    await asyncio.sleep(self.retry_s)
                logger.info(
                    "process %d took the poller lock %s and starts polling",
                    os.getpid(),
                    self.lock.path,
                )
                await asyncio.to_thread(self.poller.restore)
                await self._start_inner()
            while self.inner.alive:
                await asyncio.sleep(self.retry_s)
            if self.inner.state is RunState.CRASHED:
                self.lock.release()
                logger.error(
                    "process %d released the poller lock %s because its poller died; "
                    "another process that shares the store, if one runs, takes over polling",
                    os.getpid(),
                    self.lock.path,
                )
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - a standby that cannot take over must say why
            self.report_crash(error)

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Stop the standby task or the inner runner, then release the lock.

        Calling it again, or on a runner that never started, does nothing.
        """
        if self.state in (RunState.IDLE, RunState.STOPPED, RunState.STOPPING):
            return
        await self._stop(timeout)

    async def _stop(self, timeout: float) -> None:
        task = self._supervisor
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=timeout)
        # A takeover cancelled halfway may have left the inner runner starting.
        await self.inner.stop(timeout)
        self.lock.release()
        if self.inner.state is RunState.IDLE and self._own_state is not RunState.CRASHED:
            self.state = RunState.STOPPED
            logger.info("standby process %d stopped", os.getpid())


def create_app_from_env() -> FastAPI:
    """Build the bgapi app from environment variables: an app factory for servers.

    ``bgapi run-all --workers N`` starts its workers with it, and it serves
    any server that imports a factory, for example
    ``BGAPI_CONFIG=config.toml uvicorn --factory bgapi.workers:create_app_from_env --workers 4``.
    It reads three variables. ``BGAPI_CONFIG`` is the TOML file (required).
    ``BGAPI_MODE`` is thread, asyncio, apscheduler or process (the config's default when
    unset). ``BGAPI_LOG_LEVEL`` sets up bgapi's log handler at that level; when
    it is unset, the logging configuration is left alone.

    Raises:
        ConfigError: ``BGAPI_CONFIG`` is not set, the file is invalid or the mode is unknown.
    """
    from bgapi.config import MODES, load_config
    from bgapi.server import create_app

    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(
            [
                f"{CONFIG_ENV} is not set; export {CONFIG_ENV}=path/to/config.toml before starting the server"
            ]
        )
    config = load_config(path)
    mode = os.environ.get(MODE_ENV) or None
    if mode is not None and mode not in MODES:
        raise ConfigError([f"{MODE_ENV}={mode!r} is not a mode; use one of {', '.join(MODES)}"])
    level = os.environ.get(LOG_LEVEL_ENV)
    if level:
        from bgapi.logs import setup_logging

        # uvicorn configured its loggers before calling this factory; keep the
        # access log off if it turned it off (access_log=False).
        access = logging.getLogger("uvicorn.access")
        access_off = not access.propagate and not access.handlers
        setup_logging(level, config.redact)
        if access_off:
            access.propagate = False
    app = create_app(config, mode=mode)
    listen_host = os.environ.get(LISTEN_HOST_ENV)
    if listen_host:
        app.state.listen_host = listen_host
    return app


@contextlib.contextmanager
def _sigint_ignored_by_new_processes() -> Iterator[None]:
    """Start processes with SIGINT ignored meanwhile, and hold back this process's own SIGINT.

    A process inherits an ignored signal across fork and exec, and Python
    then leaves it ignored. This process blocks SIGINT meanwhile as well.
    Linux keeps a blocked signal pending even while it is ignored, so it
    reaches the restored handler at the end. Other systems may drop it.
    """
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class _WorkersIgnoreEarlySigint:
    """A mixin for uvicorn's ``Multiprocess`` that starts every worker with SIGINT ignored.

    Ctrl-C sends SIGINT to every process in the terminal's process group. A
    worker that was still importing the app died of it with a
    KeyboardInterrupt traceback. The supervisor stops its workers with
    SIGTERM anyway, and a worker's uvicorn server handles SIGINT again once
    it runs.
    """

    def init_processes(self) -> None:
        with _sigint_ignored_by_new_processes():
            super().init_processes()  # type: ignore[misc]

    def restart_all(self) -> None:
        with _sigint_ignored_by_new_processes():
            super().restart_all()  # type: ignore[misc]

    def keep_subprocess_alive(self) -> None:
        with _sigint_ignored_by_new_processes():
            super().keep_subprocess_alive()  # type: ignore[misc]


def run_workers(
    config_path: str | os.PathLike[str],
    *,
    workers: int,
    mode: str | None,
    host: str,
    port: int,
    log_level: str = "info",
    access_log: bool = False,
) -> bool:
    """Serve the app from ``workers`` processes until SIGINT or SIGTERM.

    The parent process binds the socket and supervises the workers with
    uvicorn's ``Multiprocess`` supervisor, which restarts a worker that dies.
    Each worker builds the app with :func:`create_app_from_env`; the poller
    lock makes exactly one of them poll.

    Returns:
        False if a worker failed during startup (the app or the port is
        broken), True otherwise.
    """
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from bgapi.server import uvicorn_config

    # Spawned workers inherit the environment and nothing else of this process.
    os.environ[CONFIG_ENV] = str(Path(config_path).resolve())
    os.environ[LOG_LEVEL_ENV] = log_level
    os.environ[LISTEN_HOST_ENV] = host
    if mode:
        os.environ[MODE_ENV] = mode
    else:
        os.environ.pop(MODE_ENV, None)
    config = uvicorn_config(
        WORKER_APP,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        factory=True,
        workers=workers,
    )

    class Supervisor(_WorkersIgnoreEarlySigint, Multiprocess):
        pass

    sock = config.bind_socket()
    supervisor = Supervisor(config, sockets=[sock])
    try:
        supervisor.run()
    finally:
        sock.close()
    return not any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes)
